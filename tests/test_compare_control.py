"""`inspect compare`'s init control: the initial A re-created from the seed, and learned similarity."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import TINY_TEXT, run_cli

from lora_project.config import LoraSection
from lora_project.inspection.analysis import compare_adapters
from lora_project.inspection.report import init_of
from lora_project.models.lora_factors import load_adapter
from lora_project.models.lora_init import initial_lora_A

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["down_proj", "q_proj", "o_proj", "up_proj"]])
def test_initial_A_is_exactly_what_wrap_with_lora_creates(tiny_model_dir, targets):
    from transformers import AutoModelForCausalLM

    from lora_project.models.lora_model import wrap_with_lora

    section = LoraSection(r=3, alpha=6, dropout=0.1, target_modules=targets)
    model = wrap_with_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), section, 11)
    real = {k.replace(".lora_A.default.weight", ""): p.detach() for k, p in model.named_parameters() if "lora_A" in k}
    torch.manual_seed(5)
    random.seed(5)
    expected_next = (torch.rand(3), random.random())
    torch.manual_seed(5)
    random.seed(5)
    again = initial_lora_A(tiny_model_dir, section, 11)
    assert (torch.equal(torch.rand(3), expected_next[0]) and random.random() == expected_next[1]), \
        "the caller's random state must be left as it was"
    assert set(again) == set(real) and len(real) == 2 * len(targets)
    assert all(torch.equal(again[k], real[k]) for k in real)
    other_seed = initial_lora_A(tiny_model_dir, section, 12)
    assert not any(torch.equal(other_seed[k], real[k]) for k in real)


def _train(base_dir, seed: int, text: str, out):
    """A short full-batch AdamW run of one adapter (small lr: A stays near its init, as in real runs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_project.models.lora_model import save_adapter, wrap_with_lora

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = wrap_with_lora(AutoModelForCausalLM.from_pretrained(base_dir), LoraSection(**LORA), seed)
    ids = torch.tensor(tok(text)["input_ids"])
    batch = ids[: len(ids) // 32 * 32].view(-1, 32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.002)
    for _ in range(20):
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    meta = {"base_model": {"name": "tiny", "fingerprint": "f" * 64, "directory": str(base_dir)},
            "config": {"training": {"seed": seed}, "lora": LORA}, "origin": "trained"}
    return save_adapter(model, out, meta, overwrite=False)


def test_learned_similarity_orders_pairs_the_right_way_round(project, tiny_model_dir):
    text_x = " ".join(TINY_TEXT * 4)
    # Same length and layout, different letters: different data for the same model.
    text_y = "".join(chr(ord("a") + ord(c) * 7 % 26) if c.isalpha() else c for c in text_x)
    root = project / "adapters"
    x1 = _train(tiny_model_dir, 1, text_x, root / "x_s1_lora")
    y1 = _train(tiny_model_dir, 1, text_y, root / "y_s1_lora")
    x2 = _train(tiny_model_dir, 2, text_x, root / "x_s2_lora")
    a, b, c = (load_adapter(p) for p in (x1, y1, x2))
    ia, ib, ic = (init_of(x)[1] for x in (a, b, c))
    same_seed = compare_adapters(a, b, None, None, ia, ib)     # different data
    same_data = compare_adapters(a, c, None, None, ia, ic)     # different seed
    # Raw phi: the shared start makes different data look alike (the misleading order) ...
    assert same_seed["mean_phi_full"] > same_data["mean_phi_full"] + 0.3
    # ... the learned change puts the same data first.
    assert same_data["mean_learned_phi_full"] > same_seed["mean_learned_phi_full"] + 0.1
    assert same_data["mean_learned_phi_top1"] > same_seed["mean_learned_phi_top1"] + 0.1
    # Each adapter's update still lies mostly in its own initial A's row space.
    assert same_seed["mean_init_phi_a"] > 0.8 and 0 < same_seed["mean_A_change_a"] < 1

    proc = run_cli("inspect", "compare", str(x1), str(y1), cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert "share their initialisation (seed 1" in proc.stdout and "learned change (A - A_init)" in proc.stdout
    proc = run_cli("inspect", "compare", str(x1), str(x2), "--json", cwd=project)
    report = json.loads(proc.stdout)
    assert report["init"]["shared"] is False and report["init"]["b"]["seed"] == 2
    assert np.isclose(report["mean_learned_phi_full"], same_data["mean_learned_phi_full"])
