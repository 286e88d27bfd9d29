"""The BabyLM 2025 zero-shot tasks as the official pipeline defines them, read from its data folder.

Every task but reading is a ranking of options: each option is a full text, of which only the
*completion* (its end) is scored, and option 0 is always the right one.

- blimp (`blimp_filtered/`), supplement (`supplement_filtered/`): sentence_good against
  sentence_bad, the whole sentence scored; UID from the line (a file without a `field` key is one
  paradigm named after the file, as upstream decides it).
- ewok (`ewok_filtered/`): `Context1 + " " + Target1` against `Context1 + " " + Target2`, only the
  target scored (`Context2` is not used); UID = `Domain`.
- entity_tracking (`entity_tracking/`): `input_prefix + option` for each of the options, only the
  option scored; UID = `<file>_<numops>_ops`.
- wug (`wug_adj_nominalization/`): the two tab-separated sentences, whole; the human `ratio` kept.
- reading (`reading/reading_data.csv`): word-by-word rows (evaluation/reading.py).

Texts are used exactly as written (no stripping): the official scorer does not strip either. A
line that is not what its task needs is skipped with a warning, or refused with `strict`, as
`evaluate --pairs` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lora_project.errors import UserError
from lora_project.utils.text_io import read_user_text

#: Every task in the order reports list them, and the data folder each lives in.
TASKS = ("blimp", "supplement", "ewok", "entity_tracking", "wug", "reading")
FOLDERS = {"blimp": "blimp_filtered", "supplement": "supplement_filtered", "ewok": "ewok_filtered",
           "entity_tracking": "entity_tracking", "wug": "wug_adj_nominalization", "reading": "reading"}
READING_FILE = "reading_data.csv"
#: entity tracking's headline: the mean over these files of the mean over their numops subsets
ENTITY_FILES = ("regular", "ambiref", "move_contents")


@dataclass(frozen=True)
class RankItem:
    """One item of a ranking task: the options as full texts (option 0 is the right one) and the
    completion of each, its last characters, which alone are scored."""
    task: str
    uid: str
    texts: tuple[str, ...]
    completions: tuple[str, ...]
    where: str = ""  # "<file> line <n>", for listings
    ratio: float | None = None  # wug: the share of people who preferred the first sentence
    extra: dict = field(default_factory=dict, compare=False, hash=False)


def parse_tasks(spec: str | None) -> list[str]:
    """`--tasks a,b,c` as a list in report order; unknown names are refused with the valid ones."""
    if spec is None:
        return list(TASKS)
    asked = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in asked if t not in TASKS]
    if unknown or not asked:
        raise UserError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(TASKS)}")
    return [t for t in TASKS if t in asked]


def task_path(root: Path, task: str) -> Path:
    path = Path(root) / FOLDERS[task]
    return path / READING_FILE if task == "reading" else path


def _decode(task: str, obj: dict, stem: str) -> RankItem | str:
    """The item of one JSON object, or why it is not one."""
    def texts(*keys):
        vals = [obj.get(k) for k in keys]
        missing = [k for k, v in zip(keys, vals) if k not in obj]
        if missing:
            return f"no '{missing[0]}' field"
        if not all(isinstance(v, str) and v.strip() for v in vals):
            return f"{', '.join(keys)} must be non-empty strings"
        return vals

    if task in ("blimp", "supplement"):
        v = texts("sentence_good", "sentence_bad")
        if isinstance(v, str):
            return v
        if "field" in obj and "UID" not in obj:  # the official files name their paradigm in UID
            return "no 'UID' field"
        uid = obj.get("UID") if "field" in obj else stem
        if not isinstance(uid, str) or not uid.strip():
            return "UID must be a non-empty string"
        return RankItem(task, uid, tuple(v), tuple(v))
    if task == "ewok":
        v = texts("Domain", "Context1", "Target1", "Target2")
        if isinstance(v, str):
            return v
        domain, context, t1, t2 = v
        return RankItem(task, domain, (f"{context} {t1}", f"{context} {t2}"), (t1, t2))
    if task == "entity_tracking":
        v = texts("input_prefix")
        if isinstance(v, str):
            return v
        options, numops = obj.get("options"), obj.get("numops")
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o for o in options):
            return "options must be a list of at least two non-empty strings"
        if isinstance(numops, bool) or not isinstance(numops, (int, str)):
            return "numops must be a number"
        prefix = v[0]
        return RankItem(task, f"{stem}_{numops}_ops", tuple(prefix + o for o in options), tuple(options),
                        extra={"file": stem})
    if task == "wug":
        v = texts("sentences")
        if isinstance(v, str):
            return v
        parts = v[0].split("\t")
        ratio = obj.get("ratio")
        if len(parts) < 2 or not all(parts):
            return "sentences must hold two or more tab-separated sentences"
        try:
            ratio = float(ratio)
        except (TypeError, ValueError):
            return "ratio must be a number"
        return RankItem(task, "wug_adj_nominalization", tuple(parts), tuple(parts), ratio=ratio)
    raise ValueError(task)


def load_task(root: Path, task: str, strict: bool = False, warn=print) -> list[RankItem] | None:
    """The items of one ranking task under the data folder `root`, or None when its folder is
    missing (the caller skips the task with one line). Bad lines: warned and skipped, or with
    `strict` refused (exit 2 naming the first few)."""
    folder = task_path(root, task)
    if not folder.is_dir():
        return None
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise UserError(f"no .jsonl files in {folder}")
    items, problems = [], []
    for f in files:
        text = read_user_text(f, what="JSON lines", encoding_option=False)
        for n, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                problems.append(f"{f.name} line {n}: not valid JSON")
                continue
            got = _decode(task, obj, f.stem) if isinstance(obj, dict) else "expected a JSON object"
            if isinstance(got, str):
                problems.append(f"{f.name} line {n}: {got}")
                continue
            items.append(RankItem(got.task, got.uid, got.texts, got.completions, f"{f.name} line {n}", got.ratio,
                                  got.extra))
    if problems:
        if strict:
            raise UserError(f"{len(problems)} bad line(s) in {folder}: " + "; ".join(problems[:5]))
        warn(f"warning: {task}: skipped {len(problems)} bad line(s): " + "; ".join(problems[:5]))
    if not items:
        raise UserError(f"no usable {task} items in {folder}")
    return items
