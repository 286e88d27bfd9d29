"""Reports on adapters: per-module weight analysis, detailed values, two-adapter comparison.

All numbers come from `lora_math` on the saved factors; plots are PNG files (matplotlib Agg).
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from pathlib import Path

import numpy as np

from lora_project.errors import UserError
from lora_project.inspection.lora_math import (
    amplification,
    effective_rank,
    factor_svd,
    stable_rank,
    subspace_similarity,
)
from lora_project.models.lora_factors import Adapter, BaseWeights, LoraModule, check_fits_base
from lora_project.utils.plotting import save_figure


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def module_report(m: LoraModule, base: BaseWeights | None, top_k: int) -> dict:
    """Norms, spectrum, ranks and relative update of one module (from the factors)."""
    import torch

    svd = factor_svd(m.A, m.B, m.scale)
    s = svd.singular_values
    delta_fro = float(torch.linalg.vector_norm(s))
    row = {"name": m.name, "layer": m.layer, "module": m.kind, "r": int(m.A.shape[0]),
           "shape": [int(m.B.shape[0]), int(m.A.shape[1])], "scale": m.scale,
           "A_fro_norm": float(torch.linalg.matrix_norm(m.A)), "B_fro_norm": float(torch.linalg.matrix_norm(m.B)),
           "delta_fro_norm": delta_fro, "spectral_norm": float(s.max()), "stable_rank": stable_rank(s),
           "effective_rank": effective_rank(s), "singular_values": [float(x) for x in s[:top_k]]}
    if base is not None:
        w0 = base.weight_of(m)
        w0_fro = float(torch.linalg.matrix_norm(w0))
        row["base_fro_norm"] = w0_fro
        row["relative_update"] = delta_fro / w0_fro if w0_fro else float("inf")
        row["amplification"] = amplification(svd, w0)
    else:
        row["relative_update"] = None
    return row


def _summary(rows: list[dict], key: str) -> dict:
    groups = defaultdict(list)
    for r in rows:
        groups[r[key]].append(r)
    out = {}
    for k, rs in sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0])):
        rel = [r["relative_update"] for r in rs if r.get("relative_update") is not None]
        out[str(k)] = {"modules": len(rs), "mean_delta_fro_norm": float(np.mean([r["delta_fro_norm"] for r in rs])),
                       "mean_relative_update": float(np.mean(rel)) if rel else None,
                       "mean_effective_rank": float(np.mean([r["effective_rank"] for r in rs]))}
    return out


def analyse_weights(adapter: Adapter, base: BaseWeights | None, top_k: int = 8) -> dict:
    """Per-module reports plus summaries by module type and by layer."""
    if base is not None:
        check_fits_base(adapter, base)
    rows = [module_report(m, base, top_k) for m in adapter.modules]
    return {"adapter": adapter.path.name, "r": adapter.config.get("r"), "alpha": adapter.config.get("lora_alpha"),
            "use_rslora": bool(adapter.config.get("use_rslora")), "modules": rows,
            "by_module": _summary(rows, "module"), "by_layer": _summary(rows, "layer")}


def plot_weights(report: dict, out_dir: Path) -> list[Path]:
    """Heatmap of the relative update (layers x modules) and singular-value spectra, as PNGs."""
    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = report["modules"]
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    kinds = sorted({r["module"] for r in rows})
    metric = "relative_update" if rows and rows[0].get("relative_update") is not None else "delta_fro_norm"
    grid = np.full((len(layers), len(kinds)), np.nan)
    for r in rows:
        if r["layer"] is not None:
            grid[layers.index(r["layer"]), kinds.index(r["module"])] = r[metric]
    paths = []
    fig, ax = plt.subplots(figsize=(2 + 1.3 * len(kinds), 1.5 + 0.25 * len(layers)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(kinds)), kinds, rotation=30)
    ax.set_yticks(range(len(layers)), layers)
    ax.set_ylabel("layer")
    ax.set_title(f"{report['adapter']}: {'||dW||/||W0||' if metric == 'relative_update' else '||dW||_F'}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    paths.append(out_dir / f"{report['adapter']}_update_heatmap.png")
    save_figure(fig, paths[-1], dpi=110)
    fig, ax = plt.subplots(figsize=(7, 4))
    cmap = plt.get_cmap("tab10")
    for r in rows:
        s = np.array(r["singular_values"])
        ax.semilogy(range(1, len(s) + 1), np.maximum(s, 1e-12), color=cmap(kinds.index(r["module"]) % 10),
                    alpha=0.35, lw=1)
    for i, k in enumerate(kinds):
        ax.plot([], [], color=cmap(i % 10), label=k)
    ax.set_xlabel("singular value index")
    ax.set_ylabel("singular value of dW")
    ax.set_title(f"{report['adapter']}: spectra of the updates (one line per module)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / f"{report['adapter']}_spectra.png")
    save_figure(fig, paths[-1], dpi=110)
    return paths


def value_stats(x: np.ndarray, near_zero: float = 1e-6) -> dict:
    """Mean, std, min, max, mean |x|, share of near-zero values and quantiles of an array."""
    flat = x.astype(np.float64).ravel()
    q = np.quantile(flat, [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99])
    return {"shape": list(x.shape), "mean": float(flat.mean()), "std": float(flat.std()), "min": float(flat.min()),
            "max": float(flat.max()), "mean_abs": float(np.abs(flat).mean()),
            "near_zero_fraction": float((np.abs(flat) < near_zero).mean()), "near_zero_threshold": near_zero,
            "quantiles": dict(zip(["p01", "p05", "p25", "p50", "p75", "p95", "p99"], map(float, q)))}


def module_values(m: LoraModule) -> dict[str, np.ndarray]:
    """A, B and the full update dW = scale * B @ A of one module, as numpy arrays."""
    A, B = m.A.numpy(), m.B.numpy()
    return {"A": A, "B": B, "delta": (m.scale * (B.astype(np.float64) @ A.astype(np.float64))).astype(np.float32)}


def plot_histograms(adapter_name: str, m: LoraModule, values: dict[str, np.ndarray], out: Path) -> Path:
    """Histograms of A, B and dW of one module, as a PNG."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, (k, v) in zip(axes, values.items()):
        ax.hist(v.ravel(), bins=60, color="steelblue")
        ax.set_title(f"{k} {tuple(v.shape)}")
        ax.set_yscale("log")
    fig.suptitle(f"{adapter_name}: {m.name}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out, dpi=100)


def _learned_svd(m: LoraModule, init: dict | None):
    """SVD of the learned change of A (A minus its re-created init), or None when unknown or zero."""
    import torch

    if init is None or m.name not in init or tuple(init[m.name].shape) != tuple(m.A.shape):
        return None
    delta = m.A.double() - init[m.name].double()
    if float(torch.linalg.matrix_norm(delta)) == 0.0:
        return None
    return factor_svd(delta, torch.eye(delta.shape[0], dtype=torch.float64), 1.0)


def _init_svd(m: LoraModule, init: dict | None):
    import torch

    if init is None or m.name not in init or tuple(init[m.name].shape) != tuple(m.A.shape):
        return None
    a0 = init[m.name].double()
    return factor_svd(a0, torch.eye(a0.shape[0], dtype=torch.float64), 1.0)


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def _init_control(m: LoraModule, s, init: dict | None, side: str) -> dict:
    """phi(r,r) between an adapter's update and its own initial A, and how far A moved (relative)."""
    import torch

    s0 = _init_svd(m, init)
    if s0 is None:
        return {}
    r = m.A.shape[0]
    a0 = init[m.name].double()
    moved = float(torch.linalg.matrix_norm(m.A.double() - a0) / torch.linalg.matrix_norm(a0))
    phi = subspace_similarity(s.right, s0.right, r, r) if bool((s.singular_values > 0).any()) else None
    return {f"init_phi_{side}": phi, f"A_change_{side}": moved}


def compare_adapters(a: Adapter, b: Adapter, base: BaseWeights | None, max_rank: int | None = None,
                     init_a: dict | None = None, init_b: dict | None = None) -> dict:
    """Subspace similarity of two adapters, module by module, with the init control when the
    initial A of each is known (`init_a`/`init_b`: module path -> initial A): phi of the learned
    changes (A - A_init) and phi between each adapter and its own initial A."""
    if a.base_fingerprint and b.base_fingerprint and a.base_fingerprint != b.base_fingerprint:
        raise UserError(f"{a.path.name} and {b.path.name} were trained on different base models "
                        f"({a.metadata.base_name or '?'} {a.base_fingerprint[:12]} vs "
                        f"{b.metadata.base_name or '?'} {b.base_fingerprint[:12]})")
    mb = {m.name: m for m in b.modules}
    common = [m for m in a.modules if m.name in mb]
    if not common:
        raise UserError(f"{a.path.name} and {b.path.name} adapt no module in common")
    rows = []
    for ma in common:
        m2 = mb[ma.name]
        if (ma.B.shape[0], ma.A.shape[1]) != (m2.B.shape[0], m2.A.shape[1]):
            raise UserError(f"module {ma.name} has different shapes in the two adapters: different bases?")
        sa, sb = factor_svd(ma.A, ma.B, ma.scale), factor_svd(m2.A, m2.B, m2.scale)
        ra, rb = ma.A.shape[0], m2.A.shape[0]
        if max_rank:
            ra, rb = min(ra, max_rank), min(rb, max_rank)
        # An update that is exactly zero has no directions: its singular vectors are whatever the
        # SVD returns, so phi would be a number about nothing (1.000 for two zero updates).
        zero = [ad.path.name for ad, s in ((a, sa), (b, sb)) if not bool((s.singular_values > 0).any())]
        grid = None if zero else [[subspace_similarity(sa.right, sb.right, i, j) for j in range(1, rb + 1)]
                                  for i in range(1, ra + 1)]
        row = {"name": ma.name, "layer": ma.layer, "module": ma.kind, "phi": grid,
               "phi_top1": grid and grid[0][0], "phi_full": grid and grid[-1][-1], "ranks": [ra, rb],
               "undefined": f"zero update in {' and '.join(dict.fromkeys(zero))}" if zero else None}
        la, lb = _learned_svd(ma, init_a), _learned_svd(m2, init_b)
        if la is not None and lb is not None and not zero:
            row["learned_phi_top1"] = subspace_similarity(la.right, lb.right, 1, 1)
            row["learned_phi_full"] = subspace_similarity(la.right, lb.right, ra, rb)
        row.update(_init_control(ma, sa, init_a, "a"))
        row.update(_init_control(m2, sb, init_b, "b"))
        if base is not None:
            w0 = base.weight_of(ma)
            row["amplification_a"], row["amplification_b"] = amplification(sa, w0), amplification(sb, w0)
        rows.append(row)
    return {"a": a.path.name, "b": b.path.name, "modules": rows,
            "mean_phi_top1": _mean(rows, "phi_top1"), "mean_phi_full": _mean(rows, "phi_full"),
            "undefined_modules": [r["name"] for r in rows if r["undefined"]],
            **{f"mean_{k}": _mean(rows, k) for k in ("learned_phi_top1", "learned_phi_full", "init_phi_a",
                                                     "init_phi_b", "A_change_a", "A_change_b")},
            "random_baseline_full": float(np.mean([max(r["ranks"]) /
                                                   mb[r["name"]].A.shape[1] for r in rows]))}


def plot_compare(report: dict, out_dir: Path) -> list[Path]:
    """Plots of an adapter comparison, as PNGs."""
    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = report["modules"]
    kinds = sorted({r["module"] for r in rows})
    paths = []
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.6), squeeze=False)
    for ax, k in zip(axes[0], kinds):
        mats = [np.array(r["phi"]) for r in rows if r["module"] == k and r["phi"] is not None]
        if not mats:
            ax.text(0.5, 0.5, "phi undefined\n(zero update)", ha="center", va="center")
            ax.set_title(f"{k}", fontsize=9)
            ax.set_axis_off()
            continue
        mean = np.mean(mats, axis=0)
        im = ax.imshow(mean, vmin=0, vmax=1, cmap="magma", origin="lower",
                       extent=(0.5, mean.shape[1] + 0.5, 0.5, mean.shape[0] + 0.5))
        ax.set_xlabel(f"j (top-j of {report['b']})")
        ax.set_ylabel(f"i (top-i of {report['a']})")
        ax.set_title(f"{k}: mean phi over layers", fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    paths.append(out_dir / f"compare_{report['a']}_vs_{report['b']}_phi.png")
    save_figure(fig, paths[-1], dpi=110)
    return paths


def select_modules(adapter: Adapter, pattern: str) -> list[LoraModule]:
    """Modules whose PEFT path matches a glob (or ends with the given text); close names on a miss."""
    chosen = [m for m in adapter.modules if fnmatch.fnmatchcase(m.name, pattern) or m.name.endswith(pattern)]
    if not chosen:
        import difflib

        close = difflib.get_close_matches(pattern, [m.name for m in adapter.modules], n=3, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else \
            f"; e.g. {adapter.modules[0].name} or '*.layers.0.self_attn.q_proj'"
        raise UserError(f"module pattern {pattern!r} matches nothing in {adapter.path.name}{hint}")
    return chosen
