"""What runs on the workers: the node probe and one adapter's training (the local recipe, unchanged).

A training task gets the run's spec (dataset, adapter name, config as a mapping, the driver's
`RunOptions`, and the runtime the driver resolved: precision, fp32 kernel, threads) and the
project files it needs. It builds a scratch project in node-local storage:

* no shared filesystem: the files the driver shipped through the object store (the catalog,
  the dataset's source, its prepared splits and token cache) are written there;
* shared filesystem: the task copies the same files from the project folder itself (nothing travels).

Then it calls `lora_project.training.single.train_adapter` with the same options object as a
local run, tracked in a node-local MLflow store (or live on an http(s) server), and returns
everything the run wrote: the adapter's files, the experiment folder, and the MLflow run
(params, tags, every metric step, status). The driver alone writes them into the project.
A failure inside the recipe is returned as a FAILED result with its error (the task itself does
not raise, so nothing is retried for it); only a lost node makes Ray run the task again. A task the
driver cancels (``ray.cancel``, Ctrl-C at the driver) gets a KeyboardInterrupt: the recipe ends its
run KILLED as a local Ctrl-C does, and the task returns that KILLED run for the driver to record.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from lora_project.cluster.address import scratch_root

# Loaded base models of this worker process, by (model source, revision, precision, threads):
# a worker that trains several adapters loads the base once, as local train-batch does.
_BASES: dict[tuple, object] = {}
MAX_BASES = 1


def versions() -> dict:
    """The versions that must agree between the driver and every node."""
    from importlib import metadata

    out = {}
    for name in ("lora-project", "torch", "peft", "ray"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def node_name() -> str:
    """The node's IP address as Ray knows it (its host name when Ray cannot say)."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside a Ray worker
        return socket.gethostname()


def probe_node(marker: str | None) -> dict:
    """Run once on each node before any training: versions, CPU class, and whether the driver's
    marker file (in the project folder) is visible here (the shared-filesystem test)."""
    from lora_project.utils.device import cpu_class

    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "node": node_name(), "versions": versions(),
            "cpu": cpu_class(), "sees_marker": bool(marker) and Path(marker).is_file()}


def _write_files(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        target = root / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise ValueError(f"refusing a shipped path outside the scratch project: {rel}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def _copy_shared(root: Path, shared: Path, files: list[str]) -> None:
    """The scratch project gets the run's inputs from the shared project folder (read in place there;
    copied, not linked, because the recipe refuses paths that resolve outside its project)."""
    for rel in files:
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise ValueError(f"refusing a path outside the project: {rel}")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared / rel, root / rel)


def read_tree(folder: Path) -> dict[str, bytes]:
    """Every regular file under `folder`, by path relative to it."""
    out = {}
    if folder.is_dir():
        for p in sorted(folder.rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[p.relative_to(folder).as_posix()] = p.read_bytes()
    return out


def prepare_resume(root: Path, exp_name: str, live: bool) -> None:
    """In the task's scratch project: the shipped checkpoint continues in a fresh node-local MLflow run (the
    project's run id means nothing there; the driver appends the new steps to it). With live tracking
    (an http(s) server the workers reach), the run id is valid and kept."""
    if live:
        return
    for state in (root / "outputs" / "checkpoints" / exp_name).glob("step_*/state.json"):
        info = json.loads(state.read_text())
        info["mlflow_run_id"] = None
        state.write_text(json.dumps(info))


def newest_checkpoint(root: Path, exp_name: str | None) -> dict[str, bytes]:
    """The newest checkpoint a task's run wrote in its scratch project, by path relative to the project
    (empty when it wrote none): returned by a KILLED or FAILED task so that --resume can continue it."""
    from lora_project.training.checkpoint import list_checkpoints

    if not exp_name:
        return {}
    ckpts = list_checkpoints(root / "outputs" / "checkpoints" / exp_name)
    if not ckpts:
        return {}
    rel = ckpts[-1].relative_to(root).as_posix()
    return {f"{rel}/{r}": data for r, data in read_tree(ckpts[-1]).items()}


def _mirror_dir(spec: dict) -> Path | None:
    """The task's own folder in the shared project folder (shared filesystem only), where its newest checkpoint
    is mirrored while it trains: a retry of the task after its node was lost resumes from there."""
    if spec.get("shared_root") and spec.get("task_dir"):
        return Path(spec["shared_root"]) / spec["task_dir"]
    return None


def _mirror_to(mirror: Path, root: Path, target: Path, uri: str | None, before: list) -> None:
    """Copy one checkpoint just written (`target`, in the scratch project) to the task's shared folder, as one
    atomic folder ``latest/``: the checkpoint, its experiment folder, and the MLflow metric points so far (those
    of earlier attempts, then this attempt's node-local run), which a retry carries into its run."""
    from lora_project.utils.io_utils import atomic_directory

    exp_name = target.parent.name
    info = json.loads((target / "state.json").read_text())
    export = export_run(uri, info.get("mlflow_run_id")) if uri else None
    with atomic_directory(mirror / "latest", overwrite=True) as tmp:
        shutil.copytree(target, tmp / "outputs" / "checkpoints" / exp_name / target.name)
        shutil.copytree(root / "experiments" / exp_name, tmp / "experiments" / exp_name,
                        ignore=shutil.ignore_patterns("progress.json"))
        (tmp / "mlflow.json").write_text(json.dumps(before + (export["metrics"] if export else [])))


def _resume_setup(root: Path, spec: dict, resume_files) -> tuple[bool, list, int | None]:
    """Whether the recipe resumes, the MLflow metric points of earlier attempts up to the checkpoint (its
    node-local run starts after it), and the checkpoint's step: the checkpoint the driver sent (train-batch
    --resume), superseded by a newer one an earlier attempt of this task mirrored to the shared folder."""
    live = bool(spec.get("tracking_uri"))
    if spec.get("resume"):
        _place(root, spec, resume_files)
        prepare_resume(root, spec["resume"]["exp_name"], live)
    mirror = _mirror_dir(spec)
    snap = mirror / "latest" if mirror else None
    if snap is None or not (snap / "mlflow.json").is_file():
        return bool(spec.get("resume")), [], spec["resume"]["step"] if spec.get("resume") else None
    for top in ("experiments", "outputs"):
        shutil.copytree(snap / top, root / top, dirs_exist_ok=True)
    state = next((snap / "outputs" / "checkpoints").glob("*/step_*/state.json"))
    step = json.loads(state.read_text())["step"]
    prepare_resume(root, state.parent.parent.name, live)
    return True, [p for p in json.loads((snap / "mlflow.json").read_text()) if p[3] <= step], step


def _run_options(spec: dict, root: Path, uri: str | None, resume: bool, before: list, lines: list, progress):
    """The driver's RunOptions for the recipe in this task: its log kept, resuming when there is a checkpoint,
    progress sent to the driver, checkpoints mirrored to the shared project folder (shared filesystem)."""
    options = replace(spec["options"], log=lines.append, progress=False, resume=resume)
    if progress is not None:
        options = replace(options, extra_callbacks=(*options.extra_callbacks,
                                                    _forward_progress(progress, spec["key"])))
    mirror = _mirror_dir(spec)
    if mirror is not None:
        def on_checkpoint(target: Path) -> None:
            try:
                mirror.mkdir(parents=True, exist_ok=True)
                _mirror_to(mirror, root, target, uri, before)
            except OSError as exc:  # the shared folder failing must not stop the training
                lines.append(f"warning: could not mirror checkpoint {target.name} to {mirror}: {exc}")

        options = replace(options, on_checkpoint=on_checkpoint)
    return options


def export_run(uri: str, run_id: str | None) -> dict | None:
    """One MLflow run of a (node-local) store as plain data: params, tags, every metric step, status."""
    if not run_id:
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    metrics = []
    for key in sorted(run.data.metrics):
        metrics += [(m.key, m.value, m.timestamp, m.step) for m in client.get_metric_history(run_id, key)]
    return {"params": dict(run.data.params), "tags": dict(run.data.tags), "metrics": metrics,
            "status": run.info.status, "start_time": run.info.start_time, "end_time": run.info.end_time}


def _base_for(cfg, precision: str, threads: int):
    from lora_project.models.base_model import load_base
    from lora_project.utils.device import resolve_runtime

    t = cfg.training
    key = (cfg.model.source, cfg.model.revision, precision, threads, t.malloc_reuse)
    if key not in _BASES:
        _BASES.clear()  # one base per worker process: memory stays that of one local run
        _BASES[key] = load_base(cfg, resolve_runtime("cpu", precision, threads, t.malloc_reuse))
    return _BASES[key]


def _forward_progress(progress, key: str):
    """A callback that sends the run's progress.json state (as a local run writes it) to the driver's
    progress actor instead of a file: the driver writes it into the project's experiment folder."""
    from lora_project.training.callbacks import ProgressFile

    class ForwardProgress(ProgressFile):
        def emit(self, payload: dict) -> None:
            progress.update.remote(key, payload)  # fire and forget: a lost update is replaced by the next

    return ForwardProgress(Path(os.devnull))


@contextmanager
def _graceful_cancel():
    """`ray.cancel` interrupts a task through the worker's SIGINT handler (``_thread.interrupt_main``); with
    the project's handler there (utils/interrupts.py) the stop waits for the end of a shielded section, so it
    cannot tear an MLflow write and leave the node-local store locked with the run RUNNING. The worker
    process outlives the task: its previous handler comes back and the stop is forgotten afterwards."""
    import signal
    import threading

    from lora_project.utils import interrupts

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    interrupts.clear_stop()
    if main:
        signal.signal(signal.SIGINT, interrupts.handle_signal)
    try:
        yield
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGINT, previous)
        interrupts.clear_stop()


def train_task(spec: dict, files, progress=None, resume_files=None) -> dict:
    """Train one adapter as `train_adapter` does locally; returns what it wrote (see the module docstring).
    `files`: {path: bytes} shipped by the driver, or with a shared filesystem the paths to copy from it;
    `resume_files` the same for the checkpoint to continue (``spec["resume"]``, cluster/resume.py)."""
    with _graceful_cancel():
        return _train_task(spec, files, progress, resume_files)


def _place(root: Path, spec: dict, files) -> None:
    """The shipped files written into the scratch project, or copied from the shared project folder."""
    if spec.get("shared_root"):
        _copy_shared(root, Path(spec["shared_root"]), files or [])
    else:
        _write_files(root, files or {})


def _train_task(spec: dict, files, progress, resume_files) -> dict:
    from lora_project.config import build_config
    from lora_project.errors import UserError
    from lora_project.models.base_model import loads_in_this_process
    from lora_project.models.kernels import forced_kernel
    from lora_project.paths import ProjectPaths
    from lora_project.training.single import train_adapter
    from lora_project.utils.device import cpu_class

    import ray

    t_start = time.perf_counter()
    started_at = time.time()  # wall clock, as the driver's submit time (phases: scheduling)
    node = node_name()
    ctx = ray.get_runtime_context()
    if progress is not None:
        progress.started.remote(spec["key"], node, ctx.get_task_id())
    lines: list[str] = []
    where = Path(tempfile.mkdtemp(prefix="lora-project-task-", dir=scratch_root()))
    try:
        root = where / "project"
        root.mkdir()
        t_files = time.perf_counter()
        _place(root, spec, files)
        resume, before, step = _resume_setup(root, spec, resume_files)  # the experiment folder and checkpoint
        if step is not None:
            lines.append(f"continuing from the checkpoint of step {step}")
        phases = {"started_at": started_at, "data_shipping": time.perf_counter() - t_files, "model_load": 0.0,
                  "model_loads": 0, "training": 0.0}
        (root / "config").mkdir(exist_ok=True)
        if not (root / "config" / "training_config.yaml").exists():
            (root / "config" / "training_config.yaml").touch()  # marks the folder as a project root
        paths = ProjectPaths(root)
        cfg = build_config(spec["config"])
        live = spec.get("tracking_uri")
        cfg = replace(cfg, tracking=replace(cfg.tracking, tracking_uri=live))
        if not live:
            os.environ.pop("MLFLOW_TRACKING_URI", None)  # the node-local store, imported by the driver
        from lora_project.utils.mlflow_utils import resolve_tracking_uri

        uri = resolve_tracking_uri(paths, live)
        options = _run_options(spec, root, None if live else uri, resume, before, lines, progress)
        result = {"key": spec["key"], "node": node, "cpu": cpu_class(), "status": "FINISHED", "error": None,
                  "bug": False}
        t_load = time.perf_counter()
        loads = loads_in_this_process()
        res = None
        try:
            with forced_kernel(spec["kernel"]):
                base = _base_for(cfg, spec["precision"], spec["threads"])
                result["load_seconds"] = phases["model_load"] = time.perf_counter() - t_load
                phases["model_loads"] = loads_in_this_process() - loads
                t_train = time.perf_counter()
                res = train_adapter(paths, spec["dataset"], cfg, options, base=base)
                result["train_seconds"] = phases["training"] = time.perf_counter() - t_train
        except KeyboardInterrupt:  # ray.cancel from the driver (Ctrl-C there): the recipe ended its run KILLED
            result.update(status="KILLED", error="interrupted")
        except UserError as exc:
            result.update(status="FAILED", error=" ".join(str(exc).split()))
        except Exception as exc:  # a bug in one run: reported, the others go on
            result.update(status="FAILED", error=f"{type(exc).__name__}: {exc}"[:2000], bug=True)
        phases["trained_at"] = time.time()  # from here to the driver's record: phases' result return
        exp = sorted(paths.experiments_dir.glob("exp_*")) if paths.experiments_dir.is_dir() else []
        exp_dir = exp[-1] if exp else None
        results_json = res
        if results_json is None and exp_dir is not None and (exp_dir / "results.json").is_file():
            results_json = json.loads((exp_dir / "results.json").read_text())
        run_id = (results_json or {}).get("mlflow_run_id")
        export = None if live else export_run(uri, run_id)
        if export is not None:  # an earlier attempt's steps up to the checkpoint come first
            export["metrics"] = before + export["metrics"]
        result.update(
            results=results_json, log=lines,
            experiment_name=exp_dir.name if exp_dir else None,
            experiment_files=read_tree(exp_dir) if exp_dir else {},
            adapter_files=read_tree(paths.adapter(spec["adapter"])) if result["status"] == "FINISHED" else {},
            checkpoint_files={} if result["status"] == "FINISHED" else newest_checkpoint(root, exp_dir.name if exp_dir else None),
            mlflow=export, live_run_id=run_id if live else None,
            task_seconds=time.perf_counter() - t_start, phases=phases)
        phases["finished_at"] = time.time()  # the worker is free for the next task from here
        return result
    finally:
        shutil.rmtree(where, ignore_errors=True)


def task_phases(task: dict | None, submitted_at: float, packing: float, recorded_at: float) -> dict | None:
    """One task's phase times in seconds (benchmark --scaling's overheads): scheduling (submitted -> the
    task started: queueing, a worker process's start, its arguments fetched), data shipping (the driver
    packing and putting the dataset's files + the task writing them into its scratch project), model
    load, training (the recipe), result return (training ended -> recorded in the project by the
    driver); with the model loads the task did and its submit, start, finish (the worker free again) and
    record times (epoch seconds). Scheduling includes any wait for a free CPU (more tasks than CPUs):
    `benchmark.scaling.net_scheduling` takes that wait out.
    Wall-clock differences across machines are clamped at 0 (their clocks may disagree)."""
    if not task:
        return None
    return {"scheduling": max(0.0, task["started_at"] - submitted_at),  # with any wait for a free CPU
            "data_shipping": packing + task["data_shipping"], "model_load": task["model_load"],
            "training": task["training"], "result_return": max(0.0, recorded_at - task["trained_at"]),
            "model_loads": task["model_loads"], "submitted_at": submitted_at, "started_at": task["started_at"],
            "finished_at": task.get("finished_at", task["trained_at"]), "recorded_at": recorded_at}
