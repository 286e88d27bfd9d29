"""The fault kinds the suite covers, listed once, and issue 31's new ones for the newer commands.

A fault kind is one injected fault in one place: a signal in a named phase, a full disk at a
named write, a killed process, an unreachable server. FAULT_KINDS names each with the test that
injects it; a test below keeps the list honest (every named test exists, no kind twice) and
docs/research_notes.md lists the same kinds.

New here (issue 31): a sweep interrupted between trials, the board's training subprocess killed,
a profile interrupted while sampling.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import time

import pytest
from conftest import REPO, run_cli, snapshot

# kind -> "test file::test function[parameter]" (the parameter where one test covers several kinds)
FAULT_KINDS = {
    "SIGKILL with an adapter file half-written": "test_faults.py::test_sigkill_while_saving_an_adapter_keeps_the_previous_one[adapter-half-file]",
    "SIGKILL with the new adapter complete in its temporary folder": "test_faults.py::test_sigkill_while_saving_an_adapter_keeps_the_previous_one[adapter-before-swap]",
    "SIGKILL between the two renames of an adapter save": "test_faults.py::test_sigkill_while_saving_an_adapter_keeps_the_previous_one[adapter-between-renames]",
    "SIGKILL while a checkpoint is written": "test_faults.py::test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint",
    "full disk at the adapter save": "test_fault_phases.py::test_a_full_disk_at_the_adapter_save_fails_the_run_cleanly",
    "full disk at the interrupt checkpoint": "test_fault_phases.py::test_a_full_disk_at_the_interrupt_checkpoint_is_said",
    "MLflow server stopped mid-run": "test_faults.py::test_mlflow_server_stopped_mid_run",
    "Ctrl-C while the model loads": "test_fault_phases.py::test_a_stop_at_any_phase_leaves_no_running_run[model-load]",
    "Ctrl-C before tracking starts": "test_fault_phases.py::test_a_stop_at_any_phase_leaves_no_running_run[before-tracker]",
    "Ctrl-C while tracking starts": "test_fault_phases.py::test_a_stop_at_any_phase_leaves_no_running_run[tracker-start]",
    "Ctrl-C just after tracking started": "test_fault_phases.py::test_a_stop_at_any_phase_leaves_no_running_run[after-tracker]",
    "Ctrl-C while the adapter is saved": "test_fault_phases.py::test_a_stop_at_any_phase_leaves_no_running_run[adapter-save]",
    "SIGKILL mid-training, then --resume": "test_resume.py::test_sigkill_then_resume_gives_the_same_adapter",
    "SIGTERM mid-training": "test_train_e2e.py::test_sigterm_ends_run_killed_and_leaves_no_adapter",
    "SIGINT during a sweep trial": "test_sweep.py::test_sigint_mid_sweep_then_resume_reruns_only_the_interrupted_and_unstarted_trials",
    "Ctrl-C while adopt copies an item": "test_adopt_faults.py::test_a_fault_during_adopt_apply_then_rerun_or_undo[ctrl-c copying an item]",
    "Ctrl-C between two adopted items": "test_adopt_faults.py::test_a_fault_during_adopt_apply_then_rerun_or_undo[ctrl-c between items]",
    "full disk while adopt copies an item": "test_adopt_faults.py::test_a_fault_during_adopt_apply_then_rerun_or_undo[disk full copying an item]",
    "Ctrl-C while adopt imports an MLflow run": "test_adopt_faults.py::test_a_fault_during_adopt_apply_then_rerun_or_undo[ctrl-c importing an MLflow run]",
    "a real SIGINT to an adopt process importing MLflow runs": "test_adopt_faults.py::test_sigint_during_the_mlflow_import_then_rerun",
    "a sweep interrupted between trials": "test_fault_kinds.py::test_a_sweep_interrupted_between_trials_resumes_without_rerunning",
    "the board's training subprocess killed": "test_fault_kinds.py::test_the_boards_training_subprocess_killed",
    "a profile interrupted while sampling": "test_fault_kinds.py::test_a_profile_interrupted_while_sampling_writes_nothing",
}


def test_the_fault_kind_list_is_honest():
    assert len(FAULT_KINDS) >= 15
    assert len(set(FAULT_KINDS.values())) == len(FAULT_KINDS), "one test listed for two kinds"
    for kind, where in FAULT_KINDS.items():
        file, _, rest = where.partition("::")
        func, _, param = rest.partition("[")
        source = (REPO / "tests" / file).read_text()
        names = {n.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}
        assert func in names, f"{kind}: {where} does not exist"
        if param:
            assert repr(param.rstrip("]")).strip("'") in source, f"{kind}: no parameter {param} in {file}"
    notes = (REPO / "docs" / "research_notes.md").read_text()
    missing = [k for k in FAULT_KINDS if f"| {k} |" not in notes]
    assert not missing, f"list these fault kinds in docs/research_notes.md: {missing}"


# --- a sweep interrupted between trials -----------------------------------------------------


@pytest.mark.slow  # three tiny trainings (~10 s on a busy 2-core machine): over the fast tier's budget
def test_a_sweep_interrupted_between_trials_resumes_without_rerunning(project, tracking_store, monkeypatch):
    """Ctrl-C arriving just after trial 0 was told to the study, before trial 1 starts: exit 130
    with the --resume line, trial 0 COMPLETE and no other trial begun (no trial RUNNING, no
    experiment folder for it), the parent run KILLED; --resume runs only the missing grid point."""
    import optuna
    from mlflow.tracking import MlflowClient

    from lora_project.sweep import runner

    args = ["sweep", "toddler_data", "--param", "lora.r=2,4", "--sampler", "grid", "--name", "s", "--no-progress",
            "--set", "training.max_steps=2", "--set", "training.eval_interval=0", "--set", "training.eval_max_tokens=64"]
    real = runner.keep_best_adapters

    def then_stop(sw, study):
        real(sw, study)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(runner, "keep_best_adapters", then_stop)
        stopped = run_cli(*args, cwd=project)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "--resume" in stopped.stderr.strip().splitlines()[-1]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{project / 'outputs' / 'sweeps' / 's' / 'study.db'}"
    study = optuna.load_study(study_name="s", storage=storage)
    states = [t.state.name for t in study.trials]  # the grid's other point may wait; none has begun
    assert states.count("COMPLETE") == 1 and set(states) <= {"COMPLETE", "WAITING"}, states
    assert [p.name for p in (project / "experiments").glob("exp_*_s_t*")] == [
        next((project / "experiments").glob("exp_*_s_t000")).name]
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]  # trial 0's run; the sweep's parent
    trained = snapshot(project / "adapters" / "s_t000_lora")

    resumed = run_cli(*args, "--resume", "--json", cwd=project)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    study = optuna.load_study(study_name="s", storage=storage)
    assert sorted(t.params["lora.r"] for t in study.trials if t.state.name == "COMPLETE") == [2, 4]
    assert len(study.trials) == 2 and len(list((project / "experiments").glob("exp_*_s_t000"))) == 1
    assert snapshot(project / "adapters" / "s_t000_lora") == trained  # not trained again


# --- the board's training subprocess killed ---------------------------------------------------


@pytest.mark.slow  # two real training processes
def test_the_boards_training_subprocess_killed(project):
    """SIGKILL to a training the board started (the OOM killer, a `kill -9`): the board shows the
    run as ended with its process gone, not RUNNING; nothing is left locked, so the same adapter
    trains again from the board; no adapter folder was half-written."""
    from lora_project.paths import ProjectPaths
    from lora_project.ui import state
    from lora_project.ui.jobs import TrainingJobs

    paths = ProjectPaths(project)
    jobs = TrainingJobs(paths)
    argv = ["train", "toddler_data", "--no-progress", "--no-mlflow", "--set", "training.max_steps=400",
            "--set", "training.eval_interval=0", "--set", "training.log_interval=1"]
    pid = jobs.start("toddler_data", argv)
    deadline = time.time() + 180
    while time.time() < deadline:
        views = state.live_views(paths)
        if views and views[0]["status"] == "RUNNING" and (views[0]["step"] or 0) >= 2:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the training did not start: " + jobs.log_tail("toddler_data"))
    os.kill(pid, signal.SIGKILL)
    while jobs.running():
        time.sleep(0.05)
    view = state.live_views(paths)[0]
    assert view["status"] == "ENDED (process gone)", view
    assert "toddler_data" not in state.locked_adapters(paths)
    assert not (project / "adapters" / "toddler_data_lora").exists()
    assert not [p for p in (project / "adapters").iterdir() if not p.name.startswith(".")]  # (a stale lock is)

    jobs.start("toddler_data", ["train", "toddler_data", "--no-progress", "--no-mlflow"])  # not refused as busy
    while jobs.running():
        time.sleep(0.1)
    assert (project / "adapters" / "toddler_data_lora" / "adapter_model.safetensors").is_file(), \
        jobs.log_tail("toddler_data")
    assert state.live_views(paths)[0]["status"] == "FINISHED"


# --- a profile interrupted while sampling -----------------------------------------------------


def test_a_profile_interrupted_while_sampling_writes_nothing(project, tiny_model_dir, monkeypatch):
    """Ctrl-C while the adapter's utterances are being sampled (the base's are done): exit 130 with
    one line, no profile JSON, samples or plot written, the loaded base given back without the
    adapter; the same command then runs through and equals a run that was never interrupted."""
    from test_inspection import make_adapter

    from lora_project.models import sampling

    adapter = make_adapter(tiny_model_dir, project / "adapters" / "p_lora", 1)
    meta = json.loads((adapter / "lora_project.json").read_text())
    meta["base_model"].pop("fingerprint")
    (adapter / "lora_project.json").write_text(json.dumps(meta))
    prepared = run_cli("prepare", "toddler_data", "--no-tokens", cwd=project)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    args = ["profile", "--dataset", "toddler_data", "--adapter", str(adapter), "--samples", "6", "--seed", "3",
            "--max-new-tokens", "4", "--no-mlflow", "--json"]
    real = sampling.generate_texts
    calls = {"n": 0}

    def stop_on_the_adapter(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the base is sampled in one chunk; the second call is the adapter's
            raise KeyboardInterrupt
        return real(*a, **k)

    metrics = project / "outputs" / "metrics"
    before = snapshot(project)
    with monkeypatch.context() as m:
        m.setattr(sampling, "generate_texts", stop_on_the_adapter)
        stopped = run_cli(*args, cwd=project)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert [ln for ln in stopped.stderr.splitlines() if ln.startswith("error:")] == ["error: interrupted"]
    assert snapshot(project) == before
    assert not list(metrics.glob("profile_*")) if metrics.is_dir() else True

    once = run_cli(*args, cwd=project)
    assert once.returncode == 0, once.stderr[-2000:]
    again = run_cli(*args, cwd=project)
    first, second = json.loads(once.stdout), json.loads(again.stdout)
    assert first["models"] == second["models"] and set(first["models"]) == {"base", "p_lora"}
