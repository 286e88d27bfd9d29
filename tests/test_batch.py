"""train-batch: base loaded once, failures recorded, skips, nested MLflow runs, per-dataset overrides."""

from __future__ import annotations

import pytest

import json

from conftest import assert_user_error, run_cli


@pytest.mark.slow  # several trainings in one test: kept out of make test-fast's 2 minutes
def test_batch_over_three_datasets_with_one_broken(project, tracking_store):
    with open(project / "config" / "dataset_catalog.csv", "a") as fh:
        fh.write("broken,local,data/raw/missing.txt,lines,,,,a dataset whose file is missing,,0.8/0.1/0.1,true\n")
    (project / "config" / "batch_config.yaml").write_text("datasets:\n  kids:\n    training: {max_steps: 4}\n")
    proc = run_cli("train-batch", "--all", "--no-progress", "--json", cwd=project)
    assert proc.returncode == 2, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    rows = {r["dataset"]: r for r in summary["datasets"]}
    assert [r["dataset"] for r in summary["datasets"]] == ["toddler_data", "kids", "broken"]
    assert rows["toddler_data"]["status"] == rows["kids"]["status"] == "trained"
    assert rows["toddler_data"]["steps"] == 6 and rows["kids"]["steps"] == 4  # per-dataset override
    assert rows["broken"]["status"] == "failed" and "missing.txt" in rows["broken"]["reason"]
    assert "broken:" in proc.stderr and "failed" in proc.stderr.splitlines()[-1]
    assert "loaded once for 3 dataset(s)" in proc.stderr
    assert sorted(p.name for p in (project / "adapters").iterdir() if p.is_dir()) == ["kids_lora", "toddler_data_lora"]
    md = (project / "outputs" / "metrics").glob("train_batch_*.md")
    assert "broken" in next(md).read_text()
    # MLflow: a FAILED parent (one dataset failed) with two finished children.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FAILED"
    exp = client.get_experiment_by_name("tests")
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    assert sorted(c.data.tags["dataset"] for c in children) == ["kids", "toddler_data"]
    assert all(c.info.status == "FINISHED" for c in children)

    # Second run: both adapters are up to date and skipped; changing a setting retrains only that one.
    proc = run_cli("train-batch", "toddler_data", "kids", "--no-progress", "--no-mlflow", "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["status"] for r in json.loads(proc.stdout)["datasets"]] == ["skipped", "skipped"]
    (project / "config" / "batch_config.yaml").write_text("datasets:\n  kids:\n    training: {max_steps: 5}\n")
    proc = run_cli("train-batch", "toddler_data", "kids", "--no-progress", "--no-mlflow", "--json", cwd=project)
    rows = {r["dataset"]: r for r in json.loads(proc.stdout)["datasets"]}
    assert rows["toddler_data"]["status"] == "skipped"
    assert rows["kids"]["status"] == "failed" and "--overwrite" in rows["kids"]["reason"]
    proc = run_cli("train-batch", "kids", "--overwrite", "--no-progress", "--no-mlflow", "--json", cwd=project)
    assert proc.returncode == 0 and json.loads(proc.stdout)["datasets"][0]["steps"] == 5


def test_batch_bad_input(project):
    from conftest import assert_user_error

    assert_user_error(run_cli("train-batch", cwd=project), "at least one dataset")
    assert_user_error(run_cli("train-batch", "kidz", cwd=project), "did you mean 'kids'")
    (project / "config" / "batch_config.yaml").write_text("datasets:\n  kids:\n    training: {max_step: 4}\n")
    assert_user_error(run_cli("train-batch", "kids", cwd=project), "training.max_step", "did you mean 'max_steps'")


@pytest.mark.slow  # a real process (or the full quick benchmark): kept out of make test-fast
def test_fused_training_equals_sequential(project, tracking_store):
    import shutil

    from safetensors.torch import load_file

    (project / "config" / "batch_config.yaml").write_text(
        "datasets:\n  kids:\n    training: {seed: 7, lr: 0.02}\n    lora: {r: 2, alpha: 4}\n")
    seq = run_cli("train-batch", "toddler_data", "kids", "--no-progress", "--json", cwd=project)
    assert seq.returncode == 0, seq.stderr[-3000:]
    shutil.move(project / "adapters", project / "adapters_seq")
    fused = run_cli("train-batch", "toddler_data", "kids", "--fused", "--no-progress", "--json", cwd=project)
    assert fused.returncode == 0, fused.stderr[-3000:]
    assert "fused training of 2 adapter(s)" in fused.stderr
    for name in ("toddler_data", "kids"):
        a = load_file(project / "adapters_seq" / f"{name}_lora" / "adapter_model.safetensors")
        b = load_file(project / "adapters" / f"{name}_lora" / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] - b[k]).abs().max() <= 1e-5 * max(1.0, float(a[k].abs().max())), (name, k)
        meta = json.loads((project / "adapters" / f"{name}_lora" / "lora_project.json").read_text())
        assert meta["fused_with"] == ["toddler_data", "kids"]
    rows = {r["dataset"]: r for r in json.loads(fused.stdout)["datasets"]}
    seq_rows = {r["dataset"]: r for r in json.loads(seq.stdout)["datasets"]}
    for n in rows:
        assert rows[n]["status"] == "trained" and rows[n]["steps"] == seq_rows[n]["steps"]
        assert rows[n]["perplexity_after"] == seq_rows[n]["perplexity_after"] or \
            abs(rows[n]["perplexity_after"] / seq_rows[n]["perplexity_after"] - 1) < 1e-4


def test_fused_refuses_unequal_shapes(project):
    (project / "config" / "batch_config.yaml").write_text("datasets:\n  kids:\n    training: {seq_len: 8}\n")
    proc = run_cli("train-batch", "toddler_data", "kids", "--fused", "--no-progress", "--no-mlflow", "--json",
                   cwd=project)
    assert_user_error(proc, "training.seq_len differs")  # refused from the configs, before any training


def test_batch_resume_without_a_checkpoint_says_it_trains_from_step_0(project):
    proc = run_cli("train-batch", "kids", "--resume", "--no-progress", "--no-mlflow", "--set",
                   "training.max_steps=2", cwd=project)
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = (proc.stdout + proc.stderr).splitlines()
    assert sum("--resume: no checkpoint of this adapter; it trains from step 0" in line for line in said) == 1
    assert (project / "adapters" / "kids_lora" / "adapter_model.safetensors").is_file()


def test_batch_resume_arguments_are_refused_together(project):
    assert_user_error(run_cli("train-batch", "kids", "--resume", "--overwrite", cwd=project), "--resume", "--overwrite")
    assert_user_error(run_cli("train-batch", "kids", "--resume", "--fused", cwd=project), "--resume", "--fused")
    assert_user_error(run_cli("train-batch", "kids", "--resume", "--overwrite", "--cluster", "local:1", cwd=project),
                      "--resume", "--overwrite")


def stop_kids_at_step_5(project, monkeypatch, args) -> None:
    """A local `train-batch toddler_data kids ARGS` whose second adapter (kids) is stopped right after its
    step-5 checkpoint, as SIGTERM's handler stops it (exit 130); used by the cluster resume tests too."""
    import signal

    from lora_project.training import checkpoint
    from lora_project.utils import interrupts

    real_on_step_end = checkpoint.CheckpointCallback.on_step_end

    def stop(self, state, metrics):
        real_on_step_end(self, state, metrics)
        if state.step == 5 and "kids" in self.folder.name:
            interrupts.handle_signal(signal.SIGTERM, None)

    with monkeypatch.context() as m:
        m.setattr(checkpoint.CheckpointCallback, "on_step_end", stop)
        stopped = run_cli("train-batch", "toddler_data", "kids", *args, cwd=project)
    assert stopped.returncode == 130, stopped.stderr[-2000:]


def test_an_interrupted_batch_resumed_gives_the_uninterrupted_adapters(project, monkeypatch):
    """toddler_data finishes, kids is stopped right after its step-5 checkpoint (what SIGTERM's handler
    does); train-batch --resume skips toddler_data and continues kids from step 5 in its experiment folder:
    the adapters' bytes equal an uninterrupted batch's."""
    steps = ["--no-progress", "--no-mlflow", "--set", "training.max_steps=10", "--set",
             "training.checkpoint_interval=5", "--set", "training.eval_interval=0"]
    ref = run_cli("train-batch", "toddler_data", "kids", "--name-template", "{dataset}_ref", *steps, cwd=project)
    assert ref.returncode == 0, ref.stderr[-2000:]
    stop_kids_at_step_5(project, monkeypatch, steps)
    assert not (project / "adapters" / "kids_lora").exists()
    resumed = run_cli("train-batch", "toddler_data", "kids", "--resume", "--json", *steps, cwd=project)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = {r["dataset"]: r for r in json.loads(resumed.stdout)["datasets"]}
    assert rows["toddler_data"]["status"] == "skipped" and rows["kids"]["status"] == "trained"
    exp = sorted(p.name for p in (project / "experiments").glob("exp_*_kids"))
    assert f"resuming {exp[-1]} from step 5" in resumed.stderr and len(exp) == 1
    for name in ("toddler_data", "kids"):
        ours, theirs = (project / "adapters" / f"{n}_lora" / "adapter_model.safetensors"
                        for n in (name, f"{name}_ref"))
        assert ours.read_bytes() == theirs.read_bytes(), f"{name}: resumed batch differs"
