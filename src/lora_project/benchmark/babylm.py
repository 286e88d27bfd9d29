"""`benchmark --babylm DIR`: our prefix-tree scoring of the BabyLM 2025 suite against the official
pipeline's strategy, reproduced in-process on the same loaded model (fp32), on a seeded sample of each
task, in one run.

The official strategy (its `causal` backend, temperature 1), written here from its definition:

- ranking tasks (blimp, supplement, ewok, entity_tracking, wug): items in file order, in batches of 64
  items; per batch, one forward per option index over that option's texts, right-padded with EOS to the
  batch's longest (the tokens: BOS when the tokenizer has one, then the text; the inputs every token but
  the last), the full-vocabulary log-softmax at every position, the next token's log-probability
  gathered and summed under the completion mask (the tokens whose character span ends after the
  context). Every option recomputes its whole context, and every row is as long as its batch's longest.
- reading: per row, the word's probability as upstream `get_p2` computes it, one unbatched forward per
  read: the context with the tokenizer's default special tokens, the distribution at its last position;
  each further token of the word appended (decoded) to the context text and read after a new forward.
  The same for the previous word where the row has one.

Ours is the prefix tree as `evaluate --babylm` runs it (evaluation/babylm.py: `prepare_task`, then
`option_scores` / `surprisals`), each side timed with its own tokenization. The two must give the same
decisions (fp32; near-ties, |margin| < 1e-4 nats on either side, are listed).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lora_project.errors import UserError
from lora_project.utils.device import cpu_label

OFFICIAL_BATCH = 64  # items per batch, the official default
NEAR_TIE = 1e-4  # nats
HEAD_ROWS = 8  # rows per output-layer call on the official side: the same arithmetic, bounded memory
#: Seeded items per UID (reading: rows) by default: on a 2-core AVX512-BF16 CPU (no AMX) with the
#: embedded SmolLM2-135M, the whole command took 5.1 minutes at limit 2 under a load average of 4-6
#: (one thread), entity tracking 3.9 of them (research notes)
DEFAULT_LIMIT = 2

STRATEGY = ("The official strategy was reproduced in this process on the same loaded fp32 model, written from "
            "the pipeline's definition (not its code): ranking tasks in file order, batches of 64 items, one "
            "right-padded forward per option index (padded with EOS), the full-vocabulary log-softmax at every "
            "position, the next tokens' log-probabilities summed under the completion mask; reading one "
            "unbatched forward per read of each word and previous word (upstream get_p2: the word's tokens "
            "appended to the running context).")
PROJECTION = ("Projected full-suite time: each task's measured seconds (tokenization and scoring, model load "
              "excluded) scaled by the full task's items (reading: rows) over the sample's, linear in items; "
              "this overstates ours, whose tree shares more the more items it holds.")


def official_option_sums(model, texts: Sequence[Sequence], pad_id: int, *, batch_items: int = OFFICIAL_BATCH,
                         head_rows: int = HEAD_ROWS) -> tuple[list[np.ndarray], int]:
    """Per item, each option's score by the official strategy (fp32 sums, returned as float64), and the
    forward positions it computed, padding included. `texts[i][k]`: item i's option k as a
    `babylm_score.ScoredText`; `pad_id`: the EOS id."""
    import torch

    from lora_project.models.scoring import decoder_and_head

    decoder, head = decoder_and_head(model)
    device = next(model.parameters()).device
    out = [np.zeros(len(opts)) for opts in texts]
    positions = 0
    with torch.inference_mode():
        for start in range(0, len(texts), batch_items):
            batch = range(start, min(start + batch_items, len(texts)))
            for k in range(max(len(texts[i]) for i in batch)):
                have = [i for i in batch if k < len(texts[i])]
                width = max(len(texts[i][k].ids) for i in have)
                if width < 2:
                    continue
                ids = torch.full((len(have), width), pad_id, dtype=torch.long)
                attn = torch.zeros((len(have), width), dtype=torch.long)
                scored = torch.zeros((len(have), width), dtype=torch.float32)
                for r, i in enumerate(have):
                    t = texts[i][k]
                    ids[r, :len(t.ids)] = torch.tensor(t.ids)
                    attn[r, :len(t.ids)] = 1
                    scored[r, list(t.scored)] = 1.0
                inputs, targets, mask = ids[:, :-1].to(device), ids[:, 1:].to(device), scored[:, 1:].to(device)
                positions += inputs.numel()
                hidden = decoder(input_ids=inputs, attention_mask=attn[:, :-1].to(device), use_cache=False)
                hidden = hidden.last_hidden_state
                sums = []
                for r in range(0, len(have), head_rows):
                    logp = torch.log_softmax(head(hidden[r:r + head_rows]).float(), dim=-1)
                    picked = logp.gather(-1, targets[r:r + head_rows, :, None])[..., 0]
                    sums.append((picked * mask[r:r + head_rows]).sum(1))
                for i, s in zip(have, torch.cat(sums).double().cpu().numpy()):
                    out[i][k] = s
    return out, positions


def official_surprisals(model, tokenizer, df) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(pred, prev_pred, forwards, forward positions) by the official reading strategy: one unbatched
    forward per read, the full model output, the log-softmax of its last position."""
    import torch

    from lora_project.evaluation.reading import word_queries

    device = next(model.parameters()).device
    forwards = positions = 0

    def nll(context: str, word: str) -> float:
        nonlocal forwards, positions
        total = 0.0
        for text, token in word_queries(tokenizer, context, word):
            ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            total -= float(torch.log_softmax(logits[0, -1].float(), dim=-1)[token])
            forwards += 1
            positions += ids.shape[1]
        return total

    pred, prev = [], []
    with torch.inference_mode():
        for r in df.itertuples():
            pred.append(nll(r.item, r.word))
            prev.append(nll(r.prev_item, r.prev_word) if isinstance(r.prev_item, str) else np.nan)
    return np.array(pred), np.array(prev), forwards, positions


def _split(flat: Sequence, items) -> list[list]:
    out, k = [], 0
    for it in items:
        out.append(list(flat[k:k + len(it.texts)]))
        k += len(it.texts)
    return out


def rank_agreement(items, ours: Sequence[np.ndarray], theirs: Sequence[np.ndarray]) -> dict:
    """Official-rule decisions of both sides compared item by item, the near-ties (|margin| < NEAR_TIE on
    either side) listed, and the largest relative difference between the two sides' option sums."""
    from lora_project.evaluation.babylm_score import decisions

    a, b = decisions(ours), decisions(theirs)
    differ = set(np.flatnonzero(a["official"] != b["official"]).tolist())
    near = np.flatnonzero(np.minimum(np.abs(a["margin"]), np.abs(b["margin"])) < NEAR_TIE).tolist()
    rel = max((float(np.max(np.abs(o - t) / np.maximum(1.0, np.abs(t)))) for o, t in zip(ours, theirs)), default=0.0)
    return {"items": len(items), "identical_decisions": len(items) - len(differ), "differing": len(differ),
            "differing_outside_near_ties": len(differ - set(near)),
            "near_ties": [{"item": items[i].where or str(i), "uid": items[i].uid, "ours_margin": float(a["margin"][i]),
                           "official_margin": float(b["margin"][i])} for i in near],
            "max_relative_sum_difference": rel}


def reading_agreement(df, ours: tuple, theirs: tuple) -> dict:
    """The largest surprisal difference between the two sides, and both sides' two official scores
    where the sample has the rows the regressions need."""
    from lora_project.evaluation.reading import MIN_ROWS, reading_scores, usable_rows

    diff = max(float(np.nanmax(np.abs(np.asarray(o) - np.asarray(t)), initial=0.0)) for o, t in zip(ours, theirs))
    out = {"rows": len(df), "max_abs_surprisal_difference": diff, "scores": None}
    if usable_rows(df) >= MIN_ROWS:
        a, b = reading_scores(df, *ours), reading_scores(df, *theirs)
        out["scores"] = {k: {"ours": a[k], "official": b[k], "difference": a[k] - b[k]}
                         for k in ("eye_tracking", "self_paced_reading")}
    return out


def time_task(model, tokenizer, task: str, data, runtime) -> dict:
    """Ours and the official strategy on one task's sample: seconds (tokenization included), forward
    positions, and the cross-check of their results."""
    from lora_project.evaluation.babylm import prepare_task
    from lora_project.evaluation.babylm_score import item_texts, option_scores
    from lora_project.evaluation.reading import surprisals

    t0 = time.perf_counter()
    prepared = prepare_task(tokenizer, task, data)
    if task == "reading":
        ours = surprisals(model, tokenizer, data, runtime, plan=prepared)
        mine, mine_tokens = time.perf_counter() - t0, prepared.tree.forward_tokens
        t0 = time.perf_counter()
        pred, prev, forwards, positions = official_surprisals(model, tokenizer, data)
        other = time.perf_counter() - t0
        official = {"forwards": forwards}
        agreement = reading_agreement(data, ours, (pred, prev))
    else:
        ours = option_scores(model, tokenizer, data, runtime, texts=prepared)
        mine, mine_tokens = time.perf_counter() - t0, prepared.forward_tokens
        t0 = time.perf_counter()
        theirs, positions = official_option_sums(model, _split(item_texts(tokenizer, data), data),
                                                 int(tokenizer.eos_token_id))
        other = time.perf_counter() - t0
        official = {}
        agreement = rank_agreement(data, ours, theirs)
    return {"items": len(data), "ours": {"seconds": mine, "forward_tokens": mine_tokens},
            "official": {"seconds": other, "forward_tokens": positions, **official}, "agreement": agreement}


def load_samples(root: Path, tasks: list[str], limit: int, seed: int, log=print) -> dict:
    """{task: (sample, full count)}: the seeded sample `evaluate --babylm --limit` takes (items per UID;
    reading: rows) and the whole task's size. A task whose data is missing is skipped with one line."""
    from lora_project.evaluation.babylm import babylm_root
    from lora_project.evaluation.babylm_tasks import load_task, task_path
    from lora_project.evaluation.minimal_pairs import sample_pairs
    from lora_project.evaluation.reading import load_reading, sample_rows

    babylm_root(root)
    out = {}
    for task in tasks:
        if task == "reading":
            path = task_path(root, task)
            if not path.is_file():
                log(f"skipped reading: no {path}")
                continue
            rows = load_reading(path, warn=log)
            out[task] = (sample_rows(rows, limit, seed), len(rows))
            continue
        items = load_task(root, task, warn=log)
        if items is None:
            log(f"skipped {task}: no folder {task_path(root, task)}")
            continue
        out[task] = (sample_pairs(items, limit, seed), len(items))
    if not out:
        raise UserError(f"no BabyLM task data in {root} to benchmark")
    return out


def babylm_speed(cfg, root: Path, *, limit: int = DEFAULT_LIMIT, tasks: str | None = None, base=None,
                 samples: dict | None = None, log=print) -> dict:
    """Ours against the official strategy on `limit` seeded items per UID of every task (reading: rows),
    one loaded fp32 model, both sides in this process; per task items, forward tokens, seconds and the
    projected full-task seconds, and the ratio of the projected full-suite totals. `samples`: what
    `load_samples` gave for these arguments, when the caller checked the data first."""
    from lora_project.evaluation.babylm_tasks import parse_tasks
    from lora_project.models.base_model import load_fp32_base
    from lora_project.models.kernels import fp32_kernel
    from lora_project.utils.device import cpu_class

    if limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if samples is None:
        samples = load_samples(Path(root), parse_tasks(tasks), limit, cfg.training.seed, log=log)
    base = load_fp32_base(cfg, base)
    model, tok = base.model.eval(), base.tokenizer
    if tok.eos_token_id is None:
        raise UserError("the official strategy pads with EOS: this tokenizer has no EOS token")
    first = next(t for t in samples if t != "reading") if set(samples) != {"reading"} else None
    if first:  # warm-up of both sides (allocator, kernels), not timed
        time_task(model, tok, first, samples[first][0][:2], base.runtime)
    per_task = {}
    for task, (data, full) in samples.items():
        log(f"  {task}: {len(data)} items ...")
        rec = time_task(model, tok, task, data, base.runtime)
        rec["full_items"] = full
        for side in ("ours", "official"):
            rec[side]["projected_full_seconds"] = rec[side]["seconds"] * full / len(data)
        rec["speedup"] = rec["official"]["seconds"] / rec["ours"]["seconds"]
        per_task[task] = rec
        log(f"    ours {rec['ours']['seconds']:.1f} s, official {rec['official']['seconds']:.1f} s "
            f"({rec['speedup']:.1f}x)")
    total = {side: sum(r[side]["projected_full_seconds"] for r in per_task.values()) for side in ("ours", "official")}
    kernel = fp32_kernel() if base.runtime.device == "cpu" else "native"
    return {"cpu": cpu_class(), "threads": base.runtime.threads, "device": base.runtime.device,
            "fp32_kernel": {"ours": kernel, "official": "native"},
            "model": base.ref.name, "babylm_dir": str(root), "limit_per_uid": limit, "seed": cfg.training.seed,
            "official_batch": OFFICIAL_BATCH, "near_tie_nats": NEAR_TIE, "tasks": per_task,
            "projected_full_seconds": total, "projected_ratio": total["official"] / total["ours"],
            "goal_ratio": 5.0, "projection": PROJECTION, "official_strategy": STRATEGY}


def babylm_markdown(b: dict) -> list[str]:
    """The BabyLM section of the benchmark report: the table, the totals and how both were made."""
    lines = ["", f"## BabyLM 2025 suite: ours (prefix tree) vs the official strategy, {b['limit_per_uid']} seeded "
                 f"items per UID (reading: rows)", "",
             f"Model {b['model']}, fp32, {b['device']}, {b['threads']} threads. CPU: {cpu_label(b['cpu'])}. "
             f"fp32 matmul kernel: ours "
             f"{b['fp32_kernel']['ours']} (as evaluate --babylm runs it), the official side PyTorch's default "
             f"(native, as the official pipeline runs it).", "",
             "| task | items (full) | forward tokens ours / official | seconds ours / official | speed-up "
             "| projected full ours / official | same decisions | near-ties |", "|---|---|---|---|---|---|---|---|"]
    for task, r in b["tasks"].items():
        a = r["agreement"]
        same = (f"max surprisal diff {a['max_abs_surprisal_difference']:.1e}" if task == "reading"
                else f"{a['identical_decisions']} of {a['items']}")
        near = "-" if task == "reading" else str(len(a["near_ties"]))
        lines.append(f"| {task} | {r['items']:,} ({r['full_items']:,}) | {r['ours']['forward_tokens']:,} / "
                     f"{r['official']['forward_tokens']:,} | {r['ours']['seconds']:.1f} / {r['official']['seconds']:.1f} "
                     f"| {r['speedup']:.1f}x | {r['ours']['projected_full_seconds'] / 60:.1f} / "
                     f"{r['official']['projected_full_seconds'] / 60:.1f} min | {same} | {near} |")
    t = b["projected_full_seconds"]
    lines += ["", f"Projected full suite: ours {t['ours'] / 60:.1f} min, official strategy {t['official'] / 60:.1f} min: "
                  f"**{b['projected_ratio']:.1f}x** (goal: at least {b['goal_ratio']:.0f}x).", "", b["projection"], "",
              b["official_strategy"]]
    reading = (b["tasks"].get("reading") or {}).get("agreement", {}).get("scores")
    if reading:
        lines.append("Reading scores ours / official: " + "; ".join(
            f"{k} {v['ours']:.4f} / {v['official']:.4f}" for k, v in reading.items()) + ".")
    for task, r in b["tasks"].items():
        for n in (r["agreement"].get("near_ties") or [])[:10]:
            lines.append(f"- near-tie, {task} {n['item']}: margin ours {n['ours_margin']:+.2e}, "
                         f"official {n['official_margin']:+.2e}")
    return lines
