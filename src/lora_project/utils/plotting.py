"""Saving matplotlib figures: the one place a figure is written to a PNG and closed."""

from __future__ import annotations

from pathlib import Path


def save_figure(fig, out: Path, *, dpi: int = 110, bbox_inches: str | None = None) -> Path:
    """Write `fig` to `out` (its folder created when missing) at `dpi`, close it, and return `out`.

    `bbox_inches="tight"` crops the page to what is drawn (for figures without `tight_layout`).
    Closing frees the figure: pyplot keeps every open one alive, and a long session would grow."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, bbox_inches=bbox_inches)
    plt.close(fig)
    return out
