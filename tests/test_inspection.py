"""Inspection and merge: every number checked against a direct computation on tiny adapters."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_user_error, run_cli, snapshot

from lora_project.config import LoraSection
from lora_project.inspection.analysis import (
    analyse_weights,
    compare_adapters,
    select_modules,
    value_stats,
)
from lora_project.inspection.lora_math import factor_svd, subspace_similarity
from lora_project.models.lora_factors import BaseWeights, list_adapters, load_adapter


def make_adapter(tiny_model_dir, folder, seed, r=4, alpha=8, targets=("q_proj", "v_proj"), rslora=False):
    from transformers import AutoModelForCausalLM

    from lora_project.models.lora_model import save_adapter, wrap_with_lora

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = wrap_with_lora(base, LoraSection(r=r, alpha=alpha, dropout=0.0, target_modules=list(targets),
                                             use_rslora=rslora), seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    meta = {"base_model": {"name": "tiny", "fingerprint": "f" * 64, "directory": str(tiny_model_dir)},
            "dataset": {"name": f"d{seed}"}, "created": "2026-01-01T00:00:00"}
    return save_adapter(model, folder, meta, overwrite=False)


@pytest.fixture()
def two_adapters(tiny_model_dir, tmp_path):
    root = tmp_path / "adapters"
    return (make_adapter(tiny_model_dir, root / "one_lora", 1),
            make_adapter(tiny_model_dir, root / "two_lora", 2, rslora=True))


def test_weight_numbers_equal_direct_computation(two_adapters, tiny_model_dir):
    from safetensors.torch import load_file

    base = BaseWeights(tiny_model_dir)
    for path in two_adapters:
        adapter = load_adapter(path)
        cfg = json.loads((path / "adapter_config.json").read_text())
        scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
        raw = load_file(str(path / "adapter_model.safetensors"))
        report = analyse_weights(adapter, base, top_k=4)
        assert len(report["modules"]) == 4  # 2 layers x (q, v)
        w0_all = load_file(str(tiny_model_dir / "model.safetensors"))
        for row in report["modules"]:
            A = raw[row["name"] + ".lora_A.weight"].double()
            B = raw[row["name"] + ".lora_B.weight"].double()
            dW = scale * B @ A
            s = torch.linalg.svdvals(dW)
            w0 = w0_all[row["name"].removeprefix("base_model.model.") + ".weight"].double()
            assert row["A_fro_norm"] == pytest.approx(float(A.norm()), rel=1e-5)
            assert row["B_fro_norm"] == pytest.approx(float(B.norm()), rel=1e-5)
            assert row["delta_fro_norm"] == pytest.approx(float(dW.norm()), rel=1e-6)
            assert row["relative_update"] == pytest.approx(float(dW.norm() / w0.norm()), rel=1e-6)
            assert row["spectral_norm"] == pytest.approx(float(s[0]), rel=1e-6)
            assert np.allclose(row["singular_values"], s[:4].numpy(), rtol=1e-6, atol=1e-9)
            assert row["stable_rank"] == pytest.approx(float((s ** 2).sum() / s[0] ** 2), rel=1e-6)
            p = s[:4] ** 2 / (s[:4] ** 2).sum()
            assert row["effective_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6)
            # amplification: ||dW|| / ||U^T W0 V|| with U, V from the full SVD of dW
            u, _, vh = torch.linalg.svd(dW)
            proj = u[:, :4].T @ w0 @ vh[:4].T
            assert row["amplification"] == pytest.approx(float(dW.norm() / proj.norm()), rel=1e-5)
        assert set(report["by_module"]) == {"q_proj", "v_proj"} and set(report["by_layer"]) == {"0", "1"}


def test_factor_svd_on_random_factors_matches_full_svd():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(6, 40, generator=g), torch.randn(30, 6, generator=g)
    svd = factor_svd(A, B, 0.5)
    full = 0.5 * B.double() @ A.double()
    assert torch.allclose(svd.singular_values, torch.linalg.svdvals(full)[:6], rtol=1e-9)
    recon = svd.left @ torch.diag(svd.singular_values) @ svd.right.T
    assert torch.allclose(recon, full, atol=1e-9)


def test_subspace_similarity_self_and_random():
    g = torch.Generator().manual_seed(0)
    k, r = 400, 8
    a = factor_svd(torch.randn(r, k, generator=g), torch.randn(50, r, generator=g), 1.0)
    assert subspace_similarity(a.right, a.right, r, r) == pytest.approx(1.0)
    assert subspace_similarity(a.right, a.right, 3, 5) == pytest.approx(1.0)
    vals = []
    for seed in range(20):
        g2 = torch.Generator().manual_seed(seed + 1)
        b = factor_svd(torch.randn(r, k, generator=g2), torch.randn(50, r, generator=g2), 1.0)
        vals.append(subspace_similarity(a.right, b.right, r, r))
    assert np.mean(vals) == pytest.approx(r / k, rel=0.25)  # E phi = max(i, j) / k for random subspaces


def test_compare_report_and_refusals(two_adapters, tiny_model_dir, tmp_path):
    a, b = (load_adapter(p) for p in two_adapters)
    report = compare_adapters(a, a, BaseWeights(tiny_model_dir))
    assert all(r["phi_full"] == pytest.approx(1.0) for r in report["modules"])
    report = compare_adapters(a, b, BaseWeights(tiny_model_dir), max_rank=2)
    assert len(report["modules"][0]["phi"]) == 2 and 0 <= report["mean_phi_full"] <= 1
    meta = json.loads((two_adapters[1] / "lora_project.json").read_text())
    meta["base_model"]["fingerprint"] = "e" * 64
    (two_adapters[1] / "lora_project.json").write_text(json.dumps(meta))
    from lora_project.errors import UserError

    with pytest.raises(UserError, match="different base models"):
        compare_adapters(a, load_adapter(two_adapters[1]), None)


def test_listing_reports_broken_adapters_and_never_crashes(two_adapters, tiny_model_dir):
    root = two_adapters[0].parent
    (root / "empty_lora").mkdir()
    corrupt = root / "corrupt_lora"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((two_adapters[0] / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"garbage" * 10)
    wide = make_adapter(tiny_model_dir, root / "wrongbase_lora", 3)
    meta = json.loads((wide / "lora_project.json").read_text())
    # Point it at a base whose shapes do not fit: a hidden-48 Llama.
    from transformers import LlamaConfig, LlamaForCausalLM

    other = root.parent / "wide_base"
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    meta["base_model"]["directory"] = str(other)
    (wide / "lora_project.json").write_text(json.dumps(meta))
    rows = {r["name"]: r for r in list_adapters(root)}
    assert rows["one_lora"]["status"] == "ok" and rows["one_lora"]["r"] == 4
    assert rows["one_lora"]["trainable_parameters"] == 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4)
    assert rows["empty_lora"]["status"] == "broken" and "missing" in rows["empty_lora"]["reason"]
    assert rows["corrupt_lora"]["status"] == "broken" and "corrupt" in rows["corrupt_lora"]["reason"]
    assert rows["wrongbase_lora"]["status"] == "broken" and "expects a 32x32 base weight" in rows["wrongbase_lora"]["reason"]


def test_module_glob_and_values(two_adapters):
    adapter = load_adapter(two_adapters[0])
    mods = select_modules(adapter, "*.layers.1.self_attn.q_proj")
    assert [m.name for m in mods] == ["base_model.model.model.layers.1.self_attn.q_proj"]
    assert len(select_modules(adapter, "*v_proj")) == 2
    from lora_project.errors import UserError

    with pytest.raises(UserError, match="matches nothing.*close names"):
        select_modules(adapter, "base_model.model.model.layers.1.self_attn.q_prj")
    x = np.array([[0.0, 1.0], [-2.0, 3.0]])
    st = value_stats(x)
    assert st["mean"] == 0.5 and st["min"] == -2 and st["max"] == 3 and st["mean_abs"] == 1.5
    assert st["near_zero_fraction"] == 0.25 and st["quantiles"]["p50"] == 0.5


def test_cli_inspect_commands(project, tiny_model_dir):
    a = make_adapter(tiny_model_dir, project / "adapters" / "one_lora", 1)
    b = make_adapter(tiny_model_dir, project / "adapters" / "two_lora", 2)
    out = json.loads(run_cli("inspect", "adapters", "--json", "--sort", "r", cwd=project).stdout)
    assert [r["name"] for r in out["adapters"]] == ["one_lora", "two_lora"]
    proc = run_cli("inspect", "weights", str(a), "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    for m in rep["modules"]:
        assert {"name", "delta_fro_norm", "relative_update", "singular_values", "stable_rank",
                "effective_rank"} <= set(m)
    assert all(p.endswith(".png") and (project / p).exists() for p in rep["plots"])
    proc = run_cli("inspect", "values", str(a), "--module", "*layers.0*q_proj", "--export", "npy", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert "near-zero" in proc.stdout
    exported = sorted((project / "outputs" / "metrics" / "inspect" / "one_lora").glob("*.npy"))
    assert len(exported) == 3
    dW = np.load(next(p for p in exported if ".delta." in p.name), allow_pickle=False)
    adapter = load_adapter(a)
    m = select_modules(adapter, "*layers.0*q_proj")[0]
    assert np.allclose(dW, m.scale * (m.B @ m.A).numpy(), atol=1e-6)
    proc = run_cli("inspect", "compare", str(a), str(b), "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["a"] == "one_lora"
    assert_user_error(run_cli("inspect", "values", str(a), "--module", "nothing_like_this", cwd=project),
                      "matches nothing")
    assert_user_error(run_cli("inspect", "weights", str(project / "adapters" / "nope_lora"), cwd=project),
                      "adapter folder not found")


def test_merge_linear_cat_and_exported_model(project, tiny_model_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    a = make_adapter(tiny_model_dir, project / "adapters" / "one_lora", 1)
    b = make_adapter(tiny_model_dir, project / "adapters" / "two_lora", 2)
    # The tiny adapters claim fingerprint 'fff...'; use a model config matching the tiny base.
    for p in (a, b):
        meta = json.loads((p / "lora_project.json").read_text())
        meta["base_model"].pop("fingerprint")
        (p / "lora_project.json").write_text(json.dumps(meta))
    proc = run_cli("merge", str(a), str(b), "--name", "both", "--method", "cat", "--weights", "0.7,0.3",
                   "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = load_adapter(project / "adapters" / "both_lora")
    la, lb = load_adapter(a), load_adapter(b)
    for m in merged.modules:
        ma = next(x for x in la.modules if x.name == m.name)
        mb = next(x for x in lb.modules if x.name == m.name)
        expect = 0.7 * ma.scale * ma.B @ ma.A + 0.3 * mb.scale * mb.B @ mb.A
        assert torch.allclose(m.scale * m.B @ m.A, expect, atol=1e-5)
    assert json.loads((project / "adapters" / "both_lora" / "lora_project.json").read_text())["merge_method"] == "cat"

    proc = run_cli("merge", str(a), "--export-model", str(project / "merged_model"), cwd=project)
    assert proc.returncode == 0, proc.stderr[-2000:]
    x = torch.tensor([[1, 7, 30, 12, 9]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        expect = PeftModel.from_pretrained(base, str(a)).eval()(x).logits
        got = AutoModelForCausalLM.from_pretrained(project / "merged_model").eval()(x).logits
    assert torch.allclose(got, expect, atol=1e-5)
    assert load_file(str(project / "merged_model" / "model.safetensors"))
    before = snapshot(project / "adapters")
    assert_user_error(run_cli("merge", str(a), str(b), "--name", "both", cwd=project), "already exists")
    assert_user_error(run_cli("merge", str(a), str(b), "--name", "x", "--weights", "1", cwd=project), "--weights")
    assert_user_error(run_cli("merge", str(a), str(b), "--name", "x", "--weights", "nan,1", cwd=project), "finite")
    assert_user_error(run_cli("merge", str(a), str(a), "--name", "x", cwd=project), "named twice")
    assert snapshot(project / "adapters") == before
    # --overwrite replaces an earlier export, never a folder that is not one
    assert (project / "merged_model" / "lora_project_export.json").is_file()
    proc = run_cli("merge", str(a), "--export-model", str(project / "merged_model"), "--overwrite", cwd=project)
    assert proc.returncode == 0, proc.stderr[-2000:]
    notes = project / "notes"
    notes.mkdir()
    (notes / "ideas.txt").write_text("keep me")
    assert_user_error(run_cli("merge", str(a), "--export-model", str(notes), "--overwrite", cwd=project),
                      "not a model folder exported by lora-project")
    assert (notes / "ideas.txt").read_text() == "keep me"


@pytest.mark.parametrize("damage, message", [
    ("config-list", "expected a JSON object"),
    ("config-rank", "'r' must be a positive integer"),
    ("config-type", "is not a LoRA adapter"),
    ("nan-weights", "NaN or infinite"),
    ("wrong-targets", "the adapter would do nothing"),
    ("rank-mismatch", "has rank 4 but adapter_config.json says r=8"),
])
def test_every_malformed_adapter_is_one_clear_error(tiny_model_dir, tmp_path, damage, message):
    from safetensors.torch import load_file, save_file

    from lora_project.errors import UserError
    from lora_project.models.adapter import check_adapter_dir

    d = make_adapter(tiny_model_dir, tmp_path / "bad_lora", 1)
    cfg_path, weights_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    cfg = json.loads(cfg_path.read_text())
    if damage == "config-list":
        cfg_path.write_text("[1, 2]")
    elif damage == "config-rank":
        cfg_path.write_text(json.dumps({**cfg, "r": "eight"}))
    elif damage == "config-type":
        cfg_path.write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    elif damage == "wrong-targets":
        cfg_path.write_text(json.dumps({**cfg, "target_modules": ["k_proj"]}))
    elif damage == "rank-mismatch":
        cfg_path.write_text(json.dumps({**cfg, "r": 8}))
    else:
        tensors = load_file(str(weights_path))
        key = next(k for k in tensors if "lora_B" in k)
        tensors[key][0, 0] = float("nan")
        save_file(tensors, str(weights_path))
    with pytest.raises(UserError, match=message):
        check_adapter_dir(d)
    rows = {r["name"]: r for r in list_adapters(tmp_path)}
    assert rows["bad_lora"]["status"] == "broken" and message.split("'")[0][:12] in rows["bad_lora"]["reason"]
