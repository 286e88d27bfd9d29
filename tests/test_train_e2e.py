"""End-to-end on a tiny model: the CLI in-process (one real process for SIGTERM), real files, real
MLflow (SQLite in tmp)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import assert_user_error, run_cli, snapshot
from safetensors.torch import load_file


def _mlflow_run(project, run_id):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    return client, client.get_run(run_id)


@pytest.mark.fresh_store
def test_train_writes_adapter_experiment_and_mlflow_run(project):
    proc = run_cli("train", "toddler_data", "--json", "--no-progress", cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    # results.json: the contract fields
    exp = project / "experiments" / "exp_001_toddler_data"
    assert json.loads((exp / "results.json").read_text()) == res
    for key in ("metrics_before", "metrics_after", "tokens_seen", "tokens_per_second", "wall_seconds",
                "peak_rss_mb", "adapter_dir", "mlflow_run_id"):
        assert key in res, key
    for m in (res["metrics_before"], res["metrics_after"]):
        assert m["perplexity"] > 1 and m["bits_per_byte"] > 0
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-9)
    assert res["tokens_seen"] == 6 * 2 * 16
    assert res["status"] == "FINISHED"
    assert (exp / "config.yaml").is_file() and (exp / "loss_curve.png").is_file()
    log = [json.loads(line) for line in (exp / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "train"] == [2, 4, 6]
    assert [r["step"] for r in log if r["event"] == "eval"] == [3]
    assert log[-1] == {**log[-1], "event": "end", "status": "FINISHED"}
    # adapter: PEFT files + our metadata with provenance
    adapter = project / "adapters" / "toddler_data_lora"
    assert res["adapter_dir"] == str(adapter)
    meta = json.loads((adapter / "lora_project.json").read_text())
    assert meta["dataset"]["name"] == "toddler_data" and len(meta["base_model"]["fingerprint"]) == 64
    assert meta["mlflow_run_id"] == res["mlflow_run_id"] and "torch" in meta["packages"]
    assert meta["config"]["lora"]["r"] == 4
    assert "git_commit" in meta and "created" in meta and "final_metrics" in meta
    # MLflow: finished run with params, per-step metrics, tags and artifacts
    client, run = _mlflow_run(project, res["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == "4" and run.data.params["training.seq_len"] == "16"
    assert run.data.tags["dataset_fingerprint"] == meta["dataset"]["fingerprint"]
    assert run.data.tags["base_model_fingerprint"] == meta["base_model"]["fingerprint"]
    assert "git_commit" in run.data.tags
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [2, 4, 6]
    assert run.data.metrics["val_perplexity"] == pytest.approx(res["metrics_after"]["perplexity"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "results.json", "loss_curve.png", "adapter"} <= artifacts
    assert (project / "mlruns" / "artifacts").is_dir()


def test_same_config_and_seed_give_identical_adapters(project):
    for name in ("a", "b"):
        proc = run_cli("train", "toddler_data", "--adapter-name", name, "--no-mlflow", "--no-progress",
                       cwd=project)
        assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("train", "toddler_data", "--adapter-name", "c", "--no-mlflow", "--no-progress",
                   "--set", "training.seed=43", cwd=project)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wa, wb, wc = (load_file(project / "adapters" / f"{n}_lora" / "adapter_model.safetensors") for n in "abc")
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)
    assert not all(wa[k].equal(wc[k]) for k in wa)
    assert sorted(p.name for p in (project / "experiments").iterdir()) == ["exp_001_a", "exp_002_b", "exp_003_c"]


def test_existing_adapter_is_not_overwritten_without_flag(project):
    assert run_cli("train", "toddler_data", "--no-mlflow", "--no-progress", cwd=project).returncode == 0
    before = snapshot(project / "adapters")
    proc = run_cli("train", "toddler_data", "--no-mlflow", cwd=project)
    assert_user_error(proc, "already exists", "--overwrite")
    assert snapshot(project / "adapters") == before
    proc = run_cli("train", "toddler_data", "--no-mlflow", "--no-progress", "--overwrite",
                   "--set", "training.seed=5", cwd=project)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert snapshot(project / "adapters") != before


@pytest.mark.parametrize("args, fragments", [
    (["train", "toddler_dta"], ["unknown dataset 'toddler_dta'", "did you mean 'toddler_data'"]),
    (["train", "toddler_data", "--set", "lora.r=0"], ["lora.r: must be >= 1"]),
    (["train", "toddler_data", "--set", "training.lr=-1", "--set", "training.sed=1"],
     ["training.lr: must be > 0", "did you mean 'seed'"]),
    (["train", "toddler_data", "--config", "missing.yaml"], ["config file not found"]),
    (["train", "../etc", "--adapter-name", "../x"], ["invalid adapter name"]),
    (["train", "toddler_data", "--set", "training.seq_len=20000"], ["fewer than one block"]),
    (["evaluate", "--text", "nope.txt"], ["file not found"]),
    (["evaluate", "--dataset", "kids"], ["not prepared", "lora-project prepare kids"]),
    (["evaluate", "--text", "config/dataset_catalog.csv", "--adapter", "adapters/none_lora"],
     ["adapter folder not found"]),
    (["evaluate", "--text", "config/dataset_catalog.csv", "--stride", "0"], ["--stride"]),
    (["prepare", "nothing_here"], ["unknown dataset"]),
    (["frobnicate"], ["invalid choice"]),
])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(project, args, fragments):
    before = snapshot(project)
    proc = run_cli(*args, cwd=project)
    assert_user_error(proc, *fragments)
    after = snapshot(project)
    # Only the lock file and a prepared dataset may appear; nothing that existed changed.
    assert {k: v for k, v in after.items() if k in before} == before
    assert not any(k.startswith(("adapters/", "experiments/")) and not k.endswith(".lock") for k in after)


def test_malformed_catalog_and_binary_config(project):
    (project / "config" / "dataset_catalog.csv").write_text('name,kind,location\n"unterminated,local,x\n')
    assert_user_error(run_cli("train", "toddler_data", cwd=project), "dataset_catalog.csv")
    (project / "config" / "training_config.yaml").write_bytes(b"\x00\x01\x02")
    assert_user_error(run_cli("train", "toddler_data", cwd=project), "binary")


def test_evaluate_json_agrees_with_direct_computation(project, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert run_cli("train", "toddler_data", "--no-mlflow", "--no-progress", cwd=project).returncode == 0
    text_file = project / "sample.txt"
    text = "mommy want juice. where ball?\nbye bye doggy!\n"
    text_file.write_text(text)
    adapter = project / "adapters" / "toddler_data_lora"
    proc = run_cli("evaluate", "--text", str(text_file), "--adapter", str(adapter), "--max-length", "8",
                   "--stride", "4", "--set", "training.precision=fp32", "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert set(out["models"]) == {"base", "toddler_data_lora"}
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]

    def direct(model):
        total = 0.0
        with torch.no_grad():
            for b in range(0, len(ids), 4):  # windows of 8 every 4: new targets are the last ones
                e = min(b + 8, len(ids))
                first = 1 if b == 0 else b + 4
                if first >= e:
                    break
                logp = torch.log_softmax(model(torch.tensor([ids[b:e - 1]])).logits[0].double(), -1)
                total -= sum(float(logp[j - 1 - b, ids[j]]) for j in range(first, e))
        return total

    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    expect_base = direct(base)
    expect_adapter = direct(PeftModel.from_pretrained(base, str(adapter)).eval())
    for name, expect in (("base", expect_base), ("toddler_data_lora", expect_adapter)):
        m = out["models"][name]
        assert m["tokens"] == len(ids) - 1 and m["bytes"] == len(text.encode())
        assert m["nll_sum"] == pytest.approx(expect, rel=1e-5)
        assert m["perplexity"] == pytest.approx(math.exp(expect / m["tokens"]), rel=1e-5)
        assert m["bits_per_byte"] == pytest.approx(expect / math.log(2) / m["bytes"], rel=1e-5)
    assert expect_adapter != pytest.approx(expect_base, rel=1e-4)


def test_failed_run_is_recorded_as_failed(project, tracking_store, monkeypatch):
    from lora_project.config import load_config
    from lora_project.paths import ProjectPaths
    from lora_project.training import trainer
    from lora_project.training.options import RunOptions
    from lora_project.training.single import train_adapter

    paths = ProjectPaths.discover()
    cfg = load_config([paths.model_config, paths.training_config])

    def broken_fit(self):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(trainer.LoraTrainer, "fit", broken_fit)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_adapter(paths, "toddler_data", cfg, RunOptions(progress=False, log=lambda m: None))
    res = json.loads((project / "experiments" / "exp_001_toddler_data" / "results.json").read_text())
    assert res["status"] == "FAILED" and "simulated crash" in res["error"]
    assert not (project / "adapters" / "toddler_data_lora").exists()
    _, run = _mlflow_run(project, res["mlflow_run_id"])
    assert run.info.status == "FAILED"


@pytest.mark.slow  # a real process (or the full quick benchmark): kept out of make test-fast
def test_sigterm_ends_run_killed_and_leaves_no_adapter(project, tracking_store):
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "lora_project", "train", "toddler_data", "--no-progress",
                             "--set", "training.max_steps=100000", "--set", "training.eval_interval=0"],
                            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = project / "experiments" / "exp_001_toddler_data" / "logs" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err
    # the one error line says what can be done: here no checkpoint interval was set, but the
    # interruption itself checkpoints, so the exact --resume command is named
    last = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(last) == 1 and last[0].startswith("error: interrupted; checkpoint of step "), err[-2000:]
    assert "lora-project train toddler_data --resume" in last[0]
    res = json.loads((project / "experiments" / "exp_001_toddler_data" / "results.json").read_text())
    assert res["status"] == "KILLED"
    _, run = _mlflow_run(project, res["mlflow_run_id"])
    assert run.info.status == "KILLED"
    assert not (project / "adapters" / "toddler_data_lora").exists()


def test_generate_data_and_prepare_cli(project):
    proc = run_cli("generate-data", "--kind", "kids", "--lines", "50", "--seed", "3", "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["lines"] == 50 and (project / "data" / "raw" / "kids.txt").read_text().count("\n") == 50
    first = run_cli("prepare", "--all", "--json", cwd=project)
    assert first.returncode == 0, first.stderr
    assert set(json.loads(first.stdout)) == {"toddler_data", "kids"}
    second = run_cli("prepare", "toddler_data", "kids", cwd=project)
    assert second.returncode == 0 and second.stdout.count("unchanged, skipped") == 2


def test_generate_data_refuses_to_replace_an_explicit_out_file(project):
    catalog = project / "config" / "dataset_catalog.csv"
    before = catalog.read_bytes()
    assert_user_error(run_cli("generate-data", "--kind", "kids", "--lines", "5", "--out", str(catalog), cwd=project),
                      "exists; pass --overwrite")
    assert catalog.read_bytes() == before
    assert_user_error(run_cli("generate-data", "--kind", "kids", "--out", str(project / "config"), cwd=project),
                      "is a folder")
    out = project / "mine.txt"
    assert run_cli("generate-data", "--kind", "kids", "--lines", "5", "--out", str(out), cwd=project).returncode == 0
    proc = run_cli("generate-data", "--kind", "kids", "--lines", "7", "--out", str(out), "--overwrite", cwd=project)
    assert proc.returncode == 0 and out.read_text().count("\n") == 7


def test_demo_runs_end_to_end_and_replaces_its_own_adapter(project):
    """`make demo`'s command on the tiny model (the real model's demo is in the slow tier's docs run)."""
    proc = run_cli("demo", "--set", "training.max_steps=2", "--no-mlflow", "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    ev = out["evaluation"]["models"]
    assert set(ev) == {"base", "toddler_data_demo_lora"} and all(m["perplexity"] > 1 for m in ev.values())
    assert out["train"]["status"] == "FINISHED" and out["train"]["steps"] == 2
    assert (project / "adapters" / "toddler_data_demo_lora" / "adapter_model.safetensors").is_file()
    again = run_cli("demo", "--set", "training.max_steps=2", "--no-mlflow", cwd=project)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "replacing the demo's previous adapter" in again.stdout and "test perplexity" in again.stdout
    assert len(list((project / "experiments").iterdir())) == 2


def test_extract_refuses_a_sidecar_in_the_way(project):
    (project / "src.txt").write_text("one line\nanother\n")
    (project / "q.txt.json").mkdir()  # a folder where the sidecar would go
    assert_user_error(run_cli("extract", "src.txt", "--out", "q.txt", cwd=project), "q.txt.json is a folder")
    assert not (project / "q.txt").exists()  # nothing half-written
    (project / "q.txt.json").rmdir()
    (project / "q.txt.json").write_text("keep me")
    assert_user_error(run_cli("extract", "src.txt", "--out", "q.txt", cwd=project), "exists; pass --overwrite")
    assert (project / "q.txt.json").read_text() == "keep me" and not (project / "q.txt").exists()
