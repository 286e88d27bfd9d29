"""From a catalog name to prepared text and packed token streams.

`prepare_dataset` materialises a catalog row under ``data/processed/<name>/``;
`load_streams` turns its splits into packed token streams for training and evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_project.data.catalog import (
    SUPPORTED_KINDS,
    CatalogEntry,
    get_entry,
    load_catalog,
)
from lora_project.data.generator import Grammar, generate_lines
from lora_project.data.preprocessor import Prepared, prepare_text, read_split
from lora_project.data.tokenizer_utils import cached_stream
from lora_project.errors import UserError
from lora_project.paths import ProjectPaths
from lora_project.utils.io_utils import atomic_write_text


def materialise_generated(paths: ProjectPaths, entry: CatalogEntry) -> Path:
    """Write the generated corpus to data/raw/<name>.txt (only when its bytes would change)."""
    grammar = Grammar.load(paths.inside(Path(entry.location), f"dataset '{entry.name}' grammar"))
    lines = generate_lines(grammar, int(entry.option("lines", grammar.default_lines)),
                           int(entry.option("seed", 0)))
    text = "\n".join(lines) + "\n"
    out = paths.raw_dir / f"{entry.name}.txt"
    if not out.is_file() or out.read_text(encoding="utf-8") != text:
        atomic_write_text(out, text)
    return out


def source_file(paths: ProjectPaths, entry: CatalogEntry) -> Path:
    if entry.kind not in SUPPORTED_KINDS:
        raise UserError(f"dataset '{entry.name}': source kind '{entry.kind}' is catalogued but this "
                        f"version prepares only {', '.join(SUPPORTED_KINDS)} sources")
    if entry.kind == "generated":
        return materialise_generated(paths, entry)
    return paths.inside(Path(entry.location), f"dataset '{entry.name}' location")


def prepare_dataset(paths: ProjectPaths, name: str, force: bool = False,
                    catalog: dict[str, CatalogEntry] | None = None) -> Prepared:
    catalog = catalog if catalog is not None else load_catalog(paths.catalog)
    entry = get_entry(catalog, name)
    src = source_file(paths, entry)
    return prepare_text(entry.name, src, paths.processed(entry.name), entry.format, entry.split,
                        entry.options, force=force)


@dataclass
class DatasetStreams:
    """Packed token streams of one prepared dataset, plus the text they came from."""

    name: str
    train: np.ndarray
    validation: np.ndarray
    validation_docs: list[str]
    separator: str
    fingerprint: str


def load_streams(paths: ProjectPaths, prepared: Prepared, tokenizer, tok_fp: str) -> DatasetStreams:
    folder = prepared.folder
    cache = folder / "tokens"
    train_docs = read_split(folder, "train")
    val_docs = read_split(folder, "validation")
    if not val_docs:
        raise UserError(f"dataset '{prepared.name}': the validation split is empty; give it a larger "
                        "validation fraction in the catalog's split column")
    return DatasetStreams(
        name=prepared.name,
        train=cached_stream(tokenizer, train_docs, cache, "train", tok_fp),
        validation=cached_stream(tokenizer, val_docs, cache, "validation", tok_fp),
        validation_docs=val_docs,
        separator=prepared.stats.get("separator", "\n"),
        fingerprint=prepared.stats["source_sha256"][:16] + "-" + prepared.stats["settings_sha256"][:16],
    )
