"""The fused loss, the sliding-window scorer and LoRA save/load on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lora_project.config import LoraSection
from lora_project.models.losses import CHUNK_BYTES, IGNORE_INDEX, chunk_tokens_for, linear_cross_entropy, sum_nll
from lora_project.models.scoring import score_documents, score_text, windows
from lora_project.utils.device import resolve_runtime

FP32 = resolve_runtime("cpu", "fp32", 1)


def test_fused_loss_matches_reference_value_and_gradient():
    torch.manual_seed(0)
    h = torch.randn(3, 17, 24, requires_grad=True)
    head = torch.nn.Linear(24, 101, bias=False).requires_grad_(False)
    t = torch.randint(0, 101, (3, 17))
    t[1, :5] = IGNORE_INDEX
    loss = linear_cross_entropy(h, head, t, chunk_tokens=8)
    (g,) = torch.autograd.grad(loss * 3.0, h)
    h2 = h.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(head(h2).reshape(-1, 101), t.reshape(-1), ignore_index=IGNORE_INDEX)
    (g_ref,) = torch.autograd.grad(ref * 3.0, h2)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(g, g_ref, atol=1e-6)
    n = int((t != IGNORE_INDEX).sum())
    assert sum_nll(h, head, t, 5).item() == pytest.approx(ref.item() * n, rel=1e-5)


def test_fused_loss_in_bf16_stays_near_fp32_and_survives_underflow():
    """The bf16 path's loss is -log of a bf16 softmax probability: near the fp32 value of the same
    logits; a target whose probability underflows (nll > 69) still gets its exact, finite nll."""
    torch.manual_seed(2)
    h = torch.randn(40, 32).to(torch.bfloat16).requires_grad_(True)
    head = torch.nn.Linear(32, 300, bias=True).to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        head.bias[7] = -150.0  # token 7 is (nearly) impossible: p underflows bf16 and fp32
    t = torch.randint(0, 300, (40,))
    t[3] = 7
    t[5] = IGNORE_INDEX
    loss = linear_cross_entropy(h, head, t, chunk_tokens=16)
    (g,) = torch.autograd.grad(loss, h)
    h2 = h.detach().float().requires_grad_(True)
    logits = h2 @ head.weight.float().t() + head.bias.float()
    ref = torch.nn.functional.cross_entropy(logits, t, ignore_index=IGNORE_INDEX)
    (g_ref,) = torch.autograd.grad(ref, h2)
    assert torch.isfinite(loss) and loss.item() > 150.0 / 39  # the underflowed token counts in full
    assert loss.item() == pytest.approx(ref.item(), abs=0.05)  # bf16 logits (8-bit mantissa) and probabilities
    assert (g.float() - g_ref).abs().max() < 0.02 * g_ref.abs().max()
    assert torch.all(g[5] == 0)  # ignored position: no gradient


def test_auto_loss_chunk_follows_a_byte_budget_and_changes_no_result():
    """chunk_tokens=0 (the default) sizes chunks so one chunk's logits fit the byte budget in the
    matmul dtype: half the tokens of bf16 in fp32; an explicit size is kept; the loss and gradient
    are those of any other chunking."""
    assert chunk_tokens_for(49152, torch.float32) == 256
    assert chunk_tokens_for(49152, torch.bfloat16) == 512
    assert chunk_tokens_for(49152, torch.float32, 1024) == 1024
    assert chunk_tokens_for(10**7, torch.float32) == 64  # never below the floor
    for vocab in (1000, 49152, 151936):
        for dtype in (torch.float32, torch.bfloat16):
            n = chunk_tokens_for(vocab, dtype)
            assert n % 64 == 0 and (n * vocab * (4 if dtype == torch.float32 else 2) <= CHUNK_BYTES or n == 64)
    torch.manual_seed(3)
    h = torch.randn(2, 700, 8, requires_grad=True)  # 1,400 tokens: several auto chunks at vocab 50,000
    head = torch.nn.Linear(8, 50000, bias=False).requires_grad_(False)
    t = torch.randint(0, 50000, (2, 700))
    results = []
    for chunk in (0, 2048):
        loss = linear_cross_entropy(h, head, t, chunk_tokens=chunk)
        (g,) = torch.autograd.grad(loss, h)
        results.append((loss.item(), g))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-8)


def test_trainable_head_takes_the_checkpointed_path_with_the_same_result():
    torch.manual_seed(1)
    h = torch.randn(2, 9, 16)
    head = torch.nn.Linear(16, 40, bias=True)  # trainable: not fused
    t = torch.randint(0, 40, (2, 9))
    loss = linear_cross_entropy(h, head, t, chunk_tokens=4)
    loss.backward()
    g = head.weight.grad.clone()
    head.weight.grad = None
    ref = torch.nn.functional.cross_entropy(head(h).reshape(-1, 40), t.reshape(-1))
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(g, head.weight.grad, atol=1e-6)


@pytest.mark.parametrize("n", [2, 3, 10, 57, 200])
@pytest.mark.parametrize("max_length, stride", [(2, 1), (8, 4), (8, 7), (16, 3), (64, 32)])
def test_windows_score_each_token_exactly_once(n, max_length, stride):
    seen = []
    for b, e, first in windows(n, max_length, stride):
        assert e - b <= max_length and b < first <= e
        seen.extend(range(first, e))
    assert seen == list(range(1, n))


def _direct_nll(model, ids, max_length, stride):
    """The definition, computed the slow obvious way: one window at a time, full logits."""
    total = 0.0
    with torch.no_grad():
        for b, e, first in windows(len(ids), max_length, stride):
            logits = model(torch.tensor([ids[b:e - 1]])).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            for j in range(first, e):
                total -= float(logp[j - 1 - b, ids[j]])
    return total


@pytest.mark.parametrize("max_length, stride", [(1024, 512), (12, 5), (6, 5)])
def test_score_text_equals_direct_computation(tiny_model_dir, max_length, stride):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    text = "the dog runs to the ball. mommy want juice. where ball? café"
    s = score_text(model, tok, text, FP32, max_length=max_length, stride=stride, batch_size=3)
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    assert s.tokens == len(ids) - 1
    assert s.bytes == len(text.encode("utf-8"))
    direct = _direct_nll(model, ids, max_length, stride)
    assert s.nll_sum == pytest.approx(direct, rel=1e-5)
    assert s.perplexity == pytest.approx(math.exp(direct / s.tokens), rel=1e-5)
    assert s.bits_per_byte == pytest.approx(direct / math.log(2) / s.bytes, rel=1e-5)


def test_score_documents_counts_separator_bytes(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    docs = ["the dog runs.", "bye bye doggy."]
    s = score_documents(model, tok, docs, "\n", FP32, max_length=64, stride=32)
    assert s.bytes == len("the dog runs.\nbye bye doggy.\n".encode())
    ids = [tok.bos_token_id]
    for d in docs:
        ids += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert s.tokens == len(ids) - 1
    assert s.nll_sum == pytest.approx(_direct_nll(model, ids, 64, 32), rel=1e-5)


def _lora(tiny_model_dir, seed=0):
    from transformers import AutoModelForCausalLM

    from lora_project.models.lora_model import wrap_with_lora

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model = wrap_with_lora(base, LoraSection(r=4, alpha=8, dropout=0.0), seed)
    # Give B non-zero values so the adapter changes the output.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return model


def test_saved_adapter_loads_with_plain_peft_and_gives_same_logits(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_project.models.adapter import AdapterMetadata, read_metadata
    from lora_project.models.lora_model import save_adapter

    model = _lora(tiny_model_dir)
    x = torch.tensor([[1, 5, 9, 20, 3]])
    with torch.no_grad():
        expected = model(x).logits
    meta = AdapterMetadata(adapter_name="a", dataset={"name": "kids"}, extra={"note": "test"})
    out = save_adapter(model, tmp_path / "a_lora", meta, overwrite=False)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    written = json.loads((out / "lora_project.json").read_text())
    assert written["format"] == "lora_project.adapter/1" and written["note"] == "test"
    assert written["dataset"] == {"name": "kids"} and written["git_commit"] is None  # unknown, not invented
    assert read_metadata(out) == meta  # written and read in one place, unknown keys kept
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        base_logits = fresh(x).logits
    loaded = PeftModel.from_pretrained(fresh, str(out)).eval()
    with torch.no_grad():
        got = loaded(x).logits
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, base_logits, atol=1e-3)  # the adapter really changes the model


def test_same_seed_same_initial_adapter(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lora_project.models.lora_model import wrap_with_lora

    def init(seed):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        m = wrap_with_lora(base, LoraSection(r=4, alpha=8), seed)
        return {n: p.detach().clone() for n, p in m.named_parameters() if "lora_A" in n}

    a, b, c = init(3), init(3), init(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_failed_save_keeps_previous_adapter(tiny_model_dir, tmp_path, monkeypatch):
    from lora_project.models.lora_model import save_adapter

    model = _lora(tiny_model_dir)
    target = save_adapter(model, tmp_path / "a_lora", {"v": 1}, overwrite=False)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(OSError):
        save_adapter(model, target, {"v": 2}, overwrite=True)
    assert before == {p.name: p.read_bytes() for p in target.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["a_lora"]  # no temporary folder left behind


def test_unknown_target_module_lists_available(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lora_project.errors import UserError
    from lora_project.models.lora_model import wrap_with_lora

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(UserError, match="q_projj not found.*q_proj"):
        wrap_with_lora(base, LoraSection(target_modules=["q_projj"]), 0)
    from lora_project.models.lora_model import check_targets

    # The default 'auto' on a Llama (the embedded SmolLM2's family) is the LoRA paper's q_proj, v_proj.
    assert check_targets(base, LoraSection()) == ["q_proj", "v_proj"]


def test_corrupt_or_foreign_adapters_are_refused(tiny_model_dir, other_tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from lora_project.errors import UserError
    from lora_project.models.lora_model import attach_adapters, save_adapter

    model = _lora(tiny_model_dir)
    good = save_adapter(model, tmp_path / "g_lora", {"base_model": {"fingerprint": "aaa", "name": "tiny"}}, False)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(UserError, match="was trained on base model tiny"):
        attach_adapters(base, [good], base_fingerprint="bbb")
    broken = tmp_path / "b_lora"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="corrupt"):
        attach_adapters(base, [broken])
    with pytest.raises(UserError, match="missing adapter_model.safetensors"):
        (broken / "adapter_model.safetensors").unlink()
        attach_adapters(base, [broken])
    # Shapes that do not fit: an r=4 adapter from a hidden-32 model on a hidden-48 model.
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=48, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(UserError, match="does not fit the base model"):
        attach_adapters(wide, [good])


def test_training_memory_estimate_grows_with_the_step_and_shrinks_with_checkpointing(tiny_model_dir):
    from lora_project.models.base_model import ModelRef
    from lora_project.models.lora_model import skeleton_of, training_memory_gib

    ref = ModelRef(name="tiny", kind="local", directory=tiny_model_dir, fingerprint="f" * 64)
    skeleton = skeleton_of(ref)
    assert skeleton is not None and all(p.device.type == "meta" for p in skeleton.parameters())
    small = training_memory_gib(skeleton, 2, 16, 4, False)
    big = training_memory_gib(skeleton, 2, 1024, 4, False)
    ckpt = training_memory_gib(skeleton, 2, 1024, 4, True)
    weights = sum(p.numel() for p in skeleton.parameters()) * 4 / 2**30
    assert weights < small < big and weights < ckpt < big
    # 32 hidden, 2 layers, batch 2 x 16 tokens: 2 layers * 32 tokens * 32 * 34 values * 4 / 2 bytes
    assert small - weights == pytest.approx(2 * 32 * 32 * 34 * 2 / 2**30)
