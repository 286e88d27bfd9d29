"""Training commands: `train` (one adapter) and `train-batch` (one adapter per dataset)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_project.cli._common import (
    add_cluster,
    add_config_args,
    add_json,
    add_overwrite,
    add_run_flags,
    add_seeds,
    config_files,
    load_cfg,
    print_json,
    run_options,
    select_datasets,
)
from lora_project.errors import UserError

BATCH_DESCRIPTION = """\
Train adapters/<NAME>_lora for each named (or every enabled) catalog dataset with the same trainer as
`train`. One MLflow parent run with a child run per adapter; a failing dataset is recorded and the others
go on (exit 2 at the end if any failed); adapters already trained with the same config, data and base are
skipped unless --overwrite. Summary in outputs/metrics/."""

# The help of the options both commands take (_add_training_args), in each command's words.
TRAIN_HELP = {"overwrite": "replace an existing adapter of the same name",
              "seeds": "train one adapter per seed, named <name>_s<seed>: N seeds from training.seed on "
                       "(--seeds 3: 42, 43, 44 by default) or the seeds listed (--seeds 1,7,42)",
              "json": "print results.json content on stdout (with --seeds: {dataset, seeds, runs: [...]})"}
BATCH_HELP = {"overwrite": "retrain and replace existing adapters",
              "seeds": "one adapter per dataset and seed (N seeds from training.seed on, or the seeds listed); "
                       "named <dataset>_s<seed> unless --name-template says otherwise",
              "json": "print the summary as one JSON object"}


def register(sub) -> None:
    p = sub.add_parser("train", help="train one LoRA adapter on one catalog dataset",
                       description="Train adapters/<NAME>_lora on catalog dataset NAME. Writes "
                                   "experiments/exp_NNN_<NAME>/ (config.yaml, results.json, logs/) and an "
                                   "MLflow run (sqlite:///mlruns/mlflow.db unless MLFLOW_TRACKING_URI is set).",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="dataset name from config/dataset_catalog.csv")
    p.add_argument("--adapter-name", help="adapter name (default: the dataset name)")
    p.add_argument("--resume", action="store_true",
                   help="continue the newest checkpoint of this adapter (same experiment folder and MLflow run; "
                        "refused if config, base model or data changed)")
    _add_training_args(p, **TRAIN_HELP)
    add_cluster(p, "with --seeds, train the seeds' adapters")
    p.set_defaults(handler=run_train)

    p = sub.add_parser("train-batch", help="train one adapter per catalog dataset (base loaded once)",
                       description=BATCH_DESCRIPTION)
    p.add_argument("names", nargs="*", help="dataset names from the catalog")
    p.add_argument("--all", action="store_true", help="every enabled catalog dataset")
    p.add_argument("--batch-config", type=Path, metavar="YAML",
                   help="per-dataset overrides (default: config/batch_config.yaml if present)")
    p.add_argument("--fused", action="store_true",
                   help="train all adapters at once: one forward/backward over a batch of every adapter's own "
                        "examples, the frozen base shared (needs equal seq_len, batch_size, steps, precision)")
    p.add_argument("--resume", action="store_true",
                   help="an adapter interrupted mid-training (Ctrl-C, crash) continues from its newest checkpoint, "
                        "as train --resume does (same adapter as an uninterrupted run); finished adapters are "
                        "skipped as always, one without a checkpoint trains from step 0; with --cluster its "
                        "checkpoint goes to the task (docs/cluster.md)")
    _add_training_args(p, **BATCH_HELP)
    add_cluster(p, "train the adapters")
    p.add_argument("--name-template", metavar="TEMPLATE",
                   help="adapter names from fields {dataset} {seed} {r} {alpha} {lr} {max_steps} {seq_len} "
                        "{batch_size} {targets}, e.g. '{dataset}_r{r}_s{seed}', so a retrain with new settings "
                        "does not overwrite (default: {dataset})")
    p.set_defaults(handler=run_train_batch)


def _add_training_args(p, *, overwrite: str, seeds: str, json: str) -> None:
    """What train and train-batch both take: config, --overwrite, --seeds, run flags, --json."""
    add_config_args(p)
    add_overwrite(p, overwrite)
    add_seeds(p, seeds)
    add_run_flags(p)
    add_json(p, json)


def run_train(args, paths) -> None:
    from lora_project.training.single import train_adapter

    cfg = load_cfg(args, paths)
    options = run_options(args, adapter_name=args.adapter_name, overwrite=args.overwrite, resume=args.resume)
    if args.cluster is not None and args.seeds is None:
        raise UserError("train --cluster needs --seeds N (one adapter is one task: use train-batch NAME --cluster "
                        "for several datasets)")
    if args.seeds is not None:
        return _run_seeds(args, paths, cfg, options)
    res = train_adapter(paths, args.name, cfg, options)
    if res.get("rank", 0) != 0:
        return  # torchrun worker: rank 0 reports
    if args.json:
        print_json(res)
    else:
        b, a = res["metrics_before"], res["metrics_after"]
        print(f"validation perplexity {b['perplexity']:.3f} -> {a['perplexity']:.3f}; "
              f"{res['tokens_seen']} tokens at {res['tokens_per_second']:.0f} tokens/s")
        print(f"adapter: {res['adapter_dir']}\nexperiment: {res['experiment_dir']}")
        if res.get("mlflow_run_id"):
            print(f"MLflow run: {res['mlflow_run_id']}")


def _run_seeds(args, paths, cfg, options) -> None:
    from lora_project.training.seeds import parse_seeds, train_seeds

    if args.cluster is not None:
        from lora_project.cluster.train import train_seeds_cluster

        out = train_seeds_cluster(paths, args.name, cfg, parse_seeds(args.seeds), options, args.cluster)
    else:
        out = train_seeds(paths, args.name, cfg, parse_seeds(args.seeds), options)
    if args.json:
        print_json(out)
        return
    for seed, res in zip(out["seeds"], out["runs"]):
        b, a = res["metrics_before"], res["metrics_after"]
        print(f"seed {seed}: validation perplexity {b['perplexity']:.3f} -> {a['perplexity']:.3f}; "
              f"adapter {res['adapter_dir']}")


def run_train_batch(args, paths) -> None:
    from lora_project.data.catalog import load_catalog
    from lora_project.training.batch import summary_table, train_batch_from_files
    from lora_project.training.seeds import parse_seeds

    names = select_datasets(args, load_catalog(paths.catalog))
    if args.cluster is not None:
        if args.fused:
            raise UserError("--fused trains every adapter in one process; --cluster trains each as its own task")
        from lora_project.cluster.train import train_batch_cluster

        summary = train_batch_cluster(paths, names, config_files(args, paths), args.overrides, args.batch_config,
                                      run_options(args, overwrite=args.overwrite, resume=args.resume), args.cluster,
                                      seeds=parse_seeds(args.seeds), name_template=args.name_template)
    else:
        summary = train_batch_from_files(paths, names, config_files(args, paths), args.overrides, args.batch_config,
                                         run_options(args, overwrite=args.overwrite, resume=args.resume), fused=args.fused,
                                         seeds=parse_seeds(args.seeds), name_template=args.name_template)
    if args.json:
        print_json(summary)
    else:
        print("\n" + summary_table(summary["datasets"]))
        print(f"\nsummary: {summary['report']['markdown']}")
    failed = [r for r in summary["datasets"] if r["status"] == "failed"]
    if failed:
        what = "dataset(s)" if len(summary["datasets"]) == len(names) else "run(s)"
        print(f"error: {len(failed)} of {len(summary['datasets'])} {what} failed: "
              + "; ".join(f"{r['adapter'].removesuffix('_lora')}: {r['reason']}" for r in failed), file=sys.stderr)
        raise SystemExit(1 if any(r.get("bug") for r in failed) else 2)
