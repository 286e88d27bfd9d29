"""training.lean_activations: Llama-family RMSNorm and SwiGLU that keep less for backward (models/lean.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from lora_project.models.lean import (
    LeanRMSNorm,
    LeanSiluMul,
    apply_lean_activations,
    remove_lean_activations,
)

LAYERS, HIDDEN, INTER, BATCH, SEQ = 2, 32, 64, 2, 16
TOKENS = BATCH * SEQ


def _tiny_llama(dtype=torch.float32, targets=("q_proj", "v_proj", "gate_proj", "up_proj")):
    """A 2-layer Llama with LoRA (B not zero, so every LoRA weight gets a gradient) and norms
    whose weights are not all ones (so the weight's place in the computation matters)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    base = LlamaForCausalLM(cfg)
    for name, p in base.named_parameters():
        if "norm" in name:
            p.data.uniform_(0.5, 1.5)
    base.to(dtype).requires_grad_(False)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets),
                                           init_lora_weights=False))


def _forward_backward(model, embeds, autocast=False):
    x = embeds.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(inputs_embeds=x).logits
    lora = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.float().pow(2).mean(), [x, *lora])
    return out.detach(), grads


def _close(a, b, rel):
    return torch.allclose(a.float(), b.float(), rtol=rel, atol=rel * float(b.float().abs().max()))


@pytest.mark.parametrize("dtype, autocast, rel", [(torch.float32, False, 1e-6), (torch.bfloat16, True, 2e-2)])
def test_patched_model_gives_the_same_outputs_and_gradients(dtype, autocast, rel):
    model = _tiny_llama(dtype)
    embeds = torch.randn(BATCH, SEQ, HIDDEN, generator=torch.Generator().manual_seed(2)).to(dtype)
    ref_out, ref_grads = _forward_backward(model, embeds, autocast)
    # per layer: 2 norms + 1 MLP; plus the final norm
    assert apply_lean_activations(model) == 3 * LAYERS + 1
    out, grads = _forward_backward(model, embeds, autocast)
    assert torch.equal(out, ref_out)  # the same operations in the same order
    assert len(grads) == len(ref_grads) == 1 + 2 * 4 * LAYERS  # input + A and B of 4 targets per layer
    assert all(_close(g, r, rel) for g, r in zip(grads, ref_grads))
    assert all(float(r.abs().max()) > 0 for r in ref_grads)  # every gradient is really compared
    # idempotent, and reversible
    assert apply_lean_activations(model) == 0
    assert remove_lean_activations(model) == 3 * LAYERS + 1
    assert not any("forward" in vars(m) for m in model.modules())
    again, _ = _forward_backward(model, embeds, autocast)
    assert torch.equal(again, ref_out)


def _hf_rms_norm(x, weight, eps):  # LlamaRMSNorm.forward, line for line
    input_dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(input_dtype)


@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_norm_gradients_with_respect_to_input_and_a_trainable_weight(dtype, rel):
    gen = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(3, 5, 64, generator=gen)).to(dtype)
    w = (0.5 + torch.rand(64, generator=gen)).to(dtype)
    gy = torch.randn(3, 5, 64, generator=gen).to(dtype)
    results = []
    for fn in (_hf_rms_norm, LeanRMSNorm.apply):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = fn(xi, wi, 1e-6)
        results.append((out, *torch.autograd.grad(out, [xi, wi], gy)))
    (ref, ref_gx, ref_gw), (out, gx, gw) = results
    assert torch.equal(out, ref)
    assert gx.dtype == dtype and gw.dtype == dtype
    assert _close(gx, ref_gx, rel) and _close(gw, ref_gw, rel)


def test_silu_product_matches_finite_differences():
    gen = torch.Generator().manual_seed(3)
    gate = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    up = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(LeanSiluMul.apply, (gate, up))


def _saved_bytes(model, ids, autocast=False) -> int:
    """Bytes autograd keeps for backward after one forward (each storage counted once)."""
    kept: dict[int, int] = {}

    def pack(t):
        kept[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids).logits
    del out
    return sum(kept.values())


@pytest.mark.parametrize("dtype, autocast", [(torch.float32, False), (torch.bfloat16, True)])
def test_less_is_kept_for_backward(dtype, autocast):
    model = _tiny_llama(dtype, targets=("q_proj", "v_proj"))
    ids = torch.randint(0, 100, (BATCH, SEQ), generator=torch.Generator().manual_seed(4))
    plain = _saved_bytes(model, ids, autocast)
    apply_lean_activations(model)
    lean = _saved_bytes(model, ids, autocast)
    size = torch.finfo(dtype).bits // 8
    # every layer's MLP keeps gate and up, not silu(gate) as well
    expected = LAYERS * TOKENS * INTER * size
    if dtype != torch.float32:
        # each norm that needs a gradient keeps its input, not an fp32 copy of it: all but the
        # first layer's first (its input, the frozen embeddings, needs none) and the final norm
        expected += 2 * LAYERS * TOKENS * HIDDEN * (4 - size)
    assert plain - lean >= expected, (plain, lean, expected)


class LlamaRMSNorm(torch.nn.Module):
    """An impostor: Llama's class name, Gemma's computation (x_hat * (1 + weight), weight 0 at init)."""

    def __init__(self, width):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(width))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (normed * (1 + self.weight)).to(x.dtype)


class ScaledMLP(torch.nn.Module):
    """gate/up/down and SiLU, but not down(silu(gate) * up)."""

    def __init__(self, width):
        super().__init__()
        self.gate_proj, self.up_proj = torch.nn.Linear(width, 2 * width), torch.nn.Linear(width, 2 * width)
        self.down_proj, self.act_fn = torch.nn.Linear(2 * width, width), torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * 2)


def test_gemma_norms_and_modules_that_only_look_alike_are_left_alone():
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    gemma = GemmaForCausalLM(GemmaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=100))
    for p in gemma.parameters():
        p.data.normal_(0, 0.5)
    ids = torch.randint(0, 100, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))
    before = gemma(input_ids=ids).logits
    assert apply_lean_activations(gemma) == 0  # (1 + weight) norms, GELU MLPs
    assert not any("forward" in vars(m) for m in gemma.modules())
    assert torch.equal(gemma(input_ids=ids).logits, before)
    fakes = torch.nn.Sequential(LlamaRMSNorm(HIDDEN), ScaledMLP(HIDDEN))
    x = torch.randn(BATCH, SEQ, HIDDEN)
    before = fakes(x)
    assert apply_lean_activations(fakes) == 0  # checked against their own forward: they differ
    assert torch.equal(fakes(x), before)


def test_trainer_gives_the_same_losses_with_and_without(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lora_project.config import LoraSection, TrainingSection
    from lora_project.models.lora_model import wrap_with_lora
    from lora_project.training.trainer import BlockLoader, LoraTrainer
    from lora_project.utils.device import resolve_runtime

    stream = np.tile(np.arange(3, 40, dtype=np.uint16), 20)
    results = {}
    for lean in (False, True):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        # dropout: the check before patching must not draw from the global RNG (the masks would differ)
        lora = LoraSection(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"])
        model = wrap_with_lora(base, lora, seed=0)
        cfg = dataclasses.replace(TrainingSection(), max_steps=2, batch_size=2, seq_len=16, warmup_steps=0, lr=1e-2,
                                  log_interval=1, lean_activations=lean)
        trainer = LoraTrainer(model, cfg, BlockLoader(stream, cfg.seq_len, cfg.batch_size, 0),
                              resolve_runtime("cpu", "fp32", 1), [])
        patched = sum("forward" in vars(m) for m in model.modules())
        assert patched == (3 * 2 + 1 if lean else 0)
        trainer.fit()
        results[lean] = [h["loss"] for h in trainer.state.history]
    assert len(results[True]) == 2
    assert np.allclose(results[True], results[False], rtol=1e-6, atol=0)
