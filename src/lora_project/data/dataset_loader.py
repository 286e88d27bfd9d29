"""From a catalog name to prepared text and packed token streams.

`prepare_dataset` materialises a catalog row under ``data/processed/<name>/``;
`load_streams` turns its splits into packed token streams for training and evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_project.data.catalog import CatalogEntry, get_entry, load_catalog
from lora_project.data.generator import Grammar, generate_lines
from lora_project.data.preprocessor import (
    Prepared,
    prepare_documents,
    prepare_text,
    read_split,
)
from lora_project.data.tokenizer_utils import cached_stream
from lora_project.errors import UserError
from lora_project.paths import ProjectPaths
from lora_project.utils.io_utils import atomic_write_text
from lora_project.utils.provenance import sha256_file, sha256_json


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


def tree_fingerprint(path: Path) -> str:
    """SHA-256 of a file, or of a folder's (relative path, file hash) list."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise UserError(f"source not found: {path}")
    files = sorted(q for q in path.rglob("*") if q.is_file() and not q.name.startswith("."))
    return sha256_json([[str(q.relative_to(path)), sha256_file(q)] for q in files])


def fetch_source(paths: ProjectPaths, entry: CatalogEntry, progress: bool = True, log=print) -> Path:
    """The local file or folder a row reads (downloading url rows, generating generated rows)."""
    if entry.kind == "generated":
        return materialise_generated(paths, entry)
    if entry.kind == "url":
        from lora_project.data.download import download

        return download(entry.location, paths.datasets_dir / entry.name, entry.sha256,
                        allow_http=bool(entry.option("allow_http", False)), progress=progress, log=log)
    if entry.kind in ("local", "childes"):
        try:
            src = paths.inside(Path(entry.location), f"dataset '{entry.name}' location")
        except UserError as exc:
            raise UserError(f"{exc}; copy it in with `lora-project catalog add NAME {entry.location}` "
                            "(and remove this row)") from None
        if not src.exists():
            raise UserError(f"dataset '{entry.name}': source not found: {src}")
        if entry.sha256 and src.is_file() and sha256_file(src) != entry.sha256:
            raise UserError(f"dataset '{entry.name}': {src} does not match the catalog's sha256")
        return src
    raise UserError(f"dataset '{entry.name}': kind '{entry.kind}' has no local source")


def _hub_documents(entry: CatalogEntry):
    try:
        from datasets import load_dataset
    except ImportError:
        raise UserError("hub datasets need the 'datasets' package (pip install datasets)") from None
    split = entry.option("hub_split", "train")
    try:
        ds = load_dataset(entry.location, split=split, revision=entry.option("revision", None) or None)
    except Exception as exc:  # offline, unknown id, gated: one line either way
        raise UserError(f"dataset '{entry.name}': could not load hub dataset {entry.location!r} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    field = entry.text_field or "text"
    if field not in ds.column_names:
        raise UserError(f"dataset '{entry.name}': hub dataset has no column '{field}'; "
                        f"columns: {', '.join(ds.column_names)}")
    return ds._fingerprint, (lambda: [v for v in ds[field] if isinstance(v, str)])


def token_counter(paths: ProjectPaths):
    """A lazy `count_tokens(docs)` with the configured base model's tokenizer (loaded on first use)."""
    state: dict = {}

    def count(docs: list[str]) -> int:
        if "tok" not in state:
            from lora_project.config import load_project_config
            from lora_project.models.base_model import load_tokenizer, resolve_model

            cfg = load_project_config(paths)
            state["tok"] = load_tokenizer(resolve_model(cfg.model.source, cfg.model.revision))
        from lora_project.models.tokens import encode_documents

        return sum(len(ids) for ids in encode_documents(state["tok"], docs)) if docs else 0

    return count


def prepare_dataset(paths: ProjectPaths, name: str, force: bool = False,
                    catalog: dict[str, CatalogEntry] | None = None, progress: bool = True,
                    log=print, count_tokens=None) -> Prepared:
    """Fetch, extract, clean and split one catalog row into data/processed/<name>/."""
    catalog = catalog if catalog is not None else load_catalog(paths.catalog)
    entry = get_entry(catalog, name)
    encoding = entry.option("encoding", "utf-8")
    out = paths.processed(entry.name)
    common = dict(split=entry.split, options=entry.options, force=force, count_tokens=count_tokens)
    if entry.kind == "hub":
        fp, load = _hub_documents(entry)
        return prepare_documents(entry.name, f"hub:{entry.location}", fp, load, out,
                                 settings={"kind": "hub", "field": entry.text_field}, **common)
    src = fetch_source(paths, entry, progress=progress, log=log)
    if entry.kind == "childes":
        from lora_project.data.childes import extract_children

        participants = entry.option("participants", "CHI").split(",")

        def load_utterances():
            ex = extract_children([src], participants, entry.option("min_age", None),
                                  entry.option("max_age", None), encoding=encoding, warn=lambda m: log(f"warning: {m}"))
            root = str(src) + "/" if src.is_dir() else str(src.parent) + "/"
            meta = [dict(m, transcript=m["transcript"].removeprefix(root)) for m in ex.meta]
            return ex.lines, ex.summary(), meta

        return prepare_documents(entry.name, str(src), tree_fingerprint(src), load_utterances, out,
                                 settings={"kind": "childes", "format": "lines"}, **common)
    if src.is_file() and entry.format in ("lines", "paragraphs", "separator"):
        return prepare_text(entry.name, src, out, entry.format, encoding=encoding, **common)
    from lora_project.data.extract import read_documents
    from lora_project.data.preprocessor import CATALOG_ENCODING

    def load_docs():
        docs, info = read_documents(src, entry.format, entry.text_field, entry.option("sep", None), encoding,
                                    encoding_option=CATALOG_ENCODING)
        if not entry.option("split_by", None):
            return docs, info
        # split_by=document: each source file (a book, a story collection) is one group
        metas = [{"document": f} for f, n in info.get("documents_per_file", []) for _ in range(n)]
        return docs, info, (metas if len(metas) == len(docs) else None)

    return prepare_documents(entry.name, str(src), tree_fingerprint(src), load_docs, out,
                             settings={"format": entry.format, "field": entry.text_field,
                                       "encoding": encoding}, **common)


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
    """Packed uint16 token streams of a prepared dataset's train and validation splits (cached on disk)."""
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


def prepare_datasets(paths: ProjectPaths, names: list[str], *, force: bool = False,
                     catalog: dict[str, CatalogEntry] | None = None, progress: bool = True, log=print,
                     count_tokens: bool = True):
    """`lora-project prepare`: prepare each named row in turn, yielding (name, Prepared or None, error or None).

    One bad row does not stop the others (its UserError's message is yielded); with a single
    name the error is raised instead. Token counts load the base model's tokenizer once, lazily.
    """
    catalog = catalog if catalog is not None else load_catalog(paths.catalog)
    count = token_counter(paths) if count_tokens else None
    for n in names:
        try:
            prep = prepare_dataset(paths, n, force=force, catalog=catalog, progress=progress, log=log,
                                   count_tokens=count)
        except UserError as exc:
            if len(names) == 1:
                raise
            yield n, None, " ".join(str(exc).split())
            continue
        yield n, prep, None
