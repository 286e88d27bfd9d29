"""`--cluster ADDRESS` (Ray scale-out): arguments and config in the fast tier (no Ray started);
byte-identity with a local train-batch, faults and storage modes on real Ray clusters on loopback
in the slow tier (tiny models, a few steps each)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, assert_user_error, run_cli

ONE_CPU = ["--set", "cluster.cpus_per_task=1"]  # the tiny projects train with training.threads: 1

# --- fast: parsing, config, refusals before Ray ---------------------------------------------------


def test_address_forms_parse():
    from lora_project.cluster.address import parse_address

    a = parse_address("local:3")
    assert (a.kind, a.tasks, a.ray_address) == ("local", 3, None)
    a = parse_address("ray://head.example:10001")
    assert (a.kind, a.host, a.port, a.ray_address) == ("client", "head.example", 10001, "ray://head.example:10001")
    assert parse_address("ray://head").port == 10001
    a = parse_address("127.0.0.1:6379")
    assert (a.kind, a.ray_address) == ("gcs", "127.0.0.1:6379")
    a = parse_address("auto", {"RAY_ADDRESS": "ray://10.1.2.3:10001"})
    assert (a.kind, a.host, a.port) == ("client", "10.1.2.3", 10001) and "RAY_ADDRESS" in a.text


@pytest.mark.parametrize("bad, words", [
    ("local:0", "local:N needs N from 1"), ("local:x", "local:N"), ("http://h:1", "only ray://"),
    ("h:99999", "port must be 1 to 65535"), ("", "expected auto"), ("a b", "expected auto")])
def test_bad_addresses_are_one_line(project, bad, words):
    proc = run_cli("train-batch", "--all", "--cluster", bad, cwd=project)
    assert_user_error(proc, words)


def test_auto_without_a_cluster_is_one_line(project, monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "no-ray"))
    assert_user_error(run_cli("train-batch", "--all", "--cluster", "auto", *ONE_CPU, cwd=project), "no running cluster found")


def test_unreachable_cluster_is_one_line_within_10_s(project, monkeypatch):
    """Nothing listens on the port: refused by the socket probe, before Ray is imported."""
    with socket.socket() as s:  # a free loopback port, closed again: nothing accepts there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    t0 = time.perf_counter()
    proc = run_cli("train-batch", "--all", "--no-progress", "--cluster", "auto", *ONE_CPU, cwd=project)
    assert time.perf_counter() - t0 < 10
    assert_user_error(proc, "cannot reach the Ray cluster", f"127.0.0.1:{port}")
    proc = run_cli("train-batch", "--all", "--no-progress", "--cluster", f"ray://127.0.0.1:{port}", *ONE_CPU,
                   cwd=project)
    assert_user_error(proc, "cannot reach the Ray cluster")


def test_cluster_config_section_is_validated(project):
    for setting, words in (("cluster.cpus_per_task=0", "cluster.cpus_per_task: must be >= 1"),
                           ("cluster.max_retries=-1", "cluster.max_retries: must be >= 0"),
                           ("cluster.shared_filesystem=maybe", "cluster.shared_filesystem: 'maybe' is not one of"),
                           ("cluster.cpu_per_task=2", "did you mean 'cpus_per_task'")):
        assert_user_error(run_cli("train-batch", "--all", "--cluster", "local:1", "--set", setting, cwd=project),
                          words)
    from lora_project.config import load_config

    cfg = load_config([project / "config" / "training_config.yaml"], ["cluster.shared_filesystem=true"])
    assert cfg.cluster.shared_filesystem == "true"  # YAML's boolean read as the choice


def test_explicit_threads_that_differ_from_cpus_per_task_are_refused(project):
    # the tiny config sets training.threads: 1; the cluster default is 2 CPUs per task
    assert_user_error(run_cli("train-batch", "--all", "--no-progress", "--cluster", "local:1", cwd=project),
                      "training.threads=1 differs from cluster.cpus_per_task=2")
    assert_user_error(run_cli("train-batch", "--all", "--fused", "--cluster", "local:1", cwd=project),
                      "--fused")


def test_cluster_settings_are_not_part_of_the_recipe():
    """A checkpoint or an up-to-date adapter does not depend on where it was trained."""
    from lora_project.config import build_config, recipe_fields

    a = build_config({"cluster": {"cpus_per_task": 1}})
    b = build_config({"cluster": {"cpus_per_task": 4, "shared_filesystem": False}})
    assert recipe_fields(a) == recipe_fields(b) and not any(k.startswith("cluster.") for k in recipe_fields(a))


def test_ray_is_not_imported_without_cluster(project):
    """The CLI and a command without --cluster never load Ray (start-up time stays as it was)."""
    code = ("import sys, runpy\n"
            "from lora_project.cli import build_parser, main\n"
            "build_parser()\n"
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'parser'\n"
            "rc = main(['config', '--explain'])\n"
            "assert rc == 0\n"
            "try:\n"
            "    main(['train-batch', '--all', '--cluster', 'local:0'])\n"
            "except SystemExit as exc:\n"
            "    assert exc.code == 2\n"
            "bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]\n"
            "print('RAY', len(bad))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LORA_PROJECT_ROOT": str(project)})
    assert "RAY 0" in proc.stdout, proc.stderr[-2000:]


# --- slow: real Ray clusters on loopback ---------------------------------------------------------------


def _adapter_bytes(project: Path) -> dict[str, bytes]:
    return {p.name: (p / "adapter_model.safetensors").read_bytes()
            for p in sorted((project / "adapters").iterdir()) if (p / "adapter_model.safetensors").is_file()}


def _local_reference(project: Path) -> dict[str, bytes]:
    proc = run_cli("train-batch", "--all", "--no-progress", "--no-mlflow", "--json", *ONE_CPU, cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = _adapter_bytes(project)
    assert len(ref) == 2
    return ref


def _check_runs(project: Path, summary: dict, n: int) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    assert client.get_run(summary["parent_run_id"]).info.status == "FINISHED"
    exp = client.get_experiment_by_name("tests")
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    assert len(children) == n
    for c in children:
        assert c.info.status == "FINISHED"
        history = client.get_metric_history(c.info.run_id, "loss")
        assert [m.step for m in history] == [2, 4, 6]  # every logged step (log_interval 2 of 6 steps)
        assert [m.step for m in client.get_metric_history(c.info.run_id, "val_loss")] == [0, 3, 6]
        assert c.data.params["training.max_steps"] == "6" and c.data.tags["cluster_node"]
        arts = {a.path for a in client.list_artifacts(c.info.run_id)}
        assert {"config.yaml", "results.json", "adapter"} <= arts
        exp_dir = project / "experiments" / c.data.tags["experiment_dir"]
        res = json.loads((exp_dir / "results.json").read_text())
        assert res["status"] == "FINISHED" and res["mlflow_run_id"] == c.info.run_id
        assert (exp_dir / "logs" / "metrics.jsonl").is_file()
        meta = json.loads((Path(res["adapter_dir"]) / "lora_project.json").read_text())
        assert meta["mlflow_run_id"] == c.info.run_id and meta["experiment_dir"] == str(exp_dir)


@pytest.mark.slow
def test_local_cluster_adapters_are_byte_identical_to_local_train_batch(project, tracking_store):
    ref = _local_reference(project)
    proc = run_cli("train-batch", "--all", "--no-progress", "--json", "--overwrite", "--cluster", "local:2",
                   *ONE_CPU, "--set", "cluster.shared_filesystem=false", cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert [r["status"] for r in summary["datasets"]] == ["trained", "trained"]
    assert _adapter_bytes(project) == ref
    for word in ("queued", "running on", "done on", "no shared filesystem"):
        assert word in proc.stderr, (word, proc.stderr[-2000:])
    _check_runs(project, summary, 2)
