"""Scoring commands: `evaluate` (perplexity, bits/byte, minimal pairs, the BabyLM suite) and `generate` (side-by-side text)."""

from __future__ import annotations

import sys
from pathlib import Path

from lora_project.cli._common import (
    add_cluster,
    add_config_args,
    add_json,
    add_number,
    add_sampling_args,
    load_cfg,
    print_json,
)
from lora_project.errors import UserError


EVALUATE_DESCRIPTION = """\
Score a text file (--text, the whole content as one text) or a prepared split (--dataset/--split) with
the base model and each --adapter, using the sliding-window method; BOS is prefixed so every token is
scored once. A split is scored whole (the same scoring as training's validation numbers) with bootstrap
95% intervals over documents and a paired interval for each adapter's change."""


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="perplexity and bits/byte of the base and adapters",
                       description=EVALUATE_DESCRIPTION)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", type=Path, metavar="FILE", help="UTF-8 text file scored as one text")
    src.add_argument("--dataset", metavar="NAME", help="prepared catalog dataset")
    src.add_argument("--pairs", type=Path, action="append", metavar="PATH",
                     help="BLiMP-style minimal pairs: a .jsonl file or a folder of them (accuracy, not perplexity); "
                          "repeatable, each reported as its own suite (e.g. BLiMP and the BabyLM supplement)")
    src.add_argument("--babylm", type=Path, metavar="DIR",
                     help="the BabyLM 2025 zero-shot suite in DIR (blimp_filtered/, supplement_filtered/, "
                          "ewok_filtered/, entity_tracking/, wug_adj_nominalization/, reading/): every task with "
                          "the official pipeline's definitions, headlines in its units, intervals and each "
                          "adapter's paired change; a missing task folder is skipped")
    p.add_argument("--tasks", metavar="LIST", help="--babylm: comma-separated subset of blimp, supplement, ewok, "
                                                   "entity_tracking, wug, reading (default: all)")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"),
                   help="split of --dataset (default: test)")
    p.add_argument("--adapter", type=Path, action="append", default=[], metavar="DIR",
                   help="adapter folder (repeatable); results keyed by folder name")
    add_number(p, "--limit", int, 1, 10**9, metavar="N",
               help="--pairs, --babylm: at most N pairs (items) per paradigm (UID), seeded sample; reading: N rows")
    p.add_argument("--strict", action="store_true", help="--pairs, --babylm: fail on a bad line instead of skipping it")
    p.add_argument("--first-pass", default="auto", choices=("auto", "fp32", "bf16"),
                   help="--pairs: precision of the first pass (auto: fp32, exact by construction); after a bf16 "
                        "pass, pairs within its measured error margin are re-scored in fp32, which is not a "
                        "guarantee: on the whole filtered BLiMP 2 of 59,875 pairs erred beyond it (no decision "
                        "changed), so use fp32 where decisions must equal fp32 scoring")
    p.add_argument("--no-progress", action="store_true", help="--pairs, --babylm: no progress bar (it is drawn on a "
                                                              "terminal only)")
    add_cluster(p, "--pairs: score the pairs in shards")
    add_number(p, "--max-length", int, 2, 131072, help="window length in tokens (default 1024, or the model's "
               "context where its learned positions stop sooner, as for GPT-2)")
    add_number(p, "--stride", int, 1, 131072, help="window step in tokens (default: max-length / 2)")
    add_number(p, "--max-tokens", int, 0, 10**12, default=0, metavar="N",
               help="--dataset: score only the leading documents that fit in N tokens (default 0: the whole "
                    "split); the output says what was scored")
    add_config_args(p)
    add_json(p)
    p.set_defaults(handler=run_evaluate)

    p = sub.add_parser("generate", help="continue prompts with the base and each adapter, side by side",
                       description="Print continuations of prompts from the base model and from each --adapter. "
                                   "Greedy by default; --temperature > 0 samples (seeded, so reruns match).")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", type=Path, help="UTF-8 file with one prompt per line")
    p.add_argument("--adapter", type=Path, action="append", default=[], metavar="DIR", help="adapter folder (repeatable)")
    add_sampling_args(p, max_new_tokens=30, temperature=0.0, top_p=0.95, greedy_ok=True, seed_help="sampling seed")
    add_config_args(p)
    add_json(p)
    p.set_defaults(handler=run_generate)


def run_evaluate(args, paths) -> None:
    # options of the other mode would be ignored without a word: refused instead
    if args.cluster is not None and args.pairs is None:
        raise UserError("--cluster: evaluate runs on a cluster with --pairs only (so far); leave it out")
    perplexity = [o for o, v in (("--max-length", args.max_length), ("--stride", args.stride),
                                 ("--max-tokens", args.max_tokens), ("--split", args.split != "test")) if v]
    pairs = [o for o, v in (("--limit", args.limit), ("--strict", args.strict), ("--no-progress", args.no_progress),
                            ("--first-pass", args.first_pass != "auto")) if v]
    shared = {"--limit", "--strict", "--no-progress"}  # options --babylm takes too
    if args.babylm is not None:
        odd = perplexity + [o for o, v in (("--first-pass", args.first_pass != "auto"),) if v]
        if odd:
            raise UserError(f"{', '.join(odd)}: not with --babylm; leave it out")
        return run_babylm(args, paths)
    if args.tasks is not None:
        raise UserError("--tasks: for --babylm only; add --babylm DIR or leave it out")
    if args.pairs is not None and perplexity:
        raise UserError(f"{', '.join(perplexity)}: for perplexity only, not with --pairs; leave it out")
    if args.pairs is None and pairs:
        where = "for --pairs or --babylm; add one" if set(pairs) <= shared else "for --pairs only; add --pairs PATH"
        raise UserError(f"{', '.join(pairs)}: {where} or leave it out")
    cfg = load_cfg(args, paths)
    if args.pairs is not None:
        from lora_project.evaluation.evaluate import evaluate_minimal_pairs
        from lora_project.evaluation.minimal_pairs import format_summary

        if args.cluster is not None:
            from lora_project.cluster.evaluate import evaluate_pairs_cluster

            res = evaluate_pairs_cluster(paths, cfg, args.pairs, args.cluster, adapters=args.adapter,
                                         limit=args.limit, strict=args.strict, first_pass=args.first_pass,
                                         log=lambda m: print(m, file=sys.stderr))
        else:
            res = evaluate_minimal_pairs(paths, cfg, args.pairs, adapters=args.adapter, limit=args.limit,
                                         strict=args.strict, first_pass=args.first_pass,
                                         progress=not args.no_progress, log=lambda m: print(m, file=sys.stderr))
        if args.json:
            print_json(res)
            return
        print(format_summary(res))
        return
    from lora_project.evaluation.evaluate import evaluate_perplexity, perplexity_table

    res = evaluate_perplexity(paths, cfg, text_file=args.text, dataset=args.dataset, split=args.split,
                              adapters=args.adapter, max_length=args.max_length, stride=args.stride,
                              max_tokens=args.max_tokens)
    if args.json:
        print_json(res)
        return
    print(perplexity_table(res))


def run_babylm(args, paths) -> None:
    from lora_project.evaluation.babylm import evaluate_babylm
    from lora_project.evaluation.babylm_tasks import parse_tasks

    parse_tasks(args.tasks)  # names checked before the config and the model load
    cfg = load_cfg(args, paths)
    res = evaluate_babylm(paths, cfg, args.babylm, tasks=args.tasks, adapters=args.adapter, limit=args.limit,
                          strict=args.strict, log=lambda m: print(m, file=sys.stderr), progress=not args.no_progress)
    if args.json:
        print_json(res)
        return
    from lora_project.evaluation.babylm_table import format_table

    print(format_table(res))


def run_generate(args, paths) -> None:
    from lora_project.evaluation.generation import generate_side_by_side

    res = generate_side_by_side(load_cfg(args, paths), args.prompt, args.adapter, prompts_file=args.prompts_file,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                seed=args.seed)
    if args.json:
        print_json(res)
        return
    for sample in res["samples"]:
        print(f"== {sample['prompt']!r}")
        for model, text in sample.items():
            if model != "prompt":
                print(f"  [{model}] {' '.join(text.split())}")
