"""Several seeds (`train --seeds`, `train-batch --seeds`) and adapter-name templates."""

from __future__ import annotations

import json

import pytest
from conftest import assert_user_error, run_cli
from safetensors.torch import load_file

from lora_project.config import build_config
from lora_project.errors import UserError
from lora_project.training.seeds import adapter_name, parse_seeds, seeded_runs


def test_seed_specs_and_templates():
    cfg = build_config({"training": {"seed": 42}, "lora": {"r": 8}})
    assert parse_seeds("3") == 3 and parse_seeds("1,7,42") == [1, 7, 42] and parse_seeds(None) is None
    for bad in ("0", "x", "1,1", "-1,2", "101"):
        with pytest.raises(UserError, match="--seeds"):
            parse_seeds(bad)
    assert [n for n, _ in seeded_runs("kids", cfg, 3, None)] == ["kids_s42", "kids_s43", "kids_s44"]
    runs = seeded_runs("kids", cfg, [7, 1], "{dataset}_r{r}_lr{lr}_s{seed}")
    assert [(n, c.training.seed) for n, c in runs] == [("kids_r8_lr0.0005_s7", 7), ("kids_r8_lr0.0005_s1", 1)]
    assert [n for n, _ in seeded_runs("kids", cfg, None, None, "mine")] == ["mine"]
    assert adapter_name("{dataset}/{targets}", "kids", cfg) == "kids-auto"  # the config's words; no folder escapes
    explicit = build_config({"lora": {"target_modules": ["q_proj", "v_proj"]}})
    assert adapter_name("{dataset}/{targets}", "kids", explicit) == "kids-q_proj-v_proj"
    with pytest.raises(UserError, match=r"unknown field \{rank\}; fields: \{dataset\}"):
        adapter_name("{dataset}_{rank}", "kids", cfg)


@pytest.mark.slow  # five tiny trainings; names and seed lists have a fast unit test
def test_train_seeds_and_batch_template(project):
    proc = run_cli("train", "kids", "--seeds", "2", "--json", "--no-progress", "--no-mlflow",
                   "--set", "training.max_steps=2", "--set", "training.eval_interval=0",
                   "--set", "training.warmup_steps=0", cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["seeds"] == [42, 43] and [r["adapter_name"] for r in out["runs"]] == ["kids_s42", "kids_s43"]
    a, b = (load_file(str(project / "adapters" / f"kids_s{s}_lora" / "adapter_model.safetensors")) for s in (42, 43))
    assert any(not (a[k] == b[k]).all() for k in a)  # different seeds, different adapters
    metas = [json.loads((project / "adapters" / f"kids_s{s}_lora" / "lora_project.json").read_text())
             for s in (42, 43)]
    assert [m["config"]["training"]["seed"] for m in metas] == [42, 43]
    # train-batch: a template that puts the rank in the name; a second rank does not overwrite.
    common = ["--json", "--no-progress", "--no-mlflow", "--set", "training.max_steps=1", "--set",
              "training.eval_interval=0", "--set", "training.warmup_steps=0", "--name-template", "{dataset}_r{r}_s{seed}"]
    proc = run_cli("train-batch", "kids", "--seeds", "2", "--set", "lora.r=4", *common, cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)["datasets"]
    assert [(x["adapter"], x["seed"], x["status"]) for x in rows] == [("kids_r4_s42_lora", 42, "trained"),
                                                                     ("kids_r4_s43_lora", 43, "trained")]
    proc = run_cli("train-batch", "kids", "--set", "lora.r=2", *common, cwd=project)  # no --seeds: training.seed
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in (project / "adapters").glob("kids_r*_lora")} == \
        {"kids_r4_s42_lora", "kids_r4_s43_lora", "kids_r2_s42_lora"}
    assert_user_error(run_cli("train-batch", "kids", "toddler_data", "--seeds", "2", "--name-template", "x_s{seed}",
                              "--no-mlflow", cwd=project), "would both be saved as adapter 'x_s42'")
    assert_user_error(run_cli("train-batch", "kids", "--seeds", "2", "--fused", "--no-mlflow", cwd=project),
                      "--seeds and --name-template work without --fused")


def test_mean_and_sd_across_seeds_by_hand():
    from lora_project.utils.seeding import mean_sd_across_seeds, seed_group

    assert seed_group("kids_s42_lora") == ("kids_lora", 42) and seed_group("kids_r8_s7") == ("kids_r8", 7)
    assert seed_group("kids") is None and seed_group("base") is None
    out = mean_sd_across_seeds({"base": 30.0, "kids_s43": 12.0, "kids_s42": 10.0, "kids_s44": 14.0,
                                "toddler_s42": 20.0, "toddler_s43": None, "other_s1": 1.0, "other": 5.0})
    assert set(out) == {"kids"}  # toddler has one seed with a number, other_s1 is alone
    assert out["kids"]["mean"] == 12.0 and out["kids"]["sd"] == pytest.approx(2.0)  # sqrt((4+0+4)/2)
    assert out["kids"]["seeds"] == [42, 43, 44] and out["kids"]["members"] == ["kids_s42", "kids_s43", "kids_s44"]
