"""What the web board shows, computed from the project's files by the same library functions as the CLI.

Nothing here imports Gradio: every function takes the project paths (and plain values from the
page) and returns plain data, so it is tested in-process without a browser. Names from the page
are checked with the project's own name rules before they touch a path.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import time
from pathlib import Path

from lora_project.errors import ConfigError, UserError
from lora_project.paths import ProjectPaths, check_name

# ---------------------------------------------------------------------------- names and hosts


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost': addresses no other machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def adapter_folder(paths: ProjectPaths, folder: str) -> Path:
    """adapters/<folder> for a folder name from the page (e.g. 'toddler_data_lora'), refused when the
    name is not a plain folder-safe name or the folder resolves outside adapters/."""
    check_name(folder, "adapter folder")
    path = paths.adapters_dir / folder
    if not path.is_dir():
        raise UserError(f"no adapter folder {folder!r} under {paths.adapters_dir}")
    if path.resolve().parent != paths.adapters_dir.resolve():
        raise UserError(f"adapter folder {folder!r} points outside {paths.adapters_dir}")
    return path


def catalog_name(paths: ProjectPaths, name: str, catalog: dict | None = None) -> str:
    """A dataset name from the page: folder-safe and a row of the catalog."""
    from lora_project.data.catalog import get_entry, load_catalog

    check_name(name or "", "dataset name")
    return get_entry(catalog if catalog is not None else load_catalog(paths.catalog), name).name


# ---------------------------------------------------------------------------- catalog


def _stats(paths: ProjectPaths, name: str) -> dict | None:
    f = paths.processed(name) / "stats.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else None
    except (OSError, ValueError):
        return None


def catalog_rows(paths: ProjectPaths) -> list[dict]:
    """Every catalog row with its status: source present, prepared, documents and tokens per split."""
    from lora_project.adopt.catalog_rows import catalog_list

    rows = []
    for r in catalog_list(paths):
        st = _stats(paths, r["name"])
        row = {"name": r["name"], "kind": r["kind"], "enabled": r["enabled"],
               "source": {True: "present", False: "missing", None: "remote"}[r["present"]],
               "prepared": "yes" if st else "no", "description": r["description"]}
        for split in ("train", "validation", "test"):
            s = (st or {}).get("splits", {}).get(split, {})
            row[f"{split}_docs"] = s.get("documents")
            row[f"{split}_tokens"] = s.get("tokens")
        rows.append(row)
    return rows


def dataset_sample(paths: ProjectPaths, name: str, n: int = 8) -> str:
    """The first `n` training documents of a prepared dataset (or what to run to prepare it)."""
    from lora_project.data.preprocessor import read_split

    name = catalog_name(paths, name)
    if _stats(paths, name) is None:
        return f"'{name}' is not prepared yet: press Prepare (or run: lora-project prepare {name})"
    docs = read_split(paths.processed(name), "train")
    return "\n".join(f"{i + 1}. {' '.join(d.split())[:300]}" for i, d in enumerate(docs[:n]))


# ---------------------------------------------------------------------------- the training form

# (config field, label): the fields the Train tab shows, validated by lora_project.config.
TRAIN_FIELDS: tuple[tuple[str, str], ...] = (
    ("lora.r", "rank r"), ("lora.alpha", "alpha"), ("lora.target_modules", "target modules"),
    ("training.lr", "learning rate"), ("training.max_steps", "steps"), ("training.seq_len", "sequence length"),
    ("training.batch_size", "batch size"), ("training.precision", "precision"))


def project_config(paths: ProjectPaths, overrides: list[str] = ()):
    from lora_project.config import load_project_config

    return load_project_config(paths, overrides)


def field_value(cfg, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def field_text(value) -> str:
    """A config value as the text the form shows and `--set` takes."""
    if isinstance(value, list):
        return ",".join(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def form_defaults(paths: ProjectPaths) -> dict[str, str]:
    cfg = project_config(paths)
    return {key: field_text(field_value(cfg, key)) for key, _ in TRAIN_FIELDS}


class FormErrors(UserError):
    """Problems of the training form, by field ('dataset', 'adapter', a config key, or '' for the rest)."""

    def __init__(self, errors: dict[str, str]):
        self.errors = errors
        super().__init__("; ".join(f"{k}: {v}" if k else v for k, v in errors.items()))


def check_form(paths: ProjectPaths, dataset: str, adapter: str, values: dict[str, str], overwrite: bool = False,
               mlflow: bool = True):
    """Validate the form with the config code; returns (argv after `lora-project`, RunConfig, adapter name).

    The `--set` list holds only the fields whose value differs from the project's config, so the
    command line is the shortest one that trains the same thing. Raises FormErrors naming fields.
    """
    errors: dict[str, str] = {}
    try:
        dataset = catalog_name(paths, (dataset or "").strip())
    except UserError as exc:
        errors["dataset"] = str(exc)
    adapter = (adapter or "").strip() or dataset
    try:
        check_name(adapter, "adapter name")
        if paths.adapter(adapter).exists() and not overwrite:
            errors["adapter"] = f"adapters/{adapter}_lora exists: tick 'overwrite' to replace it"
    except UserError as exc:
        errors["adapter"] = str(exc)
    overrides, cfg = [], None
    for key, _ in TRAIN_FIELDS:
        text = str(values.get(key, "")).strip()
        if "\n" in text or not text:
            errors[key] = "a value is needed" if not text else "one line only"
            continue
        overrides.append(f"{key}={text}")
    try:
        base = project_config(paths)
        cfg = project_config(paths, [o for o in overrides if o.split("=")[0] not in errors])
    except ConfigError as exc:
        for problem in exc.problems:
            key = problem.split(":", 1)[0].strip()
            if key in dict(TRAIN_FIELDS):
                errors[key] = problem.split(":", 1)[1].strip()
            else:
                errors[""] = f"{errors.get('', '')} {problem}".strip()
    if errors:
        raise FormErrors(errors)
    changed = [f"{key}={field_text(field_value(cfg, key))}" for key, _ in TRAIN_FIELDS
               if field_value(cfg, key) != field_value(base, key)]
    argv = ["train", dataset]
    if adapter != dataset:
        argv += ["--adapter-name", adapter]
    for item in changed:
        argv += ["--set", item]
    if overwrite:
        argv.append("--overwrite")
    if not mlflow:
        argv.append("--no-mlflow")
    return argv + ["--no-progress"], cfg, adapter


def command_line(argv: list[str]) -> str:
    """The shell command a user would type for the same run."""
    return "lora-project " + shlex.join(argv)


# ---------------------------------------------------------------------------- runs and live progress

_EXP = re.compile(r"^exp_(\d+)_(.+)$")


def pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None  # being replaced this instant or damaged: the next read will do


def experiment_dirs(paths: ProjectPaths) -> list[Path]:
    """experiments/exp_NNN_* newest (highest NNN) first."""
    if not paths.experiments_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in paths.experiments_dir.iterdir() if (m := _EXP.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def locked_adapters(paths: ProjectPaths) -> dict[str, int]:
    """Adapters being trained now: {adapter name: pid} from the adapter lock files whose process lives."""
    out = {}
    if paths.adapters_dir.is_dir():
        for f in paths.adapters_dir.glob(".*_lora.lock"):
            try:
                pid = int(f.read_text().strip() or 0)
            except (OSError, ValueError):
                continue
            if pid and pid_alive(pid):
                out[f.name[1:-len("_lora.lock")]] = pid
    return out


def run_status(exp: Path) -> tuple[str, dict, dict]:
    """(status, results.json, progress.json) of one experiment folder; a RUNNING progress file whose
    process is gone reads ENDED (the process died without recording its end, e.g. SIGKILL)."""
    results = _json(exp / "results.json") or {}
    progress = _json(exp / "logs" / "progress.json") or {}
    status = results.get("status") or progress.get("status") or "STARTING"
    if status == "RUNNING" and not results and not pid_alive(progress.get("pid")):
        status = "ENDED (process gone)"
    return status, results, progress


def loss_points(exp: Path) -> tuple[list[dict], list[dict]]:
    """(train, eval) records of logs/metrics.jsonl; a half-written last line is skipped."""
    train, evals = [], []
    f = exp / "logs" / "metrics.jsonl"
    if f.is_file():
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == "train" and "loss" in rec:
                train.append(rec)
            elif rec.get("event") == "eval":
                evals.append(rec)
    return train, evals


def run_view(paths: ProjectPaths, exp: Path) -> dict:
    """One run as the Train tab shows it: status, step of max, latest loss, tokens/s, ETA, loss curve."""
    status, results, progress = run_status(exp)
    train, evals = loss_points(exp)
    step = progress.get("step") or (train[-1]["step"] if train else 0)
    max_steps = progress.get("max_steps") or results.get("steps")
    tps = progress.get("tokens_per_second") or results.get("tokens_per_second")
    eta = None
    if status == "RUNNING" and max_steps and step and progress.get("train_seconds"):
        eta = (max_steps - step) * progress["train_seconds"] / step
    return {"experiment": exp.name, "adapter": _EXP.match(exp.name).group(2), "status": status, "step": step,
            "max_steps": max_steps, "loss": progress.get("loss") or (train[-1]["loss"] if train else None),
            "tokens_per_second": tps, "eta_seconds": eta, "pid": progress.get("pid"),
            "mlflow_run_id": results.get("mlflow_run_id"), "error": results.get("error"),
            "curve": [{"step": r["step"], "loss": r["loss"], "series": "train"} for r in train]
            + [{"step": r["step"], "loss": r["val_loss"], "series": "validation"} for r in evals if "val_loss" in r],
            "age_seconds": time.time() - (progress.get("updated") or exp.stat().st_mtime)}


def _starting(adapter: str, pid: int) -> dict:
    return {"experiment": None, "adapter": adapter, "status": "STARTING", "step": 0, "max_steps": None,
            "loss": None, "tokens_per_second": None, "eta_seconds": None, "pid": pid, "mlflow_run_id": None,
            "error": None, "curve": [], "age_seconds": 0.0}


def adapter_view(paths: ProjectPaths, adapter: str, exps: list[Path] | None = None,
                 locked: dict[str, int] | None = None) -> dict | None:
    """The newest run of one adapter ('STARTING' while its process loads the model and data)."""
    exps = experiment_dirs(paths) if exps is None else exps
    locked = locked_adapters(paths) if locked is None else locked
    mine = [e for e in exps if _EXP.match(e.name).group(2) == adapter]
    view = run_view(paths, mine[0]) if mine else None
    if adapter in locked and (view is None or view["status"] not in ("RUNNING", "STARTING")
                              or view["pid"] not in (None, locked[adapter])):
        return _starting(adapter, locked[adapter])  # its new experiment folder does not exist yet
    return view


def live_views(paths: ProjectPaths, follow: str | None = None) -> list[dict]:
    """The runs the Train tab shows: first the one it follows (the newest run of adapter `follow`, else the
    newest live run, else the newest run), then every other training in progress. All read from files."""
    exps, locked = experiment_dirs(paths), locked_adapters(paths)
    views = {a: adapter_view(paths, a, exps, locked) for a in locked}
    first = None
    if follow:
        first = views.get(follow) or adapter_view(paths, follow, exps, locked)
    if first is None and views:
        order = {_EXP.match(e.name).group(2): -i for i, e in enumerate(exps)}
        first = max(views.values(), key=lambda v: (v["experiment"] is None, order.get(v["adapter"], 0)))
    if first is None and exps:
        first = run_view(paths, exps[0])
    if first is None:
        return []
    return [first] + [v for a, v in sorted(views.items()) if v and a != first["adapter"]]


def progress_line(view: dict | None) -> str:
    """One line: 'RUNNING exp_003_x: step 40/2000 · loss 5.412 · 1,234 tokens/s · ETA 12 s · 8 loss points'."""
    if view is None:
        return "no training runs yet"
    parts = [f"step {view['step']}/{view['max_steps'] or '?'}"]
    if view["loss"] is not None:
        parts.append(f"loss {view['loss']:.4f}")
    if view["tokens_per_second"]:
        parts.append(f"{view['tokens_per_second']:,.0f} tokens/s")
    if view["eta_seconds"] is not None:
        parts.append(f"ETA {view['eta_seconds']:.0f} s")
    parts.append(f"{sum(1 for p in view['curve'] if p['series'] == 'train')} loss points")
    head = f"{view['status']} {view['experiment'] or view['adapter'] + ' (loading model and data)'}"
    return f"{head}: " + " · ".join(parts) + (f" · error: {view['error']}" if view.get("error") else "")


def runs_table(paths: ProjectPaths, limit: int = 30) -> list[dict]:
    """The newest experiments with their end state and MLflow run id."""
    rows = []
    for exp in experiment_dirs(paths)[:limit]:
        status, results, progress = run_status(exp)
        dataset = results.get("dataset") or ""
        dataset = dataset.get("name", "") if isinstance(dataset, dict) else dataset  # provenance: {name, fingerprint}
        rows.append({"experiment": exp.name, "status": status, "dataset": dataset,
                     "steps": results.get("steps") or progress.get("step"),
                     "val ppl after": (results.get("metrics_after") or {}).get("perplexity"),
                     "mlflow_run_id": results.get("mlflow_run_id")})
    return rows


# ---------------------------------------------------------------------------- MLflow


def tracking_uri(paths: ProjectPaths) -> str:
    from lora_project.utils.mlflow_utils import resolve_tracking_uri

    try:
        configured = project_config(paths).tracking.tracking_uri
    except UserError:
        configured = None
    return resolve_tracking_uri(paths, configured)


def mlflow_link(uri: str, run_id: str | None) -> tuple[str, str | None]:
    """(text, href): a real link for an http(s) tracking server; for a file store the run id (open it
    with `mlflow ui`, see mlflow_hint)."""
    if not run_id:
        return "", None
    if uri.startswith(("http://", "https://")):
        return run_id[:12], f"{uri.rstrip('/')}/#/runs/{run_id}"
    return run_id, None


def mlflow_hint(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"MLflow server: {uri} (run ids link to it)"
    return (f"MLflow store: {uri}. To browse a run, start the MLflow UI and search its run id: "
            f"`mlflow ui --backend-store-uri {shlex.quote(uri)}` (then http://127.0.0.1:5000/#/runs/RUN_ID)")


# ---------------------------------------------------------------------------- evaluation results


def saved_matrix(paths: ProjectPaths) -> dict | None:
    """The newest adapters x datasets matrix under outputs/metrics/ (`benchmark --matrix` or the board)."""
    files = []
    if paths.metrics_dir.is_dir():
        files = list(paths.metrics_dir.glob("benchmark_*.json")) + list(paths.metrics_dir.glob("matrix_*.json"))
    for f in sorted(files, key=lambda p: p.stat().st_mtime, reverse=True):
        data = _json(f) or {}
        m = data.get("matrix") if "matrix" in data else (data if "cells" in data else None)
        if m and m.get("models") and m.get("datasets"):
            return dict(m, source=f.name)
    return None


def saved_pairs(paths: ProjectPaths) -> dict | None:
    """The newest `evaluate --pairs` result (outputs/metrics/minimal_pairs_*.json)."""
    files = sorted(paths.metrics_dir.glob("minimal_pairs_*.json")) if paths.metrics_dir.is_dir() else []
    for f in reversed(files):
        data = _json(f)
        if data and data.get("models"):
            return dict(data, source=f.name)
    return None


def save_matrix(paths: ProjectPaths, matrix: dict) -> Path:
    """outputs/metrics/matrix_<time>.json and its heatmap PNG."""
    from lora_project.benchmark.matrix import plot_matrix
    from lora_project.utils.io_utils import atomic_write_json, write_new_json

    out = write_new_json(paths.metrics_dir, "matrix", matrix)  # claims the name, then again with the heatmap
    atomic_write_json(out, dict(matrix, heatmap=str(plot_matrix(matrix, out.with_suffix(".png")))))
    return out
