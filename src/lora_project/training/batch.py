"""`train-batch`: one adapter per catalog dataset, sequentially, with the base loaded once.

* Per-dataset overrides come from a YAML file (``--batch-config``, default
  ``config/batch_config.yaml`` when present)::

      datasets:
        kids:
          training: {max_steps: 300, lr: 1.0e-3}

  merged over the normal config (and ``--set``) and validated per dataset.
* One MLflow parent run; each adapter's run is its child (tag ``mlflow.parentRunId``).
* An adapter whose metadata already records the same resolved config, base model and data
  fingerprints is skipped unless ``--overwrite``.
* ``seeds`` trains one adapter per dataset and seed; ``name_template`` (e.g.
  ``{dataset}_r{r}_s{seed}``) names the adapters (training/seeds.py).
* ``--resume`` (``options.resume``): an adapter interrupted mid-training continues from its newest
  checkpoint in its experiment folder and MLflow run, as ``train --resume`` does (the same adapter as
  an uninterrupted run); one without a checkpoint trains from step 0.
* A failing dataset is recorded with its reason and the others go on; the summary table is
  printed and saved to ``outputs/metrics/train_batch_<timestamp>.{json,md}``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from lora_project.config import (
    RunConfig,
    build_config,
    merge_sources,
    read_yaml,
    recipe_fields,
)
from lora_project.errors import RunInterrupted, UserError
from lora_project.paths import ProjectPaths
from lora_project.training.options import RunOptions
from lora_project.utils.interrupts import check_stop
from lora_project.utils.io_utils import atomic_write_text, output_dir, write_new_json


def load_batch_overrides(path: Path | None, names: list[str]) -> dict[str, dict]:
    """Per-dataset overrides from a batch YAML file (dataset name -> {section.key: value})."""
    if path is None:
        return {}
    data = read_yaml(path)
    unknown = set(data) - {"datasets"}
    if unknown:
        raise UserError(f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))}; expected 'datasets'")
    per = data.get("datasets") or {}
    if not isinstance(per, dict):
        raise UserError(f"{path}: 'datasets' must map dataset names to config sections")
    return {str(k): v for k, v in per.items() if isinstance(v, dict)}


def config_for(sources: list[tuple[str, dict]], overrides: list[str], extra: dict | None, name: str) -> RunConfig:
    """The run config of one dataset: shared config plus its overrides."""
    srcs = list(sources)
    if extra:
        srcs.append((f"batch config for '{name}'", extra))
    return build_config(merge_sources(srcs, overrides))


def check_resume(options: RunOptions, fused: bool = False) -> None:
    """train-batch --resume (local or cluster) goes with neither --overwrite nor --fused."""
    if options.resume and (fused or options.overwrite):
        raise UserError("--resume continues interrupted adapters from their checkpoints; "
                        + ("--fused trains without checkpoints" if fused else
                           "--overwrite retrains every adapter from step 0: pass one of them"))


def is_up_to_date(paths: ProjectPaths, adapter_name: str, cfg: RunConfig, dataset_fp: str, base_fp: str) -> bool:
    """True when the adapter exists and was trained with the same config, data and base."""
    from lora_project.models.adapter import read_metadata

    d = paths.adapter(adapter_name)
    if not (d / "adapter_model.safetensors").is_file():
        return False
    try:
        meta = read_metadata(d)
    except UserError:
        return False
    try:  # fields added since the adapter was trained count at their defaults (the behaviour it had)
        recorded = recipe_fields(build_config(meta.config)) if isinstance(meta.config, dict) else None
    except (UserError, TypeError, ValueError):
        return False
    return (recorded == recipe_fields(cfg) and (meta.dataset or {}).get("fingerprint") == dataset_fp
            and meta.base_fingerprint == base_fp)


def train_batch_from_files(paths: ProjectPaths, names: list[str], config_files: list[Path], overrides: list[str],
                          batch_config: Path | None = None, options: RunOptions | None = None, **kwargs) -> dict:
    """`lora-project train-batch`: read the config files and the per-dataset overrides, then `train_batch`.

    `batch_config` None means config/batch_config.yaml when it exists (a named file must exist);
    `options` and the keyword arguments go to `train_batch`.
    """
    batch_file = batch_config or (paths.config_dir / "batch_config.yaml")
    if batch_config is None and not batch_file.is_file():
        batch_file = None
    batch_overrides = load_batch_overrides(batch_file, names)
    sources = [(str(f), read_yaml(f)) for f in config_files]
    return train_batch(paths, names, sources, overrides, batch_overrides, options, **kwargs)


def train_batch(paths: ProjectPaths, names: list[str], sources: list[tuple[str, dict]], overrides: list[str],
                batch_overrides: dict[str, dict], options: RunOptions | None = None, *, fused: bool = False,
                seeds=None, name_template: str | None = None) -> dict:
    """Train one adapter per dataset (sequential or fused), or per dataset and seed (`seeds`: a count
    or a list, see training/seeds.py), named by `name_template`; a failing run does not stop the others.
    `options` apply to every run (each is a child of the batch's MLflow run; `options.adapter_name`
    is not used: the template names the adapters)."""
    from lora_project.data.catalog import load_catalog
    from lora_project.data.dataset_loader import prepare_dataset
    from lora_project.models.base_model import load_base
    from lora_project.training.single import has_checkpoint, train_adapter
    from lora_project.training.seeds import check_unique, seeded_runs
    from lora_project.utils.mlflow_utils import MlflowTracker

    options = options or RunOptions()
    log, overwrite = options.log, options.overwrite
    unknown = sorted(set(batch_overrides) - set(names))
    if unknown:
        log(f"note: batch config has overrides for datasets not in this batch: {', '.join(unknown)}")
    # Validate every dataset's config before any training starts.
    configs = {n: config_for(sources, overrides, batch_overrides.get(n), n) for n in names}
    # One job per adapter: (dataset, adapter name, config); names checked before any training.
    jobs = [(n, a, c) for n in names for a, c in seeded_runs(n, configs[n], seeds, name_template)]
    check_unique([a for _, a, _ in jobs])
    if fused and (seeds is not None or any(a != n for n, a, _ in jobs)):
        raise UserError("--fused trains one adapter per dataset under its own name; --seeds and --name-template "
                        "work without --fused")
    check_resume(options, fused)
    if fused:  # what the configs alone can refuse, refused before the model loads
        from lora_project.training.fused import check_fusable

        check_fusable(configs)
    first = configs[names[0]]
    output_dir(paths.metrics_dir)  # the batch summary goes there: checked before any training
    catalog = load_catalog(paths.catalog)
    base = load_base(first)
    log(f"base model {base.ref.name} loaded once for {len(names)} dataset(s) in {base.load_seconds:.1f} s")
    parent = MlflowTracker(paths, first.tracking.experiment_name, first.tracking.tracking_uri) \
        if options.use_mlflow and first.tracking.mlflow else None
    rows, status = [], "FINISHED"
    t_all = time.perf_counter()
    try:  # the parent run starts inside the block that ends it: no run is left RUNNING
        if parent:
            parent.start(f"train-batch {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S}",
                         {"datasets": ",".join(names), "overwrite": overwrite}, {"kind": "train-batch"})
        for i, (name, adapter, cfg) in enumerate(jobs, 1):
            row = {"dataset": name, "adapter": f"{adapter}_lora", "seed": cfg.training.seed, "status": "",
                   "reason": "", "steps": None, "tokens": None, "perplexity_before": None, "perplexity_after": None,
                   "wall_seconds": None}
            log(f"[{i}/{len(jobs)}] {name}" + (f" -> {adapter}" if adapter != name else ""))
            t0 = time.perf_counter()
            try:
                check_stop()
                prepared = prepare_dataset(paths, name, catalog=catalog)
                fp = prepared.stats["source_sha256"][:16] + "-" + prepared.stats["settings_sha256"][:16]
                if not overwrite and is_up_to_date(paths, adapter, cfg, fp, base.ref.fingerprint):
                    row.update(status="skipped", reason="adapter up to date (same config, data and base)")
                    log(f"  skipped: {row['reason']}")
                elif fused:
                    row.update(status="pending")
                    log("  prepared; trains in the fused run")
                else:
                    resume = options.resume and has_checkpoint(paths, adapter)
                    if options.resume and not resume:
                        log("  --resume: no checkpoint of this adapter; it trains from step 0")
                    res = train_adapter(paths, name, cfg, replace(  # --resume: from its checkpoint if it has one
                        options, adapter_name=adapter, log=lambda m: log("  " + m), resume=resume,
                        parent_run_id=parent.run_id if parent else None, run_kind="batch"), base=base)
                    row.update(status="trained", steps=res["steps"], tokens=res["tokens_seen"],
                               perplexity_before=res["metrics_before"]["perplexity"],
                               perplexity_after=res["metrics_after"]["perplexity"],
                               experiment=res["experiment_dir"])
            except (KeyboardInterrupt, RunInterrupted):
                raise
            except UserError as exc:
                row.update(status="failed", reason=" ".join(str(exc).split()))
                log(f"  failed: {row['reason']}")
            except Exception as exc:  # a bug in one dataset must not stop the others
                row.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:500], bug=True)
                log(f"  failed: {row['reason']}")
            row["wall_seconds"] = time.perf_counter() - t0
            rows.append(row)
            if row["status"] == "pending":
                continue
            if parent:
                parent.log_metrics({f"{adapter}.wall_seconds": row["wall_seconds"]} |
                                   ({f"{adapter}.perplexity_after": row["perplexity_after"]}
                                    if row["perplexity_after"] else {}), step=i)
        pending_rows = [r for r in rows if r["status"] == "pending"]
        if pending_rows:
            from lora_project.training.fused import train_fused

            todo = [r["dataset"] for r in pending_rows]
            log(f"fused training of {len(todo)} adapter(s): {', '.join(todo)}")
            t0 = time.perf_counter()
            try:
                results = train_fused(paths, todo, {n: configs[n] for n in todo}, base,
                                      replace(options, parent_run_id=parent.run_id if parent else None))
                for r, res in zip(pending_rows, results):
                    r.update(status="trained", steps=res["steps"], tokens=res["tokens_seen"],
                             perplexity_before=res["metrics_before"]["perplexity"],
                             perplexity_after=res["metrics_after"]["perplexity"],
                             experiment=res["experiment_dir"], wall_seconds=time.perf_counter() - t0)
            except UserError as exc:  # the dataset at fault gets the reason; the others say why they did not train
                culprit = getattr(exc, "dataset", None)
                for r in pending_rows:
                    r.update(status="failed", reason=" ".join(str(exc).split()) if culprit in (None, r["dataset"])
                             else f"not trained: the fused run stopped on {culprit}'s failure")
    except (KeyboardInterrupt, RunInterrupted):
        status = "KILLED"
        raise
    finally:
        end_parent_run(parent, status, rows)
    summary = {"created": datetime.now(timezone.utc).isoformat(), "parent_run_id": parent.run_id if parent else None,
               "wall_seconds": time.perf_counter() - t_all, "datasets": rows}
    summary["report"] = write_summary(paths, summary)
    return summary


def end_parent_run(parent, status: str, rows: list[dict]) -> None:
    """Close a batch's parent MLflow run (if any): FAILED when it would be FINISHED but an adapter failed."""
    if parent:
        if status == "FINISHED" and any(r["status"] == "failed" for r in rows):
            status = "FAILED"
        parent.end(status)


def summary_table(rows: list[dict]) -> str:
    """The batch summary as a text table."""
    from lora_project.utils.tables import fmt_table

    return fmt_table(rows, [("dataset", "dataset", ""), ("adapter", "adapter", ""), ("seed", "seed", ""),
                            ("status", "status", ""), ("steps", "steps", ""),
                            ("tokens", "tokens", ""), ("perplexity_before", "ppl before", ".2f"),
                            ("perplexity_after", "ppl after", ".2f"), ("wall_seconds", "wall s", ".0f"),
                            ("reason", "reason", "")])


def write_summary(paths: ProjectPaths, summary: dict) -> dict:
    """Save the batch summary under outputs/metrics/."""
    base = write_new_json(paths.metrics_dir, "train_batch", summary).with_suffix("")
    atomic_write_text(base.with_suffix(".md"), "# train-batch summary\n\n```text\n" +
                      summary_table(summary["datasets"]) + "\n```\n")
    return {"json": str(base.with_suffix(".json")), "markdown": str(base.with_suffix(".md"))}
