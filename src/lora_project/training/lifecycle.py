"""One run lifecycle for every kind of training: single, batch, fused, sweep trials, the web board.

Order of effects, chosen so that a failure never loses earlier results:

1. the caller holds the adapter lock (:func:`adapter_lock`) and has refused an existing
   adapter without ``overwrite``;
2. entering :class:`Run` creates ``experiments/exp_NNN_<name>/`` with the resolved
   ``config.yaml`` (or reopens the folder of a resumed run);
3. the MLflow run is started inside the block that ends it, so whatever happens from here on
   (an exception, Ctrl-C or SIGTERM, even during the tracker's own start) the run ends
   FAILED or KILLED and ``results.json`` records the same status and the error;
4. :meth:`Run.finish` writes the adapter atomically with its :class:`AdapterMetadata`, the loss
   plot, ``results.json`` (FINISHED), logs the artifacts and ends the MLflow run FINISHED.

Ranks other than 0 of a data-parallel run use ``Run(..., write=False)``: they write nothing
and talk to no tracker, but go through the same code.
"""

from __future__ import annotations

import fcntl
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lora_project.config import RunConfig, flatten
from lora_project.errors import RunInterrupted, UserError
from lora_project.models.adapter import AdapterMetadata, now_iso
from lora_project.models.base_model import BaseBundle
from lora_project.models.scoring import results_metrics
from lora_project.paths import ProjectPaths
from lora_project.utils.io_utils import atomic_write_json, atomic_write_text
from lora_project.utils.plotting import save_figure
from lora_project.utils.provenance import git_commit, package_versions


def new_experiment_dir(paths: ProjectPaths, name: str) -> Path:
    """experiments/exp_NNN_<name>/ with NNN one above the highest existing number."""
    paths.experiments_dir.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(r"^exp_(\d+)_")
    while True:
        nums = [int(m.group(1)) for p in paths.experiments_dir.iterdir() if (m := pattern.match(p.name))]
        folder = paths.experiments_dir / f"exp_{max(nums, default=0) + 1:03d}_{name}"
        try:
            folder.mkdir()
        except FileExistsError:
            continue  # another run took this number
        (folder / "logs").mkdir()
        return folder


@contextmanager
def adapter_lock(paths: ProjectPaths, adapter_name: str):
    """Exclusive per-adapter lock: a second training of the same adapter stops at once.

    The lock file is removed on release. Removing a locked file is safe only with the inode
    check below: a process that opened the file just before it was unlinked would otherwise
    lock an orphan while a third process locks a new file of the same name.
    """
    paths.adapters_dir.mkdir(parents=True, exist_ok=True)
    lock_path = paths.adapters_dir / f".{adapter_name}_lora.lock"
    while True:
        fh = open(lock_path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise UserError(f"adapter '{adapter_name}' is being trained by another process "
                            f"(lock {lock_path})") from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        fh.close()  # we locked a file its previous holder had already removed: try again
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        try:
            os.unlink(lock_path)  # still holding the lock: nobody can be between open and flock on it
        except OSError:
            pass
        fh.close()


def provenance_of(paths: ProjectPaths, base: BaseBundle, dataset: str, streams) -> dict:
    """Where an adapter came from: base model, data, tokenizer, commit, package versions."""
    return {
        "base_model": {"name": base.ref.name, "kind": base.ref.kind, "fingerprint": base.ref.fingerprint,
                       "directory": str(base.ref.directory)},
        "dataset": {"name": dataset, "fingerprint": streams.fingerprint, "train_tokens": int(len(streams.train)),
                    "validation_tokens": int(len(streams.validation))},
        "tokenizer_fingerprint": base.tokenizer_fingerprint,
        "git_commit": git_commit(paths.root),
        "packages": package_versions(),
    }


def plot_loss_curve(history: list[dict], evals: list[dict], out: Path, title: str) -> Path | None:
    """Training and validation loss against step, saved as a PNG."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss")
    if evals:
        ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, out, dpi=110)


@dataclass
class Resumed:
    """Where a resumed run continues: its experiment folder and MLflow run."""
    experiment_dir: Path
    mlflow_run_id: str | None


@dataclass
class Outcome:
    """What a finished training produced, whichever loop produced it."""
    steps: int
    tokens_seen: int
    train_seconds: float
    final_train_loss: float
    history: list[dict]
    trainable_parameters: int


class Run:
    """The effects of one adapter's training on disk and in MLflow, as a context manager.

    ``with Run(...) as run:`` opens the experiment folder and the tracking run; the block trains
    and ends with ``run.finish(...)``. Leaving the block any other way records FAILED (an
    exception) or KILLED (Ctrl-C, SIGTERM) in ``results.json`` and in MLflow.
    """

    def __init__(self, paths: ProjectPaths, cfg: RunConfig, *, dataset: str, adapter_name: str,
                 base: BaseBundle, streams, use_mlflow: bool = True, parent_run_id: str | None = None,
                 resumed: Resumed | None = None, write: bool = True, tags: dict | None = None,
                 params: dict | None = None, kind: str = "single"):
        self.paths, self.cfg, self.dataset, self.adapter_name = paths, cfg, dataset, adapter_name
        self.base, self.streams = base, streams
        self.adapter_dir = paths.adapter(adapter_name)
        self.write = write
        self.resumed = resumed
        self.kind = kind
        self._use_mlflow = use_mlflow and cfg.tracking.mlflow and write
        self._parent_run_id = parent_run_id
        self._extra_tags, self._extra_params = dict(tags or {}), dict(params or {})
        self.tracker = None
        self.run_id: str | None = None
        self.status = "RUNNING"
        self.experiment_dir: Path = paths.experiments_dir / "(no output on this rank)"
        self.results: dict = {}
        self._wall0 = time.perf_counter()

    # -- opening -------------------------------------------------------------------------------
    def __enter__(self) -> Run:
        self._wall0 = time.perf_counter()
        if self.write:
            if self.resumed is not None:
                self.experiment_dir = self.resumed.experiment_dir
                (self.experiment_dir / "logs").mkdir(parents=True, exist_ok=True)
            else:
                self.experiment_dir = new_experiment_dir(self.paths, self.adapter_name)
                atomic_write_text(self.experiment_dir / "config.yaml", self.cfg.to_yaml())
        self.results = {"status": "RUNNING", "kind": self.kind, "dataset": self.dataset,
                        "adapter_name": self.adapter_name, "experiment_dir": str(self.experiment_dir),
                        "mlflow_run_id": None, "started": now_iso()}
        try:  # from here on, __exit__ owns the end state, even if the tracker's start is interrupted
            self.provenance = provenance_of(self.paths, self.base, self.dataset, self.streams)
            self.results.update(self.provenance)
            self._start_tracking()
        except BaseException:
            if not self.__exit__(*sys.exc_info()):
                raise
        return self

    def _start_tracking(self) -> None:
        if not self._use_mlflow:
            return
        from lora_project.utils.mlflow_utils import MlflowTracker

        runtime = self.base.runtime
        self.tracker = MlflowTracker(self.paths, self.cfg.tracking.experiment_name, self.cfg.tracking.tracking_uri)
        if self.resumed is not None and self.resumed.mlflow_run_id:
            self.run_id = self.tracker.resume(self.resumed.mlflow_run_id)
        else:
            params = flatten(self.cfg.to_dict())
            params.update({"dataset": self.dataset, "adapter_name": self.adapter_name, "run_kind": self.kind,
                           "runtime.precision": runtime.precision, "runtime.device": runtime.device,
                           "runtime.threads": runtime.threads, **self._extra_params})
            tags = {"git_commit": self.provenance["git_commit"] or "unknown", "dataset": self.dataset,
                    "dataset_fingerprint": self.streams.fingerprint, "base_model": self.base.ref.name,
                    "base_model_fingerprint": self.base.ref.fingerprint,
                    "experiment_dir": self.experiment_dir.name, "mlflow.runName": self.experiment_dir.name,
                    **self._extra_tags}
            if self._parent_run_id:
                tags["mlflow.parentRunId"] = self._parent_run_id  # nested under a batch or sweep run
            self.run_id = self.tracker.start(self.experiment_dir.name, params, tags)
        self.results["mlflow_run_id"] = self.run_id

    # -- during training -------------------------------------------------------------------------
    def callbacks(self, progress: bool, desc: str | None = None) -> list:
        """Progress bar, metrics.jsonl, progress.json and MLflow logging for this run (nothing on other ranks)."""
        from lora_project.training.callbacks import (
            JsonlLogger,
            MlflowCallback,
            ProgressBar,
            ProgressFile,
        )

        if not self.write:
            return []
        cbs = [ProgressBar(progress, desc=desc or f"train {self.adapter_name}"),
               JsonlLogger(self.experiment_dir / "logs" / "metrics.jsonl"),
               ProgressFile(self.experiment_dir / "logs" / "progress.json")]
        if self.tracker:
            cbs.append(MlflowCallback(self.tracker))
        return cbs

    def log_metrics(self, metrics: dict, step: int) -> None:
        if self.tracker:
            self.tracker.log_metrics(metrics, step=step)

    # -- ending ----------------------------------------------------------------------------------
    def finish(self, model, outcome: Outcome, before: dict, after: dict, evals: list[dict], *,
               peft_adapter: str | None = None, overwrite: bool = False, extra_results: dict | None = None,
               extra_metadata: dict | None = None, plot_title: str | None = None) -> dict:
        """Save the adapter and every record of a successful run; returns results.json's content."""
        from lora_project.models.lora_model import save_adapter
        from lora_project.utils.device import peak_rss_mb

        if not self.write:  # another rank of a data-parallel run: rank 0 records everything
            self.status = "FINISHED"
            return self.results
        runtime = self.base.runtime
        wall = time.perf_counter() - self._wall0
        self.results.update({
            "metrics_before": results_metrics(before), "metrics_after": results_metrics(after),
            "steps": outcome.steps, "tokens_seen": outcome.tokens_seen,
            "tokens_per_second": outcome.tokens_seen / max(outcome.train_seconds, 1e-9),
            "train_seconds": outcome.train_seconds, "wall_seconds": wall, "peak_rss_mb": peak_rss_mb(),
            "final_train_loss": outcome.final_train_loss, "trainable_parameters": outcome.trainable_parameters,
            "runtime": {"device": runtime.device, "precision": runtime.precision, "threads": runtime.threads},
            "adapter_dir": str(self.adapter_dir), "evals": evals, **(extra_results or {})})
        if runtime.device == "cuda":
            import torch

            self.results["peak_cuda_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        metadata = AdapterMetadata(
            adapter_name=self.adapter_name, **self.provenance, config=self.cfg.to_dict(),
            final_metrics={"before": self.results["metrics_before"], "after": self.results["metrics_after"]},
            mlflow_run_id=self.run_id, experiment_dir=str(self.experiment_dir), created=now_iso(),
            origin="trained", extra=dict(extra_metadata or {}))
        save_adapter(model, self.adapter_dir, metadata, overwrite=overwrite, adapter_name=peft_adapter)
        png = plot_loss_curve(outcome.history, evals[1:], self.experiment_dir / "loss_curve.png",
                              plot_title or f"{self.adapter_name}: {self.base.ref.name}")
        self.status = "FINISHED"
        self.results.update(status="FINISHED", finished=now_iso())
        atomic_write_json(self.experiment_dir / "results.json", self.results)
        if self.tracker:
            self.tracker.log_metrics({"tokens_per_second": self.results["tokens_per_second"],
                                      "peak_rss_mb": self.results["peak_rss_mb"], "wall_seconds": wall},
                                     outcome.steps)
            for f in ("config.yaml", "results.json"):
                self.tracker.log_artifact(self.experiment_dir / f)
            if png:
                self.tracker.log_artifact(png)
            self.tracker.log_artifact(self.adapter_dir, "adapter")
            if self.tracker.failed:
                self.results["mlflow_warning"] = self.tracker.failed
            self.tracker.end("FINISHED")
        return self.results

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.status == "FINISHED":
            return False
        if exc_type is None:
            self.status, error = "FAILED", "the run ended without saving an adapter"
        elif issubclass(exc_type, (KeyboardInterrupt, RunInterrupted)):
            from lora_project.utils import interrupts

            interrupts.acknowledge()  # the clean-up below must not be interrupted by the same stop
            self.status, error = "KILLED", "interrupted"
        else:
            self.status, error = "FAILED", f"{exc_type.__name__}: {exc}"[:2000]
        self.results.update(status=self.status, error=error, finished=now_iso())
        if self.tracker and self.tracker.run_id:  # also when the stop landed as the run was created
            self.run_id = self.results["mlflow_run_id"] = self.tracker.run_id
        if self.write:
            try:
                atomic_write_json(self.experiment_dir / "results.json", self.results)
            except OSError as err:
                print(f"warning: could not write {self.experiment_dir}/results.json: {err}", file=sys.stderr)
        if self.tracker:
            self.tracker.end(self.status)
        return False
