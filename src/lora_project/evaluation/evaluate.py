"""`evaluate`: perplexity and bits per byte of the base and adapters, side by side.

The base model is loaded once; adapters are attached with PEFT's adapter switching and the
base is scored with adapters disabled, so N adapters cost one model load.
"""

from __future__ import annotations

import time
from pathlib import Path

from lora_project.errors import UserError
from lora_project.models.adapter import checked_adapters, read_metadata
from lora_project.models.kernels import fp32_kernel
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
                        max_length: int | None = None, stride: int | None = None, max_tokens: int = 0, base=None,
                        resamples: int | None = None, seed: int | None = None) -> dict:
    """Perplexity and bits per byte of the base and each adapter on a text file or a dataset split.

    A split is scored whole unless `max_tokens` caps it (`models.scoring.score_split`, the scoring
    training's validation numbers use too); the result says what was scored (`scope`). For a split,
    each model gets bootstrap 95% intervals over documents and each adapter its paired bootstrap
    difference from the base (`difference`); a text file is one document, so it gets none. Scored in
    fp32 on every machine (`load_fp32_base`): a given `base` in bf16 is not used.
    """
    from lora_project.data.preprocessor import read_split, read_text_file, split_separator
    from lora_project.models.base_model import load_fp32_base
    from lora_project.models.lora_model import each_model
    from lora_project.models.scoring import (
        DEFAULT_MAX_LENGTH,
        default_stride,
        default_window,
        score_split,
        score_text,
        tokenize_split,
        windows,
    )
    from lora_project.utils.stats import (
        DEFAULT_RESAMPLES,
        DEFAULT_SEED,
        paired_document_difference,
    )

    if (text_file is None) == (dataset is None):
        raise UserError("give exactly one of --text FILE or --dataset NAME")
    if max_tokens < 0 or (max_tokens and text_file is not None):
        raise UserError("--max-tokens must be a positive number of tokens, and only with --dataset")
    asked = max_length or DEFAULT_MAX_LENGTH  # None: the one definition's window (see default_window)
    windows(2, asked, default_stride(asked) if stride is None else stride)  # checked before any loading
    resamples = DEFAULT_RESAMPLES if resamples is None else resamples
    seed = DEFAULT_SEED if seed is None else seed
    adapters = checked_adapters(adapters)
    if text_file is not None:
        text = read_text_file(Path(text_file), encoding_option=False)  # evaluate has no --encoding
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
        separator = split_separator(folder)
        target = {"dataset": dataset, "split": split}
    base = load_fp32_base(cfg, base)  # evaluation's numbers are fp32 on every machine
    max_length = default_window(base.model) if max_length is None else max_length
    stride = default_stride(max_length) if stride is None else stride
    windows(2, max_length, stride)
    if text_file is None:
        split_tokens = tokenize_split(base.tokenizer, docs, separator, max_tokens)

    def score(model):
        if text_file is not None:
            return score_text(model, base.tokenizer, text, base.runtime, max_length, stride)
        return score_split(model, base.tokenizer, split_tokens, separator, base.runtime, max_length=max_length,
                           stride=stride)

    t0 = time.perf_counter()
    scores = {label: score(model) for label, model in each_model(base, adapters)}
    elapsed = time.perf_counter() - t0
    results = {label: {**s.to_dict(), **s.intervals(resamples, seed)} for label, s in scores.items()}
    b = scores["base"]
    difference = {}
    for a in adapters:
        s = scores[a.name]
        if text_file is None:
            d = paired_document_difference(b.doc_nll, s.doc_nll, b.doc_tokens, b.doc_bytes,
                                           resamples=resamples, seed=seed)
        else:
            d = {"perplexity": s.perplexity - b.perplexity, "bits_per_byte": s.bits_per_byte - b.bits_per_byte,
                 "perplexity_ci": None, "bits_per_byte_ci": None, "p_value": None}
        difference[a.name] = {**d, "perplexity_relative": s.perplexity / b.perplexity - 1}
    out = {**target, "max_length": max_length, "stride": stride, "precision": base.runtime.precision,
           "fp32_kernel": fp32_kernel() if base.runtime.device == "cpu" else "native",
           "base_model": base.ref.name, "seconds": elapsed, "scope": b.scope(),
           "bootstrap": {"unit": "document", "resamples": resamples, "seed": seed, "level": 0.95}
           if text_file is None else None,
           "models": results, "difference": difference,
           "across_seeds": seeds_summary(results, ("perplexity", "bits_per_byte"))}
    if dataset is not None and adapters:  # named evaluations are worth keeping with each training run
        key = f"eval_{dataset}_{split}"
        out["mlflow_runs_updated"] = log_to_adapter_runs(
            paths, cfg, adapters, {a.name: {f"{key}_perplexity": results[a.name]["perplexity"],
                                            f"{key}_bits_per_byte": results[a.name]["bits_per_byte"]}
                                   for a in adapters})
    return out


def perplexity_table(res: dict) -> str:
    """The console table of `evaluate --text/--dataset`: what was scored, then per model perplexity
    and bits per byte with their 95% intervals and the change against the base (paired interval)."""
    from lora_project.models.scoring import describe_scope

    where = res.get("text") or f"{res['dataset']} {res['split']} split"
    kernel = f" ({res['fp32_kernel']} kernel)" if res.get("fp32_kernel") else ""
    lines = [f"{where}: {describe_scope(res['scope'])}; windows {res['max_length']}/{res['stride']}; "
             f"{res.get('precision', 'fp32')}{kernel}"
             + ("; 95% intervals: bootstrap over documents" if res.get("bootstrap") else "")]

    def ci(v, fmt):
        return f"[{v[0]:{fmt}}, {v[1]:{fmt}}]" if v else ""

    lines.append(f"{'model':<32} {'perplexity':>11} {'95% CI':>17} {'bits/byte':>10} {'95% CI':>17} "
                 f"{'vs base':>8} {'change in bits/byte (95% CI)':>32}")
    for name, m in res["models"].items():
        d = res.get("difference", {}).get(name)
        rel = f"{100 * d['perplexity_relative']:+.1f}%" if d else ""
        change = f"{d['bits_per_byte']:+.4f} {ci(d['bits_per_byte_ci'], '+.4f')}" if d else ""
        lines.append(f"{name:<32} {m['perplexity']:>11.3f} {ci(m.get('perplexity_ci'), '.2f'):>17} "
                     f"{m['bits_per_byte']:>10.4f} {ci(m.get('bits_per_byte_ci'), '.4f'):>17} {rel:>8} {change:>32}")
    for stem, g in (res.get("across_seeds") or {}).items():
        p, b = g["perplexity"], g["bits_per_byte"]
        lines.append(f"{stem + ' (seeds ' + ','.join(map(str, p['seeds'])) + ')':<32} {p['mean']:>11.3f} "
                     f"{'sd ' + format(p['sd'], '.3f'):>17} {b['mean']:>10.4f} {'sd ' + format(b['sd'], '.4f'):>17}"
                     f"   mean and sd across {p['n']} seeds")
    return "\n".join(lines)


def seeds_summary(per_model: dict[str, dict], keys) -> dict:
    """{stem: {key: {mean, sd, n, seeds, members}}} over adapters named <stem>_s<seed> (train --seeds):
    the run-to-run spread beside each seed's own interval."""
    from lora_project.utils.seeding import mean_sd_across_seeds

    out: dict[str, dict] = {}
    for key in keys:
        for stem, g in mean_sd_across_seeds({m: v.get(key) for m, v in per_model.items()}).items():
            out.setdefault(stem, {})[key] = g
    return out


def evaluate_minimal_pairs(paths: ProjectPaths, cfg, pairs_path: Path | list[Path], *, adapters: list[Path] = (),
                           limit: int | None = None, strict: bool = False, base=None, first_pass: str = "auto",
                           progress: bool = False, log=print, scorer=None) -> dict:
    """Minimal-pair accuracy of the base and each adapter (one base load), saved to outputs/metrics/.

    `scorer(pairs, path, adapters, runtime)`, when given, scores instead of this process (the Ray
    cluster's shards): it returns {label: (good sums, bad sums, re-scored count)} for "base" and each
    adapter's folder name, and everything else (reports, changes, files) is as here.

    Each paradigm, field and term has a Wilson 95% interval, each macro average its standard error;
    each adapter's `difference` has `paired`: the change against the base on the same pairs (macro
    with a paired standard error, per field and paradigm with an exact McNemar p-value).

    `pairs_path` is one file or folder, or several (e.g. BLiMP and the BabyLM supplement), each
    reported as its own suite. With the fp32 first pass (auto's) decisions are fp32 scoring's; after a
    bf16 first pass, pairs whose difference lies within bf16's measured error margin are scored again
    in fp32, which covers bf16's error only as far as that margin was measured (minimal_pairs.MARGINS).
    """
    from lora_project.evaluation.minimal_pairs import (
        MARGINS,
        accuracy_report,
        evaluate_pairs,
        load_pairs,
        prefix_sharing,
        resolve_first_pass,
        sample_pairs,
    )
    from lora_project.evaluation.pair_tokens import tokenize_pairs
    from lora_project.evaluation.pair_report import paired_change
    from lora_project.models.base_model import load_fp32_base
    from lora_project.models.lora_model import each_model
    from lora_project.utils.device import resolve_runtime
    from lora_project.utils.io_utils import output_dir, write_new_json

    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    sources = [Path(p) for p in pairs_path] if isinstance(pairs_path, (list, tuple)) else [Path(pairs_path)]
    seen: dict[Path, Path] = {}
    named: dict[str, Path] = {}  # a suite is named after its file or folder (stem)
    for src in sources:  # the same file or folder twice would count its pairs twice
        first = seen.setdefault(src.resolve(), src)
        if first is not src:
            raise UserError(f"--pairs {src} is the same file or folder as --pairs {first}; give each suite once")
        suite = src.stem if src.is_file() else src.name
        other = named.setdefault(suite, src)
        if other is not src:
            raise UserError(f"--pairs {src} and --pairs {other} would both be reported as suite '{suite}'; "
                            "rename one of them")
    adapters = checked_adapters(adapters)
    names = [a.name for a in adapters]
    pairs, owner = [], {}
    for src in sources:
        for p in sample_pairs(load_pairs(src, strict, warn=log), limit, cfg.training.seed):
            if owner.setdefault(p.uid, src) != src:
                raise UserError(f"paradigm '{p.uid}' is in both {owner[p.uid]} and {src}; give each suite once")
            pairs.append(p)
    output_dir(paths.metrics_dir)  # where the results go, checked before any loading or scoring
    t = cfg.training
    runtime = resolve_runtime(t.device, t.precision, t.threads, t.malloc_reuse)
    path = resolve_first_pass(first_pass, runtime)
    # The fp32 re-check needs fp32 weights: a bf16 first pass is autocast over them.
    base = load_fp32_base(cfg, base)
    tokens = tokenize_pairs(base.tokenizer, pairs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        # disable=None: drawn on a terminal only, so logs and pipes stay clean.
        bar = tqdm(total=len(pairs) * (1 + len(adapters)), unit="pair", desc="minimal pairs", disable=None,
                   dynamic_ncols=True, smoothing=0.1)
    t0 = time.perf_counter()
    try:
        if scorer is not None:
            models = {label: {**accuracy_report(pairs, good, bad), "first_pass": path, "rescored": redone}
                      for label, (good, bad, redone) in scorer(pairs, path, adapters, base.runtime).items()}
        else:
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
                                    for u, v in b["paradigms"].items()},
                      "paired": paired_change(pairs, b["decisions"], models[n]["decisions"])} for n in names}
    scoring = {"first_pass": path, "decisions": "fp32" if path == "fp32" else f"fp32 within the {path} margin",
               "margin_nats": list(MARGINS[path]),
               "fp32_kernel": fp32_kernel() if runtime.device == "cpu" else "native",
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
    result["saved"] = str(write_new_json(paths.metrics_dir, "minimal_pairs", result))
    return result
