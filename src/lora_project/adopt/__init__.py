"""Adopt an existing, scattered LoRA project: `lora-project adopt OLD_DIR` and `lora-project catalog`.

A workflow over the data, models and tracking layers:

- `scan` classifies every file of OLD_DIR (read-only, symlinks never followed, nothing unpickled);
- `plan` decides destinations, catalog rows and what an earlier adoption already brought in;
- `apply` copies with sha256 checks, item by item atomically, and writes the manifest
  ``outputs/adopt/adopt_<timestamp>.json``; `undo.undo_adoption` takes an adoption back from it;
- `ledger` vouches for manifests (their digests) and lets one adoption or undo run at a time;
- `catalog` adds, lists and removes single catalog rows.
"""

from __future__ import annotations

from pathlib import Path


def plan_adoption(paths, old_dir: Path):
    """The plan for adopting `old_dir` (nothing on disk changes)."""
    from lora_project.adopt.plan import make_plan

    return make_plan(paths, Path(old_dir))


def adopt(paths, old_dir: Path, apply: bool = False, log=None) -> tuple[dict, str]:
    """Plan, and with `apply` carry out, the adoption of `old_dir`.

    Returns (the --json object {"items", "totals", "manifest"}, the readable report).
    """
    from lora_project.adopt.ledger import adopt_lock
    from lora_project.adopt.plan import format_plan, make_plan

    if not apply:
        plan = make_plan(paths, Path(old_dir))
        return plan.to_json(), format_plan(plan, "Plan (nothing changed; run again with --apply)")
    with adopt_lock(paths):  # the plan too: two adoptions would pick the same free names
        return _apply(paths, make_plan(paths, Path(old_dir)), log)


def _apply(paths, plan, log) -> tuple[dict, str]:
    from lora_project.adopt.apply import apply_plan
    from lora_project.adopt.plan import format_plan

    if not any(it.action in ("copy", "convert", "import") for it in plan.items):
        text = format_plan(plan, "Nothing to adopt")
        already = sum(1 for it in plan.items if it.action == "skip")
        if already:
            text += f"\nnothing new: {already} item(s) were adopted before (same content); nothing was changed"
        return plan.to_json(), text
    manifest = apply_plan(plan, log=log)
    return plan.to_json(manifest), format_plan(plan, "Adopted", manifest)
