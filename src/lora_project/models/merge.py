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
    from lora_project.models.lora_factors import load_adapter, require_plain_lora
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
    for d in adapter_dirs:
        require_plain_lora(load_adapter(Path(d)), f"--method {method} merging")
    model, names = attach_adapters(base.model, adapter_dirs, base.ref.fingerprint, base.ref.name)
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
    model, _ = attach_adapters(base.model, [adapter_dir], base.ref.fingerprint, base.ref.name)
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


def merge_or_export(paths, adapter_dirs: list[Path], *, name: str | None = None, weights: str | None = None,
                    method: str = "linear", density: float = 0.5, export_model: Path | None = None,
                    overwrite: bool = False, config_files: list[Path] = (), overrides: list[str] = ()) -> dict:
    """`lora-project merge`: adapters/<name>_lora from `adapter_dirs` (`name`), and/or one adapter baked
    into a full model folder (`export_model`). Every input is checked before the base is loaded.

    `weights` is comma-separated, one per adapter (default 1/N each). The base is loaded in fp32
    (merging is exact arithmetic on the weights). Returns {"adapter": path, "model": path} as written.
    """
    import dataclasses

    from lora_project.config import load_config
    from lora_project.models.adapter import check_adapter_dir
    from lora_project.models.base_model import load_base
    from lora_project.paths import check_name

    if not name and not export_model:
        raise UserError("give --name for a merged adapter and/or --export-model DIR for a full model")
    if export_model and len(adapter_dirs) != 1 and not name:
        raise UserError("--export-model bakes one adapter into the base; name one adapter, or also --name")
    for d in adapter_dirs:
        check_adapter_dir(d)
    factors = [1.0 / len(adapter_dirs)] * len(adapter_dirs)
    if weights:
        try:
            factors = [float(w) for w in weights.split(",")]
        except ValueError:
            raise UserError(f"--weights: {weights!r} is not a comma-separated list of numbers") from None
    target = paths.adapter(check_name(name, "adapter name")) if name else None
    if target is not None and target.exists() and not overwrite:
        raise UserError(f"adapter {target} already exists; pass --overwrite to replace it")
    if export_model and export_model.exists() and not overwrite:
        raise UserError(f"{export_model} already exists; pass --overwrite to replace it")
    cfg = load_config(list(config_files), overrides)
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, precision="fp32"))
    base = load_base(cfg)
    out = {}
    if target is not None:
        out["adapter"] = str(merge_adapters(base, list(adapter_dirs), factors, method, target, density, overwrite))
    if export_model:
        source = target if target is not None else adapter_dirs[0]
        out["model"] = str(export_merged_model(base, source, export_model, overwrite))
    return out
