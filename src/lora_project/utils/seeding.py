"""Seeds: seeding Python, NumPy and torch from one integer, and grouping results by seed.

`set_seed` is called before an adapter is initialised (and before each run's data order is drawn).

`train --seeds` names its adapters ``<name>_s<seed>`` (folders ``<name>_s<seed>_lora``; the
multi-seed runs themselves are in training/seeds.py). Reports that list one number per adapter
can add one row per group of seeds with `mean_sd_across_seeds`; it only reads labels and numbers,
so any report (evaluate, the matrix, BLiMP) can use it without changing its own format.
"""

from __future__ import annotations

import math
import random
import re


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch (set before the adapter is initialised)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


_SEEDED = re.compile(r"^(?P<stem>.+)_s(?P<seed>\d+)(?P<tail>_lora)?$")


def seed_group(label: str) -> tuple[str, int] | None:
    """('kids', 42) for 'kids_s42' or 'kids_s42_lora'; None for a label without a seed suffix."""
    m = _SEEDED.match(label)
    return (m.group("stem") + (m.group("tail") or ""), int(m.group("seed"))) if m else None


def mean_sd_across_seeds(values: dict[str, float | None]) -> dict[str, dict]:
    """{group: {mean, sd, n, seeds, members}} for each group of two or more seeded labels with a
    number; sd is the sample standard deviation (n - 1), the run-to-run spread of one seed."""
    groups: dict[str, list[tuple[int, str, float]]] = {}
    for label, v in values.items():
        g = seed_group(label)
        if g is not None and v is not None and math.isfinite(v):
            groups.setdefault(g[0], []).append((g[1], label, float(v)))
    out = {}
    for stem, rows in sorted(groups.items()):
        if len(rows) < 2:
            continue
        rows.sort()
        xs = [v for _, _, v in rows]
        mean = sum(xs) / len(xs)
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
        out[stem] = {"mean": mean, "sd": sd, "n": len(xs), "seeds": [s for s, _, _ in rows],
                     "members": [label for _, label, _ in rows]}
    return out
