"""`benchmark --matrix --cluster ADDRESS`: the cross-evaluation matrix with each cell as one Ray task.

The driver does what `benchmark --matrix` does (`benchmark.matrix.cross_matrix`: the prepared
datasets, the adapters on this base, each split tokenized once, the intervals, the paired changes
against the base, the report) and hands its `scorer` hook `matrix_scorer`: each (model, dataset)
cell is one task that scores one split for the base or one adapter with the same scoring core
(`models.scoring.score_split`, default windows), on the fp32 base its worker loaded once (threads =
cluster.cpus_per_task, the driver's fp32 kernel). A cell is scored whole, as in one process, so its
per-document sums, and with them every figure of the matrix, equal the local ones at equal threads
on one CPU class. A cell that fails stops the command with one line naming it (a lost node's cell is
retried, up to cluster.max_retries).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path


def score_cell(spec: dict, split: tuple, label: str, adapter_files: dict[str, bytes] | None) -> dict:
    """On a worker: the `Score` of one split (`split`: (SplitTokens, separator)) for the base (`adapter_files`
    None) or the adapter `label` (its files, shipped)."""
    from lora_project.cluster.address import scratch_root
    from lora_project.cluster.evaluate import task_config, worker_fp32_base, write_adapters
    from lora_project.cluster.tasks import node_name
    from lora_project.models.kernels import forced_kernel
    from lora_project.models.lora_model import each_model
    from lora_project.models.scoring import score_split

    cfg = task_config(spec)
    tokens, separator = split
    where = Path(tempfile.mkdtemp(prefix="lora-project-cell-", dir=scratch_root()))
    try:
        dirs = write_adapters(where, {label: adapter_files}) if adapter_files is not None else []
        t0 = time.perf_counter()
        with forced_kernel(spec["kernel"]):
            base = worker_fp32_base(cfg, spec["threads"])
            score = None
            for name, model in each_model(base, dirs):
                if name == label:
                    score = score_split(model, base.tokenizer, tokens, separator, base.runtime)
                    break
        return {"score": score, "node": node_name(), "seconds": time.perf_counter() - t0}
    finally:
        shutil.rmtree(where, ignore_errors=True)


def matrix_scorer(cfg, address_text: str, log=print):
    """`cross_matrix`'s scorer that sends each cell to the cluster at `address_text`. The address is probed
    and the threads checked here, before the matrix loads anything."""
    from lora_project.cluster.address import parse_address, probe
    from lora_project.cluster.train import check_threads
    from lora_project.models.kernels import fp32_kernel

    cpus = check_threads({"matrix": cfg})
    address = parse_address(address_text)
    probe(address)
    kernel = fp32_kernel()
    spec = {"config": cfg.to_dict(), "threads": cpus, "kernel": kernel}

    def scorer(base, adapters: list[Path], splits: dict) -> list[tuple[str, dict]]:
        from lora_project.cluster.connect import check_nodes, connect
        from lora_project.cluster.tasks import read_tree
        from lora_project.models.adapter import unique_adapter_labels

        labels = ["base"] + unique_adapter_labels(adapters)
        with connect(address, cpus) as ray:
            nodes = check_nodes(ray, None)
            log(f"{len(labels)} model(s) x {len(splits)} dataset(s) = {len(labels) * len(splits)} cell task(s) on "
                f"{address.text}: {len(nodes)} node(s), fp32 kernel {kernel}, {cpus} thread(s) each")
            shipped = {d: ray.put(v) for d, v in splits.items()}
            files = {"base": None} | {label: ray.put(read_tree(a)) for label, a in zip(labels[1:], adapters)}
            task = ray.remote(score_cell).options(num_cpus=cpus, max_retries=cfg.cluster.max_retries,
                                                  retry_exceptions=False)
            refs = {task.remote(spec, shipped[d], m, files[m]): (m, d) for m in labels for d in splits}
            done = _collect(ray, refs, log)
        return [(m, {d: done[(m, d)] for d in splits}) for m in labels]

    return scorer


def _collect(ray, refs: dict, log) -> dict:
    """Each cell's Score as soon as its task ends; a failed cell is one error line."""
    from lora_project.errors import UserError
    from lora_project.utils.interrupts import check_stop

    done: dict = {}
    pending = list(refs)
    while pending:
        check_stop()
        ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
        for ref in ready:
            m, d = refs[ref]
            try:
                out = ray.get(ref)
            except ray.exceptions.RayError as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                raise UserError(f"matrix cell {m} x {d} failed: {first}") from None
            done[(m, d)] = out["score"]
            log(f"[{m} x {d}] done on {out['node']} ({out['seconds']:.1f} s)")
    return done
