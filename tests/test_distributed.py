"""Two CPU processes under torchrun (gloo) follow the same loss curve as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import run_cli
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # several processes under torchrun


def _losses(project, exp):
    log = project / "experiments" / exp / "logs" / "metrics.jsonl"
    return [(r["step"], r["loss"]) for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "train"]


def test_two_process_data_parallel_matches_one_process(project):
    common = ["--no-mlflow", "--no-progress", "--set", "training.batch_size=4", "--set", "training.eval_interval=0",
              "--set", "training.log_interval=1"]
    single = run_cli("train", "toddler_data", "--adapter-name", "single", *common, cwd=project)
    assert single.returncode == 0, single.stderr[-2000:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "lora_project", "train", "toddler_data", "--adapter-name", "ddp", *common],
                         cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 processes, data parallel" in ddp.stdout + ddp.stderr
    one, two = _losses(project, "exp_001_single"), _losses(project, "exp_002_ddp")
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, 7))
    for (_, a), (_, b) in zip(one, two):
        assert a == pytest.approx(b, rel=1e-4)
    # Only rank 0 wrote outputs: one experiment folder and one adapter per run.
    assert sorted(p.name for p in (project / "experiments").iterdir()) == ["exp_001_single", "exp_002_ddp"]
    wa = load_file(project / "adapters" / "single_lora" / "adapter_model.safetensors")
    wb = load_file(project / "adapters" / "ddp_lora" / "adapter_model.safetensors")
    assert all((wa[k] - wb[k]).abs().max() < 1e-4 for k in wa)


def test_batch_not_divisible_by_processes_is_refused(project):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "lora_project", "train", "toddler_data", "--no-mlflow", "--set", "training.batch_size=3"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "must be divisible by the number of processes (2)" in proc.stderr
    assert not (project / "adapters" / "toddler_data_lora").exists()
