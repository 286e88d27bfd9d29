"""Attention over a prefix tree's rows in chunks: each chunk of queries against only the keys it may see.

A tree row (prefix_tree.tree_batch) lets each position attend to its ancestors and itself: on
BLiMP a handful of positions out of the row's 256 or 512. PyTorch's CPU SDPA kernel computes the
whole row x row square all the same, masked or not, so at rows of 256 attention was 10% of the
scoring pass's time, and narrower rows would cost path copies instead (the path from the root is
computed again in every row that continues it).

Here the queries of a row are cut into chunks of `CHUNK` positions, and each chunk attends to the
keys that any of its positions may see, gathered into a short list (on BLiMP about 50 keys per
chunk of 32, against the row's 512); the chunks of all rows run as one SDPA call with the tree
mask restricted to those keys. Each query sees exactly the keys it saw before, so the result is
the same attention up to fp32 rounding (the kernel adds in another order: about 1e-6 on the
attention output). Where chunks would save little (a long shared context that every chunk sees,
as in entity tracking), the row runs whole as before.

`tree_attention(model)` is a context manager that routes the model's SDPA attention through
`attend` while `plan` is set (`active(plan)` around each forward); layers without a plan, and
models on eager attention, keep their own path. Attention runs in fp32 (also inside the bf16
first pass, as fast_pass does).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

#: Queries per chunk: on BLiMP's rows 32 measured fastest (16 and 48 slower: research notes).
CHUNK = 32
#: Chunks are used only when their key lists add up to at most this share of the full square.
MAX_SHARE = 0.8
NAME = "lora_project_tree_attention"

_ACTIVE: ContextVar = ContextVar("tree_attention_plan", default=None)  # the plan of the forward now running


@dataclass(frozen=True)
class ChunkPlan:
    """Where each chunk's keys are: rows x width of the batch, the width padded to whole chunks,
    keys per chunk (`keys`), flat key indices into (rows x padded width) and the chunks' masks."""
    rows: int
    width: int
    padded: int
    chunk: int
    keys: int
    index: object  # torch.LongTensor (rows * chunks * keys,)
    mask: object   # torch.BoolTensor (rows * chunks, 1, chunk, keys)


def chunk_plan(mask, chunk: int = CHUNK) -> ChunkPlan | None:
    """The plan for a boolean tree mask (rows, 1, width, width; True = may attend, every query sees
    at least itself), or None when chunks would not save work (their key lists would cover more
    than MAX_SHARE of the square)."""
    import torch

    rows, _, width, _ = mask.shape
    padded = -(-width // chunk) * chunk
    n = padded // chunk
    full = torch.zeros(rows, padded, padded, dtype=torch.bool, device=mask.device)
    full[:, :width, :width] = mask[:, 0]
    pad = torch.arange(width, padded, device=mask.device)
    full[:, pad, pad] = True  # padded queries see themselves only (their output is dropped)
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
    return ChunkPlan(rows, width, padded, chunk, keys, (where + offset).reshape(-1),
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
    """An attention function (transformers' AttentionInterface): the chunked tree attention when a plan
    for this shape is active, SDPA on the whole row otherwise; in fp32 either way."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plan = _ACTIVE.get()
    rows, heads, width, dim = query.shape
    with torch.autocast(query.device.type, enabled=False):
        query, key, value = query.float(), key.float(), value.float()
        if plan is None or (rows, width) != (plan.rows, plan.width) or dropout:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        extra = plan.padded - width
        if extra:
            query, key, value = (torch.nn.functional.pad(t, (0, 0, 0, extra)) for t in (query, key, value))
        n, kv = plan.padded // plan.chunk, key.shape[1]
        q = query.view(rows, heads, n, plan.chunk, dim).transpose(1, 2).reshape(rows * n, heads, plan.chunk, dim)
        k, v = (t.transpose(1, 2).reshape(rows * plan.padded, kv, dim).index_select(0, plan.index)
                .view(rows * n, plan.keys, kv, dim).transpose(1, 2) for t in (key, value))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, scale=scaling,
                                                               enable_gqa=heads != kv)
        out = out.view(rows, n, heads, plan.chunk, dim).transpose(2, 3).reshape(rows, plan.padded, heads, dim)
        return out[:, :width].contiguous(), None


@contextmanager
def tree_attention(model, attention_names=("sdpa",)):
    """Inside, the model's attention runs through `attend` when its implementation is one of
    `attention_names` (SDPA, or the bf16 pass's fp32 SDPA); yields whether it does. Restored after."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    config = getattr(decoder, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before not in attention_names:
        yield False
        return
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attend)
    config._attn_implementation = NAME
    try:
        yield True
    finally:
        config._attn_implementation = before
