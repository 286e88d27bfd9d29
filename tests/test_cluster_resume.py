"""`train-batch --resume --cluster`: an interrupted adapter's checkpoint continues in a Ray task (real Ray on
127.0.0.1, tiny model), giving the bytes of an uninterrupted run and one MLflow run with every step once."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from test_batch import stop_kids_at_step_5
from test_cluster import loopback_cluster  # noqa: F401  (a fixture)

ONE_CPU = ["--set", "cluster.cpus_per_task=1"]
STEPS = ["--no-progress", "--set", "training.max_steps=10", "--set", "training.checkpoint_interval=5",
         "--set", "training.eval_interval=0", *ONE_CPU]


@pytest.mark.slow
@pytest.mark.parametrize("shared", ["false", "true"])
def test_an_interrupted_adapter_resumes_from_its_checkpoint_in_a_cluster_task(project, tracking_store, monkeypatch,
                                                                              shared):
    from mlflow.tracking import MlflowClient

    ref = run_cli("train-batch", "toddler_data", "kids", "--no-mlflow", "--name-template", "{dataset}_ref", *STEPS,
                  cwd=project)
    assert ref.returncode == 0, ref.stderr[-2000:]
    stop_kids_at_step_5(project, monkeypatch, STEPS)
    client = MlflowClient(tracking_uri=f"sqlite:///{tracking_store}")
    exp_id = client.get_experiment_by_name("tests").experiment_id
    killed = [r for r in client.search_runs([exp_id]) if r.data.tags.get("dataset") == "kids"]
    assert [r.info.status for r in killed] == ["KILLED"]
    proc = run_cli("train-batch", "toddler_data", "kids", "--resume", "--json", "--cluster", "local:1",
                   "--set", f"cluster.shared_filesystem={shared}", *STEPS, cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["dataset"]: r for r in json.loads(proc.stdout)["datasets"]}
    assert rows["toddler_data"]["status"] == "skipped" and rows["kids"]["status"] == "trained"
    exp = sorted(p.name for p in (project / "experiments").glob("exp_*_kids"))
    assert len(exp) == 1 and f"[kids] queued, resuming {exp[0]} from step 5" in proc.stderr, proc.stderr[-3000:]
    for name in ("toddler_data", "kids"):
        ours, theirs = (project / "adapters" / f"{n}_lora" / "adapter_model.safetensors" for n in (name, f"{name}_ref"))
        assert ours.read_bytes() == theirs.read_bytes(), f"{name}: the resumed task's adapter differs"
    # the interrupted run continued: one MLflow run for kids, FINISHED, each step once, params not doubled
    runs = [r for r in client.search_runs([exp_id]) if r.data.tags.get("dataset") == "kids"]
    assert [r.info.run_id for r in runs] == [killed[0].info.run_id] and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [2, 4, 6, 8, 10]
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_loss")] == [0, 10]
    assert runs[0].data.tags["cluster_node"] and runs[0].data.params["training.max_steps"] == "10"
    res = json.loads((project / "experiments" / exp[0] / "results.json").read_text())
    assert res["status"] == "FINISHED" and res["steps"] == 10 and res["mlflow_run_id"] == runs[0].info.run_id


@pytest.mark.slow
def test_a_task_retried_after_its_node_is_lost_resumes_from_its_mirrored_checkpoint(project, tracking_store,
                                                                                    loopback_cluster):
    """Shared filesystem (auto: the nodes see the driver's marker): the task mirrors each checkpoint to its folder
    in the project; once one is there, every worker node is removed; the retry on a new node continues from it
    (its log says so) with the metric points before it: the adapter's bytes equal a local run's and the MLflow run
    has every step once."""
    import time

    from test_cluster import _adapter_bytes, _check_runs, _reference_then_driver_on_auto, _stop

    cluster, workers, small = loopback_cluster
    longer = ["--set", "training.max_steps=150", "--set", "training.eval_interval=50",
              "--set", "training.checkpoint_interval=10"]
    ref, driver = _reference_then_driver_on_auto(project, longer)
    mirrors = project / "outputs" / "cluster_tasks"
    try:
        deadline = time.monotonic() + 120
        while not list(mirrors.glob("toddler_data-*/latest/outputs/checkpoints/*/step_*")):
            assert driver.poll() is None and time.monotonic() < deadline, "no checkpoint mirrored"
            time.sleep(0.05)
        cluster.add_node(num_cpus=1, **small)  # somewhere to go
        for node in workers:
            cluster.remove_node(node, allow_graceful=False)  # the task's node is one of them
        out, err = driver.communicate(timeout=300)
    finally:
        _stop(driver)
    assert driver.returncode == 0, err[-3000:]
    assert "shared filesystem" in err and "retried, running on" in err, err[-3000:]
    summary = json.loads(out)
    assert summary["datasets"][0]["status"] == "trained"
    exp = project / "experiments" / sorted(p.name for p in (project / "experiments").glob("exp_*_toddler_data"))[-1]
    assert "continuing from the checkpoint of step " in (exp / "logs" / "task.log").read_text()
    assert _adapter_bytes(project) == ref
    _check_runs(project, summary, 1, steps=150, eval_every=50)  # every loss and val_loss step exactly once
    assert not list(mirrors.iterdir())  # the task's folder is removed once its result is recorded
