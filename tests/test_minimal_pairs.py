"""Minimal pairs: scores equal a direct computation; aggregation; bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, SHARED_DATA, assert_user_error, run_cli

from lora_project.errors import UserError
from lora_project.evaluation.minimal_pairs import (
    MARGINS,
    Pair,
    accuracy_report,
    format_summary,
    load_pairs,
    pair_logprobs,
    prefix_sharing,
    resolve_first_pass,
    sample_pairs,
    score_pairs,
    sentence_logprobs,
)
from lora_project.evaluation.pair_tokens import tokenize_pairs
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
    assert {k: (v["accuracy"], v["pairs"]) for k, v in r["paradigms"].items()} == {"p1": (0.5, 2), "p2": (2 / 3, 3)}
    assert r["macro_accuracy"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert r["micro_accuracy"] == pytest.approx(3 / 5)
    assert r["decisions"] == "10110"
    # Wilson 95% for 1/2 by hand: (0.5 + 1.9208/2) / 1.9208 -+ 1.96 sqrt(0.125 + 0.2401) / 1.9208
    assert r["paradigms"]["p1"]["accuracy_ci"] == pytest.approx([0.0945, 0.9055], abs=1e-4)
    # macro se = sqrt(0.5*0.5/2 + (2/3)(1/3)/3) / 2 = sqrt(0.19907) / 2
    assert r["macro_accuracy_se"] == pytest.approx(0.223089, abs=1e-5)
    assert r["terms"]["t3"]["accuracy"] == 0.0 and r["terms"]["t3"]["pairs"] == 1
    assert r["terms"]["t3"]["accuracy_ci"] == pytest.approx([0.0, 0.7935], abs=1e-4)  # Wilson 0/1: z^2/(1+z^2)
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


def test_identical_pairs_are_warned_about_non_string_ones_skipped_and_binary_files_get_no_foreign_hint(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text("\n".join(json.dumps(o) for o in (
        {"sentence_good": "The cat sleeps.", "sentence_bad": "The cat sleep."},
        {"sentence_good": "The cat sleeps.", "sentence_bad": " The cat sleeps. "},  # no decision possible
        {"sentence_good": 5, "sentence_bad": None},
        {"sentence_good": "A dog runs.", "sentence_bad": "A dog run.", "field": ["syntax"]},
        {"sentence_good": "A dog runs.", "sentence_bad": "A dog run.", "field": "syntax",
         "linguistics_term": {"x": 1}})) + "\n")
    warnings = []
    pairs = load_pairs(f, warn=warnings.append)
    assert [p.bad for p in pairs] == ["The cat sleep.", "The cat sleeps."]  # kept: BLiMP has a few such pairs
    assert "1 pair(s) with the same good and bad sentence (first: x.jsonl line 2)" in " ".join(warnings)
    assert "line 3: sentence_good and sentence_bad must be non-empty strings" in " ".join(warnings)
    # the labels accuracies are grouped by: a list or an object once made the report crash
    assert "line 4: field must be a string, got list" in " ".join(warnings)
    assert "line 5: linguistics_term must be a string, got dict" in " ".join(warnings)
    assert accuracy_report(pairs, [-1.0, -2.0], [-3.0, -2.0])["paradigms"]["x"]["accuracy"] == 0.5  # tie is wrong
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b"\x00\x01\x02" * 50)
    with pytest.raises(UserError, match="binary") as info:
        load_pairs(binary)
    assert "--encoding" not in str(info.value)  # evaluate has no such option


def test_cli_pairs_with_adapter(project, tracking_store, tiny_model_dir, tmp_path):
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


def _tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir), AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_shared_prefix_sums_equal_plain_per_sentence_sums(tiny_model_dir):
    tok, model = _tiny(tiny_model_dir)
    pairs = [Pair("the dog runs.", "the dog run.", "agr"), Pair("more cookie.", "cookie more.", "order"),
             Pair("the bird sings in the tree on a big red truck.", "the bird sing in the tree on a big red truck.", "a"),
             Pair("a", "b", "short"), Pair("the dog", "the dog runs to the ball.", "prefix of the other"),
             Pair("where ball?", "where ball?", "identical")]
    tokens = tokenize_pairs(tok, pairs)
    assert all(len(t.prefix) >= 1 and t.good and t.bad for t in tokens)
    assert len(tokens[2].prefix) > 3 and len(tokens[1].prefix) == 1  # shared words vs only the BOS
    runtime = resolve_runtime("cpu", "fp32", 1)
    good, bad = pair_logprobs(model, tokens, runtime, "fp32", batch_tokens=40)  # several batches, padding
    ref_good = sentence_logprobs(model, tok, [p.good for p in pairs], runtime)
    ref_bad = sentence_logprobs(model, tok, [p.bad for p in pairs], runtime)
    assert good.tolist() == pytest.approx(ref_good, rel=1e-4)
    assert bad.tolist() == pytest.approx(ref_bad, rel=1e-4)
    assert good[5] == bad[5]  # identical sentences: exactly equal sums
    share = prefix_sharing(tokens)
    assert 0 < share["shared_prefix_fraction"] < 1
    assert share["forward_tokens_tree"] <= share["forward_tokens_shared"] < share["forward_tokens_plain"]


@pytest.mark.parametrize("row_tokens", [3, 8, 256])
def test_prefix_tree_shares_across_pairs_and_keeps_every_sum(tiny_model_dir, row_tokens):
    """Sentences of different pairs that open alike share their nodes; rows too short for a subtree
    split it (its path copied into each piece), several pieces share a row; every sum stays the
    plain per-sentence sum and progress counts every pair once."""
    from lora_project.evaluation.prefix_tree import prefix_tree, tree_rows

    tok, model = _tiny(tiny_model_dir)
    pairs = [Pair("the dog runs to the ball.", "the dog run to the ball.", "a"),
             Pair("the dog runs home.", "the dogs runs home.", "a"),
             Pair("the dog sees a cat.", "the dog see a cat.", "b"),
             Pair("a cat sleeps.", "a cat sleep.", "b"), Pair("the dog", "the dog runs.", "c"),
             Pair("more cookie.", "cookie more.", "d")]
    tokens = tokenize_pairs(tok, pairs)
    tree = prefix_tree(tokens)
    rows = tree_rows(tree, row_tokens)
    placed = [n for r in rows for n in r]
    assert set(placed) == set(range(len(tree.token)))  # every node computed
    assert all(len(r) <= max(row_tokens, max(tree.depth) + 2) for r in rows)
    if row_tokens == 3:
        assert len(placed) > len(tree.token)  # subtrees split: their paths are copied
    if row_tokens == 256:
        assert len(rows) == 1  # everything in one row
    share = prefix_sharing(tokens)
    assert len(tree.token) < share["forward_tokens_shared"]  # "the dog" is shared across pairs too
    done = []
    runtime = resolve_runtime("cpu", "fp32", 1)
    good, bad = pair_logprobs(model, tokens, runtime, "fp32", batch_tokens=16, progress=done.append,
                              row_tokens=row_tokens)
    assert sum(done) == len(pairs) and all(n > 0 for n in done)
    ref_good = sentence_logprobs(model, tok, [p.good for p in pairs], runtime)
    ref_bad = sentence_logprobs(model, tok, [p.bad for p in pairs], runtime)
    assert good.tolist() == pytest.approx(ref_good, rel=1e-4)
    assert bad.tolist() == pytest.approx(ref_bad, rel=1e-4)


def _close_pairs(tok, model, runtime):
    """Pairs 'the dog X' / 'the dog Y' where X, Y are next tokens the fp32 model finds almost equally likely:
    their fp32 differences are tiny, so bf16 rounding flips some of them."""
    prefix = [tok.bos_token_id] + tok("the dog", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prefix])).logits[0, -1].double(), -1)
    words = []
    for t in torch.argsort(logp).tolist():
        text = tok.decode([t])
        if text.strip() and text.isprintable() and tok("the dog" + text, add_special_tokens=False)["input_ids"] == \
                prefix[1:] + [t]:
            words.append(text)
    return [Pair("the dog" + a, "the dog" + b, "close") for a, b in zip(words, words[1:])]


def test_bf16_first_pass_rechecks_close_pairs_and_restores_fp32_decisions(tiny_model_dir):
    tok, model = _tiny(tiny_model_dir)
    runtime = resolve_runtime("cpu", "fp32", 1)
    pairs = _close_pairs(tok, model, runtime)
    tokens = tokenize_pairs(tok, pairs)
    g32, b32 = pair_logprobs(model, tokens, runtime, "fp32")
    g16, b16 = pair_logprobs(model, tokens, runtime, "bf16")
    fp32_decision = (g32 > b32).tolist()
    ties = sum(g16 == b16)  # bf16 sums are coarse: exact ties happen, and a tie is always re-scored
    flipped = [i for i in range(len(pairs)) if (g16[i] > b16[i]) != fp32_decision[i] and g16[i] != b16[i]]
    assert flipped, "no pair whose bf16 decision differs from fp32: the test would prove nothing"
    constant, per_token = MARGINS["bf16"]
    for i in flipped:  # the low-precision difference falls inside the margin
        assert abs(g16[i] - b16[i]) <= constant + per_token * (len(tokens[i].good) + len(tokens[i].bad))
    unchecked = score_pairs(model, tok, pairs, runtime, "bf16", margin=(0.0, 0.0))
    assert unchecked.rescored == ties
    assert [g > b for g, b in zip(unchecked.good, unchecked.bad)] != fp32_decision
    checked = score_pairs(model, tok, pairs, runtime, "bf16")
    assert checked.first_pass == "bf16" and checked.rescored >= len(flipped)
    assert [g > b for g, b in zip(checked.good, checked.bad)] == fp32_decision
    fp32 = score_pairs(model, tok, pairs, runtime, "fp32")
    assert fp32.rescored == 0  # an fp32 first pass is final
    assert accuracy_report(pairs, checked.good, checked.bad) == accuracy_report(pairs, fp32.good, fp32.bad)


def test_first_pass_choice_and_weights_must_be_fp32(tiny_model_dir):
    tok, model = _tiny(tiny_model_dir)
    assert resolve_first_pass("auto", resolve_runtime("cpu", "bf16", 1)) == "fp32"  # exact, and not slower
    assert resolve_first_pass("auto", resolve_runtime("cpu", "fp32", 1)) == "fp32"
    assert resolve_first_pass("bf16", resolve_runtime("cpu", "fp32", 1)) == "bf16"
    with pytest.raises(UserError, match="unknown first pass"):
        resolve_first_pass("int4", resolve_runtime("cpu", "fp32", 1))
    with pytest.raises(UserError, match="fp32"):
        score_pairs(model.to(torch.bfloat16), tok, [Pair("a", "b", "x")], resolve_runtime("cpu", "fp32", 1), "bf16")


def test_suites_reported_side_by_side_and_summary_names_everything(project, tmp_path):
    blimp, supplement = tmp_path / "blimp", tmp_path / "supplement"
    blimp.mkdir()
    supplement.mkdir()
    (blimp / "agr.jsonl").write_text("\n".join(json.dumps(
        {"sentence_good": g, "sentence_bad": b, "UID": "agreement", "field": "morphology", "linguistics_term": "s-v"})
        for g, b in [("the dog runs.", "the dog run."), ("the cat sleeps.", "the cat sleep.")]) + "\n")
    (supplement / "turn_taking.jsonl").write_text(json.dumps(
        {"sentence_good": "A: Where ball?\nB: Here.", "sentence_bad": "A: Where ball?\nB: Yes."}) + "\n")
    proc = run_cli("evaluate", "--pairs", str(blimp), "--pairs", str(supplement), "--first-pass", "bf16", "--json",
                   cwd=project)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    base = out["models"]["base"]
    assert set(base["suites"]) == {"blimp", "supplement"} and base["suites"]["supplement"]["paradigms"] == 1
    assert set(base["paradigms"]) == {"agreement", "turn_taking"}
    assert out["scoring"]["first_pass"] == "bf16" and out["scoring"]["decisions"] == "fp32 within the bf16 margin"
    assert out["scoring"]["rescored"]["base"] == base["rescored"] and 0 <= base["rescored"] <= 3
    saved = json.loads(open(out["saved"]).read())
    assert saved["scoring"]["first_pass"] == "bf16" and "rescored" in saved["scoring"]
    text = format_summary(out)
    for needle in ("agreement (2)", "morphology", "s-v", "blimp (1 paradigms)", "supplement (1 paradigms)",
                   "re-scored in fp32", "first pass bf16"):
        assert needle in text, (needle, text)
    assert_user_error(run_cli("evaluate", "--pairs", str(blimp), "--pairs", str(blimp / "agr.jsonl"), cwd=project),
                      "agreement")


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "blimp").is_dir(), reason="../shared/data/blimp is absent")
def test_real_model_fast_path_decisions_equal_plain_fp32_on_blimp(project):
    """The low-precision first pass this machine has (bf16 where native, else the fp32 shared-prefix
    path) with the re-check, and the fp32 prefix tree on this process's fp32 kernel (oneDNN where it
    exists), give exactly the decisions of the plain per-sentence fp32 scorer on PyTorch's default
    matmul on 134 BLiMP pairs (2 per paradigm: every paradigm; the margin itself was set on 6,700
    pairs, docs/research_notes.md)."""
    from lora_project.config import load_config
    from lora_project.models.base_model import load_base
    from lora_project.models.kernels import forced_kernel

    cfg = load_config([REPO / "config" / "model_config.yaml"], ["training.precision=fp32"])
    base = load_base(cfg)
    pairs = sample_pairs(load_pairs(SHARED_DATA / "blimp"), 2, seed=3)
    with forced_kernel("native"):
        good = sentence_logprobs(base.model, base.tokenizer, [p.good for p in pairs], base.runtime)
        bad = sentence_logprobs(base.model, base.tokenizer, [p.bad for p in pairs], base.runtime)
    path = "bf16" if resolve_runtime("cpu", "auto", 0).precision == "bf16" else "fp32"
    for first_pass in dict.fromkeys([path, "fp32"]):
        scores = score_pairs(base.model, base.tokenizer, pairs, base.runtime, first_pass)
        assert [g > b for g, b in zip(scores.good, scores.bad)] == [g > b for g, b in zip(good, bad)], first_pass
    import numpy as np

    # the continuations' sums: the full sums less the shared prefix's, which the margin never needed
    margins = np.subtract(scores.good, scores.bad)
    np.testing.assert_allclose(margins, np.subtract(good, bad), rtol=1e-4, atol=1e-3)
    full = score_pairs(base.model, base.tokenizer, pairs, base.runtime, "fp32", full=True)
    assert full.good == pytest.approx(good, rel=1e-4) and full.bad == pytest.approx(bad, rel=1e-4)
    # the two passes batch the output layer's rows differently: equal up to fp32 rounding
    np.testing.assert_allclose(np.subtract(full.good, full.bad), margins, rtol=0, atol=1e-4)
    assert all(f <= c + 1e-4 for f, c in zip(full.good, scores.good))
    assert any(f < c - 0.1 for f, c in zip(full.good, scores.good))  # a prefix beyond the BOS took probability away


def test_the_same_pairs_file_twice_is_refused_before_anything_loads(tmp_path, monkeypatch):
    """--pairs X --pairs X (or ./X) would count every pair twice: refused with one line."""
    from lora_project.config import load_config
    from lora_project.evaluation.evaluate import evaluate_minimal_pairs

    f = tmp_path / "one.jsonl"
    f.write_text(json.dumps({"sentence_good": "The dog runs.", "sentence_bad": "The dog run."}) + "\n")
    monkeypatch.chdir(tmp_path)
    for twice in ([f, f], [f, "./one.jsonl"]):
        with pytest.raises(UserError, match="is the same file or folder as --pairs .*give each suite once"):
            evaluate_minimal_pairs(None, load_config([], []), twice, log=lambda m: None)


def test_json_line_breaks_inside_strings_and_uid_types(tmp_path):
    """A JSON line ends at \\n only (U+2028 and U+0085 may sit raw inside its strings); a UID that is
    not a string, or is blank, is a bad line like a non-string field (it would name a paradigm)."""
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"sentence_good": "a\u2028b.", "sentence_bad": "b\u0085a.", "UID": "u"},
                              ensure_ascii=False) + "\r\n" + "not json\n", encoding="utf-8")
    warned = []
    pairs = load_pairs(odd, warn=warned.append)
    assert [(p.good, p.bad, p.uid) for p in pairs] == [("a\u2028b.", "b\u0085a.", "u")]
    assert "line 2: not valid JSON" in warned[0] and "skipped 1 bad line" in warned[0]
    typed = tmp_path / "typed.jsonl"
    typed.write_text("\n".join(json.dumps({"sentence_good": "a.", "sentence_bad": "b.", "UID": u})
                               for u in (["a", "b"], 0, "  ", "ok", None)) + "\n")
    warned = []
    pairs = load_pairs(typed, warn=warned.append)
    assert [p.uid for p in pairs] == ["ok", "typed"]  # a missing UID: the file's name
    assert "skipped 3 bad line(s)" in warned[0] and "UID must be a string, got list" in warned[0]
    assert "UID is blank" in warned[0]
    with pytest.raises(UserError, match="3 bad line"):
        load_pairs(typed, strict=True)


def test_results_saved_in_the_same_second_never_overwrite_each_other(tmp_path):
    from lora_project.utils.io_utils import write_new_json

    paths = [write_new_json(tmp_path, "minimal_pairs", {"run": i}) for i in range(3)]
    assert len(set(paths)) == 3 and all(p.parent == tmp_path for p in paths)
    import json

    assert [json.loads(p.read_text())["run"] for p in paths] == [0, 1, 2]
    assert not list(tmp_path.glob(".*tmp"))  # no temporaries left
