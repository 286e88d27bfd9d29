"""The prefix tree's scoring pass on models with limits on what a position sees: sliding-window
attention (the window applied to the tree mask) and learned positions (a longer sentence refused)."""

from __future__ import annotations

import random
import types

import numpy as np
import pytest
import torch

from lora_project.errors import UserError
from lora_project.evaluation.pair_tokens import PairTokens
from lora_project.evaluation.prefix_tree import prefix_tree
from lora_project.evaluation.tree_pass import layer_masks, tree_logprobs
from lora_project.utils.device import resolve_runtime

VOCAB = 48
WINDOW = 4


def _pairs(seed: int = 3, n: int = 30):
    """Pairs whose sentences run to 16 tokens (far past the window), sharing openings."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prefix = [1] + [rng.randrange(3, 8) for _ in range(rng.randrange(1, 6))]
        out.append(PairTokens(prefix, [rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 11))],
                              [rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 11))]))
    return out


def _config(family: str, window):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.4)
    if family == "mistral":  # every layer slides
        return tf.MistralConfig(sliding_window=window, **common)
    # Gemma 3: sliding and full layers mixed (a mask per layer type)
    return tf.Gemma3TextConfig(head_dim=8, sliding_window=window or 4096,
                               layer_types=["sliding_attention", "full_attention"], **common)


def _model(family: str, attention: str, window=WINDOW):
    import transformers as tf

    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(_config(family, window), attn_implementation=attention).eval()


def _plain_sums(model, pairs):
    """Each sentence alone, the model's own masks: the sum of its tokens' log-probabilities."""
    sums = []
    with torch.inference_mode():
        for p in pairs:
            for cont in (p.good, p.bad):
                ids = p.prefix + cont
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
                sums.append(float(sum(logp[j, ids[j + 1]] for j in range(len(ids) - 1))))
    return np.array(sums)


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_sliding_window_models_score_as_each_sentence_alone(family, attention):
    """The tree's sentence sums equal the model run on each sentence alone, with its window; and the
    window matters here (the same weights without it give sums far off), so a tree that ignored it
    would fail."""
    pairs = _pairs()
    tree = prefix_tree(pairs)
    model = _model(family, attention)
    logp, _ = tree_logprobs(model, tree, resolve_runtime("cpu", "fp32", 1), "fp32", row_tokens=64,
                            batch_tokens=256)
    tree_sums = np.array([logp[items].sum() for items in tree.sentence_items])
    alone = _plain_sums(model, pairs)
    assert np.abs(tree_sums - alone).max() < 1e-4
    unwindowed = _model(family, attention, window=None)
    unwindowed.load_state_dict(model.state_dict())
    assert np.abs(_plain_sums(unwindowed, pairs) - alone).max() > 0.5


def test_masks_per_layer_type_only_where_the_window_is_reached():
    """Rows no deeper than the window keep the one tree mask (nothing changes for short sentences); a
    deeper row gets the window, per layer type for a mixed model, and keys beyond it are hidden."""
    mixed = _model("gemma3", "sdpa").get_decoder()
    pos = torch.arange(8)[None]
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
    short = pos.clamp(max=WINDOW - 1)
    assert layer_masks(mixed, mask, short) is mask
    out = layer_masks(mixed, mask, pos)
    assert out["full_attention"] is mask
    assert out["sliding_attention"][0, 0, 7].tolist() == [False] * 4 + [True] * 4
    every = layer_masks(_model("mistral", "sdpa").get_decoder(), mask, pos)
    assert torch.equal(every, out["sliding_attention"])


def test_a_window_the_scorer_cannot_apply_is_refused():
    """Layer types other than full and sliding, or a decoder that takes no mask per layer type:
    one clear error, not scores computed without the window."""
    pos = torch.arange(8)[None]
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()

    class Odd(torch.nn.Module):
        def forward(self, input_ids=None, attention_mask=None):
            return attention_mask

    odd = Odd()
    odd.config = types.SimpleNamespace(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(UserError, match="sliding window of 4"):
        layer_masks(odd, mask, pos)
    mixed = _model("gemma3", "sdpa").get_decoder()
    mixed.config.layer_types = ["chunked_attention", "full_attention"]
    with pytest.raises(UserError, match="chunked_attention"):
        layer_masks(mixed, mask, pos)


def test_a_sentence_past_learned_positions_is_refused():
    """GPT-2's positions stop at n_positions: a longer sentence is one clear error, not an index error."""
    import transformers as tf

    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=12)).eval()
    runtime = resolve_runtime("cpu", "fp32", 1)
    fits = prefix_tree([PairTokens([1, 5], [6] * 10, [7] * 10)])  # 12 tokens: 11 positions
    logp, _ = tree_logprobs(model, fits, runtime, "fp32", row_tokens=64, batch_tokens=256)
    assert np.isfinite(logp).all() and (logp < 0).all()
    too_long = prefix_tree([PairTokens([1, 5], [6] * 12, [7] * 3)])  # 14 tokens: 13 positions
    with pytest.raises(UserError, match="needs 13 positions.*context of 12"):
        tree_logprobs(model, too_long, runtime, "fp32", row_tokens=64, batch_tokens=256)
