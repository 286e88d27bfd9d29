"""The benchmark report: run everything asked for, write outputs/metrics/benchmark_*.{json,md}, log to MLflow."""

from __future__ import annotations

from pathlib import Path

from lora_project.benchmark.babylm import DEFAULT_LIMIT, babylm_markdown, babylm_speed, load_samples
from lora_project.benchmark.blimp import blimp_markdown, blimp_speed
from lora_project.benchmark.matrix import cross_matrix, matrix_markdown, plot_matrix, scope_note
from lora_project.benchmark.peers import ALL_DEFINITIONS, compare_with_lm_eval, parse_definitions, peers_markdown
from lora_project.benchmark.reference import compare_with_reference
from lora_project.benchmark.speed import run_benchmark
from lora_project.errors import UserError
from lora_project.paths import ProjectPaths
from lora_project.utils.io_utils import atomic_write_json, atomic_write_text, write_new_json


def log_to_mlflow(paths: ProjectPaths, cfg, result: dict, files: list[Path]) -> str | None:
    """One run in the MLflow experiment 'benchmark' with the headline numbers and the report files."""
    from lora_project.utils.mlflow_utils import MlflowTracker

    tracker = MlflowTracker(paths, "benchmark", cfg.tracking.tracking_uri)
    params = {"mode": result["mode"], "model": result["model"], "precision": result["precision"],
              "threads": result["machine"]["threads"], "device": result["machine"]["device"],
              "lora.r": cfg.lora.r, "lora.target_modules": ",".join(cfg.lora.target_modules)}
    run_id = tracker.start(f"benchmark_{result['mode']}", params, {"kind": "benchmark"})
    metrics = {f"matmul_gflops_{k}": v for k, v in result["matmul_gflops"].items()}
    for r in result["training"]:
        metrics[f"train_tokens_per_second_{r['seq_len']}x{r['batch_size']}"] = r["tokens_per_second"]
        metrics[f"fraction_of_peak_{r['seq_len']}x{r['batch_size']}"] = r["fraction_of_peak"]
    inf = result.get("inference") or {}
    if inf:
        metrics["eval_tokens_per_second"] = inf["eval_tokens_per_second"]
        metrics.update({f"generation_ms_per_token_{k}": v for k, v in inf["generation_ms_per_token"].items()})
    for k, v in (result.get("model_load") or {}).items():
        if v is not None:
            metrics[f"model_load_{k}"] = v
    for row in (result.get("blimp") or {}).get("paths", []):
        key = "plain" if row["path"].startswith("plain") else row["first_pass"]
        metrics[f"blimp_pairs_per_second_{key}"] = row["pairs_per_second"]
    peer = result.get("blimp_peers") or {}
    for name, d in (peer.get("definitions") or {}).items():
        metrics[f"lm_eval_{name}_pairs_per_second"] = d["pairs_per_second"]
        metrics[f"lm_eval_{name}_speedup_ours"] = d["speedup_ours"]
        metrics[f"lm_eval_{name}_identical_decisions"] = d["identical_decisions"] / d["pairs"]
    if peer.get("available"):
        metrics["blimp_peers_ours_pairs_per_second"] = peer["ours"]["pairs_per_second"]
    babylm = result.get("babylm") or {}
    if babylm:
        metrics["babylm_projected_ratio"] = babylm["projected_ratio"]
        for side, v in babylm["projected_full_seconds"].items():
            metrics[f"babylm_projected_full_seconds_{side}"] = v
        for task, r in babylm["tasks"].items():
            metrics[f"babylm_{task}_speedup"] = r["speedup"]
    ref = result.get("reference_comparison")
    if ref:
        metrics.update(speedup_vs_reference=ref["speedup"], memory_ratio_vs_reference=ref["memory_ratio"])
        for name, side in (ref.get("references") or {}).items():
            metrics[f"reference_tokens_per_second_{name}"] = side["tokens_per_second"]
    tracker.log_metrics(metrics, step=0)
    for f in files:
        if f and Path(f).is_file():
            tracker.log_artifact(Path(f))
    tracker.end("FINISHED")
    return run_id


def reference_markdown(ref: dict) -> list[str]:
    """The ours-vs-references section: every reference named, the fastest one marked."""
    runs = f", median of {ref['repeats']} runs each" if ref.get("repeats", 1) > 1 else ""
    lines = ["", f"## Ours vs the references a user could pick instead ({ref['steps']} steps of "
                 f"{ref['batch_size']} x {ref['seq_len']} tokens, same model and data, each in its own process{runs})",
             "", "| setup | precision | tokens/s | fraction of its matmul peak | peak RSS (MiB) | "
                 "eval loss after the same tokens |", "|---|---|---|---|---|---|"]
    refs = ref.get("references") or {"reference": dict(ref["reference"], label="plain PEFT + transformers Trainer",
                                                       precision="fp32")}
    for name, side in [*refs.items(), ("ours", ref["ours"])]:
        mark = " (fastest reference)" if name == ref.get("fastest_reference") else ""
        frac = f"{100 * side['fraction_of_peak']:.0f}%" if "fraction_of_peak" in side else "-"
        lines.append(f"| {side.get('label', name)}{mark} | {side.get('precision', '?')} | "
                     f"{side['tokens_per_second']:.0f} | {frac} | {side['peak_rss_mb']:.0f} | {side['eval_loss']:.4f} |")
    lines += ["", f"Against the fastest reference ({ref.get('fastest_reference', 'reference')}): speed-up "
                  f"{ref['speedup']:.2f}x; memory ratio {ref['memory_ratio']:.2f}; eval-loss difference "
                  f"{ref['eval_loss_difference']:+.4f}."]
    levers = ref["ours"].get("levers")
    if levers:
        shown = {k: (f"{v} (chunks of at most 48 MiB of logits)" if k == "loss_chunk_tokens" and v == 0 else v)
                 for k, v in levers.items()}
        lines.append("Our speed switches in this run: " + ", ".join(f"training.{k}={v}" for k, v in shown.items())
                     + " (change one with --set to measure it).")
    if len(ref["ours"].get("runs_tokens_per_second", [])) > 1:
        lines.append("Tokens/s of every run: " + "; ".join(
            f"{side.get('label', name)} " + ", ".join(f"{v:.0f}" for v in side["runs_tokens_per_second"])
            for name, side in [*refs.items(), ("ours", ref["ours"])]) + ".")
    return lines


def write_report(paths: ProjectPaths, result: dict) -> tuple:
    """Save a benchmark result as outputs/metrics/benchmark_<time>.{json,md} (+ heatmap PNG)."""
    base = write_new_json(paths.metrics_dir, "benchmark", result).with_suffix("")  # claims the name
    size = f" ({result['parameters'] / 1e6:.1f} M parameters)" if result.get("parameters") else ""
    cpu = result["machine"].get("cpu") or {}
    lines = [f"# Benchmark {result['created']} ({result['mode']} mode)", "",
             f"Model: {result['model']}{size}, {result['machine']['device']}, {result['machine']['threads']} "
             f"threads, {result['precision']}. CPU: {cpu.get('model', '?')} ({cpu.get('isa', '?')}, native bf16: "
             f"{'yes' if cpu.get('native_bf16') else 'no'}).", "",
             f"Matmul peak: fp32 {result['matmul_gflops']['fp32']:.1f} GFLOP/s, "
             f"bf16 {result['matmul_gflops']['bf16']:.1f} GFLOP/s" + (
                 f", fp32 through oneDNN {result['matmul_gflops']['fp32_onednn']:.1f} GFLOP/s (the scoring passes' "
                 f"fp32 kernel here: {result.get('fp32_kernel', '?')})" if "fp32_onednn" in result["matmul_gflops"]
                 else "") + ".", ""]
    if result["training"]:
        lines += ["| seq x batch | tokens/s | GFLOP/s | fraction of peak | peak RSS (MiB) |", "|---|---|---|---|---|"]
    for r in result["training"]:
        lines.append(f"| {r['seq_len']} x {r['batch_size']} | {r['tokens_per_second']:.0f} | "
                     f"{r['achieved_gflops']:.1f} | {100 * r['fraction_of_peak']:.0f}% | "
                     f"{r['peak_rss_mb_so_far']:.0f} |")
    inf, load = result.get("inference"), result.get("model_load")
    if inf:
        g = inf["generation_ms_per_token"]
        lines += ["", f"Generation: median of {inf.get('generation_repeats', 1)} timed runs after an untimed warm-up.",
                  "", "| inference | value |", "|---|---|",
                  f"| evaluation (forward + loss, {inf['eval_shape'][1]} x {inf['eval_shape'][0]} tokens, "
                  f"{result.get('precision', '?')}) | "
                  f"{inf['eval_tokens_per_second']:.0f} tokens/s |",
                  f"| generation, base | {g['base']:.1f} ms/token |",
                  f"| generation, adapter unmerged | {g['adapter_unmerged']:.1f} ms/token |",
                  f"| generation, adapter merged | {g['adapter_merged']:.1f} ms/token |"]
    if load:
        cold = f"{load['cold_seconds']:.1f} s" if load.get("cold_seconds") is not None else "not measured (quick mode)"
        lines += [f"| model load, cold (empty model cache) | {cold} |",
                  f"| model load, cached (fresh process) | {load['cached_seconds']:.1f} s |"]
    matrix = result.get("matrix")
    if matrix:
        heat = plot_matrix(matrix, base.parent / f"{base.name}_matrix.png")
        result["matrix"]["heatmap"] = str(heat)
        lines += ["", f"## Cross-evaluation: perplexity (bits per byte) on the {matrix['split']} splits "
                      f"({scope_note(matrix)})", "",
                  matrix_markdown(matrix), "", f"Heatmap: {heat.name}"]
    ref = result.get("reference_comparison")
    if ref:
        lines += reference_markdown(ref)
    if result.get("blimp"):
        lines += blimp_markdown(result["blimp"])
    if result.get("blimp_peers"):
        lines += peers_markdown(result["blimp_peers"])
    if result.get("babylm"):
        lines += babylm_markdown(result["babylm"])
    atomic_write_json(base.with_suffix(".json"), result)  # again, with the heatmap's path
    atomic_write_text(base.with_suffix(".md"), "\n".join(lines) + "\n")
    return base.with_suffix(".json"), base.with_suffix(".md")


def benchmark_report(paths: ProjectPaths, cfg, *, quick: bool = False, shapes=((64, 16), (128, 8)), steps: int = 4,
                     matrix: bool = False, reference: bool = False, reference_steps: int = 6, mlflow: bool = True,
                     blimp: Path | None = None, blimp_pairs: int = 5, speed: bool | None = None,
                     references: str = "auto", reference_repeats: int = 1, matrix_max_tokens: int = 0,
                     peer_pairs: int | None = 20, peer_definitions: str | None = None,
                     babylm: Path | None = None, babylm_limit: int = DEFAULT_LIMIT,
                     matrix_scorer=None, log=print) -> dict:
    """`lora-project benchmark`: the matmul peaks; the speed sections (`run_benchmark`) when `speed`, which
    defaults to "only when no other section is asked for"; optionally the cross matrix, the reference
    comparison and the minimal-pair speed; the report files, and an MLflow run (when `mlflow` and the
    config's tracking allow); returns the result. The matrix scores whole splits unless
    `matrix_max_tokens` > 0 caps each one (said in the report). With `blimp`, lm-evaluation-harness is
    measured beside ours on `peer_pairs` seeded pairs per paradigm (0: the whole folder; None: not run),
    under each of `peer_definitions` (comma-separated: babylm, lm_eval; None: both).
    With `babylm`, the BabyLM suite's scoring is timed against the official strategy on `babylm_limit`
    seeded items per UID (benchmark/babylm.py). `matrix_scorer`: how the matrix's cells are scored
    (`cross_matrix`'s `scorer`; None: in this process)."""
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if reference and reference_steps < 2:
        raise UserError("--reference-steps must be at least 2 (the first step is not timed)")
    if matrix_max_tokens < 0:
        raise UserError(f"--matrix-max-tokens must be 0 (whole splits) or positive, got {matrix_max_tokens}")
    if blimp is not None and (blimp_pairs < 1 or not Path(blimp).is_dir()):
        raise UserError(f"--blimp needs a folder of .jsonl pairs and --blimp-pairs >= 1 ({blimp})")
    if babylm is not None and babylm_limit < 1:
        raise UserError(f"--limit must be at least 1, got {babylm_limit}")
    if peer_pairs is not None and peer_pairs < 0:
        raise UserError(f"--peer-pairs must be 0 (the whole folder) or positive, got {peer_pairs}")
    definitions = parse_definitions(peer_definitions or ALL_DEFINITIONS)
    if reference_repeats < 1:
        raise UserError(f"--reference-repeats must be at least 1, got {reference_repeats}")
    if reference:
        from lora_project.benchmark.reference import pick_references

        pick_references(references, False)  # a bad --references list is refused before anything runs
    samples = None
    if babylm is not None:  # the data is read and checked before anything is measured
        from lora_project.evaluation.babylm_tasks import TASKS

        samples = load_samples(Path(babylm), list(TASKS), babylm_limit, cfg.training.seed, log=log)
    if speed is None:
        speed = not (matrix or reference or blimp is not None or babylm is not None)
    result = run_benchmark(paths, cfg, quick=quick, shapes=shapes, steps=steps, speed=speed, log=log)
    if matrix:
        log("cross-evaluation matrix ...")
        result["matrix"] = cross_matrix(paths, cfg, max_tokens=matrix_max_tokens, log=log, scorer=matrix_scorer)
    if reference:
        shape = {"seq_len": 64, "batch_size": 4} if quick else {}  # quick: a smoke test of every side
        result["reference_comparison"] = compare_with_reference(
            paths, cfg, steps=reference_steps, references=references, repeats=reference_repeats, **shape,
            peaks=result["matmul_gflops"], log=log)
    if blimp is not None:
        log(f"minimal-pair scoring speed on {blimp} ...")
        result["blimp"] = blimp_speed(cfg, Path(blimp), per_paradigm=blimp_pairs, log=log)
        if peer_pairs is not None:
            log("ours vs lm-evaluation-harness on the same pairs ...")
            result["blimp_peers"] = compare_with_lm_eval(cfg, Path(blimp), per_paradigm=peer_pairs,
                                                         definitions=definitions, log=log)
    if babylm is not None:
        log(f"BabyLM suite: ours vs the official strategy on {babylm} ...")
        result["babylm"] = babylm_speed(cfg, Path(babylm), limit=babylm_limit, samples=samples, log=log)
    json_path, md_path = write_report(paths, result)
    result["report"] = {"json": str(json_path), "markdown": str(md_path)}
    if cfg.tracking.mlflow and mlflow:
        heat = (result.get("matrix") or {}).get("heatmap")
        result["mlflow_run_id"] = log_to_mlflow(paths, cfg, result, [json_path, md_path, heat])
    return result

# --------------------------------------------------------------------------- ours vs reference
# Each side runs in its own spawned process so that peak memory (ru_maxrss) is its own.
