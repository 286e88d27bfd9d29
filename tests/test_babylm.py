"""The BabyLM suite (`evaluate --babylm`): official definitions against brute force, loading and
skips, aggregation and ties, reading regressions, the command end to end on tiny data."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest
import torch
from conftest import REPO, SHARED_DATA, assert_user_error, run_cli

from lora_project.benchmark.babylm import load_samples
from lora_project.errors import UserError
from lora_project.evaluation.babylm import load_suite
from lora_project.evaluation.babylm_report import aggregate, rank_task_report
from lora_project.evaluation.babylm_score import completion_texts, decisions, option_scores
from lora_project.evaluation.babylm_tasks import RankItem, load_task, parse_tasks
from lora_project.evaluation.reading import reading_scores, word_queries
from lora_project.utils.device import resolve_runtime

RUNTIME = resolve_runtime("cpu", "fp32", 1)


def _brute_force(model, tok, text: str, completion: str) -> float:
    """One option on its own, as the official causal scorer defines it, in float64 from fp32 logits:
    BOS only if the tokenizer has one; sum over tokens whose span ends after the context."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    ids = bos + enc["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    start = len(text) - len(completion)
    total = 0.0
    for k, (_, end) in enumerate(enc["offset_mapping"]):
        pos = k + len(bos)
        if end > start and pos >= 1:
            total += float(logp[pos - 1, ids[pos]])
    return total


ITEMS = [
    RankItem("ewok", "d1", ("the cat sleeps. the cat is on the bed.", "the cat sleeps. the cat is in the tree."),
             ("the cat is on the bed.", "the cat is in the tree.")),
    RankItem("entity_tracking", "regular_0_ops", tuple("Box 0 contains the ball, Box 1 contains " + o for o in
                                                        ("the milk.", "the ball.", "nothing.")),
             ("the milk.", "the ball.", "nothing.")),
    RankItem("entity_tracking", "regular_1_ops", tuple("Box 0 contains the ball, Box 1 contains " + o for o in
                                                        ("the ball.", "the milk.", "the truck.")),
             ("the ball.", "the milk.", "the truck.")),
    RankItem("blimp", "agr", ("the dog runs.", "the dog run."), ("the dog runs.", "the dog run.")),
]


@pytest.mark.parametrize("bos", [True, False])
def test_option_scores_equal_brute_force_per_option(tiny_model_dir, bos):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    if not bos:
        tok.bos_token = None  # the official rule then scores from the second token on
        assert tok.bos_token_id is None
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    got = option_scores(model, tok, ITEMS, RUNTIME)
    for it, scores in zip(ITEMS, got):
        want = [_brute_force(model, tok, t, c) for t, c in zip(it.texts, it.completions)]
        assert scores == pytest.approx(want, rel=1e-5, abs=1e-4)
    # the completion is all that counts: the context's tokens are not scored
    text, comp = ITEMS[1].texts[0], ITEMS[1].completions[0]
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    first = next(k for k, (_, end) in enumerate(offsets) if end > len(text) - len(comp))
    t = completion_texts(tok, [text], [comp])[0]
    assert first > 5 and t.scored == tuple(range(first + int(bos), len(offsets) + int(bos)))


def _write(folder, name, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _tiny_suite(root, reading_rows: int = 80):
    """A small data folder in the official layout, every task, a few items each."""
    _write(root / "blimp_filtered", "agr.jsonl", [
        {"sentence_good": "the dog runs.", "sentence_bad": "the dog run.", "field": "morphology", "UID": "agr"},
        {"sentence_good": "the cat sleeps.", "sentence_bad": "the cat sleep.", "field": "morphology", "UID": "agr"},
        {"sentence_good": "we see a truck.", "sentence_bad": "we sees a truck.", "field": "morphology", "UID": "agr2"}])
    _write(root / "supplement_filtered", "turns.jsonl", [
        {"sentence_good": "where ball? here.", "sentence_bad": "where ball? bye."},
        {"sentence_good": "more milk please.", "sentence_bad": "more milk bye."}])
    _write(root / "ewok_filtered", "spatial.jsonl", [
        {"Domain": "spatial", "Context1": "the cat sleeps.", "Context2": "the cat runs.",
         "Target1": "the cat is on the bed.", "Target2": "the cat is in the tree."}])
    _write(root / "entity_tracking", "regular.jsonl", [
        {"numops": 0, "input_prefix": "Box 0 contains the ball, Box 1 contains ", "options": ["the milk.", "the ball."]},
        {"numops": 1, "input_prefix": "Box 0 contains the milk, Box 1 contains ", "options": ["nothing.", "the milk."]}])
    _write(root / "entity_tracking", "ambiref.jsonl", [
        {"numops": 0, "input_prefix": "Box 0 contains the cup, Box 1 contains ", "options": ["nothing.", "the cup."]}])
    _write(root / "wug_adj_nominalization", "wug.jsonl", [
        {"sentences": "a blick thing. blickness\ta blick thing. blickity", "ratio": 0.7},
        {"sentences": "a dax thing. daxness\ta dax thing. daxity", "ratio": 0.2},
        {"sentences": "a fep thing. fepness\ta fep thing. fepity", "ratio": 0.5}])
    rng = random.Random(0)
    words = ["the", "dog", "runs", "to", "ball", "mommy", "juice", "truck", "bird", "sings"]
    (root / "reading").mkdir(parents=True, exist_ok=True)
    with open(root / "reading" / "reading_data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "item", "word", "Subtlex_log10", "length", "context_length", "RTfirstfix", "RTfirstpass",
                    "RTgopast", "RTrightbound", "self_paced_reading_time", "prev_word", "prev_item", "prev_length"])
        for i in range(reading_rows):
            ctx = " ".join(rng.choice(words) for _ in range(rng.randint(1, 5)))
            word = rng.choice(words)
            prev = ctx.rsplit(" ", 1)
            w.writerow([i, ctx, word, rng.uniform(1, 5), len(word), len(ctx.split()), *(rng.uniform(150, 400)
                        for _ in range(4)), "" if i % 7 == 0 else rng.uniform(200, 500),
                        prev[-1] if len(prev) > 1 else "", prev[0] if len(prev) > 1 else "", len(prev[-1])])


def test_loading_follows_the_official_definitions_and_the_pairs_rules(tmp_path):
    _tiny_suite(tmp_path)
    ewok = load_task(tmp_path, "ewok")
    assert ewok[0].texts == ("the cat sleeps. the cat is on the bed.", "the cat sleeps. the cat is in the tree.")
    assert ewok[0].completions == ("the cat is on the bed.", "the cat is in the tree.") and ewok[0].uid == "spatial"
    et = load_task(tmp_path, "entity_tracking")
    assert sorted(i.uid for i in et) == ["ambiref_0_ops", "regular_0_ops", "regular_1_ops"]
    assert et[1].texts[0] == "Box 0 contains the ball, Box 1 contains the milk."
    assert [i.uid for i in load_task(tmp_path, "supplement")] == ["turns", "turns"]  # no field: the file names it
    wug = load_task(tmp_path, "wug")
    assert wug[0].ratio == 0.7 and wug[0].texts == wug[0].completions == ("a blick thing. blickness",
                                                                          "a blick thing. blickity")
    assert load_task(tmp_path / "nowhere", "ewok") is None
    _write(tmp_path / "ewok_filtered", "bad.jsonl", ['{"Domain": "x"', {"Domain": "x", "Context1": "c"},
                                                     ["not", "an", "object"]])
    said = []
    assert len(load_task(tmp_path, "ewok", warn=said.append)) == 1
    assert "skipped 3 bad line(s)" in said[0] and "bad.jsonl line 2: no 'Target1' field" in said[0]
    with pytest.raises(UserError, match="3 bad line"):
        load_task(tmp_path, "ewok", strict=True)
    assert parse_tasks("reading, ewok") == ["ewok", "reading"]
    with pytest.raises(UserError, match="unknown task.*ewk"):
        parse_tasks("ewk")
    _write(tmp_path / "blimp_filtered", "odd.jsonl", [{"sentence_good": "a b.", "sentence_bad": "b a.", "field": "x"},
                                                      {"sentence_good": "a b.", "sentence_bad": "b a.", "UID": "odd"}])
    said.clear()
    assert sorted(i.uid for i in load_task(tmp_path, "blimp", warn=said.append)) == ["agr", "agr", "agr2", "odd"]
    assert "odd.jsonl line 1: no 'UID' field" in said[0]
    file = tmp_path / "ewok_filtered" / "bad.jsonl"
    for wrong, why in ((file, "is a file, not a folder"), (tmp_path / "none", "no such folder")):
        with pytest.raises(UserError, match=why):  # evaluate --babylm and benchmark --babylm say the same
            load_suite(wrong, ["ewok"], limit=None, seed=0, strict=False, log=said.append)
        with pytest.raises(UserError, match=why):
            load_samples(wrong, ["ewok"], 1, 0, log=said.append)


def test_headline_aggregation_ties_and_near_ties():
    items = [RankItem("entity_tracking", u, ("a", "b"), ("a", "b"), where=f"f line {k}") for k, u in
             enumerate(["regular_0_ops", "regular_0_ops", "regular_1_ops", "ambiref_0_ops"])]
    scores = [np.array([-1.0, -2.0]), np.array([-3.0, -3.0]), np.array([-5.0, -4.0]), np.array([-1.0, -1.00005])]
    d = decisions(scores)
    assert d["official"].tolist() == [True, True, False, True] and d["strict"].tolist() == [True, False, False, True]
    r = rank_task_report("entity_tracking", items, scores, d, resamples=50, seed=0)
    # regular: mean(1.0 over numops 0, 0.0 over numops 1) = 0.5; ambiref 1.0; headline mean 0.75.
    # Ties wrong: regular mean(0.5, 0.0) = 0.25, ambiref 1.0: 0.625
    assert r["headline"] == pytest.approx(75.0) and r["headline_ties_wrong"] == pytest.approx(62.5)
    assert r["ties"] == 1 and r["near_ties"] == ["f line 1", "f line 3"]
    assert r["files"] == {"regular": 50.0, "ambiref": 100.0}
    assert aggregate("ewok", ["a", "b"], np.array([0.5, 1.0])) == 0.75


def test_reading_regression_equals_explicit_least_squares_and_bootstrap_weights_equal_duplicated_rows():
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 60
    df = pd.DataFrame({"Subtlex_log10": rng.uniform(1, 5, n), "length": rng.integers(1, 9, n).astype(float),
                       "context_length": rng.integers(1, 20, n).astype(float),
                       "prev_length": rng.integers(1, 9, n).astype(float)})
    pred, prev = rng.gamma(2, 2, n), rng.gamma(2, 2, n)
    prev[3] = np.nan
    for m in ("RTfirstfix", "RTfirstpass", "RTgopast", "RTrightbound", "self_paced_reading_time"):
        df[m] = 200 + 10 * pred + 5 * df["length"] + rng.normal(0, 20, n)
    df.loc[5, "RTgopast"] = np.nan

    def r2(X, y):
        beta = np.linalg.lstsq(X, y, rcond=None)[0]
        return 1 - np.sum((y - X @ beta) ** 2) / np.sum((y - y.mean()) ** 2)

    def gain(frame, p, pp, m, spill):
        terms = ["Subtlex_log10", "length", "context_length"] + (["prev_length", "prev_pred"] if spill else [])
        f = frame.assign(pred=p, prev_pred=pp)[terms + ["pred", m]].dropna()
        cols = [np.ones(len(f))] + [f[t].to_numpy() for t in terms]
        cols += [f[a].to_numpy() * f[b].to_numpy() for i, a in enumerate(terms) for b in terms[i + 1:]]
        base = r2(np.column_stack(cols), f[m].to_numpy())
        full = r2(np.column_stack(cols + [f["pred"].to_numpy()]), f[m].to_numpy())
        return 100 * (full - base) / (1 - base)

    got = reading_scores(df, pred, prev)
    eye = np.mean([gain(df, pred, prev, m, False) for m in ("RTfirstfix", "RTfirstpass", "RTgopast", "RTrightbound")])
    assert got["eye_tracking"] == pytest.approx(eye, rel=1e-9)
    assert got["self_paced_reading"] == pytest.approx(gain(df, pred, prev, "self_paced_reading_time", True), rel=1e-9)
    assert got["eye_tracking"] > 5  # the made-up times do depend on pred
    idx = rng.integers(0, n, n)
    weights = np.bincount(idx, minlength=n)[None, :].astype(float)
    dup = df.iloc[idx].reset_index(drop=True)
    w = reading_scores(df, pred, prev, weights)
    assert w["eye_tracking"][0] == pytest.approx(reading_scores(dup, pred[idx], prev[idx])["eye_tracking"], rel=1e-7)


def test_reading_word_queries_follow_the_official_multi_token_rule(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    word = "xylophone"  # not in the tiny vocabulary's merges: several tokens
    ids = tok(word, add_special_tokens=False)["input_ids"]
    assert len(ids) > 2
    q = word_queries(tok, "the dog", word)
    assert q[0] == ("the dog", ids[0]) and len(q) == len(ids)
    assert q[1][0] == "the dog" + tok.decode(ids[0])
    assert q[2][0] == "the dog" + tok.decode(ids[0]) + tok.decode(ids[1])


def test_cli_babylm_end_to_end_with_adapter_skip_and_json(project, tracking_store, tmp_path):
    trained = run_cli("train", "toddler_data", "--no-progress", "--json", cwd=project)
    assert trained.returncode == 0, trained.stderr[-2000:]
    suite = tmp_path / "babylm"
    _tiny_suite(suite)
    import shutil

    shutil.rmtree(suite / "supplement_filtered")
    proc = run_cli("evaluate", "--babylm", str(suite), "--adapter", "adapters/toddler_data_lora", "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert "skipped supplement: no folder" in proc.stderr and res["skipped"] == ["supplement"]
    tasks = res["models"]["base"]["tasks"]
    assert list(tasks) == ["blimp", "ewok", "entity_tracking", "wug", "reading"]
    assert set(res["models"]) == {"base", "toddler_data_lora"}
    assert tasks["blimp"]["headline"] == pytest.approx(100 * np.mean(
        [tasks["blimp"]["uids"][u]["accuracy"] for u in ("agr", "agr2")]))
    assert set(tasks["reading"]["headline"]) == {"eye_tracking", "self_paced_reading"}
    d = res["difference"]["toddler_data_lora"]
    for task in ("blimp", "ewok", "entity_tracking", "wug"):
        a, b = res["models"]["toddler_data_lora"]["tasks"][task], tasks[task]
        assert d[task]["headline"] == pytest.approx(a["headline"] - b["headline"])
        assert d[task]["headline_ci"][0] <= d[task]["headline_ci"][1]
    assert d["reading"]["headline"]["eye_tracking"] == pytest.approx(
        res["models"]["toddler_data_lora"]["tasks"]["reading"]["headline"]["eye_tracking"]
        - tasks["reading"]["headline"]["eye_tracking"])
    assert (project / res["plot"]).is_file() if not res["plot"].startswith("/") else res["plot"]
    assert res["mlflow_run_id"]
    table = run_cli("evaluate", "--babylm", str(suite), "--tasks", "ewok,wug", "--no-progress", cwd=project)
    assert table.returncode == 0 and "ties counted wrong" in table.stdout and "r(preference, human ratio)" in table.stdout
    assert_user_error(run_cli("evaluate", "--babylm", str(suite), "--tasks", "ewk", cwd=project), "unknown task")
    assert_user_error(run_cli("evaluate", "--babylm", str(tmp_path / "none"), cwd=project), "no such folder")
    assert_user_error(run_cli("evaluate", "--babylm", str(suite), "--stride", "4", cwd=project), "not with --babylm")
    assert_user_error(run_cli("evaluate", "--babylm", str(suite), "--first-pass", "bf16", cwd=project),
                      "not with --babylm")
    assert_user_error(run_cli("evaluate", "--text", "x.txt", "--tasks", "ewok", cwd=project), "--babylm only")
    assert_user_error(run_cli("evaluate", "--text", "x.txt", "--no-progress", cwd=project), "for --pairs or --babylm")
    assert_user_error(run_cli("evaluate", "--text", "x.txt", "--first-pass", "fp32", cwd=project), "--pairs only")
    assert_user_error(run_cli("evaluate", "--babylm", str(tmp_path), cwd=project), "no BabyLM task data")


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "babylm_2025").is_dir(), reason="../shared/data/babylm_2025 is absent")
def test_real_model_babylm_scores_equal_brute_force_on_a_few_items_per_task():
    from lora_project.config import load_config
    from lora_project.evaluation.minimal_pairs import sample_pairs
    from lora_project.models.base_model import load_fp32_base

    base = load_fp32_base(load_config([REPO / "config" / "model_config.yaml"]))
    assert base.tokenizer.bos_token_id is not None  # SmolLM2: <|im_start|>, prepended by the official rule
    root = SHARED_DATA / "babylm_2025"
    # SmolLM2 keeps the space in " the": after "Box 1 contains " that token starts in the context and is scored
    text = "Box 1 contains the hat."
    t = completion_texts(base.tokenizer, [text], ["the hat."])[0]
    offsets = base.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert offsets[t.scored[0] - 1] == (14, 18) and len(t.scored) == 3
    for task, n in (("blimp", 1), ("supplement", 1), ("ewok", 1), ("entity_tracking", 1), ("wug", 3)):
        items = sample_pairs(load_task(root, task), n, 0)[:6]
        got = option_scores(base.model, base.tokenizer, items, base.runtime)
        for it, scores in zip(items, got):
            want = [_brute_force(base.model, base.tokenizer, t, c) for t, c in zip(it.texts, it.completions)]
            # fp32 sums of ~100 nats: the tree and the brute force batch rows differently, so rounding
            # moves the last digits (2e-4 on a -122.9 sum in CI, 1.7e-6 relative); 1e-5 relative is the bound
            assert scores == pytest.approx(want, rel=1e-5, abs=1e-4), (task, it.where)


@pytest.mark.parametrize("limit", [1, 2])
def test_a_wug_sample_of_one_or_two_items_reports_without_a_correlation(project, tmp_path, limit):
    """A one- or two-item wug sample has no correlation with the human ratio (two points always give
    +-1): it is reported as n/a, not a crash in the bootstrap of an empty set."""
    suite = tmp_path / "babylm"
    _tiny_suite(suite)
    proc = run_cli("evaluate", "--babylm", str(suite), "--tasks", "wug", "--limit", str(limit), cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "r(preference, human ratio)" in proc.stdout and "n/a (< 3 items)" in proc.stdout
    res = json.loads(run_cli("evaluate", "--babylm", str(suite), "--tasks", "wug", "--limit", str(limit), "--json",
                             cwd=project).stdout)
    wug = res["models"]["base"]["tasks"]["wug"]
    assert wug["items"] == limit and wug["preference_ratio_pearson"] is None
    assert wug["preference_ratio_pearson_ci"] is None and len(wug["preference"]) == limit


def test_a_wug_change_with_a_tiny_sample_has_no_correlation_change():
    from lora_project.evaluation.babylm_report import rank_task_change

    items = [RankItem("wug", "w", ("a", "b"), ("a", "b"), ratio=r) for r in (0.2, 0.9)]
    recs = [rank_task_report("wug", items, s, decisions(s), resamples=50, seed=0)
            for s in ([np.array([-1.0, -2.0]), np.array([-2.0, -1.0])], [np.array([-1.0, -3.0]), np.array([-1.0, -0.5])])]
    d = rank_task_change("wug", items, *recs, resamples=50, seed=0)
    assert d["preference_ratio_pearson"] is None and d["preference_ratio_pearson_ci"] is None
    assert d["headline"] == pytest.approx(0.0)
    # three items: the change and its interval exist, from the same resampled rows for both models
    items3 = items + [RankItem("wug", "w", ("a", "b"), ("a", "b"), ratio=0.5)]
    recs = [rank_task_report("wug", items3, s, decisions(s), resamples=200, seed=0)
            for s in ([np.array([-1.0, -2.0]), np.array([-2.0, -1.0]), np.array([-1.0, -1.5])],
                      [np.array([-1.0, -3.0]), np.array([-1.0, -0.5]), np.array([-2.0, -1.0])])]
    d = rank_task_change("wug", items3, *recs, resamples=200, seed=0)
    assert d["preference_ratio_pearson"] == pytest.approx(recs[1]["preference_ratio_pearson"]
                                                          - recs[0]["preference_ratio_pearson"])
    assert d["preference_ratio_pearson_ci"][0] <= d["preference_ratio_pearson_ci"][1]


def test_a_reading_with_too_few_rows_is_skipped_with_one_line(project, tmp_path):
    from lora_project.evaluation.reading import MIN_ROWS

    suite = tmp_path / "babylm"
    _tiny_suite(suite, reading_rows=120)
    proc = run_cli("evaluate", "--babylm", str(suite), "--tasks", "wug,reading", "--limit", "10", "--json",
                   cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    said = [line for line in proc.stderr.splitlines() if "skipped reading" in line]
    assert len(said) == 1 and f"fewer than the {MIN_ROWS}" in said[0] and "raise --limit" in said[0]
    assert res["skipped"] == ["reading"] and list(res["models"]["base"]["tasks"]) == ["wug"]
    # reading alone with too few rows: nothing to score, exit 2 naming why
    assert_user_error(run_cli("evaluate", "--babylm", str(suite), "--tasks", "reading", "--limit", "10",
                              cwd=project), "no BabyLM task data", "reading:", "usable rows")
    # enough rows: scored (120 rows, a seventh without a self-paced time, a few without a previous word)
    ok = run_cli("evaluate", "--babylm", str(suite), "--tasks", "reading", "--json", cwd=project)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert set(json.loads(ok.stdout)["models"]["base"]["tasks"]["reading"]["headline"]) == {"eye_tracking",
                                                                                            "self_paced_reading"}


def test_b_bad_reading_rows_follow_the_pairs_rules(tmp_path):
    from lora_project.evaluation.reading import load_reading, usable_rows

    suite = tmp_path / "babylm"
    _tiny_suite(suite, reading_rows=60)
    path = suite / "reading" / "reading_data.csv"
    rows = list(csv.reader(path.open()))
    header = rows[0]
    rows[3][header.index("RTfirstfix")] = "slow"         # line 4: text where a number belongs
    rows[5][header.index("word")] = ""                    # line 6: no word
    rows[8][header.index("prev_item")] = "the dog"        # line 9: a previous context without its word
    rows[8][header.index("prev_word")] = ""
    rows[10][header.index("RTgopast")] = ""               # line 11: a missing measurement, not a bad row
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    said = []
    df = load_reading(path, warn=said.append)
    assert len(df) == 57 and len(said) == 1
    assert "skipped 3 bad row(s)" in said[0]
    assert "line 4: RTfirstfix is not a number: 'slow'" in said[0] and "line 6: no word" in said[0]
    assert "line 9: prev_item without a prev_word" in said[0]
    assert df["RTfirstfix"].dtype == float and df["RTgopast"].isna().sum() == 1
    assert usable_rows(df) <= 57
    with pytest.raises(UserError, match="3 bad row"):
        load_reading(path, strict=True)


def test_b_the_report_lists_the_official_codes_known_flaws(project, tmp_path):
    suite = tmp_path / "babylm"
    _tiny_suite(suite)
    proc = run_cli("evaluate", "--babylm", str(suite), "--tasks", "blimp", cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "known flaws" in proc.stdout and "tie rule" in proc.stdout and "upstream issue 34" in proc.stdout
    assert "ties counted wrong" in proc.stdout


def _random_adapter(tiny_model_dir, folder, seed):
    """A LoRA adapter with non-zero B (so it changes the scores), not bound to a base fingerprint."""
    from transformers import AutoModelForCausalLM

    from lora_project.config import LoraSection
    from lora_project.models.lora_model import save_adapter, wrap_with_lora

    model = wrap_with_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraSection(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]), seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    meta = {"base_model": {"name": "tiny", "directory": str(tiny_model_dir)}, "dataset": {"name": "d"},
            "created": "2026-01-01T00:00:00"}
    return save_adapter(model, folder, meta, overwrite=False)


def test_a_shared_tree_and_reading_plan_give_every_model_the_sums_of_a_fresh_build(tiny_model_dir,
                                                                                  other_tiny_model_dir, tmp_path):
    """Task trees and reading plans depend on the tokenizer only: built once and reused over two
    models with different weights, each model's sums equal those of a tree built just for it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_project.evaluation.babylm import prepare_task
    from lora_project.evaluation.babylm_score import item_texts
    from lora_project.evaluation.reading import load_reading, surprisals

    _tiny_suite(tmp_path, reading_rows=20)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    items = ITEMS + load_task(tmp_path, "entity_tracking")
    df = load_reading(tmp_path / "reading" / "reading_data.csv")
    built, plan = prepare_task(tok, "ewok", items), prepare_task(tok, "reading", df)
    assert built.forward_tokens < sum(len(t.ids) - 1 for t in built.texts)  # the shared contexts count once
    first = None
    for d in (tiny_model_dir, other_tiny_model_dir):
        model = AutoModelForCausalLM.from_pretrained(d).eval()
        shared = np.concatenate(option_scores(model, tok, items, RUNTIME, texts=built))
        fresh = np.concatenate(option_scores(model, tok, items, RUNTIME, texts=item_texts(tok, items)))
        np.testing.assert_array_equal(shared, fresh)
        for a, b in zip(surprisals(model, tok, df, RUNTIME, plan=plan), surprisals(model, tok, df, RUNTIME)):
            np.testing.assert_array_equal(a, b)
        first = shared if first is None else first
    assert not np.allclose(first, shared)  # the two models really differ


def test_evaluate_babylm_builds_each_tasks_tree_once_for_the_base_and_an_adapter(project, tiny_model_dir, tmp_path,
                                                                                monkeypatch):
    from lora_project.config import load_project_config
    from lora_project.evaluation import babylm_score
    from lora_project.evaluation.babylm import evaluate_babylm
    from lora_project.paths import ProjectPaths

    adapter = _random_adapter(tiny_model_dir, tmp_path / "a_lora", 3)
    _tiny_suite(tmp_path / "suite")
    built = []
    real = babylm_score.sequence_tree
    monkeypatch.setattr(babylm_score, "sequence_tree", lambda seqs: built.append(len(seqs)) or real(seqs))
    paths = ProjectPaths.discover()
    res = evaluate_babylm(paths, load_project_config(paths), tmp_path / "suite", adapters=[adapter], save=False,
                          resamples=20, log=lambda m: None)
    assert list(res["models"]) == ["base", "a_lora"]
    assert len(built) == len(res["tasks"]) == 6  # one tree per task, not one per task and model
    assert res["prepare_seconds"] >= 0
    # the adapter really scored with its own weights on the shared plan
    assert res["difference"]["a_lora"]["reading"]["headline"]["eye_tracking"] != 0


def test_the_output_layer_runs_on_the_scored_positions_only_and_changes_no_sum(tiny_model_dir, tmp_path,
                                                                              monkeypatch):
    """Entity tracking's long shared prefix is an input, never summed: the tree pass runs the output
    layer (and its log-softmax over the vocabulary) on the scored positions only. The scored
    positions' log-probabilities are bit-identical to those of a pass over every position."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_project.evaluation.babylm import prepare_task
    import lora_project.models.losses as losses
    from lora_project.evaluation.tree_pass import tree_logprobs

    _tiny_suite(tmp_path)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    items = load_task(tmp_path, "entity_tracking")
    built = prepare_task(tok, "entity_tracking", items)
    tree = built.tree
    scored = sorted({tree.sentence_items[s][j - 1] for s, t in enumerate(built.texts) for j in t.scored})
    assert 0 < len(scored) < len(tree.items) / 2  # the prefixes are most of the tree
    rows_seen, nll = [], losses.token_nll

    def counted(hidden, head, target, *a, **k):  # the output layer and log-softmax, on these rows
        rows_seen.append(hidden.shape[0])
        return nll(hidden, head, target, *a, **k)

    monkeypatch.setattr(losses, "token_nll", counted)
    kw = {"row_tokens": built.row_tokens, "batch_tokens": 2048, "rows": built.rows}
    every, _ = tree_logprobs(model, tree, RUNTIME, "fp32", **kw)
    n_every, rows_seen[:] = sum(rows_seen), []
    only, _ = tree_logprobs(model, tree, RUNTIME, "fp32", items=scored, **kw)
    n_only = sum(rows_seen)
    # once per node read: a node with several next tokens (items) runs the output layer once
    assert n_every == len({node for node, _ in tree.items}) < len(tree.items)
    assert n_only == len({tree.items[i][0] for i in scored})
    np.testing.assert_array_equal(only[scored], every[scored])
    assert not np.any(np.delete(only, scored))  # the rest was never computed
    # and option_scores (the path evaluate --babylm runs) gives the sums of the full pass
    full = [float(every[[tree.sentence_items[s][j - 1] for j in t.scored]].sum()) for s, t in enumerate(built.texts)]
    np.testing.assert_array_equal(np.concatenate(option_scores(model, tok, items, RUNTIME, texts=built)), full)


def test_one_progress_bar_over_every_model_and_task_counted_in_forward_tokens(project, tiny_model_dir, tmp_path,
                                                                               monkeypatch):
    """On a terminal, one bar runs over the whole suite (base and adapter, every task), each task's
    share its forward positions, ending at exactly the total; each task's headline line goes above
    the bar, not through `log`. Off a terminal no bar is drawn and the lines go through `log`."""
    import io
    import sys

    from lora_project.config import load_project_config
    from lora_project.evaluation import babylm
    from lora_project.paths import ProjectPaths

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    adapter = _random_adapter(tiny_model_dir, tmp_path / "a_lora", 3)
    _tiny_suite(tmp_path / "suite")
    paths = ProjectPaths.discover()
    cfg = load_project_config(paths)
    bars, real = [], babylm.SuiteBar
    monkeypatch.setattr(babylm, "SuiteBar", lambda *a: bars.append(real(*a)) or bars[-1])
    term, logged = Terminal(), []
    monkeypatch.setattr(sys, "stderr", term)
    res = babylm.evaluate_babylm(paths, cfg, tmp_path / "suite", adapters=[adapter], save=False, resamples=20,
                                 log=logged.append, progress=True)
    monkeypatch.undo()
    bar = bars[0]
    work = bar.work
    assert set(work) == set(res["tasks"]) and all(w > 1 for w in work.values())
    assert work["entity_tracking"] == res["scoring"]["forward_tokens"]["entity_tracking"]["forward_tokens_tree"]
    assert bar.bar.total == 2 * sum(work.values()) and bar.bar.n == bar.bar.total
    shown = term.getvalue()
    for label in ("base", "a_lora"):
        for task in res["tasks"]:
            assert f"{label}: {task}" in shown  # the bar named each model and task in turn
    lines = [ln for ln in shown.replace("\r", "\n").splitlines() if ln.endswith(" s)")]
    assert len(lines) == 2 * len(res["tasks"]) and not logged
    # off a terminal: no bar, the same lines through log
    plain = babylm.evaluate_babylm(paths, cfg, tmp_path / "suite", save=False, resamples=20, log=logged.append,
                                   progress=True)
    assert len(logged) == len(plain["tasks"]) and bars[-1].bar.disable


def test_a_change_whose_pooled_items_and_macro_headline_disagree_says_so():
    """Seen on the full supplement: its largest UID (3,867 of 5,218 pairs) improved while the small ones
    fell, so the pooled McNemar test (p = 1.9e-24) pointed the other way from the macro headline's
    change (-2.87). The headline's own test is the paired bootstrap of the macro; the pooled test is
    labelled as such, and a disagreement is said in words."""
    from lora_project.evaluation.babylm_report import rank_task_change
    from lora_project.evaluation.babylm_table import format_table

    big, small = 400, 40
    items = ([RankItem("supplement", "big", ("a.", "b."), ("a.", "b.")) for _ in range(big)]
             + [RankItem("supplement", f"s{k}", ("a.", "b."), ("a.", "b.")) for k in range(3) for _ in range(small)])
    # base: 50% on the big UID, 75% on each small one; adapter: 70% on the big UID, 40% on the small ones
    base = "1" * 200 + "0" * 200 + ("1" * 30 + "0" * 10) * 3
    mine = "1" * 280 + "0" * 120 + ("1" * 16 + "0" * 24) * 3
    rec = lambda d: {"decisions": d, "decisions_ties_wrong": d,  # noqa: E731
                     "headline": 100 * np.mean([np.mean([c == "1" for c in d[:big]])]
                                               + [np.mean([c == "1" for c in d[big + k * small:big + (k + 1) * small]])
                                                  for k in range(3)]),
                     "headline_ties_wrong": 0.0}
    d = rank_task_change("supplement", items, rec(base), rec(mine), resamples=400, seed=1)
    assert d["headline"] == pytest.approx(100 * ((0.7 + 3 * 0.4) / 4 - (0.5 + 3 * 0.75) / 4))  # -21.25
    assert d["micro_change"] == pytest.approx(100 * ((280 + 48) - (200 + 90)) / 520)  # +7.3: the other way
    assert d["directions_differ"] and d["mcnemar_p"] < 0.05  # the pooled test "significant" the wrong way
    assert d["headline_ci"][1] < 0 and d["headline_p"] < 0.01  # the headline's own test agrees with its sign
    result = {"items": {"supplement": len(items)}, "limit_per_uid": None, "seed": 1, "seconds": 1.0,
              "scoring": {"fp32_kernel": "aten"},
              "models": {"base": {"tasks": {"supplement": {**rec(base), "headline_ci": [0, 1], "ties": 0}}},
                         "a": {"tasks": {"supplement": {**rec(mine), "headline_ci": [0, 1], "ties": 0}}}},
              "difference": {"a": {"supplement": d}}}
    text = format_table(result)
    assert "point opposite ways" in text and "pooled items" in text and f"bootstrap p = {d['headline_p']:.3g}" in text
    assert d["headline_p"] == 0 and "bootstrap p < 0.0025" in format_table({**result, "bootstrap": {"resamples": 400}})
    same = rank_task_change("supplement", items, rec(base), rec(base.replace("0", "1", 5)), resamples=50, seed=1)
    assert not same["directions_differ"] and same["micro_change"] > 0
