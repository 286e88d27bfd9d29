"""Recording a cluster task's result in the project: the driver is the only writer of adapters/,
experiments/ and mlruns/ (unless the tasks log live to an http(s) MLflow server).

`record_result` writes the adapter folder (one atomic rename), the experiment folder (config.yaml,
results.json with the node and CPU class, logs) and the MLflow run, a child of the command's parent run,
recreated from the worker's node-local store by `import_run` (params, tags, every metric step, status).
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_project.paths import ProjectPaths


def record_result(paths: ProjectPaths, result: dict, parent_id: str | None, first_cfg, overwrite: bool, use_mlflow: bool,
            exp_dir: Path | None = None):
    """Write one task's results into the project (the driver is the only writer; the caller holds the
    adapter's lock); into `exp_dir` when the driver made it at the task's start, else a new experiment
    folder. Returns results.json."""
    import os

    from lora_project.cluster.resume import record_checkpoint
    from lora_project.models.adapter import METADATA_FILE
    from lora_project.training.lifecycle import new_experiment_dir
    from lora_project.utils.io_utils import atomic_directory, atomic_write_bytes, atomic_write_json

    adapter = result["adapter"]
    results = dict(result.get("results") or {})
    if not result.get("experiment_name"):
        return results
    exp_dir = exp_dir or new_experiment_dir(paths, adapter)
    adapter_dir = paths.adapter(adapter)
    results.update(experiment_dir=str(exp_dir), cluster={"node": result["node"], "cpu": result["cpu"],
                                                         "task_seconds": result.get("task_seconds")})
    if result["status"] == "FINISHED":
        results["adapter_dir"] = str(adapter_dir)
    tracker = None
    export = result.get("mlflow")
    if use_mlflow and first_cfg.tracking.mlflow and export is not None:
        tracker = import_run(paths, first_cfg, export, exp_dir.name, parent_id, result)
        results["mlflow_run_id"] = tracker.run_id if tracker else None
    elif result.get("live_run_id"):
        results["mlflow_run_id"] = result["live_run_id"]
    for rel, data in result["experiment_files"].items():
        if rel == "logs/progress.json":  # the driver's pid: the board reads it as a live or ended run of ours
            data = json.dumps({**json.loads(data), "pid": os.getpid()}, indent=2).encode()
        if rel != "results.json":
            atomic_write_bytes(exp_dir / rel, data)
    record_checkpoint(paths, result.get("checkpoint_files") or {}, exp_dir, results.get("mlflow_run_id"))
    (exp_dir / "logs").mkdir(exist_ok=True)
    (exp_dir / "logs" / "task.log").write_text("\n".join(result.get("log") or []) + "\n")
    if result["status"] == "FINISHED":
        meta = json.loads(result["adapter_files"][METADATA_FILE])
        meta.update(mlflow_run_id=results.get("mlflow_run_id"), experiment_dir=str(exp_dir))
        with atomic_directory(adapter_dir, overwrite=overwrite) as tmp:
            for rel, data in result["adapter_files"].items():
                if rel != METADATA_FILE:
                    atomic_write_bytes(tmp / rel, data)
            atomic_write_json(tmp / METADATA_FILE, meta)
    atomic_write_json(exp_dir / "results.json", results)
    if tracker:
        for f in ("config.yaml", "results.json", "loss_curve.png"):
            if (exp_dir / f).is_file():
                tracker.log_artifact(exp_dir / f)
        if result["status"] == "FINISHED":
            tracker.log_artifact(adapter_dir, "adapter")
        tracker.end(export["status"] if export["status"] in ("FINISHED", "FAILED", "KILLED") else "FAILED")
    return results


def import_run(paths, cfg, export: dict, exp_name: str, parent_id: str | None, result: dict):
    """The worker's MLflow run recreated in the project's store: params, tags, every metric step; for a resumed
    task, its steps (those after the checkpoint) appended to the run it continues."""
    from lora_project.utils.mlflow_utils import MlflowTracker

    tags = {k: v for k, v in export["tags"].items() if not k.startswith("mlflow.") or k == "mlflow.source.type"}
    tags.update({"experiment_dir": exp_name, "mlflow.runName": exp_name, "cluster_node": result["node"],
                 "cluster_cpu": result["cpu"].get("isa", "")})
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    tracker = MlflowTracker(paths, cfg.tracking.experiment_name, cfg.tracking.tracking_uri)
    if result.get("resume_run_id"):  # a resumed task: its steps after the checkpoint go on the project's run
        if tracker.resume(result["resume_run_id"]) is None:
            return None
        tracker.set_tags({k: tags[k] for k in ("cluster_node", "cluster_cpu")})
    elif tracker.start(exp_name, export["params"], tags) is None:
        return None
    tracker.log_metric_points(export["metrics"])
    return tracker
