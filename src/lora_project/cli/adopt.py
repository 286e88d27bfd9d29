"""`lora-project adopt OLD_DIR [--apply] | --undo MANIFEST`: move an existing LoRA project in."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_project.cli._common import print_json
from lora_project.errors import UserError

EPILOG = """\
examples:
  lora-project adopt ~/old-lora-work                 # the plan: what goes where (nothing changes)
  lora-project adopt ~/old-lora-work --apply         # copy it in (OLD_DIR is only read)
  lora-project adopt ~/old-lora-work --apply --json  # the result as one JSON object
  lora-project adopt --undo outputs/adopt/adopt_20260101-120000-000000.json
"""


def register(sub) -> None:
    p = sub.add_parser(
        "adopt", help="move an existing LoRA project in: adapters, data, MLflow runs, scripts (plan first)",
        description="Scan an old project folder and classify every file: PEFT adapters (also in Trainer "
                    "checkpoints and in .bin form, converted with torch.load(weights_only=True)), raw data "
                    "(one catalog row per file, format guessed), CHAT transcripts, MLflow file stores "
                    "(imported with params, metric histories, tags and artifacts), scripts, notebooks and "
                    "configs (under */legacy/). Prints the plan; --apply copies (OLD_DIR is never changed), "
                    "checks every copy by sha256 and writes a manifest under outputs/adopt/; adopting the "
                    "same folder again adds nothing, and after an interrupted --apply adds what is missing; "
                    "--undo MANIFEST takes an adoption back (only a manifest adopt wrote: its sha256 is "
                    "checked against outputs/adopt/ledger.json). One --apply or --undo runs at a time.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old_dir", nargs="?", type=Path, metavar="OLD_DIR", help="the old project's folder")
    p.add_argument("--apply", action="store_true", help="carry out the plan (default: only print it)")
    p.add_argument("--undo", type=Path, metavar="MANIFEST",
                   help="remove what the adoption recorded in MANIFEST added (outputs/adopt/adopt_*.json)")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object: {"items": [...], "totals": {...}, "manifest": path-or-null}')
    p.set_defaults(handler=run)


def run(args, paths) -> None:
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    if args.undo is not None:
        if args.old_dir is not None or args.apply:
            raise UserError("--undo MANIFEST takes no OLD_DIR and no --apply")
        from lora_project.adopt.undo import undo_adoption

        result = undo_adoption(paths, args.undo, log=None if args.json else log)
        if args.json:
            print_json(result)
        else:
            t = result["totals"]
            print(f"undone: {t['files_removed']} files removed, {t['files_kept']} changed files kept, "
                  f"{len(t['catalog_rows_removed'])} catalog rows and {t['mlflow_runs_removed']} MLflow runs removed")
        return
    if args.old_dir is None:
        raise UserError("give the old project's folder (lora-project adopt OLD_DIR), or --undo MANIFEST")
    from lora_project.adopt import adopt

    result, text = adopt(paths, args.old_dir, apply=args.apply, log=log if args.apply else None)
    if args.json:
        print_json(result)
    else:
        print(text)
