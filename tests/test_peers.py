"""lm-evaluation-harness measured beside our minimal-pair scorer (`benchmark --blimp`, benchmark/peers.py)."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import REPO, SHARED_DATA, assert_user_error, run_cli

from lora_project.evaluation.minimal_pairs import Pair


def _pairs():
    return [Pair("A dog runs.", "A dog run.", "agr"), Pair("Dogs run.", "Dogs runs.", "agr"),
            Pair("Who left?", "Who left?", "odd/uid")]


def test_task_yamls_point_at_the_local_files_under_both_definitions(tmp_path):
    from lora_project.benchmark.lm_eval_peer import write_tasks

    pairs = _pairs()
    tasks = write_tasks(pairs, tmp_path)
    assert set(tasks) == {"babylm", "lm_eval"}
    for definition, delimiter in (("babylm", ""), ("lm_eval", " ")):
        assert sorted(tasks[definition].values()) == [[0, 1], [2]]
        for name, idx in tasks[definition].items():
            spec = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
            assert spec["task"] == name and "/" not in name and spec["target_delimiter"] == delimiter
            assert spec["dataset_path"] == "json" and spec["doc_to_text"] == "" and spec["doc_to_target"] == 0
            data = spec["dataset_kwargs"]["data_files"]["train"]
            rows = [json.loads(line) for line in open(data, encoding="utf-8")]
            assert [r["pair"] for r in rows] == idx  # doc_id k is pair idx[k]
            want = [(pairs[i].good, pairs[i].bad) for i in idx]
            assert [(r["sentence_good"], r["sentence_bad"]) for r in rows] == want
            assert data.startswith(str(tmp_path.resolve() / "data"))  # a UID never becomes a path


def test_agreement_uses_babylm_tie_rule_and_lists_near_ties():
    from lora_project.benchmark.peers import agreement

    pairs = _pairs() + [Pair("x y.", "y x.", "order")]
    ours = ([-10.0, -20.0, -5.0, -7.0], [-11.0, -19.0, -5.0, -7.00001])
    theirs = ([-10.00002, -20.0, -5.0, -7.0], [-11.0, -21.0, -5.0, -6.99999])
    a = agreement(pairs, ours, theirs)
    # pair 1 flips (a real disagreement), pair 3 flips within a near-tie; the exact tie is a win on both sides
    assert a["identical_decisions"] == 2 and a["differing"] == 2 and a["differing_outside_near_ties"] == 1
    assert a["near_ties"] == 2 and [e["pair"] for e in a["examples"]] == [1, 3]
    assert a["macro_ours"] == pytest.approx((0.5 + 1 + 1) / 3) and a["macro_lm_eval"] == pytest.approx((1 + 1 + 0) / 3)
    assert a["max_abs_margin_difference"] == pytest.approx(2.0)


def test_without_the_extra_the_report_says_so(monkeypatch, tmp_path):
    import lora_project.benchmark.peers as peers

    monkeypatch.setattr(peers, "lm_eval_version", lambda: None)
    out = peers.compare_with_lm_eval(None, tmp_path, log=lambda m: None)  # returns before loading anything
    assert out["available"] is False
    text = "\n".join(peers.peers_markdown(out))
    assert "lm-evaluation-harness is not installed" in text and ".[peers]" in text and "lm-eval==0.4.13" in text


def test_peer_options_need_blimp(project):
    assert_user_error(run_cli("benchmark", "--peer-pairs", "3", cwd=project), "--blimp")
    assert_user_error(run_cli("benchmark", "--no-peers", cwd=project), "--blimp")
    folder = project / "pairs"
    folder.mkdir()
    assert_user_error(run_cli("benchmark", "--blimp", str(folder), "--peer-pairs", "-1", "--no-mlflow", cwd=project),
                      "--peer-pairs")
    assert_user_error(run_cli("benchmark", "--peer-definitions", "babylm", cwd=project), "--blimp")
    assert_user_error(run_cli("benchmark", "--blimp", str(folder), "--no-peers", "--peer-definitions", "babylm",
                              cwd=project), "not with --no-peers")
    assert_user_error(run_cli("benchmark", "--blimp", str(folder), "--peer-definitions", "babylm,blimp",
                              "--no-mlflow", cwd=project), "unknown 'blimp'")
    assert not (project / "outputs" / "metrics").exists() or not any((project / "outputs" / "metrics").iterdir())


def test_peer_definitions_parse_to_a_subset_in_run_order():
    from lora_project.benchmark.peers import parse_definitions
    from lora_project.errors import UserError

    assert parse_definitions("babylm,lm_eval") == ("babylm", "lm_eval")
    assert parse_definitions(" lm_eval , babylm,babylm") == ("babylm", "lm_eval")  # BabyLM's first, each once
    assert parse_definitions("babylm") == ("babylm",)
    for bad, why in (("", "empty"), (" , ", "empty"), ("babylm,own", "unknown 'own'")):
        with pytest.raises(UserError, match=why):
            parse_definitions(bad)


BLIMP = SHARED_DATA / "babylm_2025" / "blimp_filtered"


@pytest.mark.slow  # the real model on both sides, lm-eval in its own process twice (~45 s)
def test_lm_eval_scores_our_sums_without_delimiter(project, tmp_path):
    pytest.importorskip("lm_eval", reason="the optional extra 'peers' (make setup installs it)")
    if not BLIMP.is_dir():
        pytest.skip(f"filtered BLiMP not found at {BLIMP}")
    from lora_project.benchmark.peers import compare_with_lm_eval, peers_markdown
    from lora_project.config import load_project_config
    from lora_project.paths import ProjectPaths

    (project / "config" / "model_config.yaml").write_text((REPO / "config" / "model_config.yaml").read_text())
    folder = tmp_path / "blimp"
    folder.mkdir()
    for name in ("anaphor_gender_agreement", "passive_1", "wh_questions_object_gap"):  # passive_1 holds a tie
        lines = (BLIMP / f"{name}.jsonl").read_text().splitlines()
        keep = lines[:5] + [line for line in lines if json.loads(line)["sentence_good"] ==
                            json.loads(line)["sentence_bad"]][:1]
        (folder / f"{name}.jsonl").write_text("\n".join(keep) + "\n")
    out = compare_with_lm_eval(load_project_config(ProjectPaths.discover()), folder, per_paradigm=0, log=lambda m: None)
    assert out["available"] and out["sample_pairs"] == out["full_pairs"] == 16 and out["ours"]["repeat_identical"]
    babylm, own = out["definitions"]["babylm"], out["definitions"]["lm_eval"]
    # BabyLM's definition is ours: the same margins up to float rounding, the same decisions (the tie included)
    assert babylm["identical_decisions"] == 16 and babylm["max_abs_margin_difference"] < 1e-3
    # lm-eval's leading space changes every sentence's tokens
    assert own["max_abs_margin_difference"] > 0.1
    assert babylm["pairs_per_second"] > 0 and out["ours"]["pairs_per_second"] > 0
    text = "\n".join(peers_markdown(out))
    assert "BabyLM's (no delimiter)" in text and "16 of 16" in text and out["cpu"]["model"] in text
