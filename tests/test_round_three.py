"""Issue 31, findings B, C and D: each a reproduction of a probe failure, fixed in its mechanism.

B: no adapter may change the base that other models in the same run see.
C: one line, and the right advice.
D: no number where the quantity is undefined.
Tiny models built in code; all in this process.
"""

from __future__ import annotations

import json

import torch
from conftest import assert_user_error, run_cli
from test_inspection import make_adapter


def _zero_update(folder):
    from safetensors.torch import load_file, save_file

    f = folder / "adapter_model.safetensors"
    tensors = {k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in load_file(f).items()}
    save_file(tensors, f)


# --- D: inspect compare of an adapter whose update is exactly zero ------------------------------


def test_compare_of_a_zero_update_says_undefined_not_one(tiny_model_dir, tmp_path):
    from lora_project.inspection.analysis import compare_adapters
    from lora_project.models.adapter import load_adapter

    zero = make_adapter(tiny_model_dir, tmp_path / "zero_lora", 1)
    _zero_update(zero)
    other = make_adapter(tiny_model_dir, tmp_path / "other_lora", 2)
    report = compare_adapters(load_adapter(zero), load_adapter(other), None)
    assert report["mean_phi_top1"] is None and report["mean_phi_full"] is None
    assert all(r["phi_top1"] is None and r["phi_full"] is None for r in report["modules"])
    assert all("zero_lora" in r["undefined"] for r in report["modules"])
    same = compare_adapters(load_adapter(zero), load_adapter(zero), None)  # was 1.000: identical zeros
    assert same["mean_phi_full"] is None


def test_compare_cli_prints_undefined_for_a_zero_update(project, tiny_model_dir):
    zero = make_adapter(tiny_model_dir, project / "adapters" / "zero_lora", 1)
    _zero_update(zero)
    other = make_adapter(tiny_model_dir, project / "adapters" / "other_lora", 2)
    proc = run_cli("inspect", "compare", str(zero), str(other), "--out", "plots",
                   "--set", f"model.source={tiny_model_dir}", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert "undefined" in proc.stdout and "1.000" not in proc.stdout, proc.stdout
    proc = run_cli("inspect", "compare", str(zero), str(other), "--out", "plots", "--json",
                   "--set", f"model.source={tiny_model_dir}", cwd=project)
    report = json.loads(proc.stdout)
    assert report["mean_phi_top1"] is None and report["modules"][0]["phi"] is None


# --- C: one line, and the right advice ----------------------------------------------------------


def test_ui_bad_host_blames_the_host_not_the_port(project):
    proc = run_cli("ui", "--host", "999.1.1.1", "--port", "7871", cwd=project)
    assert_user_error(proc, "--host 999.1.1.1")
    assert "port" not in proc.stderr.lower().split("--host")[0] and "warning" not in proc.stderr, proc.stderr
    assert not (project / "outputs" / "ui").exists()


def test_ui_busy_port_advises_the_port_option_not_gradio_settings(project):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("ui", "--port", str(port), cwd=project)
    assert_user_error(proc, f"--port {port} is in use", "--port")
    assert "GRADIO_SERVER_PORT" not in proc.stderr and "launch()" not in proc.stderr, proc.stderr
