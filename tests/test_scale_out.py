"""`benchmark --scaling ADDRESS` (benchmark/scale_out.py): refusals and the throwaway project in the fast
tier (no Ray, no model); one slow run on a real `local:2` cluster with the tiny model checks the
report's fields against each other."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from conftest import SHARED_DATA, assert_user_error, run_cli

# --- fast: refused before anything runs ------------------------------------------------------------


@pytest.mark.parametrize("args, words", [
    (["--scaling", "local:0"], ["local:N needs N from 1"]),
    (["--scaling", "a b"], ["expected auto"]),
    (["--scaling", "local:2", "--steps", "0"], ["--steps"]),
    (["--scaling", "local:2", "--datasets", "0"], ["--datasets"]),
    (["--scaling", "local:2", "--quick"], ["--scaling runs alone", "--quick"]),
    (["--scaling", "local:2", "--matrix", "--shapes", "64x4"], ["--scaling runs alone", "--matrix, --shapes"]),
    (["--datasets", "3"], ["--datasets and --model go with --scaling"]),
    (["--model", "embedded", "--quick"], ["--datasets and --model go with --scaling"]),
    (["--scaling", "local:2", "--set", "training.threads=2"], ["training.threads and cluster.cpus_per_task stay 1"]),
    (["--scaling", "local:2", "--set", "cluster.cpus_per_task=2"], ["stay 1"]),
    (["--scaling", "local:2", "--set", "training.max_stepz=3"], ["did you mean 'max_steps'"]),
])
def test_bad_scaling_input_is_one_line(project, args, words):
    assert_user_error(run_cli("benchmark", *args, "--no-mlflow", cwd=project), *words)
    assert not list((project / "outputs").rglob("benchmark_scaling_*")), "nothing written"


def test_unreachable_scaling_cluster_is_refused_before_the_local_run(project, monkeypatch, tmp_path):
    with socket.socket() as s:  # a free loopback port, closed again
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    assert_user_error(run_cli("benchmark", "--scaling", f"127.0.0.1:{port}", cwd=project),
                      "cannot reach the Ray cluster")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "no-ray"))
    assert_user_error(run_cli("benchmark", "--scaling", "auto", cwd=project), "no running cluster found")
    assert time.perf_counter() - t0 < 10


def test_cli_defaults_equal_the_modules():
    from lora_project.benchmark import scale_out
    from lora_project.cli import benchmark

    assert (benchmark.SCALING_STEPS, benchmark.SCALING_DATASETS) == (scale_out.SCALING_STEPS,
                                                                      scale_out.SCALING_DATASETS)


def test_two_node_recipe_is_valid_and_runs_benchmark_scaling_auto():
    import re
    import shlex
    import subprocess

    from conftest import REPO
    from lora_project.cli import build_parser

    script = REPO / "scripts" / "cluster" / "two_node_scaling.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    commands = [shlex.split(m.group(1).replace('"$@"', "")) for m in re.finditer(r"lora-project (.*)$", text, re.M)
                if not m.group(0).lstrip().startswith("#")]
    assert commands and all(build_parser().parse_args(c).scaling == "auto" for c in commands), commands
    assert '"num_cpus": 0' in text and "add_node(num_cpus=1" in text  # a head without CPUs, one-CPU workers
    assert "cluster.shutdown()" in text and "trap" in text


def _catalog(root: Path) -> list[dict]:
    import csv

    with open(root / "config" / "dataset_catalog.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_throwaway_project_without_shared_data_generates_its_text(tmp_path, monkeypatch):
    from lora_project.benchmark.scale_out import build_project
    from lora_project.config import load_config
    from lora_project.paths import ProjectPaths

    from conftest import REPO

    monkeypatch.setenv("LORA_PROJECT_SHARED_DATA", str(tmp_path / "none"))
    names, where = build_project(tmp_path / "p", ProjectPaths(REPO), "embedded", 7, 3)
    assert names == ["toddler_1", "kids_2", "toddler_3"] and "generated" in where
    rows = _catalog(tmp_path / "p")
    assert [r["options"] for r in rows] == [f"seed={i};lines=3000;dedupe=true" for i in range(3)]
    assert (tmp_path / "p" / "config" / "grammars" / "kids.yaml").is_file()
    cfg = load_config([tmp_path / "p" / "config" / "model_config.yaml", tmp_path / "p" / "config" /
                       "training_config.yaml"], [])
    assert (cfg.training.max_steps, cfg.training.threads, cfg.cluster.cpus_per_task, cfg.tracking.mlflow,
            cfg.model.source) == (7, 1, 1, False, "embedded")


@pytest.mark.skipif(not (SHARED_DATA / "tinyshakespeare" / "input.txt").is_file(), reason="needs ../shared/data")
def test_throwaway_project_takes_distinct_slices_of_real_text(tmp_path, monkeypatch):
    from lora_project.benchmark.scale_out import SLICE_CHARS, build_project
    from lora_project.paths import ProjectPaths

    monkeypatch.setenv("LORA_PROJECT_SHARED_DATA", str(SHARED_DATA))
    names, where = build_project(tmp_path / "p", ProjectPaths(tmp_path), "embedded", 5, 6)
    assert names == ["shakespeare_1", "alice_1", "peter_pan_1", "oz_1", "grimm_1", "shakespeare_2"]
    texts = [(tmp_path / "p" / "data" / "raw" / f"{n}.txt").read_text() for n in names]
    assert len(set(texts)) == 6 and all(SLICE_CHARS <= len(t) < SLICE_CHARS + 5000 for t in texts)
    assert "Project Gutenberg" not in texts[1] and "\r" not in "".join(texts)
    assert all(r["kind"] == "local" and r["format"] == "paragraphs" for r in _catalog(tmp_path / "p"))


# --- slow: a real local:2 cluster, the tiny model --------------------------------------------------------


@pytest.mark.slow
def test_scaling_on_local_2_reports_consistent_figures(project, tracking_store, tiny_model_dir):
    proc = run_cli("benchmark", "--scaling", "local:2", "--model", str(tiny_model_dir), "--steps", "2",
                   "--datasets", "4", "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert (r["tasks"], r["workers"], r["cluster"]["cpus"]) == (4, 2, 2)
    assert r["efficiency"] == pytest.approx(r["local_one_cpu_seconds"] / (2 * r["cluster_seconds"]))
    assert r["speed_up"] == pytest.approx(r["local_one_cpu_seconds"] / r["cluster_seconds"])
    assert r["identical_adapters"] is True
    assert all(a["sha256_local"] == a["sha256_cluster"] for a in r["adapters"].values()) and len(r["adapters"]) == 4
    assert r["model_loads"] == {"local": 1, "cluster": 2}  # once locally, once per worker
    tasks = r["cluster"]["tasks"]
    assert len(tasks) == 4 and all(t["training"] > 0 and t["started_at"] >= t["submitted_at"] for t in tasks)
    over = r["overheads_per_task"]
    for phase in ("scheduling", "model_load", "data_shipping", "result_return"):
        assert over[phase] == pytest.approx(sum(t[phase] for t in tasks) / 4) and over[phase] >= 0
    assert over["model_load"] > 0 and r["train_seconds_per_task"] == pytest.approx(
        sum(t["training"] for t in tasks) / 4)
    assert [p["workers"] for p in r["projection"]] == [8, 64, 512] and "T(W)" in r["projection_model"]
    assert [(p["workers"], p["tasks"]) for p in r["projection_same_load"]] == [(8, 16), (64, 128), (512, 1024)]
    assert r["cluster_seconds"] > r["fixed_seconds"] > 0
    md = Path(r["report"]["markdown"]).read_text()
    assert "| cluster | 2 |" in md and "byte-identical between the two sides: yes" in md and "| 512 | 1024 |" in md
    assert json.loads(Path(r["report"]["json"]).read_text())["efficiency"] == r["efficiency"]
    assert Path(r["report"]["json"]).parent == project / "outputs" / "metrics"
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}").get_run(r["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["efficiency"] == pytest.approx(r["efficiency"])
    assert not list((project / "adapters").glob("*_lora")), "the throwaway project's adapters stay out of the project"
