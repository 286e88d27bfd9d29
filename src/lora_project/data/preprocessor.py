"""Raw text -> clean documents -> deterministic train/validation/test split on disk.

Cleaning: byte-order mark removed, CRLF/CR -> LF, Unicode NFC, documents stripped, empty
documents dropped, exact duplicates dropped (option ``dedupe``), length filters
(``min_chars``/``max_chars``). Each document goes to a split chosen by a hash of its text,
so the assignment does not depend on order, and identical documents always land together
(the splits are disjoint even without deduplication). With the option ``split_by`` whole groups
(transcripts, speakers, age bins, source documents) go to one split each instead
(`group_split`); documents with metadata (CHILDES utterances) get ``<split>.meta.jsonl`` beside
``<split>.txt``, one JSON object per document in the same order.

Output: ``data/processed/<name>/{train,validation,test}.txt`` plus ``stats.json``; every
file is written atomically. Re-running with unchanged source and options does nothing.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from lora_project.errors import UserError
from lora_project.utils.io_utils import atomic_write_json, atomic_write_text
from lora_project.utils.provenance import sha256_file, sha256_json
from lora_project.utils.text_io import read_user_text

SPLITS = ("train", "validation", "test")
PREPROCESS_VERSION = 1  # bump when cleaning rules change, so caches are rebuilt


#: prepare reads catalog rows: an encoding is the row's option, not a command-line flag.
CATALOG_ENCODING = "encoding={} in the row's options (config/dataset_catalog.csv)"


def read_text_file(path: Path, encoding: str = "utf-8", encoding_option: bool | str = True) -> str:
    """Read a text file; missing, binary and non-UTF-8 files are one-line UserErrors (which suggest
    --encoding only where the command has it: `encoding_option`)."""
    return read_user_text(path, what="text", encoding=encoding, encoding_option=encoding_option)


def normalise(text: str) -> str:
    """BOM removed, newlines to LF, Unicode NFC."""
    text = text.lstrip("\ufeff")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text)


def split_documents(text: str, fmt: str, sep: str | None = None) -> list[str]:
    """Split normalised text into stripped, non-empty documents by format."""
    if fmt == "lines":
        docs = text.split("\n")
    elif fmt == "paragraphs":
        docs, cur = [], []
        for line in text.split("\n"):
            if line.strip():
                cur.append(line.rstrip())
            elif cur:
                docs.append("\n".join(cur))
                cur = []
        if cur:
            docs.append("\n".join(cur))
    elif fmt == "separator":
        if not sep:
            raise UserError("format 'separator' needs a separator: --sep on the command line, option sep=... "
                            "in a catalog row")
        docs = text.split(sep)
    else:
        raise UserError(f"unknown format {fmt!r}")
    return [d.strip() for d in docs if d.strip()]


def assign_split(doc: str, fractions: tuple[float, float, float]) -> str:
    """Split chosen by the document's SHA-256, mapped to [0, 1)."""
    h = int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "big") / 2**64
    if h < fractions[0]:
        return "train"
    if h < fractions[0] + fractions[1]:
        return "validation"
    return "test"


def doc_separator(docs: list[str]) -> str:
    """One document per line when none spans lines, else blank-line separated."""
    return "\n\n" if any("\n" in d for d in docs) else "\n"


@dataclass
class Prepared:
    """A prepared dataset folder and its stats; `skipped` when the existing output was up to date."""
    name: str
    folder: Path
    stats: dict
    skipped: bool  # True when nothing changed and the existing output was kept


def clean_documents(docs: list[str], dedupe: bool, min_chars: int, max_chars: int) -> tuple[list[str], dict]:
    """Apply the length filters and exact-duplicate removal; returns (documents, counts)."""
    counts = {"documents_in": len(docs), "duplicates_removed": 0, "too_short": 0, "too_long": 0}
    seen: set[str] = set()
    out = []
    for d in docs:
        if len(d) < min_chars:
            counts["too_short"] += 1
            continue
        if max_chars and len(d) > max_chars:
            counts["too_long"] += 1
            continue
        if dedupe:
            if d in seen:
                counts["duplicates_removed"] += 1
                continue
            seen.add(d)
        out.append(d)
    return out, counts


def _kept(docs: list[str], metas: list[dict] | None, transform) -> tuple[list[str], list[dict] | None]:
    """Apply a per-document transform (None = drop) to documents, dropping their metadata alongside."""
    out = transform(docs)
    if metas is None:
        return [d for d in out if d is not None], None
    if len(metas) != len(docs):
        raise RuntimeError(f"{len(metas)} metadata records for {len(docs)} documents")
    pairs = [(d, m) for d, m in zip(out, metas) if d is not None]
    return [d for d, _ in pairs], [m for _, m in pairs]


def _follow(docs: list[str], metas: list[dict], kept: list[str]) -> list[dict]:
    """Metadata of the documents `clean_documents` kept (an order-preserving subsequence of `docs`)."""
    out, j = [], 0
    for d, m in zip(docs, metas):
        if j < len(kept) and d == kept[j]:
            out.append(m)
            j += 1
    return out


def _up_to_date(out_dir: Path, source_fp: str, settings_fp: str) -> dict | None:
    stats_path = out_dir / "stats.json"
    if not stats_path.is_file():
        return None
    try:
        old = json.loads(stats_path.read_text())
    except (OSError, ValueError):
        return None  # unreadable stats: rebuild
    if (old.get("source_sha256") == source_fp and old.get("settings_sha256") == settings_fp
            and all((out_dir / f"{s}.txt").is_file() for s in SPLITS)):
        return old
    return None


def prepare_documents(name: str, source: str, source_fp: str, load_docs, out_dir: Path,
                      split: tuple[float, float, float], options: dict, settings: dict,
                      force: bool = False, count_tokens=None) -> Prepared:
    """Clean and split documents into `out_dir`. Idempotent.

    `load_docs()` is only called when the output is missing or stale (source fingerprint or
    settings changed); it returns the documents, or (documents, info) with extraction
    counts to record in stats.json. `count_tokens(text) -> int` adds token counts per split.
    """
    settings = dict(settings, split=list(split), options=options, version=PREPROCESS_VERSION)
    settings_fp = sha256_json(settings)
    if not force:
        old = _up_to_date(out_dir, source_fp, settings_fp)
        if old is not None:
            return Prepared(name, out_dir, old, skipped=True)
    loaded = load_docs()
    docs, info, metas = (loaded + (None,) * (3 - len(loaded)) if isinstance(loaded, tuple)
                         else (loaded, {}, None))
    docs, metas = _kept(docs, metas, lambda ds: [(d.strip() if d.strip() else None) for d in map(normalise, ds)])
    kept_docs, counts = clean_documents(docs, bool(options.get("dedupe", True)),
                                        int(options.get("min_chars", 1)), int(options.get("max_chars", 0)))
    if metas is not None:  # clean_documents keeps order: match the kept documents back to their metadata
        metas = _follow(docs, metas, kept_docs)
    docs = kept_docs
    if not docs:
        raise UserError(f"dataset '{name}': no documents left after cleaning {source} "
                        f"({counts['documents_in']} read, {counts['too_short']} too short, "
                        f"{counts['too_long']} too long)")
    group_stats, part_meta = None, None
    if options.get("split_by"):
        from lora_project.data.group_split import split_by_groups

        parts, part_meta, group_stats = split_by_groups(
            docs, metas, options["split_by"], split, int(options.get("split_seed", 0)),
            int(options.get("age_bin_months", 6)), Path(source).name)
        if metas is None:
            part_meta = None
    else:
        parts = {s: [] for s in SPLITS}
        part_meta = {s: [] for s in SPLITS} if metas is not None else None
        for i, d in enumerate(docs):
            s = assign_split(d, split)
            parts[s].append(d)
            if part_meta is not None:
                part_meta[s].append(metas[i])
    if not parts["train"]:
        raise UserError(f"dataset '{name}': the train split is empty ({len(docs)} documents)")
    sep = doc_separator(docs)
    bodies = {s: sep.join(parts[s]) + ("\n" if parts[s] else "") for s in SPLITS}
    split_stats = {}
    for s in SPLITS:
        body = bodies[s]
        split_stats[s] = {"documents": len(parts[s]), "lines": body.count("\n"), "characters": len(body),
                          "bytes": len(body.encode("utf-8"))}
        if count_tokens is not None:
            split_stats[s]["tokens"] = int(count_tokens(parts[s]))
    # Every split is written before stats.json, whose presence marks a complete output; an
    # error above leaves the previous output untouched.
    for s in SPLITS:
        atomic_write_text(out_dir / f"{s}.txt", bodies[s])
        meta_path = out_dir / f"{s}.meta.jsonl"
        if part_meta is not None:  # one JSON object per document, in the order of <split>.txt
            atomic_write_text(meta_path, "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in part_meta[s]))
        elif meta_path.exists():
            meta_path.unlink()
    stats = {"name": name, "source": source, "source_sha256": source_fp,
             "settings": settings, "settings_sha256": settings_fp, "separator": sep,
             "cleaning": counts, "extraction": info, "splits": split_stats}
    if group_stats is not None:
        stats["groups"] = group_stats
    atomic_write_json(out_dir / "stats.json", stats)
    return Prepared(name, out_dir, stats, skipped=False)


def prepare_text(name: str, source: Path, out_dir: Path, fmt: str, split: tuple[float, float, float],
                 options: dict, force: bool = False, encoding: str = "utf-8", count_tokens=None) -> Prepared:
    """Clean and split one plain-text source file (format lines, paragraphs or separator)."""
    source = Path(source)
    if not source.is_file():
        raise UserError(f"dataset '{name}': source file not found: {source}")

    def load():
        return split_documents(normalise(read_text_file(source, encoding, CATALOG_ENCODING)), fmt, options.get("sep"))

    return prepare_documents(name, str(source), sha256_file(source), load, out_dir, split, options,
                             {"format": fmt, "encoding": encoding}, force=force, count_tokens=count_tokens)


def read_split(folder: Path, split: str) -> list[str]:
    """Documents of one processed split."""
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}' (use {', '.join(SPLITS)})")
    path = folder / f"{split}.txt"
    sep = split_separator(folder)
    if not path.is_file():
        raise UserError(f"dataset '{folder.name}' is not prepared; run: lora-project prepare {folder.name}")
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        raise _damaged(folder, f"{path.name}: {exc.__class__.__name__}") from None
    return [d for d in (text[:-1] if text.endswith("\n") else text).split(sep) if d]


def _damaged(folder: Path, why: str) -> UserError:
    return UserError(f"dataset '{folder.name}': its prepared files are damaged ({why}); "
                     f"run: lora-project prepare {folder.name} --force")


def read_stats(folder: Path) -> dict:
    """A processed dataset folder's stats.json, checked: a missing one says how to prepare the
    dataset, a damaged one how to rebuild it."""
    stats_path = folder / "stats.json"
    if not stats_path.is_file():
        raise UserError(f"dataset '{folder.name}' is not prepared; run: lora-project prepare {folder.name}")
    try:
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _damaged(folder, f"stats.json: {exc.__class__.__name__}") from None
    if not isinstance(stats, dict):
        raise _damaged(folder, "stats.json is not an object")
    return stats


def split_separator(folder: Path) -> str:
    """The document separator of a processed dataset folder (read_stats' checks, and a usable one)."""
    sep = read_stats(folder).get("separator", "\n")
    if not isinstance(sep, str) or not sep:
        raise _damaged(folder, "stats.json has no usable separator")
    return sep
