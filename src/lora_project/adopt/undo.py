"""Take an adoption back from its manifest: exactly what it added, nothing else.

Files are removed only while their sha256 still matches what the adoption wrote (a file
changed since is kept and reported); folders the adoption created are removed when empty;
its catalog rows are removed (the catalog gets back its earlier bytes when nothing was
added after them); its MLflow runs are deleted and purged, and the experiments it created
too when they are empty. The manifest is kept, marked undone.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from lora_project.adopt._project import (
    ProjectPaths,
    UserError,
    load_catalog,
    remove_rows,
    sha256_file,
)
from lora_project.adopt.ledger import ADOPT_AREAS, adopt_lock, read_verified, write_manifest
from lora_project.adopt.plan import shown


def read_manifest(paths: ProjectPaths, manifest: Path) -> dict:
    """A manifest of this project's adoptions that the adopt ledger vouches for, whose every
    destination lies in the areas an adoption writes to; else a one-line UserError."""
    manifest = Path(manifest)
    data = read_verified(paths, manifest)
    if Path(str(data.get("project", ""))).resolve() != paths.root:
        raise UserError(f"{manifest} belongs to the project {data.get('project')}, not {paths.root}")
    if data.get("undone"):
        raise UserError(f"{manifest}: this adoption was already undone on {data['undone'].get('at', '?')}")
    for it in data["items"]:
        dest = (it.get("destination") or "").rstrip("/")
        for c in it.get("copies", []):
            p = paths.inside(Path(c["destination"]), f"{manifest}: destination")
            rel = p.relative_to(paths.root).as_posix()
            if not rel.startswith(ADOPT_AREAS) or not (rel == dest or rel.startswith(dest + "/")):
                raise UserError(f"{manifest}: {c['destination']} is not where adopt puts files; refusing to "
                                "remove anything")
    return data


def undo_adoption(paths: ProjectPaths, manifest: Path, log=None) -> dict:
    """Remove what the adoption of `manifest` added; returns {"items", "totals", "manifest"}.
    One adoption or undo runs at a time (the adopt lock)."""
    with adopt_lock(paths):
        return _undo(paths, Path(manifest), log)


def _undo(paths: ProjectPaths, manifest: Path, log) -> dict:
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
        if dest.startswith(ADOPT_AREAS) and ".." not in Path(dest).parts and \
                (dest.endswith("/") or (folder.is_dir() and it.get("kind") in ("adapter", "chat"))):
            _remove_empty(folder)
        removed_files += gone
        kept += changed
        reason = f"removed {gone} file(s)" + (f"; kept {len(changed)} changed since: {', '.join(changed)}"
                                               if changed else "")
        out_items.append({"source": it["source"], "kind": it["kind"], "action": "removed" if not changed else "kept",
                          "destination": dest, "reason": reason})
        say(shown(f"undo     {dest}: {reason}"))
    cat = data.get("catalog") or {}
    rows_removed = []
    ours = _own_rows(paths, data)
    if ours:
        rows_removed = remove_rows(paths.catalog, ours, cat.get("appended") or None)
        say(f"catalog: removed {', '.join(rows_removed) or 'nothing (rows already gone)'}")
    ml = data.get("mlflow") or {}
    mlflow_removed = {"runs": [], "experiments": [], "not_purged": []}
    if ml.get("runs") or ml.get("experiments_created"):
        from lora_project.adopt.mlflow_import import client_for, remove_runs

        mlflow_removed = remove_runs(client_for(ml["tracking_uri"]), [r["run_id"] for r in ml.get("runs", [])],
                                     list(ml.get("experiments_created", [])))
        for a in ml.get("artifacts", []):
            p = paths.root / a["path"] if not Path(a["path"]).is_absolute() else Path(a["path"])
            if paths.mlruns_dir.resolve() in p.resolve().parents and p.is_file() and sha256_file(p) == a["sha256"]:
                p.unlink()
                _remove_empty_up(p.parent, paths.mlruns_dir)
        say(f"mlflow: deleted and purged {len(mlflow_removed['runs'])} run(s)")
    for d in sorted(data.get("created_dirs", []), key=lambda s: -s.count("/")):
        p = paths.root / d
        if p.is_dir() and not any(p.iterdir()) and p != Path(manifest).resolve().parent:
            p.rmdir()
    data["undone"] = {"at": datetime.now(timezone.utc).isoformat(), "kept_changed_files": kept,
                      "catalog_rows_removed": rows_removed, "mlflow_runs_removed": mlflow_removed["runs"]}
    write_manifest(paths, Path(manifest), data)
    return {"items": out_items,
            "totals": {"files_removed": removed_files, "files_kept": len(kept), "catalog_rows_removed": rows_removed,
                       "mlflow_runs_removed": len(mlflow_removed["runs"]),
                       "mlflow_experiments_removed": len(mlflow_removed["experiments"])},
            "manifest": str(Path(manifest).resolve().relative_to(paths.root))
            if paths.root in Path(manifest).resolve().parents else str(manifest)}


def _own_rows(paths: ProjectPaths, data: dict) -> list[str]:
    """The catalog rows this adoption added and that still point where it put their data."""
    places = {it["catalog_row"]: (it.get("destination") or "").rstrip("/") for it in data["items"]
              if it.get("catalog_row") and it.get("state") == "done"}
    rows = (data.get("catalog") or {}).get("rows", [])
    catalog = load_catalog(paths.catalog)
    return [r for r in rows if r in places and r in catalog and catalog[r].location.rstrip("/") == places[r]]


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
