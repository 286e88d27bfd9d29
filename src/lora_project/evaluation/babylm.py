"""`evaluate --babylm DIR`: the BabyLM 2025 zero-shot suite for the base and each adapter.

One base load; every task scored for every model through the prefix tree in fp32 with the
official definitions (babylm_score.py, reading.py), reported in the official units with
intervals and each adapter's paired change (babylm_report.py). Saved as
outputs/metrics/babylm_<time>.json with a plot beside it, and logged as one MLflow run.

Library use (what `benchmark --babylm` and the tests call):

    items = load_task(root, "ewok")                   # babylm_tasks: RankItem per item
    texts = item_texts(tokenizer, items)              # babylm_score: tokens + scored positions
    built = text_tree(texts)                          # the tree and its rows: once, for every model
    scores = option_scores(model, tokenizer, items, runtime, texts=built)   # per item, per option
    decided = decisions(scores)                       # official / ties-wrong decisions, margins
    plan = reading_plan(tokenizer, df)                # reading: reads and their tree, once
    pred, prev = surprisals(model, tokenizer, df, runtime, plan=plan)   # word surprisals (nats)

The token trees and the reading plan depend on the tokenizer only, which the base and its adapters
share: `evaluate_babylm` builds them once per run and every model reuses them.
"""

from __future__ import annotations

import time
from pathlib import Path

from lora_project.errors import UserError
from lora_project.evaluation.babylm_tasks import TASKS, load_task, parse_tasks, task_path
from lora_project.paths import ProjectPaths
from lora_project.utils.plotting import save_figure
from lora_project.utils.stats import DEFAULT_RESAMPLES, DEFAULT_SEED


def babylm_root(root) -> Path:
    """The --babylm folder, refused with one line when it is missing or a file."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--babylm: {root} is a file, not a folder" if root.exists()
                        else f"--babylm: no such folder: {root}")
    return root


def load_suite(root: Path, tasks: list[str], *, limit: int | None, seed: int, strict: bool, log=print,
               skipped: dict | None = None) -> dict:
    """{task: items (or the reading rows)} for each asked task whose data is there; a task whose
    folder is missing, or reading with fewer usable rows than its regressions need
    (reading.MIN_ROWS), is skipped with one line (and its reason put in `skipped`). Nothing found
    at all is an error."""
    from lora_project.evaluation.minimal_pairs import sample_pairs
    from lora_project.evaluation.reading import MIN_ROWS, load_reading, sample_rows, usable_rows

    skipped = {} if skipped is None else skipped

    def skip(task, why):
        skipped[task] = why
        log(f"skipped {task}: {why}")

    root = babylm_root(root)
    loaded = {}
    for task in tasks:
        path = task_path(root, task)
        if task == "reading":
            if not path.is_file():
                skip(task, f"no {path}")
                continue
            rows = sample_rows(load_reading(path, strict, warn=log), limit, seed)
            usable = usable_rows(rows)
            if usable < MIN_ROWS:
                skip(task, f"{usable} usable rows, fewer than the {MIN_ROWS} its regressions need "
                           f"(up to 17 coefficients each){'; raise --limit' if limit else ''}")
                continue
            loaded[task] = rows
            continue
        items = load_task(root, task, strict, warn=log)
        if items is None:
            skip(task, f"no folder {path}")
            continue
        loaded[task] = sample_pairs(items, limit, seed)
    if not loaded:
        raise UserError(f"no BabyLM task data in {root} to score (expected folders such as "
                        f"{', '.join(task_path(root, t).relative_to(root).as_posix() for t in TASKS[:3])}); "
                        + "; ".join(f"{t}: {why}" for t, why in skipped.items()))
    return loaded


def prepare_task(tokenizer, task: str, data):
    """The model-free part of scoring one task: its `TextTree` (ranking tasks) or `ReadingPlan`."""
    from lora_project.evaluation.babylm_score import item_texts, text_tree
    from lora_project.evaluation.reading import reading_plan

    return reading_plan(tokenizer, data) if task == "reading" else text_tree(item_texts(tokenizer, data))


def score_task(model, tokenizer, task: str, data, runtime, prepared, *, resamples: int, seed: int,
               progress=None) -> dict:
    """One model's record for one task (the official headline and everything around it); `prepared`:
    the task's `prepare_task` (None: built here). progress(fraction of the task done) after each batch."""
    from lora_project.evaluation.babylm_report import rank_task_report, reading_report
    from lora_project.evaluation.babylm_score import decisions, option_scores
    from lora_project.evaluation.reading import surprisals

    t0 = time.perf_counter()
    if task == "reading":
        pred, prev = surprisals(model, tokenizer, data, runtime, plan=prepared, progress=progress)
        rec = reading_report(data, pred, prev, resamples=resamples, seed=seed)
    else:
        scores = option_scores(model, tokenizer, data, runtime, texts=prepared, progress=progress)
        rec = rank_task_report(task, data, scores, decisions(scores), resamples=resamples, seed=seed)
    rec["seconds"] = time.perf_counter() - t0
    return rec


def evaluate_babylm(paths: ProjectPaths, cfg, root: Path, *, tasks: str | None = None, adapters: list[Path] = (),
                    limit: int | None = None, strict: bool = False, base=None, log=print,
                    resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED, save: bool = True,
                    progress: bool = False) -> dict:
    """The suite for the base and each adapter (one base load); saved, plotted and tracked when `save`.
    `progress`: one bar over every model and task, counted in forward tokens (drawn on a terminal only)."""
    from lora_project.evaluation.babylm_report import KNOWN_FLAWS, rank_task_change, reading_change
    from lora_project.evaluation.babylm_score import tree_positions
    from lora_project.models.adapter import checked_adapters
    from lora_project.models.base_model import load_fp32_base
    from lora_project.models.kernels import fp32_kernel
    from lora_project.models.lora_model import each_model
    from lora_project.utils.io_utils import output_dir

    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    asked = parse_tasks(tasks)
    adapters = checked_adapters(adapters)
    skipped: dict[str, str] = {}
    data = load_suite(root, asked, limit=limit, seed=cfg.training.seed, strict=strict, log=log, skipped=skipped)
    if save:
        output_dir(paths.metrics_dir)  # checked before any loading or scoring
    base = load_fp32_base(cfg, base)
    tok = base.tokenizer
    t0 = time.perf_counter()
    prepared = {t: prepare_task(tok, t, d) for t, d in data.items()}  # once, for every model
    prepare_seconds = time.perf_counter() - t0
    models: dict[str, dict] = {}
    bar = SuiteBar(prepared, 1 + len(adapters), log) if progress else None
    t0 = time.perf_counter()
    try:
        for label, model in each_model(base, adapters):
            models[label] = {"tasks": {}}
            for task, d in data.items():
                step = bar.task(label, task) if bar is not None else None
                rec = score_task(model, tok, task, d, base.runtime, prepared[task], resamples=resamples, seed=seed,
                                 progress=step)
                models[label]["tasks"][task] = rec
                (bar.write if bar is not None else log)(f"{label}: {task} {_headline_text(rec)} "
                                                        f"({rec['seconds']:.0f} s)")
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    difference = {}
    for a in adapters:
        difference[a.name] = {}
        for task, d in data.items():
            b, m = models["base"]["tasks"][task], models[a.name]["tasks"][task]
            difference[a.name][task] = (reading_change(d, b, m, resamples=resamples, seed=seed) if task == "reading"
                                        else rank_task_change(task, d, b, m, resamples=resamples, seed=seed))
    result = {"babylm_dir": str(root), "tasks": list(data), "skipped": [t for t in asked if t not in data],
              "skip_reasons": skipped, "known_flaws": list(KNOWN_FLAWS),
              "items": {t: len(d) for t, d in data.items()}, "limit_per_uid": limit, "seed": cfg.training.seed,
              "base_model": base.ref.name, "bos": tok.bos_token if tok.bos_token_id is not None else None,
              "scoring": {"decisions": "fp32", "tree": "prefix tree over every option of a task",
                          "fp32_kernel": fp32_kernel() if base.runtime.device == "cpu" else "native",
                          "forward_tokens": {t: tree_positions(p) for t, p in prepared.items()
                                             if t != "reading"}},
              "bootstrap": {"resamples": resamples, "seed": seed, "level": 0.95},
              "prepare_seconds": prepare_seconds, "seconds": seconds, "models": models, "difference": difference}
    if save:
        _save(paths, cfg, result, log)
    return result


def task_work(prepared) -> int:
    """Forward positions one model's pass over a prepared task runs (its tree's, or the reading plan's)."""
    return (prepared.tree if hasattr(prepared, "plans") else prepared).forward_tokens


class SuiteBar:
    """One progress bar over the whole suite (every model, every task) in forward tokens, so its ETA
    holds across tasks of very different sizes; `task(label, name)` gives the callback for one task's
    pass (fraction done), and `write` prints a line above the bar. Drawn on a terminal only."""

    def __init__(self, prepared: dict, models: int, log=print):
        from tqdm.auto import tqdm

        self.log = log
        self.work = {t: max(1, task_work(p)) for t, p in prepared.items()}
        self.done = 0
        self.bar = tqdm(total=models * sum(self.work.values()), unit="tok", unit_scale=True, desc="BabyLM suite",
                        disable=None, dynamic_ncols=True, smoothing=0.05)

    def task(self, label: str, name: str):
        start, size = self.done, self.work[name]
        self.done += size
        self.bar.n = start
        self.bar.set_description(f"{label}: {name}")

        def step(fraction: float) -> None:
            self.bar.n = start + round(fraction * size)
            self.bar.refresh()

        return step

    def write(self, line: str) -> None:
        """The line above the bar, or through `log` when no bar is drawn."""
        if self.bar.disable:
            self.log(line)
        else:
            import sys

            self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def _headline_text(rec: dict) -> str:
    h = rec["headline"]
    if isinstance(h, dict):
        return ", ".join(f"{k} {v:.2f}" for k, v in h.items())
    return f"{h:.2f}%"


def _save(paths: ProjectPaths, cfg, result: dict, log) -> None:
    """JSON + plot under outputs/metrics/, and one MLflow run with the headlines and both files."""
    from lora_project.evaluation.babylm_table import change_figure
    from lora_project.utils.io_utils import write_new_json

    saved = write_new_json(paths.metrics_dir, "babylm", result)
    result["saved"] = str(saved)
    fig = change_figure(result)
    plot = saved.with_suffix(".png")
    save_figure(fig, plot, dpi=110, bbox_inches="tight")
    result["plot"] = str(plot)
    if cfg.tracking.mlflow:
        result["mlflow_run_id"] = _track(paths, cfg, result, [saved, plot])


def _track(paths: ProjectPaths, cfg, result: dict, files) -> str | None:
    from lora_project.utils.mlflow_utils import MlflowTracker

    tracker = MlflowTracker(paths, "babylm", cfg.tracking.tracking_uri)
    run_id = tracker.start("babylm", {"babylm_dir": result["babylm_dir"], "tasks": ",".join(result["tasks"]),
                                      "limit_per_uid": result["limit_per_uid"], "seed": result["seed"],
                                      "base_model": result["base_model"], "models": ",".join(result["models"])},
                           {"kind": "evaluation"})
    metrics = {}
    for name, m in result["models"].items():
        for task, rec in m["tasks"].items():
            h = rec["headline"]
            for k, v in (h.items() if isinstance(h, dict) else [("headline", h)]):
                metrics[f"{name}.{task}.{k}"] = v
            if "headline_ties_wrong" in rec:
                metrics[f"{name}.{task}.headline_ties_wrong"] = rec["headline_ties_wrong"]
    tracker.log_metrics(metrics, step=0)
    for f in files:
        tracker.log_artifact(Path(f))
    tracker.end("FINISHED")
    return run_id
