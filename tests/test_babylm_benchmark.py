"""`benchmark --babylm`: the official strategy reproduced in-process against our prefix tree: equal
sums on every task shape, forward positions counted by hand, arguments refused in one line, the
section end to end on tiny data, and (slow) on a tiny sample of the real suite."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHARED_DATA, assert_user_error, run_cli
from test_babylm import ITEMS, RUNTIME, _tiny_suite

from lora_project.benchmark.babylm import (
    DEFAULT_LIMIT,
    babylm_markdown,
    official_option_sums,
    official_surprisals,
    rank_agreement,
)
from lora_project.evaluation.babylm_score import ScoredText, item_texts, option_scores, text_tree, tree_sums
from lora_project.evaluation.babylm_tasks import RankItem, load_task


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_arguments_are_refused_in_one_line_before_anything_runs(project, tmp_path):
    missing = str(tmp_path / "none")
    assert_user_error(run_cli("benchmark", "--babylm", missing, cwd=project), "--babylm", "no such folder")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a suite\n")
    assert_user_error(run_cli("benchmark", "--babylm", str(a_file), cwd=project), "--babylm", "is a file, not a folder")
    assert_user_error(run_cli("benchmark", "--babylm", str(tmp_path), "--limit", "0", cwd=project), "--limit")
    assert_user_error(run_cli("benchmark", "--babylm", str(tmp_path), "--limit", "x", cwd=project), "--limit")
    assert_user_error(run_cli("benchmark", "--limit", "3", cwd=project), "--limit goes with --babylm")
    assert_user_error(run_cli("benchmark", "--babylm", str(tmp_path), cwd=project), "no BabyLM task data")
    # --model picks the base for --babylm (checked as a model source only when it loads)
    assert_user_error(run_cli("benchmark", "--babylm", missing, "--model", "embedded", cwd=project), "no such folder")
    assert_user_error(run_cli("benchmark", "--scaling", "local:2", "--babylm", str(tmp_path), cwd=project),
                      "--scaling runs alone", "--babylm")
    assert not (project / "outputs" / "metrics").exists() or not list((project / "outputs" / "metrics").iterdir())


def test_the_cli_default_limit_is_the_benchmarks():
    from lora_project.cli.benchmark import BABYLM_LIMIT

    assert BABYLM_LIMIT == DEFAULT_LIMIT


def test_official_strategy_sums_and_forward_positions_by_hand(tiny):
    """Token ids written by hand: the official side's positions are rows x (batch's longest - 1) per
    option index, padding included; the tree's are its distinct input prefixes. Both sides' sums equal."""
    model, tok = tiny
    eos = int(tok.eos_token_id)
    texts = [[ScoredText((1, 5, 6, 7), (3,)), ScoredText((1, 5, 6, 8, 9, 10), (3, 4, 5))],   # lengths 4, 6
             [ScoredText((1, 5, 6, 7, 11), (1, 2, 3, 4)), ScoredText((1, 12, 13), (2,))]]  # lengths 5, 3
    official, positions = official_option_sums(model, texts, eos)
    # one batch: option 0 is 2 rows x (5 - 1), option 1 is 2 rows x (6 - 1)
    assert positions == 2 * 4 + 2 * 5
    _, one_by_one = official_option_sums(model, texts, eos, batch_items=1)
    assert one_by_one == 3 + 5 + 4 + 2  # batches of one item: no padding
    flat = [t for opts in texts for t in opts]
    built = text_tree(flat, row_tokens=16)
    # the tree's input nodes: 1; 1 5; 1 5 6; 1 5 6 8; 1 5 6 8 9; 1 5 6 7 (as input of item 2); 1 12
    assert built.forward_tokens == 7
    ours = tree_sums(model, built, RUNTIME)
    assert np.concatenate(official) == pytest.approx(ours, rel=1e-5, abs=1e-5)
    assert all(s < 0 for s in ours)


def test_official_strategy_equals_the_tree_on_every_task_shape(tiny, tmp_path):
    """blimp (whole sentences), EWoK (targets after a shared context), entity tracking (options after
    long shared prefixes), wug; and reading (get_p2 reads, one forward each) against the tree's."""
    model, tok = tiny
    _tiny_suite(tmp_path, reading_rows=12)
    wug = load_task(tmp_path, "wug")
    ewok = [RankItem("ewok", "d2", ("the cat sleeps. the cat is on the mat.", "the cat sleeps. the cat is happy."),
                     ("the cat is on the mat.", "the cat is happy."))]
    items = ITEMS + ewok + load_task(tmp_path, "entity_tracking") + wug
    flat = item_texts(tok, items)
    split, k = [], 0
    for it in items:
        split.append(flat[k:k + len(it.texts)])
        k += len(it.texts)
    theirs, positions = official_option_sums(model, split, int(tok.eos_token_id), batch_items=3)
    ours = option_scores(model, tok, items, RUNTIME)
    for o, t in zip(ours, theirs):
        assert o == pytest.approx(t, rel=1e-5, abs=1e-5)
    want = 0
    for b in range(0, len(items), 3):
        batch = split[b:b + 3]
        for opt in range(max(len(x) for x in batch)):
            lens = [len(x[opt].ids) for x in batch if opt < len(x)]
            want += len(lens) * (max(lens) - 1)
    assert positions == want > text_tree(flat).forward_tokens
    agree = rank_agreement(items, ours, theirs)
    assert agree["identical_decisions"] == len(items) and agree["max_relative_sum_difference"] < 1e-5

    from lora_project.evaluation.reading import load_reading, surprisals, word_queries

    df = load_reading(tmp_path / "reading" / "reading_data.csv")
    pred, prev, forwards, positions = official_surprisals(model, tok, df)
    mine = surprisals(model, tok, df, RUNTIME)
    np.testing.assert_allclose(pred, mine[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(prev, mine[1], rtol=1e-5, atol=1e-5, equal_nan=True)
    reads = [q for r in df.itertuples() for w in [(r.item, r.word)] + ([(r.prev_item, r.prev_word)]
             if isinstance(r.prev_item, str) else []) for q in word_queries(tok, *w)]
    assert forwards == len(reads) and positions == sum(len(tok(c)["input_ids"]) for c, _ in reads)


def test_babylm_section_end_to_end_on_tiny_data(project, tracking_store, tmp_path, monkeypatch):
    import lora_project.benchmark as bench

    real = bench.speed.matmul_gflops
    monkeypatch.setattr(bench.speed, "matmul_gflops", lambda dtype, **kw: real(
        dtype, m=128, k=64, n=128, min_seconds=0.05, kernel=kw.get("kernel", "native")))
    suite = tmp_path / "suite"
    _tiny_suite(suite, reading_rows=60)
    (suite / "supplement_filtered" / "turns.jsonl").unlink()
    (suite / "supplement_filtered").rmdir()
    proc = run_cli("benchmark", "--babylm", str(suite), "--limit", "1", "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped supplement" in proc.stderr
    out = json.loads(proc.stdout)
    b = out["babylm"]
    assert list(b["tasks"]) == ["blimp", "ewok", "entity_tracking", "wug", "reading"]
    assert b["limit_per_uid"] == 1 and not out["training"]  # the speed sections are not run
    assert b["tasks"]["blimp"]["items"] == 2 and b["tasks"]["blimp"]["full_items"] == 3  # 1 per UID of 2 UIDs
    assert b["tasks"]["reading"]["items"] == 1 and b["tasks"]["reading"]["full_items"] == 60
    for task, r in b["tasks"].items():
        for side in ("ours", "official"):
            assert r[side]["seconds"] > 0 and r[side]["forward_tokens"] > 0
            assert r[side]["projected_full_seconds"] == pytest.approx(r[side]["seconds"] * r["full_items"] / r["items"])
        if task != "reading":
            assert r["agreement"]["identical_decisions"] == r["items"]
        else:
            assert r["agreement"]["max_abs_surprisal_difference"] < 1e-4
    total = b["projected_full_seconds"]
    assert total["ours"] == pytest.approx(sum(r["ours"]["projected_full_seconds"] for r in b["tasks"].values()))
    assert b["projected_ratio"] == pytest.approx(total["official"] / total["ours"])
    md = open(out["report"]["markdown"]).read()
    assert "## BabyLM 2025 suite" in md and b["cpu"]["model"] in md and "Projected full suite" in md
    assert "official strategy was reproduced" in md and out["mlflow_run_id"]
    assert b["fp32_kernel"]["official"] == "native" and "fp32 matmul kernel: ours" in md
    assert "\n".join(babylm_markdown(b)) in md


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "babylm_2025").is_dir(), reason="../shared/data/babylm_2025 is absent")
def test_real_model_on_a_tiny_sample_of_the_suite_gives_the_same_decisions():
    """The embedded model on a few seeded items of every task (entity tracking's long prefixes
    included): the same decisions on both sides, sums equal to fp32 rounding, fewer forward tokens ours."""
    from conftest import REPO

    from lora_project.benchmark.babylm import babylm_speed, load_samples
    from lora_project.config import load_config
    from lora_project.evaluation.babylm_tasks import TASKS

    cfg = load_config([REPO / "config" / "model_config.yaml"], ["training.threads=1"])
    root = SHARED_DATA / "babylm_2025"
    samples = {t: (data[:4], full) for t, (data, full) in
               load_samples(root, list(TASKS), 1, cfg.training.seed, log=lambda m: None).items()}
    b = babylm_speed(cfg, root, limit=1, samples=samples, log=lambda m: None)
    assert list(b["tasks"]) == list(TASKS)
    for task, r in b["tasks"].items():
        a = r["agreement"]
        if task == "reading":
            assert a["max_abs_surprisal_difference"] < 1e-3
        else:
            assert a["differing_outside_near_ties"] == 0, (task, a)
            assert a["max_relative_sum_difference"] < 1e-4
        assert r["official"]["forward_tokens"] > r["ours"]["forward_tokens"]
    et = b["tasks"]["entity_tracking"]
    assert et["items"] == 4 and et["full_items"] == 9483
    assert et["official"]["forward_tokens"] > 3 * et["ours"]["forward_tokens"]  # five options repeat the prefix
