"""Checkpoints and exact resume: SIGKILL mid-run, then --resume, equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import assert_user_error, run_cli
from safetensors.torch import load_file

STEPS = ["--set", "training.max_steps=150", "--set", "training.checkpoint_interval=5",
         "--set", "training.keep_checkpoints=2", "--set", "training.eval_interval=0"]


def _weights(project, name):
    return load_file(project / "adapters" / f"{name}_lora" / "adapter_model.safetensors")


@pytest.mark.slow  # a real process killed mid-run, then resumed: 150 steps twice
def test_sigkill_then_resume_gives_the_same_adapter(project, tracking_store):
    from mlflow.tracking import MlflowClient

    ref = run_cli("train", "toddler_data", "--adapter-name", "ref", "--no-progress", *STEPS, cwd=project)
    assert ref.returncode == 0, ref.stderr[-2000:]

    proc = subprocess.Popen([sys.executable, "-m", "lora_project", "train", "toddler_data", "--no-progress",
                             *STEPS], cwd=project, env=dict(os.environ), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    ckpt_root = project / "outputs" / "checkpoints" / "exp_002_toddler_data"
    deadline = time.time() + 120
    while not (ckpt_root / "step_000010").is_dir():
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-1000:]
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (project / "adapters" / "toddler_data_lora").exists()
    kept = sorted(p.name for p in ckpt_root.iterdir() if p.name.startswith("step_"))
    assert 1 <= len(kept) <= 3  # last K kept (+ at most one being written when killed)

    resumed = run_cli("train", "toddler_data", "--resume", "--no-progress", "--json", *STEPS, cwd=project)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming exp_002_toddler_data from step" in resumed.stderr
    res = json.loads(resumed.stdout)
    assert res["experiment_dir"].endswith("exp_002_toddler_data") and res["steps"] == 150
    a, b = _weights(project, "ref"), _weights(project, "toddler_data")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), "resume is not exact"
    # The MLflow run continues: one run, finished, with the loss history of both halves.
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(res["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert set(steps) == set(range(2, 151, 2))  # log_interval 2; steps after the checkpoint logged again


def test_resume_without_a_checkpoint_is_refused(project):
    assert_user_error(run_cli("train", "toddler_data", "--resume", cwd=project), "no checkpoint to resume")


@pytest.mark.slow  # a real process stopped by SIGTERM, then resumed
def test_resume_is_refused_for_changed_config(project):
    proc = subprocess.Popen([sys.executable, "-m", "lora_project", "train", "toddler_data", "--no-progress",
                             "--no-mlflow", *STEPS], cwd=project, env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_root = project / "outputs" / "checkpoints" / "exp_001_toddler_data"
    deadline = time.time() + 120
    while not (ckpt_root / "step_000005").is_dir():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)  # SIGTERM: a clean stop that also checkpoints
    proc.wait(timeout=60)
    assert proc.returncode == 130
    proc = run_cli("train", "toddler_data", "--resume", "--no-mlflow", *STEPS, "--set", "training.lr=0.02",
                   cwd=project)
    assert_user_error(proc, "different config", "training.lr")


def test_stop_then_resume_in_process_gives_the_same_adapter(project, monkeypatch):
    """The fast tier's resume check: a stop request (what SIGTERM's handler does) lands right
    after the step-5 checkpoint; the command exits 130, a changed config is refused, and
    --resume then ends with the weights of an uninterrupted run."""
    from lora_project.training import checkpoint
    from lora_project.utils import interrupts

    steps = ["--no-progress", "--no-mlflow", "--set", "training.max_steps=10", "--set", "training.checkpoint_interval=5",
             "--set", "training.eval_interval=0"]
    ref = run_cli("train", "toddler_data", "--adapter-name", "ref", *steps, cwd=project)
    assert ref.returncode == 0, ref.stderr[-2000:]
    real_on_step_end = checkpoint.CheckpointCallback.on_step_end

    def stop_after_step_5(self, state, metrics):
        real_on_step_end(self, state, metrics)
        if state.step == 5:
            interrupts.handle_signal(signal.SIGTERM, None)

    with monkeypatch.context() as m:
        m.setattr(checkpoint.CheckpointCallback, "on_step_end", stop_after_step_5)
        stopped = run_cli("train", "toddler_data", *steps, cwd=project)
    assert stopped.returncode == 130 and "error: interrupted" in stopped.stderr, stopped.stderr[-2000:]
    assert not (project / "adapters" / "toddler_data_lora").exists()
    assert_user_error(run_cli("train", "toddler_data", "--resume", *steps, "--set", "training.lr=0.02", cwd=project),
                      "different config", "training.lr")
    six = [a for k, v in (("lr", "0.02"), ("weight_decay", "0.1"), ("warmup_steps", "3"), ("adam_beta1", "0.8"),
                          ("adam_beta2", "0.99"), ("min_lr_ratio", "0.2")) for a in ("--set", f"training.{k}={v}")]
    assert_user_error(run_cli("train", "toddler_data", "--resume", *steps, *six, cwd=project),
                      "different config", "and 1 more")  # issue 31: 5 of 6 were listed, the 6th unsaid
    resumed = run_cli("train", "toddler_data", "--resume", "--json", *steps, cwd=project)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming exp_002_toddler_data from step 5" in resumed.stderr
    a, b = _weights(project, "ref"), _weights(project, "toddler_data")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), "resume is not exact"
