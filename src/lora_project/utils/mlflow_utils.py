"""MLflow tracking through `MlflowClient` with explicit run ids (no global active run).

Default tracking URI: ``sqlite:///<project>/mlruns/mlflow.db`` with artifacts under
``<project>/mlruns/artifacts``; ``MLFLOW_TRACKING_URI`` (or ``tracking.tracking_uri``)
overrides it, e.g. a real server. If the tracking backend fails mid-run, training goes on:
the failure is reported once on stderr and metrics stay in the run's local JSON-lines log.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from lora_project.paths import ProjectPaths
from lora_project.utils.interrupts import shield

# MLflow rejects param values above its limit (6000 chars in MLflow 2.x/3.x); long values
# (e.g. a list of 50 target modules) are cut with a marker rather than failing the run.
PARAM_MAX_CHARS = 500


def default_tracking_uri(paths: ProjectPaths) -> str:
    """sqlite:///<project>/mlruns/mlflow.db"""
    return f"sqlite:///{paths.mlruns_dir / 'mlflow.db'}"


def _schema_head() -> str | None:
    """The database schema revision this MLflow version creates (its newest migration)."""
    try:
        from alembic.script import ScriptDirectory
        from mlflow.store.db.utils import _get_alembic_config

        return ScriptDirectory.from_config(_get_alembic_config("sqlite://")).get_current_head()
    except Exception:  # a private MLflow helper moved: skip the check rather than fail tracking
        return None


def check_sqlite_store(db: Path) -> str | None:
    """Make sure a SQLite tracking store is usable before a run writes to it.

    A store whose creation was cut short (a full disk, a kill) has no schema revision or an
    older one than its tables, and every later run would fail with errors such as
    "duplicate column name". Such a store holding no runs is moved aside (never deleted) and
    created anew; one holding runs is named in one clear line for the user to decide.
    Returns a message for the user, or None when the store is fine (or does not exist yet).
    """
    import sqlite3

    if not db.is_file() or db.stat().st_size == 0:
        return None
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            revision = (con.execute("SELECT version_num FROM alembic_version").fetchone() or [None])[0] \
                if "alembic_version" in tables else None
            runs = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] if "runs" in tables else 0
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        revision, runs, tables = None, 0, {f"unreadable: {exc}"}
    head = _schema_head()
    if revision is not None and (head is None or revision == head):
        return None
    if revision is not None and runs:
        return None  # an older store with runs: MLflow's own upgrade path (mlflow db upgrade) applies
    if runs:
        return (f"{db} looks half-created (no schema revision) but holds {runs} runs; tracking is off for this "
                "run. Back it up and run `mlflow db upgrade sqlite:///<that file>`, or move it away")
    aside = db.with_name(f"{db.name}.broken-{time.strftime('%Y%m%dT%H%M%S')}")
    os.replace(db, aside)
    try:  # a store and an engine cached for this URI in this process still point at the old file
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        from mlflow.tracking._tracking_service.registry import TrackingStoreRegistry

        TrackingStoreRegistry._get_store_with_resolved_uri.cache_clear()
        for uri in [u for u in SqlAlchemyStore._engine_map if u.endswith(str(db))]:
            SqlAlchemyStore._engine_map.pop(uri).dispose()
    except Exception:
        pass
    return f"{db} was half-created by an earlier run (no runs in it); moved it to {aside.name} and started anew"


# MLflow retries an unreachable server for minutes by default (a 24 s run took 261 s, silent);
# tracking is optional here, so it gives up quickly, says so once, and training goes on.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
PROBE_SECONDS = 3.0


def probe_server(uri: str) -> str | None:
    """None when an http(s) tracking server accepts a connection within PROBE_SECONDS, else why not."""
    import socket
    import urllib.parse

    u = urllib.parse.urlparse(uri)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((u.hostname or "localhost", port), timeout=PROBE_SECONDS):
            return None
    except OSError as exc:
        return f"cannot reach the MLflow server at {u.scheme}://{u.hostname}:{port} ({exc.strerror or exc})"


def resolve_tracking_uri(paths: ProjectPaths, configured: str | None = None) -> str:
    """The configured URI, else MLFLOW_TRACKING_URI, else the project's SQLite file."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(paths)


def _param_value(value: Any) -> str:
    text, marker = str(value), "...[truncated]"
    return text if len(text) <= PARAM_MAX_CHARS else text[:PARAM_MAX_CHARS - len(marker)] + marker


class MlflowTracker:
    """One MLflow run. Every call is safe: a backend failure disables tracking with a warning."""

    def __init__(self, paths: ProjectPaths, experiment_name: str, tracking_uri: str | None = None):
        self.paths = paths
        self.uri = resolve_tracking_uri(paths, tracking_uri)
        self.experiment_name = experiment_name
        self.run_id: str | None = None
        self.failed: str | None = None
        self._client = None

    def _warn(self, exc: BaseException) -> None:
        if self.failed is None:
            self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"warning: MLflow tracking stopped ({self.failed[:200]}); training continues and "
                  "metrics are kept in the experiment's logs/metrics.jsonl", file=sys.stderr)

    @shield
    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str | None:
        try:
            from mlflow.entities import Param, RunTag
            from mlflow.tracking import MlflowClient

            if self.uri.startswith(("http://", "https://")):
                for k, v in _HTTP_DEFAULTS.items():
                    os.environ.setdefault(k, v)
                problem = probe_server(self.uri)
                if problem:
                    self._warn(ConnectionError(problem))
                    return None
            if self.uri.startswith("sqlite:///"):
                db = Path(self.uri[len("sqlite:///"):])
                db.parent.mkdir(parents=True, exist_ok=True)
                problem = check_sqlite_store(db)
                if problem:
                    print(f"warning: {problem}", file=sys.stderr)
                    if db.exists():  # not moved aside: leave the user's runs alone
                        self.failed = problem
                        return None
            self._client = MlflowClient(tracking_uri=self.uri)
            exp = self._client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                artifacts = None
                if self.uri == default_tracking_uri(self.paths):
                    artifacts = (self.paths.mlruns_dir / "artifacts").resolve().as_uri()
                exp_id = self._client.create_experiment(self.experiment_name, artifact_location=artifacts)
            else:
                exp_id = exp.experiment_id
            run = self._client.create_run(exp_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
            for i in range(0, len(items), 100):  # MLflow's log_batch limit is 100 params per call
                self._client.log_batch(self.run_id, params=items[i:i + 100])
            _ = RunTag  # imported for symmetry; tags go in create_run
            return self.run_id
        except Exception as exc:  # tracking must never stop training
            self._warn(exc)
            return self.run_id

    @shield
    def resume(self, run_id: str) -> str | None:
        """Continue an existing run (after --resume): mark it RUNNING again."""
        try:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
            self._client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
        except Exception as exc:
            self._warn(exc)
        return self.run_id

    @property
    def active(self) -> bool:
        return self.run_id is not None and self.failed is None

    @shield
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        try:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step)
                                                         for k, v in metrics.items()])
        except Exception as exc:
            self._warn(exc)

    @shield
    def log_metric_points(self, points: list[tuple]) -> None:
        """Log recorded metric points [(key, value, timestamp ms, step)] with their own times (a run
        recorded elsewhere and imported, as cluster tasks are)."""
        if not self.active:
            return
        try:
            from mlflow.entities import Metric

            items = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in points]
            for i in range(0, len(items), 1000):  # MLflow's log_batch limit is 1000 metrics per call
                self._client.log_batch(self.run_id, metrics=items[i:i + 1000])
        except Exception as exc:
            self._warn(exc)

    @shield
    def set_tags(self, tags: dict[str, str]) -> None:
        if not self.active:
            return
        try:
            for k, v in tags.items():
                self._client.set_tag(self.run_id, k, str(v))
        except Exception as exc:
            self._warn(exc)

    @shield
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        try:
            if Path(path).is_dir():
                self._client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self._client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as exc:
            self._warn(exc)

    @shield
    def end(self, status: str) -> None:
        """status: FINISHED | FAILED | KILLED."""
        if self.run_id is None or self._client is None:
            return
        try:
            self._client.set_terminated(self.run_id, status=status)
        except Exception as exc:
            self._warn(exc)


@shield
def log_to_runs(paths: ProjectPaths, tracking_uri: str | None, metrics_by_run: dict[str, dict[str, float]]) -> list[str]:
    """Add metrics to existing runs (e.g. an evaluation to each adapter's training run).

    Returns the run ids written to; a missing run or an unreachable store only warns.
    """
    written = []
    for run_id, metrics in metrics_by_run.items():
        try:
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=resolve_tracking_uri(paths, tracking_uri))
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
            written.append(run_id)
        except Exception as exc:  # a missing run or server must not fail the evaluation
            print(f"warning: could not log evaluation to MLflow run {run_id}: {type(exc).__name__}", file=sys.stderr)
    return written


@shield
def set_run_tags(paths: ProjectPaths, tracking_uri: str | None, run_id: str, tags: dict[str, str]) -> bool:
    """Add tags to an ended run (e.g. a sweep trial's outcome); a missing run or store only warns."""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=resolve_tracking_uri(paths, tracking_uri))
        for k, v in tags.items():
            client.set_tag(run_id, k, str(v))
        return True
    except Exception as exc:  # tracking must never stop the work it records
        print(f"warning: could not tag MLflow run {run_id}: {type(exc).__name__}", file=sys.stderr)
        return False
