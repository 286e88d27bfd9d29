"""The web workbench without a browser: arguments, path refusal, the form's validation and command line,
live progress read from an experiment folder, and the progress file the trainer writes."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest
from conftest import assert_user_error, run_cli

from lora_project.errors import UserError
from lora_project.paths import ProjectPaths
from lora_project.ui import state

FIELDS = {"lora.r": "8", "lora.alpha": "16", "lora.target_modules": "q_proj,v_proj", "training.lr": "0.01",
          "training.max_steps": "6", "training.seq_len": "16", "training.batch_size": "2", "training.precision": "fp32"}


def test_ui_refuses_a_bad_port_before_serving(project):
    assert_user_error(run_cli("ui", "--port", "70000"), "--port: must be an integer from 1 to 65535")
    assert_user_error(run_cli("ui", "--port", "http"), "--port", "is not an integer")
    assert not (project / "outputs" / "ui").exists()


def test_ui_warns_when_bound_beyond_loopback(project, monkeypatch):
    import lora_project.ui as ui

    def fake_launch(paths, host, port, **kw):
        raise UserError(f"stopped before serving {host}")  # no server in this test

    monkeypatch.setattr(ui, "launch", fake_launch)
    proc = run_cli("ui", "--host", "0.0.0.0", "--port", "7999")
    assert proc.returncode == 2 and "warning: --host 0.0.0.0 is not a loopback address" in proc.stderr
    proc = run_cli("ui", "--port", "7999")
    assert proc.returncode == 2 and "warning" not in proc.stderr
    assert [state.is_loopback(h) for h in ("127.0.0.1", "127.8.0.1", "::1", "localhost", "0.0.0.0", "10.0.0.1", "x")] \
        == [True, True, True, True, False, False, False]


@pytest.mark.parametrize("name", ["../config", "..", "/etc", "a/../../b", "toddler_data_lora/../..", "", ".hidden"])
def test_names_from_the_page_cannot_leave_their_folders(project, name):
    from lora_project.ui import actions

    paths = ProjectPaths(project)
    with pytest.raises(UserError):
        state.adapter_folder(paths, name)
    with pytest.raises(UserError):
        state.dataset_sample(paths, name)
    with pytest.raises(UserError):
        actions.prepare(paths, name)
    with pytest.raises(UserError):
        list(actions.generate(paths, actions.BaseCache(paths), "hi", [name], max_new_tokens=2, sampling=False,
                              temperature=0, seed=0))
    with pytest.raises(state.FormErrors) as err:
        state.check_form(paths, "toddler_data", name or "x/y", FIELDS)
    assert "adapter" in err.value.errors


def test_an_adapter_folder_that_links_outside_is_refused(project, tmp_path):
    paths = ProjectPaths(project)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (project / "adapters").mkdir(exist_ok=True)
    (project / "adapters" / "sneaky_lora").symlink_to(outside)
    with pytest.raises(UserError, match="outside"):
        state.adapter_folder(paths, "sneaky_lora")


def test_form_errors_are_reported_beside_their_fields(project):
    paths = ProjectPaths(project)
    bad = dict(FIELDS, **{"lora.r": "zero", "training.lr": "-1", "training.precision": "fp8",
                          "training.seq_len": ""})
    with pytest.raises(state.FormErrors) as err:
        state.check_form(paths, "no_such_data", "", bad)
    e = err.value.errors
    assert "expected an integer" in e["lora.r"] and "must be > 0" in e["training.lr"]
    assert "fp8" in e["training.precision"] and e["training.seq_len"] == "a value is needed"
    assert "unknown dataset" in e["dataset"] or "no_such_data" in e["dataset"]
    assert set(e) == {"lora.r", "training.lr", "training.precision", "training.seq_len", "dataset"}


def test_the_command_line_is_the_shortest_equivalent_one(project):
    paths = ProjectPaths(project)
    defaults = state.form_defaults(paths)  # the project's own config: nothing to --set
    argv, cfg, adapter = state.check_form(paths, "toddler_data", "", defaults)
    assert state.command_line(argv) == "lora-project train toddler_data --no-progress" and adapter == "toddler_data"
    values = dict(defaults, **{"training.max_steps": "40", "lora.target_modules": "q_proj, k_proj"})
    argv, cfg, adapter = state.check_form(paths, "toddler_data", "my_a", values, mlflow=False)
    assert state.command_line(argv) == ("lora-project train toddler_data --adapter-name my_a --set lora.target_modules=q_proj,k_proj "
                                        "--set training.max_steps=40 "
                                        "--no-mlflow --no-progress")
    assert cfg.training.max_steps == 40 and cfg.lora.target_modules == ["q_proj", "k_proj"] and adapter == "my_a"
    # A value with shell syntax is one argv item, quoted in the shown command, never run by a shell.
    argv, _, _ = state.check_form(paths, "toddler_data", "", dict(values, **{"lora.target_modules": "q_proj;rm -rf ~"}))
    assert "lora.target_modules=q_proj;rm -rf ~" in argv
    assert shlex.split(state.command_line(argv)) == ["lora-project", *argv]
    # The project's config decides what "changed" means; the CLI parses the line back to the same config.
    (project / "adapters").mkdir(exist_ok=True)
    (project / "adapters" / "toddler_data_lora").mkdir()
    with pytest.raises(state.FormErrors, match="overwrite"):
        state.check_form(paths, "toddler_data", "", defaults)
    argv, _, _ = state.check_form(paths, "toddler_data", "", defaults, overwrite=True)
    assert "--overwrite" in argv


def _experiment(project, n, adapter, *, pid, status="RUNNING", points=3, results=None):
    exp = project / "experiments" / f"exp_{n:03d}_{adapter}"
    (exp / "logs").mkdir(parents=True)
    lines = [json.dumps({"event": "train", "step": 10 * (i + 1), "loss": 5.0 - i / 10, "time": 0}) for i in range(points)]
    lines.append(json.dumps({"event": "eval", "step": 10, "val_loss": 4.9, "time": 0}))
    (exp / "logs" / "metrics.jsonl").write_text("\n".join(lines) + '\n{"event": "tra')  # a half-written line
    (exp / "logs" / "progress.json").write_text(json.dumps(
        {"status": status, "pid": pid, "step": 10 * points, "max_steps": 100, "loss": 4.8, "tokens_seen": 960,
         "train_seconds": 3.0, "tokens_per_second": 320.0, "updated": time.time()}))
    if results:
        (exp / "results.json").write_text(json.dumps(results))
    return exp


def test_live_progress_is_read_from_the_experiment_folder(project):
    paths = ProjectPaths(project)
    assert state.live_views(paths) == [] and state.progress_line(None) == "no training runs yet"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _experiment(project, 1, "old", pid=int(dead.stdout), status="KILLED",
                results={"status": "KILLED", "mlflow_run_id": "abc123",
                         "dataset": {"name": "toddler_data", "fingerprint": "f00"}})  # as Run records it
    _experiment(project, 2, "crashed", pid=int(dead.stdout))  # RUNNING, but its process is gone
    _experiment(project, 3, "live", pid=os.getpid(), points=4)
    (project / "adapters").mkdir(exist_ok=True)
    (project / "adapters" / ".live_lora.lock").write_text(str(os.getpid()))
    (project / "adapters" / ".loading_lora.lock").write_text(str(os.getpid()))  # no experiment folder yet
    views = state.live_views(paths)
    assert [v["adapter"] for v in views] == ["loading", "live"]  # the newest live training first
    live = state.live_views(paths, follow="live")[0]
    assert live["status"] == "RUNNING" and live["step"] == 40 and live["max_steps"] == 100
    assert live["eta_seconds"] == pytest.approx(60 * 3.0 / 40)
    assert [p["step"] for p in live["curve"]] == [10, 20, 30, 40, 10]
    assert [p["series"] for p in live["curve"]].count("validation") == 1
    assert state.progress_line(live) == ("RUNNING exp_003_live: step 40/100 · loss 4.8000 · 320 tokens/s · "
                                         "ETA 4 s · 4 loss points")
    assert state.live_views(paths, follow="loading")[0]["status"] == "STARTING"
    assert state.live_views(paths, follow="crashed")[0]["status"] == "ENDED (process gone)"
    old = state.live_views(paths, follow="old")[0]
    assert old["status"] == "KILLED" and old["eta_seconds"] is None
    rows = state.runs_table(paths)
    assert rows[-1]["dataset"] == "toddler_data" and rows[-1]["mlflow_run_id"] == "abc123"
    assert [(r["experiment"], r["status"]) for r in rows] == [
        ("exp_003_live", "RUNNING"), ("exp_002_crashed", "ENDED (process gone)"), ("exp_001_old", "KILLED")]
    (project / "adapters" / ".live_lora.lock").unlink()
    (project / "adapters" / ".loading_lora.lock").unlink()
    assert state.live_views(paths)[0]["experiment"] == "exp_003_live"  # no live run: the newest one


def test_mlflow_links(project):
    assert state.mlflow_link("http://mlflow.lan:5000/", "0123456789abcdef") == (
        "0123456789ab", "http://mlflow.lan:5000/#/runs/0123456789abcdef")
    assert state.mlflow_link("sqlite:////p/mlruns/mlflow.db", "0123456789abcdef") == ("0123456789abcdef", None)
    assert state.mlflow_link("sqlite:////p/mlruns/mlflow.db", None) == ("", None)
    assert "mlflow ui --backend-store-uri sqlite:////p/mlruns/mlflow.db" in state.mlflow_hint("sqlite:////p/mlruns/mlflow.db")
    assert state.tracking_uri(ProjectPaths(project)) == f"sqlite:///{project.resolve() / 'mlruns' / 'mlflow.db'}"


def test_a_second_training_of_the_same_adapter_is_refused(project):
    from lora_project.ui.jobs import TrainingJobs

    paths = ProjectPaths(project)
    (project / "adapters").mkdir(exist_ok=True)
    (project / "adapters" / ".toddler_data_lora.lock").write_text(str(os.getpid()))  # held by a live process
    jobs = TrainingJobs(paths)
    with pytest.raises(UserError, match="being trained already"):
        jobs.start("toddler_data", ["train", "toddler_data"])
    with pytest.raises(UserError, match="no training of 'toddler_data' started from this board"):
        jobs.stop("toddler_data")
    assert not (project / "outputs" / "ui" / "logs").exists()


def test_progress_file_follows_the_loop(tmp_path):
    from lora_project.training.callbacks import ProgressFile, TrainState

    st = TrainState(max_steps=3, tokens_per_step=32)
    cb = ProgressFile(tmp_path / "progress.json", every=3600)
    cb.on_train_start(st)
    first = json.loads((tmp_path / "progress.json").read_text())
    assert first["status"] == "RUNNING" and first["step"] == 0 and first["pid"] == os.getpid()
    for _ in range(3):
        st.step += 1
        st.tokens_seen += 32
        st.train_seconds += 0.5
        cb.on_step_end(st, {"loss": 4.0 + st.step})
        if st.step == 1:  # throttled: not rewritten within `every` seconds ...
            assert json.loads((tmp_path / "progress.json").read_text())["step"] == 0
    last = json.loads((tmp_path / "progress.json").read_text())  # ... but always at the last step
    assert (last["step"], last["loss"], last["tokens_per_second"]) == (3, 7.0, 64.0)
    cb.on_train_end(st, "KILLED")
    assert json.loads((tmp_path / "progress.json").read_text())["status"] == "KILLED"


def test_catalog_rows_show_preparation_and_tokens(project):
    from lora_project.ui import actions

    paths = ProjectPaths(project)
    rows = {r["name"]: r for r in state.catalog_rows(paths)}
    assert rows["toddler_data"]["prepared"] == "no" and rows["toddler_data"]["source"] == "present"
    assert rows["shakespeare"]["source"] == "remote" and rows["childes"]["source"] == "missing"
    assert "not prepared yet" in state.dataset_sample(paths, "toddler_data")
    msg = actions.prepare(paths, "toddler_data")
    assert msg.splitlines()[-1].startswith("toddler_data: prepared (train ")
    row = {r["name"]: r for r in state.catalog_rows(paths)}["toddler_data"]
    stats = json.loads((paths.processed("toddler_data") / "stats.json").read_text())
    assert row["prepared"] == "yes" and row["train_tokens"] == stats["splits"]["train"]["tokens"] > 0
    sample = state.dataset_sample(paths, "toddler_data", n=3).splitlines()
    assert len(sample) == 3 and sample[0].startswith("1. ")
    assert "unchanged, skipped" in actions.prepare(paths, "toddler_data")


def test_readme_shows_the_board_and_its_command():
    from conftest import REPO

    text = (REPO / "README.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\((docs/images/[^)]+)\)", text)
    assert images and all((REPO / i).is_file() for i in images), images
    assert "lora-project ui" in text and "127.0.0.1:7860" in text


def test_saved_evaluations_are_found_and_rendered(project):
    from lora_project.ui import actions, render

    paths = ProjectPaths(project)
    assert state.saved_matrix(paths) is None and state.saved_pairs(paths) is None
    paths.metrics_dir.mkdir(parents=True)
    cells = {m: {"toddler_data": {"perplexity": p, "bits_per_byte": p / 100, "tokens": 50}}
             for m, p in (("base", 40.0), ("a_lora", 20.0))}
    (paths.metrics_dir / "benchmark_20260101T000000.json").write_text(json.dumps(
        {"matrix": {"split": "test", "max_tokens": 100, "datasets": ["toddler_data"], "models": ["base", "a_lora"],
                    "cells": cells}}))
    (paths.metrics_dir / "benchmark_20260102T000000.json").write_text(json.dumps({"training": []}))  # no matrix
    m = state.saved_matrix(paths)
    assert m["source"] == "benchmark_20260101T000000.json" and m["models"] == ["base", "a_lora"]
    html = render.matrix_table(m)
    assert "20.00 (0.200 b/B)" in html and html.count("<tr") == 3
    (paths.metrics_dir / "minimal_pairs_20260101T000000.json").write_text(json.dumps({"models": {
        "base": {"macro_accuracy": 0.5, "paradigms": {"anaphor<x>": {"accuracy": 0.5}}},
        "a_lora": {"macro_accuracy": 0.75, "paradigms": {"anaphor<x>": {"accuracy": 0.75}}}}}))
    html = render.pairs_table(state.saved_pairs(paths))
    assert "anaphor&lt;x&gt;" in html and "0.75" in html and "macro average" in html  # escaped
    with pytest.raises(UserError, match="two different"):
        actions.compare(paths, "a_lora", "a_lora")


def test_no_keystroke_of_the_form_is_dropped_while_a_preview_is_pending(project):
    """Gradio's default for `.input` events ("once") drops an event fired while one is pending: typing
    4000 fast could leave the command line at max_steps=4 (seen in the browser test). Every input event
    of the board must run again for the last value ("always_last")."""
    from lora_project.ui.app import build_app

    deps = build_app(ProjectPaths(project)).config["dependencies"]
    inputs = [d for d in deps if any(t[1] == "input" for t in d["targets"])]
    assert inputs and {d["trigger_mode"] for d in inputs} == {"always_last"}
