"""Profile training steps with torch.profiler: ours (the LoraTrainer) and the plain PEFT loop under
torch.autocast(bfloat16), on the same model folder and random token batches.

    python scripts/benchmark/profile_training_step.py MODEL_DIR [--precision bf16] [--threads 2]
        [--seq-len 256] [--batch-size 8] [--steps 3] [--top 15] [--set training.FIELD=VALUE ...]

Prints, per side, tokens/s over the profiled steps and the top ops by self CPU time, as markdown
tables (docs/research_notes.md keeps them). `--set` changes our trainer's TrainingSection fields
(the levers: precision, loss_chunk_tokens, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import time


def _table(prof, top: int) -> str:
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1
    lines = ["| op | self CPU ms | share | calls |", "|---|---|---|---|"]
    for e in rows:
        lines.append(f"| `{e.key}` | {e.self_cpu_time_total / 1000:.0f} | {100 * e.self_cpu_time_total / total:.1f}% "
                     f"| {e.count} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--sides", default="ours,autocast")
    ap.add_argument("--base-dtype", default="auto", choices=["auto", "fp32"],
                    help="ours: 'auto' keeps the frozen base in bf16 on bf16 runs; 'fp32' keeps it fp32 (autocast only)")
    ap.add_argument("--set", action="append", default=[], metavar="training.FIELD=VALUE")
    args = ap.parse_args()
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    from lora_project.config import LoraSection, TrainingSection
    from lora_project.models.lora_model import wrap_with_lora
    from lora_project.training.trainer import BlockLoader, LoraTrainer
    from lora_project.utils.device import resolve_runtime

    torch.set_num_threads(args.threads)
    tokens = args.seq_len * args.batch_size
    stream = np.random.default_rng(0).integers(0, 49_000, tokens * (args.steps + 2) + 1).astype(np.int64)
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        field = key.removeprefix("training.")
        kind = type(getattr(TrainingSection(), field))
        overrides[field] = value if kind is str else (value.lower() == "true" if kind is bool else kind(value))
    for side in args.sides.split(","):
        torch.manual_seed(0)
        bf16_base = side == "ours" and args.precision == "bf16" and args.base_dtype == "auto"
        dtype = torch.bfloat16 if bf16_base else torch.float32
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).requires_grad_(False)
        peft = wrap_with_lora(model, LoraSection(dropout=0.0), 0)
        if side == "ours":
            cfg = dataclasses.replace(TrainingSection(), seq_len=args.seq_len, batch_size=args.batch_size,
                                      max_steps=args.steps, warmup_steps=0, schedule="constant", max_grad_norm=0.0,
                                      log_interval=args.steps, precision=args.precision, **overrides)
            trainer = LoraTrainer(peft, cfg, BlockLoader(stream, args.seq_len, args.batch_size, 0),
                                  resolve_runtime("cpu", args.precision, args.threads), [])
            trainer.micro_step(*trainer.loader.next_batch())
            trainer.optimizer.zero_grad(set_to_none=True)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                trainer.fit()
                seconds = time.perf_counter() - t0
        else:
            opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
            peft.train()
            loader = BlockLoader(stream, args.seq_len, args.batch_size, 0)

            def step():
                x, y = loader.next_batch()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = peft(input_ids=x).logits
                torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                seconds = time.perf_counter() - t0
        label = f"ours ({args.precision}, base {dtype}{', ' + ', '.join(args.set) if args.set else ''})" if side == "ours" \
            else "plain PEFT loop, autocast bf16"
        print(f"\n### {label}: {tokens * args.steps / seconds:.0f} tokens/s under the profiler, "
              f"{args.threads} threads, {args.batch_size} x {args.seq_len}\n")
        print(_table(prof, args.top))
        del model, peft


if __name__ == "__main__":
    main()
