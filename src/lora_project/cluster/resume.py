"""Checkpoints across the driver and its tasks: `train-batch --resume --cluster`.

A task trains in node-local scratch (cluster/tasks.py), so its checkpoints live there. The driver keeps
what a resume needs in the project, as a local run leaves it:

* a task whose run ends KILLED or FAILED returns its newest checkpoint (`tasks.newest_checkpoint`), and the driver writes it to
  ``outputs/checkpoints/<experiment>/step_NNNNNN/`` beside the experiment folder it recorded, with the
  project's MLflow run id in its ``state.json`` (`record_checkpoint`);
* with ``--resume``, an adapter that has a checkpoint in the project (`training.single.has_checkpoint`,
  what local ``train --resume`` continues) is sent with it (`task_checkpoint`): its experiment folder and
  newest checkpoint folder, as bytes through the object store, or as paths the task copies from the
  shared project folder. The task puts them into its scratch project and runs the local recipe with
  ``resume=True`` (`tasks.prepare_resume`); its node-local MLflow run then holds the steps after the
  checkpoint, which the driver appends to the project's run (cluster/record.py), so every step is
  there once;
* with a shared filesystem, each task has its own folder in the project, ``outputs/cluster_tasks/
  <adapter>-<random>/`` (`mirror_dir`), where it mirrors its newest checkpoint as it trains
  (``latest/``: the checkpoint, the experiment folder, the MLflow metric points so far). A retry of the
  task after its node was lost resumes from there (tasks.py), carrying the points before the checkpoint
  into its run, so the recorded run has every step once; the driver removes the folder once the task's
  result is recorded (`drop_mirror`).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from lora_project.paths import ProjectPaths


def task_checkpoint(paths: ProjectPaths, adapter: str, shared: bool) -> dict | None:
    """What a task needs to resume `adapter` from its newest checkpoint in the project, or None when it
    has none: {exp_name, run_id (the project's MLflow run), step, files ({path: bytes}, or with a shared
    filesystem the project-relative paths to copy)}."""
    from lora_project.cluster.tasks import read_tree
    from lora_project.training.single import find_resume_checkpoint, has_checkpoint

    if not has_checkpoint(paths, adapter):
        return None
    exp_dir, ckpt = find_resume_checkpoint(paths, adapter, recover=False)
    info = json.loads((ckpt / "state.json").read_text())
    files = {}
    for folder in (exp_dir, ckpt):
        rel = folder.relative_to(paths.root).as_posix()
        files.update({f"{rel}/{r}": data for r, data in read_tree(folder).items()
                      if not r.startswith("logs/progress.json")})
    return {"exp_name": exp_dir.name, "run_id": info.get("mlflow_run_id"), "step": info.get("step"),
            "files": sorted(files) if shared else files}


def record_checkpoint(paths: ProjectPaths, files: dict[str, bytes], exp_dir: Path, run_id: str | None) -> None:
    """Write a task's returned checkpoint beside the experiment folder the driver recorded (the driver's
    experiment number may differ from the task's), its state.json naming the project's MLflow run."""
    from lora_project.utils.io_utils import atomic_directory, atomic_write_bytes

    if not files:
        return
    step = Path(next(iter(files))).parts[3]  # outputs/checkpoints/<experiment>/step_NNNNNN/<file>
    with atomic_directory(paths.checkpoints_dir / exp_dir.name / step, overwrite=True) as tmp:
        for rel, data in files.items():
            name = Path(rel).name
            if name == "state.json":
                data = json.dumps({**json.loads(data), "mlflow_run_id": run_id}).encode()
            atomic_write_bytes(tmp / name, data)


def mirror_dir(adapter: str) -> str:
    """A new task's own folder in the shared project, relative to the project root."""
    return f"outputs/cluster_tasks/{adapter}-{uuid.uuid4().hex[:12]}"


def drop_mirror(paths: ProjectPaths, rel: str | None) -> None:
    """Remove a task's mirror folder once the task ended (its result returned, or lost for good)."""
    if rel:
        shutil.rmtree(paths.root / rel, ignore_errors=True)
