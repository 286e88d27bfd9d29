"""Import an old MLflow file store (``mlruns/`` with ``meta.yaml`` files) into the project's store.

MLflow 3 ships the conversion itself, ``mlflow migrate-filestore`` (``mlflow.store.fs2db.migrate``):
it reads a file store without the ``MLFLOW_ALLOW_FILE_STORE`` switch, but only writes into an
empty SQLite database and keeps the old experiment ids. So the store is migrated into a
temporary database first, and its runs are copied from there into the project's store with
``MlflowClient``: experiment and run names, start/end times and status, params, every step
of every metric, tags, and the artifacts (copied under the project's artifact root; symlinks
in the old artifact folders are not followed). Each copied run is tagged
``lora_project.adopted_from_run`` with its old run id, so a second import skips it.

The plan runs the same migration (`read_file_store`) before anything is copied, so a store
that MLflow cannot read (a broken ``meta.yaml``, a garbled metric file), or reads only in part
(MLflow passes over a ``meta.yaml`` it cannot parse with a warning), is reported by the plan and
left in place instead of failing halfway through `--apply`.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from lora_project.adopt._project import (
    ProjectPaths,
    UserError,
    default_tracking_uri,
    sha256_file,
)

ADOPTED_RUN_TAG = "lora_project.adopted_from_run"
ADOPTED_EXPERIMENT_TAG = "lora_project.adopted_experiment"


def _all_runs(client, experiment_ids: list[str]):
    from mlflow.entities import ViewType

    token = None
    while True:
        page = client.search_runs(experiment_ids, run_view_type=ViewType.ALL, max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _target_experiment(client, paths: ProjectPaths, uri: str, name: str, created: list[str]) -> str:
    """The project's experiment for an old one: same name, or the name with ' (adopted)' when the
    project already has an experiment of that name that an adoption did not create."""
    candidate, n = name, 1
    while True:
        exp = client.get_experiment_by_name(candidate)
        if exp is None:
            artifacts = None  # a server or another store keeps its own artifact root
            if uri == default_tracking_uri(paths):
                artifacts = (paths.mlruns_dir / "artifacts").resolve().as_uri()
            exp_id = client.create_experiment(candidate, artifact_location=artifacts,
                                              tags={ADOPTED_EXPERIMENT_TAG: "true"})
            created.append(exp_id)
            return exp_id
        if exp.lifecycle_stage == "active" and exp.tags.get(ADOPTED_EXPERIMENT_TAG) == "true":
            return exp.experiment_id
        n += 1
        candidate = f"{name} (adopted)" if n == 2 else f"{name} (adopted {n - 1})"


def _local_path(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and uri:
        return Path(uri)
    return None


def _stage_artifacts(src: Path, stage: Path) -> list[tuple[str, str]]:
    """Copy the regular files under `src` to `stage` (symlinks skipped); (relative path, sha256) each."""
    out = []
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            f = Path(dirpath) / name
            if f.is_symlink() or not f.is_file():
                continue
            rel = f.relative_to(src)
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, stage / rel)
            out.append((rel.as_posix(), sha256_file(f)))
    return out


def scratch_dir() -> tempfile.TemporaryDirectory:
    """A temporary folder for the migrated database: in memory (/dev/shm) where there is one,
    since creating an MLflow database syncs the disk after every schema statement."""
    shm = Path("/dev/shm")
    where = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    return tempfile.TemporaryDirectory(prefix="lora-project-adopt-", dir=where)


def read_file_store(store: Path, folder: str) -> tuple[str, list[str]]:
    """Migrate the file store at `store` into a new SQLite database in `folder` with MLflow's own
    reader; returns (its tracking URI, the files MLflow passed over). A store MLflow cannot read
    at all is a one-line UserError."""
    import logging
    import warnings

    from mlflow.store.fs2db import migrate

    db = f"sqlite:///{Path(folder) / 'migrated.db'}"
    skipped: list[str] = []

    class Passed(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if msg.startswith("Failed to read "):
                skipped.append(msg[len("Failed to read "):].split(": ", 1)[0])

    handler, logger = Passed(logging.WARNING), logging.getLogger("mlflow.store.fs2db")
    logger.addHandler(handler)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            migrate(store, db, progress=False)
    except Exception as exc:  # MLflow's reader fails with whatever the bad file makes it raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"MLflow cannot read the file store {store} ({type(exc).__name__}: {first})") from None
    finally:
        logger.removeHandler(handler)
    return db, skipped


def count_runs(uri: str) -> tuple[int, int]:
    """(active runs of active experiments, all runs) in the store at `uri`."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    live = total = 0
    for exp in client.search_experiments(view_type=ViewType.ALL):
        for run in _all_runs(client, [exp.experiment_id]):
            total += 1
            live += run.info.lifecycle_stage == "active" and exp.lifecycle_stage == "active"
    return live, total


def existing_imports(client) -> dict[str, str]:
    """old run id -> project run id, for runs an earlier adoption imported (and not deleted)."""
    from mlflow.entities import ViewType

    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    out = {}
    for i in range(0, len(exps), 100):
        for run in client.search_runs(exps[i:i + 100], filter_string=f"tags.`{ADOPTED_RUN_TAG}` != ''",
                                      max_results=50000):
            out[run.data.tags[ADOPTED_RUN_TAG]] = run.info.run_id
    return out


def import_file_store(paths: ProjectPaths, store: Path, uri: str, record, migrated: str | None = None) -> dict:
    """Copy every active run of the file store at `store` into the tracking store at `uri`.

    `record(kind, value)` is called as soon as something is added ('experiment', id; 'run',
    {...}; 'artifact', {...}), so that an interrupted import can still be undone.
    `migrated`: the URI of the plan's migrated database (`read_file_store`), else it is made here.
    Returns counts: runs imported, runs already there, deleted runs not imported.
    """
    from mlflow.entities import Metric, Param, RunTag, ViewType
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    counts = {"imported": 0, "already_there": 0, "deleted_not_imported": 0, "metric_points": 0}
    with scratch_dir() as tmp:
        db = migrated
        if db is None:
            db, skipped = read_file_store(store, tmp)
            if skipped:
                raise UserError(f"MLflow cannot read {skipped[0]} (and {len(skipped) - 1} more)" if len(skipped) > 1
                                else f"MLflow cannot read {skipped[0]}")
        src = MlflowClient(db)
        dst = MlflowClient(uri)
        done = existing_imports(dst)
        created: list[str] = []
        for exp in src.search_experiments(view_type=ViewType.ALL):
            runs = list(_all_runs(src, [exp.experiment_id]))
            live = [r for r in runs if r.info.lifecycle_stage == "active" and exp.lifecycle_stage == "active"]
            counts["deleted_not_imported"] += len(runs) - len(live)
            todo = [r for r in live if r.info.run_id not in done]
            counts["already_there"] += len(live) - len(todo)
            if not todo:
                continue
            exp_id = _target_experiment(dst, paths, uri, exp.name, created)
            if created and created[-1] == exp_id:
                record("experiment", exp_id)
            for run in todo:
                counts["metric_points"] += _copy_run(src, dst, run, exp_id, store / exp.experiment_id, record,
                                                     Metric, Param, RunTag, tmp)
                counts["imported"] += 1
    return counts


def _copy_run(src, dst, run, exp_id: str, exp_dir: Path, record, Metric, Param, RunTag, tmp: str) -> int:
    info = run.info
    tags = {k: v for k, v in run.data.tags.items() if k != "mlflow.runName"}
    tags[ADOPTED_RUN_TAG] = info.run_id
    new = dst.create_run(exp_id, start_time=info.start_time, tags=tags, run_name=info.run_name)
    new_id = new.info.run_id
    record("run", {"run_id": new_id, "source_run_id": info.run_id, "experiment_id": exp_id,
                   "run_name": info.run_name})
    try:
        params = [Param(k, v) for k, v in sorted(run.data.params.items())]
        for i in range(0, len(params), 100):
            dst.log_batch(new_id, params=params[i:i + 100])
        points = []
        for key in sorted(run.data.metrics):
            points += [Metric(m.key, m.value, m.timestamp, m.step) for m in src.get_metric_history(info.run_id, key)]
        for i in range(0, len(points), 1000):
            dst.log_batch(new_id, metrics=points[i:i + 1000])
        art = exp_dir / info.run_id / "artifacts"
        if art.is_dir() and not art.is_symlink():
            stage = Path(tmp) / f"art-{info.run_id}"
            staged = _stage_artifacts(art, stage)
            if staged:
                dst.log_artifacts(new_id, str(stage))
                where = _local_path(dst.get_run(new_id).info.artifact_uri)
                for rel, sha in staged:
                    if where is not None:
                        got = sha256_file(where / rel)
                        if got != sha:
                            raise UserError(f"artifact {rel} of run {info.run_id} changed in the copy (sha256)")
                    record("artifact", {"path": str(where / rel) if where else f"{new_id}:{rel}", "sha256": sha,
                                        "source": (art / rel).as_posix()})
        if info.status in ("FINISHED", "FAILED", "KILLED"):
            dst.set_terminated(new_id, status=info.status, end_time=info.end_time)
    except BaseException:
        with contextlib.suppress(Exception):
            remove_runs(dst, [new_id], [])
        raise
    return len(points)


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def remove_runs(client, run_ids: list[str], experiment_ids: list[str]) -> dict:
    """Delete and purge runs (MLflow's `gc`, for these runs only), then the experiments an
    adoption created when they are left empty. Returns what was removed."""
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    store = client._tracking_client.store
    out = {"runs": [], "experiments": [], "not_purged": []}
    for rid in run_ids:
        try:
            if client.get_run(rid).info.lifecycle_stage != "deleted":
                client.delete_run(rid)
        except MlflowException:
            continue  # already gone
        if hasattr(store, "_hard_delete_run"):
            store._hard_delete_run(rid)
        else:
            out["not_purged"].append(rid)
        out["runs"].append(rid)
    for eid in experiment_ids:
        try:
            exp = client.get_experiment(eid)
        except MlflowException:
            continue
        if list(client.search_runs([eid], run_view_type=ViewType.ALL, max_results=1)):
            continue  # runs added since: keep the experiment
        if exp.lifecycle_stage != "deleted":
            client.delete_experiment(eid)
        if hasattr(store, "_hard_delete_experiment"):
            store._hard_delete_experiment(eid)
        out["experiments"].append(eid)
    return out
