"""`train NAME`: prepare data, load the base, train one adapter, record everything.

The recipe: refuse what cannot work (existing adapter, lock held, bad targets, unresumable
checkpoint) before anything is written; prepare the data; load the base; then train inside one
:class:`~lora_project.training.lifecycle.Run`, which owns the experiment folder, the MLflow run,
``results.json`` and the adapter with its metadata (see lifecycle.py for the order of effects).
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from lora_project.config import RunConfig, flatten
from lora_project.errors import RunInterrupted, UserError, first_of
from lora_project.models.base_model import BaseBundle, load_base, resolve_model
from lora_project.models.scoring import validation_metrics
from lora_project.paths import ProjectPaths, check_name
from lora_project.training.lifecycle import Outcome, Resumed, Run, adapter_lock


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


@dataclass
class _ResumePoint:
    """A checkpoint to continue: the run it belongs to and the saved state."""
    resumed: Resumed
    checkpoint: tuple  # (info, weights, tensors) as load_checkpoint returns them


def _resume_point(paths: ProjectPaths, adapter_name: str, dataset: str, cfg: RunConfig) -> _ResumePoint:
    """The newest checkpoint of this adapter, refused when its config or dataset differ."""
    from lora_project.training.checkpoint import load_checkpoint

    exp_dir, ckpt_path = find_resume_checkpoint(paths, adapter_name)
    ckpt = load_checkpoint(ckpt_path)
    saved_cfg = ckpt[0].get("config_fields", {})
    # a field added since the checkpoint was written counts at its default (the behaviour it had then)
    saved_cfg = {**{k: v for k, v in config_fingerprint_fields(RunConfig()).items() if k not in saved_cfg}, **saved_cfg}
    now_cfg = config_fingerprint_fields(cfg)
    differ = sorted(k for k in set(saved_cfg) | set(now_cfg) if saved_cfg.get(k) != now_cfg.get(k))
    if differ:
        raise UserError(f"cannot resume {ckpt_path}: it was made with a different config "
                        f"({first_of([f'{k}: {saved_cfg.get(k)!r} -> {now_cfg.get(k)!r}' for k in differ], 5)})")
    if ckpt[0].get("dataset_name") != dataset:
        raise UserError(f"cannot resume {ckpt_path}: it trained on dataset "
                        f"'{ckpt[0].get('dataset_name')}', not '{dataset}'")
    return _ResumePoint(Resumed(exp_dir, ckpt[0].get("mlflow_run_id")), ckpt)


def _check_resume_inputs(point: _ResumePoint, base: BaseBundle, dataset: str, streams) -> None:
    info = point.checkpoint[0]
    if info.get("base_fingerprint") != base.ref.fingerprint:
        raise UserError(f"cannot resume: the checkpoint was made on base model {info.get('base_name')} "
                        f"({str(info.get('base_fingerprint'))[:12]}), not on {base.ref.name} "
                        f"({base.ref.fingerprint[:12]})")
    if info.get("dataset_fingerprint") != streams.fingerprint:
        raise UserError(f"cannot resume: dataset '{dataset}' changed since the checkpoint "
                        "(its fingerprint differs); train again without --resume")


def _keep_best(best, model, fit, after: dict, run: Run, log) -> tuple[dict, dict]:
    """With keep_best, put the best evaluation's weights back; returns (metrics of the adapter that
    is saved, extra results.json fields). The best one's metrics were measured on exactly those
    weights, so they are not scored again."""
    from lora_project.models.scoring import results_metrics

    extra = {"stop_reason": fit.stop_reason}
    if best is None:
        return after, extra
    best.consider(fit.steps, after, model)
    record = best.record(fit.steps)
    if record["kept"] == "best":
        best.restore(model)
        log(f"keeping the adapter of step {best.best_step} (validation perplexity "
            f"{best.best_metrics['val_perplexity']:.3f}), the lowest validation loss")
        extra["metrics_last_step"] = results_metrics(after)
        after = best.best_metrics
    extra["best"] = record
    run.log_metrics({"best_step": float(record["best_step"]), "best_val_loss": record["best_val_loss"]},
                    step=fit.steps)
    if run.tracker:
        run.tracker.set_tags({"kept_checkpoint": record["kept"], "stop_reason": fit.stop_reason or "max_steps"})
    return after, extra


def train_adapter(paths: ProjectPaths, dataset: str, cfg: RunConfig, *, adapter_name: str | None = None,
                  overwrite: bool = False, use_mlflow: bool = True, progress: bool = True,
                  base: BaseBundle | None = None, resume: bool = False, parent_run_id: str | None = None,
                  log=print, run_kind: str = "single", tags: dict | None = None, params: dict | None = None,
                  extra_callbacks: list | None = None) -> dict:
    """Train one adapter on one catalog dataset; returns the results.json content.

    With `resume`, continue the newest checkpoint of this adapter in the same experiment
    folder and MLflow run; refused when the config, base model or data differ.
    `extra_callbacks` observe the loop after the run's own (a sweep's pruning callback).
    """
    import torch

    from lora_project.data.dataset_loader import load_streams, prepare_dataset
    from lora_project.models.lora_model import (
        check_before_loading,
        resolved_config,
        wrap_with_lora,
    )
    from lora_project.models.scoring import describe_validation, tokenize_split
    from lora_project.training.checkpoint import CheckpointCallback
    from lora_project.training.checkpoint import restore as restore_checkpoint
    from lora_project.training.distributed import dist_info, init_distributed
    from lora_project.training.trainer import BlockLoader, LoraTrainer

    adapter_name = check_name(adapter_name or dataset, "adapter name")
    if paths.adapter(adapter_name).exists() and not overwrite:
        raise UserError(f"adapter {paths.adapter(adapter_name)} already exists; pass --overwrite to replace it")
    t = cfg.training
    device = "cuda" if t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available()) else "cpu"
    if t.early_stopping_patience and dist_info().enabled:
        raise UserError("training.early_stopping_patience is not supported with several processes yet "
                        "(only rank 0 evaluates); set it to null or train in one process")
    dist = init_distributed(device, t.batch_size)
    main = dist.is_main  # only rank 0 writes files and talks to MLflow
    if not main:
        log = lambda m: None  # noqa: E731
        progress = False
    with adapter_lock(paths, adapter_name) if main else nullcontext():
        point = _resume_point(paths, adapter_name, dataset, cfg) if resume else None
        # A missing or unusable model, or targets it does not have, fail before any data is written.
        ref = base.ref if base else resolve_model(cfg.model.source, cfg.model.revision)
        check_before_loading(ref, cfg.lora, t, "fp32" if t.precision == "auto" else t.precision)
        prepared = prepare_dataset(paths, dataset)
        log(f"dataset '{dataset}': {'unchanged' if prepared.skipped else 'prepared'} "
            f"({prepared.stats['splits']['train']['documents']} train / "
            f"{prepared.stats['splits']['validation']['documents']} validation documents)")
        base = base or load_base(cfg)
        runtime = base.runtime
        log(f"base model: {base.ref.name} on {runtime.device} ({runtime.precision}, "
            f"{runtime.threads} threads), loaded in {base.load_seconds:.1f} s")
        # Before any folder or run exists; 'auto'/'all-linear' become the model's module names, which the
        # experiment's config.yaml and the adapter's metadata record (checkpoints compare what was asked).
        asked, cfg = cfg, resolved_config(cfg, base.model)
        streams = load_streams(paths, prepared, base.tokenizer, base.tokenizer_fingerprint)
        if point is not None:
            _check_resume_inputs(point, base, dataset, streams)
            log(f"resuming {point.resumed.experiment_dir.name} from step {point.checkpoint[0]['step']}")
        loader = BlockLoader(streams.train, t.seq_len, t.batch_size, t.seed)
        model = None
        try:
            with Run(paths, cfg, dataset=dataset, adapter_name=adapter_name, base=base, streams=streams,
                     use_mlflow=use_mlflow, parent_run_id=parent_run_id, write=main, kind=run_kind,
                     resumed=point.resumed if point else None, tags=tags, params=params) as run:
                model = wrap_with_lora(base.model, cfg.lora, t.seed)
                val_docs = tokenize_split(base.tokenizer, streams.validation_docs, streams.separator, t.eval_max_tokens)

                def evaluate() -> dict:
                    return validation_metrics(model, base.tokenizer, val_docs, streams.separator, runtime)

                if point is not None:
                    before, evals = point.checkpoint[0]["metrics_before"], point.checkpoint[0]["evals"]
                elif main:
                    with model.disable_adapter():
                        before = evaluate()
                    evals = [{"step": 0, **before}]
                    run.log_metrics(before, step=0)
                else:
                    before, evals = {}, []
                if main:
                    log(f"validation perplexity before training: {describe_validation(before)}"
                        + (f"; {dist.world_size} processes, data parallel" if dist.enabled else ""))
                callbacks = run.callbacks(progress) + list(extra_callbacks or [])
                best = None
                if main and (t.keep_best or t.early_stopping_patience):
                    from lora_project.training.callbacks import BestCheckpoint

                    best = BestCheckpoint(t.keep_best, t.early_stopping_patience)
                    callbacks.append(best)
                checkpointer = None
                if main:  # checkpoints every checkpoint_interval steps, and always on interruption
                    checkpointer = CheckpointCallback(
                        paths.checkpoints_dir / run.experiment_dir.name, t.checkpoint_interval, t.keep_checkpoints,
                        meta={"config_fields": config_fingerprint_fields(asked), "dataset_name": dataset,
                              "dataset_fingerprint": streams.fingerprint, "base_fingerprint": base.ref.fingerprint,
                              "base_name": base.ref.name, "mlflow_run_id": run.run_id, "metrics_before": before,
                              "evals": evals})
                    callbacks.append(checkpointer)

                def periodic_eval():
                    m = evaluate()
                    evals.append({"step": trainer.state.step, **m})
                    return m

                trainer = LoraTrainer(model, t, loader, runtime, callbacks, eval_fn=periodic_eval if main else None,
                                      dist=dist)
                if point is not None:
                    restore_checkpoint(trainer, *point.checkpoint)
                try:
                    fit = trainer.fit()
                except (KeyboardInterrupt, RunInterrupted) as exc:
                    if checkpointer is not None:  # the cli prints it after "error: interrupted"
                        exc.hint = checkpointer.resume_hint(dataset, adapter_name)
                    raise
                outcome = Outcome(fit.steps, fit.tokens_seen, fit.train_seconds, fit.final_loss,
                                  trainer.state.history, sum(p.numel() for p in trainer.params))
                if not main:
                    run.finish(model, outcome, before, {}, evals)
                    return {"status": "FINISHED", "rank": dist.rank, "steps": fit.steps,
                            "final_train_loss": fit.final_loss}
                after = evaluate()
                evals.append({"step": fit.steps, **after})
                run.log_metrics(after, step=fit.steps)
                if fit.stop_reason:
                    log(f"stopped at step {fit.steps} of {trainer.max_steps}: {fit.stop_reason}")
                log(f"validation perplexity after training: {describe_validation(after)}")
                after, extra = _keep_best(best, model, fit, after, run, log)
                return run.finish(model, outcome, before, after, evals, overwrite=overwrite, extra_results=extra)
        finally:
            # Unwrap so that a caller reusing `base` (batch training, sweeps) gets the plain model back.
            if model is not None and hasattr(model, "unload"):
                base.model = model.unload()
