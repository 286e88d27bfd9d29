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

from lora_project.errors import UserError, first_of
from lora_project.evaluation.fast_pass import FIRST_PASSES
from lora_project.evaluation.pair_tokens import PairTokens, tokenize_pairs
from lora_project.evaluation.prefix_tree import ROW_TOKENS, length_buckets, prefix_tree, tree_forward_tokens
from lora_project.evaluation.tree_pass import tree_logprobs
from lora_project.utils.text_io import read_user_text


@dataclass(frozen=True)
class Pair:
    """One minimal pair: grammatical and ungrammatical sentence, paradigm, field and term."""
    good: str
    bad: str
    uid: str
    field: str | None = None
    term: str | None = None
    suite: str | None = None  # the file or folder the pair came from (BLiMP, the BabyLM supplement, ...)


def load_pairs(path: Path, strict: bool = False, warn=print) -> list[Pair]:
    """Pairs from a BLiMP-style JSON-lines file or folder; bad lines are skipped with a warning (or refused with `strict`)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"pairs file or folder not found: {path}")
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise UserError(f"no .jsonl files in {path}")
    pairs, problems, same = [], [], []
    for f in files:
        text = read_user_text(f, what="JSON lines", encoding_option=False)
        # JSON lines end at \n only: splitlines() would also break at U+2028, U+0085, ..., which JSON
        # strings may hold raw
        for i, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                good, bad = obj["sentence_good"], obj["sentence_bad"]
            except ValueError:
                problems.append(f"{f.name} line {i}: not valid JSON")
                continue
            except KeyError as exc:
                problems.append(f"{f.name} line {i}: no '{exc.args[0]}' field")
                continue
            except TypeError:
                problems.append(f"{f.name} line {i}: expected a JSON object with sentence_good and sentence_bad")
                continue
            if not isinstance(good, str) or not isinstance(bad, str) or not good.strip() or not bad.strip():
                problems.append(f"{f.name} line {i}: sentence_good and sentence_bad must be non-empty strings")
                continue
            labels = {k: obj.get(k) for k in ("UID", "field", "linguistics_term")}
            odd = [k for k, v in labels.items() if v is not None and not isinstance(v, str)]
            if odd:  # these name the groups accuracies are reported by
                problems.append(f"{f.name} line {i}: {', '.join(odd)} must be a string, got "
                                f"{', '.join(type(labels[k]).__name__ for k in odd)}")
                continue
            if labels["UID"] is not None and not labels["UID"].strip():
                problems.append(f"{f.name} line {i}: UID is blank (leave it out to use the file name)")
                continue
            if good.strip() == bad.strip():
                same.append(f"{f.name} line {i}")
            pairs.append(Pair(good.strip(), bad.strip(), labels["UID"] or f.stem, obj.get("field"),
                              obj.get("linguistics_term"), path.stem if path.is_file() else path.name))
    if same:  # kept, as published BLiMP scoring keeps them: a tie is never a right decision
        warn(f"warning: {len(same)} pair(s) with the same good and bad sentence (first: {same[0]}), scored as "
             f"ties, which count as wrong")
    if not pairs:  # one line that says why, not a warning about the same lines before it
        detail = f" ({first_of(problems, 3, '; ')})" if problems else ""
        raise UserError(f"no usable minimal pairs in {path}{detail}")
    if problems:
        if strict:
            raise UserError(f"{len(problems)} bad line(s) in {path}: " + "; ".join(problems[:5]))
        warn(f"warning: skipped {len(problems)} bad line(s): " + "; ".join(problems[:5]))
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


def _project():
    """The project functions this module builds on (kept in one place: they move with the layers)."""
    from lora_project.models.losses import token_nll
    from lora_project.models.scoring import decoder_and_head
    from lora_project.models.tokens import encode_documents, prefix_id

    return encode_documents, prefix_id, decoder_and_head, token_nll


def sentence_logprobs(model, tokenizer, sentences: list[str], runtime, batch_tokens: int = 2048) -> list[float]:
    """Sum of log p(token) over each sentence's tokens, BOS prefixed; batched by length.

    The plain computation (one row per sentence), kept as the reference the pair scorer is tested against.
    """
    import torch

    encode_documents, prefix_id, decoder_and_head, token_nll = _project()
    ids = [[prefix_id(tokenizer)] + t for t in encode_documents(tokenizer, sentences)]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = [0.0] * len(ids)
    decoder, head = decoder_and_head(model)
    model.eval()
    with torch.inference_mode(), runtime.autocast():
        for group in length_buckets([len(ids[j]) for j in order], batch_tokens):
            group = [order[k] for k in group]
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
    return out


def prefix_sharing(tokens: list[PairTokens]) -> dict:
    """How much sharing saves: the fraction of both sentences' tokens in each pair's common prefix;
    forward tokens per sentence (plain), with one row per pair (shared prefix), and in the prefix
    tree the scorer runs (across pairs too; `forward_tokens_saved` is its saving against plain)."""
    plain = sum(2 * len(t.prefix) + len(t.good) + len(t.bad) for t in tokens)
    shared = sum(2 * len(t.prefix) for t in tokens)
    rows = sum(t.row_length for t in tokens)
    tree = tree_forward_tokens(tokens)
    return {"shared_prefix_fraction": shared / plain if plain else 0.0,
            "forward_tokens_plain": plain, "forward_tokens_shared": rows, "forward_tokens_tree": tree,
            "forward_tokens_saved": 1 - tree / plain if plain else 0.0}


# Bound on |difference(first pass) - difference(fp32)| in nats, as (constant, per continuation
# token): a pair whose first-pass |good - bad| is within constant + per_token x (len(good) +
# len(bad) continuation tokens) is scored again in fp32. bf16 (the pass of fast_pass.py and
# tree_pass.py): set with the default model on 6,700 BLiMP pairs (100 per paradigm, seed 0) on a
# native-bf16 CPU (AVX512-BF16), so that every measured error is at most half of it (largest 2.82
# nats, 99th percentile 0.43, median 0.07), and checked on 6,700 other pairs (seed 1: largest error
# 0.50 of the margin, 45% re-scored); docs/research_notes.md, "The bf16 first pass, rebuilt". On the
# whole filtered BLiMP (59,875 pairs) 2 pairs' errors exceeded it (largest 7.08 nats, no decision
# changed): a measured bound, not a guarantee, which is why 'auto' never picks bf16.
MARGINS = {"fp32": (0.0, 0.0), "bf16": (0.75, 0.225)}


def resolve_first_pass(requested: str, runtime) -> str:
    """'auto' -> fp32: the prefix-tree fp32 pass is exact by construction, and a bf16 first pass with a
    margin wide enough for bf16's error tail re-scores about 45% of BLiMP, which makes it slower than
    fp32 on oneDNN's kernel on the native-bf16 CPU where it was measured (research notes). 'bf16' stays available; names checked."""
    if requested == "auto":
        return "fp32"
    if requested not in FIRST_PASSES:
        raise UserError(f"unknown first pass {requested!r}; choose auto, {', '.join(FIRST_PASSES)}")
    return requested


def pair_logprobs(model, tokens: list[PairTokens], runtime, path: str = "fp32", batch_tokens: int = 2048,
                  progress=None, row_tokens: int = ROW_TOKENS, stats: dict | None = None, full: bool = True):
    """Log-probability sums (good, bad) per pair as float64 arrays, in the given numerics: each
    sentence's full sum, or with `full` False its continuation's only, log p(continuation | shared
    prefix). The shared prefix's tokens count the same in both full sums, so good - bad, and every
    decision, is the same either way; without them the output layer and its log-softmax skip the
    prefix's positions (11% of filtered BLiMP's items, 8% of its output-layer rows).

    All sentences go into one prefix tree, computed once per node in rows of at most `row_tokens`
    positions, rows batched by length within `batch_tokens` (evaluation/tree_pass.py). `progress(n)`
    is called after each batch with the pairs' worth of work it did (in proportion to the positions
    computed; the calls add up to the number of pairs). `stats` gets "massive_nodes": the nodes a
    bf16 pass computed again in fp32.
    """
    import numpy as np

    good = np.zeros(len(tokens))
    bad = np.zeros(len(tokens))
    if not tokens:
        return good, bad
    tree = prefix_tree(tokens)
    done = [0]

    def advance(fraction: float) -> None:  # pairs' worth of work, reaching len(tokens) at the end
        now = len(tokens) if fraction >= 1 else int(len(tokens) * fraction)
        if now > done[0]:
            progress(now - done[0])
            done[0] = now

    # a sentence's items predict full[1:], full = prefix + continuation: the first len(prefix) - 1 are the prefix's
    summed = [tree.sentence_items[s][0 if full else max(0, len(tokens[s // 2].prefix) - 1):]
              for s in range(2 * len(tokens))]
    logp, massive = tree_logprobs(model, tree, runtime, path, row_tokens=row_tokens, batch_tokens=batch_tokens,
                                  progress=advance if progress is not None else None,
                                  items=None if full else [i for its in summed for i in its])
    if stats is not None:
        stats["massive_nodes"] = stats.get("massive_nodes", 0) + massive
    for i in range(len(tokens)):
        good[i] = logp[summed[2 * i]].sum()
        bad[i] = logp[summed[2 * i + 1]].sum()
    return good, bad


@dataclass
class PairScores:
    """Log-probability sums per pair (the continuations', or the full sentences' with score_pairs(full=True))
    and how they were obtained."""
    good: list[float]
    bad: list[float]
    first_pass: str
    rescored: int  # pairs whose first-pass difference was within the margin, scored again in fp32
    margin: tuple[float, float]  # (nats, nats per continuation token)


def score_pairs(model, tokenizer, pairs: list[Pair], runtime, first_pass: str = "fp32", *,
                tokens: list[PairTokens] | None = None, margin: tuple[float, float] | None = None,
                batch_tokens: int = 2048, progress=None, full: bool = False) -> PairScores:
    """Score every pair in the first-pass precision, then re-score in fp32 each pair whose
    |good - bad| lies within the margin: every decision is the fp32 decision as far as the margin
    bounds the first pass's error (fp32: exact; bf16: a measured bound, MARGINS).

    good and bad are the continuations' sums, log p(continuation | shared prefix), unless `full`:
    the shared prefix counts the same in both sentences, so their difference, and every decision,
    is that of the full sums, without the output layer over the prefix's positions (pair_logprobs).

    The model's weights must be fp32 (bf16 runs as autocast over them). A tie is not a
    correct decision, so a difference of exactly 0 is always re-scored.
    """
    import torch

    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        raise UserError("minimal pairs need the model's weights in fp32 (the re-check is fp32 scoring); "
                        "load the base with precision fp32, the bf16 first pass runs as autocast over it")
    tokens = tokens if tokens is not None else tokenize_pairs(tokenizer, pairs)
    constant, per_token = MARGINS[first_pass] if margin is None else margin
    good, bad = pair_logprobs(model, tokens, runtime, first_pass, batch_tokens, progress, full=full)
    redo = []
    if first_pass != "fp32":
        for i, t in enumerate(tokens):
            if abs(good[i] - bad[i]) <= constant + per_token * (len(t.good) + len(t.bad)):
                redo.append(i)
        if redo:
            g, b = pair_logprobs(model, [tokens[i] for i in redo], runtime, "fp32", batch_tokens, full=full)
            good[redo], bad[redo] = g, b
    return PairScores(good.tolist(), bad.tolist(), first_pass, len(redo), (constant, per_token))


def accuracy_report(pairs: list[Pair], good: list[float], bad: list[float]) -> dict:
    """Accuracy per paradigm, field and term (each with a Wilson 95% interval), the macro average with
    its standard error and interval, the micro average, and the per-pair decisions."""
    from lora_project.evaluation.pair_report import (
        decisions_string,
        group_accuracy,
        macro_record,
    )

    correct = [g > b for g, b in zip(good, bad)]

    def group(key):
        acc: dict[str, list[bool]] = defaultdict(list)
        for p, c in zip(pairs, correct):
            k = key(p)
            if k:
                acc[k].append(c)
        return {k: group_accuracy(v) for k, v in sorted(acc.items())}

    paradigms = group(lambda p: p.uid)
    suites = {}
    for suite in dict.fromkeys(p.suite for p in pairs if p.suite):
        mine = {u: paradigms[u] for u in dict.fromkeys(p.uid for p in pairs if p.suite == suite)}
        acc = [c for p, c in zip(pairs, correct) if p.suite == suite]
        suites[suite] = {"macro_accuracy": sum(v["accuracy"] for v in mine.values()) / len(mine), **macro_record(mine),
                         "micro_accuracy": sum(acc) / len(acc), "pairs": len(acc), "paradigms": len(mine)}
    return {"macro_accuracy": sum(v["accuracy"] for v in paradigms.values()) / len(paradigms),
            **macro_record(paradigms), "micro_accuracy": sum(correct) / len(correct), "pairs": len(pairs),
            "paradigms": paradigms, "fields": group(lambda p: p.field), "terms": group(lambda p: p.term),
            "suites": suites, "decisions": decisions_string(correct)}


def evaluate_pairs(model, tokenizer, pairs: list[Pair], runtime, first_pass: str = "fp32", *,
                   tokens: list[PairTokens] | None = None, progress=None) -> dict:
    """Score every pair with the model as it is (adapter on or off) and report accuracies and the re-scored count."""
    scores = score_pairs(model, tokenizer, pairs, runtime, first_pass, tokens=tokens, progress=progress)
    return {**accuracy_report(pairs, scores.good, scores.bad), "first_pass": scores.first_pass,
            "rescored": scores.rescored}


def format_summary(result: dict) -> str:
    """The console summary of `evaluate --pairs`: paradigms, fields, terms, suite and macro
    averages, one column per model (full names, aligned), and how the decisions were made."""
    models = list(result["models"])
    base = result["models"]["base"]
    rows: list = [("", models)]  # (label, cells) or a section line (str)
    for section, group in (("paradigm", "paradigms"), ("field", "fields"), ("term", "terms")):
        if base[group]:
            rows.append(f"-- {section} (pairs)")
            rows += [(f"{k} ({v['pairs']})", [f"{result['models'][n][group][k]['accuracy']:.3f}" for n in models])
                     for k, v in base[group].items()]
    rows.append("-- macro average (± standard error)")
    suites = base.get("suites") or {}

    def macro(r):
        return f"{r['macro_accuracy']:.3f}" + (f" ±{r['macro_accuracy_se']:.3f}" if "macro_accuracy_se" in r else "")

    rows += [(f"{s} ({v['paradigms']} paradigms)", [macro(result['models'][n]['suites'][s]) for n in models])
             for s, v in suites.items()]
    if len(suites) != 1:
        rows.append(("all paradigms", [macro(result['models'][n]) for n in models]))
    sc = result.get("scoring", {})
    rows.append(("re-scored in fp32", [str(sc.get("rescored", {}).get(n, 0)) for n in models]))
    label = max(len(r[0]) for r in rows if isinstance(r, tuple))
    width = max([12] + [len(n) for n in models])
    lines = [r if isinstance(r, str) else f"{r[0]:<{label}}" + "".join(f"  {c:>{width}}" for c in r[1]) for r in rows]
    from lora_project.evaluation.pair_report import change_summary

    lines += change_summary(result)
    lines.append(f"{result['pairs']} pairs per model in {result['seconds']:.0f} s "
                 f"({result.get('pairs_per_second') or 0:.1f} pairs/s); first pass {sc.get('first_pass', '?')}, "
                 f"decisions {sc.get('decisions', 'fp32')} ({'oneDNN' if sc.get('fp32_kernel') == 'onednn' else 'PyTorch default'} kernel); shared prefix {100 * sc.get('shared_prefix_fraction', 0):.0f}% of tokens, "
                 f"prefix tree {100 * sc.get('forward_tokens_saved', 0):.1f}% fewer forward tokens than per sentence")
    if result.get("saved"):
        lines.append(f"saved {result['saved']}")
    return "\n".join(lines)
