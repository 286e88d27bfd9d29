"""Chunked tree attention (evaluation/tree_attention.py): the same attention as the whole masked row."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from lora_project.evaluation import tree_attention as ta
from lora_project.evaluation.pair_tokens import PairTokens
from lora_project.evaluation.prefix_tree import length_buckets, prefix_tree, tree_batch, tree_rows
from lora_project.evaluation.tree_pass import tree_logprobs
from lora_project.utils.device import resolve_runtime


def _random_tree(seed: int, pairs: int = 40):
    """Pairs of token sentences over a 5-token vocabulary: many shared openings, lengths 2-14."""
    rng = random.Random(seed)
    out = []
    for _ in range(pairs):
        prefix = [0] + [rng.randrange(5) for _ in range(rng.randrange(1, 6))]
        out.append(PairTokens(prefix, [rng.randrange(5) for _ in range(rng.randrange(1, 9))],
                              [rng.randrange(5) for _ in range(rng.randrange(1, 9))]))
    return prefix_tree(out)


SCALE = 0.3  # not SDPA's default 1/sqrt(8): a dropped scaling would show


def _full(query, key, value, mask):
    """The whole-row masked attention, as transformers' SDPA path computes it (key/value heads repeated)."""
    rep = query.shape[1] // key.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1), attn_mask=mask,
        scale=SCALE).transpose(1, 2)


class _Heads(torch.nn.Module):
    num_key_value_groups = 2


@pytest.mark.parametrize("seed,width,chunk", [(0, 150, 16), (1, 130, 16), (2, 200, 32)])
def test_chunks_give_the_whole_rows_attention(seed, width, chunk):
    """Random trees cut into rows (widths not a multiple of the chunk: padded), several rows per batch,
    grouped query heads: every output equals the masked whole-row attention to fp32 rounding, and the
    chunks read far fewer keys than the row has."""
    tree = _random_tree(seed)
    rows = tree_rows(tree, width)
    order = sorted(range(len(rows)), key=lambda r: len(rows[r]))
    gen = torch.Generator().manual_seed(seed)
    planned = []
    for group in length_buckets([len(rows[r]) for r in order], 3 * width):
        ids, _, mask = tree_batch(tree, [rows[order[k]] for k in group], "cpu")
        lengths = [len(rows[order[k]]) for k in group]
        b, w = ids.shape
        q = torch.randn(b, 4, w, 8, generator=gen)
        k, v = torch.randn(b, 2, w, 8, generator=gen), torch.randn(b, 2, w, 6, generator=gen)  # value heads of 6
        ref = _full(q, k, v, mask)
        for plan in (ta.chunk_plan(mask, chunk), ta.chunk_plan(mask, chunk, lengths)):
            if plan is None:
                continue
            planned.append(plan)
            assert plan.keys < w
            with ta.active(plan):
                out, _ = ta.attend(_Heads(), q, k, v, mask, scaling=SCALE)
            assert out.shape == (b, w, 4, 6)
            for r, length in enumerate(lengths):  # the real positions (padding's output is not read)
                torch.testing.assert_close(out[r, :length], ref[r, :length], rtol=1e-5, atol=1e-5)
    # the cases that matter were there: several rows in one call, a width that is not whole chunks
    assert any(p.rows > 1 for p in planned) and any(p.width % chunk for p in planned)


def test_a_row_every_chunk_must_read_whole_runs_whole():
    """One long path: the last chunk sees every key, so chunks would save nothing; without a plan
    (or with one for another shape) attend is the plain SDPA path."""
    tree = prefix_tree([PairTokens(list(range(100)), [1], [2])])
    ids, _, mask = tree_batch(tree, tree_rows(tree, 128), "cpu")
    assert ta.chunk_plan(mask, 32) is None
    q, k, v = torch.randn(1, 4, ids.shape[1], 8), torch.randn(1, 2, ids.shape[1], 8), torch.randn(1, 2, ids.shape[1], 8)
    out, _ = ta.attend(_Heads(), q, k, v, mask, scaling=SCALE)
    torch.testing.assert_close(out, _full(q, k, v, mask), rtol=1e-5, atol=1e-5)
    other = ta.chunk_plan(tree_batch(_random_tree(3), tree_rows(_random_tree(3), 64), "cpu")[2], 16)
    assert other is not None and (other.rows, other.width) != (1, ids.shape[1])
    with ta.active(other):
        torch.testing.assert_close(ta.attend(_Heads(), q, k, v, mask, scaling=SCALE)[0], out)


def test_scoring_pass_uses_the_chunks_and_keeps_every_log_probability(tiny_model_dir, monkeypatch):
    """The tiny Llama (SDPA attention) scores a tree with chunked attention: every attention call of the
    pass ran with a plan, the log-probabilities equal those of the whole-row attention, and the
    model's attention setting is restored after."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert model.config._attn_implementation == "sdpa"
    tree = _random_tree(4, pairs=60)
    runtime = resolve_runtime("cpu", "fp32", 1)
    calls = []
    real = ta.attend

    def spy(module, query, key, value, attention_mask, **kwargs):  # (a plan was active, it fit this call)
        plan = ta._ACTIVE.get()
        calls.append((plan is not None, plan is not None and attention_mask is plan.source
                      and (query.shape[0], query.shape[2]) == (plan.rows, plan.width)))
        return real(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(ta, "attend", spy)
    chunked, _ = tree_logprobs(model, tree, runtime, "fp32", row_tokens=192, batch_tokens=400)
    assert any(planned for planned, _ in calls)  # some batches took the chunks,
    assert all(fit for planned, fit in calls if planned)  # and every plan was the one for its batch
    assert model.config._attn_implementation == "sdpa"

    @contextlib.contextmanager
    def whole_rows(model, device, names):
        yield False

    seen = len(calls)
    monkeypatch.setattr("lora_project.evaluation.tree_pass.tree_attention", whole_rows)
    plain, _ = tree_logprobs(model, tree, runtime, "fp32", row_tokens=192, batch_tokens=400)
    assert len(calls) == seen  # the reference pass ran the model's own attention
    assert chunked.tolist() == pytest.approx(plain.tolist(), abs=1e-5)
    assert (chunked != 0).mean() > 0.9  # the log-probabilities are there, not zeros


def test_bf16_pass_takes_the_chunks_in_fp32_and_restores_the_attention(tiny_model_dir, monkeypatch):
    """The bf16 first pass swaps in its own fp32 attention first; the chunks go on top of it and both
    are undone after, in order. Its log-probabilities stay close to the whole-row bf16 pass's."""
    from transformers import AutoModelForCausalLM

    from lora_project.evaluation.fast_pass import ATTENTION

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tree = _random_tree(6, pairs=60)
    runtime = resolve_runtime("cpu", "fp32", 1)  # the pass is chosen by its argument
    seen = []
    real = ta.attend

    def spy(module, query, key, value, attention_mask, **kwargs):  # (a plan was active, it fit this call)
        plan = ta._ACTIVE.get()
        seen.append((plan is not None, plan is not None and attention_mask is plan.source))
        return real(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(ta, "attend", spy)
    chunked, _ = tree_logprobs(model, tree, runtime, "bf16", row_tokens=192, batch_tokens=400)
    assert any(planned for planned, _ in seen) and all(fit for planned, fit in seen if planned)
    assert model.config._attn_implementation == "sdpa"

    @contextlib.contextmanager
    def whole_rows(model, device, names):
        assert ATTENTION in names
        yield False

    monkeypatch.setattr("lora_project.evaluation.tree_pass.tree_attention", whole_rows)
    plain, _ = tree_logprobs(model, tree, runtime, "bf16", row_tokens=192, batch_tokens=400)
    assert chunked.tolist() == pytest.approx(plain.tolist(), abs=0.05)


def test_off_the_cpu_the_models_attention_is_left_alone(tiny_model_dir):
    """The chunks were measured on CPUs only: on another device the model keeps its SDPA path."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with ta.tree_attention(model, "cuda") as used:
        assert used is False and model.config._attn_implementation == "sdpa"
    with ta.tree_attention(model, "cpu") as used:
        assert used is True and model.config._attn_implementation == ta.NAME
    assert model.config._attn_implementation == "sdpa"


def test_eager_attention_keeps_its_own_path(tiny_model_dir):
    """A model on eager attention (an additive mask) is left as it is."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    with ta.tree_attention(model) as used:
        assert used is False
        assert model.config._attn_implementation == "eager"


def test_what_the_chunks_do_not_apply_goes_to_the_models_own_path():
    """Soft-capping is not something the chunks apply: with a plan active, attend hands it to
    transformers' SDPA path (which refuses it) instead of silently dropping it; a position bias
    there is added to the whole row."""
    tree = _random_tree(5)
    ids, _, mask = tree_batch(tree, tree_rows(tree, 96)[:1], "cpu")
    plan = ta.chunk_plan(mask, 16)
    assert plan is not None
    w = ids.shape[1]
    q, k, v = torch.randn(1, 4, w, 8), torch.randn(1, 2, w, 8), torch.randn(1, 2, w, 8)
    with ta.active(plan), pytest.raises(ValueError, match="softcap"):
        ta.attend(_Heads(), q, k, v, mask, scaling=SCALE, softcap=30.0)
    bias = torch.randn(1, 4, w, w)
    with ta.active(plan):
        out, _ = ta.attend(_Heads(), q, k, v, mask, scaling=SCALE, position_bias=bias)
    rep = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
        attn_mask=torch.where(mask, bias, torch.finfo(torch.float32).min), scale=SCALE).transpose(1, 2)
    torch.testing.assert_close(out, rep, rtol=1e-5, atol=1e-5)
