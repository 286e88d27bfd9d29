"""training.keep_best and training.early_stopping_patience through the run lifecycle (tiny model)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_user_error, run_cli
from safetensors.torch import load_file


def _scripted_validation(monkeypatch, losses: list[float]):
    """Real validation scoring, with the loss of call i replaced by losses[i] (0 = before training)."""
    import lora_project.training.single as run_module

    real = run_module.validation_metrics
    calls = []

    def scripted(*args, **kwargs):
        m = real(*args, **kwargs)
        loss = losses[len(calls)]
        calls.append(loss)
        return dict(m, val_loss=loss, val_perplexity=math.exp(loss))

    monkeypatch.setattr(run_module, "validation_metrics", scripted)
    return calls


@pytest.mark.slow  # a tiny end-to-end training; the BestCheckpoint callback has a fast unit test
def test_early_stopping_keeps_the_best_adapter_and_records_why(project, tracking_store, monkeypatch):
    # before, steps 2, 4 (best), 6, 8 (second evaluation without improvement: stop), final at step 8
    calls = _scripted_validation(monkeypatch, [5.0, 4.0, 3.5, 3.6, 3.7, 3.8])
    proc = run_cli("train", "toddler_data", "--json", "--no-progress", "--set", "training.max_steps=20",
                   "--set", "training.eval_interval=2", "--set", "training.keep_best=true",
                   "--set", "training.early_stopping_patience=2", "--set", "training.checkpoint_interval=4",
                   "--set", "training.keep_checkpoints=20", "--set", "training.warmup_steps=0", cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(calls) == 6
    res = json.loads(proc.stdout)
    assert res["status"] == "FINISHED" and res["steps"] == 8
    assert res["stop_reason"].startswith("early stopping: validation loss did not improve for 2 evaluations")
    assert res["best"] == {"best_step": 4, "best_val_loss": 3.5, "kept": "best"}
    assert res["metrics_after"]["loss"] == 3.5 and res["metrics_last_step"]["loss"] == 3.8
    assert [e["step"] for e in res["evals"]] == [0, 2, 4, 6, 8, 8]
    # The saved adapter holds the weights of step 4 (its checkpoint), not those of step 8.
    ckpts = project / "outputs" / "checkpoints" / "exp_001_toddler_data"
    saved = load_file(str(project / "adapters" / "toddler_data_lora" / "adapter_model.safetensors"))
    at4, at8 = (load_file(str(ckpts / f"step_{s:06d}" / "adapter.safetensors"))
                if (ckpts / f"step_{s:06d}").is_dir() else None for s in (4, 8))
    assert at4 is not None, sorted(p.name for p in ckpts.iterdir())
    at4 = {k.replace(".default", ""): v for k, v in at4.items()}
    assert set(saved) == set(at4) and all(torch.equal(saved[k], at4[k]) for k in saved)
    assert any(not torch.equal(saved[k.replace(".default", "")], v) for k, v in at8.items())
    meta = json.loads((project / "adapters" / "toddler_data_lora" / "lora_project.json").read_text())
    assert meta["final_metrics"]["after"]["loss"] == 3.5
    log = [json.loads(x) for x in (project / "experiments" / "exp_001_toddler_data" / "logs" / "metrics.jsonl")
           .read_text().splitlines()]
    assert log[-1]["event"] == "end" and log[-1]["status"] == "FINISHED" and log[-1]["step"] == 8
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}").get_run(res["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["best_step"] == 4
    assert run.data.metrics["best_val_loss"] == 3.5 and run.data.tags["kept_checkpoint"] == "best"
    assert run.data.tags["stop_reason"].startswith("early stopping")


def test_best_checkpoint_callback_keeps_last_when_last_is_best():
    from lora_project.training.callbacks import BestCheckpoint, TrainState

    model = torch.nn.Linear(2, 2)
    best = BestCheckpoint(keep=True, patience=None)
    state = TrainState(10, 1)
    state.model = model
    for step, loss in [(2, 4.0), (4, 3.0)]:
        state.step = step
        with torch.no_grad():
            model.weight.fill_(step)
        best.on_eval(state, {"val_loss": loss})
    assert state.stop_reason is None  # no patience: never stops
    with torch.no_grad():
        model.weight.fill_(6)
    assert best.consider(6, {"val_loss": 2.5}, model) and best.record(6) == {"best_step": 6, "best_val_loss": 2.5,
                                                                             "kept": "last"}
    with torch.no_grad():
        model.weight.fill_(7)
    assert best.restore(model) and torch.all(model.weight == 6)  # the copy taken at step 6, not a reference
    stopper = BestCheckpoint(keep=False, patience=1)
    state.stop_reason = None
    for step, loss in [(2, 3.0), (4, 3.0)]:  # equal is no improvement
        state.step = step
        stopper.on_eval(state, {"val_loss": loss})
    assert "did not improve for 1 evaluations (best 3.0000 at step 2)" in state.stop_reason
    assert not stopper.restore(model) and stopper.record(4)["kept"] == "last"


def test_settings_that_cannot_work_are_refused_before_training(project):
    assert_user_error(run_cli("train", "kids", "--set", "training.eval_interval=0", "--set",
                              "training.early_stopping_patience=3", cwd=project),
                      "training.early_stopping_patience needs periodic evaluations")
    assert_user_error(run_cli("train", "kids", "--set", "training.eval_interval=0", "--set",
                              "training.keep_best=true", cwd=project), "training.keep_best needs periodic evaluations")
    assert not (project / "adapters" / "kids_lora").exists() and not (project / "experiments").exists()


@pytest.mark.parametrize("value", ["0", "two"])
def test_patience_must_be_a_positive_integer(project, value):
    assert_user_error(run_cli("train", "kids", "--set", f"training.early_stopping_patience={value}", cwd=project),
                      "training.early_stopping_patience")
