"""The `lora-project inspect` reports: what each subcommand computes and writes, ready to print.

Plots (and `values --export` files) go under `out_root/<adapter>/` (`compare`: `out_root/`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lora_project.errors import UserError
from lora_project.inspection import analysis
from lora_project.models.lora_factors import (
    Adapter,
    BaseWeights,
    LoraModule,
    list_adapters,
    load_adapter,
    require_plain_lora,
)


def base_weights(adapter: Adapter, config_files: list[Path], overrides: list[str] = ()) -> BaseWeights:
    """Base weights for relative updates: the adapter's recorded base folder, else the configured model."""
    if adapter.base_directory is not None:
        return BaseWeights(adapter.base_directory)
    from lora_project.config import load_config
    from lora_project.models.base_model import resolve_model

    cfg = load_config(config_files, overrides)
    return BaseWeights(resolve_model(cfg.model.source, cfg.model.revision).directory)


def adapter_rows(directory: Path, filter_text: str = "", sort: str = "name") -> list[dict]:
    """`inspect adapters`: one row per adapter folder (broken ones with the reason), filtered and sorted."""
    rows = list_adapters(directory)
    if filter_text:
        rows = [r for r in rows if filter_text in r["name"] or filter_text in str(r.get("dataset") or "")]
    if rows and sort not in rows[0]:
        raise UserError(f"--sort: unknown column '{sort}'; columns: {', '.join(rows[0])}")
    rows.sort(key=lambda r: (r.get(sort) is None, r.get(sort) if r.get(sort) is not None else 0))
    return rows


def weights_report(adapter_dir: Path, out_root: Path, top_k: int = 8, config_files: list[Path] = (),
                   overrides: list[str] = ()) -> dict:
    """`inspect weights`: `analysis.analyse_weights` plus its plots (paths under "plots")."""
    if top_k < 1:
        raise UserError("--top-k must be at least 1")
    adapter = require_plain_lora(load_adapter(adapter_dir), "weight analysis")
    report = analysis.analyse_weights(adapter, base_weights(adapter, config_files, overrides), top_k)
    report["plots"] = [str(p) for p in analysis.plot_weights(report, out_root / adapter.path.name)]
    return report


def values_report(adapter_dir: Path, pattern: str, out_root: Path,
                  export: str | None = None) -> tuple[dict, list[tuple[LoraModule, dict[str, np.ndarray]]]]:
    """`inspect values`: statistics, a histogram PNG and optional npy/csv exports of A, B and dW per module.

    Returns the JSON-ready report and, per module, the module and its arrays (for printing slices).
    """
    if export not in (None, "npy", "csv"):
        raise UserError(f"--export: {export!r} is not npy or csv")
    adapter = require_plain_lora(load_adapter(adapter_dir), "the update dW = scale * B @ A")
    out_dir = out_root / adapter.path.name
    entries, arrays = [], []
    for m in analysis.select_modules(adapter, pattern):
        vals = analysis.module_values(m)
        entry = {"name": m.name, "stats": {k: analysis.value_stats(v) for k, v in vals.items()}}
        safe = m.name.replace("/", "_")
        entry["histogram"] = str(analysis.plot_histograms(adapter.path.name, m, vals, out_dir / f"{safe}_hist.png"))
        if export:
            entry["exports"] = []
            for k, v in vals.items():
                f = out_dir / f"{safe}.{k}.{export}"
                if export == "npy":
                    np.save(f, v, allow_pickle=False)
                else:
                    np.savetxt(f, v, delimiter=",", fmt="%.8g")
                entry["exports"].append(str(f))
        entries.append(entry)
        arrays.append((m, vals))
    return {"adapter": adapter.path.name, "modules": entries}, arrays


def init_of(adapter: Adapter) -> tuple[dict, dict | None]:
    """What the metadata says about an adapter's initialisation ({seed, r, target_modules, base,
    known, reason}) and its re-created initial A per module (None when it cannot be re-created)."""
    from lora_project.models.lora_init import initial_lora_A, lora_section_of

    meta = adapter.metadata
    seed = ((meta.config or {}).get("training") or {}).get("seed")
    lora = lora_section_of(meta.config)
    info = {"seed": seed, "r": lora.r if lora else adapter.config.get("r"),
            "target_modules": sorted(lora.target_modules) if lora else None,
            "base_fingerprint": meta.base_fingerprint, "known": False, "reason": ""}
    if meta.origin not in (None, "trained"):
        info["reason"] = f"a {meta.origin} adapter has no single initialisation"
    elif not isinstance(seed, int) or lora is None:
        info["reason"] = "no seed or LoRA settings in its metadata (not trained by this tool?)"
    elif adapter.base_directory is None:
        info["reason"] = "its base model folder is not available"
    else:
        try:
            init = initial_lora_A(adapter.base_directory, lora, seed)
        except Exception as exc:  # noqa: BLE001 - the comparison still stands without the control
            info["reason"] = f"its initialisation could not be re-created ({type(exc).__name__}: {exc})"[:300]
            return info, None
        info["known"] = True
        return info, init
    return info, None


def shared_init(ia: dict, ib: dict) -> bool:
    """Same seed, rank, targets and base: the two adapters started from the same A."""
    return (ia["seed"] is not None and ia["target_modules"] is not None and ia["base_fingerprint"] is not None
            and all(ia[k] == ib[k] for k in ("seed", "r", "target_modules", "base_fingerprint")))


def compare_report(a_dir: Path, b_dir: Path, out_root: Path, max_rank: int | None = None,
                   config_files: list[Path] = (), overrides: list[str] = ()) -> dict:
    """`inspect compare`: `analysis.compare_adapters` (base from the first adapter) with the init
    control (each adapter's initial A re-created from its seed), plus its heatmaps."""
    a, b = (require_plain_lora(load_adapter(d), "adapter comparison") for d in (a_dir, b_dir))
    if max_rank is not None and max_rank < 1:
        raise UserError("--max-rank must be at least 1")
    (ia, init_a), (ib, init_b) = init_of(a), init_of(b)
    report = analysis.compare_adapters(a, b, base_weights(a, config_files, overrides), max_rank, init_a, init_b)
    report["init"] = {"a": ia, "b": ib, "shared": shared_init(ia, ib)}
    if report["init"]["shared"]:
        report["init"]["note"] = (f"{a.path.name} and {b.path.name} share their initialisation (seed {ia['seed']}, "
                                  f"r={ia['r']}, same targets and base): raw phi mostly measures that shared "
                                  "start; read the learned phi (A - A_init) instead")
    else:
        report["init"]["note"] = ""
    report["plots"] = [str(p) for p in analysis.plot_compare(report, out_root)]
    return report
