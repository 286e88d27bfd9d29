"""One training run (`train NAME`): prepare data, load the base, train one adapter, record everything.

The recipe, `train_adapter`: preflight (refuse what cannot work: existing adapter, lock held,
bad targets, unresumable checkpoint, before anything is written); load the inputs (data, base,
token streams); then inside one :class:`~lora_project.training.lifecycle.Run`, which owns the
experiment folder, the MLflow run, ``results.json`` and the adapter with its metadata (see
lifecycle.py for the order of effects): build the callbacks, train, finish. How the run is
carried out and recorded is one `RunOptions` (training/options.py), whoever starts it.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

from lora_project.config import RunConfig, recipe_fields
from lora_project.errors import RunInterrupted, UserError, first_of
from lora_project.models.base_model import BaseBundle, load_base, resolve_model
from lora_project.models.scoring import validation_metrics
from lora_project.paths import ProjectPaths, check_name
from lora_project.training.lifecycle import Outcome, Resumed, Run, adapter_lock
from lora_project.training.options import RunOptions


def config_fingerprint_fields(cfg: RunConfig) -> dict:
    """The settings that must be identical for a checkpoint to be resumed (tracking and cluster may differ)."""
    return recipe_fields(cfg)


def find_resume_checkpoint(paths: ProjectPaths, adapter_name: str, recover: bool = True) -> tuple[Path, Path]:
    """(experiment folder, latest checkpoint) of the newest experiment of this adapter with one.
    `recover` (only under the adapter's lock) first puts back a checkpoint whose overwrite was killed."""
    from lora_project.training.checkpoint import list_checkpoints

    pattern = re.compile(rf"^exp_(\d+)_{re.escape(adapter_name)}$")
    runs = sorted(((int(m.group(1)), p) for p in paths.checkpoints_dir.glob("exp_*")
                   if (m := pattern.match(p.name))), reverse=True) if paths.checkpoints_dir.is_dir() else []
    for _, folder in runs:
        ckpts = list_checkpoints(folder, recover=recover)
        if ckpts:
            return paths.experiments_dir / folder.name, ckpts[-1]
    raise UserError(f"no checkpoint to resume for adapter '{adapter_name}' under {paths.checkpoints_dir}; "
                    "checkpoints are written every training.checkpoint_interval steps and on interruption")


def has_checkpoint(paths: ProjectPaths, adapter_name: str) -> bool:
    """Whether `adapter_name` has a checkpoint that `--resume` would continue (train-batch --resume resumes
    an adapter that has one and trains one that has none from step 0)."""
    try:
        find_resume_checkpoint(paths, adapter_name, recover=False)
    except UserError:
        return False
    return True


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


@dataclass
class _Job:
    """Who runs what: fixed by the preflight, read by every step."""
    paths: ProjectPaths
    dataset: str
    adapter_name: str
    opts: RunOptions
    dist: object  # DistInfo: this process's rank; only rank 0 (`main`) writes files and talks to MLflow

    @property
    def main(self) -> bool:
        return self.dist.is_main


@dataclass
class _Inputs:
    """What a run trains from, loaded under the adapter lock before any folder or run exists."""
    cfg: RunConfig  # 'auto'/'all-linear' resolved to the model's module names (what is recorded)
    asked: RunConfig  # as given (checkpoints compare what was asked)
    base: BaseBundle
    streams: object
    loader: object
    point: _ResumePoint | None


@dataclass
class _Validation:
    """The validation split scored on the adapter being trained; `evals` lists every evaluation with its step."""
    model: object
    tokenizer: object
    docs: list
    separator: str
    runtime: object
    before: dict = field(default_factory=dict)
    evals: list = field(default_factory=list)
    trainer: object = None  # set once the trainer exists: periodic evaluations read its step

    def metrics(self) -> dict:
        return validation_metrics(self.model, self.tokenizer, self.docs, self.separator, self.runtime)

    def periodic(self) -> dict:
        """One evaluation during training (the trainer's eval_fn), recorded at the current step."""
        m = self.metrics()
        self.evals.append({"step": self.trainer.state.step, **m})
        return m


def _silent(message: str) -> None:
    """The log of a torchrun worker: only rank 0 reports."""


def _preflight(paths: ProjectPaths, dataset: str, cfg: RunConfig, opts: RunOptions) -> _Job:
    """What can be refused before the lock is taken; joins the process group under torchrun."""
    import torch

    from lora_project.training.distributed import dist_info, init_distributed

    adapter_name = check_name(opts.adapter_name or dataset, "adapter name")
    if paths.adapter(adapter_name).exists() and not opts.overwrite:
        raise UserError(f"adapter {paths.adapter(adapter_name)} already exists; pass --overwrite to replace it")
    t = cfg.training
    device = "cuda" if t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available()) else "cpu"
    if t.early_stopping_patience and dist_info().enabled:
        raise UserError("training.early_stopping_patience is not supported with several processes yet "
                        "(only rank 0 evaluates); set it to null or train in one process")
    dist = init_distributed(device, t.batch_size)
    if not dist.is_main:  # only rank 0 reports
        opts = replace(opts, log=_silent, progress=False)
    return _Job(paths, dataset, adapter_name, opts, dist)


def _load_inputs(job: _Job, cfg: RunConfig, base: BaseBundle | None) -> _Inputs:
    """Resume point, checks on the model, prepared data, the base (loaded unless given), token streams."""
    from lora_project.data.dataset_loader import load_streams, prepare_dataset
    from lora_project.models.lora_model import check_before_loading, resolved_config
    from lora_project.training.trainer import BlockLoader

    paths, dataset, log, t = job.paths, job.dataset, job.opts.log, cfg.training
    point = _resume_point(paths, job.adapter_name, dataset, cfg) if job.opts.resume else None
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
    resolved = resolved_config(cfg, base.model)
    streams = load_streams(paths, prepared, base.tokenizer, base.tokenizer_fingerprint)
    if point is not None:
        _check_resume_inputs(point, base, dataset, streams)
        log(f"resuming {point.resumed.experiment_dir.name} from step {point.checkpoint[0]['step']}")
    loader = BlockLoader(streams.train, t.seq_len, t.batch_size, t.seed)
    return _Inputs(resolved, cfg, base, streams, loader, point)


def _open_run(job: _Job, inputs: _Inputs) -> Run:
    opts = job.opts
    return Run(job.paths, inputs.cfg, dataset=job.dataset, adapter_name=job.adapter_name, base=inputs.base,
               streams=inputs.streams, use_mlflow=opts.use_mlflow, parent_run_id=opts.parent_run_id, write=job.main,
               kind=opts.run_kind, resumed=inputs.point.resumed if inputs.point else None, tags=dict(opts.tags),
               params=dict(opts.params))


def _validation(job: _Job, model, inputs: _Inputs, run: Run) -> _Validation:
    """The validation split, and the metrics before training (from the checkpoint when resuming)."""
    from lora_project.models.scoring import describe_validation, tokenize_split

    base, streams = inputs.base, inputs.streams
    docs = tokenize_split(base.tokenizer, streams.validation_docs, streams.separator, inputs.cfg.training.eval_max_tokens)
    val = _Validation(model, base.tokenizer, docs, streams.separator, base.runtime)
    if inputs.point is not None:
        val.before, val.evals = inputs.point.checkpoint[0]["metrics_before"], inputs.point.checkpoint[0]["evals"]
    elif job.main:
        with model.disable_adapter():
            val.before = val.metrics()
        val.evals = [{"step": 0, **val.before}]
        run.log_metrics(val.before, step=0)
    if job.main:
        job.opts.log(f"validation perplexity before training: {describe_validation(val.before)}"
                     + (f"; {job.dist.world_size} processes, data parallel" if job.dist.enabled else ""))
    return val


def _callbacks(job: _Job, inputs: _Inputs, run: Run, val: _Validation):
    """(callbacks, best-checkpoint keeper or None, checkpointer or None): the run's own, the caller's
    extra ones, keep_best / early stopping, and checkpoints (every checkpoint_interval steps, and
    always on interruption). Rank 0 only keeps the best and writes checkpoints."""
    from lora_project.training.checkpoint import CheckpointCallback

    t, base = inputs.cfg.training, inputs.base
    callbacks = run.callbacks(job.opts.progress) + list(job.opts.extra_callbacks)
    best = checkpointer = None
    if job.main and (t.keep_best or t.early_stopping_patience):
        from lora_project.training.callbacks import BestCheckpoint

        best = BestCheckpoint(t.keep_best, t.early_stopping_patience)
        callbacks.append(best)
    if job.main:
        checkpointer = CheckpointCallback(
            job.paths.checkpoints_dir / run.experiment_dir.name, t.checkpoint_interval, t.keep_checkpoints,
            meta={"config_fields": config_fingerprint_fields(inputs.asked), "dataset_name": job.dataset,
                  "dataset_fingerprint": inputs.streams.fingerprint, "base_fingerprint": base.ref.fingerprint,
                  "base_name": base.ref.name, "mlflow_run_id": run.run_id, "metrics_before": val.before,
                  "evals": val.evals}, on_saved=job.opts.on_checkpoint)
        callbacks.append(checkpointer)
    return callbacks, best, checkpointer


def _train(job: _Job, model, inputs: _Inputs, val: _Validation, callbacks, checkpointer):
    """Run the optimisation loop (from the checkpoint when resuming); returns (fit result, trainer).
    An interruption carries the resume command (the CLI prints it after "error: interrupted")."""
    from lora_project.training.checkpoint import restore as restore_checkpoint
    from lora_project.training.trainer import LoraTrainer

    trainer = LoraTrainer(model, inputs.cfg.training, inputs.loader, inputs.base.runtime, callbacks,
                          eval_fn=val.periodic if job.main else None, dist=job.dist)
    val.trainer = trainer
    if inputs.point is not None:
        restore_checkpoint(trainer, *inputs.point.checkpoint)
    try:
        return trainer.fit(), trainer
    except (KeyboardInterrupt, RunInterrupted) as exc:
        if checkpointer is not None:
            exc.hint = checkpointer.resume_hint(job.dataset, job.adapter_name)
        raise


def _finish(job: _Job, run: Run, model, fit, trainer, val: _Validation, best) -> dict:
    """Score the trained adapter, keep the best one if asked, save and record (rank 0); a worker
    rank only closes its run."""
    from lora_project.models.scoring import describe_validation

    outcome = Outcome(fit.steps, fit.tokens_seen, fit.train_seconds, fit.final_loss,
                      trainer.state.history, sum(p.numel() for p in trainer.params))
    if not job.main:
        run.finish(model, outcome, val.before, {}, val.evals)
        return {"status": "FINISHED", "rank": job.dist.rank, "steps": fit.steps, "final_train_loss": fit.final_loss}
    after = val.metrics()
    val.evals.append({"step": fit.steps, **after})
    run.log_metrics(after, step=fit.steps)
    if fit.stop_reason:
        job.opts.log(f"stopped at step {fit.steps} of {trainer.max_steps}: {fit.stop_reason}")
    job.opts.log(f"validation perplexity after training: {describe_validation(after)}")
    after, extra = _keep_best(best, model, fit, after, run, job.opts.log)
    return run.finish(model, outcome, val.before, after, val.evals, overwrite=job.opts.overwrite,
                      extra_results=extra)


def train_adapter(paths: ProjectPaths, dataset: str, cfg: RunConfig, options: RunOptions | None = None, *,
                  base: BaseBundle | None = None) -> dict:
    """Train one adapter on one catalog dataset; returns the results.json content.

    `options` say how the run is carried out and recorded (training/options.py; default: as
    `lora-project train`). `base`: an already loaded base model to train on (batch training and
    sweeps load it once); it gets its plain model back when the run ends.
    """
    from lora_project.models.lora_model import wrap_with_lora

    job = _preflight(paths, dataset, cfg, options or RunOptions())
    with adapter_lock(paths, job.adapter_name) if job.main else nullcontext():
        inputs = _load_inputs(job, cfg, base)
        model = None
        try:
            with _open_run(job, inputs) as run:
                model = wrap_with_lora(inputs.base.model, inputs.cfg.lora, inputs.cfg.training.seed)
                val = _validation(job, model, inputs, run)
                callbacks, best, checkpointer = _callbacks(job, inputs, run, val)
                fit, trainer = _train(job, model, inputs, val, callbacks, checkpointer)
                return _finish(job, run, model, fit, trainer, val, best)
        finally:
            # Unwrap so that a caller reusing `base` (batch training, sweeps) gets the plain model back.
            if model is not None and hasattr(model, "unload"):
                inputs.base.model = model.unload()
