"""Locks, tracking URI, long MLflow params, and failed checkpoint writes."""

from __future__ import annotations

import fcntl
import json

import pytest
from conftest import assert_user_error, copy_tracking_store, run_cli, snapshot


def test_second_training_of_same_adapter_stops_at_once(project):
    lock = project / "adapters" / ".toddler_data_lora.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running training holds it
        before = snapshot(project)
        proc = run_cli("train", "toddler_data", "--no-mlflow", cwd=project)
        assert_user_error(proc, "being trained by another process")
    assert not (project / "experiments").exists() or not any((project / "experiments").iterdir())
    assert {k: v for k, v in snapshot(project).items() if k in before} == before


@pytest.mark.fresh_store
def test_mlflow_tracking_uri_env_is_honoured(project, tmp_path, tracking_store_template):
    # the store the variable names exists already (its creation is test_train_writes_adapter_..._run's point)
    other = copy_tracking_store(tracking_store_template, tmp_path / "elsewhere.db", str(tmp_path / "elsewhere"))
    proc = run_cli("train", "toddler_data", "--json", "--no-progress", cwd=project,
                   env={"MLFLOW_TRACKING_URI": f"sqlite:///{other}"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_id = json.loads(proc.stdout)["mlflow_run_id"]
    from mlflow.tracking import MlflowClient

    assert MlflowClient(tracking_uri=f"sqlite:///{other}").get_run(run_id).info.status == "FINISHED"
    assert not (project / "mlruns" / "mlflow.db").exists()


def test_long_param_values_are_truncated_not_fatal(tmp_path, tracking_store_template):
    from mlflow.tracking import MlflowClient

    from lora_project.paths import ProjectPaths
    from lora_project.utils.mlflow_utils import PARAM_MAX_CHARS, MlflowTracker

    paths = ProjectPaths(tmp_path)
    copy_tracking_store(tracking_store_template, paths.mlruns_dir / "mlflow.db", str(paths.mlruns_dir / "0"))
    tracker = MlflowTracker(paths, "t")
    run_id = tracker.start("r", {"long": "x" * 10_000, "short": 1}, {})
    assert tracker.failed is None and run_id
    tracker.end("FINISHED")
    params = MlflowClient(tracking_uri=tracker.uri).get_run(run_id).data.params
    assert len(params["long"]) == PARAM_MAX_CHARS and params["long"].endswith("...[truncated]")
    assert params["short"] == "1"


def test_failed_checkpoint_write_keeps_previous_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    import dataclasses

    import numpy as np
    from transformers import AutoModelForCausalLM

    from lora_project.config import LoraSection, TrainingSection
    from lora_project.models.lora_model import wrap_with_lora
    from lora_project.training import checkpoint as ckpt_mod
    from lora_project.training.trainer import BlockLoader, LoraTrainer
    from lora_project.utils.device import resolve_runtime

    model = wrap_with_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraSection(r=2, alpha=4), 0)
    cfg = dataclasses.replace(TrainingSection(), max_steps=4, batch_size=2, seq_len=8, warmup_steps=0)
    cb = ckpt_mod.CheckpointCallback(tmp_path / "ck", interval=2, keep=3, meta={})
    trainer = LoraTrainer(model, cfg, BlockLoader(np.arange(3, 200, dtype=np.uint16), 8, 2, 0),
                          resolve_runtime("cpu", "fp32", 1), [cb])
    import safetensors.torch as st

    real_save_file = st.save_file
    calls = {"n": 0}

    def flaky(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the second checkpoint's second file: fail mid-checkpoint
            raise OSError(28, "No space left on device")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(st, "save_file", flaky)
    with pytest.raises(OSError, match="No space left"):
        trainer.fit()
    good = ckpt_mod.list_checkpoints(tmp_path / "ck")
    assert [p.name for p in good] == ["step_000002"]
    info, weights, tensors = ckpt_mod.load_checkpoint(good[0])
    assert info["step"] == 2 and weights and "rng.torch" in tensors
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".")]  # no temp folder left


def test_unreachable_tracking_server_warns_and_training_finishes(project):
    import socket

    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # no retry settings: the probe must give up at once by itself (MLflow's defaults retry for minutes)
    proc = run_cli("train", "toddler_data", "--json", "--no-progress", cwd=project,
                   env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: MLflow tracking stopped" in proc.stderr and "Traceback" not in proc.stderr
    assert "cannot reach the MLflow server" in proc.stderr
    res = json.loads(proc.stdout)
    assert res["status"] == "FINISHED" and res["mlflow_run_id"] is None
    log = (project / "experiments" / "exp_001_toddler_data" / "logs" / "metrics.jsonl").read_text()
    assert '"event": "train"' in log and (project / "adapters" / "toddler_data_lora").is_dir()


def test_adapter_lock_is_exclusive_and_leaves_no_lock_file(tmp_path):
    from lora_project.errors import UserError
    from lora_project.paths import ProjectPaths
    from lora_project.training.lifecycle import adapter_lock

    paths = ProjectPaths(tmp_path)
    lock = paths.adapters_dir / ".kid_lora.lock"
    with adapter_lock(paths, "kid"):
        assert lock.is_file()
        with pytest.raises(UserError, match="being trained by another process"):
            with adapter_lock(paths, "kid"):
                pass
        assert lock.is_file()  # the refused second holder did not remove the first one's lock
    assert not lock.exists()  # released: no lock file left for every adapter name ever tried
    with adapter_lock(paths, "kid"):  # and it can be taken again
        assert lock.is_file()


@pytest.mark.slow  # real MLflow store rebuilt twice: kept out of make test-fast's 2 minutes
def test_half_created_tracking_store_is_moved_aside_and_rebuilt(tmp_path, capsys):
    import sqlite3

    from mlflow.tracking import MlflowClient

    from lora_project.paths import ProjectPaths
    from lora_project.utils.mlflow_utils import MlflowTracker, default_tracking_uri

    paths = ProjectPaths(tmp_path)
    db = paths.mlruns_dir / "mlflow.db"
    db.parent.mkdir(parents=True)
    MlflowClient(tracking_uri=default_tracking_uri(paths)).search_experiments()  # a complete store ...
    con = sqlite3.connect(db)
    con.execute("DELETE FROM alembic_version")  # ... whose creation was cut before it was stamped
    con.commit()
    con.close()
    tracker = MlflowTracker(paths, "exp")
    run_id = tracker.start("r", {"a": 1}, {})
    assert run_id and tracker.failed is None, tracker.failed
    tracker.end("FINISHED")
    assert "half-created" in capsys.readouterr().err
    assert [p.name for p in paths.mlruns_dir.glob("mlflow.db.broken-*")]  # moved aside, not deleted
    assert MlflowClient(tracking_uri=default_tracking_uri(paths)).get_run(run_id).info.status == "FINISHED"
    tracker = MlflowTracker(paths, "exp")  # the rebuilt store is healthy: no second warning
    assert tracker.start("r2", {}, {}) and "half-created" not in capsys.readouterr().err
    tracker.end("FINISHED")
