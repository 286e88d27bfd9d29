"""`sweep --cluster ADDRESS [--parallel K]`: argument errors in the fast tier (no Ray started), the
pruning actor's decisions against a plain Optuna study; in the slow tier, sweeps on a real `local:N`
Ray cluster (tiny model) against the same sweep run locally, and pruning through the actor after
--resume."""

from __future__ import annotations

import json
import socket
import time

import pytest

from conftest import assert_user_error, run_cli

ONE_CPU = ["--set", "cluster.cpus_per_task=1"]  # the tiny project trains with training.threads: 1
GRID = ["--param", "lora.r=2,4", "--param", "training.lr=0.003,0.01", "--sampler", "grid"]


# --- fast: refusals before anything is written ---------------------------------------------------------


@pytest.mark.parametrize("extra, words", [
    (["--parallel", "0", "--cluster", "local:2"], "--parallel: must be an integer from 1"),
    (["--parallel", "2"], "--parallel K runs K trials at once on a Ray cluster: add --cluster ADDRESS"),
    (["--cluster", "local:0"], "local:N needs N from 1"),
    (["--cluster", "http://h:1"], "only ray://"),
    (["--cluster", "local:2"], "training.threads=1 differs from cluster.cpus_per_task=2"),
])
def test_bad_cluster_sweep_arguments_are_one_line_and_write_nothing(project, extra, words):
    proc = run_cli("sweep", "toddler_data", *GRID, "--no-progress", *extra, cwd=project)
    assert_user_error(proc, words)
    assert not (project / "outputs" / "sweeps").exists() and not (project / "experiments").exists()


def test_unreachable_cluster_is_refused_before_the_sweep_starts(project):
    with socket.socket() as s:  # a free loopback port, closed again: nothing accepts there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    proc = run_cli("sweep", "toddler_data", *GRID, "--no-progress", "--cluster", f"127.0.0.1:{port}", *ONE_CPU,
                   cwd=project)
    assert time.perf_counter() - t0 < 10
    assert_user_error(proc, "cannot reach the Ray cluster", f"127.0.0.1:{port}")
    assert not (project / "outputs" / "sweeps").exists()


def test_pruning_actor_decides_as_the_study_itself():
    """`PruningState` (run here as a plain object) seeded with finished trials gives the decisions of an
    Optuna study that saw the same trials, and hands back what each trial reported."""
    import optuna

    from lora_project.cluster.sweep import PruningState, finished_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2)
    study = optuna.create_study(pruner=pruner)
    for curve in ({0: 3.0, 3: 2.0, 6: 1.5}, {0: 3.0, 3: 2.2, 6: 1.7}):
        t = study.ask()
        for step, v in curve.items():
            t.report(v, step)
        study.tell(t, curve[6])
    state = PruningState(pruner, finished_trials(study))
    for number, (step, value) in enumerate([(0, 3.0), (3, 2.05), (3, 2.9)], start=2):
        mine = study.ask()
        mine.report(3.0, 0)
        expect = False
        if step:
            mine.report(value, step)
            expect = mine.should_prune()
        got = state.should_prune(number, 0, 3.0)
        if step:
            got = state.should_prune(number, step, value)
        assert got == expect
    assert state.should_prune(5, 3, 2.9) is True  # worse than the median of 2.0 and 2.2 at step 3
    assert state.should_prune(5, 3, 2.9) is True  # a retried task's repeated step changes nothing
    assert state.finish(5, "PRUNED", None) == {3: 2.9}
    assert state.finish(4, "PRUNED", None) == {0: 3.0, 3: 2.9}
    assert state.finish(99, "FAIL", None) == {}


# --- slow: a real local Ray cluster ----------------------------------------------------------------------


def _study(project, name):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=f"sqlite:///{project / 'outputs' / 'sweeps' / name / 'study.db'}")


def _client(project):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")


@pytest.mark.slow
def test_a_grid_sweep_on_a_local_cluster_gives_the_local_sweeps_trials(project, tracking_store):
    """Grid: each trial number has the local sweep's parameters; a trial that completes in both has the same
    value and a byte-identical adapter (K=2: which trials the median pruner stops may differ, so states are
    only COMPLETE or PRUNED); the runs are children of one parent run, tagged as a local sweep's."""
    local = run_cli("sweep", "toddler_data", *GRID, "--name", "loc", "--no-progress", "--json", *ONE_CPU, cwd=project)
    assert local.returncode == 0, local.stderr[-3000:]
    t0 = time.perf_counter()
    proc = run_cli("sweep", "toddler_data", *GRID, "--name", "ray", "--no-progress", "--json", *ONE_CPU,
                   "--set", "cluster.shared_filesystem=false", "--cluster", "local:2", cwd=project)
    took = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 trial(s) at once" in proc.stderr and "running on" in proc.stderr, proc.stderr[-2000:]
    ref, got = _study(project, "loc"), _study(project, "ray")
    assert len(got.trials) == 4 and {t.state.name for t in got.trials} <= {"COMPLETE", "PRUNED"}
    both = [a.number for a, b in zip(ref.trials, got.trials) if a.state.name == b.state.name == "COMPLETE"]
    assert both[:2] == [0, 1]  # the first two run before any trial finished: never pruned, compared below
    for a, b in zip(ref.trials, got.trials):
        assert a.number == b.number and a.params == b.params
        if a.state.name == b.state.name == "COMPLETE":
            assert a.value == b.value, (a.number, a.value, b.value)
            same = [(project / "adapters" / f"{x}_t{a.number:03d}_lora" / "adapter_model.safetensors").read_bytes()
                    for x in ("loc", "ray")]
            assert same[0] == same[1]
        steps = min(len(a.intermediate_values), len(b.intermediate_values))
        assert list(a.intermediate_values.items())[:steps] == list(b.intermediate_values.items())[:steps]
        assert b.intermediate_values and b.user_attrs["mlflow_run_id"] and b.user_attrs["experiment_dir"]

    summary = json.loads(proc.stdout)
    client = _client(project)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags["kind"] == "sweep" and parent.info.status == "FINISHED"
    exp = client.get_experiment_by_name("tests")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    for c in children:
        t = got.trials[int(c.data.params["sweep.trial"])]
        assert c.info.run_id == t.user_attrs["mlflow_run_id"]
        assert c.data.tags["sweep.trial_state"] == t.state.name and c.data.tags["cluster_node"]
        assert c.data.params["sweep.lora.r"] == str(t.params["lora.r"])
        assert c.info.status == ("FINISHED" if t.state.name == "COMPLETE" else "FAILED")
        # what the pruner saw: the validation losses of the evaluations during training
        assert set(t.intermediate_values) <= {m.step for m in client.get_metric_history(c.info.run_id, "val_loss")}
    print(f"cluster sweep of 4 trials on local:2: {took:.1f} s")


@pytest.mark.slow
def test_resume_on_a_cluster_after_a_driver_crash_reruns_the_trial_and_the_actor_prunes_it(project, tracking_store):
    """A sweep started locally (two trials), then a driver crash leaves trial 2 RUNNING; `--resume --cluster`
    continues the same study: trial 2 is rerun from its start as trial 3, and the actor, seeded with the
    study's finished trials, stops it at its first evaluation (its learning rate barely moves the loss)."""
    args = ["sweep", "toddler_data", "--param", "training.lr=0.01,0.003,0.00001", "--sampler", "grid",
            "--name", "p", "--no-progress", "--json", *ONE_CPU]
    first = run_cli(*args, "--trials", "2", cwd=project)
    assert first.returncode == 0, first.stderr[-3000:]
    crashed = _study(project, "p").ask()  # what a driver killed during trial 2 leaves: a RUNNING trial
    crashed.suggest_categorical("training.lr", [0.01, 0.003, 0.00001])  # the enqueued grid point, read back
    crashed.set_user_attr("adapter", "p_t002")
    assert crashed.number == 2 and crashed.params == {"training.lr": 0.00001}

    t0 = time.perf_counter()
    again = run_cli(*args, "--resume", "--trials", "3", "--cluster", "local:1", cwd=project)
    took = time.perf_counter() - t0
    assert again.returncode == 0, again.stderr[-3000:]
    assert "trial 2 was interrupted; it reruns from its start" in again.stderr
    trials = _study(project, "p").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", "PRUNED"]
    pruned = trials[3]
    assert pruned.user_attrs["rerun_of"] == 2 and pruned.params == {"training.lr": 0.00001}
    assert sorted(pruned.intermediate_values) == [3]  # stopped at its first evaluation, step 3 of 6
    assert "pruned at step 3" in pruned.user_attrs["error"]
    assert not (project / "adapters" / "p_t003_lora").exists()
    run = _client(project).get_run(pruned.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["sweep.trial_state"] == "PRUNED"
    assert run.data.tags["mlflow.parentRunId"] == json.loads(first.stdout)["parent_run_id"]  # the same parent
    rows = {r["trial"]: r["state"] for r in json.loads(again.stdout)["trials"]}
    assert rows == {0: "COMPLETE", 1: "COMPLETE", 2: "INTERRUPTED", 3: "PRUNED"}
    print(f"resumed cluster sweep (one pruned trial) on local:1: {took:.1f} s")


@pytest.mark.slow  # a real driver process stopped by SIGINT while two trials run on local:2
def test_ctrl_c_at_the_driver_requeues_the_trials_in_flight_and_ends_the_parent_killed(project, tracking_store):
    import os
    import signal
    import subprocess
    import sys
    import threading

    args = ["sweep", "toddler_data", *GRID, "--name", "c", "--no-progress", *ONE_CPU, "--cluster", "local:2",
            "--set", "training.max_steps=600", "--set", "training.eval_interval=0"]
    proc = subprocess.Popen([sys.executable, "-m", "lora_project", *args], cwd=project,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and sum("running on" in x for x in lines) < 2:
        time.sleep(0.1)
    assert proc.poll() is None, "".join(lines)[-3000:]
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode == 130, out[-3000:]
    assert "--resume" in out

    study = _study(project, "c")
    states = {t.number: t.state.name for t in study.trials}
    assert states[0] == states[1] == "FAIL", states  # the two in flight, marked FAIL ...
    reruns = {t.user_attrs["rerun_of"]: t for t in study.trials if "rerun_of" in t.user_attrs}
    assert sorted(reruns) == [0, 1] and {t.state.name for t in reruns.values()} == {"WAITING"}  # ... and enqueued
    assert reruns[0].system_attrs["fixed_params"] == study.trials[0].params
    spec = json.loads((project / "outputs" / "sweeps" / "c" / "sweep.json").read_text())
    assert _client(project).get_run(spec["parent_run_id"]).info.status == "KILLED"
    assert not list(project.glob("adapters/c_t*_lora"))  # nothing half-written: a task's adapter lands whole
