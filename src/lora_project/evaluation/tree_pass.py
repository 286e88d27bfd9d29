"""One scoring pass over a prefix tree: every (node, next token) log-probability, in fp32 or bf16.

The bf16 pass has a second, small fp32 pass. A few positions carry massive activations: the BOS,
and on SmolLM2-135M about 0.5% of the others (first words such as "Rog", "Sally" after "Has"), whose
residual stream reaches 1,000-25,000 in one channel before the last layers remove it again. Any
bf16 rounding on the way (half a step is 4 at 1,800) stays behind in the final hidden state of that
position, and its prediction is then off by up to 3-5 nats, whichever layers are kept in fp32
(research notes). So the bf16 pass records each node's largest |hidden| over the layers, and the
nodes above `MASSIVE_FACTOR` times the median are computed again in fp32 (with their ancestors:
short paths, since these are early positions), their items replaced by the fp32 values.
"""

from __future__ import annotations

import functools
import inspect
import re

from lora_project.errors import UserError
from lora_project.evaluation.fast_pass import ATTENTION, head_logprobs, precision_context
from lora_project.evaluation.prefix_tree import PrefixTree, length_buckets, restricted, tree_batch, tree_rows
from lora_project.evaluation.tree_attention import active, chunk_plan, tree_attention

#: A node is massive when its largest |hidden| over the layers exceeds this many times the median
#: node's (SmolLM2-135M: median about 600, the positions with errors above 0.7 nats from 1,000 up).
MASSIVE_FACTOR = 1.3


@functools.lru_cache(maxsize=None)
def _takes_mask_mapping(decoder_type) -> bool:
    """Whether a transformers decoder takes a {layer type: mask} mapping as its attention_mask (the
    decoders whose layers mix full and sliding-window attention do: Gemma 2/3, Qwen2, ...)."""
    try:
        source = inspect.getsource(decoder_type.forward)
    except (OSError, TypeError):
        return False
    return re.search(r"isinstance\((causal_mask_mapping := )?attention_mask, dict\)", source) is not None


def layer_masks(decoder, mask, pos):
    """The tree mask (rows, 1, width, width; True = may attend) as the decoder's layers take it.
    A sliding-window layer sees only keys whose position is above its own minus `sliding_window`
    (transformers' rule); the tree mask holds every ancestor, so where a row is deeper than the
    window, the window is applied: one mask when every layer slides (Mistral), a mask per layer
    type when they mix (Gemma 2/3). A model whose layers take neither is refused, not scored wrong."""
    config = getattr(decoder, "config", None)
    window = getattr(config, "sliding_window", None)
    if not window or int(pos.max()) < window:
        return mask
    windowed = mask & (pos[:, None, :, None] - pos[:, None, None, :] < window)
    types = getattr(config, "layer_types", None)
    if types is None:
        return windowed
    if set(types) <= {"full_attention", "sliding_attention"} and _takes_mask_mapping(type(decoder)):
        return {"full_attention": mask, "sliding_attention": windowed}
    raise UserError(f"{type(decoder).__name__}: a sentence of {int(pos.max()) + 1} positions is longer than its "
                    f"sliding window of {window}, which the prefix-tree scorer cannot apply to its layers "
                    f"({', '.join(sorted(set(types)))}); leave out sentences that long")


def _run(model, decoder, head, tree: PrefixTree, rows, runtime, path, batch_tokens, items, progress):
    """Log-probabilities of `items` (indices into tree.items) from one pass over `rows`; with path bf16
    also each node's largest |hidden| over the layers. progress(fraction) after each batch."""
    import numpy as np
    import torch

    from lora_project.models.losses import token_nll

    order = sorted(range(len(rows)), key=lambda r: len(rows[r]))
    groups = length_buckets([len(rows[r]) for r in order], batch_tokens)
    place: dict[int, tuple[int, int, int]] = {}  # node -> (group, row within the group, position): where it is read
    for g, group in enumerate(groups):
        for k, idx in enumerate(group):
            for j, node in enumerate(rows[order[idx]]):
                place.setdefault(node, (g, k, j))
    by_group: list[list[int]] = [[] for _ in groups]
    for item in items:
        by_group[place[tree.items[item][0]][0]].append(item)
    work = np.cumsum([sum(len(rows[order[k]]) for k in group) for group in groups])
    additive = getattr(getattr(decoder, "config", None), "_attn_implementation", "sdpa") == "eager"
    logp = np.zeros(len(tree.items))
    peak = np.zeros(len(tree.token), dtype=np.float32) if path == "bf16" else None

    def batch(chosen, chunked):
        ids, pos, mask = tree_batch(tree, [rows[order[k]] for k in chosen], runtime.device)
        masks = layer_masks(decoder, mask, pos)
        shared = masks["full_attention"] if isinstance(masks, dict) else masks
        plan = chunk_plan(shared, lengths=[len(rows[order[k]]) for k in chosen]) if chunked else None
        if additive:  # eager attention adds the mask to the scores: 0 where allowed, -inf-like elsewhere
            def add(m):
                return torch.zeros(m.shape, device=m.device).masked_fill_(~m, torch.finfo(torch.float32).min)
            masks = {k: add(m) for k, m in masks.items()} if isinstance(masks, dict) else add(masks)
        return {"input_ids": ids, "position_ids": pos, "attention_mask": masks}, plan

    # the bf16 pass keeps fp32 the layers whose fp32 outputs are huge on the longest row (every row
    # starts at the BOS, where the largest values live)
    calibration = batch([len(rows) - 1], False)[0] if path == "bf16" else None
    with (precision_context(path, runtime.device, model, calibration), torch.inference_mode(),
          tree_attention(model, runtime.device, ("sdpa", ATTENTION)) as chunked):
        for g, group in enumerate(groups):
            inputs, plan = batch(group, chunked)
            with active(plan):
                out = decoder(**inputs, use_cache=False, output_hidden_states=peak is not None)
            hidden = out.last_hidden_state
            width = inputs["input_ids"].shape[1]
            if peak is not None:
                layers = out.hidden_states[1:-1] or out.hidden_states[-1:]  # a one-layer model has no middle
                top = torch.stack([h.abs().amax(-1) for h in layers]).amax(0).float().cpu().numpy()
                for k, idx in enumerate(group):
                    row = rows[order[idx]]
                    np.maximum.at(peak, row, top[k, :len(row)])  # a node twice in a row: the larger value
            its = by_group[g]
            if its:
                flat = torch.tensor([place[tree.items[i][0]][1] * width + place[tree.items[i][0]][2] for i in its],
                                    device=hidden.device)
                target = torch.tensor([tree.items[i][1] for i in its], device=hidden.device)
                if path == "bf16":
                    lp = head_logprobs(hidden.reshape(-1, hidden.shape[-1])[flat], head, target)
                else:  # a node with several next tokens: its output layer and log-softmax once (16% of BLiMP's items)
                    nodes, at = torch.unique(flat, return_inverse=True)
                    lp = -token_nll(hidden.reshape(-1, hidden.shape[-1])[nodes], head, target, rows=at)
                logp[its] = lp.double().cpu().numpy()
            if progress is not None:
                progress(float(work[g] / work[-1]))
    return logp, peak


def tree_logprobs(model, tree: PrefixTree, runtime, path: str, *, row_tokens: int, batch_tokens: int,
                  progress=None, rows: list[list[int]] | None = None, items=None):
    """Log-probability of every item of `tree`, and the number of massive nodes the bf16 pass
    computed again in fp32 (0 for fp32). progress(fraction done) after each batch. `rows`: the
    tree's layout when the caller already has it (`tree_rows(tree, row_tokens)`; a model-free
    plan, reused over the base and every adapter). `items`: only these items' log-probabilities
    are computed (the others stay 0): the output layer and its log-softmax over the vocabulary
    then run on the scored positions only, not on a long shared context that nothing sums."""
    import numpy as np

    from lora_project.models.scoring import decoder_and_head, model_context

    context = model_context(model)
    if context and tree.depth and max(tree.depth) >= context:
        raise UserError(f"a sentence needs {max(tree.depth) + 1} positions (its BOS and every token but the last), "
                        f"more than {type(model).__name__}'s context of {context}; leave out sentences that long")
    decoder, head = decoder_and_head(model)
    was_training = model.training
    model.eval()
    try:
        everything = range(len(tree.items)) if items is None else sorted(set(items))
        rows = rows if rows is not None else tree_rows(tree, row_tokens)
        logp, peak = _run(model, decoder, head, tree, rows, runtime, path, batch_tokens, everything, progress)
        if path != "bf16":
            return logp, 0
        massive = np.flatnonzero(peak > MASSIVE_FACTOR * np.median(peak))
        if len(massive):
            chosen = set(massive.tolist())
            redo = [i for i in everything if tree.items[i][0] in chosen]
            sub = restricted(tree, massive.tolist())
            exact, _ = _run(model, decoder, head, sub, tree_rows(sub, row_tokens), runtime, "fp32", batch_tokens,
                            redo, None)
            logp[redo] = exact[redo]
        return logp, len(massive)
    finally:
        model.train(was_training)
