"""Adapters x datasets: perplexity and bits per byte of the base and every adapter on every prepared split,
with bootstrap intervals over documents and each adapter's paired change against the base."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lora_project.errors import UserError
from lora_project.paths import ProjectPaths
from lora_project.utils.plotting import save_figure


def score_locally(base, adapters: list[Path], splits: dict):
    """The matrix's scores in this process: yields ("base" or the adapter's folder name, {dataset: Score}),
    the base first, every model on the one loaded base (`splits`: {dataset: (SplitTokens, separator)})."""
    from lora_project.models.lora_model import each_model
    from lora_project.models.scoring import score_split

    for name, model in each_model(base, adapters):
        yield name, {d: score_split(model, base.tokenizer, tokens, sep, base.runtime)
                     for d, (tokens, sep) in splits.items()}


def cross_matrix(paths: ProjectPaths, cfg, *, max_tokens: int = 0, split: str = "test", log=print,
                 resamples: int | None = None, seed: int | None = None, scorer=None) -> dict:
    """Perplexity and bits/byte of the base and every sound adapter on every prepared dataset's split.

    Scored as `evaluate --dataset` scores (`models.scoring.score_split`, default windows): the whole
    split unless `max_tokens` > 0 caps each dataset to its leading documents (recorded per dataset
    in `scope`). Each cell has bootstrap 95% intervals over documents; each adapter's cell has its
    `change` against the base (paired bootstrap over the same documents). The base is loaded once;
    adapters trained on another base are left out (and said so). `scorer(base, adapters, splits)`
    gives the scores (default `score_locally`; `cluster.matrix` scores each cell as a Ray task).
    """
    from lora_project.data.preprocessor import read_split, split_separator
    from lora_project.models.adapter import read_metadata
    from lora_project.models.lora_factors import list_adapters
    from lora_project.models.base_model import load_fp32_base
    from lora_project.models.scoring import default_stride, default_window, tokenize_split
    from lora_project.utils.stats import (
        DEFAULT_RESAMPLES,
        DEFAULT_SEED,
        paired_document_difference,
    )

    if max_tokens < 0:
        raise UserError(f"the matrix token cap must be 0 (whole splits) or positive, got {max_tokens}")
    resamples = DEFAULT_RESAMPLES if resamples is None else resamples
    seed = DEFAULT_SEED if seed is None else seed
    datasets = sorted(p.name for p in paths.processed_dir.glob("*") if (p / "stats.json").is_file()) \
        if paths.processed_dir.is_dir() else []
    if not datasets:
        raise UserError("no prepared datasets; run: lora-project prepare --all")
    base = load_fp32_base(cfg)  # as `evaluate --dataset` scores: fp32 on every machine
    rows = list_adapters(paths.adapters_dir) if paths.adapters_dir.is_dir() else []
    adapters, skipped = [], []
    for r in rows:
        fp = read_metadata(Path(r["path"])).base_fingerprint if r["status"] == "ok" else None
        if r["status"] == "ok" and fp in (None, base.ref.fingerprint):
            adapters.append(Path(r["path"]))
        else:
            skipped.append(f"{r['name']} ({r['reason'] or 'another base model'})")
    if skipped:
        log(f"left out: {', '.join(skipped)}")
    splits = {}
    for d in datasets:
        docs = read_split(paths.processed(d), split)
        if docs:
            sep = split_separator(paths.processed(d))
            splits[d] = (tokenize_split(base.tokenizer, docs, sep, max_tokens), sep)
    cells: dict[str, dict[str, dict]] = {}
    base_scores, scope = {}, {}
    for name, scores in (scorer or score_locally)(base, adapters, splits):
        cells[name] = {}
        for d, s in scores.items():
            cells[name][d] = {"perplexity": s.perplexity, "bits_per_byte": s.bits_per_byte, "tokens": s.tokens,
                              "documents": s.documents, **s.intervals(resamples, seed)}
            if name == "base":
                base_scores[d], scope[d] = s, s.scope()
            else:
                b = base_scores[d]
                cells[name][d]["change"] = paired_document_difference(
                    b.doc_nll, s.doc_nll, b.doc_tokens, b.doc_bytes, resamples=resamples, seed=seed)
        log(f"  {name}: " + ", ".join(f"{d} {c['perplexity']:.2f}" for d, c in cells[name].items()))
    return {"split": split, "max_tokens": max_tokens, "cap": max_tokens or None, "scope": scope,
            "max_length": default_window(base.model), "stride": default_stride(default_window(base.model)),
            "bootstrap": {"unit": "document", "resamples": resamples, "seed": seed, "level": 0.95},
            "datasets": list(splits), "models": list(cells), "cells": cells}


def scope_note(matrix: dict) -> str:
    """What the matrix scored, for headers: whole splits, or the cap and the tokens it kept."""
    cap = matrix.get("cap")
    if cap is None and "scope" not in matrix:  # a matrix saved before scopes were recorded
        return f"first {matrix.get('max_tokens', 2000):,} tokens of each split" if matrix.get("max_tokens") \
            else "whole splits"
    if not cap:
        return "whole splits"
    kept = ", ".join(f"{d} {s['tokens_scored']:,} of {s['tokens_total']:,}" for d, s in matrix["scope"].items())
    return f"capped at {cap:,} tokens per split ({kept} tokens)"


def _change(matrix: dict, model: str, dataset: str) -> dict:
    """An adapter cell's change against the base (recomputed without interval for old matrices)."""
    cell, base = matrix["cells"][model][dataset], matrix["cells"]["base"][dataset]
    return cell.get("change") or {"bits_per_byte": cell["bits_per_byte"] - base["bits_per_byte"],
                                  "perplexity": cell["perplexity"] - base["perplexity"], "bits_per_byte_ci": None}


def matrix_figure(matrix: dict):
    """Heatmap of each adapter's change in bits per byte against the base (adapters x datasets), on a
    diverging scale centred on 0 (blue: lower than the base, better; red: higher); each cell gives
    the change, its 95% interval and the relative change in perplexity, each column the base's value.
    A matrix without adapters shows the base's bits per byte."""
    import matplotlib.pyplot as plt

    models, datasets = matrix["models"], matrix["datasets"]
    adapters = [m for m in models if m != "base"]
    if not adapters or "base" not in models:
        return _absolute_figure(matrix)
    grid = np.array([[_change(matrix, m, d)["bits_per_byte"] for d in datasets] for m in adapters])
    lim = float(np.nanmax(np.abs(grid))) or 1e-6
    fig, ax = plt.subplots(figsize=(3.0 + 1.9 * len(datasets), 1.6 + 0.62 * len(adapters)))
    im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    base = matrix["cells"]["base"]
    ax.set_xticks(range(len(datasets)), [f"{d}\nbase {base[d]['bits_per_byte']:.3f} b/B" for d in datasets],
                  fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(adapters)), adapters, fontsize=8)
    for i, m in enumerate(adapters):
        for j, d in enumerate(datasets):
            c = _change(matrix, m, d)
            ci = c.get("bits_per_byte_ci")
            rel = 100 * (matrix["cells"][m][d]["perplexity"] / base[d]["perplexity"] - 1)
            text = f"{c['bits_per_byte']:+.3f}" + (f"\n[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "") + \
                f"\nppl {rel:+.0f}%"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if abs(grid[i, j]) > 0.6 * lim else "black")
    ax.set_title(f"change in bits per byte vs the base, {matrix['split']} splits ({scope_note(matrix)}); "
                 "95% paired bootstrap intervals", fontsize=9, pad=28)
    fig.colorbar(im, ax=ax, label="change in bits per byte (adapter - base)")
    fig.tight_layout()
    return fig


def _absolute_figure(matrix: dict):
    import matplotlib.pyplot as plt

    models, datasets = matrix["models"], matrix["datasets"]
    grid = np.array([[matrix["cells"][m][d]["bits_per_byte"] for d in datasets] for m in models])
    fig, ax = plt.subplots(figsize=(2.5 + 1.6 * len(datasets), 1.5 + 0.5 * len(models)))
    im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(datasets)), datasets, rotation=20)
    ax.set_yticks(range(len(models)), models)
    for i in range(len(models)):
        for j in range(len(datasets)):
            ax.text(j, i, f"{matrix['cells'][models[i]][datasets[j]]['perplexity']:.1f}", ha="center", va="center",
                    color="white", fontsize=8)
    ax.set_title(f"bits per byte on each {matrix['split']} split ({scope_note(matrix)}; numbers: perplexity)",
                 fontsize=9)
    fig.colorbar(im, ax=ax, label="bits per byte")
    fig.tight_layout()
    return fig


def plot_matrix(matrix: dict, out: Path) -> Path:
    """Save the cross-evaluation heatmap as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    return save_figure(matrix_figure(matrix), out, dpi=110, bbox_inches="tight")


def matrix_markdown(matrix: dict) -> str:
    """The cross-evaluation matrix as markdown: perplexity [95% CI] (bits per byte) per model and
    dataset, then each adapter's change in bits per byte against the base [95% paired CI]."""
    def ci(v, fmt):
        return f" [{v[0]:{fmt}}, {v[1]:{fmt}}]" if v else ""

    head = "| model | " + " | ".join(matrix["datasets"]) + " |"
    rule = "|" + "---|" * (len(matrix["datasets"]) + 1)
    windows = f"{matrix.get('max_length', 256)}/{matrix.get('stride', 192)}"  # old matrices: 256/192
    lines = [f"Scored: {scope_note(matrix)}; windows {windows} tokens; 95% intervals by bootstrap over documents.",
             "", head, rule]
    for m in matrix["models"]:
        lines.append(f"| {m} | " + " | ".join(f"{c['perplexity']:.2f}{ci(c.get('perplexity_ci'), '.2f')} "
                                              f"({c['bits_per_byte']:.3f} b/B)"
                                              for c in (matrix["cells"][m][d] for d in matrix["datasets"])) + " |")
    adapters = [m for m in matrix["models"] if m != "base"]
    if adapters and "base" in matrix["models"]:
        lines += ["", "Change in bits per byte against the base (negative: better) [95% paired bootstrap CI]:", "",
                  head, rule]
        for m in adapters:
            lines.append(f"| {m} | " + " | ".join(
                f"{c['bits_per_byte']:+.4f}{ci(c.get('bits_per_byte_ci'), '+.4f')}"
                for c in (_change(matrix, m, d) for d in matrix["datasets"])) + " |")
    from lora_project.utils.seeding import mean_sd_across_seeds

    groups = {d: mean_sd_across_seeds({m: matrix["cells"][m][d]["perplexity"] for m in matrix["models"]})
              for d in matrix["datasets"]}
    stems = sorted({stem for g in groups.values() for stem in g})
    if stems:
        lines += ["", "Across seeds (adapters named <stem>_s<seed>): perplexity mean ± sd (n seeds):", "",
                  head, rule]
        for stem in stems:
            lines.append(f"| {stem} | " + " | ".join(
                f"{groups[d][stem]['mean']:.2f} ± {groups[d][stem]['sd']:.2f} ({groups[d][stem]['n']})"
                if stem in groups[d] else "-" for d in matrix["datasets"]) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- BLiMP scoring speed
