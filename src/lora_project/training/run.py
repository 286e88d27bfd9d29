"""`train NAME`: prepare data, load the base, train one adapter, record everything.

Order of effects on disk, chosen so that a failure never loses earlier results:
1. refuse at once if the adapter exists (without --overwrite) or is locked by another run;
2. create ``experiments/exp_NNN_<name>/`` with the resolved ``config.yaml``;
3. train; on success write the adapter atomically, then ``results.json``;
4. on failure write ``results.json`` with the status and error, end the MLflow run as
   FAILED (exception) or KILLED (Ctrl-C / SIGTERM), and leave any earlier adapter untouched.
"""

from __future__ import annotations

import fcntl
import os
import re
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from lora_project.config import RunConfig, flatten
from lora_project.errors import RunInterrupted, UserError
from lora_project.models.adapter import AdapterMetadata, now_iso
from lora_project.models.base_model import BaseBundle, load_base
from lora_project.models.scoring import results_metrics, validation_metrics
from lora_project.paths import ProjectPaths, check_name
from lora_project.utils.io_utils import atomic_write_json, atomic_write_text
from lora_project.utils.provenance import git_commit, package_versions


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
    """Exclusive per-adapter lock: a second training of the same adapter stops at once."""
    paths.adapters_dir.mkdir(parents=True, exist_ok=True)
    lock_path = paths.adapters_dir / f".{adapter_name}_lora.lock"
    fh = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"adapter '{adapter_name}' is being trained by another process "
                            f"(lock {lock_path})") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        fh.close()


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
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def config_fingerprint_fields(cfg: RunConfig) -> dict:
    """The settings that must be identical for a checkpoint to be resumed (tracking may differ)."""
    d = cfg.to_dict()
    d.pop("tracking", None)
    return flatten(d)


def find_resume_checkpoint(paths: ProjectPaths, adapter_name: str) -> tuple[Path, Path]:
    """(experiment folder, latest checkpoint) of the newest experiment of this adapter with one."""
    from lora_project.training.checkpoint import list_checkpoints

    pattern = re.compile(rf"^exp_(\d+)_{re.escape(adapter_name)}$")
    runs = sorted(((int(m.group(1)), p) for p in paths.checkpoints_dir.glob("exp_*")
                   if (m := pattern.match(p.name))), reverse=True) if paths.checkpoints_dir.is_dir() else []
    for _, folder in runs:
        ckpts = list_checkpoints(folder, recover=True)  # called under the adapter lock
        if ckpts:
            return paths.experiments_dir / folder.name, ckpts[-1]
    raise UserError(f"no checkpoint to resume for adapter '{adapter_name}' under {paths.checkpoints_dir}; "
                    "checkpoints are written every training.checkpoint_interval steps and on interruption")


def train_adapter(paths: ProjectPaths, dataset: str, cfg: RunConfig, *, adapter_name: str | None = None,
                  overwrite: bool = False, use_mlflow: bool = True, progress: bool = True,
                  base: BaseBundle | None = None, resume: bool = False, parent_run_id: str | None = None,
                  log=print) -> dict:
    """Train one adapter on one catalog dataset; returns the results.json content.

    With `resume`, continue the newest checkpoint of this adapter in the same experiment
    folder and MLflow run; refused when the config, base model or data differ.
    """
    from contextlib import nullcontext

    import torch

    from lora_project.data.dataset_loader import load_streams, prepare_dataset
    from lora_project.models.lora_model import save_adapter, wrap_with_lora
    from lora_project.models.scoring import limit_documents
    from lora_project.training.callbacks import JsonlLogger, MlflowCallback, ProgressBar
    from lora_project.training.checkpoint import CheckpointCallback, load_checkpoint
    from lora_project.training.checkpoint import restore as restore_checkpoint
    from lora_project.training.distributed import init_distributed
    from lora_project.training.trainer import BlockLoader, LoraTrainer, peak_rss_mb
    from lora_project.utils.mlflow_utils import MlflowTracker

    adapter_name = check_name(adapter_name or dataset, "adapter name")
    adapter_dir = paths.adapter(adapter_name)
    if adapter_dir.exists() and not overwrite:
        raise UserError(f"adapter {adapter_dir} already exists; pass --overwrite to replace it")
    t = cfg.training
    device = "cuda" if t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available()) else "cpu"
    dist = init_distributed(device, t.batch_size)
    main = dist.is_main  # only rank 0 writes files and talks to MLflow
    if not main:
        log = lambda m: None  # noqa: E731
        progress = False
    with adapter_lock(paths, adapter_name) if main else nullcontext():
        ckpt = None
        if resume:
            resume_exp, ckpt_path = find_resume_checkpoint(paths, adapter_name)
            ckpt = load_checkpoint(ckpt_path)
            saved_cfg = ckpt[0].get("config_fields", {})
            now_cfg = config_fingerprint_fields(cfg)
            differ = sorted(k for k in set(saved_cfg) | set(now_cfg) if saved_cfg.get(k) != now_cfg.get(k))
            if differ:
                raise UserError(f"cannot resume {ckpt_path}: it was made with a different config "
                                f"({', '.join(f'{k}: {saved_cfg.get(k)!r} -> {now_cfg.get(k)!r}' for k in differ[:5])})")
            if ckpt[0].get("dataset_name") != dataset:
                raise UserError(f"cannot resume {ckpt_path}: it trained on dataset "
                                f"'{ckpt[0].get('dataset_name')}', not '{dataset}'")
        if base is None:  # a missing or unusable model fails before any data is written
            from lora_project.models.base_model import resolve_model

            resolve_model(cfg.model.source, cfg.model.revision)
        prepared = prepare_dataset(paths, dataset)
        log(f"dataset '{dataset}': {'unchanged' if prepared.skipped else 'prepared'} "
            f"({prepared.stats['splits']['train']['documents']} train / "
            f"{prepared.stats['splits']['validation']['documents']} validation documents)")
        base = base or load_base(cfg)
        runtime = base.runtime
        log(f"base model: {base.ref.name} on {runtime.device} ({runtime.precision}, "
            f"{runtime.threads} threads), loaded in {base.load_seconds:.1f} s")
        streams = load_streams(paths, prepared, base.tokenizer, base.tokenizer_fingerprint)
        loader = BlockLoader(streams.train, t.seq_len, t.batch_size, t.seed)

        if ckpt is not None:
            info = ckpt[0]
            if info.get("base_fingerprint") != base.ref.fingerprint:
                raise UserError(f"cannot resume: the checkpoint was made on base model {info.get('base_name')} "
                                f"({str(info.get('base_fingerprint'))[:12]}), not on {base.ref.name} "
                                f"({base.ref.fingerprint[:12]})")
            if info.get("dataset_fingerprint") != streams.fingerprint:
                raise UserError(f"cannot resume: dataset '{dataset}' changed since the checkpoint "
                                "(its fingerprint differs); train again without --resume")
            exp_dir = resume_exp
            if main:
                (exp_dir / "logs").mkdir(parents=True, exist_ok=True)
            log(f"resuming {exp_dir.name} from step {info['step']}")
        elif main:
            exp_dir = new_experiment_dir(paths, adapter_name)
            atomic_write_text(exp_dir / "config.yaml", cfg.to_yaml())
        else:
            exp_dir = paths.experiments_dir / f"(rank {dist.rank}: no output)"
        provenance = provenance_of(paths, base, dataset, streams)
        commit = provenance["git_commit"]
        tracker = MlflowTracker(paths, cfg.tracking.experiment_name, cfg.tracking.tracking_uri) \
            if use_mlflow and cfg.tracking.mlflow and main else None
        run_id = None
        if tracker:
            params = flatten(cfg.to_dict())
            params.update({"dataset": dataset, "adapter_name": adapter_name,
                           "runtime.precision": runtime.precision, "runtime.device": runtime.device,
                           "runtime.threads": runtime.threads})
            tags = {"git_commit": commit or "unknown", "dataset": dataset,
                    "dataset_fingerprint": streams.fingerprint, "base_model": base.ref.name,
                    "base_model_fingerprint": base.ref.fingerprint, "experiment_dir": exp_dir.name,
                    "mlflow.runName": exp_dir.name}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id  # nested under a train-batch run
            if ckpt is not None and ckpt[0].get("mlflow_run_id"):
                run_id = tracker.resume(ckpt[0]["mlflow_run_id"])
            else:
                run_id = tracker.start(exp_dir.name, params, tags)
        results: dict = {"status": "RUNNING", "dataset": dataset, "adapter_name": adapter_name,
                         "experiment_dir": str(exp_dir), "mlflow_run_id": run_id,
                         "started": datetime.now(timezone.utc).isoformat(), **provenance}
        wall0 = time.perf_counter()
        status = "FAILED"
        try:
            model = wrap_with_lora(base.model, cfg.lora, t.seed)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            val_docs = limit_documents(base.tokenizer, streams.validation_docs, t.eval_max_tokens)

            def evaluate() -> dict:
                return validation_metrics(model, base.tokenizer, val_docs, streams.separator, runtime, t.seq_len)

            if ckpt is not None:
                before = ckpt[0]["metrics_before"]
                evals = ckpt[0]["evals"]
            elif main:
                with model.disable_adapter():
                    before = evaluate()
                evals = [{"step": 0, **before}]
            else:
                before, evals = {}, []
            if main:
                log(f"validation perplexity before training: {before['val_perplexity']:.3f}"
                    + (f"; {dist.world_size} processes, data parallel" if dist.enabled else ""))
            callbacks, eval_cb = [], []  # other ranks observe nothing and write nothing
            if main:
                callbacks = [ProgressBar(progress, desc=f"train {adapter_name}"),
                             JsonlLogger(exp_dir / "logs" / "metrics.jsonl")]
                if tracker:
                    callbacks.append(MlflowCallback(tracker))
                    if ckpt is None:
                        tracker.log_metrics(before, step=0)
                # Checkpoints: every checkpoint_interval steps, and always on interruption.
                checkpointer = CheckpointCallback(
                    paths.checkpoints_dir / exp_dir.name, t.checkpoint_interval, t.keep_checkpoints,
                    meta={"config_fields": config_fingerprint_fields(cfg), "dataset_name": dataset,
                          "dataset_fingerprint": streams.fingerprint, "base_fingerprint": base.ref.fingerprint,
                          "base_name": base.ref.name, "mlflow_run_id": run_id, "metrics_before": before,
                          "evals": evals})
                eval_cb = [checkpointer]

            def periodic_eval():
                m = evaluate()
                evals.append({"step": trainer.state.step, **m})
                return m

            trainer = LoraTrainer(model, t, loader, runtime, callbacks + eval_cb,
                                  eval_fn=periodic_eval if main else None, dist=dist)
            if ckpt is not None:
                restore_checkpoint(trainer, *ckpt)
            fit = trainer.fit()
            if not main:
                status = "FINISHED"
                return {"status": status, "rank": dist.rank, "steps": fit.steps, "final_train_loss": fit.final_loss}
            after = evaluate()
            evals.append({"step": fit.steps, **after})
            if tracker:
                tracker.log_metrics(after, step=fit.steps)
            log(f"validation perplexity after training: {after['val_perplexity']:.3f}")
            wall = time.perf_counter() - wall0

            results.update({
                "metrics_before": results_metrics(before), "metrics_after": results_metrics(after),
                "steps": fit.steps, "tokens_seen": fit.tokens_seen,
                "tokens_per_second": fit.tokens_per_second, "train_seconds": fit.train_seconds,
                "wall_seconds": wall, "peak_rss_mb": peak_rss_mb(), "final_train_loss": fit.final_loss,
                "trainable_parameters": trainable, "runtime": {"device": runtime.device,
                                                               "precision": runtime.precision,
                                                               "threads": runtime.threads},
                "adapter_dir": str(adapter_dir), "evals": evals})
            if runtime.device == "cuda":
                import torch

                results["peak_cuda_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
            metadata = AdapterMetadata(adapter_name=adapter_name, **provenance, config=cfg.to_dict(),
                                       final_metrics={"before": results["metrics_before"],
                                                      "after": results["metrics_after"]},
                                       mlflow_run_id=run_id, experiment_dir=str(exp_dir), created=now_iso(),
                                       origin="trained")
            save_adapter(model, adapter_dir, metadata, overwrite=overwrite)
            png = plot_loss_curve(trainer.state.history, evals[1:-1] + [evals[-1]], exp_dir / "loss_curve.png",
                                  f"{adapter_name}: {base.ref.name}")
            status = "FINISHED"
            results["status"] = status
            results["finished"] = datetime.now(timezone.utc).isoformat()
            atomic_write_json(exp_dir / "results.json", results)
            if tracker:
                tracker.log_metrics({"tokens_per_second": fit.tokens_per_second,
                                     "peak_rss_mb": results["peak_rss_mb"], "wall_seconds": wall}, fit.steps)
                tracker.log_artifact(exp_dir / "config.yaml")
                tracker.log_artifact(exp_dir / "results.json")
                if png:
                    tracker.log_artifact(png)
                tracker.log_artifact(adapter_dir, "adapter")
                if tracker.failed:
                    results["mlflow_warning"] = tracker.failed
            return results
        except (KeyboardInterrupt, RunInterrupted):
            status = "KILLED"
            results.update(status=status, error="interrupted")
            raise
        except BaseException as exc:
            results.update(status="FAILED", error=f"{type(exc).__name__}: {exc}"[:2000])
            raise
        finally:
            if status != "FINISHED" and main:
                try:
                    atomic_write_json(exp_dir / "results.json", results)
                except OSError as exc:
                    print(f"warning: could not write {exp_dir}/results.json: {exc}", file=sys.stderr)
            if tracker:
                tracker.end(status)
            # Unwrap so that a caller reusing `base` (batch training) gets the plain model back.
            if "model" in locals() and hasattr(model, "unload"):
                base.model = model.unload()
