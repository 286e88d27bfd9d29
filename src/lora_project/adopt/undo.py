"""Take an adoption back from its manifest: exactly what it added, nothing else.

Files are removed only while their sha256 still matches what the adoption wrote (a file
changed since is kept and reported); folders the adoption created are removed when empty;
its catalog rows are removed (the catalog gets back its earlier bytes when nothing was
added after them); its MLflow runs are deleted and purged, and the experiments it created
too when they are empty. The manifest is kept, marked undone.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from lora_project.adopt._project import (
    ProjectPaths,
    UserError,
    atomic_write_json,
    remove_rows,
    sha256_file,
)
from lora_project.adopt.plan import MANIFEST_FORMAT


def read_manifest(paths: ProjectPaths, manifest: Path) -> dict:
    """A manifest of this project's adoptions, or a one-line UserError."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise UserError(f"manifest not found: {manifest}" if not manifest.exists()
                        else f"{manifest} is not a file; give an outputs/adopt/adopt_*.json manifest")
    raw = manifest.read_bytes()[: 1 << 26]
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{manifest} is not an adoption manifest (not JSON)") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("items"), list):
        raise UserError(f"{manifest} is not an adoption manifest (no format '{MANIFEST_FORMAT}')")
    if Path(str(data.get("project", ""))).resolve() != paths.root:
        raise UserError(f"{manifest} belongs to the project {data.get('project')}, not {paths.root}")
    if data.get("undone"):
        raise UserError(f"{manifest}: this adoption was already undone on {data['undone'].get('at', '?')}")
    for it in data["items"]:
        for c in it.get("copies", []) if isinstance(it, dict) else []:
            paths.inside(Path(c.get("destination", "")), f"{manifest}: destination")
    return data


def undo_adoption(paths: ProjectPaths, manifest: Path, log=None) -> dict:
    """Remove what the adoption of `manifest` added; returns {"items", "totals", "manifest"}."""
    say = log or (lambda m: None)
    data = read_manifest(paths, manifest)
    out_items, kept = [], []
    removed_files = 0
    for it in data["items"]:
        copies = it.get("copies") or []
        if not copies:
            continue
        gone, changed = 0, []
        for c in copies:
            p = paths.inside(Path(c["destination"]), "manifest destination")
            if not p.exists():
                continue
            if sha256_file(p) == c["sha256"]:
                p.unlink()
                gone += 1
            else:
                changed.append(c["destination"])
        dest = it.get("destination") or ""
        folder = paths.root / dest.rstrip("/")
        if dest.endswith("/") or (folder.is_dir() and it.get("kind") in ("adapter", "chat")):
            _remove_empty(folder)
        removed_files += gone
        kept += changed
        reason = f"removed {gone} file(s)" + (f"; kept {len(changed)} changed since: {', '.join(changed)}"
                                               if changed else "")
        out_items.append({"source": it["source"], "kind": it["kind"], "action": "removed" if not changed else "kept",
                          "destination": dest, "reason": reason})
        say(f"undo     {dest}: {reason}")
    cat = data.get("catalog") or {}
    rows_removed = []
    if cat.get("rows"):
        rows_removed = remove_rows(paths.catalog, list(cat["rows"]), cat.get("appended") or None)
        say(f"catalog: removed {', '.join(rows_removed) or 'nothing (rows already gone)'}")
    ml = data.get("mlflow") or {}
    mlflow_removed = {"runs": [], "experiments": [], "not_purged": []}
    if ml.get("runs") or ml.get("experiments_created"):
        from lora_project.adopt.mlflow_import import client_for, remove_runs

        mlflow_removed = remove_runs(client_for(ml["tracking_uri"]), [r["run_id"] for r in ml.get("runs", [])],
                                     list(ml.get("experiments_created", [])))
        for a in ml.get("artifacts", []):
            p = paths.root / a["path"] if not Path(a["path"]).is_absolute() else Path(a["path"])
            if p.is_file() and sha256_file(p) == a["sha256"]:
                p.unlink()
                _remove_empty_up(p.parent, paths.mlruns_dir)
        say(f"mlflow: deleted and purged {len(mlflow_removed['runs'])} run(s)")
    for d in sorted(data.get("created_dirs", []), key=lambda s: -s.count("/")):
        p = paths.root / d
        if p.is_dir() and not any(p.iterdir()) and p != Path(manifest).resolve().parent:
            p.rmdir()
    data["undone"] = {"at": datetime.now(timezone.utc).isoformat(), "kept_changed_files": kept,
                      "catalog_rows_removed": rows_removed, "mlflow_runs_removed": mlflow_removed["runs"]}
    atomic_write_json(Path(manifest), data)
    return {"items": out_items,
            "totals": {"files_removed": removed_files, "files_kept": len(kept), "catalog_rows_removed": rows_removed,
                       "mlflow_runs_removed": len(mlflow_removed["runs"]),
                       "mlflow_experiments_removed": len(mlflow_removed["experiments"])},
            "manifest": str(Path(manifest).resolve().relative_to(paths.root))
            if paths.root in Path(manifest).resolve().parents else str(manifest)}


def _remove_empty(folder: Path) -> None:
    """Remove `folder` and its subfolders when no file is left in them."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(d.iterdir()):
            d.rmdir()
    if not any(folder.iterdir()):
        folder.rmdir()


def _remove_empty_up(folder: Path, stop: Path) -> None:
    while folder != stop and stop in folder.parents and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent
