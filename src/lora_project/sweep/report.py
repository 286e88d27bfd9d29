"""The end of a sweep: the table of trials, the best config as YAML, plots, and the parent run's records.

Everything goes to ``outputs/sweeps/<name>/``: ``summary.json``, ``table.md``,
``best_config.yaml`` (a full config that ``lora-project train DATASET --config`` accepts),
``metric_vs_params.png``, ``param_importances.png`` (Optuna's default importance evaluator,
PED-ANOVA, which needs no scikit-learn; it needs at least two completed trials and is left
out with a note otherwise) and ``optimization_history.png``; each file is also an artifact of
the sweep's parent MLflow run.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from lora_project.sweep.study import METRICS, Sweep, interrupted_numbers, trial_state
from lora_project.utils.io_utils import atomic_write_json, atomic_write_text
from lora_project.utils.plotting import save_figure
from lora_project.utils.tables import fmt_table

ORDER = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2, "INTERRUPTED": 3, "RUNNING": 4, "WAITING": 5}


def _display(value):
    return f"{value:.3g}" if isinstance(value, float) else value


def trial_rows(sw: Sweep, study) -> list[dict]:
    """One row per started trial, sorted: completed by the metric, then pruned, failed, interrupted."""
    interrupted = interrupted_numbers(study)
    rows = []
    for t in study.trials:
        state = trial_state(t, interrupted)
        if state == "WAITING":
            continue
        adapter = t.user_attrs.get("adapter")
        kept = adapter and (sw.paths.adapter(adapter) / "adapter_model.safetensors").is_file()
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        rows.append({"trial": t.number, "state": state, **{s.key: t.params.get(s.key) for s in sw.specs},
                     "value": t.value if state == "COMPLETE" else None, "last_val_loss": last,
                     "steps": t.user_attrs.get("steps"), "train_seconds": t.user_attrs.get("train_seconds"),
                     "adapter": adapter if kept else None, "experiment_dir": t.user_attrs.get("experiment_dir"),
                     "mlflow_run_id": t.user_attrs.get("mlflow_run_id"), "error": t.user_attrs.get("error"),
                     "rerun_of": t.user_attrs.get("rerun_of")})
    rows.sort(key=lambda r: (ORDER.get(r["state"], 9), r["value"] if r["value"] is not None else
                             (r["last_val_loss"] if r["last_val_loss"] is not None else float("inf")), r["trial"]))
    return rows


def table_text(sw: Sweep, rows: list[dict]) -> str:
    """The trial table as plain text (utils.tables.fmt_table)."""
    shown = [{**r, **{s.key: _display(r[s.key]) for s in sw.specs},
              "error": (r["error"] or "")[:60]} for r in rows]
    cols = ([("trial", "trial", ""), ("state", "state", "")] + [(s.key, s.key, "") for s in sw.specs]
            + [("value", sw.metric, ".4f"), ("last_val_loss", "last val loss", ".4f"), ("steps", "steps", ""),
               ("train_seconds", "train s", ".0f"), ("adapter", "adapter", ""), ("error", "note", "")])
    return fmt_table(shown, cols)


def best_config_yaml(sw: Sweep, best) -> str:
    """The best trial's full config, with a header saying where it came from and how to use it."""
    swept = ", ".join(f"{k}={_display(v)}" for k, v in best.params.items())
    header = (f"# Best trial of sweep '{sw.name}' on dataset '{sw.dataset}': trial {best.number}, "
              f"{sw.metric} {best.value:.6g}\n# swept: {swept}\n"
              f"# Train it again:  lora-project train {sw.dataset} --config <this file> --adapter-name NAME\n")
    return header + yaml.safe_dump(best.user_attrs["config"], sort_keys=False)


def _numeric(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_metric_vs_params(sw: Sweep, complete: list, out: Path) -> Path | None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if not complete:
        return None
    n = len(sw.specs)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    ys = [t.value for t in complete]
    for ax, s in zip(axes[0], sw.specs):
        xs = [t.params[s.key] for t in complete]
        if s.kind != "choice" or (_numeric(s.choices) and not s.is_list):
            ax.scatter(xs, ys)
            if s.log or (s.kind == "choice" and min(s.choices) > 0 and max(s.choices) / min(s.choices) >= 8):
                ax.set_xscale("log")
                ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 1, 2, 5 per decade
                ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
                ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on a short axis
            if s.kind == "choice":
                ax.set_xticks(s.choices, [f"{c:g}" for c in s.choices])
                ax.minorticks_off()
        else:  # categories at evenly spaced positions, labelled
            labels = [str(c) for c in s.choices]
            ax.scatter([labels.index(str(x)) for x in xs], ys)
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        ax.set_xlabel(s.key)
        ax.set_ylabel(sw.metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"sweep {sw.name}: {sw.metric} of completed trials")
    fig.tight_layout()
    return save_figure(fig, out, dpi=100)


def importances(study) -> tuple[dict | None, str | None]:
    """Optuna's parameter importances, or (None, why not)."""
    from optuna.trial import TrialState

    n = sum(t.state == TrialState.COMPLETE for t in study.trials)
    if n < 2:
        return None, f"parameter importances need at least 2 completed trials (this sweep has {n})"
    try:
        import optuna

        return dict(optuna.importance.get_param_importances(study)), None
    except Exception as exc:  # e.g. every completed trial has the same parameters
        return None, f"parameter importances could not be computed ({type(exc).__name__}: {str(exc)[:200]})"


def plot_importances(sw: Sweep, imp: dict, out: Path) -> Path:
    import matplotlib.pyplot as plt

    names = sorted(imp, key=imp.get)
    fig, ax = plt.subplots(figsize=(6, 0.6 * len(names) + 1.6))
    ax.barh(names, [imp[k] for k in names])
    ax.set_xlabel("importance (Optuna PED-ANOVA; sums to 1)")
    ax.set_title(f"sweep {sw.name}: parameter importances")
    fig.tight_layout()
    return save_figure(fig, out, dpi=100)


def plot_history(sw: Sweep, complete: list, out: Path) -> Path | None:
    import matplotlib.pyplot as plt

    if not complete:
        return None
    complete = sorted(complete, key=lambda t: t.number)
    best, running = [], float("inf")
    for t in complete:
        running = min(running, t.value)
        best.append(running)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot([t.number for t in complete], [t.value for t in complete], "o", label="trial")
    ax.step([t.number for t in complete], best, where="post", label="best so far")
    ax.set_xlabel("trial number")
    ax.set_ylabel(sw.metric)
    ax.set_title(f"sweep {sw.name}: optimisation history")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, out, dpi=100)


def finish_sweep(sw: Sweep, study, parent=None) -> dict:
    """Write the table, best config, plots and summary; log them to the parent run."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.trial import TrialState

    rows = trial_rows(sw, study)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value) if complete else None
    files: dict[str, str] = {}
    notes: list[str] = []
    if best is not None:
        path = sw.folder / "best_config.yaml"
        atomic_write_text(path, best_config_yaml(sw, best))
        files["best_config"] = str(path)
    for key, png in (("metric_vs_params", plot_metric_vs_params(sw, complete, sw.folder / "metric_vs_params.png")),
                     ("optimization_history", plot_history(sw, complete, sw.folder / "optimization_history.png"))):
        if png:
            files[key] = str(png)
    imp, why = importances(study)
    if imp is not None:
        files["param_importances"] = str(plot_importances(sw, imp, sw.folder / "param_importances.png"))
    else:
        notes.append(why)
    table = table_text(sw, rows)
    md = f"# sweep {sw.name}\n\n```text\n{table}\n```\n"
    if best is not None:
        md += f"\nbest: trial {best.number}, {sw.metric} {best.value:.6g}; config in best_config.yaml\n"
    md += "".join(f"\nnote: {n}\n" for n in notes)
    atomic_write_text(sw.folder / "table.md", md)
    files["table"] = str(sw.folder / "table.md")
    counts = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "INTERRUPTED")}
    summary = {"name": sw.name, "dataset": sw.dataset, "metric": sw.metric, "metric_key": METRICS[sw.metric],
               "sampler": sw.spec["sampler"], "params": sw.spec["params"], "trials": rows, "counts": counts,
               "best": None if best is None else {"trial": best.number, "value": best.value, "params": best.params,
                                                  "adapter": best.user_attrs.get("adapter"),
                                                  "experiment_dir": best.user_attrs.get("experiment_dir"),
                                                  "mlflow_run_id": best.user_attrs.get("mlflow_run_id")},
               "importances": imp, "notes": notes, "files": files, "folder": str(sw.folder),
               "parent_run_id": sw.spec.get("parent_run_id"), "table": table}
    atomic_write_json(sw.folder / "summary.json", summary)
    if parent is not None:
        metrics = {f"n_{k.lower()}": float(v) for k, v in counts.items()}
        if best is not None:
            metrics[f"best_{sw.metric}"] = best.value
        parent.log_metrics(metrics, step=len(study.trials))
        for f in [*files.values(), str(sw.folder / "summary.json")]:
            parent.log_artifact(Path(f))
    return summary
