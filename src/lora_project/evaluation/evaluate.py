"""`evaluate`: perplexity and bits per byte of the base and adapters, side by side.

The base model is loaded once; adapters are attached with PEFT's adapter switching and the
base is scored with adapters disabled, so N adapters cost one model load.
"""

from __future__ import annotations

import time
from pathlib import Path

from lora_project.errors import UserError
from lora_project.models.adapter import checked_adapters, read_metadata
from lora_project.paths import ProjectPaths


def log_to_adapter_runs(paths: ProjectPaths, cfg, adapter_dirs: list[Path], metrics: dict[str, dict]) -> list[str]:
    """Add evaluation metrics (keyed by adapter folder name) to each adapter's own training run."""
    from lora_project.utils.mlflow_utils import log_to_runs

    if not cfg.tracking.mlflow:
        return []
    by_run = {}
    for d in adapter_dirs:
        run_id = read_metadata(d).mlflow_run_id
        if run_id and metrics.get(d.name):
            by_run[run_id] = metrics[d.name]
    return log_to_runs(paths, cfg.tracking.tracking_uri, by_run)


def evaluate_perplexity(paths: ProjectPaths, cfg, *, text_file: Path | None = None,
                        dataset: str | None = None, split: str = "test", adapters: list[Path] = (),
                        max_length: int = 1024, stride: int | None = None, base=None) -> dict:
    """Perplexity and bits per byte of the base and each adapter on a text file or a dataset split."""
    from lora_project.data.preprocessor import read_split, read_text_file
    from lora_project.models.base_model import load_base
    from lora_project.models.lora_model import each_model
    from lora_project.models.scoring import score_documents, score_text, windows

    if (text_file is None) == (dataset is None):
        raise UserError("give exactly one of --text FILE or --dataset NAME")
    stride = max(1, max_length // 2) if stride is None else stride
    windows(2, max_length, stride)  # validates max_length/stride before any loading
    adapters = checked_adapters(adapters)
    if text_file is not None:
        text = read_text_file(Path(text_file))
        if not text.strip():
            raise UserError(f"{text_file}: empty file, nothing to score")
        target = {"text": str(text_file)}
    else:
        from lora_project.data.catalog import get_entry, load_catalog

        get_entry(load_catalog(paths.catalog), dataset)
        folder = paths.processed(dataset)
        docs = read_split(folder, split)
        if not docs:
            raise UserError(f"dataset '{dataset}' has an empty {split} split")
        import json

        separator = json.loads((folder / "stats.json").read_text()).get("separator", "\n")
        target = {"dataset": dataset, "split": split}
    base = base or load_base(cfg)

    def score(model):
        if text_file is not None:
            return score_text(model, base.tokenizer, text, base.runtime, max_length, stride)
        return score_documents(model, base.tokenizer, docs, separator, base.runtime, max_length, stride)

    t0 = time.perf_counter()
    results = {label: score(model).to_dict() for label, model in each_model(base, adapters)}
    elapsed = time.perf_counter() - t0
    out = {**target, "max_length": max_length, "stride": stride, "precision": base.runtime.precision,
           "base_model": base.ref.name, "seconds": elapsed, "models": results}
    if dataset is not None and adapters:  # named evaluations are worth keeping with each training run
        key = f"eval_{dataset}_{split}"
        out["mlflow_runs_updated"] = log_to_adapter_runs(
            paths, cfg, adapters, {a.name: {f"{key}_perplexity": results[a.name]["perplexity"],
                                            f"{key}_bits_per_byte": results[a.name]["bits_per_byte"]}
                                   for a in adapters})
    return out


def evaluate_minimal_pairs(paths: ProjectPaths, cfg, pairs_path: Path | list[Path], *, adapters: list[Path] = (),
                           limit: int | None = None, strict: bool = False, base=None, first_pass: str = "auto",
                           progress: bool = False, log=print) -> dict:
    """Minimal-pair accuracy of the base and each adapter (one base load), saved to outputs/metrics/.

    `pairs_path` is one file or folder, or several (e.g. BLiMP and the BabyLM supplement), each
    reported as its own suite. Decisions equal fp32 scoring whatever the first pass: pairs whose
    first-pass difference lies within the precision's error margin are scored again in fp32.
    """
    import dataclasses
    from datetime import datetime, timezone

    from lora_project.evaluation.minimal_pairs import (
        MARGINS,
        evaluate_pairs,
        load_pairs,
        prefix_sharing,
        resolve_first_pass,
        sample_pairs,
        tokenize_pairs,
    )
    from lora_project.models.base_model import load_base
    from lora_project.models.lora_model import each_model
    from lora_project.utils.device import resolve_runtime
    from lora_project.utils.io_utils import atomic_write_json

    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    sources = [Path(p) for p in pairs_path] if isinstance(pairs_path, (list, tuple)) else [Path(pairs_path)]
    adapters = checked_adapters(adapters)
    names = [a.name for a in adapters]
    pairs, owner = [], {}
    for src in sources:
        for p in sample_pairs(load_pairs(src, strict, warn=log), limit, cfg.training.seed):
            if owner.setdefault(p.uid, src) != src:
                raise UserError(f"paradigm '{p.uid}' is in both {owner[p.uid]} and {src}; give each suite once")
            pairs.append(p)
    t = cfg.training
    runtime = resolve_runtime(t.device, t.precision, t.threads)
    path = resolve_first_pass(first_pass, runtime)
    # The fp32 re-check needs fp32 weights: a bf16 first pass is autocast over them.
    base = base if base is not None and base.runtime.precision == "fp32" else \
        load_base(cfg, dataclasses.replace(runtime, precision="fp32"))
    tokens = tokenize_pairs(base.tokenizer, pairs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        # disable=None: drawn on a terminal only, so logs and pipes stay clean.
        bar = tqdm(total=len(pairs) * (1 + len(adapters)), unit="pair", desc="minimal pairs", disable=None,
                   dynamic_ncols=True, smoothing=0.1)
    t0 = time.perf_counter()
    try:
        models = {label: evaluate_pairs(model, base.tokenizer, pairs, base.runtime, path, tokens=tokens,
                                        progress=bar.update if bar is not None else None)
                  for label, model in each_model(base, adapters)}
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    b = models["base"]
    difference = {n: {"macro_accuracy": models[n]["macro_accuracy"] - b["macro_accuracy"],
                      "suites": {s: models[n]["suites"][s]["macro_accuracy"] - v["macro_accuracy"]
                                 for s, v in b["suites"].items()},
                      "paradigms": {u: models[n]["paradigms"][u]["accuracy"] - v["accuracy"]
                                    for u, v in b["paradigms"].items()}} for n in names}
    scoring = {"first_pass": path, "decisions": "fp32", "margin_nats": list(MARGINS[path]),
               "rescored": {n: m["rescored"] for n, m in models.items()}, **prefix_sharing(tokens)}
    result = {"pairs_path": str(sources[0]) if len(sources) == 1 else [str(s) for s in sources],
              "suites": list(dict.fromkeys(p.suite for p in pairs)), "pairs": len(pairs),
              "limit_per_paradigm": limit, "seed": cfg.training.seed, "precision": path, "scoring": scoring,
              "base_model": base.ref.name, "seconds": seconds,
              "pairs_per_second": len(pairs) * len(models) / seconds if seconds else None,
              "models": models, "difference": difference}
    result["mlflow_runs_updated"] = log_to_adapter_runs(
        paths, cfg, adapters, {n: {"pairs_macro_accuracy": models[n]["macro_accuracy"],
                                   "pairs_macro_accuracy_gain": difference[n]["macro_accuracy"]} for n in names})
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    out = paths.metrics_dir / f"minimal_pairs_{stamp}.json"
    atomic_write_json(out, result)
    result["saved"] = str(out)
    return result
