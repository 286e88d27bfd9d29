"""The sweep's Optuna study and its trials: planning, the study file, one trial, trial states.

`lora_project.sweep.runner.run_sweep` runs a whole sweep (its steps are listed there). Here: the
validated plan (``plan_sweep``), the lock and the study (``study.db``), one trial
(``run_trial``: ``train_adapter`` with a pruning callback, as a child MLflow run), requeueing of
interrupted trials, and ``--keep-best``.

Trial state in the study -> in the table / MLflow tag ``sweep.trial_state``: COMPLETE,
PRUNED (the run itself ends FAILED with error "TrialPruned: ..."), FAIL, INTERRUPTED (a FAIL
that was enqueued again).
"""

from __future__ import annotations

import fcntl
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from lora_project.config import RunConfig, build_config, flatten
from lora_project.errors import RunInterrupted, UserError
from lora_project.models.adapter import now_iso
from lora_project.paths import ProjectPaths, check_name
from lora_project.sweep.space import ParamSpec, grid_points, parse_space, trial_config
from lora_project.training.callbacks import Callback
from lora_project.training.options import RunOptions
from lora_project.utils.interrupts import shielded

METRICS = {"validation_perplexity": "perplexity", "validation_loss": "loss",
           "validation_bits_per_byte": "bits_per_byte"}  # --metric -> key of results.json metrics_after
SAMPLERS = ("tpe", "grid", "random")
DEFAULT_TRIALS = 10
SPEC_FILE, STUDY_FILE = "sweep.json", "study.db"


@dataclass
class Sweep:
    """What a sweep needs while it runs."""
    paths: ProjectPaths
    name: str
    folder: Path
    dataset: str
    specs: list[ParamSpec]
    spec: dict  # sweep.json's content
    base_config: RunConfig
    metric: str
    target: int  # trials to finish (COMPLETE, PRUNED or FAIL; interrupted ones are rerun)
    keep_best: int | None


class PruningCallback(Callback):
    """Reports the validation loss to the Optuna trial at each evaluation; stops a hopeless trial."""

    def __init__(self, trial):
        self.trial = trial

    def on_eval(self, state, metrics):
        import optuna

        with shielded():  # a SQLite write that must not be torn by Ctrl-C
            self.trial.report(float(metrics["val_loss"]), state.step)
            prune = self.trial.should_prune()
        if prune:
            raise optuna.TrialPruned(f"pruned at step {state.step}: validation loss {metrics['val_loss']:.4f} is "
                                     "worse than the median of earlier trials at this step")


@contextmanager
def sweep_lock(folder: Path):
    """One process per sweep: a second `sweep --name X` stops at once."""
    folder.mkdir(parents=True, exist_ok=True)
    fh = open(folder / ".lock", "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"sweep {folder.name} is running in another process (lock {folder / '.lock'})") from None
        yield
    finally:
        fh.close()


def _read_json(path: Path) -> dict:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({type(exc).__name__}); the sweep folder is damaged") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object; the sweep folder is damaged")
    return data


def _differences(a: dict, b: dict) -> list[str]:
    fa, fb = flatten(a), flatten(b)
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def plan_sweep(paths: ProjectPaths, dataset: str, cfg: RunConfig, params: list[str], *, trials: int | None,
               metric: str | None, sampler: str | None, name: str | None, resume: bool,
               keep_best: int | None, log=print) -> Sweep:
    """Validate the request (and, with --resume, match it to the stored sweep); writes nothing."""
    from lora_project.data.catalog import get_entry, load_catalog

    get_entry(load_catalog(paths.catalog), check_name(dataset, "dataset name"))  # unknown: did-you-mean, exit 2
    name = check_name(name or f"{dataset}_sweep", "sweep name")
    folder = paths.sweeps_dir / name
    exists = (folder / SPEC_FILE).is_file()
    if resume and not exists:
        raise UserError(f"no sweep '{name}' to resume under {paths.sweeps_dir}; start it without --resume")
    if exists and not resume:
        raise UserError(f"sweep '{name}' already exists ({folder}); pass --resume to continue it, "
                        "or --name for a new sweep")
    if trials is not None and trials < 1:
        raise UserError(f"--trials must be at least 1, got {trials}")
    if keep_best is not None and keep_best < 1:
        raise UserError(f"--keep-best must be at least 1, got {keep_best}")
    if resume:
        spec = _read_json(folder / SPEC_FILE)
        for flag, given, stored in (("dataset", dataset, spec["dataset"]), ("--metric", metric, spec["metric"]),
                                    ("--sampler", sampler, spec["sampler"])):
            if given is not None and given != stored:
                raise UserError(f"sweep '{name}' was started with {flag} {stored}, not {given}; "
                                "resume it with the same settings, or start a new sweep with --name")
        if params and params != spec["params"]:
            raise UserError(f"sweep '{name}' was started with --param {' --param '.join(spec['params'])}; "
                            "resume it without --param (or with the same ones)")
        differ = _differences(spec["base_config"], cfg.to_dict())
        if differ:
            log(f"note: the project config changed since the sweep started ({'; '.join(differ[:3])}); "
                "the sweep goes on with the config it started with")
        base_config = build_config(spec["base_config"])
        if trials is not None:
            spec["trials"] = trials
        if keep_best is not None:
            spec["keep_best"] = keep_best
    else:
        metric, sampler = metric or "validation_perplexity", sampler or "tpe"
        if metric not in METRICS:
            raise UserError(f"--metric {metric!r} is not one of {', '.join(METRICS)}")
        if sampler not in SAMPLERS:
            raise UserError(f"--sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
        stale = sorted(p.name for p in paths.adapters_dir.glob(f"{name}_t*_lora")) if paths.adapters_dir.is_dir() else []
        if stale:
            raise UserError(f"adapters of an earlier sweep named '{name}' exist ({stale[0]}, ...); "
                            "choose another --name or remove them")
        base_config = cfg
        spec = {"format": "lora_project.sweep/1", "name": name, "dataset": dataset, "params": list(params),
                "metric": metric, "sampler": sampler, "trials": trials, "keep_best": keep_best,
                "base_config": cfg.to_dict(), "parent_run_id": None, "created": now_iso()}
    specs = parse_space(spec["params"], base_config.to_dict(), spec["sampler"])
    check_architecture(base_config, specs)
    if spec["sampler"] == "grid":
        size = len(grid_points(specs))
        if spec["trials"] and spec["trials"] < size:
            log(f"note: --trials {spec['trials']} covers {spec['trials']} of the grid's {size} points")
        target = min(spec["trials"] or size, size)
    else:
        target = spec["trials"] or DEFAULT_TRIALS
    return Sweep(paths, name, folder, spec["dataset"], specs, spec, base_config, spec["metric"], target,
                 spec.get("keep_best"))


def check_architecture(cfg: RunConfig, specs: list[ParamSpec]) -> None:
    """Target modules the model lacks, or steps that cannot fit in memory, refused before any trial
    (the checks `train` makes before loading, on one meta-device skeleton of the model)."""
    from lora_project.models.base_model import resolve_model
    from lora_project.models.lora_model import check_fits_memory, check_targets, skeleton_of

    skeleton = skeleton_of(resolve_model(cfg.model.source, cfg.model.revision))
    if skeleton is None:
        return  # `train_adapter` checks each trial on the loaded model
    precision = "fp32" if cfg.training.precision == "auto" else cfg.training.precision
    for s in specs:
        ends = s.choices if s.kind == "choice" else [int(s.low) if s.kind == "int" else s.low,
                                                      int(s.high) if s.kind == "int" else s.high]
        for v in ends:
            c = trial_config(cfg.to_dict(), [s], {s.key: v})
            try:
                check_targets(skeleton, c.lora)
                check_fits_memory(skeleton, c.training, precision)
            except UserError as exc:
                raise UserError(f"--param {s.text}: value {v}: {exc}") from None


def _sampler(kind: str, seed: int, target: int):
    import optuna

    if kind == "tpe":  # random start-up trials, then TPE: about a third of a short sweep
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, target // 3)))
    return optuna.samplers.RandomSampler(seed=seed)  # grid points are all enqueued up front


def open_study(sw: Sweep):
    """Create or load the study in outputs/sweeps/<name>/study.db."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t = sw.base_config.training
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2) if t.eval_interval else optuna.pruners.NopPruner()
    storage = f"sqlite:///{sw.folder / STUDY_FILE}"
    with shielded():
        study = optuna.create_study(study_name=sw.name, storage=storage, direction="minimize",
                                    sampler=_sampler(sw.spec["sampler"], t.seed, sw.target), pruner=pruner,
                                    load_if_exists=True)
        if sw.spec["sampler"] == "grid" and not study.trials:
            for point in grid_points(sw.specs):
                study.enqueue_trial(point)
    return study


def interrupted_numbers(study) -> set[int]:
    """Trials that were stopped and enqueued again (they do not count as done)."""
    return {t.user_attrs["rerun_of"] for t in study.trials if "rerun_of" in t.user_attrs}


def trial_state(t, interrupted: set[int]) -> str:
    name = t.state.name
    return "INTERRUPTED" if name == "FAIL" and t.number in interrupted else name


def done_count(study) -> int:
    interrupted = interrupted_numbers(study)
    return sum(trial_state(t, interrupted) in ("COMPLETE", "PRUNED", "FAIL") for t in study.trials)


def requeue(study, number: int, params: dict) -> None:
    """Mark a stopped trial FAIL and enqueue its parameters again (once), so it reruns from its start."""
    from optuna.trial import TrialState

    with shielded():
        if number not in interrupted_numbers(study):  # enqueue first: a crash in between leaves it RUNNING
            study.enqueue_trial(params, user_attrs={"rerun_of": number})
        if study.trials[number].state == TrialState.RUNNING:
            study.tell(number, state=TrialState.FAIL)


def requeue_stale(sw: Sweep, study, log) -> None:
    """On --resume: trials left RUNNING by a crash or a kill are rerun from their start."""
    from optuna.trial import TrialState

    for t in study.trials:
        if t.state == TrialState.RUNNING:
            log(f"trial {t.number} was interrupted; it reruns from its start")
            requeue(study, t.number, t.params)
            _drop_checkpoints(sw.paths, t.user_attrs.get("adapter"))


def trial_record(paths: ProjectPaths, adapter: str | None) -> dict:
    """results.json of the newest experiment of a trial's adapter ({} when it has none)."""
    if not adapter or not paths.experiments_dir.is_dir():
        return {}
    pattern = re.compile(rf"^exp_(\d+)_{re.escape(adapter)}$")
    found = sorted((int(m.group(1)), p) for p in paths.experiments_dir.iterdir() if (m := pattern.match(p.name)))
    if not found or not (found[-1][1] / "results.json").is_file():
        return {}
    try:
        return _read_json(found[-1][1] / "results.json")
    except UserError:
        return {}


def _drop_checkpoints(paths: ProjectPaths, adapter: str | None) -> None:
    """A rerun starts afresh: the interrupted trial's checkpoints are of no use."""
    rec = trial_record(paths, adapter)
    if rec.get("experiment_dir"):
        shutil.rmtree(paths.checkpoints_dir / Path(rec["experiment_dir"]).name, ignore_errors=True)


def start_trial(sw: Sweep, study, log):
    """Ask the study for one trial and build its config; returns (trial, sampled values, adapter name,
    config or None, error: why the values make no config)."""
    with shielded():
        trial = study.ask()
        values = {s.key: s.suggest(trial) for s in sw.specs}
        adapter = f"{sw.name}_t{trial.number:03d}"
        trial.set_user_attr("adapter", adapter)
    rerun = trial.user_attrs.get("rerun_of")
    log(f"[trial {trial.number}{f' (rerun of {rerun})' if rerun is not None else ''}, {done_count(study) + 1}/"
        f"{sw.target}] " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))
    try:
        cfg = trial_config(sw.base_config.to_dict(), sw.specs, values)
    except UserError as exc:
        return trial, values, adapter, None, " ".join(str(exc).split())
    with shielded():
        trial.set_user_attr("config", cfg.to_dict())
    return trial, values, adapter, cfg, None


def trial_options(sw: Sweep, trial, values: dict, options: RunOptions, pruning_trial=None) -> RunOptions:
    """A trial's run options: the sweep's, plus its tags, its sampled values as parameters and the pruning
    callback (reporting to `pruning_trial`, by default the study's own trial)."""
    return replace(options, run_kind="sweep", tags={"sweep.name": sw.name, "sweep.trial": str(trial.number)},
                   params={f"sweep.{k}": v for k, v in values.items()} | {"sweep.trial": trial.number},
                   extra_callbacks=[PruningCallback(pruning_trial or trial)])


def finish_trial(sw: Sweep, study, trial, state: str, value: float | None, error: str | None, rec: dict, log) -> str:
    """Record a trial's outcome: what its run wrote (`rec`: its results.json) as user attributes, its state
    and value in the study, the state as its MLflow run's tag; returns the state."""
    import optuna

    from lora_project.utils.mlflow_utils import set_run_tags

    with shielded():
        for k in ("experiment_dir", "mlflow_run_id", "steps", "train_seconds"):
            if rec.get(k) is not None:
                trial.set_user_attr(k, rec[k])
        if error:
            trial.set_user_attr("error", error[:1000])
        if state == "COMPLETE":
            study.tell(trial, value)
        else:
            study.tell(trial, state=getattr(optuna.trial.TrialState, state))
    if rec.get("mlflow_run_id"):
        set_run_tags(sw.paths, sw.base_config.tracking.tracking_uri, rec["mlflow_run_id"],
                     {"sweep.trial_state": state} | ({"sweep.error": error[:500]} if error else {}))
    log(f"  {state.lower()}" + (f": {sw.metric} {value:.4f}" if value is not None else f": {error}"))
    return state


def run_trial(sw: Sweep, study, base, options: RunOptions) -> str:
    """Ask the study for one trial, train it, tell the study; returns the trial's state. `options`: the
    sweep's (MLflow on or off, progress, the parent run, its log); the trial adds its name, kind,
    tags, parameters and pruning callback."""
    import optuna

    from lora_project.training.single import train_adapter

    log = options.log
    trial, values, adapter, cfg, error = start_trial(sw, study, log)
    state, value = "FAIL", None
    try:
        if cfg is not None:
            res = train_adapter(sw.paths, sw.dataset, cfg, replace(
                trial_options(sw, trial, values, options), adapter_name=adapter, log=lambda m: log("  " + m)),
                base=base)
            value, state = float(res["metrics_after"][METRICS[sw.metric]]), "COMPLETE"
    except optuna.TrialPruned as exc:
        state, error = "PRUNED", str(exc)
    except (KeyboardInterrupt, RunInterrupted) as exc:
        requeue(study, trial.number, trial.params)
        exc.hint = f"the trial reruns from its start with: lora-project sweep {sw.dataset} --name {sw.name} --resume"
        raise
    except UserError as exc:
        error = " ".join(str(exc).split())
    except Exception as exc:  # a bug in one trial must not stop the sweep; it is recorded with its type
        error = f"{type(exc).__name__}: {exc}"[:500]
    return finish_trial(sw, study, trial, state, value, error, trial_record(sw.paths, adapter), log)


def keep_best_adapters(sw: Sweep, study) -> None:
    """With --keep-best K, remove the adapters of completed trials ranked below the best K."""
    from optuna.trial import TrialState

    if not sw.keep_best:
        return
    complete = sorted((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    for t in complete[sw.keep_best:]:
        folder = sw.paths.adapter(t.user_attrs["adapter"])
        if folder.is_dir():
            shutil.rmtree(folder)
