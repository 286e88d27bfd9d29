"""lm-evaluation-harness as a measured peer of our minimal-pair scorer (`benchmark --blimp`).

lm-eval (the optional extra `peers`) scores the same pairs with its `hf` model (fp32, batch 32) through
task YAMLs written at run time for the local files: one task per paradigm, as its own `blimp` group has,
a `multiple_choice` task with an empty context and the two sentences as choices. Two definitions:

- **lm-eval's BLiMP**: its default `target_delimiter`, one space, goes before each sentence;
- **BabyLM's**: no delimiter, so each sentence is scored after the BOS token (lm-eval's prefix token for an
  empty context: BOS, else EOS), which is our scorer's and the BabyLM pipeline's definition for a tokenizer
  with a BOS token.

lm-eval runs in a child process (`python -m lora_project.benchmark.lm_eval_peer SPEC.json`) with the hub
and datasets offline (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1: it reads the local model folder and the
JSON-lines files only) and the datasets cache inside the run's folder. The child times from just before
`simple_evaluate` (its model load included) to the decisions, and writes each pair's two log-likelihoods.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

PIN = "lm-eval==0.4.13"
DEFINITIONS = {"lm_eval": " ", "babylm": ""}  # definition -> target_delimiter
BATCH_SIZE = 32


def lm_eval_version() -> str | None:
    """The installed lm-eval version, or None when the extra is absent."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def _task_name(definition: str, uid: str) -> str:
    return f"lp_{definition}_" + re.sub(r"[^A-Za-z0-9_]", "_", uid)


def write_tasks(pairs, folder: Path) -> dict[str, dict[str, list[int]]]:
    """One JSON-lines file per paradigm (the pairs in order, each with its index) and one task YAML per
    paradigm and definition under `folder`; returns definition -> task name -> pair indices."""
    import yaml

    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    by_uid: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        by_uid.setdefault(p.uid, []).append(i)
    tasks: dict[str, dict[str, list[int]]] = {d: {} for d in DEFINITIONS}
    for n, (uid, idx) in enumerate(sorted(by_uid.items())):
        file = data / f"{n:03d}.jsonl"  # numbered: a UID never becomes a path
        file.write_text("".join(json.dumps({"sentence_good": pairs[i].good, "sentence_bad": pairs[i].bad,
                                            "pair": i}) + "\n" for i in idx), encoding="utf-8")
        for definition, delimiter in DEFINITIONS.items():
            name = _task_name(definition, uid) + f"_{n:03d}"
            spec = {"task": name, "dataset_path": "json",
                    "dataset_kwargs": {"data_files": {"train": str(file.resolve())}},
                    "test_split": "train", "output_type": "multiple_choice", "doc_to_text": "",
                    "doc_to_target": 0, "doc_to_choice": "{{[sentence_good, sentence_bad]}}",
                    "target_delimiter": delimiter, "num_fewshot": 0,
                    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
                    "metadata": {"version": 1.0}}
            (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
            tasks[definition][name] = idx
    return tasks


def run_lm_eval(model_dir: Path, folder: Path, definition: str, tasks: dict[str, list[int]], n_pairs: int,
                threads: int, device: str = "cpu", timeout: float | None = None) -> dict:
    """Run lm-eval on `tasks` (task name -> pair indices, one definition) in a child process; returns
    {"seconds", "loglikelihood_seconds", "good", "bad"} (log-likelihoods per pair index)."""
    spec = folder / f"spec_{definition}.json"
    out = folder / f"out_{definition}.json"
    spec.write_text(json.dumps({"model_dir": str(model_dir), "folder": str(folder), "tasks": sorted(tasks),
                                "threads": threads, "device": device, "batch_size": BATCH_SIZE, "out": str(out)}), encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(folder / "hf_datasets"), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-m", "lora_project.benchmark.lm_eval_peer", str(spec)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"lm-eval failed (exit {proc.returncode}): " + " | ".join(tail))
    raw = json.loads(out.read_text(encoding="utf-8"))
    good, bad = [float("nan")] * n_pairs, [float("nan")] * n_pairs
    for name, rows in raw["samples"].items():
        idx = tasks[name]
        for doc_id, lg, lb in rows:
            good[idx[doc_id]], bad[idx[doc_id]] = lg, lb
    return {"seconds": raw["seconds"], "cpu_seconds": raw["cpu_seconds"],
            "loglikelihood_seconds": raw["loglikelihood_seconds"], "good": good, "bad": bad}


def _child(spec_path: str) -> None:
    """The child process: lm-eval's `simple_evaluate` on the written tasks, timed, samples saved."""
    import time

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lm_eval.models.huggingface import HFLM

    torch.set_num_threads(spec["threads"])
    spent = [0.0]  # seconds inside HFLM.loglikelihood: the scoring, which grows with the pairs
    plain = HFLM.loglikelihood

    def timed(self, *args, **kwargs):
        s = time.perf_counter()
        try:
            return plain(self, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - s

    HFLM.loglikelihood = timed
    t0, c0 = time.perf_counter(), time.process_time()
    manager = TaskManager(include_path=spec["folder"], include_defaults=False)
    result = simple_evaluate(model="hf", model_args={"pretrained": spec["model_dir"], "dtype": "float32",
                                                     "device": spec["device"], "trust_remote_code": False},
                             tasks=spec["tasks"], batch_size=spec["batch_size"], task_manager=manager,
                             log_samples=True, bootstrap_iters=0, random_seed=0)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    samples = {}
    for name, rows in result["samples"].items():
        # resps: per choice [(loglikelihood, is_greedy)]; choices are [good, bad]
        samples[name] = [(r["doc_id"], float(r["resps"][0][0][0]), float(r["resps"][1][0][0])) for r in rows]
    Path(spec["out"]).write_text(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds,
                                             "loglikelihood_seconds": spent[0], "samples": samples}),
                                 encoding="utf-8")


if __name__ == "__main__":
    _child(sys.argv[1])
