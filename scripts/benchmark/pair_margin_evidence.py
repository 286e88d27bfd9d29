"""Evidence for the bf16 first pass's re-check margin: score minimal pairs in bf16 and in fp32 and
report |difference(bf16) - difference(fp32)| per continuation length, against the margin.

    python scripts/benchmark/pair_margin_evidence.py PAIRS_DIR [--per-paradigm 40] [--adapter DIR ...]

Uses the project's config (base model, seed, threads) and the same scorer as `evaluate --pairs`
(shared prefix, the bf16 pass as autocast over bf16-cast weights). Prints a markdown table per
model (docs/research_notes.md keeps them) and the fraction of pairs the margin re-scores.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

BUCKETS = ((2, 6), (7, 10), (11, 14), (15, 20), (21, 35), (36, 10_000))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pairs_dir", type=Path)
    ap.add_argument("--per-paradigm", type=int, default=40)
    ap.add_argument("--adapter", action="append", default=[], type=Path)
    ap.add_argument("--save", type=Path, help="write the per-pair differences and lengths to this .npz")
    args = ap.parse_args()
    import numpy as np

    from lora_project.config import load_project_config
    from lora_project.evaluation.minimal_pairs import (
        MARGINS,
        load_pairs,
        pair_logprobs,
        sample_pairs,
    )
    from lora_project.evaluation.pair_tokens import tokenize_pairs
    from lora_project.models.base_model import load_base
    from lora_project.models.lora_model import each_model
    from lora_project.paths import ProjectPaths
    from lora_project.utils.device import cpu_class, resolve_runtime

    cfg = load_project_config(ProjectPaths.discover())
    t = cfg.training
    runtime = resolve_runtime(t.device, "fp32", t.threads, t.malloc_reuse)
    base = load_base(cfg, runtime)
    pairs = sample_pairs(load_pairs(args.pairs_dir), args.per_paradigm, t.seed)
    tokens = tokenize_pairs(base.tokenizer, pairs)
    n_cont = np.array([len(x.good) + len(x.bad) for x in tokens])
    constant, per_token = MARGINS["bf16"]
    margin = constant + per_token * n_cont
    cpu = cpu_class()
    print(f"CPU: {cpu['model']} ({cpu['isa']}, native bf16: {cpu['native_bf16']}), {runtime.threads} threads, "
          f"{platform.machine()}; {len(pairs)} pairs ({args.per_paradigm} per paradigm) from {args.pairs_dir}")
    for label, model in each_model(base, args.adapter):
        t0 = time.perf_counter()
        g16, b16 = pair_logprobs(model, tokens, runtime, "bf16")
        t1 = time.perf_counter()
        g32, b32 = pair_logprobs(model, tokens, runtime, "fp32")
        t2 = time.perf_counter()
        d16, d32 = g16 - b16, g32 - b32
        if args.save:
            np.savez(args.save.with_name(f"{args.save.stem}_{label}.npz"), d16=d16, d32=d32, n_cont=n_cont,
                     uid=np.array([p.uid for p in pairs]))
        err = np.abs(d16 - d32)
        flips = int(np.sum((d16 > 0) != (d32 > 0)))
        within = np.abs(d16) <= margin
        missed = int(np.sum(~within & ((d16 > 0) != (d32 > 0))))
        print(f"\n### {label}: bf16 pass {len(pairs) / (t1 - t0):.1f} pairs/s, fp32 pass {len(pairs) / (t2 - t1):.1f} "
              f"pairs/s; bf16 alone flips {flips} decisions; the margin re-scores {within.mean():.1%}; "
              f"flips outside the margin (would be wrong): {missed}\n")
        print("| continuation tokens | pairs | largest error (nats) | 99th percentile | largest error / margin |")
        print("|---|---|---|---|---|")
        for lo, hi in BUCKETS:
            sel = (n_cont >= lo) & (n_cont <= hi)
            if sel.any():
                print(f"| {lo}-{hi if hi < 10_000 else ''} | {int(sel.sum())} | {err[sel].max():.3f} | "
                      f"{np.percentile(err[sel], 99):.3f} | {(err[sel] / margin[sel]).max():.2f} |")
        print(f"| all | {len(pairs)} | {err.max():.3f} (median {np.median(err):.3f}) | {np.percentile(err, 99):.3f} | "
              f"**{(err / margin).max():.2f}** |")


if __name__ == "__main__":
    main()
