"""Machine and training speed: matmul peaks, our trainer's throughput, generation latency, load times."""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from datetime import datetime, timezone

import numpy as np

from lora_project.errors import UserError
from lora_project.paths import ProjectPaths


def matmul_gflops(dtype_name: str, m: int = 2048, k: int = 576, n: int = 1536, min_seconds: float = 0.5,
                  kernel: str = "native") -> float:
    """Sustained GFLOP/s of an (m x k) @ (k x n) matmul in the given dtype on the CPU threads set; with
    kernel "onednn", fp32 through oneDNN's linear kernel (models/kernels.py) instead of PyTorch's default."""
    import torch

    from lora_project.models.kernels import forced_kernel, linear

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    with forced_kernel(kernel), torch.inference_mode():
        linear(a, w)  # warm-up
        calls, t0 = 0, time.perf_counter()
        while True:
            linear(a, w)
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
        if not (8 <= seq <= 131072 and 1 <= bs <= 4096):  # training.seq_len's and batch_size's ranges
            raise UserError(f"--shapes: {part[:40]!r} needs a sequence length from 8 to 131072 and a batch from 1 "
                            "to 4096")
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


def _time_generation(model, prompt, new_tokens: int, runtime, repeats: int = 3) -> list[float]:
    """Seconds per generated token (greedy, KV cache, exactly `new_tokens` tokens), one per timed
    run: each side is first warmed up with one whole untimed generation (first calls pay for
    allocation and kernel selection: on a loaded machine the untimed first call once read 30x)."""
    import torch

    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    mask = torch.ones_like(prompt)
    times = []
    with torch.inference_mode(), runtime.autocast():
        model.generate(input_ids=prompt, attention_mask=mask, **kwargs)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(input_ids=prompt, attention_mask=mask, **kwargs)
            times.append((time.perf_counter() - t0) / new_tokens)
    assert out.shape[1] - prompt.shape[1] == new_tokens
    return times


def inference_speed(peft, stream: np.ndarray, runtime, *, quick: bool, repeats: int = 3, log=print) -> dict:
    """Evaluation tokens/s (forward + loss, no gradients) and generation latency per token for
    the base, the adapter unmerged and the adapter merged into the weights (each warmed up, then
    the median of `repeats` timed runs)."""
    import torch

    from lora_project.models.kernels import fp32_linears
    from lora_project.models.losses import token_nll
    from lora_project.models.scoring import decoder_and_head

    seq, rows = (64, 8) if quick else (256, 8)
    x = torch.from_numpy(stream[: seq * rows + 1].astype(np.int64))
    batch = x[:-1].view(rows, seq).to(runtime.device)
    targets = x[1:].view(rows, seq).to(runtime.device)
    decoder, head = decoder_and_head(peft)
    peft.eval()
    with torch.inference_mode(), runtime.autocast(), fp32_linears(peft, runtime.device):
        # at the run's precision (`evaluate` itself always scores in fp32), fp32 on evaluate's kernel
        token_nll(decoder(input_ids=batch[:1], use_cache=False).last_hidden_state, head, targets[:1])  # warm-up
        t0 = time.perf_counter()
        token_nll(decoder(input_ids=batch, use_cache=False).last_hidden_state, head, targets)
        eval_tps = batch.numel() / (time.perf_counter() - t0)
    prompt = batch[:1, :16]
    new_tokens = 8 if quick else 32
    runs = {}
    with peft.disable_adapter():
        runs["base"] = _time_generation(peft, prompt, new_tokens, runtime, repeats)
    runs["adapter_unmerged"] = _time_generation(peft, prompt, new_tokens, runtime, repeats)
    peft.merge_adapter()
    try:
        runs["adapter_merged"] = _time_generation(peft, prompt, new_tokens, runtime, repeats)
    finally:
        peft.unmerge_adapter()
    ms = {k: 1000 * float(np.median(v)) for k, v in runs.items()}
    log(f"  evaluation {eval_tps:.0f} tokens/s; generation (median of {repeats} after a warm-up) "
        f"{ms['base']:.1f} ms/token (base), {ms['adapter_unmerged']:.1f} (adapter unmerged), "
        f"{ms['adapter_merged']:.1f} (merged)")
    return {"eval_tokens_per_second": eval_tps, "eval_shape": [seq, rows], "generation_new_tokens": new_tokens,
            "generation_repeats": repeats, "generation_ms_per_token": ms,
            "generation_runs_ms_per_token": {k: [1000 * x for x in v] for k, v in runs.items()}}


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


def run_benchmark(paths: ProjectPaths, cfg, *, quick: bool = False, shapes=((64, 16), (128, 8)),
                  steps: int = 4, speed: bool = True, log=print) -> dict:
    """Matmul peaks, and with `speed` the training throughput of our trainer per shape, inference
    speed and model-load times; `quick` uses a tiny model."""
    from lora_project.models.kernels import fp32_kernel, onednn_available
    from lora_project.models.lora_model import wrap_with_lora
    from lora_project.training.trainer import BlockLoader, LoraTrainer
    from lora_project.utils.device import cpu_class, peak_rss_mb, resolve_runtime

    t = cfg.training
    runtime = resolve_runtime(t.device, t.precision, t.threads, t.malloc_reuse)
    log(f"matmul peak on {runtime.threads} threads ...")
    peaks = {d: matmul_gflops(d, min_seconds=0.2 if quick else 1.0) for d in ("fp32", "bf16")}
    if onednn_available():  # the fp32 kernel the scoring passes take where it exists (models/kernels.py)
        peaks["fp32_onednn"] = matmul_gflops("fp32", min_seconds=0.2 if quick else 1.0, kernel="onednn")
    result = {"created": datetime.now(timezone.utc).isoformat(), "mode": "quick" if quick else "full",
              "model": cfg.model.source, "parameters": None, "inference": None, "model_load": None,
              "machine": {"processor": platform.processor() or platform.machine(), "cpu": cpu_class(),
                          "threads": runtime.threads, "device": runtime.device},
              "precision": runtime.precision, "matmul_gflops": peaks, "fp32_kernel": fp32_kernel(),
              "lora": {"r": cfg.lora.r, "target_modules": cfg.lora.target_modules}, "training": []}
    if not speed:
        return result
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
    result.update(model=model_name, parameters=n_params, training=rows,
                  inference=inference_speed(peft, stream, runtime, quick=quick, log=log),
                  model_load=load_times(cfg, quick=quick, log=log))
    return result
