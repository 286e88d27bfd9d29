"""The board's actions that compute (prepare, generate, inspect, evaluate), over the CLI's library functions.

Gradio-free, like state.py. The base model is loaded lazily, the first time a tab needs it (the
first page never waits for a model), and kept for later requests; one model computation at a time.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

from lora_project.errors import UserError
from lora_project.paths import ProjectPaths
from lora_project.ui.state import adapter_folder, catalog_name, project_config


class BaseCache:
    """The configured base model, loaded on first use and reloaded only when the model config changes."""

    def __init__(self, paths: ProjectPaths):
        self.paths = paths
        self.lock = threading.Lock()  # each_model swaps adapters on the one loaded base: one user at a time
        self._key: str | None = None
        self._base = None

    def get(self, cfg):
        """The loaded base for `cfg` (call with self.lock held)."""
        from lora_project.models.base_model import load_base

        t = cfg.training
        key = json.dumps([cfg.model.source, cfg.model.revision, t.precision, t.device, t.threads])
        if self._base is None or key != self._key:
            self._base, self._key = None, None
            self._base, self._key = load_base(cfg), key
        return self._base

    @property
    def loaded(self) -> bool:
        return self._base is not None


def prepare(paths: ProjectPaths, name: str) -> str:
    """`lora-project prepare NAME` for one dataset; returns the line the CLI would print."""
    from lora_project.data.dataset_loader import prepare_datasets

    name = catalog_name(paths, name)
    lines: list[str] = []
    for n, prep, error in prepare_datasets(paths, [name], progress=False, log=lines.append):
        s = prep.stats["splits"]
        tokens = f", {s['train']['tokens']:,} train tokens" if "tokens" in s["train"] else ""
        lines.append(f"{n}: {'unchanged, skipped' if prep.skipped else 'prepared'} (train "
                     f"{s['train']['documents']}, validation {s['validation']['documents']}, test "
                     f"{s['test']['documents']} documents{tokens})")
    return "\n".join(lines)


def sound_adapters(paths: ProjectPaths) -> list[str]:
    """Folder names of the adapters that load (broken ones are listed with their reason in Inspect)."""
    from lora_project.models.lora_factors import list_adapters

    if not paths.adapters_dir.is_dir():
        return []
    return [r["name"] for r in list_adapters(paths.adapters_dir) if r["status"] == "ok"]


def generate(paths: ProjectPaths, cache: BaseCache, prompt: str, adapters: list[str], *, max_new_tokens: int,
             sampling: bool, temperature: float, seed: int) -> Iterator[dict[str, str | None]]:
    """Continuations of one prompt by the base and each chosen adapter, yielded as each model finishes:
    {label: text or None (not yet)}. Greedy, or seeded top-p sampling (the same text on every rerun)."""
    from lora_project.models.adapter import checked_adapters, unique_adapter_labels
    from lora_project.models.lora_model import each_model
    from lora_project.models.sampling import generate_texts

    prompt = (prompt or "").strip()
    if not prompt:
        raise UserError("type a prompt")
    if not 1 <= int(max_new_tokens) <= 512:
        raise UserError("max new tokens must be between 1 and 512")
    if sampling and not float(temperature) > 0:
        raise UserError("sampling needs a temperature > 0")
    dirs = checked_adapters([adapter_folder(paths, a) for a in adapters or []])
    labels = ["base", *unique_adapter_labels(dirs)]
    out: dict[str, str | None] = dict.fromkeys(labels)
    yield dict(out)
    args = dict(max_new_tokens=int(max_new_tokens), temperature=float(temperature) if sampling else 0.0,
                top_p=0.95, seed=int(seed))
    cfg = project_config(paths)
    with cache.lock:
        base = cache.get(cfg)
        for label, model in each_model(base, dirs):
            out[label] = generate_texts(model, base.tokenizer, [prompt], base.runtime, **args)[0]
            yield dict(out)


def inspect_rows(paths: ProjectPaths) -> list[dict]:
    """`lora-project inspect adapters`: every adapter folder, broken ones with the reason."""
    from lora_project.inspection.report import adapter_rows

    return adapter_rows(paths.adapters_dir) if paths.adapters_dir.is_dir() else []


def weights(paths: ProjectPaths, folder: str) -> dict:
    """`lora-project inspect weights`: per-module report and its heatmap + spectra PNGs."""
    from lora_project.inspection.report import weights_report

    return weights_report(adapter_folder(paths, folder), paths.metrics_dir / "inspect", 8,
                          [paths.model_config, paths.training_config])


def compare(paths: ProjectPaths, a: str, b: str) -> dict:
    """`lora-project inspect compare A B`: subspace similarity and its heatmap PNG."""
    from lora_project.inspection.report import compare_report

    if a == b:
        raise UserError("pick two different adapters")
    return compare_report(adapter_folder(paths, a), adapter_folder(paths, b), paths.metrics_dir / "inspect", None,
                          [paths.model_config, paths.training_config])


def sampled_matrix(paths: ProjectPaths, cache: BaseCache, max_tokens: int, log=print) -> tuple[dict, Path]:
    """The adapters x datasets matrix on the first `max_tokens` tokens of each prepared test split
    (`benchmark --matrix`'s computation, smaller), saved under outputs/metrics/."""
    from lora_project.benchmark.matrix import cross_matrix
    from lora_project.ui.state import save_matrix

    if not 50 <= int(max_tokens) <= 100_000:
        raise UserError("tokens per dataset must be between 50 and 100000")
    with cache.lock:  # cross_matrix loads its own base; the lock keeps two heavy jobs from racing
        matrix = cross_matrix(paths, project_config(paths), max_tokens=int(max_tokens), log=log)
    return matrix, save_matrix(paths, matrix)
