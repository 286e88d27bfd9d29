"""Uncertainty for evaluation numbers: Wilson intervals, macro-average standard errors, document
bootstraps and exact McNemar tests. Pure numpy and the standard library; no project imports.

Conventions: ``level`` is the two-sided coverage (0.95 for 95% intervals); every bootstrap takes a
``seed`` so a rerun gives the same interval; intervals are ``(low, high)`` tuples of floats.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
_CELLS_PER_CHUNK = 2_000_000  # resample indices held at once (16 MB of int64)


def z_value(level: float = 0.95) -> float:
    """The standard-normal quantile for a two-sided interval of coverage `level` (1.96 for 0.95)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (well-behaved at 0/n and n/n, unlike Wald).

    center = (p + z^2/2n) / (1 + z^2/n), half = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).
    """
    if n <= 0:
        return (float("nan"), float("nan"))
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be between 0 and n ({n}), got {successes}")
    z = z_value(level)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def macro_average(accuracies, counts, level: float = 0.95) -> dict:
    """Mean of per-group accuracies with its binomial standard error, the groups taken as fixed:
    se = sqrt(sum_k p_k (1 - p_k) / n_k) / K (plug-in p_k, so a group at 0 or 1 adds nothing)."""
    p = np.asarray(accuracies, dtype=float)
    n = np.asarray(counts, dtype=float)
    if len(p) == 0:
        return {"mean": float("nan"), "se": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    mean = float(p.mean())
    se = float(math.sqrt(float(np.sum(p * (1 - p) / n))) / len(p))
    z = z_value(level)
    return {"mean": mean, "se": se, "ci_low": mean - z * se, "ci_high": mean + z * se}


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar (sign) test p-value from the discordant counts: under H0 each
    discordant item is equally likely to favour either side, so min(b, c) ~ Binomial(b + c, 1/2)."""
    n = only_first + only_second
    if n == 0:
        return 1.0
    k = min(only_first, only_second)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_proportions(first, second, level: float = 0.95) -> dict:
    """Difference in accuracy (second - first) over the same items, each correct or not.

    Standard error of the mean paired difference: sqrt((b + c)/n^2 - (c - b)^2/n^3), with b the
    items only `first` gets right and c those only `second` gets right; p from `mcnemar_exact`.
    """
    a = np.asarray(first, dtype=bool)
    b_ = np.asarray(second, dtype=bool)
    if a.shape != b_.shape:
        raise ValueError("paired comparison needs the same items on both sides")
    n = len(a)
    only_first, only_second = int(np.sum(a & ~b_)), int(np.sum(~a & b_))
    if n == 0:
        return {"difference": float("nan"), "se": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"),
                "first_only": 0, "second_only": 0, "p_value": 1.0, "items": 0}
    diff = (only_second - only_first) / n
    se = math.sqrt(max(0.0, (only_first + only_second) / n ** 2 - (only_second - only_first) ** 2 / n ** 3))
    z = z_value(level)
    return {"difference": diff, "se": se, "ci_low": diff - z * se, "ci_high": diff + z * se,
            "first_only": only_first, "second_only": only_second,
            "p_value": mcnemar_exact(only_first, only_second), "items": n}


def paired_macro_difference(groups: list[tuple], level: float = 0.95) -> dict:
    """Difference of macro averages (second - first) over groups of paired items, with the standard
    error of the paired per-item differences: se = sqrt(sum_k var_k(d) / n_k) / K."""
    if not groups:
        return {"difference": float("nan"), "se": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    diffs, var = [], 0.0
    for first, second in groups:
        d = np.asarray(second, dtype=float) - np.asarray(first, dtype=float)
        diffs.append(float(d.mean()))
        var += float(d.var()) / len(d)  # population variance of d: the plug-in, like macro_average
    diff, se = float(np.mean(diffs)), math.sqrt(var) / len(groups)
    z = z_value(level)
    return {"difference": diff, "se": se, "ci_low": diff - z * se, "ci_high": diff + z * se}


def resampled_sums(columns: np.ndarray, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> np.ndarray:
    """Column sums over `resamples` bootstrap resamples of the rows (documents), drawn with replacement.

    `columns` is (documents x k); every column uses the same resampled rows, so statistics built
    from several columns (numerator and denominator, base and adapter) stay paired. Returns
    (resamples x k). The rows drawn depend only on (documents, resamples, seed).
    """
    x = np.asarray(columns, dtype=float)
    if x.ndim == 1:
        x = x[:, None]
    n = x.shape[0]
    if n == 0:
        raise ValueError("bootstrap needs at least one document")
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, x.shape[1]))
    step = max(1, _CELLS_PER_CHUNK // n)
    for s in range(0, resamples, step):
        idx = rng.integers(0, n, size=(min(step, resamples - s), n))
        out[s:s + len(idx)] = x[idx].sum(axis=1)
    return out


def bootstrap_p(samples) -> float:
    """Two-sided bootstrap p-value of a difference: 2 * min(share of resamples <= 0, share >= 0), at most 1."""
    d = np.asarray(samples)
    return min(1.0, 2 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))


def percentile_interval(samples, level: float = 0.95) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap samples (linear interpolation)."""
    lo, hi = np.quantile(np.asarray(samples, dtype=float), [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))


def document_intervals(nll, tokens, n_bytes, *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                       level: float = 0.95) -> dict:
    """Bootstrap intervals of perplexity = exp(sum nll / sum tokens) and bits per byte =
    sum nll / (ln 2 * sum bytes), resampling documents (per-document sums in nats, tokens, bytes)."""
    if len(nll) < 2:
        return {"perplexity_ci": None, "bits_per_byte_ci": None}
    s = resampled_sums(np.column_stack([nll, tokens, n_bytes]), resamples, seed)
    return {"perplexity_ci": percentile_interval(np.exp(s[:, 0] / s[:, 1]), level),
            "bits_per_byte_ci": percentile_interval(s[:, 0] / (math.log(2) * s[:, 2]), level)}


def paired_document_difference(nll_first, nll_second, tokens, n_bytes, *, resamples: int = DEFAULT_RESAMPLES,
                               seed: int = DEFAULT_SEED, level: float = 0.95) -> dict:
    """Paired bootstrap over documents of second - first in perplexity and bits per byte (the same
    documents, scored by two models): point differences, percentile intervals and a two-sided
    bootstrap p-value, 2 * min(share of resamples <= 0, share >= 0) for the bits-per-byte difference."""
    a, b = np.asarray(nll_first, float), np.asarray(nll_second, float)
    t, nb = np.asarray(tokens, float), np.asarray(n_bytes, float)
    point = {"perplexity": math.exp(b.sum() / t.sum()) - math.exp(a.sum() / t.sum()),
             "bits_per_byte": (b.sum() - a.sum()) / (math.log(2) * nb.sum())}
    if len(a) < 2:
        return {**point, "perplexity_ci": None, "bits_per_byte_ci": None, "p_value": None}
    s = resampled_sums(np.column_stack([a, b, t, nb]), resamples, seed)
    d_ppl = np.exp(s[:, 1] / s[:, 2]) - np.exp(s[:, 0] / s[:, 2])
    d_bpb = (s[:, 1] - s[:, 0]) / (math.log(2) * s[:, 3])
    p = bootstrap_p(d_bpb)
    return {**point, "perplexity_ci": percentile_interval(d_ppl, level),
            "bits_per_byte_ci": percentile_interval(d_bpb, level), "p_value": p}
