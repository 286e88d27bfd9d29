"""`lora-project catalog add NAME PATH | list | remove NAME`: the dataset catalog, one row at a time."""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_project.cli._common import add_json, print_json

EPILOG = """\
examples:
  lora-project catalog add my_notes ~/notes/diary.txt          # copied to data/raw/my_notes.txt
  lora-project catalog add stories ~/corpora/stories.jsonl --text-field story
  lora-project catalog add brown ~/childes/Brown/              # CHAT folder -> data/childes/brown/
  lora-project catalog list
  lora-project catalog remove my_notes                         # the row only; files are kept
"""


CATALOG_DESCRIPTION = """\
Edit config/dataset_catalog.csv one row at a time. `add` classifies a data file or folder like `adopt`
does (format and text field guessed from the content; CHAT transcripts become a childes row), copies it
into data/raw/ or data/childes/ when it is outside the project, and appends an enabled row that `prepare
NAME` reads at once."""


def register(sub) -> None:
    p = sub.add_parser("catalog", help="add, list or remove dataset catalog rows",
                       description=CATALOG_DESCRIPTION,
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    csub = p.add_subparsers(dest="catalog_command", metavar="ACTION", required=True)
    from lora_project.data.extract import SOURCE_FORMATS

    a = csub.add_parser("add", help="add a row for a data file or folder (copied in)")
    a.add_argument("name", help="dataset name (letters, digits, '.', '_', '-')")
    a.add_argument("path", type=Path, help="data file or folder, anywhere on disk")
    a.add_argument("--format", choices=SOURCE_FORMATS, help="how to read it (default: guessed from the content)")
    a.add_argument("--text-field", help="field or column holding the text (default: guessed)")
    add_json(a, "print the new row as JSON")
    a.set_defaults(handler=run_add)
    li = csub.add_parser("list", help="every row, with whether its source is present")
    add_json(li, 'print {"rows": [...]}')
    li.set_defaults(handler=run_list)
    r = csub.add_parser("remove", help="remove a row (its data files are kept)")
    r.add_argument("name", help="dataset name")
    add_json(r, "print what was removed as JSON")
    r.set_defaults(handler=run_remove)


def run_add(args, paths) -> None:
    from lora_project.adopt.catalog_rows import catalog_add

    out = catalog_add(paths, args.name, args.path, fmt=args.format, text_field=args.text_field)
    if args.json:
        print_json(out)
    else:
        print(f"added catalog row '{out['name']}': {out['row']['kind']} {out['location']} ({out['guessed']})"
              + (f"; copied from {out['copied_from']}" if out["copied_from"] else ""))
        print(f"next: lora-project prepare {out['name']}")


def run_list(args, paths) -> None:
    from lora_project.adopt.catalog_rows import catalog_list

    rows = catalog_list(paths)
    if args.json:
        print_json({"rows": rows})
        return
    cols = ("name", "kind", "format", "enabled", "present", "location")
    table = [cols] + [tuple("-" if r[c] is None else str(r[c]) for c in cols) for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(cols))]
    for t in table:
        print("  ".join(t[i].ljust(widths[i]) for i in range(len(cols))).rstrip())


def run_remove(args, paths) -> None:
    from lora_project.adopt.catalog_rows import catalog_remove

    out = catalog_remove(paths, args.name)
    if args.json:
        print_json(out)
    else:
        print(f"removed catalog row '{out['removed']}' ({out['location']}); no data file was deleted")
