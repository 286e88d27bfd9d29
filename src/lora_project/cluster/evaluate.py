"""`evaluate --pairs PATH --cluster ADDRESS`: minimal pairs scored in shards, one Ray task per shard.

The driver does everything `evaluate --pairs` does (loading and sampling the pairs, the reports,
the paired changes, the files) with `evaluate_minimal_pairs` itself; only the scoring goes to the
cluster, through its `scorer` hook. The pairs are cut into as many contiguous shards as the cluster
runs tasks at once; each task loads the fp32 base once (threads = cluster.cpus_per_task, the
driver's fp32 kernel), attaches the adapters (shipped through the object store) and scores its
shard for the base and every adapter with the same scoring core (`score_pairs`). The shards'
sums, concatenated in order, give the same decisions as one process: a shard batches its rows
differently, so a pair's margin moves by fp32 rounding only.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from lora_project.paths import ProjectPaths

_BASES: dict[tuple, object] = {}


def task_config(spec: dict):
    """A scoring task's config: the driver's, with torch threads = the task's CPUs, on the CPU."""
    from lora_project.config import build_config

    cfg = build_config(spec["config"])
    return replace(cfg, training=replace(cfg.training, threads=spec["threads"], device="cpu"))


def worker_fp32_base(cfg, threads: int):
    """The fp32 base of this worker process, loaded once for every scoring task it runs (call it inside
    the driver's forced fp32 kernel)."""
    from lora_project.models.base_model import load_fp32_base

    key = (cfg.model.source, cfg.model.revision, threads)
    if key not in _BASES:
        _BASES.clear()
        _BASES[key] = load_fp32_base(cfg)
    return _BASES[key]


def write_adapters(where: Path, adapter_files: dict[str, dict[str, bytes]]) -> list[Path]:
    """Shipped adapters written into scratch folder `where`, one folder per label; their paths."""
    dirs = []
    for name, files in adapter_files.items():
        for rel, data in files.items():
            if ".." in Path(rel).parts or Path(rel).is_absolute() or "/" in name or name in ("", ".", ".."):
                raise ValueError(f"refusing a shipped path outside the scratch folder: {name}/{rel}")
            (where / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (where / name / rel).write_bytes(data)
        dirs.append(where / name)
    return dirs


def score_shard(spec: dict, pairs: list, adapter_files: dict[str, dict[str, bytes]]) -> dict:
    """On a worker: {label: (good sums, bad sums, re-scored count)} of `pairs` for the base and each adapter."""
    from lora_project.cluster.address import scratch_root
    from lora_project.cluster.tasks import node_name
    from lora_project.evaluation.minimal_pairs import score_pairs
    from lora_project.evaluation.pair_tokens import tokenize_pairs
    from lora_project.models.kernels import forced_kernel
    from lora_project.models.lora_model import each_model

    cfg = task_config(spec)
    where = Path(tempfile.mkdtemp(prefix="lora-project-shard-", dir=scratch_root()))
    try:
        dirs = write_adapters(where, adapter_files)
        t0 = time.perf_counter()
        with forced_kernel(spec["kernel"]):
            base = worker_fp32_base(cfg, spec["threads"])
            load = time.perf_counter() - t0
            tokens = tokenize_pairs(base.tokenizer, pairs)
            out = {}
            for label, model in each_model(base, dirs):
                s = score_pairs(model, base.tokenizer, pairs, base.runtime, spec["path"], tokens=tokens)
                out[label] = (s.good, s.bad, s.rescored)
        return {"scores": out, "node": node_name(), "load_seconds": load, "seconds": time.perf_counter() - t0}
    finally:
        shutil.rmtree(where, ignore_errors=True)


def shards_of(n: int, k: int) -> list[tuple[int, int]]:
    """[start, end) of `k` contiguous shards of `n` items, sizes differing by at most one (no empty one)."""
    k = max(1, min(k, n))
    size, extra = divmod(n, k)
    out, start = [], 0
    for i in range(k):
        end = start + size + (i < extra)
        out.append((start, end))
        start = end
    return out


def evaluate_pairs_cluster(paths: ProjectPaths, cfg, pairs_path, address_text: str, *, adapters=(),
                           limit: int | None = None, strict: bool = False, first_pass: str = "auto",
                           log=print) -> dict:
    """`lora-project evaluate --pairs PATH --cluster ADDRESS`: `evaluate_minimal_pairs` with its scoring in shards."""
    from lora_project.cluster.address import parse_address
    from lora_project.cluster.connect import check_nodes, connect
    from lora_project.cluster.tasks import read_tree
    from lora_project.cluster.train import check_threads
    from lora_project.errors import UserError
    from lora_project.evaluation.evaluate import evaluate_minimal_pairs
    from lora_project.models.kernels import fp32_kernel

    cpus = check_threads({"evaluate": cfg})
    address = parse_address(address_text)
    kernel = fp32_kernel()

    def scorer(pairs, path, adapter_dirs, runtime):
        with connect(address, cpus) as ray:
            nodes = check_nodes(ray, None)
            slots = max(1, int(sum(n["cpus"] for n in nodes)) // cpus)
            cuts = shards_of(len(pairs), slots)
            log(f"{len(pairs)} pairs in {len(cuts)} shard(s) on {address.text}: {len(nodes)} node(s), "
                f"fp32 kernel {kernel}, {cpus} thread(s) each")
            files = ray.put({d.name: read_tree(d) for d in adapter_dirs})
            spec = {"config": cfg.to_dict(), "threads": cpus, "kernel": kernel, "path": path}
            task = ray.remote(score_shard).options(num_cpus=cpus, max_retries=cfg.cluster.max_retries,
                                                   retry_exceptions=False)
            refs = {task.remote(spec, pairs[a:b], files): i for i, (a, b) in enumerate(cuts)}
            done: dict[int, dict] = {}
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                for ref in ready:
                    i = refs[ref]
                    try:
                        done[i] = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                        raise UserError(f"shard {i + 1} of {len(cuts)} failed: {first}") from None
                    log(f"[shard {i + 1}/{len(cuts)}] done on {done[i]['node']} "
                        f"({cuts[i][1] - cuts[i][0]} pairs, {done[i]['seconds']:.1f} s)")
        labels = list(done[0]["scores"])
        return {label: ([g for i in range(len(cuts)) for g in done[i]["scores"][label][0]],
                        [b for i in range(len(cuts)) for b in done[i]["scores"][label][1]],
                        sum(done[i]["scores"][label][2] for i in range(len(cuts)))) for label in labels}

    result = evaluate_minimal_pairs(paths, cfg, pairs_path, adapters=adapters, limit=limit, strict=strict,
                                    first_pass=first_pass, log=log, scorer=scorer)
    result["cluster"] = address.text
    return result
