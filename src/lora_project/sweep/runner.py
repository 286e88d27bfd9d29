"""`lora-project sweep`: an Optuna study over LoRA and training settings, one adapter per trial.

Effects, in order:

1. everything is validated before anything is written: the ``--param`` space on the base
   config (every listed value and both ends of every range, through the same code as
   ``train``), the metric, the sampler, the sweep name;
2. ``outputs/sweeps/<name>/`` gets ``sweep.json`` (what was asked, the resolved base config,
   the parent MLflow run) and ``study.db`` (the Optuna study, SQLite), under a lock;
3. the base model is loaded once; each trial is ``train_adapter`` (the same run lifecycle as
   ``train``) on that base, adapter ``<name>_tNNN``, as a child MLflow run of the sweep's parent
   run, with a pruning callback that reports the validation loss at every evaluation;
4. after each trial the study records COMPLETE, PRUNED or FAIL and the sweep goes on; Ctrl-C
   ends the current trial KILLED (by the run lifecycle), marks it FAIL in the study and
   enqueues its parameters again, so ``--resume`` reruns it from its start. A trial left
   RUNNING by a hard kill is treated the same way on ``--resume``. Finished trials never rerun;
5. at the end, `lora_project.sweep.report` writes the table, the best config and the plots.
"""

from __future__ import annotations

from dataclasses import replace

from lora_project.config import RunConfig
from lora_project.errors import RunInterrupted
from lora_project.paths import ProjectPaths
from lora_project.sweep.report import finish_sweep
from lora_project.sweep.study import (
    SPEC_FILE,
    Sweep,
    done_count,
    keep_best_adapters,
    open_study,
    plan_sweep,
    requeue_stale,
    run_trial,
    sweep_lock,
)
from lora_project.training.options import RunOptions
from lora_project.utils.interrupts import check_stop
from lora_project.utils.io_utils import atomic_write_json


def run_sweep(paths: ProjectPaths, dataset: str, cfg: RunConfig, params: list[str], options: RunOptions | None = None,
              *, trials: int | None = None, metric: str | None = None, sampler: str | None = None,
              name: str | None = None, resume: bool = False, keep_best: int | None = None,
              run_trials=None) -> dict:
    """Run (or continue) a sweep; returns the summary that `report.finish_sweep` writes. `options`
    (MLflow on or off, progress, log) apply to every trial; `resume` continues the sweep `name`.
    `run_trials(sw, study, options)` runs trials until the study has `sw.target` done (default
    `run_local_trials`: one at a time in this process; `cluster.sweep` runs them as Ray tasks)."""
    from lora_project.utils.mlflow_utils import MlflowTracker

    options = options or RunOptions()
    log, use_mlflow = options.log, options.use_mlflow
    sw = plan_sweep(paths, dataset, cfg, params, trials=trials, metric=metric, sampler=sampler, name=name,
                    resume=resume, keep_best=keep_best, log=log)
    with sweep_lock(sw.folder):
        study = open_study(sw)
        if resume:
            requeue_stale(sw, study, log)
        atomic_write_json(sw.folder / SPEC_FILE, sw.spec)
        log(f"sweep '{sw.name}': {sw.spec['sampler']} over " + "; ".join(f"{s.key} in {s.describe()}" for s in sw.specs)
            + f"; {done_count(study)} of {sw.target} trials done")
        tracking = use_mlflow and sw.base_config.tracking.mlflow
        parent = MlflowTracker(paths, sw.base_config.tracking.experiment_name, sw.base_config.tracking.tracking_uri) \
            if tracking else None
        status = "FAILED"
        try:  # the parent run starts inside the block that ends it
            if parent and sw.spec.get("parent_run_id"):
                parent.resume(sw.spec["parent_run_id"])
            elif parent:
                parent.start(f"sweep {sw.name}", {"sweep.name": sw.name, "dataset": sw.dataset, "metric": sw.metric,
                                                  "sampler": sw.spec["sampler"], "trials": sw.target,
                                                  "params": " ; ".join(sw.spec["params"])},
                             {"kind": "sweep", "sweep.name": sw.name})
                sw.spec["parent_run_id"] = parent.run_id
                atomic_write_json(sw.folder / SPEC_FILE, sw.spec)
            parent_id = parent.run_id if parent else None
            (run_trials or run_local_trials)(sw, study, replace(options, parent_run_id=parent_id))
            summary = finish_sweep(sw, study, parent)
            status = "FINISHED"
            return summary
        except (KeyboardInterrupt, RunInterrupted) as exc:
            status = "KILLED"
            if not getattr(exc, "hint", None):
                exc.hint = f"continue with: lora-project sweep {sw.dataset} --name {sw.name} --resume"
            raise
        finally:
            if parent:
                parent.end(status)


def run_local_trials(sw: Sweep, study, options: RunOptions) -> None:
    """Trials one at a time in this process, on one base model loaded once (when there is a trial to run)."""
    from lora_project.models.base_model import load_base

    base = None
    while done_count(study) < sw.target:
        check_stop()
        if base is None:
            base = load_base(sw.base_config)
            options.log(f"base model {base.ref.name} loaded once for the sweep in {base.load_seconds:.1f} s")
        run_trial(sw, study, base, options)
        keep_best_adapters(sw, study)
