"""Evaluation statistics against hand-computed values, and one perplexity definition across
training's validation numbers, `evaluate --dataset` and the cross-evaluation matrix."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import run_cli

from lora_project.utils.stats import (
    document_intervals,
    macro_average,
    mcnemar_exact,
    paired_document_difference,
    paired_proportions,
    percentile_interval,
    resampled_sums,
    wilson_interval,
)

# ------------------------------------------------------------------------------ hand-computed values


def test_wilson_interval_matches_hand_computed_values():
    # 7/10, z = 1.95996: centre (0.7 + 0.19207) / 1.38415 = 0.64449,
    # half 1.95996 * sqrt(0.021 + 0.0096037) / 1.38415 = 0.24771  ->  [0.39678, 0.89221]
    assert wilson_interval(7, 10) == pytest.approx((0.39678, 0.89221), abs=1e-5)
    # 0/5: centre = half = (z^2/10) / (1 + z^2/5) = 0.38415 / 1.76829  ->  [0, 0.43449]
    assert wilson_interval(0, 5) == pytest.approx((0.0, 0.43449), abs=1e-5)
    lo, hi = wilson_interval(5, 5)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.43449, abs=1e-5)  # mirror image of 0/5
    assert wilson_interval(70, 100)[1] - wilson_interval(70, 100)[0] < hi - lo  # more pairs, narrower


def test_mcnemar_exact_p_from_the_binomial():
    # 1 discordant pair one way, 6 the other: P(X <= 1 | n=7, 1/2) = (1 + 7) / 128, two-sided 0.125
    assert mcnemar_exact(1, 6) == pytest.approx(16 / 128)
    assert mcnemar_exact(6, 1) == mcnemar_exact(1, 6)
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_paired_proportions_and_macro_standard_error_by_hand():
    r = paired_proportions([1, 1, 0, 0, 1], [1, 0, 1, 1, 1])
    assert (r["first_only"], r["second_only"], r["items"]) == (1, 2, 5)
    assert r["difference"] == pytest.approx(0.2)
    assert r["se"] == pytest.approx(math.sqrt(3 / 25 - 1 / 125))  # (b + c)/n^2 - (c - b)^2/n^3
    assert r["p_value"] == pytest.approx(1.0)  # 2 * P(X <= 1 | 3) = 2 * 4/8
    m = macro_average([0.5, 1.0], [2, 4])
    assert m["mean"] == 0.75 and m["se"] == pytest.approx(math.sqrt(0.25 / 2) / 2)
    assert m["ci_low"] == pytest.approx(0.75 - 1.959964 * m["se"], abs=1e-6)


def test_bootstrap_interval_matches_the_enumerated_bootstrap_distribution():
    """Ratio sum(nll)/sum(tokens) over 6 documents, three of (1 nat, 1 token) and three of (6 nats,
    2 tokens): all 6^6 resamples are equally likely, so the exact bootstrap distribution is known by
    enumeration. Its 2.5% and 97.5% quantiles are 11/7 (one heavy document: (6 + 5)/(2 + 5)) and
    31/11 (five: (30 + 1)/(10 + 1)), as the count of heavy documents is Binomial(6, 1/2) with
    P(<= 0) = 1/64 < 0.025 < P(<= 1) = 7/64; 10,000 seeded resamples land on the same values."""
    nll, tok = np.array([1.0, 1.0, 1.0, 6.0, 6.0, 6.0]), np.array([1.0, 1.0, 1.0, 2.0, 2.0, 2.0])
    ix = np.array(list(itertools.product(range(6), repeat=6)))
    exact = np.sort(nll[ix].sum(1) / tok[ix].sum(1))
    assert exact[int(0.025 * len(exact))] == pytest.approx(11 / 7)
    assert exact[int(0.975 * len(exact))] == pytest.approx(31 / 11)
    s = resampled_sums(np.column_stack([nll, tok]), resamples=10_000, seed=3)
    assert percentile_interval(s[:, 0] / s[:, 1]) == pytest.approx((11 / 7, 31 / 11))
    # the same seed gives the same resamples, another seed others
    assert np.array_equal(s, resampled_sums(np.column_stack([nll, tok]), resamples=10_000, seed=3))
    assert not np.array_equal(s, resampled_sums(np.column_stack([nll, tok]), resamples=10_000, seed=4))


def test_document_intervals_degenerate_and_paired_difference():
    tok = np.array([3, 5, 2, 7, 4])
    ci = document_intervals(2.0 * tok, tok, 2 * tok)  # every document at 2 nats per token
    assert ci["perplexity_ci"] == pytest.approx((math.exp(2), math.exp(2)))
    assert ci["bits_per_byte_ci"] == pytest.approx((1 / math.log(2), 1 / math.log(2)))
    rng = np.random.default_rng(0)
    base = tok * rng.uniform(2, 3, len(tok))
    same = paired_document_difference(base, base, tok, tok)
    assert same["perplexity"] == 0 and same["perplexity_ci"] == (0.0, 0.0) and same["p_value"] == 1.0
    better = paired_document_difference(base, base - 0.5 * tok, tok, tok)  # 0.5 nats per token less everywhere
    assert better["bits_per_byte"] == pytest.approx(-0.5 / math.log(2))
    assert better["bits_per_byte_ci"][1] < 0 and better["perplexity_ci"][1] < 0 and better["p_value"] == 0.0
    assert document_intervals([1.0], [1], [1]) == {"perplexity_ci": None, "bits_per_byte_ci": None}


def test_score_split_cap_and_document_sums(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_project.models.scoring import score_split, score_text, validation_metrics
    from lora_project.utils.device import resolve_runtime

    rt = resolve_runtime("cpu", "fp32", 1)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    docs = ["the dog runs.", "bye bye doggy.", "more juice please", "where ball?"]
    whole = score_split(model, tok, docs, "\n", rt, max_length=8, stride=3)
    assert whole.doc_nll.sum() == pytest.approx(whole.nll_sum) and whole.doc_tokens.sum() == whole.tokens
    assert whole.documents == whole.documents_total == 4 and whole.tokens_total == whole.tokens and not whole.capped
    first = len(tok(docs[0], add_special_tokens=False)["input_ids"]) + 1
    second = len(tok(docs[1], add_special_tokens=False)["input_ids"]) + 1
    capped = score_split(model, tok, docs, "\n", rt, max_tokens=first + second, max_length=8, stride=3)
    assert (capped.documents, capped.tokens, capped.cap) == (2, first + second, first + second) and capped.capped
    # The leading documents' sums do not depend on what follows them (causal model).
    assert capped.doc_nll == pytest.approx(whole.doc_nll[:2], rel=1e-5)
    # A text is scored by the same windows: a one-document split is that text's tokens plus its EOS.
    one = score_split(model, tok, docs[:1], "", rt, max_length=8, stride=3)
    text = score_text(model, tok, docs[0], rt, max_length=8, stride=3)
    assert one.tokens == text.tokens + 1 and one.bytes == text.bytes
    assert one.nll_sum > text.nll_sum
    m = validation_metrics(model, tok, docs, "\n", rt, max_tokens=first + second)
    assert (m["val_documents"], m["val_documents_total"], m["val_cap_tokens"]) == (2, 4, first + second)
    assert all(isinstance(v, (int, float)) for v in m.values())  # MLflow logs the dict as it is


# ------------------------------------------------------------------------------ one definition, three callers


def _cli_json(*args, cwd):
    proc = run_cli(*args, "--json", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_training_evaluate_and_matrix_agree_on_one_split(project):
    """The validation numbers in results.json, `evaluate --dataset --split validation` and the matrix
    on the validation split are one scoring: equal to float precision, with the cap recorded."""
    from lora_project.benchmark.matrix import cross_matrix, matrix_markdown
    from lora_project.config import load_project_config
    from lora_project.paths import ProjectPaths

    proc = run_cli("train", "toddler_data", "--json", "--no-progress", "--no-mlflow",
                   "--set", "training.eval_max_tokens=120", cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    before, after = res["metrics_before"], res["metrics_after"]
    assert before["cap"] == 120 and before["documents_scored"] < before["documents_total"]
    assert "capped at 120 tokens" in proc.stderr
    adapter = "adapters/toddler_data_lora"
    ev = _cli_json("evaluate", "--dataset", "toddler_data", "--split", "validation", "--adapter", adapter,
                   "--max-tokens", "120", cwd=project)
    assert ev["scope"] == {k: before[k] for k in ev["scope"]}
    for rec, name in ((before, "base"), (after, "toddler_data_lora")):
        assert ev["models"][name]["perplexity"] == pytest.approx(rec["perplexity"], rel=1e-6)
        assert ev["models"][name]["bits_per_byte"] == pytest.approx(rec["bits_per_byte"], rel=1e-6)
        assert ev["models"][name]["perplexity_ci"] == pytest.approx(rec["perplexity_ci"], rel=1e-6)
    paths = ProjectPaths.discover()
    cfg = load_project_config(paths)
    m = cross_matrix(paths, cfg, max_tokens=120, split="validation", log=lambda _m: None)
    for rec, name in ((before, "base"), (after, "toddler_data_lora")):
        assert m["cells"][name]["toddler_data"]["perplexity"] == pytest.approx(rec["perplexity"], rel=1e-6)
    assert m["scope"]["toddler_data"] == ev["scope"]
    assert "capped at 120 tokens" in matrix_markdown(m)
    # Whole split: evaluate and the matrix score every document; the change has a paired interval.
    whole = _cli_json("evaluate", "--dataset", "toddler_data", "--split", "validation", "--adapter", adapter,
                      cwd=project)
    assert whole["scope"]["documents_scored"] == before["documents_total"] and whole["scope"]["cap"] is None
    mw = cross_matrix(paths, cfg, split="validation", log=lambda _m: None)
    cell = mw["cells"]["toddler_data_lora"]["toddler_data"]
    assert cell["perplexity"] == pytest.approx(whole["models"]["toddler_data_lora"]["perplexity"], rel=1e-6)
    d = whole["difference"]["toddler_data_lora"]
    assert cell["change"]["bits_per_byte_ci"] == pytest.approx(d["bits_per_byte_ci"], rel=1e-6)
    assert d["bits_per_byte_ci"][0] <= d["bits_per_byte"] <= d["bits_per_byte_ci"][1]
    assert "whole split" in run_cli("evaluate", "--dataset", "toddler_data", "--split", "validation",
                                    cwd=project).stdout


# ------------------------------------------------------------------------------ plots show the effect


def test_pairs_change_table_and_figure_carry_the_paired_intervals():
    import matplotlib

    matplotlib.use("Agg")
    from lora_project.evaluation.minimal_pairs import Pair, accuracy_report
    from lora_project.evaluation.pair_report import paired_change
    from lora_project.notebook_tables import pairs_change, plot_pairs_change

    pairs = [Pair("g", "b", f"p{i // 10}", "syntax" if i < 20 else "morphology") for i in range(40)]
    base = [i % 2 == 0 for i in range(40)]
    adapter = [True] * 40  # right on every pair: 20 pairs only the adapter gets right, none the other way
    res = {"pairs": 40, "models": {}, "difference": {}}
    for name, flags in (("base", base), ("a_lora", adapter)):
        res["models"][name] = accuracy_report(pairs, [1.0 if f else 0.0 for f in flags], [0.5] * 40)
    res["difference"]["a_lora"] = {"paired": paired_change(pairs, res["models"]["base"]["decisions"],
                                                           res["models"]["a_lora"]["decisions"])}
    table = pairs_change(res).set_index("group")
    assert table.loc["macro average", "change"] == pytest.approx(0.5)
    assert table.loc["syntax", "p_value"] == pytest.approx(2 / 2 ** 10)  # 10 discordant pairs, all one way
    # per-pair paired se for syntax: b=0, c=10, n=20 -> sqrt(10/400 - 100/8000)
    se = math.sqrt(10 / 400 - 100 / 8000)
    assert table.loc["syntax", "ci_high"] - table.loc["syntax", "change"] == pytest.approx(1.959964 * se, rel=1e-5)
    fig = plot_pairs_change(res)
    bars = [c for c in fig.axes[0].containers if hasattr(c, "has_xerr") and c.has_xerr]
    assert len(bars) == 1  # one adapter: one set of error bars over macro + 2 fields
    segments = bars[0].lines[2][0].get_segments()
    assert len(segments) == 3 and segments[0][0][0] == pytest.approx(table.loc["macro average", "ci_low"])


def test_matrix_heatmap_is_the_change_against_the_base_on_a_centred_scale():
    import matplotlib

    matplotlib.use("Agg")
    from lora_project.benchmark.matrix import matrix_figure, matrix_markdown

    def cell(bpb, change=None):
        c = {"perplexity": 2 ** (3 * bpb), "bits_per_byte": bpb, "tokens": 10, "documents": 3,
             "perplexity_ci": None, "bits_per_byte_ci": None}
        if change is not None:
            c["change"] = {"bits_per_byte": change, "bits_per_byte_ci": [change - 0.01, change + 0.01]}
        return c

    m = {"split": "test", "max_tokens": 0, "cap": None, "scope": {}, "datasets": ["x", "y"],
         "models": ["base", "a_lora"], "cells": {"base": {"x": cell(1.0), "y": cell(2.0)},
                                                 "a_lora": {"x": cell(0.9, -0.1), "y": cell(2.05, 0.05)}}}
    fig = matrix_figure(m)
    im = fig.axes[0].images[0]
    assert im.get_array().tolist() == [[-0.1, 0.05]]  # adapters only, change against the base
    assert im.norm.vmin == -im.norm.vmax == pytest.approx(-0.1)  # centred on 0
    assert "whole splits" in fig.axes[0].get_title() and "-0.100" in fig.axes[0].texts[0].get_text()
    assert "| a_lora | -0.1000 [-0.1100, -0.0900] | +0.0500 [+0.0400, +0.0600] |" in matrix_markdown(m)


def test_caps_are_refused_where_they_make_no_sense(project):
    from conftest import assert_user_error

    (project / "t.txt").write_text("mommy want juice\n")
    assert_user_error(run_cli("evaluate", "--text", "t.txt", "--max-tokens", "5", cwd=project), "--max-tokens")
    assert_user_error(run_cli("evaluate", "--dataset", "toddler_data", "--max-tokens", "-1", cwd=project),
                      "--max-tokens")
    assert_user_error(run_cli("benchmark", "--quick", "--matrix", "--matrix-max-tokens", "-1", cwd=project),
                      "--matrix-max-tokens")
    assert not (project / "outputs" / "metrics").exists() or not any((project / "outputs" / "metrics").iterdir())


def test_adapters_trained_with_several_seeds_get_a_mean_and_sd_row():
    from lora_project.benchmark.matrix import matrix_markdown
    from lora_project.evaluation.evaluate import perplexity_table, seeds_summary

    per_model = {"base": {"perplexity": 30.0, "bits_per_byte": 2.0},
                 "kids_s42": {"perplexity": 20.0, "bits_per_byte": 1.5},
                 "kids_s43": {"perplexity": 22.0, "bits_per_byte": 1.6},
                 "kids_s44": {"perplexity": 24.0, "bits_per_byte": 1.7},
                 "other_s1": {"perplexity": 9.0, "bits_per_byte": 1.0}}  # one seed: no spread to report
    g = seeds_summary(per_model, ("perplexity", "bits_per_byte"))
    assert list(g) == ["kids"] and g["kids"]["perplexity"]["seeds"] == [42, 43, 44]
    assert g["kids"]["perplexity"]["mean"] == pytest.approx(22.0)
    assert g["kids"]["perplexity"]["sd"] == pytest.approx(2.0)  # sample sd of 20, 22, 24
    assert g["kids"]["bits_per_byte"]["sd"] == pytest.approx(0.1)
    res = {"dataset": "kids", "split": "test", "scope": {"tokens_scored": 10, "documents_scored": 2,
                                                         "tokens_total": 10, "documents_total": 2, "cap": None},
           "max_length": 1024, "stride": 512, "models": per_model, "difference": {}, "across_seeds": g}
    row = next(line for line in perplexity_table(res).splitlines() if line.startswith("kids (seeds 42,43,44)"))
    assert "22.000" in row and "sd 2.000" in row and "across 3 seeds" in row
    cells = {m: {"x": {"perplexity": v["perplexity"], "bits_per_byte": v["bits_per_byte"]}} for m, v in per_model.items()}
    m = {"split": "test", "max_tokens": 0, "cap": None, "scope": {}, "datasets": ["x"],
         "models": list(per_model), "cells": cells}
    assert "| kids | 22.00 ± 2.00 (3) |" in matrix_markdown(m)


def test_evaluation_numbers_are_fp32_whatever_precision_the_config_or_the_given_base_has(project, tmp_path):
    """bf16 perplexity differs from fp32 by up to 0.2% (research notes), so evaluate scores in fp32 on
    every machine: a bf16 config, or a bf16 base handed over by training, gives the fp32 numbers."""
    from lora_project.config import load_project_config
    from lora_project.evaluation.evaluate import evaluate_perplexity
    from lora_project.models.base_model import load_base
    from lora_project.paths import ProjectPaths

    paths = ProjectPaths.discover()
    text = tmp_path / "t.txt"
    text.write_text("the dog runs to the park and the cat sits on the mat. " * 30)
    cfg16 = load_project_config(paths, ["training.precision=bf16"])
    bf16_base = load_base(cfg16)
    assert bf16_base.runtime.precision == "bf16" and next(bf16_base.model.parameters()).dtype == torch.bfloat16
    given = evaluate_perplexity(paths, cfg16, text_file=text, base=bf16_base)
    configured = evaluate_perplexity(paths, cfg16, text_file=text)
    fp32 = evaluate_perplexity(paths, load_project_config(paths, ["training.precision=fp32"]), text_file=text)
    assert given["precision"] == configured["precision"] == fp32["precision"] == "fp32"
    assert given["models"]["base"]["perplexity"] == configured["models"]["base"]["perplexity"] \
        == fp32["models"]["base"]["perplexity"]
    from lora_project.evaluation.evaluate import perplexity_table
    from lora_project.models.kernels import fp32_kernel

    assert f"; fp32 ({fp32_kernel()} kernel)" in perplexity_table(given).splitlines()[0]  # the console says so too
