"""Uncertainty of minimal-pair results: Wilson intervals per group, the macro average's standard
error, and the paired comparison of an adapter with the base (same pairs, each right or wrong).

Decisions travel as a string of '1' (correct) and '0' per pair, in the order of the pairs, so a
saved result can be compared pair by pair later.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from lora_project.utils.stats import (
    macro_average,
    paired_macro_difference,
    paired_proportions,
    wilson_interval,
)


def group_accuracy(flags: list[bool]) -> dict:
    """Accuracy, pair count and Wilson 95% interval of one group's decisions."""
    k, n = sum(flags), len(flags)
    return {"accuracy": k / n, "pairs": n, "accuracy_ci": list(wilson_interval(k, n))}


def macro_record(groups: dict[str, dict]) -> dict:
    """macro_accuracy_se and macro_accuracy_ci of per-paradigm results (`group_accuracy` records)."""
    m = macro_average([g["accuracy"] for g in groups.values()], [g["pairs"] for g in groups.values()])
    return {"macro_accuracy_se": m["se"], "macro_accuracy_ci": [m["ci_low"], m["ci_high"]]}


def decisions_string(correct: list[bool]) -> str:
    return "".join("1" if c else "0" for c in correct)


def _flags(decisions: str) -> np.ndarray:
    return np.frombuffer(decisions.encode("ascii"), dtype=np.uint8) == ord("1")


def _renamed(r: dict) -> dict:
    """A paired_proportions record with its counts named for base vs adapter."""
    out = {k: v for k, v in r.items() if k not in ("first_only", "second_only", "ci_low", "ci_high")}
    return {**out, "ci": [r["ci_low"], r["ci_high"]], "base_only": r["first_only"], "adapter_only": r["second_only"]}


def paired_change(pairs: list, base_decisions: str, adapter_decisions: str) -> dict:
    """Adapter minus base over the same pairs: the macro average's change with its paired standard
    error, and per field, per paradigm and over all pairs the accuracy change with an exact McNemar
    p-value (base_only / adapter_only: pairs only that model gets right)."""
    b, a = _flags(base_decisions), _flags(adapter_decisions)
    by_uid, by_field = defaultdict(list), defaultdict(list)
    for i, p in enumerate(pairs):
        by_uid[p.uid].append(i)
        if p.field:
            by_field[p.field].append(i)
    macro = paired_macro_difference([(b[ix], a[ix]) for ix in by_uid.values()])
    return {"macro_accuracy": {"difference": macro["difference"], "se": macro["se"],
                               "ci": [macro["ci_low"], macro["ci_high"]]},
            "all_pairs": _renamed(paired_proportions(b, a)),
            "fields": {f: _renamed(paired_proportions(b[ix], a[ix])) for f, ix in sorted(by_field.items())},
            "paradigms": {u: _renamed(paired_proportions(b[ix], a[ix])) for u, ix in sorted(by_uid.items())}}


def change_summary(result: dict) -> list[str]:
    """Console lines: each adapter's change against the base, macro and per field, with intervals and p."""
    lines = []
    for name, d in result.get("difference", {}).items():
        t = d.get("paired")
        if not t:
            continue
        m, allp = t["macro_accuracy"], t["all_pairs"]
        lines.append(f"-- {name} vs base: macro {m['difference']:+.3f} (95% CI {m['ci'][0]:+.3f} to {m['ci'][1]:+.3f}); "
                     f"all pairs {allp['difference']:+.3f}, right only with the adapter {allp['adapter_only']}, "
                     f"only with the base {allp['base_only']}, exact McNemar p = {allp['p_value']:.3g}")
        for f, r in t["fields"].items():
            lines.append(f"   {f:<24} {r['difference']:+.3f} (95% CI {r['ci'][0]:+.3f} to {r['ci'][1]:+.3f}), "
                         f"p = {r['p_value']:.3g}")
    return lines


def pairs_change(result: dict):
    """One row per adapter and field (and 'macro average'): change in accuracy against the base,
    95% interval, exact McNemar p-value (fields) and the pairs behind it. Older results without
    paired statistics give the change alone."""
    import pandas as pd

    rows = []
    for name, d in result.get("difference", {}).items():
        t = d.get("paired")
        if t:
            m = t["macro_accuracy"]
            rows.append({"adapter": name, "group": "macro average", "change": m["difference"], "ci_low": m["ci"][0],
                         "ci_high": m["ci"][1], "p_value": None, "pairs": result.get("pairs")})
            rows += [{"adapter": name, "group": f, "change": r["difference"], "ci_low": r["ci"][0],
                      "ci_high": r["ci"][1], "p_value": r["p_value"], "pairs": r["items"]}
                     for f, r in t["fields"].items()]
        else:
            base, mine = result["models"]["base"], result["models"][name]
            rows.append({"adapter": name, "group": "macro average", "change": d["macro_accuracy"]})
            rows += [{"adapter": name, "group": f, "change": mine["fields"][f]["accuracy"] - v["accuracy"],
                      "pairs": v["pairs"]} for f, v in base.get("fields", {}).items()]
    return pd.DataFrame(rows, columns=["adapter", "group", "change", "ci_low", "ci_high", "p_value", "pairs"])


def pairs_change_figure(result: dict):
    """Change in minimal-pair accuracy against the base per field (and the macro average), one marker
    per adapter with its 95% interval; filled markers: exact McNemar p < 0.05 (the macro average:
    its interval excludes 0). Without adapters:
    the base's accuracy per field with Wilson intervals."""
    import matplotlib.pyplot as plt
    import numpy as np

    table = pairs_change(result)
    if table.empty:
        return _plot_base_fields(result)
    groups = list(dict.fromkeys(table["group"]))
    adapters = list(dict.fromkeys(table["adapter"]))
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(groups) * max(1, len(adapters)) ** 0.5 + 1.6))
    offsets = np.linspace(-0.3, 0.3, len(adapters)) if len(adapters) > 1 else [0.0]
    for k, (name, off) in enumerate(zip(adapters, offsets)):
        rows = table[table["adapter"] == name].set_index("group").reindex(groups)
        y = np.arange(len(groups)) + off
        err = None
        if rows["ci_low"].notna().any():
            err = np.vstack([rows["change"] - rows["ci_low"], rows["ci_high"] - rows["change"]])
        colour = f"C{k}"
        ax.errorbar(rows["change"], y, xerr=err, fmt="none", ecolor=colour, elinewidth=1.2, capsize=2)
        # McNemar p where there is one; for the macro average, an interval that excludes 0
        excludes = ((rows["ci_low"] > 0) | (rows["ci_high"] < 0)).to_numpy()
        p = rows["p_value"].astype(float)
        significant = np.where(p.isna(), excludes, p.fillna(1.0) < 0.05)
        ax.scatter(rows["change"][~significant], y[~significant], facecolors="white", edgecolors=colour, zorder=3)
        ax.scatter(rows["change"][significant], y[significant], color=colour, zorder=3, label=name)
        if not significant.any():
            ax.scatter([], [], color=colour, label=name)
    ax.axvline(0, color="grey", lw=0.8)
    counts = table.drop_duplicates("group").set_index("group").reindex(groups)["pairs"].fillna(0)
    ax.set_yticks(range(len(groups)), [f"{g} ({int(n)} pairs)" if n else g for g, n in zip(groups, counts)],
                  fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("change in accuracy vs base (95% CI; filled: exact McNemar p < 0.05, macro: CI excludes 0)")
    ax.set_title(f"minimal pairs: {result.get('pairs', '?')} pairs per model", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def _plot_base_fields(result: dict):
    import matplotlib.pyplot as plt

    base = result["models"]["base"]
    groups = base.get("fields") or base.get("suites") or {}
    names = list(groups)
    acc = [groups[n].get("accuracy", groups[n].get("macro_accuracy")) for n in names]
    ci = [groups[n].get("accuracy_ci") or groups[n].get("macro_accuracy_ci") for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.5))
    err = [[a - c[0] for a, c in zip(acc, ci)], [c[1] - a for a, c in zip(acc, ci)]] if all(ci) else None
    ax.errorbar(acc, range(len(names)), xerr=err, fmt="o", capsize=2)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("base accuracy (95% Wilson CI; chance = 0.5)")
    fig.tight_layout()
    return fig
