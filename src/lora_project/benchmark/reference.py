"""The references a user could pick instead, each trained in its own process on the same data."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from lora_project.paths import ProjectPaths


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
    from lora_project.models.lora_model import check_targets
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
                        "target_modules": check_targets(base.model, cfg.lora)}}  # 'auto' resolved
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
