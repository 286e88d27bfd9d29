"""`lora-project demo`: the main job (generate toddler data, train, evaluate)."""

from __future__ import annotations

from lora_project.cli._common import add_json, print_json, progress_log


def register(sub) -> None:
    p = sub.add_parser("demo", help="the main job: generate toddler data, train, evaluate (a few minutes)",
                       description="Generate synthetic toddler speech, train a LoRA adapter on the embedded "
                                   "SmolLM2-135M, and compare base vs adapter perplexity on held-out data. "
                                   "Replaces adapters/toddler_data_demo_lora on purpose; each run gets a new "
                                   "experiment folder.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field for the demo run")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    add_json(p, "print the results as one JSON object")
    p.set_defaults(handler=run)


def run(args, paths) -> None:
    from lora_project.demo import run_demo

    out = run_demo(paths, args.overrides, use_mlflow=not args.no_mlflow, log=progress_log(args.json))
    if args.json:
        print_json(out)
