"""The main job (`make demo`): generate toddler speech, train an adapter, compare with the base.

Runs on a laptop CPU in a few minutes with the embedded SmolLM2-135M. The demo's own
adapter, ``adapters/toddler_data_demo_lora``, is replaced on every run (on purpose, and
said so); every run gets a new experiment folder.
"""

from __future__ import annotations

import time
from pathlib import Path

from lora_project.config import load_project_config
from lora_project.paths import ProjectPaths

DEMO_DATASET = "toddler_data"
DEMO_ADAPTER = "toddler_data_demo"
# Small, fast settings measured on a 2-core CPU; see docs/research_notes.md.
# About 20k training tokens (one pass over the toddler train split) at ~160 tokens/s in fp32.
DEMO_OVERRIDES = ["training.max_steps=20", "training.seq_len=64", "training.batch_size=16",
                  "training.warmup_steps=2", "training.lr=2e-3", "training.eval_max_tokens=0"]
# eval_max_tokens=0: the whole validation split (about 2,100 tokens), so results.json's validation
# numbers equal `evaluate --dataset toddler_data --split validation` (one scoring; exactly where
# training runs in fp32, within about 0.2% where it runs in bf16: evaluate is fp32 everywhere).


def run_demo(paths: ProjectPaths, overrides: list[str] = (), use_mlflow: bool = True, log=print) -> dict:
    """The main job: generate toddler data, train the demo adapter, compare base vs adapter on the test split."""
    from lora_project.data.dataset_loader import prepare_dataset
    from lora_project.evaluation.evaluate import evaluate_perplexity
    from lora_project.models.base_model import load_base
    from lora_project.training.options import RunOptions
    from lora_project.training.single import train_adapter

    t0 = time.perf_counter()
    cfg = load_project_config(paths, [*DEMO_OVERRIDES, *overrides])
    log("== 1/3 data: generating synthetic toddler speech and preparing splits")
    prepared = prepare_dataset(paths, DEMO_DATASET)
    split_counts = ", ".join(f"{k} {v['documents']}" for k, v in prepared.stats["splits"].items())
    log(f"   data/raw/{DEMO_DATASET}.txt -> {prepared.folder.relative_to(paths.root)}/ "
        f"({split_counts} documents)")
    adapter_dir = paths.adapter(DEMO_ADAPTER)
    if adapter_dir.exists():
        log(f"   note: replacing the demo's previous adapter {adapter_dir.relative_to(paths.root)} (on purpose)")
    log("== 2/3 training a LoRA adapter on the embedded SmolLM2-135M")
    base = load_base(cfg)
    options = RunOptions(adapter_name=DEMO_ADAPTER, overwrite=True, use_mlflow=use_mlflow,
                         log=lambda m: log("   " + m))
    results = train_adapter(paths, DEMO_DATASET, cfg, options, base=base)
    log("== 3/3 evaluating base vs adapter on the held-out test split")
    ev = evaluate_perplexity(paths, cfg, dataset=DEMO_DATASET, split="test", adapters=[adapter_dir], base=base)
    b, a = ev["models"]["base"], ev["models"][adapter_dir.name]
    total = time.perf_counter() - t0
    rows = [("model", "perplexity", "bits/byte", "tokens"),
            ("base (SmolLM2-135M)", f"{b['perplexity']:.2f}", f"{b['bits_per_byte']:.3f}", str(b["tokens"])),
            (f"+ {adapter_dir.name}", f"{a['perplexity']:.2f}", f"{a['bits_per_byte']:.3f}", str(a["tokens"]))]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    log("")
    for r in rows:
        log("   " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    log("")
    d = ev["difference"][adapter_dir.name]
    change = f", 95% CI {d['perplexity_ci'][0]:+.2f} to {d['perplexity_ci'][1]:+.2f}" if d["perplexity_ci"] else ""
    log(f"   test perplexity {b['perplexity']:.2f} -> {a['perplexity']:.2f} "
        f"({100 * (1 - a['perplexity'] / b['perplexity']):.0f}% lower{change}, paired bootstrap over documents); "
        f"training {results['tokens_seen']} tokens at {results['tokens_per_second']:.0f} tokens/s, "
        f"peak memory {results['peak_rss_mb']:.0f} MiB, demo wall time {total:.0f} s")
    log(f"   adapter:    {adapter_dir.relative_to(paths.root)}/")
    log(f"   experiment: {Path(results['experiment_dir']).relative_to(paths.root)}/ (config.yaml, results.json, logs/, loss_curve.png)")
    if results.get("mlflow_run_id"):
        log(f"   MLflow run: {results['mlflow_run_id']}  ->  .venv/bin/mlflow ui --backend-store-uri "
            f"sqlite:///mlruns/mlflow.db   (then open http://127.0.0.1:5000)")
    return {"train": results, "evaluation": ev, "wall_seconds": total}
