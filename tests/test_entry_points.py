"""The real entry points, as real processes: the few places where the process itself is the point.

Everything else runs the CLI in-process (`run_cli` in conftest.py), which cannot see what the
interpreter does with an uncaught exception, how `python -m` and the console script start, or
what a signal does to a running process. These do; the signals are in test_train_e2e.py
(SIGTERM -> 130) and, in the slow tier, test_resume.py and test_faults.py (SIGKILL). The
script shims are in test_docs.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_user_error, run_cli

from lora_project import __version__


def test_python_m_succeeds_with_exit_0(project):
    proc = run_cli("config", cwd=project, subprocess=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lora:" in proc.stdout and proc.stderr == ""


def test_console_script_runs():
    script = Path(sys.executable).parent / "lora-project"
    if not script.is_file():  # installed without scripts (or from another environment)
        script = shutil.which("lora-project")
    if not script:
        pytest.skip("the lora-project console script is not installed")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert __version__ in proc.stdout


@pytest.mark.slow  # a real process (or the full quick benchmark): kept out of make test-fast
def test_bad_input_exits_2_from_the_real_interpreter(project):
    # (argparse's own exit 2, e.g. an unknown command, is in the bad-input matrix, in-process)
    assert_user_error(run_cli("train", "toddler_dta", cwd=project, subprocess=True), "did you mean 'toddler_data'")


BUG_DRIVER = r'''
import runpy, sys
from lora_project.paths import ProjectPaths

def discover(cls):
    raise RuntimeError("a simulated bug")

ProjectPaths.discover = classmethod(discover)
sys.argv = ["lora-project", *sys.argv[1:]]
runpy.run_module("lora_project", run_name="__main__", alter_sys=True)
'''


def test_a_bug_exits_1_with_its_traceback(project):
    proc = subprocess.run([sys.executable, "-c", BUG_DRIVER, "config"], cwd=project, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" in proc.stderr and "RuntimeError: a simulated bug" in proc.stderr


def test_in_process_runs_report_a_bug_the_same_way(project, monkeypatch):
    from lora_project.paths import ProjectPaths

    def discover(cls):
        raise RuntimeError("a simulated bug")

    monkeypatch.setattr(ProjectPaths, "discover", classmethod(discover))
    proc = run_cli("config", cwd=project)
    assert proc.returncode == 1 and "RuntimeError: a simulated bug" in proc.stderr


def test_in_process_runs_leave_no_global_state_behind(project):
    """What the CLI changes in its process is put back (see conftest._process_state)."""
    import os
    import signal

    import torch

    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), sys.unraisablehook,
              torch.get_num_threads(), os.getcwd(), sys.stdout, sys.stderr)
    env_before = dict(os.environ)
    proc = run_cli("train", "toddler_data", "--no-progress", "--no-mlflow", cwd=project.parent,  # threads: 1
                   env={"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'other.db'}"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), sys.unraisablehook,
             torch.get_num_threads(), os.getcwd(), sys.stdout, sys.stderr)
    assert after == before
    assert dict(os.environ) == env_before


def test_the_fast_tier_runs_every_subcommand():
    """`make test-fast` (-m "not slow") must exercise every subcommand: each appears as the first
    argument of a run_cli(...) / cli(capsys, ...) call in a test that is not marked slow."""
    import ast

    from conftest import REPO

    from lora_project.cli import build_parser

    parser = build_parser()
    commands = set(next(a for a in parser._actions if a.dest == "command").choices)
    run = set()
    for path in sorted((REPO / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        module_slow = any(isinstance(n, ast.Assign) and "pytestmark" in ast.unparse(n.targets[0])
                          and "slow" in ast.unparse(n.value) for n in tree.body)
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef) or not fn.name.startswith("test_") or module_slow \
                    or any("slow" in ast.unparse(d) for d in fn.decorator_list):
                continue
            for call in ast.walk(fn):
                if isinstance(call, ast.Call) and ast.unparse(call.func) in ("run_cli", "cli"):
                    args = [a for a in call.args if ast.unparse(a) != "capsys"]
                    if args and isinstance(args[0], ast.Constant):
                        run.add(args[0].value)
    assert not commands - run, f"subcommands no fast test runs: {sorted(commands - run)}"
