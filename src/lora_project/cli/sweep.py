"""`sweep DATASET --param ...`: an Optuna hyper-parameter search, one adapter per trial."""

from __future__ import annotations

import argparse

from lora_project.cli._common import (
    add_cluster,
    add_config_args,
    add_json,
    add_number,
    add_run_flags,
    load_cfg,
    print_json,
    run_options,
)

EXAMPLES = """\
--param syntax (repeatable, one per setting):
  lora.r=2,4,8,16                 a list of values (the grid sampler enumerates them)
  training.lr=1e-4:3e-3:log       a range, log-uniform (integers for integer fields)
  lora.target_modules=q_proj+v_proj,q_proj+k_proj+v_proj+o_proj   lists of module names joined by '+'

examples:
  lora-project sweep toddler_data --param lora.r=4,8 --param training.lr=3e-4,1e-3 --sampler grid
  lora-project sweep toddler_data --param lora.r=2:16 --param training.lr=1e-4:3e-3:log --trials 12 \\
      --set training.max_steps=60 --set training.eval_interval=20 --keep-best 3
  lora-project sweep toddler_data --resume          # continue after Ctrl-C or a crash
  lora-project sweep toddler_data --param lora.r=2,4,8,16 --sampler grid --cluster local:2   # 2 trials at once on Ray
  lora-project sweep toddler_data --param training.lr=1e-4:3e-3:log --trials 32 --cluster auto --parallel 8
"""


SWEEP_DESCRIPTION = """\
Search LoRA and training settings on catalog dataset DATASET. Each trial trains
adapters/<NAME>_tNNN_lora exactly as `train` would (its own experiment folder, a child MLflow run under
the sweep's parent run); hopeless trials are pruned on the validation loss at each
training.eval_interval. The study lives in outputs/sweeps/<NAME>/ (SQLite), with the table,
best_config.yaml (for `train --config`) and plots. Ctrl-C leaves it resumable with --resume.
With --cluster ADDRESS the trials run as Ray tasks, --parallel K at a time; the study stays here
(docs/cluster.md)."""


def register(sub) -> None:
    p = sub.add_parser("sweep", help="hyper-parameter sweep (Optuna): one adapter per trial, base loaded once",
                       description=SWEEP_DESCRIPTION,
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="dataset name from config/dataset_catalog.csv")
    p.add_argument("--param", dest="params", action="append", default=[], metavar="SECTION.KEY=VALUES",
                   help="a setting to sweep: V1,V2,... or LO:HI[:log] (repeatable)")
    add_number(p, "--trials", int, 1, 10_000, help="trials to run in all (default 10; grid: every point)")
    p.add_argument("--metric", choices=("validation_perplexity", "validation_loss", "validation_bits_per_byte"),
                   help="what the sweep minimises, measured after training (default validation_perplexity)")
    p.add_argument("--sampler", choices=("tpe", "grid", "random"), help="how trials are chosen (default tpe)")
    p.add_argument("--name", help="sweep name: outputs/sweeps/<NAME>/ and adapter names (default DATASET_sweep)")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep NAME: finished trials are kept, an interrupted one reruns from its start")
    add_number(p, "--keep-best", int, 1, 10_000, metavar="K", help="keep only the adapters of the best K trials")
    add_cluster(p, "run the trials")
    add_number(p, "--parallel", int, 1, 10_000, metavar="K",
               help="with --cluster: trials at once (default: the tasks the cluster can run at once, its CPUs / "
                    "cluster.cpus_per_task; with --parallel 1 pruning decides as a local sweep)")
    add_config_args(p)
    add_run_flags(p)
    add_json(p, "print the summary as one JSON object")
    p.set_defaults(handler=run)


def run(args, paths) -> None:
    from lora_project.errors import UserError
    from lora_project.sweep.runner import run_sweep

    if args.parallel is not None and args.cluster is None:
        raise UserError("--parallel K runs K trials at once on a Ray cluster: add --cluster ADDRESS "
                        "(e.g. --cluster local:2); a local sweep runs one trial at a time")
    cfg = load_cfg(args, paths)
    sweep_args = dict(trials=args.trials, metric=args.metric, sampler=args.sampler, name=args.name,
                      resume=args.resume, keep_best=args.keep_best)
    if args.cluster is not None:
        from lora_project.cluster.sweep import sweep_on_cluster

        summary = sweep_on_cluster(paths, args.dataset, cfg, args.params, run_options(args), args.cluster,
                                   parallel=args.parallel, **sweep_args)
    else:
        summary = run_sweep(paths, args.dataset, cfg, args.params, run_options(args), **sweep_args)
    if args.json:
        print_json(summary)
    else:
        print("\n" + summary["table"])
        for note in summary["notes"]:
            print(f"note: {note}")
        if summary["best"]:
            b = summary["best"]
            print(f"\nbest: trial {b['trial']} ({summary['metric']} {b['value']:.4f}); "
                  f"config: {summary['files']['best_config']}")
        print(f"sweep folder: {summary['folder']}")
    if summary["best"] is None:
        raise UserError(f"no trial of sweep '{summary['name']}' completed; the table says why")
