"""The BabyLM report's console table and plot (the numbers come from babylm_report.py)."""

from __future__ import annotations


def _rows(task: str, rec: dict) -> list[tuple[str, float, list | None]]:
    """(label, value, interval) per headline figure of one task record."""
    h, ci = rec["headline"], rec.get("headline_ci")
    if isinstance(h, dict):
        return [(f"{task} {k}", v, (ci or {}).get(k)) for k, v in h.items()]
    return [(task, h, ci)]


def _r(value) -> str:
    return "n/a (< 3 items)" if value is None else f"{value:+.3f}"


def _p(value: float, resamples: int | None) -> str:
    """A bootstrap p: none of `resamples` draws on the other side of 0 is "< 1/resamples", not 0."""
    return f"< {1 / resamples:.2g}" if resamples and value < 1 / resamples else f"= {value:.3g}"


def format_table(result: dict) -> str:
    """One row per task figure: each model's official headline with its 95% interval, then (accuracy
    tasks) ties and the headline with ties counted as wrong; then each adapter's change."""
    models = list(result["models"])
    base = result["models"]["base"]["tasks"]
    width = max([26] + [len(n) + 2 for n in models])
    lines = [f"BabyLM 2025 zero-shot, official definitions (causal, temperature 1), decisions in fp32; "
             f"{', '.join(f'{t} {n}' for t, n in result['items'].items())} items"
             + (f" (at most {result['limit_per_uid']} per UID, seed {result['seed']})" if result.get("limit_per_uid")
                else ""),
             f"{'task (official units)':<32}" + "".join(f"{n:>{width}}" for n in models)]
    for task, rec in base.items():
        for k, (label, _, _) in enumerate(_rows(task, rec)):
            cells = []
            for n in models:
                _, v, ci = _rows(task, result["models"][n]["tasks"][task])[k]
                cells.append(f"{v:.2f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else ""))
            unit = "" if isinstance(rec["headline"], dict) else " %"
            lines.append(f"{label + unit:<32}" + "".join(f"{c:>{width}}" for c in cells))
        if "ties" in rec:
            cells = [f"{result['models'][n]['tasks'][task]['headline_ties_wrong']:.2f} "
                     f"({result['models'][n]['tasks'][task]['ties']} ties)" for n in models]
            lines.append(f"{'  ties counted wrong':<32}" + "".join(f"{c:>{width}}" for c in cells))
        if "preference_ratio_pearson" in rec:
            cells = [_r(result['models'][n]['tasks'][task]['preference_ratio_pearson']) for n in models]
            lines.append(f"{'  r(preference, human ratio)':<32}" + "".join(f"{c:>{width}}" for c in cells))
    draws = (result.get("bootstrap") or {}).get("resamples")
    for name, tasks in result.get("difference", {}).items():
        lines.append(f"-- {name} vs base (paired; 95% bootstrap interval)")
        for task, d in tasks.items():
            for label, v, ci in _rows(task, d):
                extra = ""
                if "mcnemar_p" in d:
                    extra = (f"; bootstrap p {_p(d['headline_p'], draws)}; pooled items: right only with the adapter "
                             f"{d['adapter_only']}, only with the base {d['base_only']} ({d['micro_change']:+.2f} "
                             f"points), exact McNemar p = {d['mcnemar_p']:.3g}")
                    if d["directions_differ"]:
                        extra += (" (the pooled items and the headline, each UID weighed equally, point opposite "
                                  "ways: the UIDs differ in size; the bootstrap p is the headline's)")
                elif isinstance(d.get("p_value"), dict) and d["p_value"].get(label.split(" ", 1)[1]) is not None:
                    extra = f"; bootstrap p {_p(d['p_value'][label.split(' ', 1)[1]], draws)}"
                span = f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else " (no interval: too few items)"
                lines.append(f"   {label:<29} {v:+.2f}{span}{extra}")
    lines.append(f"scored in {result['seconds']:.0f} s ({result['scoring']['fp32_kernel']} fp32 kernel)")
    lines.append("the official pipeline's known flaws (its figures are reported as they are):")
    lines += [f"  - {flaw}" for flaw in result.get("known_flaws", ())]
    for task, why in (result.get("skip_reasons") or {}).items():
        lines.append(f"skipped {task}: {why}")
    if result.get("skipped") and not result.get("skip_reasons"):
        lines.append(f"skipped: {', '.join(result['skipped'])}")
    if result.get("saved"):
        lines.append(f"saved {result['saved']}")
    return "\n".join(lines)


def change_figure(result: dict):
    """Each adapter's change against the base per task figure (official units, 95% paired bootstrap
    interval); without adapters, the base's headlines with their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    diffs = result.get("difference") or {}
    source = diffs if diffs else {"base": result["models"]["base"]["tasks"]}
    labels = [label for task, rec in result["models"]["base"]["tasks"].items() for label, _, _ in _rows(task, rec)]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(labels) * max(1, len(source)) ** 0.5 + 1.6))
    offsets = np.linspace(-0.25, 0.25, len(source)) if len(source) > 1 else [0.0]
    for k, ((name, tasks), off) in enumerate(zip(source.items(), offsets)):
        rows = [r for task, rec in tasks.items() for r in _rows(task, rec)]
        y = np.array([labels.index(label) for label, _, _ in rows]) + off
        v = np.array([r[1] for r in rows])
        lo = np.array([r[2][0] if r[2] else r[1] for r in rows])
        hi = np.array([r[2][1] if r[2] else r[1] for r in rows])
        lo, hi = np.minimum(lo, v), np.maximum(hi, v)  # an interval that misses its point: no negative bar
        ax.errorbar(v, y, xerr=np.vstack([v - lo, hi - v]), fmt="o", color=f"C{k}", capsize=2, label=name)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    if diffs:
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlabel("change vs base (percentage points; reading: score points), 95% paired bootstrap CI")
    else:
        ax.set_xlabel("base headline (percent; reading: 100 dR2/(1-R2)), 95% bootstrap CI")
    ax.set_title(f"BabyLM 2025 zero-shot: {result['base_model']}", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig
