"""Output layer + cross-entropy without materialising the whole batch's logits.

For a frozen output layer W (vocab x hidden), the loss and its gradient with respect to
the hidden states are computed chunk by chunk in the forward pass:

    logits_c = h_c W^T,   nll = logsumexp(logits_c) - logits_c[target]
    dL/dh_c  = (softmax(logits_c) - onehot(target)) W / n_valid

Only dL/dh (tokens x hidden, small) is kept for backward, instead of tokens x vocab fp32
logits (e.g. 2048 x 49152 x 4 B = 400 MB). Matmuls and the softmax's output are in the
matmul dtype (bf16 on a bf16 base, where the loss is then within about 1e-3 nats of fp32:
-log of a bf16 probability); the softmax accumulates in fp32, and in fp32 runs everything is fp32.
"""

from __future__ import annotations

import torch

from lora_project.models.kernels import linear

IGNORE_INDEX = -100

#: `chunk_tokens=0` (training.loss_chunk_tokens' default): as many tokens per chunk as keep one chunk's
#: logits within this many bytes in the matmul dtype (49,152-word vocabulary: 256 tokens in fp32, 512
#: in bf16). The logits and softmax buffers are the step's largest transient tensors, on top of every
#: saved activation; in fp32 on SmolLM2-135M, 256 instead of 1,024 tokens lowers the training peak by
#: about 370 MiB for a cross-entropy within noise of the same speed (the head matmul dominates it).
CHUNK_BYTES = 48 * 2**20
MIN_CHUNK_TOKENS = 64


#: Scoring (no gradient) keeps each chunk's logits within a CPU's last-level cache: with oneDNN's fp32
#: kernel, 128 rows of SmolLM2's 49,152 logits (24 MiB) score 1.5x faster than 256 or 1,024 rows on a
#: 32 MiB L3 (research notes, "An fp32 kernel at the machine's peak").
SCORE_CHUNK_BYTES = 24 * 2**20


def chunk_tokens_for(vocab: int, dtype: torch.dtype, chunk_tokens: int = 0, budget: int = CHUNK_BYTES,
                     multiple: int = MIN_CHUNK_TOKENS) -> int:
    """`chunk_tokens` where given (> 0); for 0, the tokens (a multiple of `multiple`, at least one) whose
    vocab-wide logits fit in `budget` bytes."""
    if chunk_tokens > 0:
        return chunk_tokens
    itemsize = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    return max(multiple, budget // max(1, vocab * itemsize) // multiple * multiple)


def _matmul_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    if weight.dtype in (torch.bfloat16, torch.float16):
        return weight.dtype
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return torch.float32


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk, need_grad, reduction):
        n_valid = (targets != IGNORE_INDEX).sum().clamp(min=1) if reduction == "mean" else 1
        dtype = _matmul_dtype(h, weight)
        chunk = chunk_tokens_for(weight.shape[0], dtype, chunk)
        w = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h, dtype=torch.float32) if need_grad else None
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], chunk):
                tc = targets[s:s + chunk]
                logits = h[s:s + chunk].to(dtype) @ w.t()
                if bias is not None:
                    logits += bias.to(dtype)
                # One fused softmax pass (fp32 accumulation inside, output in the matmul dtype) gives
                # both the loss, -log p(target), and the gradient, softmax - onehot: a few passes over
                # the chunk x vocab buffer instead of ~10 with logsumexp, sub, exp and casts.
                probs = torch.softmax(logits, dim=-1)
                valid = tc != IGNORE_INDEX
                rows = torch.arange(len(tc), device=h.device)
                safe_t = tc.clamp(min=0)
                p_t = probs[rows, safe_t].float()
                nll = -torch.log(p_t)
                tiny = p_t < 1e-30  # underflow territory (nll > 69): the exact value from the logits
                if bool(tiny.any()):
                    lf = logits[tiny].float()
                    nll[tiny] = torch.logsumexp(lf, -1) - lf.gather(1, safe_t[tiny][:, None]).squeeze(1)
                total += (nll * valid).sum()
                if need_grad:
                    probs[rows, safe_t] -= 1.0
                    if not bool(valid.all()):
                        probs[~valid] = 0.0
                    grad_h[s:s + chunk] = (probs @ w).float()
        if need_grad:
            ctx.save_for_backward(grad_h / n_valid)
            ctx.h_dtype = h.dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad_out).to(ctx.h_dtype), None, None, None, None, None, None


class PostProcessedHead(torch.nn.Module):
    """The output layer followed by what a few families do to its logits before the softmax:
    multiply by a constant (Cohere ``logit_scale``; Granite divides by ``logits_scaling``), then
    soft-cap (Gemma 2/3: ``cap * tanh(logits / cap)`` with ``final_logit_softcapping``). Not a
    plain nn.Linear, so the losses take their chunked path (one chunk's logits at a time)."""

    def __init__(self, head: torch.nn.Module, scale: float = 1.0, cap: float | None = None):
        super().__init__()
        self.head, self.scale, self.cap = head, float(scale), cap

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.head(h)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.cap:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits


def linear_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                         chunk_tokens: int = 0, reduction: str = "mean") -> torch.Tensor:
    """Mean (or, with reduction='sum', summed) next-token NLL of `targets` given final hidden states and the output layer.

    hidden: (..., hidden_size); targets: (...) token ids, IGNORE_INDEX to skip.
    A frozen plain nn.Linear head takes the fused path; any other head (e.g. a head with
    its own LoRA) takes a chunked path that recomputes each chunk's logits in backward.
    chunk_tokens: tokens per chunk; 0 = `chunk_tokens_for` (a byte budget per chunk's logits).
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    weight = getattr(head, "weight", None)
    fused_ok = type(head) is torch.nn.Linear and not weight.requires_grad and (
        head.bias is None or not head.bias.requires_grad)
    if fused_ok:
        return _FusedLinearCE.apply(h, weight, head.bias, t, chunk_tokens,
                                    torch.is_grad_enabled() and h.requires_grad, reduction)
    from torch.utils.checkpoint import checkpoint

    n_valid = (t != IGNORE_INDEX).sum().clamp(min=1) if reduction == "mean" else 1
    out_features = getattr(head, "out_features", None) or getattr(getattr(head, "head", None), "out_features", None)
    chunk_tokens = chunk_tokens_for(out_features or 65536, torch.float32, chunk_tokens)  # the fp32 logits

    def chunk_loss(hc, tc):
        logits = head(hc).float()
        return torch.nn.functional.cross_entropy(logits, tc, ignore_index=IGNORE_INDEX, reduction="sum")

    total = sum(checkpoint(chunk_loss, h[s:s + chunk_tokens], t[s:s + chunk_tokens], use_reentrant=False)
                for s in range(0, h.shape[0], chunk_tokens))
    return total / n_valid


def sum_nll(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
            chunk_tokens: int = 1024) -> torch.Tensor:
    """Summed NLL (nats) in fp32, no gradient: evaluation's building block."""
    with torch.no_grad():
        return linear_cross_entropy(hidden, head, targets, chunk_tokens, reduction="sum")


def token_nll(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
              chunk_tokens: int = 0, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token NLL (nats, fp32, no gradient) with the same shape as `targets`.

    Logits exist for one chunk of tokens at a time (chunk x vocab), never for the batch; chunk_tokens 0
    sizes the chunk to SCORE_CHUNK_BYTES of fp32 logits on CPU, 1,024 tokens on other devices.
    `rows`: targets[i] is read at hidden row rows[i] (same shape as `targets`; `hidden` is then one row
    per position, 2D), so each row's logits are computed once however many targets read it: the
    prefix tree's nodes with several next tokens.
    """
    with torch.no_grad():
        h = hidden.reshape(-1, hidden.shape[-1])
        t = targets.reshape(-1)
        r = torch.arange(t.shape[0], device=h.device) if rows is None else rows.reshape(-1).to(h.device, torch.long)
        if rows is not None and r.numel() and (int(r.min()) < 0 or int(r.max()) >= h.shape[0]):
            raise IndexError(f"token_nll: rows must lie in [0, {h.shape[0]}), got {int(r.min())}..{int(r.max())}")
        out = torch.empty(t.shape, dtype=torch.float32, device=h.device)
        weight = getattr(head, "weight", None)
        plain = type(head) is torch.nn.Linear
        dtype = _matmul_dtype(h, weight) if plain else None
        vocab = weight.shape[0] if plain else getattr(head, "out_features", None) or 65536
        if h.device.type != "cpu" and chunk_tokens <= 0:
            chunk_tokens = 1024  # the cache-sized chunks are a CPU measurement; GPUs take large ones
        chunk_tokens = chunk_tokens_for(vocab, torch.float32, chunk_tokens, SCORE_CHUNK_BYTES, 16)
        order = None if rows is None else torch.argsort(r, stable=True)
        if order is not None:  # each chunk of rows: the targets that read one of them, a contiguous range
            bounds = torch.searchsorted(r[order], torch.arange(0, h.shape[0] + chunk_tokens, chunk_tokens,
                                                               device=h.device)).tolist()
        for c, s in enumerate(range(0, h.shape[0], chunk_tokens)):
            which = slice(s, s + chunk_tokens) if order is None else order[bounds[c]:bounds[c + 1]]
            if order is not None and which.numel() == 0:
                continue  # no target reads these rows
            hc = h[s:s + chunk_tokens]
            if plain:
                with torch.autocast(h.device.type, enabled=False):
                    logits = linear(hc.to(dtype), weight.to(dtype))  # the process's fp32 kernel (models/kernels.py)
                    if head.bias is not None:
                        logits = logits.float() + head.bias.float()
            else:
                logits = head(hc)
            tc = t[which].clamp(min=0)
            # log_softmax in fp32 is one fused kernel: fewer passes over chunk x vocab than logsumexp
            logp = torch.log_softmax(logits, -1, dtype=torch.float32)
            out[which] = -logp[r[which] - s, tc]
        return out.reshape(targets.shape)
