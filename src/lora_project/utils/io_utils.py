"""Crash-safe file and folder writes.

A write either lands whole or not at all: content goes to a temporary sibling, is
fsynced, then renamed over the target (rename is atomic on POSIX within one file system).
Folders (adapters) are built under a temporary name and swapped in the same way.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from lora_project.errors import UserError


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_UMASK: int | None = None


def default_mode(directory: bool = False) -> int:
    """The permissions a plain open()/mkdir() would give under the user's umask. tempfile creates
    0600 files and 0700 folders; renamed into place they would otherwise stay private."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0)
        os.umask(_UMASK)
    return (0o777 if directory else 0o666) & ~_UMASK


def atomic_write_bytes(path: Path, data: bytes, *, replace: bool = True) -> None:
    """Write bytes to a temporary sibling, fsync, rename over `path`. With replace=False an existing
    `path` is never touched: FileExistsError instead (the temporary is hard-linked into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_mode())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def output_dir(directory: Path) -> Path:
    """`directory`, created where missing; a file or a dangling link in its place is a UserError
    (commands call this before long work, so a result is never computed only to find nowhere to go)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{directory} is not a folder (a file or a broken link is in its place); "
                        "move it away and run again") from None
    return directory


def write_new_json(directory: Path, prefix: str, obj: Any) -> Path:
    """Save `obj` as directory/prefix_<UTC time>.json, atomically and never over another file: runs
    that finish in the same second get -2, -3, ... Returns the path (its stem names sibling files)."""
    from datetime import datetime, timezone

    directory = output_dir(directory)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    data = (json_text(obj) + "\n").encode("utf-8")
    for n in range(1, 10_000):
        path = Path(directory) / f"{prefix}_{stamp}{'' if n == 1 else f'-{n}'}.json"
        try:
            atomic_write_bytes(path, data, replace=False)
            return path
        except FileExistsError:
            continue
    raise UserError(f"could not find a free name for {prefix}_{stamp}.json in {directory}")


def atomic_write_text(path: Path, text: str) -> None:
    """atomic_write_bytes of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """`obj` with NaN and infinities replaced by None: JSON has no such numbers, and a file or
    line with `NaN` in it is not JSON that other tools can read."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def json_text(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON (no NaN/Infinity; those become null); unknown types as their str()."""
    return json.dumps(json_safe(obj), indent=indent, default=str, allow_nan=False)


def atomic_write_json(path: Path, obj: Any) -> None:
    """atomic_write_text of indented, strict JSON (see json_text)."""
    atomic_write_text(path, json_text(obj) + "\n")


def fsync_tree(path: Path) -> None:
    """fsync every file and folder under `path`."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(root))


def recover_directory(target: Path) -> None:
    """Finish or undo an `atomic_directory` swap that a SIGKILL or power cut interrupted.

    The swap renames the old folder aside, then the new one into place. A process killed
    between the two renames leaves no `target` but a complete `.<name>.old-<pid>` folder:
    it is renamed back. Half-built temporary folders (`.<name>.*.tmp`) are removed.
    Callers hold the folder's lock (adapters) or are its only writer (checkpoints).
    """
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return
    if not target.exists():
        olds = sorted(parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
        if olds:
            os.replace(olds[-1], target)
            fsync_dir(parent)
    for stale in list(parent.glob(f".{target.name}.old-*")) + list(parent.glob(f".{target.name}.*.tmp")):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def recover_if_unlocked(target: Path) -> None:
    """`recover_directory` for readers: only when no writer holds `.<name>.lock` beside it."""
    import fcntl

    target = Path(target)
    if target.exists() or not any(target.parent.glob(f".{target.name}.old-*")):
        return
    try:
        fh = open(target.parent / f".{target.name}.lock", "a+")
    except OSError:
        return
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a writer is mid-swap; it recovers or finishes itself
        recover_directory(target)


@contextmanager
def atomic_directory(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `target` in one rename.

    On any exception the temporary folder is removed and `target` is untouched. With
    `overwrite`, an existing target is moved aside first and deleted only after the new
    folder is in place, so at every instant one complete version exists on disk.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
    if target.exists() and not overwrite:
        raise FileExistsError(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, default_mode(directory=True))
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_file(path: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output file path that is a folder, lies under a file, or
    exists without `overwrite`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a file name for the output")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"cannot write {path}: {parent} is a file, not a folder")
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists; pass --overwrite to replace it")
