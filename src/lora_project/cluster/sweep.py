"""`sweep ... --cluster ADDRESS [--parallel K]`: the sweep's trials as Ray tasks, K at a time.

The driver owns the Optuna study, exactly as a local sweep does (`sweep.runner.run_sweep`: the plan,
the lock, ``outputs/sweeps/<name>/study.db``, the parent MLflow run, the report); only the trials
run elsewhere. Each trial is asked from the study by the driver (`sweep.study.start_trial`), trained
by `tasks.train_task` (the local recipe with the trial's `RunOptions`: its tags, sampled values and
pruning callback) and recorded by the driver (`train.AdapterTasks`: adapter, experiment folder, the
MLflow run as a child of the sweep's parent run), then told to the study (`sweep.study.finish_trial`).

Pruning across workers: a `PruningState` actor on the head node holds an in-memory Optuna study
with the sweep's pruner, seeded with the study's finished trials. A worker's pruning callback reports
each validation loss to it and asks whether to stop (`ActorTrial`); a worker only needs to reach
the cluster, never the driver, so this works with a ``ray://`` driver behind NAT. When a trial ends,
the actor hands back its reported values and counts the trial as finished for later decisions; the
driver copies the values and the final state into the project's study.

What equals a local sweep: the parameters of each trial number for the grid and random samplers
(the driver asks in trial order), and the value of every trial that completes (the same recipe and
seed). With K > 1, TPE after its start-up trials and the pruner decide on the trials finished so far,
which are not the ones a sequential sweep would have seen; ``--parallel 1`` decides as a local sweep.
Ctrl-C requeues the trials in flight (``--resume`` reruns them from their start), as locally.
"""

from __future__ import annotations

from functools import partial

from lora_project.config import RunConfig
from lora_project.errors import RunInterrupted
from lora_project.paths import ProjectPaths
from lora_project.training.options import RunOptions


class PruningState:
    """A Ray actor (on the head node): the pruner's view of the sweep, for trials running on any node."""

    def __init__(self, pruner, finished: list[dict]):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)  # duplicate steps of a retried task: ignored
        self.study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="minimize",
                                         pruner=pruner)
        for t in finished:
            state = getattr(optuna.trial.TrialState, t["state"])
            self.study.add_trial(optuna.trial.create_trial(
                state=state, value=t["value"] if t["state"] == "COMPLETE" else None, params={}, distributions={},
                intermediate_values={int(k): v for k, v in t["intermediate_values"].items()}))
        self.trials: dict[int, object] = {}
        self.reported: dict[int, dict[int, float]] = {}

    def should_prune(self, number: int, step: int, value: float) -> bool:
        """Record trial `number`'s value at `step`; whether the pruner stops it there."""
        if number not in self.trials:
            self.trials[number] = self.study.ask()
            self.reported[number] = {}
        trial = self.trials[number]
        if step not in self.reported[number]:  # a retried task reports the same steps again
            self.reported[number][step] = value
            trial.report(value, step)
        return bool(trial.should_prune())

    def finish(self, number: int, state: str, value: float | None) -> dict[int, float]:
        """Trial `number` ended in `state` (COMPLETE, PRUNED, FAIL); returns the values it reported."""
        import optuna

        trial = self.trials.pop(number, None)
        if trial is None:
            return {}
        if state == "COMPLETE":
            self.study.tell(trial, value)
        else:
            self.study.tell(trial, state=getattr(optuna.trial.TrialState, state))
        return self.reported.pop(number)


class ActorTrial:
    """What `sweep.study.PruningCallback` asks of an Optuna trial (report, should_prune), answered by
    the `PruningState` actor: one round trip per evaluation."""

    def __init__(self, actor, number: int):
        self.actor, self.number = actor, number
        self._last: tuple[int, float] | None = None

    def report(self, value: float, step: int) -> None:
        self._last = (step, float(value))

    def should_prune(self) -> bool:
        import ray

        if self._last is None:
            return False
        return bool(ray.get(self.actor.should_prune.remote(self.number, *self._last)))


def finished_trials(study) -> list[dict]:
    """The study's COMPLETE and PRUNED trials as plain data (what the pruner decides on)."""
    return [{"state": t.state.name, "value": t.value, "intermediate_values": dict(t.intermediate_values)}
            for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]


def trial_outcome(result: dict | None, lost: str | None, metric_key: str) -> tuple[str, float | None, str | None]:
    """(state, value, error) of a trial's task: COMPLETE with the metric, PRUNED, or FAIL with the error."""
    if result is None:
        return "FAIL", None, lost
    if result["status"] == "FINISHED":
        return "COMPLETE", float(result["results"]["metrics_after"][metric_key]), None
    error = result.get("error") or "the task failed without an error message"
    if error.startswith("TrialPruned: "):
        return "PRUNED", None, error.removeprefix("TrialPruned: ")
    return "FAIL", None, error


def default_parallel(ray, cpus_per_task: int) -> int:
    """Trials at once when --parallel is not given: the tasks the cluster can run at once (its CPUs /
    cluster.cpus_per_task; local:N gives N), at least 1."""
    return max(1, int(ray.cluster_resources().get("CPU", 0) // cpus_per_task))


def sweep_on_cluster(paths: ProjectPaths, dataset: str, cfg: RunConfig, params: list[str], options: RunOptions,
                     address: str, *, parallel: int | None = None, **sweep_args) -> dict:
    """`lora-project sweep DATASET ... --cluster ADDRESS [--parallel K]`: `run_sweep` with its trials as Ray
    tasks; `sweep_args` are run_sweep's (trials, metric, sampler, name, resume, keep_best)."""
    from lora_project.cluster.address import parse_address, probe
    from lora_project.cluster.train import check_threads
    from lora_project.errors import UserError
    from lora_project.sweep.runner import run_sweep

    if parallel is not None and parallel < 1:
        raise UserError(f"--parallel must be at least 1, got {parallel}")
    check_threads({dataset: cfg})
    probe(parse_address(address))  # an unreachable cluster is refused before the sweep folder is written
    return run_sweep(paths, dataset, cfg, params, options, run_trials=partial(run_cluster_trials, address=address,
                                                                             parallel=parallel), **sweep_args)


def run_cluster_trials(sw, study, options: RunOptions, *, address: str, parallel: int | None) -> None:
    """Run the sweep's remaining trials on the cluster at `address`, `parallel` at a time (see the module)."""
    from lora_project.cluster.address import parse_address
    from lora_project.cluster.train import AdapterTasks, check_threads, cluster_session, resolve_for_tasks
    from lora_project.data.catalog import load_catalog
    from lora_project.data.dataset_loader import load_streams, prepare_dataset
    from lora_project.sweep.study import done_count
    from lora_project.utils.mlflow_utils import resolve_tracking_uri

    if done_count(study) >= sw.target:
        return
    paths, cfg, log = sw.paths, sw.base_config, options.log
    cpus = check_threads({sw.dataset: cfg})  # the config the sweep started with (--resume)
    catalog = load_catalog(paths.catalog)
    _ref, tokenizer, tok_fp, runtime, kernel = resolve_for_tasks(cfg, cpus)
    load_streams(paths, prepare_dataset(paths, sw.dataset, catalog=catalog), tokenizer, tok_fp)  # what tasks read
    uri = resolve_tracking_uri(paths, cfg.tracking.tracking_uri)
    live = uri if uri.startswith(("http://", "https://")) else None
    session = cluster_session(paths, parse_address(address), cpus, cfg.cluster.shared_filesystem, log)
    with session as (ray, shared, _nodes):
        k = parallel or default_parallel(ray, cpus)
        log(f"{k} trial(s) at once, {cpus} CPU(s) each: {runtime.precision}, fp32 kernel {kernel}")
        tasks = AdapterTasks(ray, paths, catalog, shared, live, options.parent_run_id, runtime.precision, kernel,
                             cpus, cfg.cluster.max_retries, log)
        pruning = ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001})(PruningState).remote(
            study.pruner, finished_trials(study))
        _drive(sw, study, options, tasks, pruning, k)


def _drive(sw, study, options: RunOptions, tasks, pruning, k: int) -> None:
    """Keep `k` trials in flight until the study has its target; record each as soon as its task ends."""
    from lora_project.sweep.study import (
        done_count,
        finish_trial,
        keep_best_adapters,
        requeue,
        start_trial,
        trial_options,
    )
    from lora_project.utils.interrupts import acknowledge, check_stop

    log = options.log
    inflight: dict = {}
    try:
        while True:
            check_stop()
            while len(inflight) < k and done_count(study) + len(inflight) < sw.target:
                trial, values, adapter, cfg, error = start_trial(sw, study, log)
                if cfg is None:
                    finish_trial(sw, study, trial, "FAIL", None, error, {}, log)
                    continue
                opts = trial_options(sw, trial, values, options, ActorTrial(pruning, trial.number))
                inflight[tasks.submit(sw.dataset, adapter, cfg, opts, "sweep")] = (trial, adapter)
            if not inflight:
                return
            ended, _ = tasks.wait(list(inflight))
            for ref, result, lost in ended:
                trial, adapter = inflight.pop(ref)
                _finish(sw, study, tasks, pruning, trial, adapter, result, lost, log)
                keep_best_adapters(sw, study)
    except (KeyboardInterrupt, RunInterrupted) as exc:
        acknowledge()  # the stop was raised at once: the shielded study writes below must not raise it again
        for trial, _ in inflight.values():  # rerun from their start by --resume, as a local sweep's trial
            requeue(study, trial.number, trial.params)
        exc.hint = f"the trials in flight rerun from their start with: lora-project sweep {sw.dataset} " \
                   f"--name {sw.name} --resume --cluster ADDRESS"
        raise


def _finish(sw, study, tasks, pruning, trial, adapter: str, result, lost, log) -> None:
    """Record one ended trial: its run in the project, its reported values and state in the study."""
    from lora_project.sweep.study import METRICS, finish_trial
    from lora_project.utils.interrupts import shielded

    state, value, error = trial_outcome(result, lost, METRICS[sw.metric])
    rec = tasks.record(result, adapter, sw.base_config, False) if result is not None else {}
    where = f" on {result['node']}" if result is not None else ""
    log(f"[{adapter}] {state.lower()}{where}")
    reported = tasks.ray.get(pruning.finish.remote(trial.number, state, value))
    with shielded():
        for step, v in sorted(reported.items()):
            trial.report(v, step)
    finish_trial(sw, study, trial, state, value, error, rec, log)
