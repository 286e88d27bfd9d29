"""The adopt ledger and lock: what makes a manifest trustworthy, and one adoption at a time.

A manifest says which files, catalog rows and MLflow runs an adoption added, and `--undo`
deletes them. So a manifest is only believed when its sha256 is the one recorded in
``outputs/adopt/ledger.json`` when adopt wrote it (the ledger keeps the latest and the
previous digest of each manifest: the ledger is written first, so a stop between the two
writes leaves a manifest the ledger still knows). An edited manifest, or one that adopt did
not write, is refused with one line; so is one whose fields have the wrong types.

``outputs/adopt/.adopt.lock`` (an flock) lets one `adopt --apply` or `--undo` run in a
project at a time; a second stops at once with exit 2.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

from lora_project.adopt._project import ProjectPaths, UserError, atomic_write_bytes, json_text

MANIFEST_FORMAT = "lora_project.adopt/1"
LEDGER_FORMAT = "lora_project.adopt-ledger/1"
LEDGER_FILE = "ledger.json"
LOCK_FILE = ".adopt.lock"
# Where an adoption may put files (undo removes nothing outside these).
ADOPT_AREAS = ("adapters/", "data/raw/", "data/childes/", "scripts/legacy/", "notebooks/legacy/", "config/legacy/")


def manifest_dir(paths: ProjectPaths) -> Path:
    return paths.outputs_dir / "adopt"


def _read_ledger(paths: ProjectPaths) -> dict:
    path = manifest_dir(paths) / LEDGER_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not readable JSON; adopt cannot tell which manifests it wrote") from None
    if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT or not isinstance(data.get("manifests"), dict):
        raise UserError(f"{path} is not an adopt ledger (no format '{LEDGER_FORMAT}')")
    return data["manifests"]


def manifest_bytes(data: dict) -> bytes:
    return (json_text(data) + "\n").encode("utf-8")


def write_manifest(paths: ProjectPaths, manifest: Path, data: dict) -> None:
    """Record the manifest's new digest in the ledger, then write the manifest (both atomically)."""
    raw = manifest_bytes(data)
    entries = _read_ledger(paths)
    old = entries.get(manifest.name) if isinstance(entries.get(manifest.name), dict) else {}
    entries[manifest.name] = {"sha256": hashlib.sha256(raw).hexdigest(), "previous": old.get("sha256")}
    atomic_write_bytes(manifest_dir(paths) / LEDGER_FILE,
                       manifest_bytes({"format": LEDGER_FORMAT, "manifests": entries}))
    atomic_write_bytes(manifest, raw)


def _check(cond: bool, manifest: Path, what: str) -> None:
    if not cond:
        raise UserError(f"{manifest} is not a valid adoption manifest: {what}")


def check_shape(manifest: Path, data) -> dict:
    """Every field undo and the plan read has the right type, or a one-line UserError naming it."""
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{manifest} is not an adoption manifest (no format '{MANIFEST_FORMAT}')")
    is_str = lambda v: isinstance(v, str)  # noqa: E731
    _check(isinstance(data.get("items"), list) and all(isinstance(i, dict) for i in data["items"]), manifest,
           "'items' should be a list of objects")
    for n, it in enumerate(data["items"]):
        for key in ("source", "kind", "action"):
            _check(is_str(it.get(key)), manifest, f"items[{n}].{key} should be a string")
        _check(it.get("destination") is None or is_str(it["destination"]), manifest,
               f"items[{n}].destination should be a string or null")
        _check(it.get("digest") is None or is_str(it["digest"]), manifest, f"items[{n}].digest should be a string")
        _check(it.get("catalog_row") is None or is_str(it["catalog_row"]), manifest,
               f"items[{n}].catalog_row should be a string")
        copies = it.get("copies", [])
        _check(isinstance(copies, list) and all(isinstance(c, dict) and is_str(c.get("destination"))
                                                and is_str(c.get("sha256")) for c in copies),
               manifest, f"items[{n}].copies should be a list of {{destination, sha256}} objects")
    cat = data.get("catalog") or {}
    _check(isinstance(cat, dict) and isinstance(cat.get("rows", []), list) and all(map(is_str, cat.get("rows", [])))
           and is_str(cat.get("appended") or ""), manifest, "'catalog' should hold rows (strings) and appended text")
    ml = data.get("mlflow") or {}
    _check(isinstance(ml, dict), manifest, "'mlflow' should be an object")
    _check(is_str(ml.get("tracking_uri") or ""), manifest, "mlflow.tracking_uri should be a string")
    _check(isinstance(ml.get("runs", []), list) and all(isinstance(r, dict) and is_str(r.get("run_id"))
                                                        for r in ml.get("runs", [])),
           manifest, "mlflow.runs should be a list of {run_id} objects")
    _check(isinstance(ml.get("experiments_created", []), list) and all(map(is_str, ml.get("experiments_created", []))),
           manifest, "mlflow.experiments_created should be a list of strings")
    _check(isinstance(ml.get("artifacts", []), list) and all(isinstance(a, dict) and is_str(a.get("path"))
                                                             and is_str(a.get("sha256"))
                                                             for a in ml.get("artifacts", [])),
           manifest, "mlflow.artifacts should be a list of {path, sha256} objects")
    _check(isinstance(data.get("created_dirs", []), list) and all(map(is_str, data.get("created_dirs", []))),
           manifest, "created_dirs should be a list of strings")
    _check(data.get("undone") is None or isinstance(data["undone"], dict), manifest, "undone should be an object")
    return data


def read_verified(paths: ProjectPaths, manifest: Path) -> dict:
    """The manifest's data when the ledger knows its exact bytes and its fields have the right types."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise UserError(f"manifest not found: {manifest}" if not manifest.exists()
                        else f"{manifest} is not a file; give an outputs/adopt/adopt_*.json manifest")
    raw = manifest.read_bytes()[: 1 << 26]
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{manifest} is not an adoption manifest (not JSON)") from None
    check_shape(manifest, data)
    entry = _read_ledger(paths).get(manifest.name)
    if manifest.resolve().parent != manifest_dir(paths).resolve() or not isinstance(entry, dict):
        raise UserError(f"{manifest} is not in the adopt ledger ({manifest_dir(paths) / LEDGER_FILE}): adopt did "
                        "not write it in this project; nothing was changed")
    if hashlib.sha256(raw).hexdigest() not in (entry.get("sha256"), entry.get("previous")):
        raise UserError(f"{manifest} was changed after adopt wrote it (its sha256 differs from the adopt ledger); "
                        "refusing to act on it, nothing was changed")
    return data


def trusted_manifests(paths: ProjectPaths):
    """(path, data) of every manifest the ledger vouches for, oldest first; others are passed over."""
    folder = manifest_dir(paths)
    if not folder.is_dir():
        return
    try:
        _read_ledger(paths)
    except UserError:
        return
    for m in sorted(folder.glob("adopt_*.json")):
        try:
            yield m, read_verified(paths, m)
        except (UserError, OSError):
            continue


@contextmanager
def adopt_lock(paths: ProjectPaths):
    """One adoption or undo at a time in a project (see the module docstring).

    The lock file is removed on release (and its folder when this call made it and it is
    empty), with the inode check that keeps removal safe (as `training.lifecycle.adapter_lock`).
    """
    folder = manifest_dir(paths)
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / LOCK_FILE
    while True:
        fh = open(lock_path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            pid = fh.read().strip()
            fh.close()
            raise UserError(f"another adoption or undo is running in this project"
                            f"{f' (pid {pid})' if pid.isdigit() else ''}; wait for it to finish, then run again") from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        fh.close()  # its previous holder removed the file we locked: try again
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        try:
            os.unlink(lock_path)  # still holding the lock: nobody is between open and flock on it
        except OSError:
            pass
        fh.close()
        if made:
            try:
                folder.rmdir()
            except OSError:
                pass  # not empty: a manifest was written
