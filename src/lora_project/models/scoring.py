"""Token-level perplexity and bits per UTF-8 byte with the sliding-window method.

Definition (what `lora-project evaluate --json` reports):

* The text is tokenised without special tokens and the tokenizer's BOS (EOS if it has no
  BOS) is prefixed, so every token of the text is predicted: ids = [p, t1, ..., tN].
* Windows of at most ``max_length`` ids start every ``stride`` ids. Each token t_j is
  scored exactly once, in the first window that contains it and its predecessor but has
  not scored it yet; later windows give it more left context only when stride < max_length.
* ``nll_sum`` is the sum of -ln p(t_j | context) in nats over the N tokens;
  ``perplexity = exp(nll_sum / N)``; ``bits_per_byte = nll_sum / (ln 2 * bytes)`` with
  ``bytes`` the UTF-8 length of the text, which makes models with different tokenizers
  comparable.

A prepared dataset split is scored as its documents packed the way training sees them
(doc EOS doc EOS ...): the EOS stands for the document separator, so ``bytes`` is exactly
the split file's size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from lora_project.errors import UserError
from lora_project.models.tokens import prefix_id


@dataclass
class Score:
    """Summed negative log-likelihood over scored tokens, with the byte count for bits per byte."""
    nll_sum: float
    tokens: int
    bytes: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / (math.log(2) * self.bytes) if self.bytes else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(perplexity=self.perplexity, bits_per_byte=self.bits_per_byte)
        return d


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


def score_ids(model, ids: np.ndarray | list[int], n_bytes: int, runtime, max_length: int = 1024,
              stride: int | None = None, batch_size: int = 4, chunk_tokens: int = 1024) -> Score:
    """Score a prefixed id sequence (ids[0] is the prefix token) with sliding windows. A window longer
    than the model's context (``max_position_embeddings``; GPT-2's learned positions stop there) is
    refused when the sequence would fill it."""
    import torch

    from lora_project.models.losses import IGNORE_INDEX, sum_nll

    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    n = len(ids_t)
    if n < 2:
        raise UserError("nothing to score: the text is empty")
    context = model_context(model)
    if context and min(n, max_length) > context:
        raise UserError(f"--max-length {max_length} exceeds the model's context of {context} positions; "
                        f"pass --max-length {context} or less")
    stride = max(1, max_length // 2) if stride is None else stride
    wins = windows(n, max_length, stride)
    decoder, head = decoder_and_head(model)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.inference_mode(), runtime.autocast():
            # Windows of equal length go through the model together.
            i = 0
            while i < len(wins):
                length = wins[i][1] - wins[i][0]
                group = [wins[i]]
                while (i + len(group) < len(wins) and len(group) < batch_size
                       and wins[i + len(group)][1] - wins[i + len(group)][0] == length):
                    group.append(wins[i + len(group)])
                inputs = torch.stack([ids_t[b:e - 1] for b, e, _ in group]).to(runtime.device)
                targets = torch.stack([ids_t[b + 1:e] for b, e, _ in group]).clone()
                for row, (b, _e, first) in enumerate(group):
                    targets[row, : first - b - 1] = IGNORE_INDEX  # already scored earlier
                hidden = decoder(input_ids=inputs, use_cache=False).last_hidden_state
                total += float(sum_nll(hidden, head, targets.to(runtime.device), chunk_tokens))
                i += len(group)
    finally:
        model.train(was_training)
    return Score(nll_sum=total, tokens=n - 1, bytes=n_bytes)


def score_text(model, tokenizer, text: str, runtime, max_length: int = 1024, stride: int | None = None,
               batch_size: int = 4) -> Score:
    """Score one text with sliding windows (`max_length`, `stride`)."""
    if not text:
        raise UserError("nothing to score: the text is empty")
    ids = [prefix_id(tokenizer)] + tokenizer(text, add_special_tokens=False)["input_ids"]
    return score_ids(model, ids, len(text.encode("utf-8")), runtime, max_length, stride, batch_size)


def score_documents(model, tokenizer, docs: list[str], separator: str, runtime, max_length: int = 1024,
                    stride: int | None = None, batch_size: int = 4, stream: np.ndarray | None = None) -> Score:
    """Score documents packed as doc EOS doc EOS ...; bytes count each doc plus its separator."""
    from lora_project.models.tokens import pack_documents

    if not docs:
        raise UserError("nothing to score: no documents")
    packed = stream if stream is not None else pack_documents(tokenizer, docs)
    ids = np.concatenate([[prefix_id(tokenizer)], np.asarray(packed, dtype=np.int64)])
    n_bytes = sum(len(d.encode("utf-8")) for d in docs) + len(separator.encode()) * len(docs)
    return score_ids(model, ids, n_bytes, runtime, max_length, stride, batch_size)


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


def validation_metrics(model, tokenizer, docs: list[str], separator: str, runtime, seq_len: int) -> dict:
    """Validation loss, perplexity and bits per byte of `docs` as training sees them (packed with EOS).

    Windows of 2 x seq_len tokens (256 to 1024) every 3/4 window: enough context for
    utterance-length documents at ~1.3x the cost of one pass.
    """
    eval_len = min(1024, max(2 * seq_len, 256), model_context(model) or 1024)
    s = score_documents(model, tokenizer, docs, separator, runtime, max_length=eval_len, stride=eval_len * 3 // 4)
    return {"val_loss": s.nll_sum / s.tokens, "val_perplexity": s.perplexity, "val_bits_per_byte": s.bits_per_byte,
            "val_tokens": s.tokens, "val_bytes": s.bytes}


def results_metrics(m: dict) -> dict:
    """A validation_metrics() record in the shape results.json uses for metrics_before/after."""
    return {"perplexity": m["val_perplexity"], "bits_per_byte": m["val_bits_per_byte"], "loss": m["val_loss"],
            "tokens": m["val_tokens"], "bytes": m["val_bytes"]}
