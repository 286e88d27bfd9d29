"""Adapters x datasets: perplexity and bits per byte of the base and every adapter on every prepared split."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lora_project.errors import UserError
from lora_project.paths import ProjectPaths


def cross_matrix(paths: ProjectPaths, cfg, *, max_tokens: int = 2000, split: str = "test", log=print) -> dict:
    """Perplexity and bits/byte of the base and every sound adapter on every prepared dataset's split.

    The base is loaded once; adapters trained on another base are left out (and said so).
    """
    import json as _json

    from lora_project.data.preprocessor import read_split
    from lora_project.models.adapter import list_adapters, read_metadata
    from lora_project.models.base_model import load_base
    from lora_project.models.lora_model import each_model
    from lora_project.models.scoring import limit_documents, score_documents

    datasets = sorted(p.name for p in paths.processed_dir.glob("*") if (p / "stats.json").is_file()) \
        if paths.processed_dir.is_dir() else []
    if not datasets:
        raise UserError("no prepared datasets; run: lora-project prepare --all")
    base = load_base(cfg)
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
    texts = {}
    for d in datasets:
        docs = read_split(paths.processed(d), split)
        if docs:
            sep = _json.loads((paths.processed(d) / "stats.json").read_text()).get("separator", "\n")
            texts[d] = (limit_documents(base.tokenizer, docs, max_tokens), sep)
    cells: dict[str, dict[str, dict]] = {}

    def score_all(name, model):
        cells[name] = {}
        for d, (docs, sep) in texts.items():
            s = score_documents(model, base.tokenizer, docs, sep, base.runtime, max_length=256, stride=192)
            cells[name][d] = {"perplexity": s.perplexity, "bits_per_byte": s.bits_per_byte, "tokens": s.tokens}
        log(f"  {name}: " + ", ".join(f"{d} {c['perplexity']:.2f}" for d, c in cells[name].items()))

    for label, model in each_model(base, adapters):
        score_all(label, model)
    return {"split": split, "max_tokens": max_tokens, "datasets": list(texts), "models": list(cells), "cells": cells}


def matrix_figure(matrix: dict):
    """Heatmap of bits per byte (models x datasets), perplexity written in each cell."""
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
    ax.set_title(f"bits per byte on each {matrix['split']} split (numbers: perplexity)")
    fig.colorbar(im, ax=ax, label="bits per byte")
    fig.tight_layout()
    return fig


def plot_matrix(matrix: dict, out: Path) -> Path:
    """Save the cross-evaluation heatmap as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = matrix_figure(matrix)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def matrix_markdown(matrix: dict) -> str:
    """The cross-evaluation matrix as a markdown table (perplexity and bits per byte)."""
    head = "| model | " + " | ".join(matrix["datasets"]) + " |"
    lines = [head, "|" + "---|" * (len(matrix["datasets"]) + 1)]
    for m in matrix["models"]:
        lines.append(f"| {m} | " + " | ".join(f"{matrix['cells'][m][d]['perplexity']:.2f} "
                                              f"({matrix['cells'][m][d]['bits_per_byte']:.3f} b/B)"
                                              for d in matrix["datasets"]) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- BLiMP scoring speed
