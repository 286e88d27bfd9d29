"""Carry out an adoption plan: copy (never move), check every copy by sha256, write the manifest.

Each item lands whole or not at all: a file is written to a temporary sibling, checked, then
hard-linked into place (which fails rather than overwrite); a folder (an adapter, CHAT
transcripts) is built under a temporary name and renamed into place. Placing an item, its
catalog row and its record in the manifest happen in one step that Ctrl-C does not split
(the stop is deferred to its end). The manifest ``outputs/adopt/adopt_<timestamp>.json`` is
rewritten after every item (its digest recorded in the adopt ledger first), each item with
its state (planned, done, failed); ``complete`` is true only when every item is done. An
interrupted adoption says so in the manifest and on the terminal, can be undone, and a
re-run adds what is missing. OLD_DIR is only read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from lora_project.adopt._project import (
    METADATA_FILE,
    AdapterMetadata,
    UserError,
    append_rows,
    atomic_write_json,
    check_adapter_dir,
    default_mode,
    fsync_dir,
    acknowledge,
    sha256_file,
    shielded,
)
from lora_project.adopt.ledger import MANIFEST_FORMAT, manifest_dir, write_manifest
from lora_project.adopt.plan import Plan, shown
from lora_project.adopt.scan import Item

_ORDER = {"adapter": 0, "data": 1, "chat": 1, "script": 2, "notebook": 2, "config": 2, "mlflow": 3}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class Recorder:
    """The manifest being written: every item with its state, every file added, catalog rows, MLflow runs."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.paths = plan.paths
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
        self.path = manifest_dir(self.paths) / f"adopt_{stamp}.json"
        self.created_dirs: list[str] = []
        self.data = {
            "format": MANIFEST_FORMAT, "old_dir": str(plan.old_dir), "project": str(self.paths.root),
            "started": _now(), "finished": None, "complete": False, "interrupted": None,
            "items": [], "catalog": {"file": "config/dataset_catalog.csv", "rows": [], "appended": ""},
            "mlflow": {"tracking_uri": plan.tracking_uri, "runs": [], "experiments_created": [], "artifacts": []},
            "created_dirs": self.created_dirs, "undone": None,
        }
        self.entries: dict[int, dict] = {}
        for it in plan.items:
            todo = it.action in ("copy", "convert", "import")
            entry = {"source": it.source, "kind": it.kind, "action": it.action, "destination": it.destination,
                     "reason": it.reason, "digest": it.digest or None, "source_files": list(it.files),
                     "state": "planned" if todo else None, "catalog_row": None, "copies": []}
            self.entries[id(it)] = entry
            self.data["items"].append(entry)

    def ensure_dir(self, folder: Path) -> None:
        """mkdir -p, remembering each folder it made (undo removes them again when empty)."""
        missing = []
        p = folder
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            self.created_dirs.append(d.relative_to(self.paths.root).as_posix())

    def done(self, it: Item, copies: list[tuple[str, Path, str]]) -> None:
        """The item is in place: record its copies, add its catalog row, mark it done, save.
        Called inside the shielded step that placed it."""
        e = self.entries[id(it)]
        e["copies"] += [{"source": src, "destination": self.rel(dest), "sha256": sha} for src, dest, sha in copies]
        rows = [row for item, row in self.plan.rows if item is it]
        try:
            if rows:
                appended = append_rows(self.paths.catalog, rows)
                self.data["catalog"]["rows"] += [r["name"] for r in rows]
                self.data["catalog"]["appended"] += appended
                e["catalog_row"] = rows[0]["name"]
        except UserError as exc:
            _fail(it, exc)
        else:
            e["state"] = "done"
        self.update(it)
        self.save()

    def rel(self, p: Path) -> str:
        try:
            return Path(p).relative_to(self.paths.root).as_posix()
        except ValueError:
            return str(p)

    def update(self, it: Item) -> None:
        e = self.entries[id(it)]
        e.update(action=it.action, reason=it.reason, destination=it.destination)
        if it.action == "failed":
            e["state"] = "failed"

    def save(self) -> None:
        self.ensure_dir(self.path.parent)
        write_manifest(self.paths, self.path, self.data)


def _copy_verified(src: Path, tmp_dest: Path, expected: str) -> str:
    """Stream `src` into `tmp_dest`, fsync, and check both the bytes read and the bytes on disk."""
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(tmp_dest, "xb") as fo:
        while block := fi.read(1 << 20):
            h.update(block)
            fo.write(block)
        fo.flush()
        os.fsync(fo.fileno())
    if h.hexdigest() != expected:
        raise UserError(f"{src} changed while it was being adopted (sha256 differs from the scan); run adopt again")
    if sha256_file(tmp_dest) != expected:
        raise UserError(f"the copy of {src} does not match its sha256 (disk problem?)")
    shutil.copystat(src, tmp_dest)
    return expected


def _place_file(tmp: Path, dest: Path) -> None:
    """Put a finished temporary file at `dest`, never over an existing file."""
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise UserError(f"{dest} appeared while adopting; run adopt again") from None
    except OSError:  # no hard links on this file system
        if dest.exists():
            raise UserError(f"{dest} appeared while adopting; run adopt again") from None
        os.replace(tmp, dest)
    else:
        tmp.unlink()
    fsync_dir(dest.parent)


def _place_dir(tmp: Path, dest: Path) -> None:
    if dest.exists() or dest.is_symlink():
        raise UserError(f"{dest} appeared while adopting; run adopt again")
    os.rename(tmp, dest)
    fsync_dir(dest.parent)


def copy_file(rec: Recorder, it: Item, rel_src: str, dest: Path) -> None:
    src = rec.plan.old_dir / rel_src
    rec.ensure_dir(dest.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.fchmod(fd, default_mode())
    os.close(fd)
    os.unlink(tmp)
    try:
        sha = _copy_verified(src, Path(tmp), it.info["sha256"][rel_src])
        with shielded():
            _place_file(Path(tmp), dest)
            rec.done(it, [(rel_src, dest, sha)])
    finally:
        Path(tmp).unlink(missing_ok=True)


def _build_dir(rec: Recorder, it: Item, dest: Path, fill) -> None:
    """Build a folder under a temporary name with `fill(tmp)`, then rename it to `dest`."""
    rec.ensure_dir(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    os.chmod(tmp, default_mode(directory=True))
    try:
        files = fill(tmp)
        for d in [tmp, *[p for p in tmp.rglob("*") if p.is_dir()]]:
            fsync_dir(d)
        copies = [(src_rel, dest / name, sha256_file(tmp / name)) for src_rel, name in files]
        with shielded():
            _place_dir(tmp, dest)
            rec.done(it, copies)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_bin(src: Path, target: Path) -> None:
    """adapter_model.bin -> adapter_model.safetensors with PyTorch's restricted loader only."""
    import torch
    from safetensors.torch import save_file

    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:  # the restricted unpickler refuses anything but tensors and containers
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"the restricted loader (torch.load weights_only=True) refused adapter_model.bin: "
                        f"{first[:200]}") from None
    if not isinstance(state, dict) or not state or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError("adapter_model.bin is not a plain state dict of tensors")
    if not any(".lora_A" in k for k in state):
        raise UserError("adapter_model.bin holds no LoRA weights (lora_A/lora_B)")
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(target),
              metadata={"format": "pt"})


def adapter_metadata(rec: Recorder, it: Item, trainer_state: Path | None) -> dict:
    """Our lora_project.json for an adopted adapter: what is known; the rest None (unknown), not invented."""
    base = it.info.get("base_model") or None
    fingerprint, directory = None, None
    if base and it.info.get("same_base") and it.info.get("configured") == "embedded":
        from lora_project.models.base_model import embedded_fingerprint

        base, fingerprint = "embedded", embedded_fingerprint()  # its cache folder or hub id is the embedded model
    elif base and not it.info.get("same_base") and Path(base).is_dir():
        from lora_project.models.base_model import (
            resolve_model,  # hashes the weights (cached)
        )

        try:
            ref = resolve_model(base)
            fingerprint, directory = ref.fingerprint, str(ref.directory)
        except UserError:
            pass
    history = None
    if trainer_state is not None:
        try:
            state = json.loads(trainer_state.read_text(encoding="utf-8"))
            history = {"global_step": state.get("global_step"), "log_history": state.get("log_history", [])}
        except (ValueError, UnicodeDecodeError, AttributeError):
            history = {"error": "trainer_state.json is not readable JSON"}
    meta = AdapterMetadata(
        adapter_name=it.info["name"], origin="adopted",
        base_model={"name": base, "fingerprint": fingerprint, "directory": directory,
                    "matches_configured_base": it.info.get("same_base")},
        extra={"adopted": {"from": shown(str(rec.plan.old_dir / it.source)), "old_project": str(rec.plan.old_dir),
                           "adopted_at": _now(), "manifest": rec.rel(rec.path),
                           "weights": "converted from adapter_model.bin (torch.load weights_only=True)"
                           if it.action == "convert" else "copied unchanged",
                           "trainer_checkpoint": bool(it.info.get("checkpoint"))},
               "trainer_history": history,
               "unknown": ["dataset", "tokenizer_fingerprint", "config", "final_metrics", "git_commit", "packages",
                           "created", "mlflow_run_id"] + ([] if fingerprint else ["base_model.fingerprint"])})
    return meta.to_dict()


def adopt_adapter(rec: Recorder, it: Item, dest: Path) -> None:
    old = rec.plan.old_dir
    by_name = {Path(f).name: f for f in it.files}

    def fill(tmp: Path):
        done = []
        for name, rel_src in by_name.items():
            if name == "adapter_model.bin":
                _convert_bin(old / rel_src, tmp / "adapter_model.safetensors")
                done.append((rel_src, "adapter_model.safetensors"))
                continue
            _copy_verified(old / rel_src, tmp / name, it.info["sha256"][rel_src])
            done.append((rel_src, name))
        ts = tmp / "trainer_state.json" if (tmp / "trainer_state.json").is_file() else None
        atomic_write_json(tmp / METADATA_FILE, adapter_metadata(rec, it, ts))
        done.append(("(written by adopt)", METADATA_FILE))
        check_adapter_dir(tmp)
        return done

    _build_dir(rec, it, dest, fill)


def adopt_chat_folder(rec: Recorder, it: Item, dest: Path) -> None:
    old = rec.plan.old_dir

    def fill(tmp: Path):
        done = []
        for rel_src in it.files:
            name = Path(rel_src).name
            _copy_verified(old / rel_src, tmp / name, it.info["sha256"][rel_src])
            done.append((rel_src, name))
        return done

    _build_dir(rec, it, dest, fill)


def apply_plan(plan: Plan, log=None) -> Path:
    """Carry out `plan` (see the module docstring); returns the manifest path. Items that fail
    are marked 'failed' with the reason; the others go on. A stop (Ctrl-C) or an error of the
    machine ends it with the manifest saying so (``interrupted``, ``complete: false``) and a
    hint on how to finish or undo it."""
    rec = Recorder(plan)
    rec.save()
    say = log or (lambda m: None)
    todo = sorted((it for it in plan.items if it.action in ("copy", "convert", "import")),
                  key=lambda it: _ORDER.get(it.kind, 9))
    try:
        for it in todo:
            if it.kind == "mlflow":
                continue
            dest = plan.paths.root / it.destination.rstrip("/")
            try:
                if it.kind == "adapter":
                    adopt_adapter(rec, it, dest)
                elif it.kind == "chat" and it.info.get("folder"):
                    adopt_chat_folder(rec, it, dest)
                else:
                    copy_file(rec, it, it.files[0], dest)
            except UserError as exc:
                _fail(it, exc)
                rec.update(it)
                rec.save()
            else:
                say(f"{it.action:8s} {shown(it.source)} -> {shown(it.destination)}")
                row = rec.entries[id(it)]["catalog_row"]
                if row:
                    say(f"catalog: added {row}")
        for it in todo:
            if it.kind == "mlflow":
                _import_mlflow(rec, it, say)
                with shielded():
                    if it.action != "failed":
                        rec.entries[id(it)]["state"] = "done"
                    rec.update(it)
                    rec.save()
    except BaseException as exc:
        acknowledge()  # a stop that was raised at once is not raised again by the shield below
        with shielded():
            rec.data["interrupted"] = {"at": _now(), "by": type(exc).__name__,
                                       "detail": (str(exc).splitlines() or [""])[0][:300]}
            rec.data["finished"] = _now()
            rec.data["complete"] = False
            rec.save()
        exc.hint = _interrupted_hint(rec, todo)
        raise
    rec.data["finished"] = _now()
    rec.data["complete"] = all(rec.entries[id(it)]["state"] == "done" for it in todo)
    rec.save()
    return rec.path


def _interrupted_hint(rec: Recorder, todo: list[Item]) -> str:
    done = sum(1 for it in todo if rec.entries[id(it)]["state"] == "done")
    man = rec.rel(rec.path)
    return (f"the adoption did not finish ({done} of {len(todo)} items adopted; {man} records them, complete: "
            f"false); run `lora-project adopt {shown(str(rec.plan.old_dir))} --apply` again to add the rest, "
            f"or `lora-project adopt --undo {man}` to take it back")


def _fail(it: Item, exc: Exception) -> None:
    it.action = "failed"
    it.reason = f"not adopted: {exc}"
    it.attention = f"{it.source}: {exc}"


def _import_mlflow(rec: Recorder, it: Item, say) -> None:
    from lora_project.adopt.mlflow_import import import_file_store

    ml = rec.data["mlflow"]

    def record(kind: str, value) -> None:
        if kind == "experiment":
            ml["experiments_created"].append(value)
        elif kind == "run":
            ml["runs"].append(value)
        elif kind == "artifact":
            ml["artifacts"].append({**value, "path": rec.rel(Path(value["path"]))})
        rec.save()

    try:
        counts = import_file_store(rec.paths, rec.plan.old_dir / it.source.rstrip("/"), rec.plan.tracking_uri, record,
                                   migrated=it.info.get("migrated"))
    except UserError as exc:
        _fail(it, exc)
        return
    it.info["runs"] = counts["imported"]
    it.reason = (f"MLflow file store: {counts['imported']} run(s) imported with {counts['metric_points']} metric "
                 f"points" + (f", {counts['already_there']} already imported" if counts["already_there"] else "")
                 + (f", {counts['deleted_not_imported']} deleted run(s) not imported"
                    if counts["deleted_not_imported"] else ""))
    say(f"import   {shown(it.source)} -> {it.destination}: {counts['imported']} runs")
