"""The dataset catalog: ``config/dataset_catalog.csv``, one row per dataset.

Columns (documented in docs/training_guide.md, "The dataset catalog"):

name         folder-safe dataset name; the adapter becomes ``adapters/<name>_lora``
kind         generated | local | url | hub | childes
location     generated: grammar YAML; local: file or folder in the project; url: https URL;
             hub: dataset id; childes: .cha file, folder or .zip in the project
format       how the source is read: lines (one document per line) | paragraphs (blank-line
             separated) | separator (split on the `sep` option) | gutenberg (licence header
             and footer removed, one paragraph per document) | jsonl | csv | parquet |
             hf_disk (a `save_to_disk` folder); childes rows are always one utterance per line
text_field   field holding the text for structured formats (jsonl, csv, parquet, hf_disk, hub)
sha256       expected SHA-256 of a downloaded or local source file (optional)
license      licence of the source text
description  free text
options      ``key=value`` pairs separated by ``;`` (see OPTION_KEYS; a ``;`` inside a value,
             as in ``min_age=1;06``, is kept because it is not followed by ``key=``);
             ``split_by=transcript|speaker|age_bin|document`` (childes rows; other rows:
             ``document`` = source file) keeps each group in one split (``split_seed``,
             ``age_bin_months`` tune it)
split        train/validation/test fractions, e.g. ``0.8/0.1/0.1``
enabled      true/false: whether ``--all`` includes the row

All rows are validated together; every problem is reported with its row number.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

from lora_project.data.childes import parse_age
from lora_project.data.extract import SOURCE_FORMATS
from lora_project.errors import UserError, did_you_mean, one_line
from lora_project.paths import _NAME_RE
from lora_project.utils.text_io import read_user_text

COLUMNS = ("name", "kind", "location", "format", "text_field", "sha256", "license", "description",
           "options", "split", "enabled")
REQUIRED = ("name", "kind", "location")
KINDS = ("generated", "local", "url", "hub", "childes")
FORMATS = SOURCE_FORMATS
OPTION_KEYS = {
    "seed": int, "lines": int,                      # generated rows
    "sep": str,                                     # format separator, e.g. <|endoftext|>
    "dedupe": bool, "min_chars": int, "max_chars": int,   # cleaning
    "encoding": str,                                # source text encoding (default utf-8)
    "allow_http": bool,                             # url rows: permit plain http
    "hub_split": str, "revision": str,              # hub rows: split and pinned revision
    "participants": str, "min_age": str, "max_age": str,  # childes rows: CHI,MOT ; 1;06 ; 3;00
    "split_by": str, "split_seed": int, "age_bin_months": int,  # group-aware splits (data/group_split.py)
}
_OPTION_SPLIT = re.compile(r";(?=\s*[A-Za-z_]+\s*=)")


@dataclass(frozen=True)
class CatalogEntry:
    """One validated catalog row (see the module docstring for the columns)."""
    name: str
    kind: str
    location: str
    format: str = "lines"
    text_field: str = ""
    sha256: str = ""
    license: str = ""
    description: str = ""
    options: dict = field(default_factory=dict)
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    enabled: bool = True
    row: int = 0

    def option(self, key: str, default):
        return self.options.get(key, default)


def _parse_bool(text: str) -> bool | None:
    t = text.strip().lower()
    if t in ("true", "yes", "1", "y"):
        return True
    if t in ("false", "no", "0", "n", ""):
        return False if t else None
    return None


def _parse_options(text: str, where: str, problems: list[str]) -> dict:
    out: dict = {}
    for part in [p.strip() for p in _OPTION_SPLIT.split(text) if p.strip()]:
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq:
            problems.append(f"{where}: option {part!r} is not key=value")
            continue
        if key not in OPTION_KEYS:
            problems.append(f"{where}: unknown option '{key}'{did_you_mean(key, OPTION_KEYS)}")
            continue
        typ = OPTION_KEYS[key]
        if typ is int:
            try:
                out[key] = int(value)
                if out[key] < 0:
                    raise ValueError
            except ValueError:
                problems.append(f"{where}: option {key} must be a non-negative integer, got {value!r}")
        elif typ is bool:
            b = _parse_bool(value)
            if b is None:
                problems.append(f"{where}: option {key} must be true or false, got {value!r}")
            out[key] = b
        else:
            out[key] = _unescape(value)
    return out


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def _unescape(value: str) -> str:
    """Backslash escapes in option values: \\n, \\t, \\r and \\\\; anything else (and any non-ASCII
    text) is kept exactly as written."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), value)


def _parse_split(text: str, where: str, problems: list[str]) -> tuple[float, float, float]:
    if not text.strip():
        return (0.8, 0.1, 0.1)
    parts = text.replace(",", "/").split("/")
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        problems.append(f"{where}: split {text!r} must be three numbers like 0.8/0.1/0.1")
        return (0.8, 0.1, 0.1)
    if len(vals) != 3 or any(v < 0 for v in vals) or abs(sum(vals) - 1.0) > 1e-6 or vals[0] <= 0:
        problems.append(f"{where}: split {text!r} must be three non-negative fractions summing to 1 "
                        "with a non-zero train part")
        return (0.8, 0.1, 0.1)
    return vals  # type: ignore[return-value]


def parse_catalog(text: str, source: str = "catalog") -> dict[str, CatalogEntry]:
    """Parse and validate catalog CSV text; every problem is reported at once, with row numbers."""
    problems: list[str] = []
    reader = csv.DictReader(io.StringIO(text))
    try:
        header = reader.fieldnames or []
    except csv.Error as exc:
        raise UserError(f"{source}: malformed CSV header: {exc}") from None
    if not header:
        raise UserError(f"{source}: empty catalog (expected a header row: {','.join(COLUMNS)})")
    for col in header:
        if col not in COLUMNS:
            problems.append(f"{source}: unknown column '{col}'{did_you_mean(col or '', COLUMNS)}")
    for col in REQUIRED:
        if col not in header:
            problems.append(f"{source}: missing required column '{col}'")
    if problems:
        raise UserError(one_line(problems))
    entries: dict[str, CatalogEntry] = {}
    try:
        rows = list(reader)
    except csv.Error as exc:
        raise UserError(f"{source}: malformed CSV: {exc}") from None
    for i, row in enumerate(rows, start=2):  # row 1 is the header
        where = f"{source} row {i}"
        if None in row:
            problems.append(f"{where}: more fields than columns")
            continue
        vals = {k: (v or "").strip() for k, v in row.items()}
        name = vals.get("name", "")
        if not _NAME_RE.match(name) or ".." in name:
            problems.append(f"{where}: invalid name {name!r} (letters, digits, '.', '_', '-')")
        elif name in entries:
            problems.append(f"{where}: duplicate name '{name}' (first on row {entries[name].row})")
        kind = vals.get("kind", "")
        if kind not in KINDS:
            problems.append(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}"
                            f"{did_you_mean(kind, KINDS)}")
        if not vals.get("location"):
            problems.append(f"{where}: location is empty")
        fmt = vals.get("format") or "lines"
        if fmt not in FORMATS:
            problems.append(f"{where}: format {fmt!r} is not one of {', '.join(FORMATS)}"
                            f"{did_you_mean(fmt, FORMATS)}")
        sha = vals.get("sha256", "").lower()
        if sha and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
            problems.append(f"{where}: sha256 must be 64 hex digits")
        options = _parse_options(vals.get("options", ""), where, problems)
        if fmt == "separator" and not options.get("sep"):
            problems.append(f"{where}: format 'separator' needs the option sep=...")
        loc = vals.get("location", "")
        if kind == "url" and not loc.lower().startswith(("https://", "http://")):
            problems.append(f"{where}: kind url needs an http(s) URL as location, got {loc!r}")
        if kind in ("local", "generated", "childes") and loc.lower().startswith(("http://", "https://")):
            problems.append(f"{where}: kind {kind} needs a path in the project, not a URL (use kind url)")
        if kind == "childes" and fmt != "lines":
            problems.append(f"{where}: childes rows give one utterance per line; leave format empty or 'lines'")
        by = options.get("split_by")
        allowed = ("transcript", "speaker", "age_bin", "document") if kind == "childes" else ("document",)
        if by is not None and by not in allowed:
            problems.append(f"{where}: option split_by={by!r} is not one of {', '.join(allowed)}"
                            f"{' for a ' + kind + ' row' if kind != 'childes' else ''}{did_you_mean(by, allowed)}")
        if options.get("age_bin_months") == 0:
            problems.append(f"{where}: option age_bin_months must be at least 1")
        for key in ("min_age", "max_age"):
            if key in options:
                try:
                    parse_age(options[key])
                except UserError as exc:
                    problems.append(f"{where}: option {key}: {exc}")
        split = _parse_split(vals.get("split", ""), where, problems)
        enabled = _parse_bool(vals.get("enabled", "true") or "true")
        if enabled is None:
            problems.append(f"{where}: enabled must be true or false, got {vals.get('enabled')!r}")
        if name and name not in entries:
            entries[name] = CatalogEntry(name=name, kind=kind, location=vals.get("location", ""),
                                         format=fmt, text_field=vals.get("text_field", ""), sha256=sha,
                                         license=vals.get("license", ""),
                                         description=vals.get("description", ""), options=options,
                                         split=split, enabled=bool(enabled), row=i)
    if problems:
        raise UserError(one_line(problems))
    return entries


def load_catalog(path: Path) -> dict[str, CatalogEntry]:
    """Read and validate `config/dataset_catalog.csv` (or another catalog file)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"dataset catalog not found: {path}")
    text = read_user_text(path, what="CSV text", encoding="utf-8")
    return parse_catalog(text, source=str(path))


def get_entry(catalog: dict[str, CatalogEntry], name: str) -> CatalogEntry:
    """The row named `name`, or a UserError listing the known names with a did-you-mean."""
    if name not in catalog:
        raise UserError(f"unknown dataset '{name}'{did_you_mean(name, catalog)}; "
                        f"known: {', '.join(sorted(catalog)) or '(none)'}")
    return catalog[name]


def format_rows(rows: list[dict]) -> str:
    """CSV text (no header) of catalog rows given as {column: value} dicts, in COLUMNS order."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for row in rows:
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown catalog columns {sorted(unknown)}")
        writer.writerow([row.get(c, "") for c in COLUMNS])
    return buf.getvalue()


def _read_catalog_text(path: Path) -> str:
    load_catalog(path)  # a broken catalog is reported, never edited
    return path.read_bytes().decode("utf-8-sig")


def append_rows(path: Path, rows: list[dict]) -> str:
    """Append rows to a catalog file in one atomic write; returns the exact text appended.

    The whole new catalog is validated first (names unique, kinds and formats known), so a
    bad row leaves the file as it was. The existing bytes are kept as they are.
    """
    from lora_project.utils.io_utils import atomic_write_bytes

    path = Path(path)
    text = _read_catalog_text(path)
    header = next(csv.reader(io.StringIO(text)), [])
    if list(header) != list(COLUMNS):
        raise UserError(f"{path}: rows can only be added to a catalog with all columns "
                        f"({','.join(COLUMNS)}); add the missing ones first")
    added = ("" if not text or text.endswith("\n") else "\n") + format_rows(rows)
    parse_catalog(text + added, source=str(path))
    atomic_write_bytes(path, path.read_bytes() + added.encode("utf-8"))
    return added


def remove_rows(path: Path, names: list[str], appended: str | None = None) -> list[str]:
    """Remove the named rows from a catalog file (atomically); returns the names removed.

    When `appended` (the text `append_rows` returned) is still the end of the file, exactly
    that text is cut, so the file gets back its earlier bytes. Otherwise each named row's
    line is dropped and every other line is kept as it was.
    """
    from lora_project.utils.io_utils import atomic_write_bytes, atomic_write_text

    path = Path(path)
    text = _read_catalog_text(path)
    present = [n for n in names if n in parse_catalog(text, source=str(path))]
    if not present:
        return []
    raw, tail = path.read_bytes(), (appended or "").encode("utf-8")
    if tail and raw.endswith(tail):
        cut = set(parse_catalog(",".join(COLUMNS) + "\n" + appended.lstrip("\n"), source=str(path)))
        if cut == set(names):
            atomic_write_bytes(path, raw[: -len(tail)])
            return present
    lines = text.splitlines(keepends=True)
    keep, drop = [], set(present)
    # Records may span lines (quoted newlines): re-parse record by record, keeping raw text.
    reader_lines: list[str] = []
    for line in lines:
        reader_lines.append(line)
        chunk = "".join(reader_lines)
        try:
            rec = next(csv.reader(io.StringIO(chunk)))
        except (StopIteration, csv.Error):
            rec = []
        if chunk.count('"') % 2:  # inside a quoted field: read on
            continue
        if not (rec and rec[0].strip() in drop and keep):  # keep the header and other rows
            keep.append(chunk)
        reader_lines = []
    keep.extend(reader_lines)
    new = "".join(keep)
    parse_catalog(new, source=str(path))
    atomic_write_text(path, new)
    return present
