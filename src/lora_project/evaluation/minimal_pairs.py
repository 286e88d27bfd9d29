"""BLiMP-style minimal pairs: is the grammatical sentence more probable than its twin?

Input: a JSON-lines file, or a folder of them, with ``sentence_good`` and ``sentence_bad``
per line and optionally ``UID`` (the paradigm), ``field`` and ``linguistics_term``; a file
without UIDs is one paradigm named after the file. Scoring follows the BabyLM convention:
a sentence's score is the sum of its tokens' log-probabilities with the tokenizer's BOS
(EOS if none) prefixed, without length normalisation; a pair is correct when the good
sentence scores strictly higher. Reported: accuracy per paradigm, per field and per term
when present, and the macro average over paradigms.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from lora_project.errors import UserError
from lora_project.utils.text_io import read_user_text


@dataclass(frozen=True)
class Pair:
    """One minimal pair: grammatical and ungrammatical sentence, paradigm, field and term."""
    good: str
    bad: str
    uid: str
    field: str | None = None
    term: str | None = None


def load_pairs(path: Path, strict: bool = False, warn=print) -> list[Pair]:
    """Pairs from a BLiMP-style JSON-lines file or folder; bad lines are skipped with a warning (or refused with `strict`)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"pairs file or folder not found: {path}")
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise UserError(f"no .jsonl files in {path}")
    pairs, problems = [], []
    for f in files:
        text = read_user_text(f, what="JSON lines")
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                good, bad = obj["sentence_good"], obj["sentence_bad"]
                if not isinstance(good, str) or not isinstance(bad, str) or not good.strip() or not bad.strip():
                    raise KeyError("empty sentence")
            except ValueError:
                problems.append(f"{f.name} line {i}: not valid JSON")
                continue
            except KeyError as exc:
                what = f"no '{exc.args[0]}' field" if exc.args and exc.args[0] in ("sentence_good", "sentence_bad") \
                    else "empty sentence_good/sentence_bad"
                problems.append(f"{f.name} line {i}: {what}")
                continue
            except TypeError:
                problems.append(f"{f.name} line {i}: expected a JSON object with sentence_good and sentence_bad")
                continue
            pairs.append(Pair(good.strip(), bad.strip(), str(obj.get("UID") or f.stem), obj.get("field"),
                              obj.get("linguistics_term")))
    if problems:
        if strict:
            raise UserError(f"{len(problems)} bad line(s) in {path}: " + "; ".join(problems[:5]))
        warn(f"warning: skipped {len(problems)} bad line(s): " + "; ".join(problems[:5]))
    if not pairs:
        detail = f" ({'; '.join(problems[:3])})" if problems else ""
        raise UserError(f"no usable minimal pairs in {path}{detail}")
    return pairs


def sample_pairs(pairs: list[Pair], limit: int | None, seed: int) -> list[Pair]:
    """At most `limit` pairs per paradigm, drawn with a seeded RNG (file order kept)."""
    if not limit:
        return pairs
    by_uid: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        by_uid[p.uid].append(i)
    rng = random.Random(seed)
    keep = set()
    for uid in sorted(by_uid):
        idx = by_uid[uid]
        keep.update(idx if len(idx) <= limit else rng.sample(idx, limit))
    return [p for i, p in enumerate(pairs) if i in keep]


def sentence_logprobs(model, tokenizer, sentences: list[str], runtime, batch_tokens: int = 2048) -> list[float]:
    """Sum of log p(token) over each sentence's tokens, BOS prefixed; batched by length."""
    import torch

    from lora_project.models.losses import token_nll
    from lora_project.models.scoring import decoder_and_head
    from lora_project.models.tokens import encode_documents, prefix_id

    ids = [[prefix_id(tokenizer)] + t for t in encode_documents(tokenizer, sentences)]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = [0.0] * len(ids)
    decoder, head = decoder_and_head(model)
    model.eval()
    with torch.inference_mode(), runtime.autocast():
        i = 0
        while i < len(order):
            # Sorted by length, so the last sentence of a group is its longest: grow the group
            # while rows x that length stays within the token budget (little padding).
            end = i + 1
            while end < len(order) and (end + 1 - i) * len(ids[order[end]]) <= batch_tokens:
                end += 1
            group = order[i:end]
            width = len(ids[group[-1]])
            batch = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.bool)
            for r, j in enumerate(group):
                batch[r, :len(ids[j])] = torch.tensor(ids[j])
                mask[r, :len(ids[j])] = True
            batch, mask = batch.to(runtime.device), mask.to(runtime.device)
            # Right padding with a causal model: real tokens never attend to the padding after them.
            hidden = decoder(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]
            picked = -token_nll(hidden, head, batch[:, 1:]) * mask[:, 1:]
            for r, j in enumerate(group):
                out[j] = float(picked[r].sum())
            i += len(group)
    return out


def accuracy_report(pairs: list[Pair], good: list[float], bad: list[float]) -> dict:
    """Accuracy per paradigm, field and term, and the macro and micro averages."""
    correct = [g > b for g, b in zip(good, bad)]

    def group(key):
        acc: dict[str, list[bool]] = defaultdict(list)
        for p, c in zip(pairs, correct):
            k = key(p)
            if k:
                acc[k].append(c)
        return {k: {"accuracy": sum(v) / len(v), "pairs": len(v)} for k, v in sorted(acc.items())}

    paradigms = group(lambda p: p.uid)
    return {"macro_accuracy": sum(v["accuracy"] for v in paradigms.values()) / len(paradigms),
            "micro_accuracy": sum(correct) / len(correct), "pairs": len(pairs), "paradigms": paradigms,
            "fields": group(lambda p: p.field), "terms": group(lambda p: p.term)}


def evaluate_pairs(model, tokenizer, pairs: list[Pair], runtime) -> dict:
    """Score every pair with the model as it is (adapter on or off) and report accuracies."""
    good = sentence_logprobs(model, tokenizer, [p.good for p in pairs], runtime)
    bad = sentence_logprobs(model, tokenizer, [p.bad for p in pairs], runtime)
    return accuracy_report(pairs, good, bad)
