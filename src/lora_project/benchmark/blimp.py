"""Minimal-pair scoring speed per first-pass path, against the plain fp32 scorer, interleaved in one process."""

from __future__ import annotations

import time
from pathlib import Path

from lora_project.utils.device import cpu_label


def blimp_speed(cfg, pairs_dir: Path, *, per_paradigm: int = 5, rounds: int = 2, log=print) -> dict:
    """Minimal-pair pairs/s per first-pass path on a seeded sample of every paradigm, against the plain
    per-sentence fp32 scorer of before, interleaved in one process (ratios survive a shared machine),
    with the projected time for the whole folder (full BLiMP: 67,000 pairs). The before and the tree
    are timed on PyTorch's default fp32 matmul, and the tree again on oneDNN's where that is this
    process's fp32 kernel (models/kernels.py), so each gain shows on its own. The prefix tree shares
    more across pairs the more pairs it holds, so the projection scales the sample's time by the
    forward tokens of the whole folder against the sample's (plain: per-sentence tokens; the tree
    paths: the whole folder's tree), not by the pair count."""
    import statistics

    from lora_project.evaluation.minimal_pairs import (
        MARGINS,
        load_pairs,
        prefix_sharing,
        sample_pairs,
        score_pairs,
        sentence_logprobs,
    )
    from lora_project.evaluation.pair_tokens import tokenize_pairs
    from lora_project.models.base_model import load_base
    from lora_project.models.kernels import fp32_kernel, forced_kernel
    from lora_project.utils.device import cpu_class, resolve_runtime

    t = cfg.training
    runtime = resolve_runtime(t.device, "fp32", t.threads, t.malloc_reuse)
    cpu = cpu_class()
    everything = load_pairs(Path(pairs_dir), warn=log)
    pairs = sample_pairs(everything, per_paradigm, t.seed)
    base = load_base(cfg, runtime)
    tokens = tokenize_pairs(base.tokenizer, pairs)
    native_bf16 = cpu["native_bf16"] if runtime.device == "cpu" else True
    kernel = fp32_kernel() if runtime.device == "cpu" else "native"
    # label -> (first pass, fp32 kernel); None: the plain per-sentence scorer
    paths = {"plain fp32 (before)": (None, "native"), "prefix tree, fp32": ("fp32", "native")}
    if kernel == "onednn":
        paths["prefix tree, fp32, oneDNN kernel"] = ("fp32", "onednn")
    if native_bf16:
        paths["prefix tree, bf16 first pass + fp32 re-check"] = ("bf16", kernel)
    rescored: dict[str, int] = {}

    def run(label, few=False):
        path, chosen = paths[label]
        chunk = pairs[:8] if few else pairs
        with forced_kernel(chosen):
            if path is None:
                sentence_logprobs(base.model, base.tokenizer, [p.good for p in chunk], runtime)
                sentence_logprobs(base.model, base.tokenizer, [p.bad for p in chunk], runtime)
            else:
                scores = score_pairs(base.model, base.tokenizer, chunk, runtime, path,
                                     tokens=None if few else tokens)
                rescored[label] = scores.rescored

    for label in paths:  # warm-up (allocator, kernels) of every path, not timed
        run(label, few=True)
    speeds: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(rounds):
        for label in paths:
            t0 = time.perf_counter()
            run(label)
            speeds[label].append(len(pairs) / (time.perf_counter() - t0))
            log(f"  round {r + 1}: {label}: {speeds[label][-1]:.1f} pairs/s")
    sample_share = prefix_sharing(tokens)
    full_share = prefix_sharing(tokenize_pairs(base.tokenizer, everything))
    rows = []
    for label, (path, chosen) in paths.items():
        key = "forward_tokens_plain" if path is None else "forward_tokens_tree"
        scale = full_share[key] / sample_share[key]
        ratios = [s / p for s, p in zip(speeds[label], speeds["plain fp32 (before)"])]
        pps = statistics.median(speeds[label])
        rows.append({"path": label, "first_pass": path or "fp32", "fp32_kernel": chosen, "pairs_per_second": pps,
                     "speedup_vs_plain": statistics.median(ratios),
                     "rescored_fraction": rescored.get(label, 0) / len(pairs) if path else 0.0,
                     "margin_nats": list(MARGINS[path or "fp32"]),
                     "projected_full_minutes": len(pairs) / pps * scale / 60})
    skipped = [] if native_bf16 else ["bf16 first pass: this CPU has no native bf16 (bf16 matmuls emulated, "
                                      "about 100x slower than fp32), so fp32 is its fast path"]
    for s in skipped:
        log(f"  skipped: {s}")
    return {"cpu": cpu, "threads": runtime.threads, "device": runtime.device, "pairs_dir": str(pairs_dir),
            "sample_pairs": len(pairs), "per_paradigm": per_paradigm, "full_pairs": len(everything),
            "rounds": rounds, "paths": rows, "skipped": skipped, **sample_share,
            "full_forward_tokens_saved": full_share["forward_tokens_saved"],
            "full_shared_prefix_fraction": full_share["shared_prefix_fraction"]}


def blimp_markdown(b: dict) -> list[str]:
    """The BLiMP speed section of the benchmark report."""
    lines = ["", f"## Minimal pairs (BLiMP) speed: {b['sample_pairs']} pairs ({b['per_paradigm']} per paradigm), "
                 f"{b['rounds']} interleaved rounds", "",
             f"CPU: {cpu_label(b['cpu'])}, "
             f"{b['threads']} threads, {b['device']}. Shared prefix of each pair: {100 * b['shared_prefix_fraction']:.1f}% "
             f"of the two sentences' tokens; the prefix tree (shared across pairs too) saves "
             f"{100 * b['forward_tokens_saved']:.1f}% of the per-sentence forward tokens on this sample and "
             f"{100 * b['full_forward_tokens_saved']:.1f}% on the whole folder (the projection's basis).", "",
             f"| path | pairs/s | vs plain fp32 | re-scored in fp32 | projected full ({b['full_pairs']:,} pairs) |",
             "|---|---|---|---|---|"]
    for r in b["paths"]:
        lines.append(f"| {r['path']} | {r['pairs_per_second']:.1f} | {r['speedup_vs_plain']:.2f}x | "
                     f"{100 * r['rescored_fraction']:.1f}% | {r['projected_full_minutes']:.1f} min |")
    lines += [f"- skipped: {s}" for s in b["skipped"]]
    return lines
