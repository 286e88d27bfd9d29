"""Minimal pairs: scores equal a direct computation; aggregation; bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHARED_DATA, assert_user_error, run_cli

from lora_project.errors import UserError
from lora_project.evaluation.minimal_pairs import (
    Pair,
    accuracy_report,
    load_pairs,
    sample_pairs,
    sentence_logprobs,
)
from lora_project.utils.device import resolve_runtime


def test_sentence_scores_equal_direct_sum_of_logprobs(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    sentences = ["the dog runs.", "mommy want juice.", "a", "the bird sings in the tree on a big red truck."]
    got = sentence_logprobs(model, tok, sentences, resolve_runtime("cpu", "fp32", 1), batch_tokens=20)
    for s, g in zip(sentences, got):
        ids = [tok.bos_token_id] + tok(s, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        direct = sum(float(logp[i - 1, ids[i]]) for i in range(1, len(ids)))
        assert g == pytest.approx(direct, rel=1e-5, abs=1e-4)


def test_accuracy_aggregation_on_hand_made_pairs():
    pairs = [Pair("g", "b", "p1", "syntax", "t1"), Pair("g", "b", "p1", "syntax", "t1"),
             Pair("g", "b", "p2", "morphology", "t2"), Pair("g", "b", "p2", "morphology", "t2"),
             Pair("g", "b", "p2", "morphology", "t3")]
    good = [-1.0, -5.0, -1.0, -1.0, -1.0]
    bad = [-2.0, -4.0, -2.0, -2.0, -1.0]  # correct: T F T T F (a tie is not correct)
    r = accuracy_report(pairs, good, bad)
    assert r["paradigms"] == {"p1": {"accuracy": 0.5, "pairs": 2}, "p2": {"accuracy": 2 / 3, "pairs": 3}}
    assert r["macro_accuracy"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert r["micro_accuracy"] == pytest.approx(3 / 5)
    assert r["terms"]["t3"] == {"accuracy": 0.0, "pairs": 1}
    assert r["fields"]["morphology"]["accuracy"] == pytest.approx(2 / 3)


def test_loading_uid_fallback_limit_and_bad_lines(tmp_path):
    f = tmp_path / "agreement.jsonl"
    lines = [json.dumps({"sentence_good": f"good {i}", "sentence_bad": f"bad {i}"}) for i in range(10)]
    f.write_text("\n".join(lines[:5] + ["{broken", json.dumps({"sentence_good": "x"})] + lines[5:]) + "\n")
    warnings = []
    pairs = load_pairs(f, warn=warnings.append)
    assert len(pairs) == 10 and {p.uid for p in pairs} == {"agreement"}
    assert "line 6: not valid JSON" in warnings[0] and "line 7: no 'sentence_bad' field" in warnings[0]
    with pytest.raises(UserError, match="2 bad line"):
        load_pairs(f, strict=True)
    a, b = sample_pairs(pairs, 3, seed=1), sample_pairs(pairs, 3, seed=1)
    assert a == b and len(a) == 3
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="no usable minimal pairs"):
        load_pairs(empty)


def test_cli_pairs_with_adapter(project, tiny_model_dir, tmp_path):
    trained = run_cli("train", "toddler_data", "--no-progress", "--json", cwd=project)
    assert trained.returncode == 0
    run_id = json.loads(trained.stdout)["mlflow_run_id"]
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps({"sentence_good": g, "sentence_bad": b, "UID": u, "field": "syntax"})
                           for g, b, u in [("the dog runs.", "the dog run.", "agr"), ("more cookie.", "cookie more.", "order"),
                                           ("where ball?", "ball where?", "order")]) + "\n")
    proc = run_cli("evaluate", "--pairs", str(f), "--adapter", "adapters/toddler_data_lora", "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert set(out["models"]) == {"base", "toddler_data_lora"}
    for m in out["models"].values():
        assert set(m["paradigms"]) == {"agr", "order"} and m["paradigms"]["order"]["pairs"] == 2
        assert 0 <= m["macro_accuracy"] <= 1
    diff = out["difference"]["toddler_data_lora"]["macro_accuracy"]
    assert diff == pytest.approx(out["models"]["toddler_data_lora"]["macro_accuracy"] - out["models"]["base"]["macro_accuracy"])
    assert list((project / "outputs" / "metrics").glob("minimal_pairs_*.json"))
    # linked to the adapter's training run
    from mlflow.tracking import MlflowClient

    assert out["mlflow_runs_updated"] == [run_id]
    run = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}").get_run(run_id)
    assert run.data.metrics["pairs_macro_accuracy"] == pytest.approx(out["models"]["toddler_data_lora"]["macro_accuracy"])
    assert_user_error(run_cli("evaluate", "--pairs", str(tmp_path / "none.jsonl"), cwd=project), "not found")


@pytest.mark.skipif(not (SHARED_DATA / "blimp").is_dir(), reason="../shared/data/blimp is absent")
def test_shared_blimp_loads_all_paradigms():
    pairs = load_pairs(SHARED_DATA / "blimp", strict=True)
    assert len({p.uid for p in pairs}) == 67 and len(pairs) == 67_000
    assert all(p.field for p in pairs)
