"""The adoption plan: where each adopted item goes, catalog row names, what was adopted before.

Destinations never overwrite: a name already taken in the project gets a clear suffix
(``kids_lora`` -> ``kids-adopted_lora``). An item that an earlier adoption already brought
in (a manifest the adopt ledger vouches for, the item done there, its copy still there) is
skipped with the manifest that did it. Items are matched by their source path and content
digest first, then by digest alone (a renamed folder), each earlier item at most once.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from lora_project.adopt._project import (
    _NAME_RE,
    ProjectPaths,
    UserError,
    default_tracking_uri,
    load_catalog,
    load_project_config,
    resolve_tracking_uri,
)
from lora_project.adopt.scan import Item, check_old_dir, content_digest, scan

from lora_project.adopt.ledger import MANIFEST_FORMAT, manifest_dir, trusted_manifests  # noqa: F401

EMBEDDED_HUB_IDS = {"HuggingFaceTB/SmolLM2-135M-Instruct"}  # what the embedded default model is


def shown(text: str | None) -> str:
    """A path for a terminal or a UTF-8 file: bytes of a file name that are not UTF-8 as \\xNN."""
    if text is None:
        return "-"
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def safe_name(text: str, fallback: str = "adopted") -> str:
    """A folder-safe catalog/adapter name from a file or folder name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    name = re.sub(r"\.{2,}", ".", name)[:100]
    return name if name and _NAME_RE.match(name) else fallback


def _unique(name: str, taken) -> str:
    if not taken(name):
        return name
    for i in range(1, 1000):
        cand = f"{name}-adopted" if i == 1 else f"{name}-adopted{i}"
        if not taken(cand):
            return cand
    raise UserError(f"too many adopted copies named {name}")


@dataclass
class Plan:
    """What `adopt` would do (or did): the items, the catalog rows, the attention list."""

    paths: ProjectPaths
    old_dir: Path
    items: list[Item]
    rows: list[tuple[Item, dict]] = field(default_factory=list)   # (data item, catalog row)
    tracking_uri: str = ""
    scratch: object = None   # the temporary folder holding MLflow stores as MLflow read them

    @property
    def attention(self) -> list[str]:
        return [it.attention for it in self.items if it.attention]

    def totals(self) -> dict:
        out = {"files": sum(len(it.files) for it in self.items), "items": len(self.items)}
        for action in ("copy", "convert", "import", "leave", "skip", "failed"):
            out[action] = sum(1 for it in self.items if it.action == action)
        out["bytes_adopted"] = sum(it.size for it in self.items if it.action in ("copy", "convert", "import"))
        out["catalog_rows"] = [row["name"] for it, row in self.rows if it.action in ("copy",)]
        out["mlflow_runs"] = sum(it.info.get("runs", 0) for it in self.items
                                 if it.kind == "mlflow" and it.action == "import")
        out["needs_attention"] = len(self.attention)
        return out

    def to_json(self, manifest: Path | None = None) -> dict:
        return {"items": [it.public() for it in self.items], "totals": self.totals(),
                "manifest": str(manifest.relative_to(self.paths.root)) if manifest else None}


def earlier_adoptions(paths: ProjectPaths) -> list[tuple[str, dict]]:
    """(manifest file name, item entry) of every item done by an adoption not undone, oldest first."""
    out = []
    for m, data in trusted_manifests(paths):
        if data.get("undone"):
            continue
        for it in data["items"]:
            if it.get("state") == "done" and it.get("digest") and it.get("destination"):
                out.append((m.name, it))
    return out


def _still_there(paths: ProjectPaths, entry: dict) -> bool:
    if not (paths.root / entry["destination"].rstrip("/")).exists():
        return False
    return all((paths.root / c["destination"]).exists() for c in entry.get("copies", []))


def _matcher(paths: ProjectPaths):
    """match(item) -> (manifest name, destination) of the earlier adoption of that item, or None."""
    earlier = earlier_adoptions(paths)
    claimed: set[int] = set()

    def match(it: Item):
        for exact in (True, False):  # same source path and digest first, then the digest alone
            for k, (man, e) in enumerate(earlier):
                if k in claimed or e["digest"] != it.digest or (exact and e["source"] != it.source):
                    continue
                if _still_there(paths, e):
                    claimed.add(k)
                    return man, e["destination"]
        return None

    return match


def _same_base(adapter_base: str, configured: str) -> bool | None:
    """Whether the adapter's recorded base is the configured one; None when it records none."""
    from lora_project.models.base_model import names_embedded

    if not adapter_base:
        return None  # unknown: nothing says either way
    if adapter_base == configured:
        return True
    if configured == "embedded":
        return adapter_base in EMBEDDED_HUB_IDS or names_embedded(adapter_base)
    a, c = Path(adapter_base).expanduser(), Path(configured).expanduser()
    try:
        return a.exists() and c.exists() and a.resolve() == c.resolve()
    except OSError:
        return False


def make_plan(paths: ProjectPaths, old_dir: Path) -> Plan:
    """Scan OLD_DIR and decide every item's destination; reads only, writes nothing."""
    old = check_old_dir(old_dir, paths.root)
    catalog = load_catalog(paths.catalog)
    items = scan(old)
    plan = Plan(paths, old, items, tracking_uri=resolve_tracking_uri(paths))
    earlier = _matcher(paths)
    configured = None
    planned: set[str] = set()
    names = set(catalog)

    def dest_taken(rel: str) -> bool:
        return rel in planned or (paths.root / rel).exists() or (paths.root / rel).is_symlink()

    for it in items:
        if it.action not in ("copy", "convert", "import"):
            continue
        it.digest, it.info["sha256"] = content_digest(old, it.files)
        found = earlier(it)
        if found:
            man, dest = found
            it.action, it.destination = "skip", dest
            it.reason = f"already adopted by {man} as {dest} (same content)"
            continue
        if it.kind == "adapter":
            if configured is None:
                configured = load_project_config(paths).model.source
            src = Path(it.source.rstrip("/")) if it.source != "./" else Path(old.name)
            base = src.name
            if it.info.get("checkpoint"):
                base = f"{src.parent.name or old.name}-{src.name}"
            base = re.sub(r"[_-]?lora$", "", safe_name(base), flags=re.I) or "adapter"
            name = _unique(safe_name(base), lambda n: dest_taken(f"adapters/{n}_lora"))
            it.destination = f"adapters/{name}_lora"
            it.info["name"] = name
            it.info["same_base"] = _same_base(it.info.get("base_model", ""), configured)
            it.info["configured"] = configured
            if it.info["same_base"] is None:
                it.reason += "; no base model recorded in adapter_config.json (base_model_name_or_path is empty): " \
                             "it may not fit the configured base"
                it.attention = f"{shown(it.source)}: no base model recorded; check that it was trained on " \
                               f"{configured} before evaluating it"
            elif not it.info["same_base"]:
                it.reason += f"; trained on base {it.info['base_model']}, not the configured " \
                             f"{configured}: adopted and marked with its base"
                it.attention = f"{it.source}: needs base model {it.info['base_model']} (the project uses {configured})"
        elif it.kind in ("data", "chat"):
            suffix = "" if it.info.get("folder") else Path(it.files[0]).suffix.lower()
            where = "data/childes" if it.kind == "chat" else "data/raw"
            stem = safe_name(it.info["name"], "data")
            name = _unique(stem, lambda n: n in names or dest_taken(f"{where}/{n}{suffix}"))
            names.add(name)
            it.destination = f"{where}/{name}{suffix}" + ("/" if it.info.get("folder") else "")
            row = {"name": name, "location": it.destination.rstrip("/"), "license": "unknown (adopted)",
                   "description": shown(f"adopted from {old / it.source.replace('*.cha', '')}".rstrip("/")),
                   "split": "0.8/0.1/0.1", "enabled": "true", **it.info["row"]}
            plan.rows.append((it, row))
            it.reason += f"; catalog row '{name}'"
        elif it.kind in ("script", "notebook", "config"):
            top = {"script": "scripts", "notebook": "notebooks", "config": "config"}[it.kind]
            rel = Path(it.source)
            if it.kind != "script" and len(rel.parts) > 1 and rel.parts[0] in (top, "configs"):
                rel = Path(*rel.parts[1:])  # notebooks/x.ipynb -> notebooks/legacy/x.ipynb
            dest = f"{top}/legacy/{rel.as_posix()}"
            if dest_taken(dest):
                dest = f"{top}/legacy/{rel.parent.as_posix()}/{rel.stem}_adopted{rel.suffix}".replace("/./", "/")
                n = 2
                while dest_taken(dest):
                    dest = f"{top}/legacy/{rel.parent.as_posix()}/{rel.stem}_adopted{n}{rel.suffix}".replace("/./", "/")
                    n += 1
            it.destination = dest
        elif it.kind == "mlflow":
            if not _readable_store(plan, it):
                continue
            uri = plan.tracking_uri
            it.destination = "mlruns/mlflow.db" if uri == default_tracking_uri(paths) else uri
        if it.destination:
            planned.add(it.destination.rstrip("/"))
    return plan


def _readable_store(plan: Plan, it: Item) -> bool:
    """Read the MLflow store with MLflow's own migration (the one --apply uses); a store it cannot
    read, or reads only in part, is left in place and reported. Keeps the migrated database for --apply."""
    from lora_project.adopt.mlflow_import import count_runs, read_file_store, scratch_dir

    if plan.scratch is None:
        plan.scratch = scratch_dir()
    folder = Path(plan.scratch.name) / str(len(list(Path(plan.scratch.name).iterdir())))
    folder.mkdir()
    store = plan.old_dir / it.source.rstrip("/")
    problem = ""
    try:
        db, skipped = read_file_store(store, str(folder))
    except UserError as exc:
        problem = str(exc)
    else:
        live, total = count_runs(db)
        if skipped:
            rels = [shown(os.path.relpath(p, plan.old_dir)) for p in skipped]
            problem = f"MLflow cannot read {', '.join(rels[:3])}" + (f" and {len(rels) - 3} more" if len(rels) > 3
                                                                      else "")
        elif total < it.info["run_folders"]:
            problem = f"MLflow reads {total} of its {it.info['run_folders']} run folders"
        it.info.update(runs=live, migrated=db)
    if not problem:
        return True
    it.action = "leave"
    it.reason = f"MLflow file store, not imported: {problem}"
    it.attention = f"{shown(it.source)}: {problem}; fix or remove what MLflow cannot read, then adopt again"
    return False


def format_plan(plan: Plan, title: str = "Plan", manifest: Path | None = None) -> str:
    """The plan (or result) as a readable table, totals and the attention list."""
    rows = [("source", "action", "kind", "destination", "reason")]
    for it in plan.items:
        rows.append((shown(it.source), it.action, it.kind, shown(it.destination), shown(it.reason)))
    widths = [min(max(len(r[i]) for r in rows), cap) for i, cap in enumerate((48, 8, 13, 40))]

    def cut(text: str, w: int) -> str:
        return text if len(text) <= w else "..." + text[-(w - 3):]

    lines = [f"{title}: adopt {plan.old_dir} into {plan.paths.root}", ""]
    for r in rows:
        lines.append("  ".join(cut(r[i], widths[i]).ljust(widths[i]) for i in range(4)) + "  " + r[4])
    t = plan.totals()
    done = manifest is not None
    lines += ["", f"{t['files']} files in {t['items']} items: {t['copy']} {'copied' if done else 'to copy'}, "
              f"{t['convert']} {'converted' if done else 'to convert'}, {t['import']} "
              f"{'imported' if done else 'to import'}, {t['skip']} already adopted, {t['leave']} left in place"
              + (f", {t['failed']} failed" if t["failed"] else "")]
    if t["catalog_rows"]:
        lines.append("catalog rows: " + ", ".join(t["catalog_rows"]))
    if plan.attention:
        lines += ["", "needs your attention:"] + [f"  - {shown(a)}" for a in plan.attention]
    if done and t["failed"]:
        lines += ["", f"not complete: {t['failed']} item(s) failed (see above; the manifest says complete: false); "
                  "fix them and run adopt --apply again to add them"]
    if manifest is not None:
        lines += ["", f"manifest: {manifest.relative_to(plan.paths.root)} "
                  f"(undo with: lora-project adopt --undo {manifest.relative_to(plan.paths.root)})"]
    return "\n".join(lines)
