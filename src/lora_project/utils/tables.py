"""Plain-text tables for the terminal."""

from __future__ import annotations

import math


def fmt_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """Plain-text table: cols are (key, header, format)."""
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        line = []
        for key, _, f in cols:
            v = r.get(key)
            line.append("-" if v is None or (isinstance(v, float) and math.isnan(v))
                        else format(v, f) if f and not isinstance(v, str) else str(v))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)
