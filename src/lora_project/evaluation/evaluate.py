"""`evaluate`: perplexity and bits per byte of the base and adapters, side by side.

The base model is loaded once; adapters are attached with PEFT's adapter switching and the
base is scored with adapters disabled, so N adapters cost one model load.
"""

from __future__ import annotations

import time
from pathlib import Path

from lora_project.errors import UserError
from lora_project.paths import ProjectPaths


def evaluate_perplexity(paths: ProjectPaths, cfg, *, text_file: Path | None = None,
                        dataset: str | None = None, split: str = "test", adapters: list[Path] = (),
                        max_length: int = 1024, stride: int | None = None, base=None) -> dict:
    from lora_project.data.preprocessor import read_split, read_text_file
    from lora_project.evaluation.perplexity import score_documents, score_text, windows
    from lora_project.models.lora_model import attach_adapters, check_adapter_dir
    from lora_project.training.run import load_base

    if (text_file is None) == (dataset is None):
        raise UserError("give exactly one of --text FILE or --dataset NAME")
    stride = max(1, max_length // 2) if stride is None else stride
    windows(2, max_length, stride)  # validates max_length/stride before any loading
    adapters = [check_adapter_dir(Path(a)) for a in adapters]
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise UserError("two adapters share a folder name; results are keyed by folder name")
    if text_file is not None:
        text = read_text_file(Path(text_file))
        if not text.strip():
            raise UserError(f"{text_file}: empty file, nothing to score")
        target = {"text": str(text_file)}
    else:
        from lora_project.data.catalog import get_entry, load_catalog

        get_entry(load_catalog(paths.catalog), dataset)
        folder = paths.processed(dataset)
        docs = read_split(folder, split)
        if not docs:
            raise UserError(f"dataset '{dataset}' has an empty {split} split")
        import json

        separator = json.loads((folder / "stats.json").read_text()).get("separator", "\n")
        target = {"dataset": dataset, "split": split}
    base = base or load_base(cfg)
    model, adapter_ids = attach_adapters(base.model, adapters, base.ref.fingerprint) if adapters \
        else (base.model, [])

    def score():
        if text_file is not None:
            return score_text(model, base.tokenizer, text, base.runtime, max_length, stride)
        return score_documents(model, base.tokenizer, docs, separator, base.runtime, max_length, stride)

    results: dict = {}
    t0 = time.perf_counter()
    if adapters:
        with model.disable_adapter():
            results["base"] = score().to_dict()
        for name, aid in zip(names, adapter_ids):
            model.set_adapter(aid)
            results[name] = score().to_dict()
    else:
        results["base"] = score().to_dict()
    elapsed = time.perf_counter() - t0
    if adapters:  # leave the shared base as we found it
        base.model = model.unload()
    return {**target, "max_length": max_length, "stride": stride, "precision": base.runtime.precision,
            "base_model": base.ref.name, "seconds": elapsed, "models": results}
