"""Write a copy of a model folder with random weights: same architecture, tokenizer and size.

For speed and memory measurements on a machine the real weights cannot travel to (throughput
does not depend on the weights' values). The evaluation losses such a copy reports mean nothing
in absolute terms; comparisons between trainers on it still do (same start, same data).

    python scripts/benchmark/random_weights_copy.py SOURCE_DIR OUT_DIR [--seed 0]

SOURCE_DIR needs config.json and the tokenizer files, not the weights.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(args.seed)
    config = AutoConfig.from_pretrained(args.source)
    model = AutoModelForCausalLM.from_config(config)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    for f in args.source.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja",
                                                        "generation_config.json"):
            shutil.copy(f, args.out / f.name)
    print(f"{args.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, random weights")


if __name__ == "__main__":
    main()
