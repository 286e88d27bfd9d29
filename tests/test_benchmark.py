"""`benchmark --quick` runs in seconds and its report has every field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_user_error, run_cli


@pytest.fixture()
def small_matmul(monkeypatch):
    """The matmul-peak probe on small matrices: the same code, without the seconds that a
    2048 x 576 x 1536 bf16 matmul takes on a CPU without native bf16 (the slow tier and
    `lora-project benchmark` itself use the real size)."""
    import lora_project.benchmark as bench

    real = bench.speed.matmul_gflops
    monkeypatch.setattr(bench.speed, "matmul_gflops", lambda dtype, **kw: real(dtype, m=256, k=128, n=256, min_seconds=0.1,
                                                                             kernel=kw.get("kernel", "native")))


@pytest.mark.slow  # a real process (or the full quick benchmark): kept out of make test-fast
def test_quick_benchmark_report(project, tracking_store, small_matmul):
    proc = run_cli("benchmark", "--quick", "--shapes", "32x4,16x8", "--steps", "2", "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["mode"] == "quick" and out["precision"] in ("fp32", "bf16")
    assert out["matmul_gflops"]["fp32"] > 0 and out["matmul_gflops"]["bf16"] > 0
    assert [(r["seq_len"], r["batch_size"]) for r in out["training"]] == [(32, 4), (16, 8)]
    for r in out["training"]:
        assert r["tokens_per_second"] > 0 and 0 < r["fraction_of_peak"] and r["peak_rss_mb_so_far"] > 0
        assert r["achieved_gflops"] > 0
    saved = json.loads(Path(out["report"]["json"]).read_text())
    assert saved["training"] == out["training"]
    md = Path(out["report"]["markdown"]).read_text()
    assert "| 32 x 4 |" in md and Path(out["report"]["json"]).parent == project / "outputs" / "metrics"
    inf = out["inference"]
    assert inf["eval_tokens_per_second"] > 0 and inf["generation_new_tokens"] == 8
    # each generation figure is the median of the timed runs that follow a warm-up
    for side, runs in inf["generation_runs_ms_per_token"].items():
        assert len(runs) == inf["generation_repeats"] == 3
        assert inf["generation_ms_per_token"][side] == pytest.approx(sorted(runs)[1])
    assert set(inf["generation_ms_per_token"]) == {"base", "adapter_unmerged", "adapter_merged"}
    assert all(v > 0 for v in inf["generation_ms_per_token"].values())
    assert out["model_load"]["cached_seconds"] > 0 and out["model_load"]["cold_seconds"] is None
    assert "generation, adapter merged" in md and "model load, cached" in md
    # logged to MLflow (the project's SQLite store), with the report files as artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(out["mlflow_run_id"])
    assert run.data.params["mode"] == "quick" and run.info.status == "FINISHED"
    assert run.data.metrics["eval_tokens_per_second"] == inf["eval_tokens_per_second"]
    assert run.data.metrics["train_tokens_per_second_32x4"] == out["training"][0]["tokens_per_second"]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {Path(out["report"]["json"]).name,
                                                                          Path(out["report"]["markdown"]).name}


def test_benchmark_bad_shapes(project):
    assert_user_error(run_cli("benchmark", "--quick", "--shapes", "64by16", cwd=project), "--shapes")
    assert_user_error(run_cli("benchmark", "--quick", "--steps", "0", cwd=project), "--steps")


@pytest.mark.slow  # every reference and ours train the project's tiny model, each in a child process
def test_reference_comparison_runs_every_reference_and_compares_with_the_fastest(project, tracking_store):
    # one fp32 and one bf16 reference (emulated here where bf16 is not native); `auto` is unit-tested below
    proc = run_cli("benchmark", "--quick", "--reference", "--references", "trainer_fp32,peft_autocast_bf16",
                   "--reference-steps", "2",
                   "--json", cwd=project, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    ref = out["reference_comparison"]
    assert out["training"] == [] and out["inference"] is None  # only the asked-for section ran
    assert (ref["seq_len"], ref["batch_size"]) == (64, 4)  # quick mode's shape
    assert list(ref["references"]) == ["trainer_fp32", "peft_autocast_bf16"]
    assert [ref["references"][n]["precision"] for n in ref["references"]] == ["fp32", "bf16"]
    for side in [ref["ours"], *ref["references"].values()]:
        assert side["tokens_per_second"] > 0 and side["peak_rss_mb"] > 0 and side["fraction_of_peak"] > 0
        assert side["tokens"] == ref["references"]["trainer_fp32"]["tokens"]  # the same tokens on every side
        # same data, steps and seed: every training ends at nearly the same loss (tiny model, 2 steps)
        assert abs(side["eval_loss"] - ref["ours"]["eval_loss"]) < 0.05
    fastest = max(ref["references"], key=lambda n: ref["references"][n]["tokens_per_second"])
    assert ref["fastest_reference"] == fastest and ref["reference"] == ref["references"][fastest]
    assert ref["speedup"] == pytest.approx(ref["ours"]["tokens_per_second"]
                                           / ref["references"][fastest]["tokens_per_second"])
    md = Path(out["report"]["markdown"]).read_text()
    assert "(fastest reference)" in md and "plain PEFT loop under torch.autocast(bfloat16)" in md


def test_reference_report_names_our_switches_and_explains_the_automatic_loss_chunk():
    from lora_project.benchmark.report import reference_markdown

    side = {"tokens_per_second": 100.0, "peak_rss_mb": 1000.0, "eval_loss": 3.0, "precision": "fp32"}
    ref = {"steps": 2, "batch_size": 4, "seq_len": 64, "repeats": 1, "fastest_reference": "trainer_fp32",
           "references": {"trainer_fp32": dict(side, label="transformers Trainer, fp32")},
           "ours": dict(side, tokens_per_second=150.0, levers={"malloc_reuse": True, "loss_chunk_tokens": 0}),
           "speedup": 1.5, "memory_ratio": 1.0, "eval_loss_difference": 0.0}
    md = "\n".join(reference_markdown(ref))
    assert "training.loss_chunk_tokens=0 (chunks of at most 48 MiB of logits)" in md
    assert "training.malloc_reuse=True" in md and "speed-up 1.50x" in md
    ref["ours"]["levers"]["loss_chunk_tokens"] = 1024
    assert "training.loss_chunk_tokens=1024 (change one" in "\n".join(reference_markdown(ref))


def test_reference_choice_is_checked_before_anything_runs(project):
    from lora_project.benchmark.reference import pick_references

    assert pick_references("auto", False) == ["trainer_fp32"]
    assert pick_references("auto", True) == ["trainer_fp32", "trainer_bf16", "peft_autocast_bf16"]
    assert pick_references("peft_autocast_bf16, trainer_fp32", False) == ["peft_autocast_bf16", "trainer_fp32"]
    assert_user_error(run_cli("benchmark", "--quick", "--reference", "--references", "trainer_fp64", cwd=project),
                      "trainer_fp64")
    assert_user_error(run_cli("benchmark", "--quick", "--reference", "--reference-repeats", "0", cwd=project),
                      "--reference-repeats")
    for option in (["--references", "nonsense"], ["--reference-steps", "2"], ["--reference-repeats", "3"]):
        # without --reference these would be ignored while a full speed benchmark runs
        assert_user_error(run_cli("benchmark", "--quick", *option, cwd=project), "go with --reference")
    assert not list((project / "outputs" / "metrics").glob("benchmark_*"))


@pytest.mark.slow  # several trainings in one test: kept out of make test-fast's 2 minutes
def test_matrix_scores_base_and_adapters_on_every_prepared_dataset(project, small_matmul, monkeypatch):
    import lora_project.benchmark as bench

    # The fresh-process model-load timing is checked by test_quick_benchmark_report.
    monkeypatch.setattr(bench.speed, "load_times", lambda cfg, quick, log=print: {"cold_seconds": None,
                                                                             "cached_seconds": 0.0})
    assert run_cli("train-batch", "toddler_data", "kids", "--no-mlflow", "--no-progress", cwd=project).returncode == 0
    broken = project / "adapters" / "broken_lora"
    broken.mkdir()
    proc = run_cli("benchmark", "--quick", "--shapes", "16x2", "--steps", "1", "--matrix", "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["training"] == [] and out["inference"] is None and out["model_load"] is None  # matrix only
    assert out["matmul_gflops"]["fp32"] > 0 and out["machine"]["cpu"]["isa"]
    m = out["matrix"]
    assert m["datasets"] == ["kids", "toddler_data"]
    assert m["models"] == ["base", "kids_lora", "toddler_data_lora"]
    assert "left out: broken_lora" in proc.stderr
    for model in m["models"]:
        for d in m["datasets"]:
            assert m["cells"][model][d]["perplexity"] > 1 and m["cells"][model][d]["bits_per_byte"] > 0
    # each adapter is best (or at least better than the base) on its own data
    assert m["cells"]["toddler_data_lora"]["toddler_data"]["perplexity"] < m["cells"]["base"]["toddler_data"]["perplexity"]
    assert Path(m["heatmap"]).is_file()
    assert "Cross-evaluation" in Path(out["report"]["markdown"]).read_text()


def test_blimp_speed_section_names_cpu_paths_and_projects_full_time(project, tmp_path):
    from lora_project.benchmark import blimp_markdown, blimp_speed
    from lora_project.config import load_project_config
    from lora_project.models.kernels import fp32_kernel
    from lora_project.paths import ProjectPaths

    folder = tmp_path / "blimp"
    folder.mkdir()
    for uid in ("agr", "order"):
        (folder / f"{uid}.jsonl").write_text("\n".join(json.dumps(
            {"sentence_good": f"the dog runs {i}.", "sentence_bad": f"the dog run {i}.", "UID": uid})
            for i in range(6)) + "\n")
    b = blimp_speed(load_project_config(ProjectPaths.discover()), folder, per_paradigm=2, rounds=1, log=lambda m: None)
    assert b["sample_pairs"] == 4 and b["full_pairs"] == 12 and b["cpu"]["isa"] and b["cpu"]["model"]
    labels = [r["path"] for r in b["paths"]]
    assert labels[:2] == ["plain fp32 (before)", "prefix tree, fp32"]
    assert [r["fp32_kernel"] for r in b["paths"][:2]] == ["native", "native"]  # the before, on PyTorch's matmul
    assert ("prefix tree, fp32, oneDNN kernel" in labels) == (fp32_kernel() == "onednn")
    assert ("prefix tree, bf16 first pass + fp32 re-check" in labels) == b["cpu"]["native_bf16"]
    assert all(r["pairs_per_second"] > 0 and r["projected_full_minutes"] > 0 for r in b["paths"])
    assert 0 < b["shared_prefix_fraction"] < 1
    text = "\n".join(blimp_markdown(b))
    assert b["cpu"]["isa"] in text and "projected full (12 pairs)" in text
