"""The training loop on a tiny model, in process."""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_project.config import LoraSection, TrainingSection
from lora_project.training.trainer import (
    BlockLoader,
    LoraTrainer,
    lr_lambda,
    total_steps,
)
from lora_project.utils.device import resolve_runtime

FP32 = resolve_runtime("cpu", "fp32", 1)


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _train(tiny_model_dir, targets=("q_proj", "v_proj"), **overrides):
    from transformers import AutoModelForCausalLM

    from lora_project.models.lora_model import wrap_with_lora

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = wrap_with_lora(base, LoraSection(r=4, alpha=8, dropout=0.0, target_modules=list(targets)), seed=0)
    settings = dict(max_steps=8, batch_size=2, seq_len=16, warmup_steps=1, lr=1e-2, log_interval=1)
    cfg = dataclasses.replace(TrainingSection(), **{**settings, **overrides})
    stream = np.tile(np.arange(3, 40, dtype=np.uint16), 20)  # a repeating pattern: learnable
    trainer = LoraTrainer(model, cfg, BlockLoader(stream, cfg.seq_len, cfg.batch_size, 0), FP32, [])
    result = trainer.fit()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return result, trainer.state.history, weights


def test_loss_falls_on_learnable_data(tiny_model_dir):
    result, history, _ = _train(tiny_model_dir, ALL_LINEAR, max_steps=20, lr=3e-2)
    assert result.steps == 20 and result.tokens_seen == 20 * 2 * 16
    # The tiny model's frozen tied embeddings (std 0.02) cap how confident it can get, so the
    # reachable drop from ln(vocab) is small; a steady fall of > 0.1 nats shows optimisation.
    assert history[-1]["loss"] < history[0]["loss"] - 0.1
    assert np.mean([h["loss"] for h in history[-5:]]) < np.mean([h["loss"] for h in history[:5]])


def test_gradient_checkpointing_and_accumulation_do_not_change_the_result(tiny_model_dir):
    _, _, plain = _train(tiny_model_dir)
    _, _, ckpt = _train(tiny_model_dir, gradient_checkpointing=True)
    assert all(torch.allclose(plain[k], ckpt[k], atol=1e-5) for k in plain)
    # batch 2 x 1 step == batch 1 x 2 accumulated micro-steps (same blocks, same order)
    _, _, accum = _train(tiny_model_dir, batch_size=1, grad_accum=2)
    assert all(torch.allclose(plain[k], accum[k], atol=1e-5) for k in plain)


def test_schedule_shapes():
    cfg = dataclasses.replace(TrainingSection(), warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    f = lr_lambda(cfg, 20)
    assert [round(f(s), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(20) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 20))
    lin = lr_lambda(dataclasses.replace(cfg, schedule="linear"), 20)
    assert lin(12) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_lambda(dataclasses.replace(cfg, schedule="constant"), 20)(15) == 1.0
    assert total_steps(dataclasses.replace(cfg, max_steps=0, epochs=2.0, batch_size=4), 10) == 5


def test_loader_is_seeded_and_visits_every_block_once_per_epoch():
    stream = np.arange(101, dtype=np.uint16)
    a = BlockLoader(stream, 10, 5, seed=3)
    first = [a.next_batch()[0][:, 0].tolist() for _ in range(2)]
    starts = sorted(x for b in first for x in b)
    assert starts == list(range(0, 100, 10))
    b = BlockLoader(stream, 10, 5, seed=3)
    assert [b.next_batch()[0][:, 0].tolist() for _ in range(2)] == first
    state = a.state_dict()
    nxt = a.next_batch()
    c = BlockLoader(stream, 10, 5, seed=3)
    c.load_state_dict(state)
    assert torch.equal(c.next_batch()[0], nxt[0])


def test_stop_request_swallowed_by_a_weakref_callback_still_stops_training(tiny_model_dir, capsys):
    """CI once saw SIGTERM land inside SQLAlchemy's weakref callback: Python printed
    "Exception ignored" and training ran on. The stop flag must end the run anyway."""
    import gc
    import sys
    import weakref

    from lora_project.errors import RunInterrupted
    from lora_project.training.callbacks import Callback
    from lora_project.utils import interrupts

    class Obj:
        pass

    class SignalInsideWeakrefCallback(Callback):
        def on_step_end(self, state, metrics):
            if state.step == 2:
                obj = Obj()
                ref = weakref.ref(obj, lambda _: interrupts.handle_signal(15, None))  # noqa: F841
                del obj  # the callback raises RunInterrupted; Python swallows it
                gc.collect()

    from transformers import AutoModelForCausalLM

    from lora_project.models.lora_model import wrap_with_lora

    model = wrap_with_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraSection(r=4, alpha=8, dropout=0.0, target_modules=["q_proj"]), seed=0)
    cfg = dataclasses.replace(TrainingSection(), max_steps=50, batch_size=2, seq_len=16, warmup_steps=1)
    stream = np.tile(np.arange(3, 40, dtype=np.uint16), 20)
    trainer = LoraTrainer(model, cfg, BlockLoader(stream, cfg.seq_len, cfg.batch_size, 0), FP32,
                          [SignalInsideWeakrefCallback()])
    old_hook = sys.unraisablehook
    sys.unraisablehook = interrupts._quiet_unraisable
    try:
        with pytest.raises(RunInterrupted):
            trainer.fit()
    finally:
        sys.unraisablehook = old_hook
        interrupts.clear_stop()
    assert trainer.state.step == 2  # stopped at the next step boundary, not at max_steps
    assert "Exception ignored" not in capsys.readouterr().err


def test_stop_inside_a_shielded_section_is_raised_when_it_ends():
    import signal

    from lora_project.errors import RunInterrupted
    from lora_project.utils import interrupts

    done = []
    interrupts.clear_stop()
    try:
        with pytest.raises(RunInterrupted):
            with interrupts.shielded():
                interrupts.handle_signal(signal.SIGTERM, None)  # deferred, not raised here
                done.append("finished the write")
        assert done == ["finished the write"]
        with pytest.raises(RunInterrupted):  # a second signal is not deferred
            with interrupts.shielded():
                interrupts.handle_signal(signal.SIGTERM, None)
                done.append("never")
        assert done == ["finished the write"]
    finally:
        interrupts.clear_stop()


def test_a_stop_is_raised_once_so_clean_up_is_not_torn():
    import signal

    from lora_project.errors import RunInterrupted
    from lora_project.utils import interrupts

    interrupts.clear_stop()
    try:
        with pytest.raises(RunInterrupted):
            with interrupts.shielded():
                interrupts.handle_signal(signal.SIGTERM, None)
        interrupts.acknowledge()  # the run's clean-up has received the stop
        with interrupts.shielded():  # ending MLflow, writing results.json: not interrupted again
            pass
        interrupts.check_stop()
    finally:
        interrupts.clear_stop()


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_non_finite_gradients_stop_the_run_before_they_reach_the_weights(tiny_model_dir, max_grad_norm):
    """A backward pass can produce NaN gradients while the loss is finite (seen with bf16 matmuls on
    an AMX CPU): the step that has them must not update the weights, and the error names it."""
    from transformers import AutoModelForCausalLM

    from lora_project.errors import UserError
    from lora_project.models.lora_model import wrap_with_lora

    model = wrap_with_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraSection(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]), seed=0)
    cfg = dataclasses.replace(TrainingSection(), max_steps=5, batch_size=2, seq_len=16, warmup_steps=0, lr=1e-2,
                              log_interval=1, max_grad_norm=max_grad_norm)
    stream = np.tile(np.arange(3, 40, dtype=np.uint16), 20)
    trainer = LoraTrainer(model, cfg, BlockLoader(stream, cfg.seq_len, cfg.batch_size, 0), FP32, [])
    target = next(p for n, p in model.named_parameters() if "lora_A" in n)
    calls = []

    def poison(grad):  # the third backward pass returns a NaN gradient for one LoRA matrix
        calls.append(1)
        return grad * float("nan") if len(calls) == 3 else grad

    target.register_hook(poison)
    before = {}

    from lora_project.training.callbacks import Callback

    class Snapshot(Callback):
        def on_step_end(self, state, metrics):
            before.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    trainer.callbacks.callbacks.append(Snapshot())
    with pytest.raises(UserError, match=r"diverged at step 3: non-finite gradients"):
        trainer.fit()
    assert trainer.state.step == 2  # steps 1 and 2 applied, step 3 refused
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p).all() and torch.equal(p.detach(), before[n])  # step 3 changed nothing
            assert p.grad is None


REPO = Path(__file__).resolve().parents[1]
_FAULTS_SCRIPT = """
import ctypes, resource, sys
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "reuse":
    from lora_project.utils.device import reuse_freed_memory
    assert reuse_freed_memory()
size = 64 << 20
def touch():
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's mallopt only")
def test_malloc_reuse_serves_a_second_large_block_without_page_faults():
    """training.malloc_reuse: a freed 64 MiB block comes back without a page fault per 4 KiB page
    (the C library default maps and unmaps it each time: about 16,000 faults)."""
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=str(REPO / "src")), check=True)
        return int(out.stdout.strip())

    assert faults("default") > 8000
    assert faults("reuse") < 1000


def test_bf16_forward_skips_lora_input_casts_and_restores_each_layers_flag(tiny_model_dir):
    """bf16 runs: PEFT's cast of LoRA inputs to fp32 is off during the forward only (autocast casts
    them back anyway); afterwards every layer has its own setting again, including one set off."""
    from transformers import AutoModelForCausalLM

    from lora_project.models.lora_model import wrap_with_lora

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(torch.bfloat16)
    model = wrap_with_lora(base, LoraSection(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]), seed=0)
    cfg = dataclasses.replace(TrainingSection(), max_steps=1, batch_size=2, seq_len=16, precision="bf16")
    trainer = LoraTrainer(model, cfg, BlockLoader(np.arange(3, 200, dtype=np.uint16), 16, 2, 0),
                          resolve_runtime("cpu", "bf16", 1), [])
    layers = trainer.uncast_lora
    assert len(layers) == 2 * model.config.num_hidden_layers
    layers[0].cast_input_dtype_enabled = False  # a user's own choice
    seen = []
    hook = layers[1].register_forward_pre_hook(lambda m, args: seen.append(m.cast_input_dtype_enabled))
    loss = trainer.micro_step(*trainer.loader.next_batch())
    hook.remove()
    assert seen == [False] and np.isfinite(loss)
    assert layers[0].cast_input_dtype_enabled is False
    assert all(m.cast_input_dtype_enabled for m in layers[1:])
