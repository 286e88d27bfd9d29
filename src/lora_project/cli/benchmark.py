"""`lora-project benchmark`: speed and memory report (training, evaluation, generation, model load)."""

from __future__ import annotations

from pathlib import Path

from lora_project.cli._common import (
    _cluster_address,
    add_cluster,
    add_config_args,
    add_json,
    add_number,
    load_cfg,
    print_json,
    progress_log,
)
from lora_project.errors import UserError

SCALING_STEPS, SCALING_DATASETS = 10, 4  # benchmark/scale_out.py's defaults (not imported: start-up stays light)
BABYLM_LIMIT = 2  # benchmark/babylm.py DEFAULT_LIMIT (not imported here either)


BENCHMARK_DESCRIPTION = """\
Measure this machine's fp32/bf16 matmul peak; our trainer's tokens/s and peak memory per sequence shape;
evaluation tokens/s; generation latency per token for the base, the adapter unmerged and merged;
model-load time cold (empty model cache) and cached. Writes
outputs/metrics/benchmark_<timestamp>.{json,md} and an MLflow run in the experiment 'benchmark'. The
speed sections run when none of --matrix, --reference, --blimp, --babylm is given, or with --speed; the matmul
peaks and the CPU class always. --babylm DIR times the BabyLM 2025 suite scored by our prefix tree against the
official pipeline's strategy (reproduced in this process on the same model) on a seeded sample of every task. --quick uses a tiny model built in code (seconds); the default uses the
configured base model. --scaling ADDRESS is the scale-out benchmark instead: the same small train-batch locally on
one CPU and on a Ray cluster (docs/cluster.md), written to outputs/metrics/benchmark_scaling_<timestamp>.{json,md}.
--matrix --cluster ADDRESS scores the matrix's cells as Ray tasks (the other sections run here)."""


def register(sub) -> None:
    p = sub.add_parser("benchmark", help="speed and memory report: training, evaluation, generation, model load",
                       description=BENCHMARK_DESCRIPTION)
    p.add_argument("--quick", action="store_true", help="tiny model built in code; for CI and smoke tests")
    p.add_argument("--shapes", default="64x16,128x8", help="SEQxBATCH list (default: 64x16,128x8)")
    add_number(p, "--steps", int, 1, 10_000, default=None,
               help="timed optimizer steps per shape (default: 4); with --scaling, optimizer steps per adapter "
                    f"(default: {SCALING_STEPS})")
    p.add_argument("--speed", action="store_true",
                   help="run the speed sections (training per shape, evaluation, generation, model load) even when "
                        "--matrix, --reference, --blimp or --babylm is given; without those they always run")
    p.add_argument("--reference", action="store_true",
                   help="compare our trainer with the setups a user could pick instead, on the same model, data, "
                        "batch (8) and sequence length (256), each in its own process: transformers Trainer fp32, "
                        "and where bf16 is native also Trainer bf16=True and a plain PEFT loop under "
                        "torch.autocast(bfloat16); speed-up and memory ratio are against the fastest")
    p.add_argument("--references", default="auto", metavar="LIST",
                   help="--reference: 'auto' (default: as above), 'all' (the bf16 ones too, even where bf16 is "
                        "emulated and slow), or a comma list of trainer_fp32, trainer_bf16, peft_autocast_bf16")
    add_number(p, "--reference-steps", int, 1, 10_000, default=6, help="optimizer steps per side (default: 6)")
    add_number(p, "--reference-repeats", int, 1, 100, default=1, metavar="N",
               help="--reference: runs per side, each a fresh process; the report gives medians (default 1; "
                        "use 3 for figures you quote)")
    p.add_argument("--matrix", action="store_true",
                   help="score the base and every adapter on every prepared dataset's test split "
                        "(the same scoring as evaluate --dataset, whole splits, 95%% bootstrap intervals; table, "
                        "markdown and a heatmap PNG of each adapter's change against the base); without "
                        "--speed, the speed sections are skipped")
    add_number(p, "--matrix-max-tokens", int, 0, 10**12, default=0, metavar="N",
               help="--matrix: score only the leading documents that fit in N tokens per split (default 0: "
                        "whole splits); the report says so")
    add_cluster(p, "--matrix: score each (model, dataset) cell")
    p.add_argument("--blimp", type=Path, metavar="DIR",
                   help="also time minimal-pair scoring per first-pass path on a sample of this BLiMP-style folder "
                        "(e.g. ../shared/data/blimp), against the plain fp32 scorer, and project the full-folder time; "
                        "and measure lm-evaluation-harness beside ours on the same pairs (see --peer-pairs)")
    add_number(p, "--blimp-pairs", int, 1, 100_000, default=5, metavar="N",
               help="--blimp: seeded pairs per paradigm (default 5)")
    add_number(p, "--peer-pairs", int, 0, 100_000, default=20, metavar="N",
               help="--blimp: also score N seeded pairs per paradigm (0: the whole folder) with "
                    "lm-evaluation-harness (the optional extra 'peers': its hf model, fp32, batch 32, under its "
                    "own BLiMP definition and BabyLM's) and with ours, and report pairs/s, the projected "
                    "whole-folder time and decision agreement (default 20)")
    p.add_argument("--peer-definitions", metavar="LIST",
                   help="--blimp: which BLiMP definitions lm-evaluation-harness runs, comma-separated: babylm (no "
                        "delimiter, BabyLM's and ours), lm_eval (its own, a leading space) (default: both; each is a "
                        "full lm-eval run, so one halves a whole-folder comparison)")
    p.add_argument("--no-peers", action="store_true", help="--blimp: skip the lm-evaluation-harness comparison")
    p.add_argument("--babylm", type=Path, metavar="DIR",
                   help="time the BabyLM 2025 suite in this folder (e.g. ../shared/data/babylm_2025) scored by our "
                        "prefix tree against the official pipeline's strategy (one padded row per option, batches of "
                        "64 items, fp32; reading one forward per read), on the same loaded model, on a seeded sample "
                        "of each task; checks both give the same decisions and projects each side's full-suite time")
    add_number(p, "--limit", int, 1, 10**9, default=None, metavar="N",
               help=f"--babylm: seeded items per UID, rows for reading, as evaluate --babylm --limit takes them "
                    f"(default {BABYLM_LIMIT})")
    p.add_argument("--scaling", type=_cluster_address, metavar="ADDRESS",
                   help="scale-out on Ray: train the same batch of small adapters (a throwaway project: --datasets "
                        "slices of real text, --steps steps each, --model) locally on one CPU and on the cluster at "
                        "ADDRESS ('local:N', 'auto', 'ray://HOST:PORT', 'HOST:PORT'; one CPU per task), and report "
                        "wall times, speed-up, parallel efficiency, per-task overheads, a projection to 8/64/512 "
                        "workers and whether both sides' adapters are byte-identical (docs/cluster.md); the "
                        "project's config files are not used, --set applies")
    add_number(p, "--datasets", int, 1, 256, default=None, metavar="N",
               help=f"--scaling: adapters (datasets) in the batch (default: {SCALING_DATASETS})")
    p.add_argument("--model", metavar="SOURCE",
                   help="--scaling or --babylm: the base model: 'embedded' (SmolLM2-135M; --scaling's default, "
                        "--babylm's is the configured model), a local folder or a hub id")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")
    add_config_args(p)
    add_json(p)
    p.set_defaults(handler=run)


def run(args, paths) -> None:
    from lora_project.benchmark import benchmark_report, parse_shapes
    from lora_project.utils.io_utils import output_dir

    if not args.reference and (args.references != "auto" or args.reference_steps != 6 or args.reference_repeats != 1):
        raise UserError("--references, --reference-steps and --reference-repeats go with --reference")
    if args.blimp is None and (args.no_peers or args.peer_pairs != 20 or args.peer_definitions is not None):
        raise UserError("--peer-pairs, --peer-definitions and --no-peers go with --blimp")
    if args.no_peers and (args.peer_pairs != 20 or args.peer_definitions is not None):
        raise UserError("--peer-pairs and --peer-definitions: not with --no-peers (it skips lm-eval); leave one out")
    if args.cluster is not None and (not args.matrix or args.scaling is not None):
        raise UserError("--cluster goes with --matrix (the matrix's cells run as Ray tasks; --scaling takes its "
                        "own ADDRESS)")
    if args.scaling is not None:
        return run_scaling(args, paths)
    if args.datasets is not None or (args.model is not None and args.babylm is None):
        raise UserError("--datasets and --model go with --scaling (--model also with --babylm)")
    if args.babylm is None and args.limit is not None:
        raise UserError("--limit goes with --babylm")
    if args.model is not None:  # --babylm on another base: the model config's source, as --set would set it
        args.overrides = [*args.overrides, f"model.source={args.model}"]
    shapes = parse_shapes(args.shapes)
    args.steps = 4 if args.steps is None else args.steps
    output_dir(paths.metrics_dir)  # the report goes there: checked before any measuring
    cfg = load_cfg(args, paths)
    scorer = None
    if args.cluster is not None:
        from lora_project.cluster.matrix import matrix_scorer

        scorer = matrix_scorer(cfg, args.cluster, log=progress_log(args.json))
    result = benchmark_report(paths, cfg, quick=args.quick, shapes=shapes, steps=args.steps, matrix_scorer=scorer,
                              matrix=args.matrix, reference=args.reference, reference_steps=args.reference_steps,
                              mlflow=not args.no_mlflow, blimp=args.blimp, blimp_pairs=args.blimp_pairs,
                              speed=True if args.speed else None, references=args.references,
                              reference_repeats=args.reference_repeats, matrix_max_tokens=args.matrix_max_tokens,
                              peer_pairs=None if args.no_peers else args.peer_pairs,
                              peer_definitions=args.peer_definitions, babylm=args.babylm,
                              babylm_limit=BABYLM_LIMIT if args.limit is None else args.limit,
                              log=progress_log(args.json))
    if args.json:
        print_json(result)
    else:
        print(f"report: {result['report']['markdown']}")


def run_scaling(args, paths) -> None:
    """`benchmark --scaling ADDRESS` (benchmark/scale_out.py); the other sections do not go with it."""
    from lora_project.benchmark.scale_out import scaling_benchmark, scaling_report_markdown

    others = [flag for flag, given in (("--quick", args.quick), ("--speed", args.speed), ("--matrix", args.matrix),
                                       ("--reference", args.reference), ("--blimp", args.blimp is not None),
                                       ("--babylm", args.babylm is not None), ("--limit", args.limit is not None),
                                       ("--shapes", args.shapes != "64x16,128x8"),
                                       ("--config", bool(args.config)), ("--model-config", args.model_config))
              if given]
    if others:
        raise UserError(f"--scaling runs alone: drop {', '.join(others)} (its project is a throwaway one; "
                        "--model, --steps, --datasets and --set shape it)")
    result = scaling_benchmark(paths, load_cfg(args, paths), args.scaling, model=args.model or "embedded",
                               steps=args.steps or SCALING_STEPS, datasets=args.datasets or SCALING_DATASETS,
                               overrides=args.overrides, mlflow=not args.no_mlflow, log=progress_log(args.json))
    if args.json:
        print_json(result)
    else:
        print(scaling_report_markdown(result), end="")
        print(f"report: {result['report']['markdown']}")
