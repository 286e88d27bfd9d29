"""`benchmark --matrix --cluster ADDRESS`: argument errors in the fast tier (no Ray started); in the slow
tier the matrix with each (model, dataset) cell as a task on a real `local:2` Ray cluster, equal to the
matrix scored in one process (tiny model, two adapters)."""

from __future__ import annotations

import json
import socket
import time

import pytest

from conftest import assert_user_error, run_cli

ONE_CPU = ["--set", "cluster.cpus_per_task=1"]  # the tiny project scores with training.threads: 1


@pytest.mark.parametrize("extra, words", [
    (["--cluster", "local:2"], "--cluster goes with --matrix"),
    (["--matrix", "--cluster", "local:0"], "local:N needs N from 1"),
    (["--matrix", "--cluster", "local:2"], "training.threads=1 differs from cluster.cpus_per_task=2"),
    (["--matrix", "--scaling", "local:2", "--cluster", "local:2"], "--scaling takes its own ADDRESS"),
])
def test_bad_matrix_cluster_arguments_are_one_line(project, extra, words):
    proc = run_cli("benchmark", "--quick", *extra, cwd=project)
    assert_user_error(proc, words)
    assert not list((project / "outputs" / "metrics").glob("benchmark_*"))


def test_unreachable_cluster_is_refused_before_the_matrix(project):
    with socket.socket() as s:  # a free loopback port, closed again: nothing accepts there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    proc = run_cli("benchmark", "--quick", "--matrix", "--cluster", f"127.0.0.1:{port}", *ONE_CPU, cwd=project)
    assert time.perf_counter() - t0 < 10
    assert_user_error(proc, "cannot reach the Ray cluster", f"127.0.0.1:{port}")


@pytest.mark.slow
def test_matrix_cells_as_tasks_equal_the_single_process_matrix(project, monkeypatch):
    """Every cell's figures (perplexity, bits per byte, intervals, the paired change against the base) are
    the same numbers from `local:2` as from one process: each cell is scored whole, at one thread."""
    import lora_project.benchmark as bench
    from lora_project.benchmark.matrix import cross_matrix
    from lora_project.config import load_project_config
    from lora_project.paths import ProjectPaths

    monkeypatch.setattr(bench.speed, "matmul_gflops", lambda dtype, **kw: 1.0)  # not what this test is about
    assert run_cli("train-batch", "toddler_data", "kids", "--no-mlflow", "--no-progress", cwd=project).returncode == 0
    paths = ProjectPaths(project)
    local = cross_matrix(paths, load_project_config(paths), max_tokens=600, log=lambda m: None)
    t0 = time.perf_counter()
    proc = run_cli("benchmark", "--matrix", "--matrix-max-tokens", "600", "--cluster", "local:2", "--no-mlflow",
                   "--json", *ONE_CPU, cwd=project)
    took = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 model(s) x 2 dataset(s) = 6 cell task(s)" in proc.stderr
    assert proc.stderr.count("] done on ") == 6
    got = json.loads(proc.stdout)["matrix"]
    assert got["models"] == local["models"] == ["base", "kids_lora", "toddler_data_lora"]
    assert got["datasets"] == local["datasets"] and got["scope"] == json.loads(json.dumps(local["scope"]))
    assert got["cells"] == json.loads(json.dumps(local["cells"]))  # every figure, to the last bit
    print(f"matrix of 6 cells on local:2: {took:.1f} s")
