"""The references a user could pick instead, each trained in its own process on the same data."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from lora_project.errors import UserError
from lora_project.paths import ProjectPaths


def _child_setup(job: dict, dtype: str = "fp32"):
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
    # ours keeps the frozen base in bf16 on bf16 runs (as load_base does); the references load fp32
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"],
                                                 dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    return tok, model


# Our trainer's speed switches (training.*) that the benchmark passes to our side; the references
# run as a user would run them, without these.
LEVERS = ("malloc_reuse", "loss_chunk_tokens", "gradient_checkpointing", "lean_activations")


def _child_eval(model, tok, job: dict) -> float:
    from lora_project.models.scoring import score_documents
    from lora_project.utils.device import resolve_runtime

    # the references run with the C library's default; our side with its own switch
    runtime = resolve_runtime("cpu", "fp32", job["threads"], job.get("levers", {}).get("malloc_reuse", False))
    s = score_documents(model, tok, job["val_docs"], "\n", runtime,
                        max_length=256, stride=192)
    return s.nll_sum / s.tokens


def _child_ours(job: dict, queue) -> None:
    from lora_project.config import LoraSection, TrainingSection
    from lora_project.models.lora_model import wrap_with_lora
    from lora_project.training.trainer import BlockLoader, LoraTrainer
    from lora_project.utils.device import peak_rss_mb, resolve_runtime

    tok, model = _child_setup(job, job["precision"])
    model.requires_grad_(False)
    peft = wrap_with_lora(model, LoraSection(**job["lora"]), job["seed"])
    stream = np.load(job["stream"], mmap_mode="r", allow_pickle=False)
    cfg = dataclasses.replace(TrainingSection(), seq_len=job["seq_len"], batch_size=job["batch_size"],
                              max_steps=job["steps"], warmup_steps=0, lr=job["lr"], schedule="constant",
                              max_grad_norm=0.0, log_interval=job["steps"], precision=job["precision"],
                              **job["levers"])
    runtime = resolve_runtime("cpu", job["precision"], job["threads"], cfg.malloc_reuse)
    trainer = LoraTrainer(peft, cfg, BlockLoader(stream, job["seq_len"], job["batch_size"], job["seed"]), runtime, [])
    trainer.micro_step(*BlockLoader(stream, job["seq_len"], job["batch_size"], job["seed"]).next_batch())
    trainer.optimizer.zero_grad(set_to_none=True)  # a warm-up, untimed like the references' first step
    fit = trainer.fit()
    peak = peak_rss_mb()
    peft.float()  # evaluated in fp32 like the references, so the loss gap is the training's alone
    queue.put({"tokens_per_second": fit.tokens_per_second, "peak_rss_mb": peak,
               "eval_loss": _child_eval(peft, tok, job), "tokens": fit.tokens_seen})


#: The setups a user could pick instead of ours, by name: what each is, and its matmul precision.
REFERENCES = {
    "trainer_fp32": ("transformers Trainer, fp32 (its defaults)", "fp32"),
    "trainer_bf16": ("transformers Trainer, bf16=True (autocast, fp32 weights)", "bf16"),
    "peft_autocast_bf16": ("plain PEFT loop under torch.autocast(bfloat16), fp32 weights", "bf16"),
}


def pick_references(which: str, native_bf16: bool) -> list[str]:
    """'auto': Trainer fp32, plus the two bf16 references where the CPU (or GPU) has native bf16
    (elsewhere bf16 is emulated, ~100x slower, and nobody would pick it); 'all'; or a comma list."""
    if which == "auto":
        return ["trainer_fp32"] + (["trainer_bf16", "peft_autocast_bf16"] if native_bf16 else [])
    if which == "all":
        return list(REFERENCES)
    names = [n.strip() for n in which.split(",") if n.strip()]
    unknown = [n for n in names if n not in REFERENCES]
    if unknown or not names:
        raise UserError(f"--references: unknown {', '.join(unknown) or '(empty)'}; choose auto, all, or a comma "
                        f"list of {', '.join(REFERENCES)}")
    return list(dict.fromkeys(names))


def _child_examples(job: dict, stream) -> list[dict]:
    from lora_project.data.tokenizer_utils import block

    order = np.random.default_rng(job["seed"]).permutation(max(1, (len(stream) - 1) // job["seq_len"]))
    return [{"input_ids": block(stream, int(i), job["seq_len"])[:-1].astype(np.int64).tolist()}
            for i in order[: job["steps"] * job["batch_size"]]]


def _plain_peft(model, job: dict):
    from peft import LoraConfig, TaskType, get_peft_model

    lora = job["lora"]
    return get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora["r"], lora_alpha=lora["alpha"],
                                            lora_dropout=lora["dropout"], target_modules=lora["target_modules"]))


def _child_reference(job: dict, queue) -> None:
    """Plain PEFT + transformers Trainer with its defaults (full-logits loss, AdamW); bf16=True
    for the `trainer_bf16` reference."""
    import tempfile
    import time as _time

    import torch
    from transformers import (
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from lora_project.utils.device import peak_rss_mb

    tok, model = _child_setup(job)
    peft = _plain_peft(model, job)
    stream = np.load(job["stream"], mmap_mode="r", allow_pickle=False)
    examples = _child_examples(job, stream)
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
                                 disable_tqdm=True, bf16=job["variant"] == "trainer_bf16")
        Trainer(model=peft, args=args, train_dataset=examples,
                data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=[Timer()]).train()
    timed = times[1:] or times  # the first step includes start-up work
    tokens_per_step = job["batch_size"] * job["seq_len"]
    peak = peak_rss_mb()  # of training, before the evaluation
    peft.eval()
    with torch.no_grad():
        loss = _child_eval(peft, tok, job)
    queue.put({"tokens_per_second": tokens_per_step * len(timed) / sum(timed), "peak_rss_mb": peak,
               "eval_loss": loss, "tokens": tokens_per_step * len(times)})


def _child_peft_loop(job: dict, queue) -> None:
    """The loop a user writes from the PEFT quick-start on a bf16 CPU: fp32 weights, the forward
    under torch.autocast(bfloat16), full logits, cross-entropy in fp32, AdamW."""
    import time as _time

    import torch

    from lora_project.utils.device import peak_rss_mb

    tok, model = _child_setup(job)
    peft = _plain_peft(model, job)
    stream = np.load(job["stream"], mmap_mode="r", allow_pickle=False)
    examples = _child_examples(job, stream)
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=job["lr"])
    peft.train()
    times, bs = [], job["batch_size"]
    for step in range(job["steps"]):
        t0 = _time.perf_counter()
        ids = torch.tensor([e["input_ids"] for e in examples[step * bs:(step + 1) * bs]])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = peft(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(_time.perf_counter() - t0)
    timed = times[1:] or times
    tokens_per_step = bs * job["seq_len"]
    peak = peak_rss_mb()
    peft.eval()
    with torch.no_grad():
        loss = _child_eval(peft, tok, job)
    queue.put({"tokens_per_second": tokens_per_step * len(timed) / sum(timed), "peak_rss_mb": peak,
               "eval_loss": loss, "tokens": tokens_per_step * len(times)})


def _guarded(target, job: dict, queue) -> None:
    """A side's process: its result, or its error as one line, goes back through the queue."""
    try:
        target(job, queue)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which exits 2 with it
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def _spawn(target, job: dict, limit_s: float = 3600.0) -> dict:
    """Run one side in a fresh process; a side that dies (diverges, runs out of memory) ends the
    benchmark with its name and exit code instead of leaving the parent waiting."""
    import multiprocessing as mp
    import queue as queue_mod
    import time as _time

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_guarded, args=(target, job, queue))
    proc.start()
    deadline = _time.monotonic() + limit_s
    try:
        while True:
            try:
                result = queue.get(timeout=2.0)
                if "error" in result:
                    raise UserError(f"benchmark side {job.get('variant', 'ours')}: {result['error']}")
                return result
            except queue_mod.Empty:
                if not proc.is_alive():
                    raise UserError(f"benchmark side {job.get('variant', 'ours')} failed in its process (exit code "
                                    f"{proc.exitcode}); its error is printed above") from None
                if _time.monotonic() > deadline:
                    raise UserError(f"benchmark side {job.get('variant', 'ours')} took over {limit_s:.0f} s") from None
    finally:
        if proc.is_alive():
            proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()


def _median_run(target, job: dict, repeats: int) -> dict:
    """`repeats` fresh processes of one side; the median tokens/s and peak memory, every run kept."""
    runs = [_spawn(target, job) for _ in range(repeats)]
    return {"tokens_per_second": float(np.median([r["tokens_per_second"] for r in runs])),
            "peak_rss_mb": float(np.median([r["peak_rss_mb"] for r in runs])),
            "eval_loss": runs[0]["eval_loss"], "tokens": runs[0]["tokens"],
            "runs_tokens_per_second": [r["tokens_per_second"] for r in runs]}


def compare_with_reference(paths: ProjectPaths, cfg, *, seq_len: int = 256, batch_size: int = 8, steps: int = 6,
                           references: str = "auto", repeats: int = 1, peaks: dict | None = None,
                           log=print) -> dict:
    """Our trainer vs the references a user could pick instead (`pick_references`): same model, data,
    batch, sequence length and steps, each run in its own process (`repeats` times; medians).
    The speed-up and memory ratio are against the fastest reference."""
    import tempfile

    from lora_project.data.dataset_loader import load_streams, prepare_dataset
    from lora_project.models.base_model import load_base
    from lora_project.models.lora_model import check_targets
    from lora_project.models.scoring import limit_documents
    from lora_project.utils.device import cpu_has_native_bf16, resolve_runtime

    if repeats < 1:
        raise UserError(f"--reference-repeats must be at least 1, got {repeats}")
    t = cfg.training
    runtime = resolve_runtime(t.device, t.precision, t.threads, t.malloc_reuse)
    native = runtime.device == "cuda" or cpu_has_native_bf16()
    names = pick_references(references, native)
    base = load_base(cfg, runtime)
    n_params = sum(p.numel() for p in base.model.parameters())
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
        shape = f"{steps} steps of {batch_size} x {seq_len}" + (f", {repeats} runs each" if repeats > 1 else "")
        refs = {}
        for name in names:
            log(f"reference {name}: {REFERENCES[name][0]}, {shape} ...")
            target = _child_peft_loop if name == "peft_autocast_bf16" else _child_reference
            refs[name] = dict(_median_run(target, dict(job, variant=name), repeats), precision=REFERENCES[name][1],
                              label=REFERENCES[name][0])
            log(f"  {refs[name]['tokens_per_second']:.0f} tokens/s, peak {refs[name]['peak_rss_mb']:.0f} MiB")
        log(f"ours ({runtime.precision}), {shape} ...")
        levers = {k: getattr(t, k) for k in LEVERS}
        ours = dict(_median_run(_child_ours, dict(job, variant="ours", levers=levers),
                                repeats), precision=runtime.precision, label="lora-project", levers=levers)
        log(f"  {ours['tokens_per_second']:.0f} tokens/s, peak {ours['peak_rss_mb']:.0f} MiB")
    if peaks:  # achieved GFLOP/s (4 x parameters per token: forward + input-gradient backward) vs the side's peak
        for side in [ours, *refs.values()]:
            side["fraction_of_peak"] = side["tokens_per_second"] * 4 * n_params / 1e9 / peaks[side["precision"]]
    fastest = max(refs, key=lambda n: refs[n]["tokens_per_second"])
    return {"seq_len": seq_len, "batch_size": batch_size, "steps": steps, "repeats": repeats, "parameters": n_params,
            "ours": ours, "references": refs, "fastest_reference": fastest, "reference": refs[fastest],
            "speedup": ours["tokens_per_second"] / refs[fastest]["tokens_per_second"],
            "memory_ratio": ours["peak_rss_mb"] / refs[fastest]["peak_rss_mb"],
            "eval_loss_difference": ours["eval_loss"] - refs[fastest]["eval_loss"]}

