"""Scale-out arithmetic for `benchmark --scaling`: speed-up, parallel efficiency and a projection.

Pure functions only (no Ray, no torch): the measured side of `benchmark --scaling` feeds them the
wall times and the per-task phase times its tasks return, and these functions turn them into the
report's speed-up, efficiency and the projected wall time for 8, 64 and 512 workers.

The projection model (stated in every report as :data:`PROJECTION_MODEL`)::

    T(W) = ceil(tasks / W) * (train + overhead) + fixed

where ``train`` is the mean per-task training time, ``overhead`` is the mean per-task overhead
(scheduling + model load + data shipping + result return, as measured on the cluster) and
``fixed`` is the driver's fixed cost (cluster start or connect, probe, MLflow import). It assumes
identical tasks, one task per worker at a time, no contention between workers (each worker has its
own CPUs and memory bandwidth), a model load paid once per task (the pessimistic case: a worker
that keeps its model pays it once) and a driver whose fixed cost does not grow with W.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from lora_project.errors import UserError

PROJECTION_MODEL = (
    "T(W) = ceil(tasks / W) * (train + overhead) + fixed; identical tasks, one task per worker at a time, "
    "no contention between workers, per-task overhead (scheduling + model load + data shipping + result "
    "return) paid by every task, the driver's fixed cost independent of W"
)

PROJECTED_WORKERS = (8, 64, 512)

OVERHEAD_PHASES = ("scheduling", "model_load", "data_shipping", "result_return")


def _positive(name: str, value: float, allow_zero: bool = False) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or math.isinf(value):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def _count(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def speed_up(local_seconds: float, cluster_seconds: float) -> float:
    """Local one-CPU wall time divided by the cluster wall time."""
    return _positive("local_seconds", local_seconds) / _positive("cluster_seconds", cluster_seconds)


def parallel_efficiency(local_seconds: float, workers: int, cluster_seconds: float) -> float:
    """Local one-CPU wall time / (workers x cluster wall time); 1.0 is perfect scaling."""
    return speed_up(local_seconds, cluster_seconds) / _count("workers", workers)


def mean_overheads(phases: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each overhead phase (:data:`OVERHEAD_PHASES`) over the tasks' phase timings, plus their
    sum as ``total``; a task that did not report a phase counts it as 0 s."""
    rows = list(phases)
    if not rows:
        raise UserError("no task phase timings to average")
    out = {}
    for phase in OVERHEAD_PHASES:
        out[phase] = sum(_positive(phase, float(r.get(phase, 0.0)), allow_zero=True) for r in rows) / len(rows)
    out["total"] = sum(out[p] for p in OVERHEAD_PHASES)
    return out


def net_scheduling(phases: Iterable[Mapping[str, float]], slots: int) -> list[dict]:
    """The tasks' phase timings with ``scheduling`` counted from the moment each task could have started:
    the later of its submission and the moment a slot (one of ``slots`` workers) freed for it, as a
    first-come first-served queue replays the measured start (``started_at``) and finish
    (``finished_at``, the worker free again) times. With more tasks than slots, submit -> start
    includes the wait behind earlier tasks, which is not an overhead of the cluster."""
    import heapq

    rows = [dict(r) for r in phases]
    free = [-math.inf] * _count("slots", slots)
    for r in sorted(rows, key=lambda r: r["started_at"]):
        ready = max(r["submitted_at"], heapq.heappop(free))
        r["scheduling"] = max(0.0, r["started_at"] - ready)
        heapq.heappush(free, r["finished_at"])
    return rows


def projected_seconds(tasks: int, workers: int, train_seconds: float, overhead_seconds: float,
                      fixed_seconds: float) -> float:
    """Projected wall time of ``tasks`` identical tasks on ``workers`` workers (:data:`PROJECTION_MODEL`)."""
    tasks, workers = _count("tasks", tasks), _count("workers", workers)
    per_task = _positive("train_seconds", train_seconds) + _positive("overhead_seconds", overhead_seconds,
                                                                     allow_zero=True)
    return math.ceil(tasks / workers) * per_task + _positive("fixed_seconds", fixed_seconds, allow_zero=True)


def projection(tasks: int, train_seconds: float, overhead_seconds: float, fixed_seconds: float,
               local_one_cpu_seconds: float, workers: Iterable[int] = PROJECTED_WORKERS) -> list[dict]:
    """For each worker count: projected wall time, speed-up over ``local_one_cpu_seconds`` and efficiency.

    ``local_one_cpu_seconds`` is the measured (or, for a task count other than the measured one,
    scaled) local one-CPU wall time of the same ``tasks``."""
    local = _positive("local_one_cpu_seconds", local_one_cpu_seconds)
    rows = []
    for w in workers:
        t = projected_seconds(tasks, w, train_seconds, overhead_seconds, fixed_seconds)
        rows.append({"workers": w, "tasks": tasks, "seconds": t, "speed_up": local / t,
                     "efficiency": local / (w * t)})
    return rows


def projection_same_load(summary: Mapping, workers: Iterable[int] = PROJECTED_WORKERS) -> list[dict]:
    """The projection with as many tasks per worker as were measured (``ceil(tasks / workers)`` of the
    summary): W workers run that many times W tasks, against the local one-CPU wall time scaled in
    proportion to the task count. The summary's own projection keeps the measured task count, so its
    larger clusters sit mostly idle."""
    per = math.ceil(summary["tasks"] / summary["workers"])
    rows = []
    for w in workers:
        n = per * _count("workers", w)
        rows += projection(n, summary["train_seconds_per_task"], summary["overheads_per_task"]["total"],
                           summary["fixed_seconds"], summary["local_one_cpu_seconds"] * n / summary["tasks"],
                           workers=(w,))
    return rows


def scaling_summary(tasks: int, workers: int, local_one_cpu_seconds: float, cluster_seconds: float,
                    train_seconds: float, phases: Iterable[Mapping[str, float]], fixed_seconds: float,
                    local_model_loads: int, cluster_model_loads: int) -> dict:
    """The `benchmark --scaling` report (its ``--json`` form) from the two measured runs: wall times,
    speed-up, efficiency, the mean per-task overheads, both sides' model-load counts, the
    projection for :data:`PROJECTED_WORKERS` and the model it used."""
    overheads = mean_overheads(phases)
    return {
        "tasks": _count("tasks", tasks), "workers": _count("workers", workers),
        "local_one_cpu_seconds": _positive("local_one_cpu_seconds", local_one_cpu_seconds),
        "cluster_seconds": _positive("cluster_seconds", cluster_seconds),
        "speed_up": speed_up(local_one_cpu_seconds, cluster_seconds),
        "efficiency": parallel_efficiency(local_one_cpu_seconds, workers, cluster_seconds),
        "model_loads": {"local": local_model_loads, "cluster": cluster_model_loads},
        "train_seconds_per_task": _positive("train_seconds", train_seconds),
        "overheads_per_task": overheads,
        "fixed_seconds": _positive("fixed_seconds", fixed_seconds, allow_zero=True),
        "projection": projection(tasks, train_seconds, overheads["total"], fixed_seconds, local_one_cpu_seconds),
        "projection_model": PROJECTION_MODEL,
    }


def scaling_markdown(summary: Mapping) -> str:
    """The report's table form (the one `benchmark --scaling` prints without ``--json``)."""
    s = summary
    lines = [
        "| run | workers | wall (s) | speed-up | efficiency | model loads |",
        "|---|---:|---:|---:|---:|---:|",
        f"| local, one CPU | 1 | {s['local_one_cpu_seconds']:.1f} | 1.00 | 1.00 | {s['model_loads']['local']} |",
        f"| cluster | {s['workers']} | {s['cluster_seconds']:.1f} | {s['speed_up']:.2f} | {s['efficiency']:.2f} "
        f"| {s['model_loads']['cluster']} |",
        "",
        "| per-task overhead | seconds |",
        "|---|---:|",
        *(f"| {p.replace('_', ' ')} | {s['overheads_per_task'][p]:.2f} |" for p in OVERHEAD_PHASES),
        f"| total | {s['overheads_per_task']['total']:.2f} |",
        "",
        "| projected workers | wall (s) | speed-up | efficiency |",
        "|---:|---:|---:|---:|",
        *(f"| {r['workers']} | {r['seconds']:.1f} | {r['speed_up']:.2f} | {r['efficiency']:.2f} |"
          for r in s["projection"]),
        "",
        f"Model: {s['projection_model']} (train {s['train_seconds_per_task']:.1f} s per task, "
        f"fixed {s['fixed_seconds']:.1f} s, {s['tasks']} tasks).",
    ]
    return "\n".join(lines) + "\n"
