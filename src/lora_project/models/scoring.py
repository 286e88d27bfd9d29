"""Token-level perplexity and bits per UTF-8 byte with the sliding-window method: the one
definition that training's validation numbers, `evaluate` and the cross-evaluation matrix share.

Definition (every caller goes through `score_split` or `score_text`):

* The text is tokenised without special tokens and the tokenizer's BOS (EOS if it has no
  BOS) is prefixed, so every token of the text is predicted: ids = [p, t1, ..., tN].
* Windows of at most ``max_length`` ids (default 1024) start every ``stride`` ids (default
  max_length / 2). Each token t_j is scored exactly once, in the first window that contains it
  and its predecessor but has not scored it yet; later windows give it more left context only
  when stride < max_length.
* ``nll_sum`` is the sum of -ln p(t_j | context) in nats over the N tokens;
  ``perplexity = exp(nll_sum / N)``; ``bits_per_byte = nll_sum / (ln 2 * bytes)`` with
  ``bytes`` the UTF-8 length of the text, which makes models with different tokenizers
  comparable.

A prepared dataset split is scored as its documents packed the way training sees them
(doc EOS doc EOS ...): the EOS stands for the document separator, so ``bytes`` is exactly
the split file's size. The whole split is scored unless a cap (``max_tokens``) is asked for;
a cap keeps the leading documents that fit and is recorded with what was scored
(``tokens``/``documents`` against ``tokens_total``/``documents_total``). Each document's own
sum of NLL, tokens (its EOS included) and bytes are kept, so intervals resample documents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lora_project.errors import UserError
from lora_project.models.tokens import prefix_id

DEFAULT_MAX_LENGTH = 1024  # window length in tokens: the one definition's default


def default_stride(max_length: int) -> int:
    """The window step when none is given: half a window, so every token after the first window
    has at least max_length / 2 tokens of left context."""
    return max(1, max_length // 2)


@dataclass
class Score:
    """Summed negative log-likelihood over scored tokens, with the byte count for bits per byte,
    what was scored out of what there was, and the per-document sums behind the totals."""
    nll_sum: float
    tokens: int
    bytes: int
    documents: int = 1
    documents_total: int | None = None  # documents in the split (None: a text, one document)
    tokens_total: int | None = None  # tokens the whole split would score
    cap: int | None = None  # max_tokens asked for (None: whole split)
    max_length: int | None = None
    stride: int | None = None
    doc_nll: np.ndarray | None = field(default=None, repr=False)  # nats per document
    doc_tokens: np.ndarray | None = field(default=None, repr=False)  # its tokens and separator EOS
    doc_bytes: np.ndarray | None = field(default=None, repr=False)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / (math.log(2) * self.bytes) if self.bytes else float("nan")

    @property
    def capped(self) -> bool:
        return self.documents_total is not None and self.documents < self.documents_total

    def intervals(self, resamples: int | None = None, seed: int | None = None, level: float = 0.95) -> dict:
        """Bootstrap 95% intervals of perplexity and bits per byte over documents (None for one document)."""
        from lora_project.utils.stats import (
            DEFAULT_RESAMPLES,
            DEFAULT_SEED,
            document_intervals,
        )

        if self.doc_nll is None:
            return {"perplexity_ci": None, "bits_per_byte_ci": None}
        return document_intervals(self.doc_nll, self.doc_tokens, self.doc_bytes, level=level,
                                  resamples=DEFAULT_RESAMPLES if resamples is None else resamples,
                                  seed=DEFAULT_SEED if seed is None else seed)

    def to_dict(self) -> dict:
        """The JSON record: totals, perplexity, bits per byte and what was scored (no per-document arrays)."""
        return {"nll_sum": self.nll_sum, "tokens": self.tokens, "bytes": self.bytes,
                "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte, **self.scope()}

    def scope(self) -> dict:
        """What was scored: tokens and documents against the whole split, the cap and the windows."""
        return {"tokens_scored": self.tokens, "documents_scored": self.documents,
                "tokens_total": self.tokens_total, "documents_total": self.documents_total, "cap": self.cap,
                "max_length": self.max_length, "stride": self.stride}


def describe_scope(scope: dict) -> str:
    """One line saying what was scored, e.g. '2,084 tokens, 250 documents (whole split)' or
    '1,999 of 2,084 tokens, 240 of 250 documents (capped at 2,000 tokens)'."""
    t, d = scope.get("tokens_scored"), scope.get("documents_scored")
    tt, dt = scope.get("tokens_total"), scope.get("documents_total")
    if dt is None:
        return f"{t:,} tokens (one text)"
    if d is not None and d < dt:
        return f"{t:,} of {tt:,} tokens, {d:,} of {dt:,} documents (capped at {scope.get('cap'):,} tokens)"
    return f"{t:,} tokens, {dt:,} documents (whole split)"


def windows(n_ids: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window over ids[0:n_ids]; target j is scored in the window
    where first_scored <= j < end. Together the windows score j = 1 .. n_ids-1 exactly once."""
    if max_length < 2:
        raise UserError(f"--max-length must be at least 2, got {max_length}")
    if not 1 <= stride <= max_length - 1:
        raise UserError(f"--stride must be between 1 and max-length - 1 ({max_length - 1}), got {stride}")
    out = []
    scored_to = 1  # next target index not yet scored
    begin = 0
    while scored_to < n_ids:
        end = min(begin + max_length, n_ids)
        if end > scored_to:
            out.append((begin, end, scored_to))
            scored_to = end
        begin += stride
    return out


# Families whose decoder + head split tests/test_model_families.py (and the Llama tests) check against
# full logits; any other family is checked once when it loads (`check_decoder_and_head`, two short forwards).
TESTED_FAMILIES = frozenset({"llama", "gpt2", "opt", "gpt_neox", "qwen2", "gemma2", "phi"})


def decoder_and_head(model):
    """The decoder stack (returns final hidden states, after the last norm) and the output layer of
    a causal LM or PeftModel, found through the model's own accessors (`get_decoder()`,
    `get_output_embeddings()`), so any architecture's attribute names work (GPT-2 ``transformer``
    + ``lm_head``, GPT-NeoX ``gpt_neox`` + ``embed_out``, OPT ``model.decoder`` with its
    ``project_out``, Llama ``model`` + ``lm_head``). A family that rescales or soft-caps its logits
    gets a head that does the same (`losses.PostProcessedHead`); `check_decoder_and_head` verifies
    the split against the model's own forward."""
    from lora_project.models.losses import PostProcessedHead

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if decoder is base or head is None:
        raise UserError(f"cannot split {type(base).__name__} into a decoder stack and an output layer; "
                        "it is not a supported causal language model")
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    scale = float(getattr(cfg, "logit_scale", None) or 1.0)
    if getattr(cfg, "logits_scaling", None):
        scale /= float(cfg.logits_scaling)
    cap = getattr(cfg, "final_logit_softcapping", None)
    if scale != 1.0 or cap:
        head = PostProcessedHead(head, scale, cap)
    return decoder, head


def check_decoder_and_head(model, n_tokens: int = 8) -> float:
    """Refuse a model whose logits `decoder_and_head` does not reproduce (an architecture that does
    something after its output layer we do not know about). Returns the largest difference."""
    import torch

    decoder, head = decoder_and_head(model)
    param = next(model.parameters())
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = (torch.arange(1, n_tokens + 1, device=param.device) * 7919 % max(vocab, 2))[None]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = model(input_ids=ids, use_cache=False).logits.float()
            split = head(decoder(input_ids=ids, use_cache=False).last_hidden_state).float()
    finally:
        model.train(was_training)
    diff = float((full - split).abs().max())
    tol = (1e-3 if param.dtype == torch.float32 else 5e-2) * max(1.0, float(full.abs().max()))
    if not diff <= tol:
        raise UserError(f"{type(model).__name__}: its logits are not the output layer applied to the decoder's last "
                        f"hidden states (largest difference {diff:.3g}); this architecture is not supported for scoring")
    return diff


def model_context(model) -> int | None:
    """The longest sequence a model with learned absolute positions can take (GPT-2, OPT:
    config.max_position_embeddings; a longer one fails with an index error). None for rotary
    models (Llama, GPT-NeoX, Qwen2, ...), whose positions extend past their training length."""
    cfg = getattr(model, "config", model)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(cfg, "rope_parameters", None) is not None or getattr(cfg, "rope_theta", None) is not None:
        return None
    value = getattr(cfg, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def target_nll(model, ids: np.ndarray | list[int], runtime, max_length: int = DEFAULT_MAX_LENGTH,
               stride: int | None = None, batch_size: int = 4, chunk_tokens: int = 0) -> np.ndarray:
    """-ln p(ids[j] | window context) in nats for j = 1 .. len(ids)-1 (ids[0] is the prefix token),
    each target scored once by the sliding windows; returns an array of len(ids) - 1. A window
    longer than the model's context (``max_position_embeddings``; GPT-2's learned positions stop
    there) is refused when the sequence would fill it."""
    import torch

    from lora_project.models.kernels import fp32_linears
    from lora_project.models.losses import token_nll

    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    n = len(ids_t)
    if n < 2:
        raise UserError("nothing to score: the text is empty")
    context = model_context(model)
    if context and min(n, max_length) > context:
        raise UserError(f"--max-length {max_length} exceeds the model's context of {context} positions; "
                        f"pass --max-length {context} or less")
    stride = default_stride(max_length) if stride is None else stride
    wins = windows(n, max_length, stride)
    decoder, head = decoder_and_head(model)
    out = np.zeros(n, dtype=np.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), runtime.autocast(), fp32_linears(model, runtime.device):
            # Windows of equal length go through the model together.
            i = 0
            while i < len(wins):
                length = wins[i][1] - wins[i][0]
                group = [wins[i]]
                while (i + len(group) < len(wins) and len(group) < batch_size
                       and wins[i + len(group)][1] - wins[i + len(group)][0] == length):
                    group.append(wins[i + len(group)])
                inputs = torch.stack([ids_t[b:e - 1] for b, e, _ in group]).to(runtime.device)
                targets = torch.stack([ids_t[b + 1:e] for b, e, _ in group]).to(runtime.device)
                hidden = decoder(input_ids=inputs, use_cache=False).last_hidden_state
                nll = token_nll(hidden, head, targets, chunk_tokens).double().cpu().numpy()
                for row, (b, e, first) in enumerate(group):
                    out[first:e] = nll[row, first - b - 1:]  # earlier targets were scored by earlier windows
                i += len(group)
    finally:
        model.train(was_training)
    return out[1:]


def score_ids(model, ids: np.ndarray | list[int], n_bytes: int, runtime, max_length: int = DEFAULT_MAX_LENGTH,
              stride: int | None = None, batch_size: int = 4, chunk_tokens: int = 0) -> Score:
    """Score a prefixed id sequence (ids[0] is the prefix token) with sliding windows, as one document."""
    stride = default_stride(max_length) if stride is None else stride
    nll = target_nll(model, ids, runtime, max_length, stride, batch_size, chunk_tokens)
    total = float(nll.sum())
    return Score(nll_sum=total, tokens=len(nll), bytes=n_bytes, max_length=max_length, stride=stride,
                 doc_nll=np.array([total]), doc_tokens=np.array([len(nll)]), doc_bytes=np.array([n_bytes]))


def score_text(model, tokenizer, text: str, runtime, max_length: int = DEFAULT_MAX_LENGTH, stride: int | None = None,
               batch_size: int = 4) -> Score:
    """Score one text with sliding windows (`max_length`, `stride`)."""
    if not text:
        raise UserError("nothing to score: the text is empty")
    ids = [prefix_id(tokenizer)] + tokenizer(text, add_special_tokens=False)["input_ids"]
    return score_ids(model, ids, len(text.encode("utf-8")), runtime, max_length, stride, batch_size)


@dataclass
class SplitTokens:
    """A split tokenised once for scoring: the packed stream of the documents kept, their lengths, and
    what the cap left out."""
    ids: np.ndarray  # prefix + doc EOS doc EOS ...
    doc_tokens: np.ndarray  # tokens per kept document, its EOS included
    doc_bytes: np.ndarray  # UTF-8 bytes per kept document, its separator included
    tokens_total: int
    documents_total: int
    cap: int | None


def tokenize_split(tokenizer, docs: list[str], separator: str, max_tokens: int = 0) -> SplitTokens:
    """Pack `docs` as training sees them (doc EOS doc EOS ...) behind the prefix token; with
    `max_tokens` > 0, keep the leading documents whose packed length fits (at least one)."""
    from lora_project.models.tokens import encode_documents, eos_id

    if not docs:
        raise UserError("nothing to score: no documents")
    if max_tokens < 0:
        raise UserError(f"the token cap must be 0 (whole split) or positive, got {max_tokens}")
    encoded = encode_documents(tokenizer, docs)
    lengths = np.array([len(e) + 1 for e in encoded], dtype=np.int64)
    keep = len(docs)
    if max_tokens:
        fits = int(np.searchsorted(np.cumsum(lengths), max_tokens, side="right"))
        keep = max(1, fits)
    eos = eos_id(tokenizer)
    ids = np.fromiter((t for e in encoded[:keep] for t in (*e, eos)), dtype=np.int64, count=int(lengths[:keep].sum()))
    sep = len(separator.encode("utf-8"))
    return SplitTokens(ids=np.concatenate([[prefix_id(tokenizer)], ids]), doc_tokens=lengths[:keep],
                       doc_bytes=np.array([len(d.encode("utf-8")) + sep for d in docs[:keep]], dtype=np.int64),
                       tokens_total=int(lengths.sum()), documents_total=len(docs), cap=max_tokens or None)


def default_window(model) -> int:
    """The one definition's window: DEFAULT_MAX_LENGTH tokens, or the model's context where its
    learned positions stop sooner (GPT-2, OPT)."""
    context = model_context(model)
    return min(DEFAULT_MAX_LENGTH, context) if context else DEFAULT_MAX_LENGTH


def score_split(model, tokenizer, docs: list[str] | SplitTokens, separator: str, runtime, *,
                max_tokens: int = 0, max_length: int | None = None, stride: int | None = None,
                batch_size: int = 4) -> Score:
    """The one scoring of a prepared split (training's validation, `evaluate --dataset`, the matrix):
    documents packed with EOS behind BOS, sliding windows, the whole split unless `max_tokens` caps it.
    `docs` may be a `tokenize_split` result, so repeated evaluations tokenise once."""
    split = docs if isinstance(docs, SplitTokens) else tokenize_split(tokenizer, docs, separator, max_tokens)
    max_length = default_window(model) if max_length is None else max_length
    stride = default_stride(max_length) if stride is None else stride
    nll = target_nll(model, split.ids, runtime, max_length, stride, batch_size)
    doc_nll = np.add.reduceat(nll, np.concatenate([[0], np.cumsum(split.doc_tokens)[:-1]]))
    return Score(nll_sum=float(nll.sum()), tokens=len(nll), bytes=int(split.doc_bytes.sum()),
                 documents=len(split.doc_tokens), documents_total=split.documents_total,
                 tokens_total=split.tokens_total, cap=split.cap, max_length=max_length, stride=stride,
                 doc_nll=doc_nll, doc_tokens=split.doc_tokens, doc_bytes=split.doc_bytes)


def score_documents(model, tokenizer, docs: list[str], separator: str, runtime, max_length: int | None = None,
                    stride: int | None = None, batch_size: int = 4) -> Score:
    """Score documents packed as doc EOS doc EOS ... (the whole list): `score_split` without a cap."""
    return score_split(model, tokenizer, docs, separator, runtime, max_length=max_length, stride=stride,
                       batch_size=batch_size)


def limit_documents(tokenizer, docs: list[str], max_tokens: int) -> list[str]:
    """The leading documents whose packed length stays within max_tokens (at least one)."""
    if not max_tokens:
        return docs
    from lora_project.models.tokens import encode_documents

    out, used = [], 0
    for d, ids in zip(docs, encode_documents(tokenizer, docs)):
        if out and used + len(ids) + 1 > max_tokens:
            break
        out.append(d)
        used += len(ids) + 1
    return out


def validation_metrics(model, tokenizer, docs: list[str] | SplitTokens, separator: str, runtime,
                       seq_len: int | None = None, *, max_tokens: int = 0) -> dict:
    """Validation loss, perplexity and bits per byte as `evaluate --dataset ... --split validation`
    computes them (`score_split`, default windows), capped at `max_tokens` when > 0 (training's
    `eval_max_tokens`), with what was scored and bootstrap intervals over documents.

    Every value is a number (MLflow logs the dict as is); ``val_cap_tokens`` 0 means the whole split.
    `seq_len` is accepted for old callers and no longer changes the windows.
    """
    s = score_split(model, tokenizer, docs, separator, runtime, max_tokens=max_tokens)
    ci = s.intervals()
    out = {"val_loss": s.nll_sum / s.tokens, "val_perplexity": s.perplexity, "val_bits_per_byte": s.bits_per_byte,
           "val_tokens": s.tokens, "val_bytes": s.bytes, "val_documents": s.documents,
           "val_documents_total": s.documents_total, "val_tokens_total": s.tokens_total,
           "val_cap_tokens": s.cap or 0}
    if ci["perplexity_ci"] is not None:
        out.update(val_perplexity_ci_low=ci["perplexity_ci"][0], val_perplexity_ci_high=ci["perplexity_ci"][1],
                   val_bits_per_byte_ci_low=ci["bits_per_byte_ci"][0],
                   val_bits_per_byte_ci_high=ci["bits_per_byte_ci"][1])
    return out


def validation_scope(m: dict) -> dict:
    """The scope record (`Score.scope`) of a validation_metrics() dict; old records give what they have."""
    docs, total = m.get("val_documents"), m.get("val_documents_total")
    return {"tokens_scored": m.get("val_tokens"), "documents_scored": None if docs is None else int(docs),
            "tokens_total": None if m.get("val_tokens_total") is None else int(m["val_tokens_total"]),
            "documents_total": None if total is None else int(total),
            "cap": int(m["val_cap_tokens"]) if m.get("val_cap_tokens") else None,
            "max_length": DEFAULT_MAX_LENGTH if docs is not None else None,
            "stride": default_stride(DEFAULT_MAX_LENGTH) if docs is not None else None}


def describe_validation(m: dict) -> str:
    """The log line's tail for a validation_metrics() dict: perplexity, interval and what was scored."""
    ci = ""
    if m.get("val_perplexity_ci_low") is not None:
        ci = f" (95% CI {m['val_perplexity_ci_low']:.3f} to {m['val_perplexity_ci_high']:.3f})"
    scope = validation_scope(m)
    where = f" over {describe_scope(scope)}" if scope["documents_total"] is not None else ""
    return f"{m['val_perplexity']:.3f}{ci}{where}"


def results_metrics(m: dict) -> dict:
    """A validation_metrics() record in the shape results.json uses for metrics_before/after."""
    ci = (lambda k: [m[f"{k}_ci_low"], m[f"{k}_ci_high"]] if f"{k}_ci_low" in m else None)
    return {"perplexity": m["val_perplexity"], "bits_per_byte": m["val_bits_per_byte"], "loss": m["val_loss"],
            "tokens": m["val_tokens"], "bytes": m["val_bytes"], "perplexity_ci": ci("val_perplexity"),
            "bits_per_byte_ci": ci("val_bits_per_byte"), **validation_scope(m)}
