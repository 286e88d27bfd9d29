"""`benchmark`: this machine's matmul peak and our trainer's throughput and memory.

Full mode uses the configured base model (the embedded SmolLM2-135M by default) and the
toddler corpus; quick mode builds a tiny Llama in code and runs in seconds (used in CI).
Results go to ``outputs/metrics/benchmark_<timestamp>.{json,md}``.

Throughput is timed over optimizer steps after one warm-up micro-step; the fraction of
peak uses 4 x parameters FLOPs per token (forward 2x, input-gradient backward 2x).
"""

from __future__ import annotations

import dataclasses
import platform
import time
from datetime import datetime, timezone

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


def run_benchmark(paths: ProjectPaths, cfg, *, quick: bool = False, shapes=((64, 16), (128, 8)),
                  steps: int = 4, log=print) -> dict:
    from lora_project.models.lora_model import wrap_with_lora
    from lora_project.training.trainer import BlockLoader, LoraTrainer, peak_rss_mb
    from lora_project.utils.device import resolve_runtime

    t = cfg.training
    runtime = resolve_runtime(t.device, t.precision, t.threads)
    log(f"matmul peak on {runtime.threads} threads ...")
    peaks = {d: matmul_gflops(d, min_seconds=0.2 if quick else 1.0) for d in ("fp32", "bf16")}
    if quick:
        model, stream, model_name = _tiny_setup()
    else:
        from lora_project.data.dataset_loader import load_streams, prepare_dataset
        from lora_project.training.run import load_base

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
    return {"created": datetime.now(timezone.utc).isoformat(), "mode": "quick" if quick else "full",
            "model": model_name, "parameters": n_params,
            "machine": {"processor": platform.processor() or platform.machine(), "threads": runtime.threads,
                        "device": runtime.device},
            "precision": runtime.precision, "matmul_gflops": peaks,
            "lora": {"r": cfg.lora.r, "target_modules": cfg.lora.target_modules}, "training": rows}


def write_report(paths: ProjectPaths, result: dict) -> tuple:
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
    atomic_write_json(base.with_suffix(".json"), result)
    atomic_write_text(base.with_suffix(".md"), "\n".join(lines) + "\n")
    return base.with_suffix(".json"), base.with_suffix(".md")
