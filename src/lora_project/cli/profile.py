"""`lora-project profile`: child-language profile of a corpus, and of what adapters say."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_project.cli._common import add_config_args, add_json, add_number, add_sampling_args

EXAMPLES = """\
examples:
  lora-project profile --dataset toddler_data                       # the test split's profile
  lora-project profile --text data/raw/children.txt                 # one utterance per line
  lora-project profile --chat ../shared/data/childes/pylangacq/eve_010600a.cha --participant CHI
  lora-project profile --dataset toddler_data --adapter adapters/toddler_data_lora --samples 200 --seed 0
  lora-project profile --dataset toddler_data --base --samples 100 --json
"""


PROFILE_DESCRIPTION = """\
Profile a corpus (MLU in words and morphemes, MATTR over 50-word windows, one/two-word utterances, top
words, Brown stage) and, with --adapter, utterances sampled from the base and each adapter: distance to
the corpus (JS divergence) and novelty against the train split, with the corpus's own test-vs-train
figures as the chance baseline."""


def register(sub) -> None:
    p = sub.add_parser("profile", help="child-language profile (MLU, MATTR, Brown stage, novelty) of a corpus "
                                       "and of adapters' samples",
                       description=PROFILE_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    src = p.add_argument_group("source (exactly one)")
    src.add_argument("--dataset", metavar="NAME", help="a prepared dataset (lora-project prepare NAME)")
    src.add_argument("--split", default="test", choices=("train", "validation", "test"),
                     help="split of --dataset to profile (default: test)")
    src.add_argument("--text", type=Path, metavar="FILE", help="a text file, one utterance per line")
    src.add_argument("--chat", type=Path, metavar="FILE_OR_FOLDER", help="CHAT transcript(s): .cha, folder or .zip")
    src.add_argument("--participant", default="CHI", help="speaker code or role for --chat (default: CHI)")
    src.add_argument("--encoding", default="utf-8", help="text encoding of --text/--chat (default: utf-8)")
    smp = p.add_argument_group("sampling (needs --dataset)")
    smp.add_argument("--adapter", dest="adapters", action="append", default=[], type=Path, metavar="DIR",
                     help="adapter folder to sample from (repeatable); the base is sampled too")
    smp.add_argument("--base", action="store_true", help="sample the base model even without --adapter")
    add_number(smp, "--samples", int, 1, 100_000, metavar="N", help="utterances per model (default: 200)")
    smp.add_argument("--prompts", default="start", choices=("start", "empty"),
                     help="prompt: first word of a corpus utterance (start, default) or nothing (empty)")
    add_sampling_args(smp, max_new_tokens=32, temperature=1.0, top_p=1.0, greedy_ok=False,
                      seed_help="seed of prompts and sampling")
    add_number(p, "--top", int, 1, 100_000, default=20, help="how many most frequent words to report (default: 20)")
    add_config_args(p)
    p.add_argument("--no-mlflow", action="store_true", help="do not add the figures to the adapters' MLflow runs")
    add_json(p, "print the report as one JSON object")
    p.set_defaults(handler=run)


def run(args, paths) -> None:
    from lora_project.profile.report import (
        ProfileRequest,
        format_report,
        run_profile,
        summary_json,
    )

    config_files = None
    if args.config or args.model_config:
        config_files = [args.model_config or paths.model_config] + (args.config or [paths.training_config])
    report = run_profile(paths, ProfileRequest(
        dataset=args.dataset, split=args.split, text=args.text, chat=args.chat, participant=args.participant,
        encoding=args.encoding, adapters=list(args.adapters), samples=args.samples, base=args.base, seed=args.seed,
        prompts=args.prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top=args.top, config_files=config_files, overrides=list(args.overrides), mlflow=not args.no_mlflow,
        log=lambda m: print(m, file=sys.stderr, flush=True)))
    print(summary_json(report) if args.json else format_report(report))
