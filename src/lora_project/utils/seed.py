"""Seeding: Python, NumPy and torch from one integer."""

from __future__ import annotations

import random


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch (set before the adapter is initialised)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
