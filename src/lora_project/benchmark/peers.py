"""Ours against lm-evaluation-harness on the same minimal pairs (`benchmark --blimp`): pairs/s, projected
full-folder time, decision agreement under lm-eval's BLiMP definition and under BabyLM's.

Both sides are timed from model load to decisions (imports not counted). Ours runs twice, before and
after lm-eval, each time loading the model again, and its time is the mean of the two (the machine's
load changes over the minutes lm-eval takes). Decisions follow BabyLM's rule on both sides: the
grammatical sentence wins when its sum is at least the other's (a tie counts as correct, as the
official code's first-option argmax and lm-eval's argmax both do). The projection to the whole folder
keeps each side's fixed cost (model load, lm-eval's task building) and scales the scoring time by the
forward tokens each side would compute for the whole folder against the sample: lm-eval runs one
row per sentence, ours the prefix tree.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from lora_project.benchmark.lm_eval_peer import BATCH_SIZE, DEFINITIONS, PIN, lm_eval_version, run_lm_eval, write_tasks
from lora_project.errors import UserError

RUN_ORDER = ("babylm", "lm_eval")  # the definitions lm-eval runs, BabyLM's (ours) first
ALL_DEFINITIONS = ",".join(RUN_ORDER)  # --peer-definitions' default
NEAR_TIE = 1e-4  # nats: |good - bad| below this on either side is listed, as floats may order it either way


def _ours(cfg, runtime, pairs, tokens) -> dict:
    from lora_project.evaluation.minimal_pairs import score_pairs
    from lora_project.models.base_model import load_base

    t0, c0 = time.perf_counter(), time.process_time()
    base = load_base(cfg, runtime)
    t1 = time.perf_counter()
    scores = score_pairs(base.model, base.tokenizer, pairs, runtime, "fp32", tokens=tokens)
    t2 = time.perf_counter()
    return {"load_seconds": t1 - t0, "score_seconds": t2 - t1, "cpu_seconds": time.process_time() - c0,
            "good": scores.good, "bad": scores.bad, "model_dir": base.ref.directory, "tokenizer": base.tokenizer}


def _load() -> list[float] | None:
    import os

    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _macro(pairs, correct) -> float:
    by: dict[str, list[bool]] = {}
    for p, c in zip(pairs, correct):
        by.setdefault(p.uid, []).append(c)
    return sum(sum(v) / len(v) for v in by.values()) / len(by)


def agreement(pairs, ours: tuple[list, list], theirs: tuple[list, list]) -> dict:
    """Decision agreement (BabyLM's rule: good >= bad wins) between two scorings of the same pairs, the
    disagreements and the near-ties (|margin| < NEAR_TIE on either side) by pair, each side's macro, and
    the largest difference between the two sides' margins (good - bad: ours sums the continuations
    after the shared prefix, lm-eval whole sentences; the prefix cancels in the margin)."""
    og, ob = ours
    tg, tb = theirs
    mine = [g >= b for g, b in zip(og, ob)]
    other = [g >= b for g, b in zip(tg, tb)]
    differ = [i for i, (a, b) in enumerate(zip(mine, other)) if a != b]
    near = [i for i in range(len(pairs)) if min(abs(og[i] - ob[i]), abs(tg[i] - tb[i])) < NEAR_TIE]
    show = [{"pair": i, "uid": pairs[i].uid, "ours_margin": og[i] - ob[i], "lm_eval_margin": tg[i] - tb[i]}
            for i in differ[:20]]
    return {"pairs": len(pairs), "identical_decisions": len(pairs) - len(differ), "differing": len(differ),
            "differing_outside_near_ties": len(set(differ) - set(near)), "near_ties": len(near),
            "examples": show, "macro_ours": _macro(pairs, mine), "macro_lm_eval": _macro(pairs, other),
            "max_abs_margin_difference": max((abs((og[i] - ob[i]) - (tg[i] - tb[i])) for i in range(len(pairs))),
                                             default=0.0)}


def parse_definitions(text: str) -> tuple[str, ...]:
    """`--peer-definitions`: a comma-separated subset of DEFINITIONS, in the order lm-eval runs them
    (BabyLM's first), each once."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    unknown = [n for n in names if n not in DEFINITIONS]
    if unknown or not names:
        raise UserError(f"--peer-definitions: {'unknown ' + repr(unknown[0]) if unknown else 'empty'}; "
                        f"give a comma-separated subset of {', '.join(sorted(DEFINITIONS))}")
    return tuple(d for d in RUN_ORDER if d in names)


def compare_with_lm_eval(cfg, pairs_dir: Path, *, per_paradigm: int = 60, work: Path | None = None,
                         definitions: tuple[str, ...] = RUN_ORDER, log=print) -> dict:
    """Ours vs lm-eval on a seeded sample of `per_paradigm` pairs per paradigm (0: every pair) of a
    BLiMP-style folder, lm-eval once per definition in `definitions`. Without the extra,
    {"available": False, "note": ...}."""
    from lora_project.evaluation.minimal_pairs import load_pairs, prefix_sharing, sample_pairs, tokenize_pairs
    from lora_project.utils.device import cpu_class, resolve_runtime

    version = lm_eval_version()
    if version is None:
        note = (f"lm-evaluation-harness is not installed, so it was not measured: install the extra with "
                f"pip install -e '.[peers]' ({PIN})")
        log(f"  {note}")
        return {"available": False, "note": note}
    t = cfg.training
    runtime = resolve_runtime(t.device, "fp32", t.threads, t.malloc_reuse)
    everything = load_pairs(Path(pairs_dir), warn=lambda m: None)
    pairs = sample_pairs(everything, per_paradigm or None, t.seed)
    log(f"  ours (prefix tree, fp32) on {len(pairs)} pairs ...")
    first = _ours(cfg, runtime, pairs, None)
    tokenizer = first.pop("tokenizer")
    tokens = tokenize_pairs(tokenizer, pairs)
    sample_share = prefix_sharing(tokens)
    whole = len(pairs) == len(everything)
    full_share = sample_share if whole else prefix_sharing(tokenize_pairs(tokenizer, everything))
    sides: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="lm_eval_tasks_", dir=work) as tmp:
        folder = Path(tmp)
        tasks = write_tasks(pairs, folder)
        for definition in definitions:
            log(f"  lm-evaluation-harness {version}, {definition} definition "
                f"(target_delimiter {DEFINITIONS[definition]!r}), batch {BATCH_SIZE} ...")
            sides[definition] = run_lm_eval(first["model_dir"], folder, definition, tasks[definition], len(pairs),
                                            runtime.threads, runtime.device)
            log(f"    {sides[definition]['seconds']:.1f} s")
    log("  ours again ...")
    second = _ours(cfg, runtime, pairs, tokens)
    ours_seconds = (first["load_seconds"] + first["score_seconds"] + second["load_seconds"]
                    + second["score_seconds"]) / 2
    ours_cpu = (first["cpu_seconds"] + second["cpu_seconds"]) / 2
    ours_load = (first["load_seconds"] + second["load_seconds"]) / 2
    tree_scale = full_share["forward_tokens_tree"] / sample_share["forward_tokens_tree"]
    plain_scale = full_share["forward_tokens_plain"] / sample_share["forward_tokens_plain"]
    ours_full = ours_load + (ours_seconds - ours_load) * tree_scale
    definitions = {}
    for definition, side in sides.items():
        fixed = side["seconds"] - side["loglikelihood_seconds"]
        full = fixed + side["loglikelihood_seconds"] * plain_scale
        definitions[definition] = {
            "target_delimiter": DEFINITIONS[definition], "seconds": side["seconds"],
            "loglikelihood_seconds": side["loglikelihood_seconds"], "pairs_per_second": len(pairs) / side["seconds"],
            "projected_full_seconds": full, "speedup_ours": side["seconds"] / ours_seconds,
            "cpu_seconds": side["cpu_seconds"], "cpu_speedup_ours": side["cpu_seconds"] / ours_cpu,
            "projected_full_speedup_ours": full / ours_full,
            **agreement(pairs, (first["good"], first["bad"]), (side["good"], side["bad"]))}
    repeat = agreement(pairs, (first["good"], first["bad"]), (second["good"], second["bad"]))
    return {"available": True, "lm_eval_version": version, "load_average": _load(), "cpu": cpu_class(),
            "threads": runtime.threads,
            "pairs_dir": str(pairs_dir), "per_paradigm": per_paradigm, "sample_pairs": len(pairs),
            "full_pairs": len(everything), "batch_size": BATCH_SIZE,
            "ours": {"seconds": ours_seconds, "runs_seconds": [first["load_seconds"] + first["score_seconds"],
                                                                 second["load_seconds"] + second["score_seconds"]],
                     "load_seconds": ours_load, "cpu_seconds": ours_cpu,
                     "pairs_per_second": len(pairs) / ours_seconds,
                     "projected_full_seconds": ours_full, "repeat_identical": repeat["differing"] == 0},
            "forward_tokens": {"sample_plain": sample_share["forward_tokens_plain"],
                               "sample_tree": sample_share["forward_tokens_tree"],
                               "full_plain": full_share["forward_tokens_plain"],
                               "full_tree": full_share["forward_tokens_tree"]},
            "definitions": definitions}


def peers_markdown(c: dict) -> list[str]:
    """The ours-vs-lm-eval section of the benchmark report."""
    lines = ["", "## Ours vs lm-evaluation-harness on the same pairs"]
    if not c.get("available"):
        return lines + ["", c["note"]]
    cpu = c["cpu"]
    o = c["ours"]
    scope = "every pair" if c["sample_pairs"] == c["full_pairs"] else \
        f"{c['per_paradigm']} seeded pairs per paradigm"
    lines += ["", f"{c['sample_pairs']:,} pairs ({scope}) of {c['pairs_dir']}; CPU: {cpu['model']} ({cpu['isa']}), "
                  f"{c['threads']} threads. lm-evaluation-harness {c['lm_eval_version']}: its `hf` model, fp32, "
                  f"batch {c['batch_size']}, one task per paradigm written for the local files, in its own process; "
                  f"ours: the prefix tree, fp32. Each side timed from model load to decisions; ours is the mean of "
                  f"a run before and one after lm-eval. The whole folder ({c['full_pairs']:,} pairs) is projected "
                  f"from the fixed cost plus the scoring time scaled by each side's forward tokens "
                  f"(per sentence {c['forward_tokens']['full_plain']:,}, prefix tree "
                  f"{c['forward_tokens']['full_tree']:,}). Load average at the end: {c.get('load_average')}; "
                  f"on a busy machine the CPU-seconds ratio is the steadier one.",
              "", "| definition | lm-eval pairs/s | ours pairs/s | ours vs lm-eval (wall) | (CPU seconds) "
                  "| projected whole folder: lm-eval / ours | identical decisions | near-ties | macro lm-eval / ours |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, d in c["definitions"].items():
        label = "BabyLM's (no delimiter)" if name == "babylm" else "lm-eval's BLiMP (target_delimiter ' ')"
        lines.append(f"| {label} | {d['pairs_per_second']:.1f} | {o['pairs_per_second']:.1f} | "
                     f"{d['speedup_ours']:.2f}x | {d['cpu_speedup_ours']:.2f}x | {d['projected_full_seconds'] / 60:.1f} / "
                     f"{o['projected_full_seconds'] / 60:.1f} min "
                     f"({d['projected_full_speedup_ours']:.2f}x) | {d['identical_decisions']:,} of {d['pairs']:,} "
                     f"| {d['near_ties']} | {d['macro_lm_eval']:.4f} / {d['macro_ours']:.4f} |")
    return lines
