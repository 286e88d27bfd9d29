"""`lora-project`: one command, several subcommands. Entry points only orchestrate.

Exit codes: 0 success; 2 bad input (one line ``error: ...`` on stderr, no traceback);
1 a bug (traceback shown); 130 interrupted by Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from lora_project import __version__
from lora_project.errors import RunInterrupted, UserError

EXAMPLES = """\
examples:
  lora-project demo                                  # the main job (make demo)
  lora-project generate-data --kind toddler          # data/raw/toddler_data.txt
  lora-project prepare toddler_data                  # data/processed/toddler_data/
  lora-project train toddler_data --set training.max_steps=100
  lora-project evaluate --dataset toddler_data --split test --adapter adapters/toddler_data_lora --json
  lora-project config --explain                      # every config field, default and range
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, action="append", metavar="YAML",
                   help="training config file (default: config/training_config.yaml); repeatable, later wins")
    p.add_argument("--model-config", type=Path, metavar="YAML",
                   help="model/LoRA config file (default: config/model_config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one field, e.g. --set training.lr=2e-4 --set lora.r=16 (repeatable)")


def _load_cfg(args, paths):
    from lora_project.utils.config_utils import load_config

    files = [args.model_config or paths.model_config] + (args.config or [paths.training_config])
    return load_config(files, args.overrides)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one `error:` line and exit code 2, like every other bad input."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lora-project", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A LoRA workbench for small causal language models: generate and prepare text "
                    "datasets, train one LoRA adapter per dataset, track runs in MLflow, evaluate "
                    "adapters against the base model.", epilog=EXAMPLES)
    parser.add_argument("--version", action="version", version=f"lora-project {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="the main job: generate toddler data, train, evaluate (a few minutes)",
                       description="Generate synthetic toddler speech, train a LoRA adapter on the embedded "
                                   "SmolLM2-135M, and compare base vs adapter perplexity on held-out data. "
                                   "Replaces adapters/toddler_data_demo_lora on purpose; each run gets a new "
                                   "experiment folder.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field for the demo run")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")

    p = sub.add_parser("generate-data", help="write a synthetic corpus from an editable grammar",
                       description="Write a seeded synthetic corpus, one utterance per line, from a grammar "
                                   "YAML file (config/grammars/<kind>.yaml). Same grammar and seed, same bytes.")
    p.add_argument("--kind", choices=("toddler", "kids"), default="toddler",
                   help="which grammar (default: toddler)")
    p.add_argument("--grammar", type=Path, help="grammar file (default: config/grammars/<kind>.yaml)")
    p.add_argument("--out", type=Path, help="output file (default: data/raw/toddler_data.txt or data/raw/kids.txt)")
    p.add_argument("--lines", type=int, help="number of utterances (default: the grammar's default_lines)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")

    p = sub.add_parser("prepare", help="clean and split catalog datasets into data/processed/",
                       description="Turn catalog rows (config/dataset_catalog.csv) into "
                                   "data/processed/<name>/{train,validation,test}.txt + stats.json. "
                                   "Unchanged inputs are skipped.")
    p.add_argument("names", nargs="*", help="dataset names from the catalog")
    p.add_argument("--all", action="store_true", help="every enabled catalog row")
    p.add_argument("--force", action="store_true", help="rebuild even when inputs are unchanged")
    p.add_argument("--json", action="store_true", help="print the stats as JSON")

    p = sub.add_parser("train", help="train one LoRA adapter on one catalog dataset",
                       description="Train adapters/<NAME>_lora on catalog dataset NAME. Writes "
                                   "experiments/exp_NNN_<NAME>/ (config.yaml, results.json, logs/) and an "
                                   "MLflow run (sqlite:///mlruns/mlflow.db unless MLFLOW_TRACKING_URI is set).",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="dataset name from config/dataset_catalog.csv")
    p.add_argument("--adapter-name", help="adapter name (default: the dataset name)")
    _add_config_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing adapter of the same name")
    p.add_argument("--resume", action="store_true",
                   help="continue the newest checkpoint of this adapter (same experiment folder and MLflow run; "
                        "refused if config, base model or data changed)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print results.json content on stdout")

    p = sub.add_parser("evaluate", help="perplexity and bits/byte of the base and adapters",
                       description="Score a text file (--text, the whole content as one text) or a prepared "
                                   "split (--dataset/--split) with the base model and each --adapter, using the "
                                   "sliding-window method; BOS is prefixed so every token is scored once.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", type=Path, metavar="FILE", help="UTF-8 text file scored as one text")
    src.add_argument("--dataset", metavar="NAME", help="prepared catalog dataset")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"),
                   help="split of --dataset (default: test)")
    p.add_argument("--adapter", type=Path, action="append", default=[], metavar="DIR",
                   help="adapter folder (repeatable); results keyed by folder name")
    p.add_argument("--max-length", type=int, default=1024, help="window length in tokens (default 1024)")
    p.add_argument("--stride", type=int, help="window step in tokens (default: max-length / 2)")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("benchmark", help="matmul peak and training throughput/memory of this machine",
                       description="Measure this machine's fp32/bf16 matmul peak and our trainer's tokens/s "
                                   "and peak memory per sequence shape. Writes "
                                   "outputs/metrics/benchmark_<timestamp>.{json,md}. --quick uses a tiny "
                                   "model built in code (seconds); the default uses the configured base model.")
    p.add_argument("--quick", action="store_true", help="tiny model built in code; for CI and smoke tests")
    p.add_argument("--shapes", default="64x16,128x8", help="SEQxBATCH list (default: 64x16,128x8)")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per shape (default: 4)")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("config", help="show the resolved configuration or explain every field")
    _add_config_args(p)
    p.add_argument("--explain", action="store_true", help="every field with default, range and meaning")
    return parser


def _cmd_demo(args, paths):
    from lora_project.demo import run_demo

    out = run_demo(paths, args.overrides, use_mlflow=not args.no_mlflow,
                   log=(lambda m: print(m, file=sys.stderr)) if args.json else print)
    if args.json:
        _print_json(out)


def _cmd_generate(args, paths):
    from lora_project.data.generator import OUTPUT_NAMES, generate_corpus

    grammar = args.grammar or paths.config_dir / "grammars" / f"{args.kind}.yaml"
    out = args.out or paths.raw_dir / OUTPUT_NAMES[args.kind]
    summary = generate_corpus(grammar, out, seed=args.seed, n_lines=args.lines)
    if args.json:
        _print_json(summary)
    else:
        print(f"wrote {summary['lines']} lines ({summary['unique_lines']} unique) to {out}")


def _cmd_prepare(args, paths):
    from lora_project.data.catalog import get_entry, load_catalog
    from lora_project.data.dataset_loader import prepare_dataset

    catalog = load_catalog(paths.catalog)
    if args.all and args.names:
        raise UserError("give dataset names or --all, not both")
    names = [n for n, e in catalog.items() if e.enabled] if args.all else args.names
    if not names:
        raise UserError("name at least one dataset, or pass --all")
    for n in names:
        get_entry(catalog, n)  # all names checked before any work
    out = {}
    for n in names:
        prep = prepare_dataset(paths, n, force=args.force, catalog=catalog)
        out[n] = prep.stats
        if not args.json:
            s = prep.stats["splits"]
            state = "unchanged, skipped" if prep.skipped else "prepared"
            print(f"{n}: {state} -> {prep.folder} (train {s['train']['documents']}, validation "
                  f"{s['validation']['documents']}, test {s['test']['documents']} documents)")
    if args.json:
        _print_json(out)


def _cmd_train(args, paths):
    from lora_project.training.run import train_adapter

    cfg = _load_cfg(args, paths)
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    res = train_adapter(paths, args.name, cfg, adapter_name=args.adapter_name, overwrite=args.overwrite,
                        use_mlflow=not args.no_mlflow, progress=not args.no_progress, resume=args.resume,
                        log=log)
    if args.json:
        _print_json(res)
    else:
        b, a = res["metrics_before"], res["metrics_after"]
        print(f"validation perplexity {b['perplexity']:.3f} -> {a['perplexity']:.3f}; "
              f"{res['tokens_seen']} tokens at {res['tokens_per_second']:.0f} tokens/s")
        print(f"adapter: {res['adapter_dir']}\nexperiment: {res['experiment_dir']}")
        if res.get("mlflow_run_id"):
            print(f"MLflow run: {res['mlflow_run_id']}")


def _cmd_evaluate(args, paths):
    from lora_project.evaluation.evaluate import evaluate_perplexity

    cfg = _load_cfg(args, paths)
    res = evaluate_perplexity(paths, cfg, text_file=args.text, dataset=args.dataset, split=args.split,
                              adapters=args.adapter, max_length=args.max_length, stride=args.stride)
    if args.json:
        _print_json(res)
        return
    base_ppl = res["models"]["base"]["perplexity"]
    print(f"{'model':<32} {'perplexity':>11} {'bits/byte':>10} {'tokens':>8} {'vs base':>8}")
    for name, m in res["models"].items():
        delta = "" if name == "base" else f"{100 * (m['perplexity'] / base_ppl - 1):+.1f}%"
        print(f"{name:<32} {m['perplexity']:>11.3f} {m['bits_per_byte']:>10.4f} {m['tokens']:>8} {delta:>8}")


def _cmd_benchmark(args, paths):
    from lora_project.evaluation.benchmark import parse_shapes, run_benchmark, write_report

    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    shapes = parse_shapes(args.shapes)
    cfg = _load_cfg(args, paths)
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    result = run_benchmark(paths, cfg, quick=args.quick, shapes=shapes, steps=args.steps, log=log)
    json_path, md_path = write_report(paths, result)
    result["report"] = {"json": str(json_path), "markdown": str(md_path)}
    if args.json:
        _print_json(result)
    else:
        print(f"report: {md_path}")


def _cmd_config(args, paths):
    from lora_project.utils.config_utils import explain

    if args.explain:
        print(explain())
    else:
        print(_load_cfg(args, paths).to_yaml(), end="")


COMMANDS = {"demo": _cmd_demo, "generate-data": _cmd_generate, "prepare": _cmd_prepare,
            "train": _cmd_train, "evaluate": _cmd_evaluate, "benchmark": _cmd_benchmark,
            "config": _cmd_config}


def _on_sigterm(signum, frame):
    raise RunInterrupted()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from lora_project.paths import ProjectPaths
    from lora_project.utils.logging_utils import quiet_libraries

    quiet_libraries()
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        COMMANDS[args.command](args, ProjectPaths.discover())
        return 0
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, RunInterrupted):
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
