"""Attention over a prefix tree's rows in chunks: each chunk of queries against only the keys it may see.

A tree row (prefix_tree.tree_batch) lets each position attend to its ancestors and itself: on
BLiMP a handful of positions out of the row's 256. PyTorch's CPU SDPA kernel computes the whole
row x row square all the same, masked or not, so attention was 10% of the scoring pass's time,
and narrower rows would cost path copies instead (the path from the root is computed again in
every row that continues it).

Here the queries of a row are cut into chunks of `CHUNK` positions, and each chunk attends to the
keys that any of its positions may see, gathered into a short list (on BLiMP about 50 keys per
chunk of 32, against the row's 256); the chunks of all rows run as one SDPA call with the tree
mask restricted to those keys. Each query sees exactly the keys it saw before, so the result is
the same attention up to fp32 rounding (the kernel adds in another order: about 1e-6 on the
attention output). Where chunks would save little (a long shared context that every chunk sees,
as in entity tracking), the row runs whole as before.

`tree_attention(model, device)` is a context manager that routes the model's SDPA attention
through `attend` (CPU only: the chunks were measured there); `active(plan)` around a forward lets
`attend` use the chunks for the plan's own mask, and without a plan, or for any other mask,
`attend` is transformers' SDPA path. Models on eager attention keep their own path. Attention
runs in fp32 (also inside the bf16 first pass, as fast_pass does).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

#: Queries per chunk: on BLiMP's rows 32 measured fastest (16, 24 and 48 slower: research notes).
CHUNK = 32
#: Chunks are used only when their key lists add up to at most this share of the full square (BLiMP's
#: rows: about 0.2); above it the gathered keys would cost about what the chunks save.
MAX_SHARE = 0.5
NAME = "lora_project_tree_attention"

_ACTIVE: ContextVar = ContextVar("tree_attention_plan", default=None)  # the plan of the forward now running


@dataclass(frozen=True)
class ChunkPlan:
    """Where each chunk's keys are: rows x width of the batch, the width padded to whole chunks,
    keys per chunk (`keys`), flat key indices into (rows x padded width) and the chunks' masks;
    `source` is the mask the plan was made for (attend uses the chunks for that mask only)."""
    source: object
    rows: int
    width: int
    padded: int
    chunk: int
    keys: int
    index: object  # torch.LongTensor (rows * chunks * keys,)
    mask: object   # torch.BoolTensor (rows * chunks, 1, chunk, keys)


def chunk_plan(mask, chunk: int = CHUNK, lengths=None) -> ChunkPlan | None:
    """The plan for a boolean tree mask (rows, 1, width, width; True = may attend, every query sees
    at least itself), or None when chunks would not save work (their key lists would cover more
    than MAX_SHARE of the square). `lengths`: each row's real positions (the rest is padding,
    whose output nobody reads: it sees the row's first key only, adding no key of its own)."""
    import torch

    rows, _, width, _ = mask.shape
    padded = -(-width // chunk) * chunk
    n = padded // chunk
    full = torch.zeros(rows, padded, padded, dtype=torch.bool, device=mask.device)
    full[:, :width, :width] = mask[:, 0]
    if lengths is not None:
        for r, length in enumerate(lengths):
            full[r, length:width] = False
            full[r, length:width, 0] = True
    full[:, width:, 0] = True  # the chunks' own padding likewise
    blocks = full.view(rows, n, chunk, padded)
    need = blocks.any(2)  # rows, chunks, padded: keys any query of the chunk may see
    keys = int(need.sum(-1).max())
    if n * keys * chunk > MAX_SHARE * width * width:
        return None
    # the needed keys first, in order (a stable sort of "not needed"), then filler the mask hides
    where = torch.argsort((~need).to(torch.uint8), dim=-1, stable=True)[..., :keys]
    chunk_mask = torch.gather(blocks, 3, where[:, :, None, :].expand(rows, n, chunk, keys))
    chunk_mask &= torch.gather(need, 2, where)[:, :, None, :]
    offset = (torch.arange(rows, device=mask.device) * padded)[:, None, None]
    return ChunkPlan(mask, rows, width, padded, chunk, keys, (where + offset).reshape(-1),
                     chunk_mask.reshape(rows * n, 1, chunk, keys))


@contextmanager
def active(plan: ChunkPlan | None):
    """The plan of the next forward (None: the model's own attention)."""
    token = _ACTIVE.set(plan)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def attend(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
           **kwargs):
    """An attention function (transformers' AttentionInterface): the chunked tree attention when the
    active plan was made for this very mask, transformers' SDPA path on the whole row otherwise, and
    also for what the chunks do not apply (dropout, soft-capping, a position bias, attention
    sinks); fp32 either way."""
    import torch

    from lora_project.evaluation.fast_pass import fp32_attention

    plan = _ACTIVE.get()
    rows, heads, width, dim = query.shape
    unusual = dropout or any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "s_aux", "sinks"))
    if (plan is None or attention_mask is not plan.source or unusual
            or (rows, width, key.shape[2]) != (plan.rows, plan.width, plan.width)):
        return fp32_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    with torch.autocast(query.device.type, enabled=False):
        query, key, value = query.float(), key.float(), value.float()
        extra = plan.padded - width
        if extra:
            query, key, value = (torch.nn.functional.pad(t, (0, 0, 0, extra)) for t in (query, key, value))
        n, kv = plan.padded // plan.chunk, key.shape[1]
        q = query.view(rows, heads, n, plan.chunk, dim).transpose(1, 2).reshape(rows * n, heads, plan.chunk, dim)
        k, v = (t.transpose(1, 2).reshape(rows * plan.padded, kv, t.shape[-1]).index_select(0, plan.index)
                .view(rows * n, plan.keys, kv, t.shape[-1]).transpose(1, 2) for t in (key, value))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, scale=scaling,
                                                               enable_gqa=heads != kv)
        dv = value.shape[-1]  # a value head may differ in size from the query's
        out = out.view(rows, n, heads, plan.chunk, dv).transpose(2, 3).reshape(rows, plan.padded, heads, dv)
        return out[:, :width].contiguous(), None


@contextmanager
def tree_attention(model, device: str = "cpu", attention_names=("sdpa",)):
    """Inside, the model's attention runs through `attend` when the model is on the CPU and its
    attention implementation is one of `attention_names` (SDPA, or the bf16 pass's fp32 SDPA);
    yields whether it does. Restored after."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    config = getattr(decoder, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if device != "cpu" or before not in attention_names:
        yield False
        return
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attend)
    config._attn_implementation = NAME
    try:
        yield True
    finally:
        config._attn_implementation = before
