"""`lora-project catalog add/list/remove`: one data file or folder at a time.

`catalog add NAME PATH` classifies PATH the way `adopt` does (format and text field guessed
from the content, CHAT transcripts as a ``childes`` row), copies it into the project when it is
outside (``data/raw/`` or ``data/childes/``; sha256-checked, atomic) and appends one enabled
row. `catalog remove NAME` removes the row only: no data file is ever deleted.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from lora_project.adopt._project import (
    _NAME_RE,
    ProjectPaths,
    UserError,
    append_rows,
    default_mode,
    did_you_mean,
    load_catalog,
    remove_rows,
)
from lora_project.adopt.scan import DATA_SUFFIXES, file_sha256, guess_data_format

_FORMAT_SUFFIXES = {"jsonl": (".jsonl", ".json", ".ndjson"), "csv": (".csv", ".tsv"), "parquet": (".parquet",)}


def _check_new_name(paths: ProjectPaths, name: str) -> dict:
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise UserError(f"invalid dataset name {name!r}: use letters, digits, '.', '_' and '-' "
                        "(start with a letter or digit, no '..', no '/')")
    catalog = load_catalog(paths.catalog)
    if name in catalog:
        raise UserError(f"dataset '{name}' is already in the catalog ({catalog[name].location}); choose another "
                        f"name or run `lora-project catalog remove {name}` first")
    return catalog


def _copy_tree(files: list[tuple[Path, str]], dest: Path) -> None:
    """Copy (source file, relative name) pairs into a new folder `dest`, atomically, sha256-checked."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    os.chmod(tmp, default_mode(directory=True))
    try:
        for src, rel in files:
            target = tmp / rel if rel else tmp
            target.parent.mkdir(parents=True, exist_ok=True)
            sha = file_sha256(src)
            shutil.copyfile(src, target)
            if file_sha256(target) != sha:
                raise UserError(f"the copy of {src} does not match its sha256")
        if dest.exists():
            raise UserError(f"{dest} already exists; choose another name")
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_file(src: Path, dest: Path) -> None:
    if dest.exists():
        raise UserError(f"{dest} already exists; choose another name")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.fchmod(fd, default_mode())
    os.close(fd)
    try:
        sha = file_sha256(src)
        shutil.copyfile(src, tmp)
        if file_sha256(Path(tmp)) != sha:
            raise UserError(f"the copy of {src} does not match its sha256")
        os.link(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def catalog_add(paths: ProjectPaths, name: str, path: Path, fmt: str | None = None,
                text_field: str | None = None) -> dict:
    """Add one catalog row for a data file or folder (copied in when outside the project).

    Returns {"name", "row", "copied_from", "location", "guessed"}.
    """
    _check_new_name(paths, name)
    given = Path(path).expanduser()
    try:
        src = given.resolve(strict=True)
    except FileNotFoundError:
        raise UserError(f"not found: {path}") from None
    except (RuntimeError, OSError) as exc:
        raise UserError(f"{path} cannot be resolved ({getattr(exc, 'strerror', None) or exc})") from None
    inside = src == paths.root or paths.root in src.parents
    if inside and (src == paths.root or src.relative_to(paths.root).parts[0] != "data"):
        raise UserError(f"{path} is inside the project but not under data/; move it to data/raw/ or give a "
                        "path outside the project (it is copied in)")
    row = {"name": name, "license": "unknown", "description": f"added from {src}", "split": "0.8/0.1/0.1",
           "enabled": "true"}
    if src.is_dir():
        chats = sorted(p for p in src.rglob("*.cha") if p.is_file() and not p.is_symlink())
        if chats:
            row.update(kind="childes", format="lines", options="participants=CHI")
            said, dest = f"CHAT folder with {len(chats)} transcripts (kind childes, participants=CHI guessed)", \
                paths.root / "data" / "childes" / name
            files = [(p, p.relative_to(src).as_posix()) for p in chats]
        else:
            cands = sorted(p for p in src.rglob("*") if p.is_file() and not p.is_symlink()
                           and p.suffix.lower() in DATA_SUFFIXES)
            if not cands:
                raise UserError(f"{path}: no data files (.txt, .jsonl, .csv, .parquet, .cha) in this folder")
            guess = _guess(cands[0], fmt, text_field)
            fmt_used = guess["format"]
            keep = _FORMAT_SUFFIXES.get(fmt_used, (".txt", ".text"))
            files = [(p, p.relative_to(src).as_posix()) for p in cands if p.suffix.lower() in keep]
            row.update(kind="local", format=fmt_used, text_field=guess.get("text_field", ""),
                       options=guess.get("options", ""))
            said, dest = f"folder of {len(files)} files, {guess['said']}", paths.raw_dir / name
    else:
        suffix = src.suffix.lower()
        if suffix == ".cha" or (suffix == ".zip" and _zip_has_chat(src)):
            row.update(kind="childes", format="lines", options="participants=CHI")
            said = "CHAT transcript" + (" archive" if suffix == ".zip" else "") + \
                " (kind childes, participants=CHI guessed)"
            dest = paths.root / "data" / "childes" / f"{name}{suffix}"
        elif suffix in DATA_SUFFIXES or fmt:
            guess = _guess(src, fmt, text_field)
            row.update(kind="local", format=guess["format"], text_field=guess.get("text_field", ""),
                       options=guess.get("options", ""))
            said, dest = guess["said"], paths.raw_dir / f"{name}{suffix}"
        else:
            raise UserError(f"{path}: not a data file the catalog reads (.txt, .jsonl, .json, .csv, .tsv, .parquet, "
                            ".cha, CHILDES .zip); give --format to read it as text anyway")
        files = None
    if inside:
        location, copied = src.relative_to(paths.root).as_posix(), None
    else:
        if files is None:
            _copy_file(src, dest)
        else:
            _copy_tree(files, dest)
        location, copied = dest.relative_to(paths.root).as_posix(), str(src)
    row["location"] = location
    try:
        append_rows(paths.catalog, [row])
    except BaseException:
        if copied:  # the row was refused: take the copy back
            shutil.rmtree(dest, ignore_errors=True) if dest.is_dir() else dest.unlink(missing_ok=True)
        raise
    return {"name": name, "location": location, "copied_from": copied, "guessed": said, "row": row}


def _zip_has_chat(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.lower().endswith(".cha") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _guess(path: Path, fmt: str | None, text_field: str | None) -> dict:
    guess = guess_data_format(path)
    if fmt:
        guess = {**(guess if guess and "format" in guess else {}), "format": fmt, "said": f"format {fmt} (given)"}
        if fmt == "separator" and "sep=" not in guess.get("options", ""):
            raise UserError("--format separator needs the separator: edit the row's options (sep=...) after adding, "
                            "or let the format be guessed")
        if fmt not in ("jsonl", "csv", "parquet", "hf_disk"):
            guess["text_field"] = ""
    elif guess is None or "config" in guess:
        raise UserError(f"{path}: does not look like text data (no text field found); give --format and "
                        "--text-field")
    elif "problem" in guess:
        raise UserError(f"{path}: {guess['problem']}")
    if text_field:
        guess["text_field"] = text_field
        guess["said"] += f", text field '{text_field}' (given)"
    guess.setdefault("options", "")
    return guess


def catalog_list(paths: ProjectPaths) -> list[dict]:
    """Every catalog row, with whether its local source is present."""
    rows = []
    for e in load_catalog(paths.catalog).values():
        present = None
        if e.kind in ("local", "childes", "generated"):
            p = (paths.root / e.location)
            present = p.exists()
        rows.append({"name": e.name, "kind": e.kind, "location": e.location, "format": e.format,
                     "text_field": e.text_field, "enabled": e.enabled, "present": present,
                     "description": e.description})
    return rows


def catalog_remove(paths: ProjectPaths, name: str) -> dict:
    """Remove one row; its data files stay where they are."""
    catalog = load_catalog(paths.catalog)
    if name not in catalog:
        raise UserError(f"unknown dataset '{name}'{did_you_mean(name, catalog)}; "
                        f"known: {', '.join(sorted(catalog)) or '(none)'}")
    remove_rows(paths.catalog, [name])
    entry = catalog[name]
    return {"removed": name, "location": entry.location, "kind": entry.kind,
            "note": "the row was removed; no data file was deleted"}
