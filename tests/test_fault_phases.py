"""A stop or a full disk at every phase of a training run.

Each case injects the fault in this process (the CLI runs in-process, see conftest.run_cli) at
one phase and checks the end state that a user and MLflow see: the exit code and its one line,
no MLflow run left RUNNING, a results.json that says what happened when an experiment folder
exists, and no adapter half-written.
"""

from __future__ import annotations

import errno
import json

import pytest
from conftest import run_cli


def _runs(project):
    from mlflow.tracking import MlflowClient

    db = project / "mlruns" / "mlflow.db"
    if not db.exists():
        return []
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def _results(project):
    found = sorted((project / "experiments").glob("exp_*/results.json")) if (project / "experiments").is_dir() else []
    return [json.loads(p.read_text()) for p in found]


def _stop(*_a, **_k):
    raise KeyboardInterrupt


def _disk_full(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def _after(original, fault):
    """Run the real function, then the fault: a stop that arrives just after it returned."""
    def wrapper(*a, **k):
        original(*a, **k)
        fault()
    return wrapper


PHASES = ["model-load", "before-tracker", "tracker-start", "after-tracker", "adapter-save"]


@pytest.mark.parametrize("phase", PHASES)
def test_a_stop_at_any_phase_leaves_no_running_run(phase, project, tracking_store, monkeypatch):
    from lora_project.models import base_model, lora_model
    from lora_project.training import lifecycle
    from lora_project.utils.mlflow_utils import MlflowTracker

    if phase == "model-load":
        monkeypatch.setattr(base_model, "load_model", _stop)
    elif phase == "before-tracker":
        monkeypatch.setattr(lifecycle, "provenance_of", _stop)
    elif phase == "tracker-start":  # the deferred stop is raised as the shielded start() returns
        monkeypatch.setattr(MlflowTracker, "start", _after(MlflowTracker.start, _stop))
    elif phase == "after-tracker":
        monkeypatch.setattr(lora_model, "wrap_with_lora", _stop)
    elif phase == "adapter-save":
        monkeypatch.setattr(lora_model, "save_adapter", _stop)
    proc = run_cli("train", "toddler_data", "--no-progress", cwd=project)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")][0].startswith("error: interrupted")
    assert "Traceback" not in proc.stderr
    runs = _runs(project)
    assert all(r.info.status != "RUNNING" for r in runs), [r.info.status for r in runs]
    results = _results(project)
    if phase in ("model-load",):
        assert not results and not runs  # nothing was opened yet
    else:
        assert [r["status"] for r in results] == ["KILLED"], results
        if phase in ("tracker-start", "after-tracker", "adapter-save"):
            assert [r.info.status for r in runs] == ["KILLED"]
            assert results[0]["mlflow_run_id"] == runs[0].info.run_id
    assert not (project / "adapters" / "toddler_data_lora").exists()


def test_a_full_disk_at_the_adapter_save_fails_the_run_cleanly(project, tracking_store, monkeypatch):
    from lora_project.models import lora_model

    monkeypatch.setattr(lora_model, "save_adapter", _disk_full)
    proc = run_cli("train", "toddler_data", "--no-progress", cwd=project)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "No space left on device" in proc.stderr and "Traceback" not in proc.stderr
    assert [r["status"] for r in _results(project)] == ["FAILED"]
    assert [r.info.status for r in _runs(project)] == ["FAILED"]
    assert not (project / "adapters" / "toddler_data_lora").exists()


def _ctrl_c_at_micro_step(monkeypatch, n: int):
    """Ctrl-C during the n-th micro-step of training; returns the real micro_step."""
    from lora_project.training import trainer

    calls = {"n": 0}
    real_step = trainer.LoraTrainer.micro_step

    def micro_step(self, *a):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real_step(self, *a)

    monkeypatch.setattr(trainer.LoraTrainer, "micro_step", micro_step)
    return real_step


def test_a_full_disk_at_the_interrupt_checkpoint_is_said(project, monkeypatch):
    from lora_project.training import checkpoint

    _ctrl_c_at_micro_step(monkeypatch, 3)
    monkeypatch.setattr(checkpoint.CheckpointCallback, "save", _disk_full)
    proc = run_cli("train", "toddler_data", "--no-progress", "--no-mlflow", cwd=project)
    assert proc.returncode == 130, proc.stderr[-2000:]
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "no checkpoint was written (writing it failed: No space left on device)" in line[0]
    assert [r["status"] for r in _results(project)] == ["KILLED"]


def test_an_interrupted_run_names_its_checkpoint_and_the_resume_command(project, monkeypatch):
    from lora_project.training import trainer

    real_step = _ctrl_c_at_micro_step(monkeypatch, 4)
    proc = run_cli("train", "toddler_data", "--no-progress", "--no-mlflow", "--adapter-name", "kid", cwd=project)
    assert proc.returncode == 130
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")][0]
    assert "checkpoint of step 3" in line and "lora-project train toddler_data --adapter-name kid --resume" in line
    monkeypatch.setattr(trainer.LoraTrainer, "micro_step", real_step)
    resumed = run_cli("train", "toddler_data", "--no-progress", "--no-mlflow", "--adapter-name", "kid", "--resume",
                      "--json", cwd=project)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout)["steps"] == 6
