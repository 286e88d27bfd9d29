"""Documents out of corpus files: plain text, Gutenberg books, JSON lines, CSV, Parquet and
Hugging Face ``save_to_disk`` folders. Used by ``lora-project extract`` and by ``prepare``.

Every reader returns a list of documents (strings, not yet cleaned) and raises a one-line
UserError naming the file (and the line or row) for bad input. A folder is read file by
file in sorted order, keeping the files whose suffix fits the format.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from lora_project.data.preprocessor import (
    doc_separator,
    normalise,
    read_text_file,
    split_documents,
)
from lora_project.errors import UserError, did_you_mean
from lora_project.utils.io_utils import (
    atomic_write_json,
    atomic_write_text,
    check_output_file,
)

TEXT_FORMATS = ("lines", "paragraphs", "separator", "gutenberg")
STRUCTURED_FORMATS = ("jsonl", "csv", "parquet", "hf_disk")
SOURCE_FORMATS = TEXT_FORMATS + STRUCTURED_FORMATS
_SUFFIXES = {"jsonl": (".jsonl", ".json", ".ndjson"), "csv": (".csv", ".tsv"), "parquet": (".parquet",),
             "lines": (".txt", ".text", ""), "paragraphs": (".txt", ".text", ""),
             "separator": (".txt", ".text", ""), "gutenberg": (".txt", "")}

_GB_START = re.compile(r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*$", re.I | re.M)
_GB_END = re.compile(r"^(?:\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*"
                     r"|End of (?:the )?Project Gutenberg'?s? .*)$", re.I | re.M)
_GB_CREDIT = re.compile(r"^(?:Produced by|E-text prepared by|Transcribed from|Transcribed by)\b", re.I)


def strip_gutenberg(text: str) -> tuple[str, bool]:
    """Remove a Project Gutenberg header, credit paragraph and licence footer.

    Returns (body, whether a header or footer was found). Text without the markers is
    returned unchanged.
    """
    start = _GB_START.search(text)
    body = text[start.end():] if start else text
    end = _GB_END.search(body)
    if end:
        body = body[:end.start()]
    if start:  # the "Produced by ..." paragraph right after the header is not part of the book
        paras = body.lstrip("\n").split("\n\n", 1)
        if _GB_CREDIT.match(paras[0].strip()):
            body = paras[1] if len(paras) > 1 else ""
    return body.strip("\n") + "\n", bool(start or end)


def detect_format(path: Path) -> str:
    """Guess a source format from a file suffix or a folder's contents."""
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() \
                or (path / "state.json").is_file():
            return "hf_disk"
        suffixes = {q.suffix.lower() for q in path.rglob("*") if q.is_file()}
        for fmt in ("jsonl", "csv", "parquet"):
            if suffixes & set(_SUFFIXES[fmt]):
                return fmt
        return "paragraphs"
    suffix = path.suffix.lower()
    for fmt in ("jsonl", "csv", "parquet"):
        if suffix in _SUFFIXES[fmt]:
            return fmt
    return "lines"


def _files(path: Path, fmt: str) -> list[Path]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"source not found: {path}")
    if path.is_file():
        return [path]
    found = sorted(q for q in path.rglob("*") if q.is_file() and not q.name.startswith(".")
                   and q.suffix.lower() in _SUFFIXES[fmt])
    if not found:
        raise UserError(f"{path}: no {fmt} files in this folder (looked for "
                        f"{', '.join(s or 'no suffix' for s in _SUFFIXES[fmt])})")
    return found


def _field(record, field: str, where: str, available) -> str | None:
    if field not in record:
        raise UserError(f"{where}: no field '{field}'{did_you_mean(field, available)}; "
                        f"fields: {', '.join(map(str, available))[:200]}")
    value = record[field]
    if value is None:
        return None
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{field}' holds {type(value).__name__}, expected text")
    return value


def read_jsonl(path: Path, field: str, encoding: str = "utf-8", encoding_option: bool | str = True) -> list[str]:
    """Documents from one JSON-lines file: the `field` of each object (null values skipped)."""
    text = read_text_file(path, encoding, encoding_option)
    docs = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {i}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path} line {i}: expected a JSON object per line")
        value = _field(record, field, f"{path} line {i}", list(record))
        if value is not None:
            docs.append(value)
    return docs


def read_csv(path: Path, field: str, encoding: str = "utf-8", encoding_option: bool | str = True) -> list[str]:
    """Documents from one CSV (or .tsv) file: the `field` column of each row."""
    text = read_text_file(path, encoding, encoding_option)
    csv.field_size_limit(1 << 30)
    delimiter = "\t" if Path(path).suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(text.lstrip("\ufeff").splitlines(keepends=True), delimiter=delimiter)
    header = reader.fieldnames or []
    if field not in header:
        raise UserError(f"{path}: no column '{field}'{did_you_mean(field, header)}; "
                        f"columns: {', '.join(header)[:200]}")
    try:
        return [row[field] for row in reader if row.get(field)]
    except csv.Error as exc:
        raise UserError(f"{path} row {reader.line_num}: malformed CSV ({exc})") from None


def read_parquet(path: Path, field: str) -> list[str]:
    """Documents from one Parquet file: the `field` column (must hold text)."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path}: not a readable Parquet file ({type(exc).__name__})") from None
    if field not in schema.names:
        raise UserError(f"{path}: no column '{field}'{did_you_mean(field, schema.names)}; "
                        f"columns: {', '.join(schema.names)[:200]}")
    column = pq.read_table(path, columns=[field]).column(field).to_pylist()
    bad = next((v for v in column if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise UserError(f"{path}: column '{field}' holds {type(bad).__name__}, expected text")
    return [v for v in column if v]


def read_hf_disk(path: Path, field: str) -> list[str]:
    """A `Dataset.save_to_disk` folder (Arrow files); a DatasetDict contributes every split."""
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise UserError("reading save_to_disk folders needs the 'datasets' package "
                        "(pip install datasets)") from None
    try:
        ds = load_from_disk(str(path))
    except Exception as exc:  # FileNotFoundError, ValueError, ArrowInvalid ...
        raise UserError(f"{path}: not a readable save_to_disk folder "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
    parts = [ds[k] for k in sorted(ds)] if isinstance(ds, DatasetDict) else [ds]
    docs: list[str] = []
    for part in parts:
        if field not in part.column_names:
            raise UserError(f"{path}: no column '{field}'{did_you_mean(field, part.column_names)}; "
                            f"columns: {', '.join(part.column_names)[:200]}")
        docs.extend(v for v in part[field] if isinstance(v, str) and v)
    return docs


def read_documents(path: Path, fmt: str = "auto", text_field: str = "", sep: str | None = None,
                   encoding: str = "utf-8", encoding_option: bool | str = True) -> tuple[list[str], dict]:
    """Documents of a file or folder in the given source format.

    Returns (documents, info) where info counts files and Gutenberg boilerplate removed.
    """
    path = Path(path)
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in SOURCE_FORMATS:
        raise UserError(f"unknown format {fmt!r}; use one of {', '.join(SOURCE_FORMATS)}"
                        f"{did_you_mean(fmt, SOURCE_FORMATS)}")
    field = text_field or "text"
    info = {"format": fmt, "files": 0, "gutenberg_boilerplate_removed": 0}
    if fmt == "hf_disk":
        if not path.is_dir():
            raise UserError(f"{path}: format hf_disk expects a save_to_disk folder")
        info["files"] = 1
        return read_hf_disk(path, field), info
    docs: list[str] = []
    per_file = info["documents_per_file"] = []  # [file relative to the source, documents], for split_by=document
    for f in _files(path, fmt):
        info["files"] += 1
        before = len(docs)
        if fmt == "jsonl":
            docs.extend(read_jsonl(f, field, encoding, encoding_option))
        elif fmt == "csv":
            docs.extend(read_csv(f, field, encoding, encoding_option))
        elif fmt == "parquet":
            docs.extend(read_parquet(f, field))
        else:
            text = normalise(read_text_file(f, encoding, encoding_option))
            if fmt == "gutenberg":
                text, found = strip_gutenberg(text)
                info["gutenberg_boilerplate_removed"] += int(found)
            if fmt == "gutenberg":  # one paragraph per document, the book's hard line wraps undone
                docs.extend(" ".join(p.split()) for p in split_documents(text, "paragraphs"))
            else:
                docs.extend(split_documents(text, fmt, sep))
        per_file.append([str(f.relative_to(path)) if f != path else f.name, len(docs) - before])
    return docs, info


def write_corpus(out: Path, docs: list[str], sidecar: dict, overwrite: bool = False) -> str:
    """Documents to `out` (one per line, or blank-line separated when any spans lines) + `<out>.json`.

    Refuses an existing `out` unless `overwrite`, and an empty corpus; returns the sidecar's path.
    """
    out = Path(out)
    check_output_file(out, overwrite)
    check_output_file(out.with_name(out.name + ".json"), overwrite)  # the sidecar is an output too
    if not docs:
        raise UserError("nothing extracted: no documents left (check the format, field and filters)")
    sep = doc_separator(docs)
    atomic_write_text(out, sep.join(docs) + "\n")
    side = out.with_name(out.name + ".json")
    atomic_write_json(side, dict(sidecar, output=str(out), documents=len(docs),
                                 layout="paragraphs" if sep == "\n\n" else "lines"))
    return str(side)


def extract_corpus(sources: list[Path], out: Path, fmt: str = "auto", text_field: str = "", sep: str | None = None,
                   encoding: str = "utf-8", one_line: bool = False, overwrite: bool = False) -> dict:
    """`lora-project extract`: the documents of every source into one text file plus a sidecar.

    Returns {"documents", "out", "sidecar", "sources": [per-source info]}.
    """
    check_output_file(Path(out), overwrite)  # before any reading, the sidecar too
    check_output_file(Path(out).with_name(Path(out).name + ".json"), overwrite)
    docs, infos = [], []
    for src in sources:
        d, info = read_documents(src, fmt, text_field, sep, encoding)
        docs.extend(" ".join(x.split()) if one_line else x.strip() for x in d)
        infos.append(dict(info, source=str(src), documents=len(d)))
    docs = [d for d in docs if d]
    side = write_corpus(out, docs, {"sources": infos}, overwrite)
    return {"documents": len(docs), "out": str(out), "sidecar": side, "sources": infos}
