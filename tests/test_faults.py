"""Fault injection: a process killed (SIGKILL) in the middle of writing, a full disk, and a
real MLflow server that stops mid-run. The kills and the server run in real subprocesses (slow
tier); the full disk is simulated in this process. Each test then checks that what was on disk
before is intact and loadable.

The kills are placed precisely by a small driver (below) that wraps one function of the
package and sends SIGKILL to its own process at the chosen point, so no timing luck is
involved.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_user_error, copy_tracking_store, run_cli, snapshot

DRIVER = r'''
import os, signal, sys, json, functools
from pathlib import Path
import torch

mode, model_dir, target = sys.argv[1], sys.argv[2], Path(sys.argv[3])

def die(*_a, **_k):
    os.kill(os.getpid(), signal.SIGKILL)

from transformers import AutoModelForCausalLM
from lora_project.models.lora_model import save_adapter, wrap_with_lora
from lora_project.config import LoraSection
import lora_project.utils.io_utils as io

model = wrap_with_lora(AutoModelForCausalLM.from_pretrained(model_dir),
                       LoraSection(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]), seed=0)
with torch.no_grad():
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.fill_(2.0)   # the new version differs from the one on disk (zeros-initialised B)

if mode == "adapter-half-file":          # killed with a file of the new adapter half-written
    real = io.atomic_write_json
    def half(path, obj):
        data = json.dumps(obj).encode()
        with open(path, "wb") as fh:
            fh.write(data[: len(data) // 2]); fh.flush(); os.fsync(fh.fileno())
        die()
    import lora_project.models.lora_model as lm
    lm.atomic_write_json = half
elif mode == "adapter-before-swap":      # new adapter complete in its temporary folder
    io.fsync_tree = die
elif mode == "adapter-between-renames":  # old folder moved aside, new one not yet in place
    real_replace = os.replace
    def replace(a, b):
        if Path(b) == target:   # the second rename: temporary folder -> adapter
            die()
        return real_replace(a, b)
    io.os = type("os_proxy", (), {"__getattr__": lambda self, k: getattr(os, k), "replace": staticmethod(replace)})()
save_adapter(model, target, {"version": 2}, overwrite=True)
print("saved without being killed", file=sys.stderr)
sys.exit(3)
'''


def _save_v1(tiny_model_dir, target: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from lora_project.config import LoraSection
    from lora_project.models.lora_model import save_adapter, wrap_with_lora

    model = wrap_with_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraSection(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]), seed=0)
    save_adapter(model, target, {"version": 1}, overwrite=False)
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.slow  # a real process killed with SIGKILL
@pytest.mark.parametrize("mode", ["adapter-half-file", "adapter-before-swap", "adapter-between-renames"])
def test_sigkill_while_saving_an_adapter_keeps_the_previous_one(mode, tiny_model_dir, tmp_path):
    from lora_project.models.adapter import read_metadata
    from lora_project.models.lora_factors import load_adapter

    target = tmp_path / "adapters" / "kid_lora"
    _save_v1(tiny_model_dir, target)
    proc = subprocess.run([sys.executable, "-c", DRIVER, mode, str(tiny_model_dir), str(target)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    if mode == "adapter-between-renames":
        assert not target.exists()  # the kill left only the moved-aside copy ...
    adapter = load_adapter(target)  # ... which the next reader puts back
    assert read_metadata(target).extra["version"] == 1
    assert all(float(m.B.abs().max()) == 0.0 for m in adapter.modules)  # v1: B is zero
    leftovers = [p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")
                 and not p.name.endswith(".lock")]
    assert leftovers == [] or mode != "adapter-between-renames", leftovers


@pytest.mark.slow  # a real training process killed with SIGKILL, then resumed
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint(project):
    """A real training run killed while its step-4 checkpoint is half-written; --resume
    continues from step 2 and finishes."""
    driver = r'''
import os, signal, sys
import safetensors.torch as st
real = st.save_file
def save_file(tensors, path, *a, **k):
    if "step_000004" in str(path) or (".step_000004." in str(path)):
        with open(path, "wb") as fh:
            fh.write(b"partial"); fh.flush(); os.fsync(fh.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real(tensors, path, *a, **k)
st.save_file = save_file
from lora_project.cli import main
sys.exit(main(sys.argv[1:]))
'''
    args = ["train", "toddler_data", "--no-progress", "--no-mlflow", "--set", "training.max_steps=6",
            "--set", "training.checkpoint_interval=2", "--set", "training.eval_interval=0"]
    proc = subprocess.run([sys.executable, "-c", driver, *args], cwd=project, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    from lora_project.training.checkpoint import list_checkpoints, load_checkpoint

    folder = project / "outputs" / "checkpoints" / "exp_001_toddler_data"
    ckpts = list_checkpoints(folder)
    assert [p.name for p in ckpts] == ["step_000002"]
    info, weights, _ = load_checkpoint(ckpts[-1])
    assert info["step"] == 2 and weights
    assert not (project / "adapters" / "toddler_data_lora").exists()
    resumed = run_cli(*args, "--resume", cwd=project)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "step 2" in resumed.stdout + resumed.stderr
    assert (project / "adapters" / "toddler_data_lora" / "adapter_model.safetensors").is_file()
    assert not list(folder.glob(".step_*"))  # the half-written temporary folder was cleaned up


def test_full_disk_while_saving_is_a_clear_error_and_keeps_earlier_outputs(project, monkeypatch):
    """ENOSPC raised by the file system when the adapter is written (simulated at the
    write call: this machine cannot mount a small file system without root)."""
    first = run_cli("train", "toddler_data", "--no-progress", "--no-mlflow", cwd=project)
    assert first.returncode == 0, first.stderr[-2000:]
    adapters_before = snapshot(project / "adapters" / "toddler_data_lora")
    processed_before = snapshot(project / "data" / "processed")
    import errno

    import lora_project.utils.io_utils as io

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(io, "fsync_tree", full)
    proc = run_cli("train", "toddler_data", "--no-progress", "--no-mlflow", "--overwrite", "--set", "training.seed=9",
                   cwd=project)
    assert_user_error(proc, "No space left on device")
    assert snapshot(project / "adapters" / "toddler_data_lora") == adapters_before
    assert [p.name for p in (project / "adapters").iterdir() if p.name.endswith(".tmp")] == []
    assert snapshot(project / "data" / "processed") == processed_before
    results = sorted((project / "experiments").glob("exp_*/results.json"))
    assert json.loads(results[-1].read_text())["status"] == "FAILED"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_server_stopped_mid_run(project, tmp_path, tracking_store_template):
    """A real `mlflow server` on loopback, killed by the test while training runs: training
    finishes, the user is told once, and every metric is in the local JSON-lines log."""
    port = _free_port()
    # its store already created: the server starts without running every schema migration
    copy_tracking_store(tracking_store_template, tmp_path / "srv.db", str(tmp_path / "art" / "0"))
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'srv.db'}",
                               "--default-artifact-root", str(tmp_path / "art"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
        train = subprocess.Popen([sys.executable, "-m", "lora_project", "train", "toddler_data", "--no-progress",
                                  "--set", "training.max_steps=60", "--set", "training.log_interval=1",
                                  "--set", "training.eval_interval=0"],
                                 cwd=project, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        metrics = project / "experiments" / "exp_001_toddler_data" / "logs" / "metrics.jsonl"
        deadline = time.time() + 180
        while not (metrics.exists() and metrics.read_text().count("\n") >= 5):
            assert train.poll() is None, train.communicate()[1][-2000:]
            assert time.time() < deadline
            time.sleep(0.2)
        os.killpg(server.pid, signal.SIGKILL)  # the server (and its workers) die mid-run
        server.wait(timeout=30)
        out, err = train.communicate(timeout=600)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert train.returncode == 0, err[-3000:]
    assert err.count("warning: MLflow tracking stopped") == 1, err[-3000:]
    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = sorted({r["step"] for r in logged if "loss" in r})
    assert steps[-1] == 60 and len(steps) == 60
    assert (project / "adapters" / "toddler_data_lora" / "adapter_model.safetensors").is_file()


def test_no_pickle_loading_anywhere_in_the_package():
    """torch.load only with weights_only=True (or not at all); no pickle module; no
    trust_remote_code=True; downloads refuse plain http by default."""
    import ast

    src = REPO / "src" / "lora_project"
    for path in src.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n in ("pickle", "cPickle", "dill", "joblib") for n in names), f"{path}: imports pickle"
            if isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                if func.endswith("torch.load") or func == "load" and "torch" in path.read_text():
                    kws = {k.arg: ast.unparse(k.value) for k in node.keywords}
                    assert kws.get("weights_only") == "True", f"{path}:{node.lineno}: {func} without weights_only=True"
                for k in node.keywords:
                    if k.arg == "trust_remote_code":
                        assert ast.unparse(k.value) != "True", f"{path}:{node.lineno}: trust_remote_code=True"
    from lora_project.config import ModelSection

    assert ModelSection().trust_remote_code is False
    from lora_project.data.download import check_url
    from lora_project.errors import UserError

    with pytest.raises(UserError, match="refusing plain-HTTP"):
        check_url("http://example.org/x.txt")
    check_url("https://example.org/x.txt")
    with pytest.raises(UserError):
        check_url("file:///etc/passwd", allow_http=True)


def test_peft_bin_weights_are_never_unpickled(tmp_path, tiny_model_dir):
    """An adapter folder with only a pickle `adapter_model.bin` is refused before anything loads it."""
    target = tmp_path / "pk_lora"
    _save_v1(tiny_model_dir, target)
    (target / "adapter_model.safetensors").unlink()
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Boom()}, target / "adapter_model.bin")
    from lora_project.errors import UserError
    from lora_project.models.adapter import check_adapter_dir
    from lora_project.models.lora_factors import load_adapter

    for fn in (check_adapter_dir, load_adapter):
        with pytest.raises(UserError, match="adapter_model.safetensors"):
            fn(target)
    assert not marker.exists()
