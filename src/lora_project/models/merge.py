"""Combine adapters into a new adapter, or bake one adapter into a full model.

* `merge_adapters`: PEFT's ``add_weighted_adapter`` with ``linear`` (same rank),
  ``cat`` (ranks add up; exact sum of the weighted updates), ``ties``, ``dare_linear`` or
  ``dare_ties`` (with ``density``). The result is a normal PEFT adapter folder plus our
  metadata naming its sources.
* `export_merged_model`: base + adapter merged into the weights (``merge_and_unload``),
  saved as a plain transformers model folder (safetensors + tokenizer) whose logits equal
  base + adapter.

Both write into a temporary folder that is renamed into place only when complete.
"""

from __future__ import annotations

import math
from pathlib import Path

from lora_project.errors import UserError
from lora_project.utils.io_utils import atomic_directory, atomic_write_json

METHODS = ("linear", "cat", "ties", "dare_linear", "dare_ties")
# Written into every exported model folder: --overwrite replaces only folders that carry it.
EXPORT_MARKER = "lora_project_export.json"


def merge_adapters(base, adapter_dirs: list[Path], weights: list[float], method: str, target: Path,
                   density: float = 0.5, overwrite: bool = False) -> Path:
    """Combine adapters with one of PEFT's methods into a new adapter folder."""
    from lora_project.models.adapter import AdapterMetadata, now_iso, read_metadata
    from lora_project.models.lora_model import attach_adapters, save_adapter

    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}")
    if len(adapter_dirs) < 1:
        raise UserError("name at least one adapter to merge")
    if len(weights) != len(adapter_dirs):
        raise UserError(f"--weights has {len(weights)} values for {len(adapter_dirs)} adapters")
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise UserError(f"--weights must be finite numbers, got {bad[0]}")
    resolved = [Path(d).resolve() for d in adapter_dirs]
    twice = sorted({str(d) for d in resolved if resolved.count(d) > 1})
    if twice:
        raise UserError(f"adapter {twice[0]} is named twice; merging an adapter with itself doubles its "
                        "update (use --weights to scale one adapter instead)")
    if not 0 < density <= 1:
        raise UserError(f"--density must be in (0, 1], got {density}")
    if target.exists() and not overwrite:
        raise UserError(f"adapter {target} already exists; pass --overwrite to replace it")
    model, names = attach_adapters(base.model, adapter_dirs, base.ref.fingerprint)
    ranks = {model.peft_config[n].r for n in names}
    if method != "cat" and len(ranks) > 1:
        raise UserError(f"method '{method}' needs adapters of equal rank (got {sorted(ranks)}); use --method cat")
    kwargs = {"density": density} if method in ("ties", "dare_linear", "dare_ties") else {}
    try:
        model.add_weighted_adapter(adapters=names, weights=list(weights), adapter_name="merged",
                                   combination_type=method, **kwargs)
    except ValueError as exc:
        raise UserError(f"PEFT refused the merge: {exc}") from None
    model.set_adapter("merged")
    try:
        first = read_metadata(Path(adapter_dirs[0]))
        meta = AdapterMetadata(
            adapter_name=target.name.removesuffix("_lora"), created=now_iso(), origin="merged",
            base_model=first.base_model or {"name": base.ref.name, "fingerprint": base.ref.fingerprint,
                                            "directory": str(base.ref.directory)},
            extra={"merged_from": [{"adapter": str(d), "weight": w} for d, w in zip(adapter_dirs, weights)],
                   "merge_method": method, "density": density if kwargs else None})
        save_adapter(model, target, meta, overwrite=overwrite, adapter_name="merged")
    finally:
        base.model = model.unload()
    return target


def export_merged_model(base, adapter_dir: Path, target: Path, overwrite: bool = False) -> Path:
    """Fold an adapter into the base weights and save a standalone model (safetensors)."""
    from lora_project.models.lora_model import attach_adapters

    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists; pass --overwrite to replace it")
    if target.exists() and not (target / EXPORT_MARKER).is_file():
        raise UserError(f"refusing to replace {target}: it is not a model folder exported by lora-project "
                        f"(no {EXPORT_MARKER}); choose another --export-model folder")
    model, _ = attach_adapters(base.model, [adapter_dir], base.ref.fingerprint)
    merged = model.merge_and_unload()
    try:
        with atomic_directory(target, overwrite=overwrite) as tmp:
            merged.save_pretrained(str(tmp), safe_serialization=True)
            base.tokenizer.save_pretrained(str(tmp))
            atomic_write_json(tmp / EXPORT_MARKER, {"adapter": str(adapter_dir), "base_model": base.ref.name,
                                                    "base_fingerprint": base.ref.fingerprint})
    finally:
        base.model = None  # the base weights now hold the merge; callers must not reuse them
    return target
