"""`benchmark`: this machine's matmul peak and our trainer's throughput and memory.

Full mode uses the configured base model (the embedded SmolLM2-135M by default) and the
toddler corpus; quick mode builds a tiny Llama in code and runs in seconds (used in CI).
Results go to ``outputs/metrics/benchmark_<timestamp>.{json,md}``.

Throughput is timed over optimizer steps after one warm-up micro-step; the fraction of
peak uses 4 x parameters FLOPs per token (forward 2x, input-gradient backward 2x).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from lora_project.errors import UserError
from lora_project.paths import ProjectPaths
from lora_project.utils.io_utils import atomic_write_json, atomic_write_text


def matmul_gflops(dtype_name: str, m: int = 2048, k: int = 576, n: int = 1536, min_seconds: float = 0.5) -> float:
    """Sustained GFLOP/s of an (m x k) @ (k x n) matmul in the given dtype on the CPU threads set."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b  # warm-up
    calls, t0 = 0, time.perf_counter()
    while True:
        a @ b
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return 2 * m * k * n * calls / elapsed / 1e9


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'64x16,128x8' -> [(64, 16), (128, 8)] (sequence length x batch size)."""
    shapes = []
    for part in text.split(","):
        try:
            seq, bs = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise UserError(f"--shapes: {part!r} is not SEQxBATCH, e.g. 64x16") from None
        if seq < 8 or bs < 1:
            raise UserError(f"--shapes: {part!r} needs sequence length >= 8 and batch >= 1")
        shapes.append((seq, bs))
    return shapes


def _tiny_setup():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    stream = np.random.default_rng(0).integers(0, 512, 40_000).astype(np.uint16)
    return model, stream, "tiny-llama (quick mode)"


def _time_generation(model, prompt, new_tokens: int, runtime) -> float:
    """Seconds per generated token (greedy, KV cache, exactly `new_tokens` tokens, after a warm-up)."""
    import torch

    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode(), runtime.autocast():
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **dict(kwargs, max_new_tokens=2,
                                                                                        min_new_tokens=2))
        t0 = time.perf_counter()
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)
        seconds = time.perf_counter() - t0
    assert out.shape[1] - prompt.shape[1] == new_tokens
    return seconds / new_tokens


def inference_speed(peft, stream: np.ndarray, runtime, *, quick: bool, log=print) -> dict:
    """Evaluation tokens/s (forward + loss, no gradients) and generation latency per token for
    the base, the adapter unmerged and the adapter merged into the weights."""
    import torch

    from lora_project.models.losses import token_nll
    from lora_project.models.scoring import decoder_and_head

    seq, rows = (64, 8) if quick else (256, 8)
    x = torch.from_numpy(stream[: seq * rows + 1].astype(np.int64))
    batch = x[:-1].view(rows, seq).to(runtime.device)
    targets = x[1:].view(rows, seq).to(runtime.device)
    decoder, head = decoder_and_head(peft)
    peft.eval()
    with torch.inference_mode(), runtime.autocast():
        token_nll(decoder(input_ids=batch[:1], use_cache=False).last_hidden_state, head, targets[:1])  # warm-up
        t0 = time.perf_counter()
        token_nll(decoder(input_ids=batch, use_cache=False).last_hidden_state, head, targets)
        eval_tps = batch.numel() / (time.perf_counter() - t0)
    prompt = batch[:1, :16]
    new_tokens = 8 if quick else 32
    with peft.disable_adapter():
        base_s = _time_generation(peft, prompt, new_tokens, runtime)
    unmerged_s = _time_generation(peft, prompt, new_tokens, runtime)
    peft.merge_adapter()
    try:
        merged_s = _time_generation(peft, prompt, new_tokens, runtime)
    finally:
        peft.unmerge_adapter()
    log(f"  evaluation {eval_tps:.0f} tokens/s; generation {1000 * base_s:.1f} ms/token (base), "
        f"{1000 * unmerged_s:.1f} (adapter unmerged), {1000 * merged_s:.1f} (merged)")
    return {"eval_tokens_per_second": eval_tps, "eval_shape": [seq, rows], "generation_new_tokens": new_tokens,
            "generation_ms_per_token": {"base": 1000 * base_s, "adapter_unmerged": 1000 * unmerged_s,
                                        "adapter_merged": 1000 * merged_s}}


_LOAD_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from lora_project.models.base_model import load_model, load_tokenizer, resolve_model
ref = resolve_model(sys.argv[1], sys.argv[2] or None)
load_tokenizer(ref); load_model(ref)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def load_times(cfg, *, quick: bool, log=print) -> dict:
    """Model-load time in fresh processes: cold (empty model cache: the embedded GGUF is
    converted) and cached. Quick mode times only the cached load of the configured model."""
    import os
    import subprocess
    import sys
    import tempfile

    def child(env_cache: str | None) -> dict:
        env = dict(os.environ)
        if env_cache:
            env["LORA_PROJECT_CACHE"] = env_cache
        proc = subprocess.run([sys.executable, "-c", _LOAD_CHILD, cfg.model.source, cfg.model.revision or ""],
                              capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode != 0:
            raise UserError(f"model-load benchmark failed: {proc.stderr.strip().splitlines()[-1][:300]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    if quick:
        cached = child(None)
        log(f"  model load (cached, fresh process): {cached['seconds']:.1f} s")
        return {"cold_seconds": None, "cached_seconds": cached["seconds"]}
    with tempfile.TemporaryDirectory(prefix="lora-cache-") as tmp:
        cold = child(tmp)
        cached = child(tmp)
    log(f"  model load in a fresh process: cold {cold['seconds']:.1f} s (model cache empty), "
        f"cached {cached['seconds']:.1f} s")
    return {"cold_seconds": cold["seconds"], "cached_seconds": cached["seconds"]}


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
    ref = result.get("reference_comparison")
    if ref:
        metrics.update(speedup_vs_reference=ref["speedup"], memory_ratio_vs_reference=ref["memory_ratio"])
    tracker.log_metrics(metrics, step=0)
    for f in files:
        if f and Path(f).is_file():
            tracker.log_artifact(Path(f))
    tracker.end("FINISHED")
    return run_id


def run_benchmark(paths: ProjectPaths, cfg, *, quick: bool = False, shapes=((64, 16), (128, 8)),
                  steps: int = 4, log=print) -> dict:
    """Matmul peak and training throughput of our trainer per shape; `quick` uses a tiny model."""
    from lora_project.models.lora_model import wrap_with_lora
    from lora_project.training.trainer import BlockLoader, LoraTrainer
    from lora_project.utils.device import peak_rss_mb, resolve_runtime

    t = cfg.training
    runtime = resolve_runtime(t.device, t.precision, t.threads)
    log(f"matmul peak on {runtime.threads} threads ...")
    peaks = {d: matmul_gflops(d, min_seconds=0.2 if quick else 1.0) for d in ("fp32", "bf16")}
    if quick:
        model, stream, model_name = _tiny_setup()
    else:
        from lora_project.data.dataset_loader import load_streams, prepare_dataset
        from lora_project.models.base_model import load_base

        base = load_base(cfg, runtime)
        prepared = prepare_dataset(paths, "toddler_data")
        stream = load_streams(paths, prepared, base.tokenizer, base.tokenizer_fingerprint).train
        model, model_name = base.model, base.ref.name
    n_params = sum(p.numel() for p in model.parameters())
    peft = wrap_with_lora(model, cfg.lora, t.seed)
    rows = []
    for seq, bs in shapes:
        tcfg = dataclasses.replace(t, seq_len=seq, batch_size=bs, grad_accum=1, max_steps=steps,
                                   warmup_steps=0, log_interval=max(1, steps))
        trainer = LoraTrainer(peft, tcfg, BlockLoader(stream, seq, bs, t.seed), runtime, [])
        trainer.micro_step(*trainer.loader.next_batch())  # warm-up, not timed
        trainer.optimizer.zero_grad(set_to_none=True)
        fit = trainer.fit()
        flops_per_token = 4 * n_params
        achieved = fit.tokens_per_second * flops_per_token / 1e9
        peak = peaks["bf16" if runtime.precision == "bf16" else "fp32"]
        rows.append({"seq_len": seq, "batch_size": bs, "steps": steps, "tokens_per_second": fit.tokens_per_second,
                     "achieved_gflops": achieved, "fraction_of_peak": achieved / peak,
                     "peak_rss_mb_so_far": peak_rss_mb()})
        log(f"  {seq}x{bs}: {fit.tokens_per_second:.0f} tokens/s ({100 * achieved / peak:.0f}% of "
            f"{runtime.precision} matmul peak)")
    inference = inference_speed(peft, stream, runtime, quick=quick, log=log)
    loading = load_times(cfg, quick=quick, log=log)
    return {"created": datetime.now(timezone.utc).isoformat(), "mode": "quick" if quick else "full",
            "model": model_name, "parameters": n_params, "inference": inference, "model_load": loading,
            "machine": {"processor": platform.processor() or platform.machine(), "threads": runtime.threads,
                        "device": runtime.device},
            "precision": runtime.precision, "matmul_gflops": peaks,
            "lora": {"r": cfg.lora.r, "target_modules": cfg.lora.target_modules}, "training": rows}


def write_report(paths: ProjectPaths, result: dict) -> tuple:
    """Save a benchmark result as outputs/metrics/benchmark_<time>.{json,md} (+ heatmap PNG)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    base = paths.metrics_dir / f"benchmark_{stamp}"
    lines = [f"# Benchmark {result['created']} ({result['mode']} mode)", "",
             f"Model: {result['model']} ({result['parameters'] / 1e6:.1f} M parameters), "
             f"{result['machine']['device']}, {result['machine']['threads']} threads, {result['precision']}.", "",
             f"Matmul peak: fp32 {result['matmul_gflops']['fp32']:.1f} GFLOP/s, "
             f"bf16 {result['matmul_gflops']['bf16']:.1f} GFLOP/s.", "",
             "| seq x batch | tokens/s | GFLOP/s | fraction of peak | peak RSS (MiB) |", "|---|---|---|---|---|"]
    for r in result["training"]:
        lines.append(f"| {r['seq_len']} x {r['batch_size']} | {r['tokens_per_second']:.0f} | "
                     f"{r['achieved_gflops']:.1f} | {100 * r['fraction_of_peak']:.0f}% | "
                     f"{r['peak_rss_mb_so_far']:.0f} |")
    inf, load = result.get("inference"), result.get("model_load")
    if inf:
        g = inf["generation_ms_per_token"]
        lines += ["", "| inference | value |", "|---|---|",
                  f"| evaluation (forward + loss, {inf['eval_shape'][1]} x {inf['eval_shape'][0]} tokens) | "
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
        lines += ["", f"## Cross-evaluation: perplexity (bits per byte) on the {matrix['split']} splits", "",
                  matrix_markdown(matrix), "", f"Heatmap: {heat.name}"]
    ref = result.get("reference_comparison")
    if ref:
        lines += ["", f"## Ours vs plain PEFT + transformers Trainer ({ref['steps']} steps of "
                      f"{ref['batch_size']} x {ref['seq_len']} tokens, same model and data)", "",
                  "| | tokens/s | peak RSS (MiB) | eval loss after the same tokens |", "|---|---|---|---|",
                  f"| reference | {ref['reference']['tokens_per_second']:.0f} | {ref['reference']['peak_rss_mb']:.0f} | "
                  f"{ref['reference']['eval_loss']:.4f} |",
                  f"| ours | {ref['ours']['tokens_per_second']:.0f} | {ref['ours']['peak_rss_mb']:.0f} | "
                  f"{ref['ours']['eval_loss']:.4f} |",
                  "", f"Speed-up {ref['speedup']:.2f}x; memory ratio {ref['memory_ratio']:.2f}."]
    if result.get("blimp"):
        lines += blimp_markdown(result["blimp"])
    atomic_write_json(base.with_suffix(".json"), result)
    atomic_write_text(base.with_suffix(".md"), "\n".join(lines) + "\n")
    return base.with_suffix(".json"), base.with_suffix(".md")



def benchmark_report(paths: ProjectPaths, cfg, *, quick: bool = False, shapes=((64, 16), (128, 8)), steps: int = 4,
                     matrix: bool = False, reference: bool = False, reference_steps: int = 6, mlflow: bool = True,
                     blimp: Path | None = None, blimp_pairs: int = 5, log=print) -> dict:
    """`lora-project benchmark`: `run_benchmark`, optionally the cross matrix and the reference comparison,
    the report files, and an MLflow run (when `mlflow` and the config's tracking allow); returns the result."""
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if reference and reference_steps < 2:
        raise UserError("--reference-steps must be at least 2 (the first step is not timed)")
    if blimp is not None and (blimp_pairs < 1 or not Path(blimp).is_dir()):
        raise UserError(f"--blimp needs a folder of .jsonl pairs and --blimp-pairs >= 1 ({blimp})")
    result = run_benchmark(paths, cfg, quick=quick, shapes=shapes, steps=steps, log=log)
    if matrix:
        log("cross-evaluation matrix ...")
        result["matrix"] = cross_matrix(paths, cfg, log=log)
    if reference:
        result["reference_comparison"] = compare_with_reference(paths, cfg, steps=reference_steps, log=log)
    if blimp is not None:
        log(f"minimal-pair scoring speed on {blimp} ...")
        result["blimp"] = blimp_speed(cfg, Path(blimp), per_paradigm=blimp_pairs, log=log)
    json_path, md_path = write_report(paths, result)
    result["report"] = {"json": str(json_path), "markdown": str(md_path)}
    if cfg.tracking.mlflow and mlflow:
        heat = (result.get("matrix") or {}).get("heatmap")
        result["mlflow_run_id"] = log_to_mlflow(paths, cfg, result, [json_path, md_path, heat])
    return result

# --------------------------------------------------------------------------- ours vs reference
# Each side runs in its own spawned process so that peak memory (ru_maxrss) is its own.


def _child_setup(job: dict):
    import os
    import sys

    # Library chatter (Trainer prints its metrics) must not reach the parent's --json stdout.
    sys.stdout.flush()
    os.dup2(2, 1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lora_project.utils.logging_utils import quiet_libraries

    quiet_libraries()
    import torch

    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    return tok, model


def _child_eval(model, tok, job: dict) -> float:
    from lora_project.models.scoring import score_documents
    from lora_project.utils.device import resolve_runtime

    s = score_documents(model, tok, job["val_docs"], "\n", resolve_runtime("cpu", "fp32", job["threads"]),
                        max_length=256, stride=192)
    return s.nll_sum / s.tokens


def _child_ours(job: dict, queue) -> None:
    import dataclasses

    from lora_project.config import LoraSection, TrainingSection
    from lora_project.models.lora_model import wrap_with_lora
    from lora_project.training.trainer import BlockLoader, LoraTrainer
    from lora_project.utils.device import peak_rss_mb, resolve_runtime

    tok, model = _child_setup(job)
    model.requires_grad_(False)
    peft = wrap_with_lora(model, LoraSection(**job["lora"]), job["seed"])
    stream = np.load(job["stream"], mmap_mode="r", allow_pickle=False)
    cfg = dataclasses.replace(TrainingSection(), seq_len=job["seq_len"], batch_size=job["batch_size"],
                              max_steps=job["steps"], warmup_steps=0, lr=job["lr"], schedule="constant",
                              max_grad_norm=0.0, log_interval=job["steps"], precision=job["precision"])
    trainer = LoraTrainer(peft, cfg, BlockLoader(stream, job["seq_len"], job["batch_size"], job["seed"]),
                          resolve_runtime("cpu", job["precision"], job["threads"]), [])
    fit = trainer.fit()
    queue.put({"tokens_per_second": fit.tokens_per_second, "peak_rss_mb": peak_rss_mb(),
               "eval_loss": _child_eval(peft, tok, job), "tokens": fit.tokens_seen})


def _child_reference(job: dict, queue) -> None:
    """Plain PEFT + transformers Trainer with its defaults (fp32, full-logits loss, AdamW)."""
    import tempfile
    import time as _time

    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from lora_project.data.tokenizer_utils import block
    from lora_project.utils.device import peak_rss_mb

    tok, model = _child_setup(job)
    lora = job["lora"]
    peft = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora["r"], lora_alpha=lora["alpha"],
                                            lora_dropout=lora["dropout"], target_modules=lora["target_modules"]))
    stream = np.load(job["stream"], mmap_mode="r", allow_pickle=False)
    order = np.random.default_rng(job["seed"]).permutation(max(1, (len(stream) - 1) // job["seq_len"]))
    examples = [{"input_ids": block(stream, int(i), job["seq_len"])[:-1].astype(np.int64).tolist()}
                for i in order[: job["steps"] * job["batch_size"]]]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = _time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(_time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=job["batch_size"],
                                 max_steps=job["steps"], learning_rate=job["lr"], lr_scheduler_type="constant",
                                 max_grad_norm=0.0, use_cpu=True, report_to=[], save_strategy="no",
                                 logging_strategy="no", seed=job["seed"], dataloader_num_workers=0,
                                 disable_tqdm=True)
        Trainer(model=peft, args=args, train_dataset=examples,
                data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=[Timer()]).train()
    timed = times[1:] or times  # the first step includes start-up work
    tokens_per_step = job["batch_size"] * job["seq_len"]
    peft.eval()
    with torch.no_grad():
        loss = _child_eval(peft, tok, job)
    queue.put({"tokens_per_second": tokens_per_step * len(timed) / sum(timed), "peak_rss_mb": peak_rss_mb(),
               "eval_loss": loss, "tokens": tokens_per_step * len(times)})


def _spawn(target, job: dict) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(job, queue))
    proc.start()
    try:
        result = queue.get(timeout=3600)
    finally:
        proc.join(timeout=60)
    return result


def compare_with_reference(paths: ProjectPaths, cfg, *, seq_len: int = 256, batch_size: int = 8, steps: int = 6,
                           log=print) -> dict:
    """Our trainer vs plain PEFT + transformers Trainer: same model, data, batch, sequence length, steps."""
    import tempfile

    from lora_project.data.dataset_loader import load_streams, prepare_dataset
    from lora_project.models.base_model import load_base
    from lora_project.models.scoring import limit_documents
    from lora_project.utils.device import resolve_runtime

    t = cfg.training
    runtime = resolve_runtime(t.device, t.precision, t.threads)
    base = load_base(cfg, runtime)
    streams = load_streams(paths, prepare_dataset(paths, "toddler_data"), base.tokenizer, base.tokenizer_fingerprint)
    with tempfile.TemporaryDirectory() as tmp:
        stream_file = Path(tmp) / "train.npy"
        np.save(stream_file, np.asarray(streams.train), allow_pickle=False)
        job = {"model_dir": str(base.ref.directory), "stream": str(stream_file), "seq_len": seq_len,
               "batch_size": batch_size, "steps": steps, "seed": t.seed, "lr": t.lr, "threads": runtime.threads,
               "precision": runtime.precision, "val_docs": limit_documents(base.tokenizer, streams.validation_docs, 1500),
               "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": 0.0,
                        "target_modules": list(cfg.lora.target_modules)}}
        del base
        log(f"reference: plain PEFT + transformers Trainer, {steps} steps of {batch_size} x {seq_len} ...")
        ref = _spawn(_child_reference, job)
        log(f"  {ref['tokens_per_second']:.0f} tokens/s, peak {ref['peak_rss_mb']:.0f} MiB")
        log(f"ours: {steps} steps of {batch_size} x {seq_len} ({runtime.precision}) ...")
        ours = _spawn(_child_ours, job)
        log(f"  {ours['tokens_per_second']:.0f} tokens/s, peak {ours['peak_rss_mb']:.0f} MiB")
    return {"seq_len": seq_len, "batch_size": batch_size, "steps": steps, "ours": ours, "reference": ref,
            "speedup": ours["tokens_per_second"] / ref["tokens_per_second"],
            "memory_ratio": ours["peak_rss_mb"] / ref["peak_rss_mb"],
            "eval_loss_difference": ours["eval_loss"] - ref["eval_loss"]}


# --------------------------------------------------------------------------- cross-evaluation matrix


def cross_matrix(paths: ProjectPaths, cfg, *, max_tokens: int = 2000, split: str = "test", log=print) -> dict:
    """Perplexity and bits/byte of the base and every sound adapter on every prepared dataset's split.

    The base is loaded once; adapters trained on another base are left out (and said so).
    """
    import json as _json

    from lora_project.data.preprocessor import read_split
    from lora_project.models.adapter import list_adapters, read_metadata
    from lora_project.models.base_model import load_base
    from lora_project.models.lora_model import each_model
    from lora_project.models.scoring import limit_documents, score_documents

    datasets = sorted(p.name for p in paths.processed_dir.glob("*") if (p / "stats.json").is_file()) \
        if paths.processed_dir.is_dir() else []
    if not datasets:
        raise UserError("no prepared datasets; run: lora-project prepare --all")
    base = load_base(cfg)
    rows = list_adapters(paths.adapters_dir) if paths.adapters_dir.is_dir() else []
    adapters, skipped = [], []
    for r in rows:
        fp = read_metadata(Path(r["path"])).base_fingerprint if r["status"] == "ok" else None
        if r["status"] == "ok" and fp in (None, base.ref.fingerprint):
            adapters.append(Path(r["path"]))
        else:
            skipped.append(f"{r['name']} ({r['reason'] or 'another base model'})")
    if skipped:
        log(f"left out: {', '.join(skipped)}")
    texts = {}
    for d in datasets:
        docs = read_split(paths.processed(d), split)
        if docs:
            sep = _json.loads((paths.processed(d) / "stats.json").read_text()).get("separator", "\n")
            texts[d] = (limit_documents(base.tokenizer, docs, max_tokens), sep)
    cells: dict[str, dict[str, dict]] = {}

    def score_all(name, model):
        cells[name] = {}
        for d, (docs, sep) in texts.items():
            s = score_documents(model, base.tokenizer, docs, sep, base.runtime, max_length=256, stride=192)
            cells[name][d] = {"perplexity": s.perplexity, "bits_per_byte": s.bits_per_byte, "tokens": s.tokens}
        log(f"  {name}: " + ", ".join(f"{d} {c['perplexity']:.2f}" for d, c in cells[name].items()))

    for label, model in each_model(base, adapters):
        score_all(label, model)
    return {"split": split, "max_tokens": max_tokens, "datasets": list(texts), "models": list(cells), "cells": cells}


def matrix_figure(matrix: dict):
    """Heatmap of bits per byte (models x datasets), perplexity written in each cell."""
    import matplotlib.pyplot as plt

    models, datasets = matrix["models"], matrix["datasets"]
    grid = np.array([[matrix["cells"][m][d]["bits_per_byte"] for d in datasets] for m in models])
    fig, ax = plt.subplots(figsize=(2.5 + 1.6 * len(datasets), 1.5 + 0.5 * len(models)))
    im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(datasets)), datasets, rotation=20)
    ax.set_yticks(range(len(models)), models)
    for i in range(len(models)):
        for j in range(len(datasets)):
            ax.text(j, i, f"{matrix['cells'][models[i]][datasets[j]]['perplexity']:.1f}", ha="center", va="center",
                    color="white", fontsize=8)
    ax.set_title(f"bits per byte on each {matrix['split']} split (numbers: perplexity)")
    fig.colorbar(im, ax=ax, label="bits per byte")
    fig.tight_layout()
    return fig


def plot_matrix(matrix: dict, out: Path) -> Path:
    """Save the cross-evaluation heatmap as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = matrix_figure(matrix)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def matrix_markdown(matrix: dict) -> str:
    """The cross-evaluation matrix as a markdown table (perplexity and bits per byte)."""
    head = "| model | " + " | ".join(matrix["datasets"]) + " |"
    lines = [head, "|" + "---|" * (len(matrix["datasets"]) + 1)]
    for m in matrix["models"]:
        lines.append(f"| {m} | " + " | ".join(f"{matrix['cells'][m][d]['perplexity']:.2f} "
                                              f"({matrix['cells'][m][d]['bits_per_byte']:.3f} b/B)"
                                              for d in matrix["datasets"]) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- BLiMP scoring speed


def blimp_speed(cfg, pairs_dir: Path, *, per_paradigm: int = 5, rounds: int = 2, log=print) -> dict:
    """Minimal-pair pairs/s per first-pass path on a seeded sample of every paradigm, against the plain
    per-sentence fp32 scorer of before, interleaved in one process (ratios survive a shared machine),
    with the projected time for the whole folder (full BLiMP: 67,000 pairs)."""
    import statistics

    from lora_project.evaluation.minimal_pairs import (
        MARGINS,
        load_pairs,
        prefix_sharing,
        sample_pairs,
        score_pairs,
        sentence_logprobs,
        tokenize_pairs,
    )
    from lora_project.models.base_model import load_base
    from lora_project.utils.device import cpu_class, resolve_runtime

    t = cfg.training
    runtime = resolve_runtime(t.device, "fp32", t.threads)
    cpu = cpu_class()
    everything = load_pairs(Path(pairs_dir), warn=log)
    pairs = sample_pairs(everything, per_paradigm, t.seed)
    base = load_base(cfg, runtime)
    tokens = tokenize_pairs(base.tokenizer, pairs)
    native_bf16 = cpu["native_bf16"] if runtime.device == "cpu" else True
    paths = {"plain fp32 (before)": None, "shared prefix, fp32": "fp32"}
    if native_bf16:
        paths["shared prefix, bf16 first pass + fp32 re-check"] = "bf16"
    rescored: dict[str, int] = {}

    def run(path):
        if path is None:
            sentence_logprobs(base.model, base.tokenizer, [p.good for p in pairs], runtime)
            sentence_logprobs(base.model, base.tokenizer, [p.bad for p in pairs], runtime)
            return
        rescored[path] = score_pairs(base.model, base.tokenizer, pairs, runtime, path, tokens=tokens).rescored

    for path in paths.values():  # warm-up (allocator, kernels) of every path, not timed
        if path is None:
            sentence_logprobs(base.model, base.tokenizer, [p.good for p in pairs[:8]], runtime)
        else:
            score_pairs(base.model, base.tokenizer, pairs[:8], runtime, path)
    speeds: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(rounds):
        for label, path in paths.items():
            t0 = time.perf_counter()
            run(path)
            speeds[label].append(len(pairs) / (time.perf_counter() - t0))
            log(f"  round {r + 1}: {label}: {speeds[label][-1]:.1f} pairs/s")
    rows = []
    for label, path in paths.items():
        ratios = [s / p for s, p in zip(speeds[label], speeds["plain fp32 (before)"])]
        pps = statistics.median(speeds[label])
        rows.append({"path": label, "first_pass": path or "fp32", "pairs_per_second": pps,
                     "speedup_vs_plain": statistics.median(ratios),
                     "rescored_fraction": rescored.get(path, 0) / len(pairs) if path else 0.0,
                     "margin_nats": list(MARGINS[path or "fp32"]),
                     "projected_full_minutes": len(everything) / pps / 60})
    skipped = [] if native_bf16 else ["bf16 first pass: this CPU has no native bf16 (bf16 matmuls emulated, "
                                      "about 100x slower than fp32), so fp32 is its fast path"]
    for s in skipped:
        log(f"  skipped: {s}")
    return {"cpu": cpu, "threads": runtime.threads, "device": runtime.device, "pairs_dir": str(pairs_dir),
            "sample_pairs": len(pairs), "per_paradigm": per_paradigm, "full_pairs": len(everything),
            "rounds": rounds, "paths": rows, "skipped": skipped, **prefix_sharing(tokens)}


def blimp_markdown(b: dict) -> list[str]:
    """The BLiMP speed section of the benchmark report."""
    cpu = b["cpu"]
    lines = ["", f"## Minimal pairs (BLiMP) speed: {b['sample_pairs']} pairs ({b['per_paradigm']} per paradigm), "
                 f"{b['rounds']} interleaved rounds", "",
             f"CPU: {cpu['model']} ({cpu['isa']}, native bf16: {'yes' if cpu['native_bf16'] else 'no'}), "
             f"{b['threads']} threads, {b['device']}. Shared prefix: {100 * b['shared_prefix_fraction']:.1f}% of "
             f"the two sentences' tokens; forward tokens saved {100 * b['forward_tokens_saved']:.1f}%.", "",
             f"| path | pairs/s | vs plain fp32 | re-scored in fp32 | projected full ({b['full_pairs']:,} pairs) |",
             "|---|---|---|---|---|"]
    for r in b["paths"]:
        lines.append(f"| {r['path']} | {r['pairs_per_second']:.1f} | {r['speedup_vs_plain']:.2f}x | "
                     f"{100 * r['rescored_fraction']:.1f}% | {r['projected_full_minutes']:.1f} min |")
    lines += [f"- skipped: {s}" for s in b["skipped"]]
    return lines
