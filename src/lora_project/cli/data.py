"""Data commands: `generate-data`, `prepare`, `extract`, `extract-children`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_project.cli._common import (
    add_config_args,
    add_json,
    add_number,
    add_overwrite,
    add_seed,
    load_cfg,
    print_json,
    progress_log,
    select_datasets,
)
from lora_project.errors import UserError


def _add_extract_output_args(p: argparse.ArgumentParser, what: str) -> None:
    """Flags shared by extract and extract-children."""
    p.add_argument("--out", type=Path, required=True, help="output text file (a sidecar <out>.json is written too)")
    p.add_argument("--encoding", default="utf-8", help=f"text encoding of the {what} (default: utf-8)")
    add_overwrite(p, "replace an existing output file")
    add_json(p, "print a JSON summary")


def register(sub) -> None:
    from lora_project.data.extract import SOURCE_FORMATS

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
    add_overwrite(p, help="replace an existing --out file (the default outputs under data/raw/ are generated "
                        "data and are always regenerated)")
    add_number(p, "--batch-size", int, 1, 1024, default=4, help="stories: prompts generated together (default: 4)")
    p.add_argument("--no-progress", action="store_true", help="stories: no progress bar")
    add_config_args(p)
    add_number(p, "--lines", int, 1, 10_000_000, help="number of utterances (default: the grammar's default_lines)")
    add_seed(p, "random seed")
    add_json(p, "print a JSON summary")
    p.set_defaults(handler=run_generate_data)

    p = sub.add_parser("prepare", help="clean and split catalog datasets into data/processed/",
                       description="Turn catalog rows (config/dataset_catalog.csv) into "
                                   "data/processed/<name>/{train,validation,test}.txt + stats.json. "
                                   "Unchanged inputs are skipped.")
    p.add_argument("names", nargs="*", help="dataset names from the catalog")
    p.add_argument("--all", action="store_true", help="every enabled catalog row")
    p.add_argument("--force", action="store_true", help="rebuild even when inputs are unchanged")
    p.add_argument("--no-tokens", action="store_true",
                   help="skip the per-split token counts (they load the base model's tokenizer)")
    add_json(p, "print the stats as JSON")
    p.set_defaults(handler=run_prepare)

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
    p.add_argument("--format", default="auto", choices=("auto", *SOURCE_FORMATS),
                   help="source format (default: from the file suffix)")
    p.add_argument("--text-field", help="field or column holding the text (default: text)")
    p.add_argument("--sep", help="document separator for --format separator, e.g. '<|endoftext|>'")
    p.add_argument("--one-line", action="store_true", help="collapse each document's whitespace to one line")
    p.set_defaults(handler=run_extract)

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
    p.set_defaults(handler=run_extract_children)


def run_generate_data(args, paths) -> None:
    if args.kind == "stories":
        from lora_project.data.stories import write_stories

        summary = write_stories(load_cfg(args, paths), args.grammar or paths.config_dir / "story_themes.yaml",
                                args.out or paths.raw_dir / "stories.txt", args.lines, args.seed,
                                batch_size=args.batch_size, progress=not (args.no_progress or args.json),
                                overwrite=args.overwrite or args.out is None)
        if args.json:
            print_json(summary)
        else:
            print(f"wrote {summary['stories']} stories to {summary['out']} ({summary['duplicates']} duplicates "
                  f"and {summary['unfinished']} unfinished dropped)")
        return
    from lora_project.data.generator import OUTPUT_NAMES, generate_corpus

    grammar = args.grammar or paths.config_dir / "grammars" / f"{args.kind}.yaml"
    out = args.out or paths.raw_dir / OUTPUT_NAMES[args.kind]
    summary = generate_corpus(grammar, out, seed=args.seed, n_lines=args.lines,
                              overwrite=args.overwrite or args.out is None)
    if args.json:
        print_json(summary)
    else:
        print(f"wrote {summary['lines']} lines ({summary['unique_lines']} unique) to {out}")


def run_prepare(args, paths) -> None:
    from lora_project.data.catalog import load_catalog
    from lora_project.data.dataset_loader import prepare_datasets

    catalog = load_catalog(paths.catalog)
    names = select_datasets(args, catalog)
    out, failed = {}, {}
    for n, prep, error in prepare_datasets(paths, names, force=args.force, catalog=catalog,
                                           progress=not args.json, log=progress_log(args.json),
                                           count_tokens=not args.no_tokens):
        if error is not None:
            failed[n] = error
            print(f"failed: {error}", file=sys.stderr)
            continue
        out[n] = prep.stats
        if not args.json:
            s = prep.stats["splits"]
            state = "unchanged, skipped" if prep.skipped else "prepared"
            tokens = f", {s['train']['tokens']:,} train tokens" if "tokens" in s["train"] else ""
            print(f"{n}: {state} -> {prep.folder} (train {s['train']['documents']}, validation "
                  f"{s['validation']['documents']}, test {s['test']['documents']} documents{tokens})")
    if args.json:
        print_json(out)
    if failed:
        raise UserError(f"{len(failed)} of {len(names)} datasets failed: {', '.join(failed)}")


def run_extract(args, paths) -> None:
    from lora_project.data.extract import extract_corpus

    summary = extract_corpus(args.paths, args.out, args.format, args.text_field or "", args.sep, args.encoding,
                             one_line=args.one_line, overwrite=args.overwrite)
    if args.json:
        print_json(summary)
    else:
        print(f"{summary['documents']} documents from {sum(i['files'] for i in summary['sources'])} files "
              f"-> {args.out} (details: {summary['sidecar']})")


def run_extract_children(args, paths) -> None:
    from lora_project.data.childes import extract_children_corpus

    ex, summary = extract_children_corpus(args.paths, args.out, args.participants, args.min_age, args.max_age,
                                          encoding=args.encoding, overwrite=args.overwrite)
    if args.json:
        print_json(summary)
        return
    for f in ex.files:
        age = ", ".join(f"{k} {v}" for k, v in f.ages.items()) or "no age"
        note = f" (skipped: {f.skipped})" if f.skipped else (f" (lenient parse; strict: {f.lenient})"
                                                              if f.lenient else "")
        print(f"  {f.file}: {f.lines} of {f.utterances} utterances, {age}{note}")
    bad = len(ex.problems)
    print(f"{len(ex.lines)} utterances from {summary['files_used']} files -> {args.out} (details: {summary['sidecar']})"
          + (f"; {bad} files skipped with errors" if bad else ""))
