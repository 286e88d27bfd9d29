"""The bf16 first pass's numerics (evaluation/fast_pass.py): the corrected bf16 output layer, the
fp32 layers it keeps for massive activations, and that the model is restored after the pass."""

from __future__ import annotations

import pytest
import torch

from lora_project.evaluation.fast_pass import (
    head_logprobs,
    precision_context,
    sensitive_linears,
)


def _tiny_causal_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_bf16_head_log_probabilities_match_fp32_and_underflow_falls_back():
    torch.manual_seed(1)
    head = torch.nn.Linear(48, 5000, bias=True)
    with torch.no_grad():
        head.weight.mul_(8.0)  # logits of tens: a bf16 step of 0.125 there, so uncorrected they would be off
    hidden = torch.randn(300, 48)
    target = torch.randint(0, 5000, (300,))
    with torch.no_grad():
        exact = torch.log_softmax(head(hidden).double(), -1).gather(1, target[:, None]).squeeze(1)
        plain_bf16 = torch.log_softmax((hidden.bfloat16() @ head.weight.bfloat16().t()
                                        + head.bias.bfloat16()).float(), -1).gather(1, target[:, None]).squeeze(1)
    with torch.no_grad():
        got = head_logprobs(hidden, head, target, chunk=64).double()
    err, plain_err = (got - exact).abs(), (plain_bf16.double() - exact).abs()
    print(float(err.median()), float(err.max()), float(plain_err.median()), float(plain_err.max()))
    assert float(err.max()) < 0.25 and float(err.median()) < float(plain_err.median())
    # a target whose probability underflows in bf16 gets its exact value from the fp32 logits
    with torch.no_grad():
        lowest = head(hidden[:4]).argmin(-1)
        got_low = head_logprobs(hidden[:4], head, lowest)
        ref_low = torch.log_softmax(head(hidden[:4]).double(), -1).gather(1, lowest[:, None]).squeeze(1)
    assert torch.isfinite(got_low).all()
    assert got_low.double().tolist() == pytest.approx(ref_low.tolist(), abs=0.5)


def test_layers_with_huge_outputs_stay_fp32_and_the_model_is_restored():
    model = _tiny_causal_lm()
    down = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        down.weight.mul_(1e6)  # a massive activation writer, as SmolLM2 has (outputs in the thousands)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    batch = {"input_ids": ids, "position_ids": torch.arange(5)[None], "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    found = sensitive_linears(model, batch, model.get_output_embeddings())
    assert list(found) == ["model.layers.1.mlp.down_proj"]
    weights = {n: p for n, p in model.named_parameters()}
    attention = model.config._attn_implementation
    with torch.no_grad():
        ref = model(ids).logits
    with precision_context("bf16", "cpu", model, batch) as kept, torch.no_grad():
        assert kept == ["model.layers.1.mlp.down_proj"]
        assert down.weight.dtype == torch.float32 and model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
        assert model.lm_head.weight.dtype == torch.float32  # the output layer: head_logprobs' job
        assert model.config._attn_implementation != attention  # fp32 attention inside the pass
        out = model(ids).logits
    assert torch.isfinite(out).all()
    assert "forward" not in vars(down) and model.config._attn_implementation == attention  # all restored
    assert all(p is weights[n] for n, p in model.named_parameters())  # every weight back, the same objects
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    with pytest.raises(RuntimeError, match="boom"), precision_context("bf16", "cpu", model, batch):
        raise RuntimeError("boom")
    assert "forward" not in vars(down) and all(p is weights[n] for n, p in model.named_parameters())



def test_massive_nodes_are_scored_again_in_fp32(tiny_model_dir, monkeypatch):
    """Every node whose largest |hidden| passes the threshold gets its items from an fp32 pass: with the
    threshold at 0 every node does, so the bf16 pass returns exactly the fp32 values."""
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_project.evaluation import tree_pass
    from lora_project.evaluation.minimal_pairs import Pair
    from lora_project.evaluation.pair_tokens import tokenize_pairs
    from lora_project.evaluation.prefix_tree import prefix_tree, restricted, tree_rows
    from lora_project.utils.device import resolve_runtime

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    pairs = [Pair("the dog runs to the ball.", "the dog run to the ball.", "a"),
             Pair("the cat sleeps.", "the cats sleeps.", "a"), Pair("more cookie.", "cookie more.", "b")]
    tree = prefix_tree(tokenize_pairs(tok, pairs))
    runtime = resolve_runtime("cpu", "fp32", 1)
    exact, none = tree_pass.tree_logprobs(model, tree, runtime, "fp32", row_tokens=8, batch_tokens=64)
    fast, _ = tree_pass.tree_logprobs(model, tree, runtime, "bf16", row_tokens=8, batch_tokens=64)
    assert none == 0 and not np.array_equal(fast, exact)  # bf16 differs somewhere
    monkeypatch.setattr(tree_pass, "MASSIVE_FACTOR", 0.0)
    redone, massive = tree_pass.tree_logprobs(model, tree, runtime, "bf16", row_tokens=8, batch_tokens=64)
    assert massive == len(tree.token)
    np.testing.assert_array_equal(redone, exact)
    # a restricted tree lays out exactly the chosen nodes and their ancestors
    deepest = max(range(len(tree.token)), key=lambda i: tree.depth[i])
    rows = tree_rows(restricted(tree, [deepest]), 8)
    path, node = set(), deepest
    while node >= 0:
        path.add(node)
        node = tree.parent[node]
    assert {n for r in rows for n in r} == path


def test_a_lora_output_layer_stays_fp32_and_a_one_layer_model_runs():
    """The output layer, LoRA-wrapped or not, is never cast: its inner layers stay fp32 in the pass and
    its log-probabilities are fp32 even under the pass's bf16 autocast; one decoder layer is enough."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_project.evaluation.minimal_pairs import pair_logprobs
    from lora_project.evaluation.pair_tokens import PairTokens
    from lora_project.utils.device import resolve_runtime

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)).eval()
    head = model.get_base_model().get_output_embeddings()
    hidden, target = torch.randn(20, 32), torch.randint(0, 200, (20,))
    with torch.no_grad():
        exact = torch.log_softmax(head(hidden).double(), -1).gather(1, target[:, None]).squeeze(1)
    ids = torch.tensor([[1, 5, 7, 9]])
    batch = {"input_ids": ids, "position_ids": torch.arange(4)[None], "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with precision_context("bf16", "cpu", model, batch), torch.no_grad():
        assert all(m.weight.dtype == torch.float32 for m in head.modules() if isinstance(m, torch.nn.Linear))
        got = head_logprobs(hidden, head, target).double()
    assert got.tolist() == pytest.approx(exact.tolist(), abs=1e-5)
    tokens = [PairTokens((1, 5), (7, 9), (8, 9)), PairTokens((1,), (6, 7), (5, 7))]
    runtime = resolve_runtime("cpu", "fp32", 1)
    good, bad = pair_logprobs(model, tokens, runtime, "bf16")
    ref_good, ref_bad = pair_logprobs(model, tokens, runtime, "fp32")
    assert good.tolist() == pytest.approx(ref_good.tolist(), abs=0.2)
    assert bad.tolist() == pytest.approx(ref_bad.tolist(), abs=0.2)

