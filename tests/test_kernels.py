"""The fp32 kernel of the scoring passes (models/kernels.py): oneDNN's fp32 linear gives PyTorch's
default results to fp32 rounding, falls back wherever it does not apply, and is undone after use."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_project.errors import UserError
from lora_project.models import kernels
from lora_project.models.kernels import ENV, fp32_kernel, fp32_linears, forced_kernel, linear
from lora_project.models.losses import SCORE_CHUNK_BYTES, chunk_tokens_for, token_nll

needs_onednn = pytest.mark.skipif(not kernels.onednn_available(), reason="this PyTorch build has no oneDNN")


@pytest.fixture()
def onednn_calls(monkeypatch) -> list:
    """Counts the calls that reach oneDNN's kernel."""
    calls, real = [], kernels._onednn
    monkeypatch.setattr(kernels, "_onednn", lambda *a: calls.append(1) or real(*a))
    return calls


@needs_onednn
def test_onednn_linear_equals_the_default_to_fp32_rounding_and_falls_back_where_it_must(onednn_calls):
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 40, generator=gen), torch.randn(96, generator=gen)
    x3 = torch.randn(3, 7, 40, generator=gen)
    strided = torch.randn(7, 3, 40, generator=gen).transpose(0, 1)  # not contiguous
    every_other = torch.randn(192, generator=gen)[::2]  # a strided bias, which oneDNN itself misreads
    expanded = torch.randn(1, generator=gen).expand(96)
    with forced_kernel("onednn"):
        for x, bias in ((x3, b), (strided, None), (x3[:0], b), (x3, every_other), (x3, expanded)):
            got, ref = linear(x, w, bias), torch.nn.functional.linear(x, w, bias)
            assert got.shape == ref.shape and got.dtype == torch.float32
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert len(onednn_calls) == 5
        # a gradient, autocast or bf16 take PyTorch's own linear: exact equality, and gradients flow
        xg = x3.clone().requires_grad_(True)
        out = linear(xg, w, b)
        assert out.requires_grad and torch.equal(out, torch.nn.functional.linear(xg, w, b))
        out.sum().backward()
        torch.testing.assert_close(xg.grad, w.sum(0).expand_as(xg))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert linear(x3, w, b).dtype == torch.bfloat16
        assert torch.equal(linear(x3.bfloat16(), w.bfloat16()), torch.nn.functional.linear(x3.bfloat16(), w.bfloat16()))
        assert len(onednn_calls) == 5  # none of these reached oneDNN
    with forced_kernel("native"):
        linear(x3, w, b)
    assert len(onednn_calls) == 5


@needs_onednn
def test_fp32_linears_swap_plain_linear_layers_and_restore_them_even_after_an_error(tiny_model_dir, onednn_calls):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    own = model.model.layers[0].mlp.down_proj
    own.forward = lambda x: torch.nn.functional.linear(x, own.weight)  # a layer with a forward of its own: left alone
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), forced_kernel("native"):
        ref = model(ids).logits
    with pytest.raises(RuntimeError, match="boom"), forced_kernel("onednn"), fp32_linears(model) as used:
        assert used == "onednn"
        swapped = [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" in m.__dict__]
        assert len(swapped) == sum(type(m) is torch.nn.Linear for m in model.modules())  # own's too, its own
        with torch.inference_mode():
            torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
        inference_calls = len(onednn_calls)
        assert inference_calls == len(swapped) - 1  # every plain linear layer once; the output layer too
        # training inside the context: the layers' own forward, gradients as usual
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
        assert len(onednn_calls) == inference_calls
        raise RuntimeError("boom")
    left = [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" in m.__dict__]
    assert left == [own]  # every swap undone; the layer that had its own forward keeps it
    with forced_kernel("native"), fp32_linears(model) as used:
        assert used == "native" and not [m for m in model.modules() if "forward" in m.__dict__ and m is not own]


def test_the_kernel_is_named_by_the_environment_and_bad_names_are_refused(monkeypatch):
    monkeypatch.setenv(ENV, "native")
    assert fp32_kernel() == "native"
    monkeypatch.setenv(ENV, "mkl")
    with pytest.raises(UserError, match=f"{ENV}='mkl': choose auto, native, onednn"):
        fp32_kernel()
    monkeypatch.setenv(ENV, "auto")
    auto = fp32_kernel()
    assert auto == ("onednn" if kernels.onednn_available() else "native")
    with forced_kernel("native"):
        assert fp32_kernel() == "native"
        monkeypatch.setenv(ENV, "mkl")
        assert fp32_kernel() == "native"  # forced wins over the environment
    with pytest.raises(ValueError, match="unknown fp32 kernel"), forced_kernel("mkl"):
        pass
    monkeypatch.setenv(ENV, "auto")
    assert fp32_kernel() == auto
    monkeypatch.setattr(kernels, "_CHOSEN", {})  # the first question may come inside a bf16 pass
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp32_kernel() == auto
    monkeypatch.setenv(ENV, " ONEDNN " if kernels.onednn_available() else "Native")  # case and spaces do not matter
    assert fp32_kernel() == ("onednn" if kernels.onednn_available() else "native")
    monkeypatch.setenv(ENV, "BAD" * 1000)  # the value as the user set it, shortened
    with pytest.raises(UserError) as err:
        fp32_kernel()
    assert f"{ENV}='BADBAD" in str(err.value) and "...'" in str(err.value) and len(str(err.value)) < 120
    # a pass that never uses the kernel (bf16 here) never asks for it, so a bad name cannot stop it
    monkeypatch.setenv(ENV, "mkl")
    w = torch.randn(8, 4)
    assert linear(torch.ones(2, 4).bfloat16(), w.bfloat16()).dtype == torch.bfloat16


def test_a_onednn_that_cannot_run_here_means_the_default_kernel_and_a_clear_error_when_asked_for(monkeypatch):
    def broken(*args):
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(kernels, "_onednn", broken)
    monkeypatch.setattr(kernels, "onednn_available", lambda: True)
    monkeypatch.setattr(kernels, "_CHOSEN", {})
    monkeypatch.setenv(ENV, "auto")
    assert fp32_kernel() == "native"
    monkeypatch.setenv(ENV, "onednn")
    with pytest.raises(UserError, match="no working oneDNN fp32 linear kernel"):
        fp32_kernel()


def test_the_cli_refuses_a_bad_kernel_name_before_doing_any_work(project):
    from conftest import run_cli

    r = run_cli("train", "toddler_data", "--no-mlflow", env={ENV: "mkl"})  # would train and fail at validation
    assert r.returncode == 2 and r.stderr.strip() == f"error: {ENV}='mkl': choose auto, native, onednn"
    assert not list((project / "experiments").glob("exp_*"))


@needs_onednn
def test_scores_on_both_kernels_agree_and_the_scoring_chunk_fits_a_cache(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_project.evaluation.minimal_pairs import Pair, pair_logprobs
    from lora_project.evaluation.pair_tokens import tokenize_pairs
    from lora_project.models.scoring import target_nll
    from lora_project.utils.device import resolve_runtime

    assert chunk_tokens_for(49152, torch.float32, 0, SCORE_CHUNK_BYTES, 16) == 128  # 24 MiB of SmolLM2's logits
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    runtime = resolve_runtime("cpu", "fp32", 1)
    words = "the dog runs fast . a cat sat on the mat and the birds sing".split()
    pairs = [Pair(" ".join(words[i:i + 6]), " ".join(words[i + 1:i + 7]), "p", "") for i in range(6)]
    tokens = tokenize_pairs(tok, pairs)
    ids = tok(" ".join(words * 6))["input_ids"]
    out = {}
    for name in ("native", "onednn"):
        with forced_kernel(name):
            good, bad = pair_logprobs(model, tokens, runtime, "fp32")
            out[name] = (good, bad, target_nll(model, ids, runtime, max_length=32, stride=16))
    for a, b in zip(out["native"], out["onednn"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    hidden = torch.randn(300, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    targets = torch.randint(0, model.config.vocab_size, (300,))
    head = model.get_output_embeddings()
    torch.testing.assert_close(token_nll(hidden, head, targets, 0), token_nll(hidden, head, targets, 1024))


def test_token_nll_at_rows_runs_each_row_once_and_equals_the_per_target_call(monkeypatch):
    """`rows`: targets read at given hidden rows (the prefix tree's nodes with several next tokens):
    every row the targets read goes through the output layer once, rows nobody reads not at all,
    and each value equals the per-target call on copied rows, across chunk boundaries, in any order."""
    import lora_project.models.losses as losses

    gen = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(24, 500, bias=False)
    hidden = torch.randn(300, 24, generator=gen)
    rows = torch.tensor([5, 5, 0, 17, 299, 16, 5, 40, 41, 299])
    targets = torch.randint(0, 500, (len(rows),), generator=gen)
    seen, real = [], losses.linear
    monkeypatch.setattr(losses, "linear", lambda x, w, *a: seen.append(x.shape[0]) or real(x, w, *a))
    for chunk in (16, 1024):
        seen.clear()
        at_rows = token_nll(hidden, head, targets, chunk, rows=rows)
        # chunks of 16 rows: only the 4 chunks holding a read row run (0-15, 16-31, 32-47, 288-299)
        assert seen == ([16, 16, 16, 12] if chunk == 16 else [300])
        copied = token_nll(hidden[rows], head, targets, chunk)
        torch.testing.assert_close(at_rows, copied)  # matmul row blocks may round differently
        assert at_rows.shape == targets.shape and bool(torch.all(at_rows > 0))
    for bad in (300, -1):  # a row outside hidden is refused, never read as uninitialised memory
        with pytest.raises(IndexError, match="rows must lie in"):
            token_nll(hidden, head, targets[:1], 16, rows=torch.tensor([bad]))
