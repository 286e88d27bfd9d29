"""`lora-project`: one command, several subcommands. Entry points only orchestrate.

Exit codes: 0 success; 2 bad input (one line ``error: ...`` on stderr, no traceback);
1 a bug (traceback shown); 130 interrupted by Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import sys
from pathlib import Path

from lora_project import __version__
from lora_project.errors import RunInterrupted, UserError
from lora_project.utils import interrupts

EXAMPLES = """\
examples:
  lora-project demo                                  # the main job (make demo)
  lora-project generate-data --kind toddler          # data/raw/toddler_data.txt
  lora-project prepare toddler_data                  # data/processed/toddler_data/
  lora-project train toddler_data --set training.max_steps=100
  lora-project evaluate --dataset toddler_data --split test --adapter adapters/toddler_data_lora --json
  lora-project train-batch --all                     # one adapter per catalog dataset
  lora-project inspect weights adapters/toddler_data_lora
  lora-project config --explain                      # every config field, default and range
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, action="append", metavar="YAML",
                   help="training config file (default: config/training_config.yaml); repeatable, later wins")
    p.add_argument("--model-config", type=Path, metavar="YAML",
                   help="model/LoRA config file (default: config/model_config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one field, e.g. --set training.lr=2e-4 --set lora.r=16 (repeatable)")


def _add_extract_output_args(p: argparse.ArgumentParser, what: str) -> None:
    """Flags shared by extract and extract-children."""
    p.add_argument("--out", type=Path, required=True, help="output text file (a sidecar <out>.json is written too)")
    p.add_argument("--encoding", default="utf-8", help=f"text encoding of the {what} (default: utf-8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by the commands that train."""
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _select_datasets(args, catalog) -> list[str]:
    """NAMES or --all (every enabled row), every name checked before any work starts."""
    from lora_project.data.catalog import get_entry

    if args.all and args.names:
        raise UserError("give dataset names or --all, not both")
    names = [n for n, e in catalog.items() if e.enabled] if args.all else list(dict.fromkeys(args.names))
    if not names:
        raise UserError("name at least one dataset, or pass --all")
    for n in names:
        get_entry(catalog, n)
    return names


def _source_formats():
    from lora_project.data.extract import SOURCE_FORMATS

    return SOURCE_FORMATS


def _load_cfg(args, paths):
    from lora_project.config import load_config

    files = [args.model_config or paths.model_config] + (args.config or [paths.training_config])
    return load_config(files, args.overrides)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one `error:` line and exit code 2, like every other bad input."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


# Command groups that live in their own module under lora_project.cli: each exposes
# register(sub), which adds its parser(s) and sets `handler=fn(args, paths)` as a default.
# Modules here must stay light at import time (no torch, no transformers).
COMMAND_MODULES: tuple[str, ...] = ("adopt", "catalog")


def build_parser() -> argparse.ArgumentParser:
    """The `lora-project` argument parser: one subcommand per job, each with examples in its --help."""
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

    p = sub.add_parser("generate-data", help="write a synthetic corpus (editable grammar, or stories by the base model)",
                       description="Write a seeded synthetic corpus, one utterance per line, from a grammar "
                                   "YAML file (config/grammars/<kind>.yaml); same grammar and seed, same bytes. "
                                   "--kind stories has the base model write short children's stories from "
                                   "the prompts in config/story_themes.yaml (one story per line; seeded).",
                       epilog="examples:\n  lora-project generate-data --kind kids --lines 2000\n"
                              "  lora-project generate-data --kind stories --lines 20 --seed 1",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=("toddler", "kids", "stories"), default="toddler",
                   help="which corpus (default: toddler)")
    p.add_argument("--grammar", type=Path,
                   help="grammar file (default: config/grammars/<kind>.yaml; for stories: config/story_themes.yaml)")
    p.add_argument("--out", type=Path,
                   help="output file (default: data/raw/toddler_data.txt, data/raw/kids.txt or data/raw/stories.txt)")
    p.add_argument("--batch-size", type=int, default=4, help="stories: prompts generated together (default: 4)")
    p.add_argument("--no-progress", action="store_true", help="stories: no progress bar")
    _add_config_args(p)
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
    p.add_argument("--no-tokens", action="store_true",
                   help="skip the per-split token counts (they load the base model's tokenizer)")
    p.add_argument("--json", action="store_true", help="print the stats as JSON")

    p = sub.add_parser(
        "extract", help="turn corpus files (text, Gutenberg, JSONL, CSV, Parquet, save_to_disk) into a text file",
        description="Read documents from files or folders and write them to one text file (one document "
                    "per line, or blank-line separated when documents span lines) plus a sidecar "
                    "<out>.json with counts. Point a catalog row of kind 'local' at the result, or at "
                    "the sources directly with the same format.",
        epilog="examples:\n  lora-project extract books/ --format gutenberg --out data/raw/books.txt\n"
               "  lora-project extract stories.txt --format separator --sep '<|endoftext|>' --out data/raw/s.txt\n"
               "  lora-project extract dump.jsonl --text-field story --out data/raw/stories.txt",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, help="files or folders")
    _add_extract_output_args(p, "sources")
    p.add_argument("--format", default="auto", choices=("auto", *_source_formats()),
                   help="source format (default: from the file suffix)")
    p.add_argument("--text-field", help="field or column holding the text (default: text)")
    p.add_argument("--sep", help="document separator for --format separator, e.g. '<|endoftext|>'")
    p.add_argument("--one-line", action="store_true", help="collapse each document's whitespace to one line")

    p = sub.add_parser(
        "extract-children", help="children's utterances from CHILDES CHAT transcripts (files, folders, zips)",
        description="Write one plain-text utterance per line for the chosen speakers (default the target "
                    "child, CHI), parsed with pylangacq; CHAT codes, unintelligible words and "
                    "annotations are removed. A sidecar <out>.json gives per-file counts and ages.",
        epilog="example:\n  lora-project extract-children data/childes/ --out data/raw/chi.txt "
               "--min-age '1;06' --max-age '3;00'",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, help=".cha files, folders or .zip archives")
    _add_extract_output_args(p, "transcripts")
    p.add_argument("--participants", default="CHI",
                   help="comma-separated speaker codes or roles (default: CHI; e.g. CHI,Target_Child)")
    p.add_argument("--min-age", help="youngest age kept, CHAT style years;months[.days], e.g. '1;06'")
    p.add_argument("--max-age", help="oldest age kept, e.g. '3;00'")

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
    _add_run_flags(p)
    p.add_argument("--json", action="store_true", help="print results.json content on stdout")

    p = sub.add_parser("train-batch", help="train one adapter per catalog dataset (base loaded once)",
                       description="Train adapters/<NAME>_lora for each named (or every enabled) catalog dataset "
                                   "with the same trainer as `train`. One MLflow parent run with a child run per "
                                   "adapter; a failing dataset is recorded and the others go on (exit 2 at the "
                                   "end if any failed); adapters already trained with the same config, data and "
                                   "base are skipped unless --overwrite. Summary in outputs/metrics/.")
    p.add_argument("names", nargs="*", help="dataset names from the catalog")
    p.add_argument("--all", action="store_true", help="every enabled catalog dataset")
    p.add_argument("--batch-config", type=Path, metavar="YAML",
                   help="per-dataset overrides (default: config/batch_config.yaml if present)")
    _add_config_args(p)
    p.add_argument("--overwrite", action="store_true", help="retrain and replace existing adapters")
    p.add_argument("--fused", action="store_true",
                   help="train all adapters at once: one forward/backward over a batch of every adapter's own "
                        "examples, the frozen base shared (needs equal seq_len, batch_size, steps, precision)")
    _add_run_flags(p)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")

    p = sub.add_parser("evaluate", help="perplexity and bits/byte of the base and adapters",
                       description="Score a text file (--text, the whole content as one text) or a prepared "
                                   "split (--dataset/--split) with the base model and each --adapter, using the "
                                   "sliding-window method; BOS is prefixed so every token is scored once.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", type=Path, metavar="FILE", help="UTF-8 text file scored as one text")
    src.add_argument("--dataset", metavar="NAME", help="prepared catalog dataset")
    src.add_argument("--pairs", type=Path, metavar="PATH",
                     help="BLiMP-style minimal pairs: a .jsonl file or a folder of them (accuracy, not perplexity)")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"),
                   help="split of --dataset (default: test)")
    p.add_argument("--adapter", type=Path, action="append", default=[], metavar="DIR",
                   help="adapter folder (repeatable); results keyed by folder name")
    p.add_argument("--limit", type=int, metavar="N", help="--pairs: at most N pairs per paradigm (seeded sample)")
    p.add_argument("--strict", action="store_true", help="--pairs: fail on a bad line instead of skipping it")
    p.add_argument("--max-length", type=int, default=1024, help="window length in tokens (default 1024)")
    p.add_argument("--stride", type=int, help="window step in tokens (default: max-length / 2)")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("generate", help="continue prompts with the base and each adapter, side by side",
                       description="Print continuations of prompts from the base model and from each --adapter. "
                                   "Greedy by default; --temperature > 0 samples (seeded, so reruns match).")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", type=Path, help="UTF-8 file with one prompt per line")
    p.add_argument("--adapter", type=Path, action="append", default=[], metavar="DIR", help="adapter folder (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=30, help="tokens to generate per prompt (default 30)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass when sampling (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("benchmark", help="speed and memory report: training, evaluation, generation, model load",
                       description="Measure this machine's fp32/bf16 matmul peak; our trainer's tokens/s and peak "
                                   "memory per sequence shape; evaluation tokens/s; generation latency per token "
                                   "for the base, the adapter unmerged and merged; model-load time cold (empty "
                                   "model cache) and cached. Writes outputs/metrics/benchmark_<timestamp>.{json,md} "
                                   "and an MLflow run in the experiment 'benchmark'. --quick uses a tiny model "
                                   "built in code (seconds); the default uses the configured base model.")
    p.add_argument("--quick", action="store_true", help="tiny model built in code; for CI and smoke tests")
    p.add_argument("--shapes", default="64x16,128x8", help="SEQxBATCH list (default: 64x16,128x8)")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per shape (default: 4)")
    p.add_argument("--reference", action="store_true",
                   help="also compare with plain PEFT + transformers Trainer (fp32 defaults) on the same model, "
                        "data, batch (8) and sequence length (256), each in its own process")
    p.add_argument("--reference-steps", type=int, default=6, help="optimizer steps per side (default: 6)")
    p.add_argument("--matrix", action="store_true",
                   help="also score the base and every adapter on every prepared dataset's test split "
                        "(table, markdown and heatmap PNG)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("inspect", help="look inside adapters: list, weights, values, compare",
                       description="Inspect adapters without training anything. Plots go to "
                                   "outputs/metrics/inspect/ unless --out is given.")
    isub = p.add_subparsers(dest="inspect_command", metavar="WHAT", required=True)
    q = isub.add_parser("adapters", help="table of every adapter (broken ones listed with the reason)")
    q.add_argument("--dir", type=Path, help="folder of adapters (default: adapters/)")
    q.add_argument("--sort", default="name", help="column to sort by (default: name), e.g. created, r, size_bytes")
    q.add_argument("--filter", default="", metavar="TEXT", help="keep rows whose name or dataset contains TEXT")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q = isub.add_parser("weights", help="per-module norms, relative update, ranks, spectra (+ heatmap PNG)",
                        description="Per layer and module: Frobenius norms of A, B and dW = scale * B @ A, "
                                    "||dW||/||W0||, spectral norm, stable rank, effective rank, top singular "
                                    "values (from the factors, never the full product); summaries by module "
                                    "type and layer; a heatmap and a spectra plot.")
    q.add_argument("adapter", type=Path, help="adapter folder")
    q.add_argument("--top-k", type=int, default=8, help="singular values reported per module (default 8)")
    q.add_argument("--out", type=Path, help="folder for the PNG plots")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q = isub.add_parser("values", help="slices, statistics, histograms and export of A, B and dW of modules")
    q.add_argument("adapter", type=Path, help="adapter folder")
    q.add_argument("--module", required=True, help="PEFT module path or glob, e.g. '*.layers.3.self_attn.q_proj'")
    q.add_argument("--rows", type=int, default=4, help="rows of each matrix to print (default 4)")
    q.add_argument("--cols", type=int, default=6, help="columns of each matrix to print (default 6)")
    q.add_argument("--export", choices=("npy", "csv"), help="also write A, B and dW of each module")
    q.add_argument("--out", type=Path, help="folder for the histogram PNG and exports")
    q.add_argument("--json", action="store_true", help="print one JSON object (statistics only)")
    q = isub.add_parser("compare", help="subspace similarity (LoRA paper eq. 4) and amplification of two adapters")
    q.add_argument("a", type=Path, help="first adapter folder")
    q.add_argument("b", type=Path, help="second adapter folder")
    q.add_argument("--max-rank", type=int, help="compare only the top singular directions up to this rank")
    q.add_argument("--out", type=Path, help="folder for the PNG heatmaps")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    for q in isub.choices.values():
        _add_config_args(q)

    p = sub.add_parser("merge", help="combine adapters into a new adapter, or export a merged full model",
                       description="Combine adapters with PEFT's add_weighted_adapter into adapters/<NAME>_lora "
                                   "(--name), and/or bake one adapter into a full transformers model folder "
                                   "(--export-model DIR) whose logits equal base + adapter.")
    p.add_argument("adapters", type=Path, nargs="+", help="adapter folders")
    p.add_argument("--name", help="name of the merged adapter (written to adapters/<NAME>_lora)")
    p.add_argument("--weights", help="comma-separated weight per adapter (default: 1/N each)")
    p.add_argument("--method", default="linear", help="linear | cat | ties | dare_linear | dare_ties (default linear)")
    p.add_argument("--density", type=float, default=0.5, help="kept fraction for ties/dare methods (default 0.5)")
    p.add_argument("--export-model", type=Path, metavar="DIR", help="write base+adapter as a full model (one adapter)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("config", help="show the resolved configuration or explain every field")
    _add_config_args(p)
    p.add_argument("--explain", action="store_true", help="every field with default, range and meaning")
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"lora_project.cli.{name}").register(sub)
    return parser


def _cmd_demo(args, paths):
    from lora_project.demo import run_demo

    out = run_demo(paths, args.overrides, use_mlflow=not args.no_mlflow,
                   log=(lambda m: print(m, file=sys.stderr)) if args.json else print)
    if args.json:
        _print_json(out)


def _cmd_generate_data(args, paths):
    from lora_project.data.generator import OUTPUT_NAMES, generate_corpus

    if args.kind == "stories":
        from lora_project.data.stories import write_stories

        summary = write_stories(_load_cfg(args, paths), args.grammar or paths.config_dir / "story_themes.yaml",
                                args.out or paths.raw_dir / "stories.txt", args.lines, args.seed,
                                batch_size=args.batch_size, progress=not (args.no_progress or args.json))
        if args.json:
            _print_json(summary)
        else:
            print(f"wrote {summary['stories']} stories to {summary['out']} ({summary['duplicates']} duplicates "
                  f"and {summary['unfinished']} unfinished dropped)")
        return
    grammar = args.grammar or paths.config_dir / "grammars" / f"{args.kind}.yaml"
    out = args.out or paths.raw_dir / OUTPUT_NAMES[args.kind]
    summary = generate_corpus(grammar, out, seed=args.seed, n_lines=args.lines)
    if args.json:
        _print_json(summary)
    else:
        print(f"wrote {summary['lines']} lines ({summary['unique_lines']} unique) to {out}")


def _cmd_prepare(args, paths):
    from lora_project.data.catalog import load_catalog
    from lora_project.data.dataset_loader import prepare_dataset, token_counter

    catalog = load_catalog(paths.catalog)
    names = _select_datasets(args, catalog)
    out, failed = {}, {}
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    count = None if args.no_tokens else token_counter(paths)
    for n in names:
        try:
            prep = prepare_dataset(paths, n, force=args.force, catalog=catalog, progress=not args.json,
                                   log=log, count_tokens=count)
        except UserError as exc:  # one bad row does not stop the others
            if len(names) == 1:
                raise
            failed[n] = " ".join(str(exc).split())
            print(f"failed: {failed[n]}", file=sys.stderr)
            continue
        out[n] = prep.stats
        if not args.json:
            s = prep.stats["splits"]
            state = "unchanged, skipped" if prep.skipped else "prepared"
            tokens = f", {s['train']['tokens']:,} train tokens" if "tokens" in s["train"] else ""
            print(f"{n}: {state} -> {prep.folder} (train {s['train']['documents']}, validation "
                  f"{s['validation']['documents']}, test {s['test']['documents']} documents{tokens})")
    if args.json:
        _print_json(out)
    if failed:
        raise UserError(f"{len(failed)} of {len(names)} datasets failed: {', '.join(failed)}")


def _write_corpus(out: Path, docs: list[str], sidecar: dict, overwrite: bool) -> str:
    """Documents to `out` (one per line, or blank-line separated when any spans lines) + sidecar JSON."""
    from lora_project.data.preprocessor import doc_separator
    from lora_project.utils.io_utils import atomic_write_json, atomic_write_text

    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    if not docs:
        raise UserError("nothing extracted: no documents left (check the format, field and filters)")
    sep = doc_separator(docs)
    atomic_write_text(out, sep.join(docs) + "\n")
    side = out.with_name(out.name + ".json")
    atomic_write_json(side, dict(sidecar, output=str(out), documents=len(docs),
                                 layout="paragraphs" if sep == "\n\n" else "lines"))
    return str(side)


def _cmd_extract(args, paths):
    from lora_project.data.extract import read_documents

    docs, infos = [], []
    for src in args.paths:
        d, info = read_documents(src, args.format, args.text_field or "", args.sep, args.encoding)
        docs.extend(" ".join(x.split()) if args.one_line else x.strip() for x in d)
        infos.append(dict(info, source=str(src), documents=len(d)))
    docs = [d for d in docs if d]
    side = _write_corpus(args.out, docs, {"sources": infos}, args.overwrite)
    summary = {"documents": len(docs), "out": str(args.out), "sidecar": side, "sources": infos}
    if args.json:
        _print_json(summary)
    else:
        print(f"{len(docs)} documents from {sum(i['files'] for i in infos)} files -> {args.out} (details: {side})")


def _cmd_extract_children(args, paths):
    from lora_project.data.childes import extract_children

    ex = extract_children(args.paths, args.participants.split(","), args.min_age, args.max_age,
                          encoding=args.encoding)
    summary = ex.summary()
    summary.update(participants=args.participants, min_age=args.min_age, max_age=args.max_age)
    if not ex.lines:
        reasons = sorted({f.skipped for f in ex.files if f.skipped}) or ["no utterance with words"]
        raise UserError(f"no utterances extracted from {len(ex.files)} files ({'; '.join(reasons)[:300]})")
    side = _write_corpus(args.out, ex.lines, summary, args.overwrite)
    if args.json:
        _print_json(dict(summary, out=str(args.out), sidecar=side))
        return
    for f in ex.files:
        age = ", ".join(f"{k} {v}" for k, v in f.ages.items()) or "no age"
        note = f" (skipped: {f.skipped})" if f.skipped else (f" (lenient parse; strict: {f.lenient})"
                                                              if f.lenient else "")
        print(f"  {f.file}: {f.lines} of {f.utterances} utterances, {age}{note}")
    bad = len(ex.problems)
    print(f"{len(ex.lines)} utterances from {summary['files_used']} files -> {args.out} (details: {side})"
          + (f"; {bad} files skipped with errors" if bad else ""))


def _cmd_train(args, paths):
    from lora_project.training.run import train_adapter

    cfg = _load_cfg(args, paths)
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    res = train_adapter(paths, args.name, cfg, adapter_name=args.adapter_name, overwrite=args.overwrite,
                        use_mlflow=not args.no_mlflow, progress=not args.no_progress, resume=args.resume,
                        log=log)
    if res.get("rank", 0) != 0:
        return  # torchrun worker: rank 0 reports
    if args.json:
        _print_json(res)
    else:
        b, a = res["metrics_before"], res["metrics_after"]
        print(f"validation perplexity {b['perplexity']:.3f} -> {a['perplexity']:.3f}; "
              f"{res['tokens_seen']} tokens at {res['tokens_per_second']:.0f} tokens/s")
        print(f"adapter: {res['adapter_dir']}\nexperiment: {res['experiment_dir']}")
        if res.get("mlflow_run_id"):
            print(f"MLflow run: {res['mlflow_run_id']}")


def _cmd_train_batch(args, paths):
    from lora_project.config import read_yaml
    from lora_project.data.catalog import load_catalog
    from lora_project.training.batch import (
        load_batch_overrides,
        summary_table,
        train_batch,
    )

    names = _select_datasets(args, load_catalog(paths.catalog))
    batch_file = args.batch_config or (paths.config_dir / "batch_config.yaml")
    if args.batch_config is None and not batch_file.is_file():
        batch_file = None
    overrides = load_batch_overrides(batch_file, names)
    files = [args.model_config or paths.model_config] + (args.config or [paths.training_config])
    sources = [(str(f), read_yaml(f)) for f in files]
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    summary = train_batch(paths, names, sources, args.overrides, overrides, overwrite=args.overwrite,
                          use_mlflow=not args.no_mlflow, progress=not args.no_progress, fused=args.fused, log=log)
    if args.json:
        _print_json(summary)
    else:
        print("\n" + summary_table(summary["datasets"]))
        print(f"\nsummary: {summary['report']['markdown']}")
    failed = [r for r in summary["datasets"] if r["status"] == "failed"]
    if failed:
        print(f"error: {len(failed)} of {len(names)} dataset(s) failed: "
              + "; ".join(f"{r['dataset']}: {r['reason']}" for r in failed), file=sys.stderr)
        raise SystemExit(1 if any(r.get("bug") for r in failed) else 2)


def _cmd_evaluate(args, paths):
    from lora_project.evaluation.evaluate import evaluate_perplexity

    cfg = _load_cfg(args, paths)
    if args.pairs is not None:
        from lora_project.evaluation.evaluate import evaluate_minimal_pairs

        res = evaluate_minimal_pairs(paths, cfg, args.pairs, adapters=args.adapter, limit=args.limit,
                                     strict=args.strict, log=lambda m: print(m, file=sys.stderr))
        if args.json:
            _print_json(res)
            return
        names = list(res["models"])
        print(f"{'paradigm':<48}" + "".join(f"{n[:14]:>15}" for n in names))
        for uid in res["models"]["base"]["paradigms"]:
            print(f"{uid:<48}" + "".join(f"{res['models'][n]['paradigms'][uid]['accuracy']:>15.3f}" for n in names))
        print(f"{'macro average':<48}" + "".join(f"{res['models'][n]['macro_accuracy']:>15.3f}" for n in names))
        print(f"{res['pairs']} pairs in {res['seconds']:.0f} s; saved {res['saved']}")
        return
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


def _cmd_generate_text(args, paths):
    from lora_project.data.preprocessor import read_text_file
    from lora_project.evaluation.generation import generate_side_by_side

    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line.strip() for line in read_text_file(args.prompts_file).splitlines() if line.strip()]
    res = generate_side_by_side(_load_cfg(args, paths), prompts, args.adapter, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if args.json:
        _print_json(res)
        return
    for sample in res["samples"]:
        print(f"== {sample['prompt']!r}")
        for model, text in sample.items():
            if model != "prompt":
                print(f"  [{model}] {' '.join(text.split())}")


def _cmd_benchmark(args, paths):
    from lora_project.benchmark import (
        parse_shapes,
        run_benchmark,
        write_report,
    )

    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    shapes = parse_shapes(args.shapes)
    cfg = _load_cfg(args, paths)
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    result = run_benchmark(paths, cfg, quick=args.quick, shapes=shapes, steps=args.steps, log=log)
    if args.matrix:
        from lora_project.benchmark import cross_matrix

        log("cross-evaluation matrix ...")
        result["matrix"] = cross_matrix(paths, cfg, log=log)
    if args.reference:
        from lora_project.benchmark import compare_with_reference

        if args.reference_steps < 2:
            raise UserError("--reference-steps must be at least 2 (the first step is not timed)")
        result["reference_comparison"] = compare_with_reference(paths, cfg, steps=args.reference_steps, log=log)
    json_path, md_path = write_report(paths, result)
    result["report"] = {"json": str(json_path), "markdown": str(md_path)}
    if cfg.tracking.mlflow and not args.no_mlflow:
        from lora_project.benchmark import log_to_mlflow

        heat = (result.get("matrix") or {}).get("heatmap")
        result["mlflow_run_id"] = log_to_mlflow(paths, cfg, result, [json_path, md_path, heat])
    if args.json:
        _print_json(result)
    else:
        print(f"report: {md_path}")


def _inspect_base(adapter, args, paths):
    """Base weights for relative updates: the adapter's recorded base folder, else the configured model."""
    from lora_project.models.adapter import BaseWeights

    if adapter.base_directory is not None:
        return BaseWeights(adapter.base_directory)
    from lora_project.models.base_model import resolve_model

    cfg = _load_cfg(args, paths)
    return BaseWeights(resolve_model(cfg.model.source, cfg.model.revision).directory)


def _cmd_inspect(args, paths):
    from lora_project.inspection import analysis
    from lora_project.inspection.analysis import select_modules
    from lora_project.models.adapter import list_adapters, load_adapter
    from lora_project.utils.tables import fmt_table

    out_root = getattr(args, "out", None) or paths.metrics_dir / "inspect"
    if args.inspect_command == "adapters":
        rows = list_adapters(args.dir or paths.adapters_dir)
        if args.filter:
            rows = [r for r in rows if args.filter in r["name"] or args.filter in str(r.get("dataset") or "")]
        if rows and args.sort not in rows[0]:
            raise UserError(f"--sort: unknown column '{args.sort}'; columns: {', '.join(rows[0])}")
        rows.sort(key=lambda r: (r.get(args.sort) is None, r.get(args.sort) if r.get(args.sort) is not None else 0))
        if args.json:
            _print_json({"adapters": rows})
            return
        if not rows:
            print("no adapters found")
            return
        for r in rows:
            r["targets"] = ",".join(r.get("target_modules") or [])
            r["size_kb"] = r["size_bytes"] / 1024
        print(fmt_table(rows, [("name", "adapter", ""), ("status", "status", ""), ("dataset", "dataset", ""),
                                        ("r", "r", ""), ("alpha", "alpha", ""), ("targets", "targets", ""),
                                        ("trainable_parameters", "params", ""), ("size_kb", "KiB", ".0f"),
                                        ("perplexity_after", "val ppl", ".2f"), ("created", "created", ""),
                                        ("reason", "reason", "")]))
        return
    if args.inspect_command == "weights":
        if args.top_k < 1:
            raise UserError("--top-k must be at least 1")
        adapter = load_adapter(args.adapter)
        report = analysis.analyse_weights(adapter, _inspect_base(adapter, args, paths), args.top_k)
        report["plots"] = [str(p) for p in analysis.plot_weights(report, out_root / adapter.path.name)]
        if args.json:
            _print_json(report)
            return
        print(fmt_table(report["modules"], [
            ("name", "module", ""), ("A_fro_norm", "|A|F", ".3f"), ("B_fro_norm", "|B|F", ".3f"),
            ("delta_fro_norm", "|dW|F", ".4f"), ("relative_update", "|dW|/|W0|", ".2e"),
            ("spectral_norm", "|dW|2", ".4f"), ("stable_rank", "stable r", ".2f"),
            ("effective_rank", "eff r", ".2f")]))
        for key in ("by_module", "by_layer"):
            print(f"\n{key.replace('_', ' ')}:")
            rows = [{"group": k, **v} for k, v in report[key].items()]
            print(fmt_table(rows, [("group", "group", ""), ("modules", "n", ""),
                                            ("mean_delta_fro_norm", "mean |dW|F", ".4f"),
                                            ("mean_relative_update", "mean |dW|/|W0|", ".2e"),
                                            ("mean_effective_rank", "mean eff r", ".2f")]))
        print("\nplots: " + ", ".join(report["plots"]))
        return
    if args.inspect_command == "values":
        import numpy as np

        adapter = load_adapter(args.adapter)
        out_dir = out_root / adapter.path.name
        result = []
        for m in select_modules(adapter, args.module):
            vals = analysis.module_values(m)
            entry = {"name": m.name, "stats": {k: analysis.value_stats(v) for k, v in vals.items()}}
            safe = m.name.replace("/", "_")
            entry["histogram"] = str(analysis.plot_histograms(adapter.path.name, m, vals, out_dir / f"{safe}_hist.png"))
            if args.export:
                entry["exports"] = []
                for k, v in vals.items():
                    f = out_dir / f"{safe}.{k}.{args.export}"
                    if args.export == "npy":
                        np.save(f, v, allow_pickle=False)
                    else:
                        np.savetxt(f, v, delimiter=",", fmt="%.8g")
                    entry["exports"].append(str(f))
            result.append(entry)
            if not args.json:
                print(f"== {m.name}  (scale {m.scale:g})")
                with np.printoptions(precision=4, suppress=False, linewidth=120):
                    for k, v in vals.items():
                        st = entry["stats"][k]
                        print(f"{k} {tuple(v.shape)}: mean {st['mean']:.3e} std {st['std']:.3e} min {st['min']:.3e} "
                              f"max {st['max']:.3e} mean|x| {st['mean_abs']:.3e} near-zero {st['near_zero_fraction']:.1%}")
                        print(v[:args.rows, :args.cols])
                print(f"histogram: {entry['histogram']}")
        if args.json:
            _print_json({"adapter": adapter.path.name, "modules": result})
        return
    if args.inspect_command == "compare":
        a, b = load_adapter(args.a), load_adapter(args.b)
        if args.max_rank is not None and args.max_rank < 1:
            raise UserError("--max-rank must be at least 1")
        base = _inspect_base(a, args, paths)
        report = analysis.compare_adapters(a, b, base, args.max_rank)
        report["plots"] = [str(p) for p in analysis.plot_compare(report, out_root)]
        if args.json:
            _print_json(report)
            return
        print(fmt_table(report["modules"], [
            ("name", "module", ""), ("phi_top1", "phi(1,1)", ".3f"), ("phi_full", "phi(r,r)", ".3f"),
            ("amplification_a", f"ampl {report['a']}", ".2f"), ("amplification_b", f"ampl {report['b']}", ".2f")]))
        print(f"\nmean phi(1,1) {report['mean_phi_top1']:.3f}; mean phi(r,r) {report['mean_phi_full']:.3f} "
              f"(two random subspaces: ~{report['random_baseline_full']:.3f})")
        print("plots: " + ", ".join(report["plots"]))


def _cmd_merge(args, paths):
    from lora_project.models.base_model import load_base
    from lora_project.models.lora_model import check_adapter_dir
    from lora_project.models.merge import export_merged_model, merge_adapters
    from lora_project.paths import check_name

    if not args.name and not args.export_model:
        raise UserError("give --name for a merged adapter and/or --export-model DIR for a full model")
    if args.export_model and len(args.adapters) != 1 and not args.name:
        raise UserError("--export-model bakes one adapter into the base; name one adapter, or also --name")
    for d in args.adapters:
        check_adapter_dir(d)
    weights = [1.0 / len(args.adapters)] * len(args.adapters)
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise UserError(f"--weights: {args.weights!r} is not a comma-separated list of numbers") from None
    target = paths.adapter(check_name(args.name, "adapter name")) if args.name else None
    if target is not None and target.exists() and not args.overwrite:
        raise UserError(f"adapter {target} already exists; pass --overwrite to replace it")
    if args.export_model and args.export_model.exists() and not args.overwrite:
        raise UserError(f"{args.export_model} already exists; pass --overwrite to replace it")
    cfg = _load_cfg(args, paths)
    # Merging is exact arithmetic on the weights: always in fp32, whatever training uses.
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, precision="fp32"))
    base = load_base(cfg)
    out = {}
    if target is not None:
        out["adapter"] = str(merge_adapters(base, list(args.adapters), weights, args.method, target,
                                            args.density, args.overwrite))
    if args.export_model:
        source = target if target is not None else args.adapters[0]
        out["model"] = str(export_merged_model(base, source, args.export_model, args.overwrite))
    if args.json:
        _print_json(out)
    else:
        for k, v in out.items():
            print(f"wrote {k}: {v}")


def _cmd_config(args, paths):
    from lora_project.config import explain

    if args.explain:
        print(explain())
    else:
        print(_load_cfg(args, paths).to_yaml(), end="")


COMMANDS = {
    "demo": _cmd_demo,
    "generate-data": _cmd_generate_data,
    "prepare": _cmd_prepare,
    "extract": _cmd_extract,
    "extract-children": _cmd_extract_children,
    "train": _cmd_train,
    "train-batch": _cmd_train_batch,
    "evaluate": _cmd_evaluate,
    "generate": _cmd_generate_text,
    "benchmark": _cmd_benchmark,
    "inspect": _cmd_inspect,
    "merge": _cmd_merge,
    "config": _cmd_config,
}


# Failures of the machine, not of the program: a clear line and exit 2 like other bad input.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit code (0 ok, 2 bad input, 130 interrupted, 1 a bug)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from lora_project.paths import ProjectPaths
    from lora_project.utils.logging_utils import quiet_libraries

    quiet_libraries()
    interrupts.install()
    try:
        handler = getattr(args, "handler", None) or COMMANDS[args.command]
        handler(args, ProjectPaths.discover())
        return 0
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, RunInterrupted):
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise  # anything else is a bug: exit 1 with the traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where} (earlier outputs were left as they were)", file=sys.stderr)
        return 2
    finally:
        if "torch.distributed" in sys.modules:  # leave a torchrun process group cleanly
            from lora_project.training.distributed import dist_info, shutdown

            shutdown(dist_info())


if __name__ == "__main__":
    raise SystemExit(main())
