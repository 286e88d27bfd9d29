"""`lora-project sweep`: a grid sweep on the tiny model, MLflow parent/child runs, the best config
reproducing its trial, pruning, bad --param input, Ctrl-C then --resume, and the LoRA variants."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import assert_user_error, run_cli

GRID = ["--param", "lora.r=2,4", "--param", "training.lr=0.003,0.01", "--sampler", "grid"]


def _client(project):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")


@pytest.mark.slow  # five tiny trainings (~12 s on a quiet machine): over the fast tier's budget
def test_grid_sweep_children_table_plots_and_best_config_reproduces(project, tracking_store):
    proc = run_cli("sweep", "toddler_data", *GRID, "--name", "g", "--no-progress", "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    rows = summary["trials"]
    assert len(rows) == 4
    assert sorted((r["lora.r"], r["training.lr"]) for r in rows) == [(2, 0.003), (2, 0.01), (4, 0.003), (4, 0.01)]
    done = [r for r in rows if r["state"] == "COMPLETE"]
    assert done and [r["value"] for r in done] == sorted(r["value"] for r in done)  # sorted by the metric
    assert all(r["state"] in ("COMPLETE", "PRUNED") for r in rows), rows

    # one parent run, four children, sampled values as params, the outcome as a tag
    client = _client(project)
    exp = client.get_experiment_by_name("tests")
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags["kind"] == "sweep" and parent.info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    by_trial = {int(c.data.params["sweep.trial"]): c for c in children}
    for r in rows:
        c = by_trial[r["trial"]]
        assert c.data.params["sweep.lora.r"] == str(r["lora.r"])
        assert float(c.data.params["sweep.training.lr"]) == r["training.lr"]
        assert c.data.tags["sweep.trial_state"] == r["state"]
        assert c.info.status == ("FINISHED" if r["state"] == "COMPLETE" else "FAILED")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_config.yaml", "metric_vs_params.png", "optimization_history.png", "param_importances.png",
            "table.md", "summary.json"} <= artifacts
    folder = project / "outputs" / "sweeps" / "g"
    for f in ("metric_vs_params.png", "optimization_history.png", "param_importances.png"):
        assert (folder / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(summary["importances"]) == {"lora.r", "training.lr"}

    # the best config is a file `train --config` accepts, and it reproduces the best trial's metric
    from lora_project.config import load_config

    best = summary["best"]
    cfg = load_config([folder / "best_config.yaml"])
    assert (cfg.lora.r, cfg.training.lr) == (best["params"]["lora.r"], best["params"]["training.lr"])
    again = run_cli("train", "toddler_data", "--config", str(folder / "best_config.yaml"), "--adapter-name", "again",
                    "--no-mlflow", "--no-progress", "--json", cwd=project)
    assert again.returncode == 0, again.stderr[-2000:]
    value = json.loads(again.stdout)["metrics_after"]["perplexity"]
    assert abs(value - best["value"]) <= 1e-6 * abs(best["value"]), (value, best["value"])


def test_pruning_callback_stops_a_trial_worse_than_the_median():
    import optuna

    from lora_project.sweep.study import PruningCallback
    from lora_project.training.callbacks import TrainState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    state = TrainState(10, 1)
    state.step = 5
    for loss in (1.0, 1.2):  # two finished trials set the median at step 5
        t = study.ask()
        PruningCallback(t).on_eval(state, {"val_loss": loss})
        study.tell(t, loss)
    good = study.ask()
    PruningCallback(good).on_eval(state, {"val_loss": 0.9})  # better than the median: goes on
    bad = study.ask()
    with pytest.raises(optuna.TrialPruned, match="pruned at step 5"):
        PruningCallback(bad).on_eval(state, {"val_loss": 3.0})


@pytest.mark.parametrize("params, fragments", [
    (["lora.r=0,4"], ["--param lora.r=0,4", "value 0", "lora.r: must be >= 1"]),
    (["training.lr=0:1e-3:log"], ["log range needs a low end above 0"]),
    (["training.lr=1e-3:1e-4"], ["low end must be below its high end"]),
    (["training.lr=abc:1"], ["'abc' is not a number"]),
    (["training.lr=1e-4:2"], ["value 2", "training.lr: must be <= 1"]),
    (["lora.alpah=4,8"], ["unknown key 'lora.alpah'", "did you mean 'alpha'"]),
    (["lora.r=4,4"], ["listed twice"]),
    (["lora.r=4", "lora.r=8"], ["given twice"]),
    (["lora.r"], ["expected section.key=V1,V2"]),
    (["model.source=a,b"], ["cannot be swept"]),
    (["lora.target_modules=q_proj+v_proj,q_proj+nope_proj"], ["value q_proj+nope_proj", "nope_proj not found"]),
    (["lora.init_lora_weights=default,pissa"], ["'pissa' is not one of default, gaussian, orthogonal"]),
    (["lora.r=3,4", "lora.init_lora_weights=default,orthogonal"], ["grid point lora.r=3", "needs an even lora.r"]),
    (["training.lr=1e-4:1e-3"], ["--sampler grid needs lists of values"]),
    ([], ["at least one --param"]),
])
def test_bad_params_exit_2_before_anything_is_written(project, params, fragments):
    args = [a for p in params for a in ("--param", p)]
    proc = run_cli("sweep", "toddler_data", *args, "--sampler", "grid", "--no-progress", cwd=project)
    assert_user_error(proc, *fragments)
    assert not (project / "outputs" / "sweeps").exists() and not (project / "experiments").exists()


def test_bad_sweep_requests_exit_2(project):
    assert_user_error(run_cli("sweep", "toddler_data", "--param", "lora.r=2,4", "--resume", cwd=project),
                      "no sweep 'toddler_data_sweep' to resume")
    assert_user_error(run_cli("sweep", "toddler_data", "--param", "lora.r=2,4", "--trials", "0", cwd=project),
                      "--trials: must be an integer from 1 to")
    assert_user_error(run_cli("sweep", "toddler_data", "--param", "lora.r=2,4", "--name", "../x", cwd=project),
                      "invalid sweep name")
    assert_user_error(run_cli("sweep", "toddler_data", "--param", "lora.r=2,4", "--sampler", "bayes", cwd=project),
                      "invalid choice")
    assert_user_error(run_cli("sweep", "toddler_dta", "--param", "lora.r=2,4", cwd=project),
                      "did you mean 'toddler_data'")
    assert not (project / "outputs" / "sweeps").exists()


def _study(project, name):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=f"sqlite:///{project / 'outputs' / 'sweeps' / name / 'study.db'}")


@pytest.mark.slow  # a real process stopped by SIGINT, then resumed
def test_sigint_mid_sweep_then_resume_reruns_only_the_interrupted_and_unstarted_trials(project, tracking_store):
    args = ["sweep", "toddler_data", *GRID, "--name", "s", "--no-progress",
            "--set", "training.max_steps=20", "--set", "training.eval_interval=0", "--set", "training.log_interval=1",
            "--set", "training.eval_max_tokens=200"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "lora_project", *args], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    # stop as soon as trial 1 is training (its first step is logged; trial 0 finished before it)
    while time.time() < deadline and proc.poll() is None:
        if list((project / "experiments").glob("exp_*_s_t001/logs/metrics.jsonl")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "--resume" in err

    study = _study(project, "s")
    states = {t.number: t.state.name for t in study.trials}
    assert states[0] == "COMPLETE" and states[1] == "FAIL", states
    first_params = {t.number: t.params for t in study.trials}
    rerun = [t for t in study.trials if t.user_attrs.get("rerun_of") == 1]
    assert len(rerun) == 1 and rerun[0].state.name == "WAITING"
    client = _client(project)
    killed = client.get_run(json.loads(next((project / "experiments").glob("exp_*_s_t001"))
                                       .joinpath("results.json").read_text())["mlflow_run_id"])
    assert killed.info.status == "KILLED"

    resumed = run_cli("sweep", "toddler_data", "--name", "s", "--resume", "--no-progress", "--json",
                      "--set", "training.max_steps=20", "--set", "training.eval_interval=0",
                      "--set", "training.log_interval=1", "--set", "training.eval_max_tokens=200", cwd=project)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = _study(project, "s")
    trials = study.trials
    done = [t for t in trials if t.state.name == "COMPLETE"]
    # every grid point finished exactly once; trial 0 was not trained again
    assert sorted((t.params["lora.r"], t.params["training.lr"]) for t in done) == \
        [(2, 0.003), (2, 0.01), (4, 0.003), (4, 0.01)]
    assert [t.number for t in done if t.params == first_params[0]] == [0]
    assert len(list((project / "experiments").glob("exp_*_s_t000"))) == 1
    reruns = [t for t in trials if t.user_attrs.get("rerun_of") == 1]
    assert len(reruns) == 1 and reruns[0].params == first_params[1] and reruns[0].state.name == "COMPLETE"
    # the rerun started from step 0: its log begins at step 1
    rec = json.loads(resumed.stdout)
    row = next(r for r in rec["trials"] if r["trial"] == reruns[0].number)
    first_line = json.loads((project / "experiments" / row["experiment_dir"].rsplit("/", 1)[-1] / "logs" /
                             "metrics.jsonl").read_text().splitlines()[0])
    assert first_line["step"] == 1
    assert {r["state"] for r in rec["trials"]} == {"COMPLETE", "INTERRUPTED"}
    parent = client.get_run(rec["parent_run_id"])
    assert parent.info.status == "FINISHED"


def test_lora_variants_are_validated_wired_and_recorded(project, tiny_model_dir):
    from lora_project.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="needs an even lora.r"):
        load_config([], ["lora.r=3", "lora.init_lora_weights=orthogonal"])
    with pytest.raises(ConfigError, match="not one of default, gaussian, orthogonal"):
        load_config([], ["lora.init_lora_weights=olora"])
    proc = run_cli("train", "toddler_data", "--adapter-name", "dora", "--set", "lora.use_dora=true",
                   "--set", "lora.init_lora_weights=gaussian", "--no-mlflow", "--no-progress", "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from safetensors import safe_open

    from lora_project.models.adapter import read_metadata

    adapter = project / "adapters" / "dora_lora"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["init_lora_weights"] == "gaussian"
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        assert any("lora_magnitude_vector" in k for k in f.keys())
    assert read_metadata(adapter).lora_variant == {"use_rslora": False, "use_dora": True,
                                                   "init_lora_weights": "gaussian"}
    # weight inspection and merging assume dW = scale * B @ A: refused for DoRA, with the reason
    assert_user_error(run_cli("inspect", "weights", str(adapter), cwd=project), "DoRA adapter", "magnitude")
    assert_user_error(run_cli("merge", str(adapter), "--name", "m", cwd=project), "DoRA adapter")
    # baking it into the weights is PEFT's own DoRA merge: the exported model gives base + adapter's logits
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    proc = run_cli("merge", str(adapter), "--export-model", str(project / "dora_model"), cwd=project)
    assert proc.returncode == 0, proc.stderr[-2000:]
    x = torch.tensor([[1, 7, 30, 12, 9]])
    with torch.no_grad():
        expect = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(),
                                           str(adapter)).eval()(x).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(x).logits
        got = AutoModelForCausalLM.from_pretrained(project / "dora_model").eval()(x).logits
    assert torch.allclose(got, expect, atol=1e-5) and not torch.allclose(got, plain, atol=1e-4)


def test_adapters_trained_before_the_variant_fields_still_count_as_up_to_date(tmp_path):
    from lora_project.config import RunConfig
    from lora_project.paths import ProjectPaths
    from lora_project.training.batch import is_up_to_date

    paths = ProjectPaths(tmp_path)
    cfg = RunConfig()
    old = cfg.to_dict()
    del old["lora"]["use_dora"], old["lora"]["init_lora_weights"]  # as written before these fields existed
    folder = paths.adapter("old")
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"")
    meta = {"format": "lora_project.adapter/1", "config": old, "dataset": {"fingerprint": "d"},
            "base_model": {"fingerprint": "b"}}
    (folder / "lora_project.json").write_text(json.dumps(meta))
    assert is_up_to_date(paths, "old", cfg, "d", "b")
    old["lora"]["use_dora"] = True  # a recorded non-default value still differs
    (folder / "lora_project.json").write_text(json.dumps(meta))
    assert not is_up_to_date(paths, "old", cfg, "d", "b")
