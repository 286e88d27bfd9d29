"""Fused multi-adapter training (`train-batch --fused`): K adapters in one forward/backward.

The idea of mLoRA's BatchLoRA: one batch holds each adapter's own examples (rows
``k*b .. (k+1)*b-1`` belong to adapter k); the frozen base computation runs once for all
rows, and every LoRA layer adds to each row only its own adapter's update (PEFT's
per-row routing, switched on here with a forward pre-hook that passes ``adapter_names``).
Each adapter has its own data stream, seed, optimizer and schedule. Because a row's output
depends only on its own adapter, the gradient of the summed per-adapter losses with respect
to adapter k is exactly the gradient of adapter k's own loss: each adapter follows the same
trajectory as if trained alone (up to float rounding from different matmul shapes).
Dropout masks are drawn in a different order than in sequential runs, so bit-for-bit
agreement with sequential training needs ``lora.dropout: 0``.

Requirements: the adapters share ``seq_len``, ``batch_size``, ``grad_accum``,
``max_steps``/``epochs`` resolution, ``precision`` and ``device`` (they run in one batch);
seed, learning rate, schedule, weight decay, clipping and the LoRA settings may differ.
"""

from __future__ import annotations

import math
import time

from lora_project.config import RunConfig, flatten
from lora_project.errors import UserError
from lora_project.paths import ProjectPaths
from lora_project.utils.interrupts import check_stop

SHARED_FIELDS = ("seq_len", "batch_size", "grad_accum", "max_steps", "epochs", "precision", "device", "threads",
                 "loss_chunk_tokens", "gradient_checkpointing", "eval_max_tokens", "log_interval")


def check_fusable(configs: dict[str, RunConfig]) -> None:
    """Refuse datasets whose shared settings (model, shapes, steps) differ: they cannot share a pass."""
    first_name, first = next(iter(configs.items()))
    problems = []
    for name, cfg in configs.items():
        for f in SHARED_FIELDS:
            if getattr(cfg.training, f) != getattr(first.training, f):
                problems.append(f"training.{f} differs ({first_name}: {getattr(first.training, f)!r}, "
                                f"{name}: {getattr(cfg.training, f)!r})")
        if cfg.model != first.model:
            problems.append(f"model differs between {first_name} and {name}")
    if problems:
        raise UserError("--fused trains the adapters in one batch, so these must be equal: " + "; ".join(problems))


def _route(model, adapter_names: list[str]):
    """Register pre-hooks that make every LoRA layer apply adapter_names[i] to row i."""
    from peft.tuners.lora import LoraLayer

    def hook(module, args, kwargs):
        return args, {**kwargs, "adapter_names": adapter_names}

    return [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules() if isinstance(m, LoraLayer)]


def train_fused(paths: ProjectPaths, names: list[str], configs: dict[str, RunConfig], base, *,
                overwrite: bool, use_mlflow: bool, progress: bool, parent_run_id: str | None, log=print) -> list[dict]:
    """Train several adapters in one forward/backward pass per step, each on its own data and optimizer."""
    from contextlib import ExitStack

    from lora_project.training.run import adapter_lock

    check_fusable(configs)
    for n in names:
        if paths.adapter(n).exists() and not overwrite:
            raise UserError(f"adapter {paths.adapter(n)} already exists; pass --overwrite to replace it")
    with ExitStack() as locks:
        for n in names:
            locks.enter_context(adapter_lock(paths, n))
        return _train_fused_locked(paths, names, configs, base, overwrite=overwrite, use_mlflow=use_mlflow,
                                   progress=progress, parent_run_id=parent_run_id, log=log)


def _train_fused_locked(paths, names, configs, base, *, overwrite, use_mlflow, progress, parent_run_id, log):
    import torch
    from peft import get_peft_model

    from lora_project.data.dataset_loader import load_streams, prepare_dataset
    from lora_project.models.adapter import AdapterMetadata, now_iso
    from lora_project.models.lora_model import (
        linear_module_names,
        lora_config,
        save_adapter,
    )
    from lora_project.models.losses import linear_cross_entropy
    from lora_project.models.scoring import (
        decoder_and_head,
        limit_documents,
        results_metrics,
        validation_metrics,
    )
    from lora_project.training.callbacks import (
        CallbackList,
        JsonlLogger,
        MlflowCallback,
        ProgressBar,
        TrainState,
    )
    from lora_project.training.run import (
        new_experiment_dir,
        plot_loss_curve,
        provenance_of,
    )
    from lora_project.training.trainer import (
        BlockLoader,
        lr_lambda,
        peak_rss_mb,
        total_steps,
    )
    from lora_project.utils.io_utils import atomic_write_json, atomic_write_text
    from lora_project.utils.mlflow_utils import MlflowTracker
    from lora_project.utils.seed import set_seed

    t0_all = time.perf_counter()
    runtime = base.runtime
    shared = configs[names[0]].training
    available = linear_module_names(base.model)
    streams, loaders = {}, {}
    for n in names:
        prepared = prepare_dataset(paths, n)
        streams[n] = load_streams(paths, prepared, base.tokenizer, base.tokenizer_fingerprint)
        loaders[n] = BlockLoader(streams[n].train, shared.seq_len, shared.batch_size, configs[n].training.seed)
        missing = [m for m in configs[n].lora.target_modules if m not in available]
        if missing:
            raise UserError(f"{n}: lora.target_modules {', '.join(missing)} not found in the model")
    # Each adapter is initialised right after setting its own seed, in the same module order
    # as a single-adapter run: the same seed gives the same initial weights as sequential training.
    model = None
    for n in names:
        set_seed(configs[n].training.seed)
        if model is None:
            model = get_peft_model(base.model, lora_config(configs[n].lora), adapter_name=n)
        else:
            model.add_adapter(n, lora_config(configs[n].lora))
    params = {n: [p for pn, p in model.named_parameters() if "lora_" in pn and f".{n}." in pn] for n in names}
    max_steps = max(total_steps(configs[n].training, loaders[n].n_blocks) for n in names)
    optims, scheds = {}, {}
    for n in names:
        t = configs[n].training
        optims[n] = torch.optim.AdamW(params[n], lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                      weight_decay=t.weight_decay)
        scheds[n] = torch.optim.lr_scheduler.LambdaLR(optims[n], lr_lambda(t, max_steps))
    decoder, head = decoder_and_head(model)

    val_docs = {n: limit_documents(base.tokenizer, streams[n].validation_docs, shared.eval_max_tokens) for n in names}

    def evaluate(n):
        return validation_metrics(model, base.tokenizer, val_docs[n], streams[n].separator, runtime, shared.seq_len)

    exp_dirs, trackers, before, cbs, states = {}, {}, {}, {}, {}
    with model.disable_adapter():
        for n in names:
            before[n] = evaluate(n)
    for n in names:
        cfg = configs[n]
        exp_dirs[n] = new_experiment_dir(paths, n)
        atomic_write_text(exp_dirs[n] / "config.yaml", cfg.to_yaml())
        run_id = None
        if use_mlflow and cfg.tracking.mlflow:
            trackers[n] = MlflowTracker(paths, cfg.tracking.experiment_name, cfg.tracking.tracking_uri)
            tags = {"dataset": n, "dataset_fingerprint": streams[n].fingerprint, "base_model": base.ref.name,
                    "base_model_fingerprint": base.ref.fingerprint, "experiment_dir": exp_dirs[n].name,
                    "fused_with": ",".join(names)}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            run_id = trackers[n].start(exp_dirs[n].name, {**flatten(cfg.to_dict()), "fused": True}, tags)
            trackers[n].log_metrics(before[n], step=0)
        states[n] = TrainState(max_steps, shared.batch_size * shared.grad_accum * shared.seq_len)
        cb = [JsonlLogger(exp_dirs[n] / "logs" / "metrics.jsonl")] + ([MlflowCallback(trackers[n])] if n in trackers else [])
        cbs[n] = CallbackList(cb)
        states[n].run_id = run_id
    # PEFT marks only its single "active" adapter trainable (again on leaving disable_adapter()),
    # so every adapter is made trainable here, right before the loop.
    for n in names:
        for p in params[n]:
            p.requires_grad_(True)
    bar = CallbackList([ProgressBar(progress, desc=f"fused x{len(names)}")])
    bar_state = TrainState(max_steps, shared.batch_size * shared.grad_accum * shared.seq_len * len(names))
    bar.on_train_start(bar_state)
    model.train()
    windows = {n: [] for n in names}
    rows = [n for n in names for _ in range(shared.batch_size)]
    status = "FAILED"
    try:
        for step in range(max_steps):
            check_stop()
            t_step = time.perf_counter()
            losses = {n: 0.0 for n in names}
            for _ in range(shared.grad_accum):
                batches = [loaders[n].next_batch() for n in names]
                inputs = torch.cat([b[0] for b in batches]).to(runtime.device)
                targets = torch.cat([b[1] for b in batches]).to(runtime.device)
                handles = _route(model, rows)
                try:
                    with runtime.autocast():
                        hidden = decoder(input_ids=inputs, use_cache=False).last_hidden_state
                finally:
                    for h in handles:
                        h.remove()
                total = 0.0
                for k, n in enumerate(names):
                    sl = slice(k * shared.batch_size, (k + 1) * shared.batch_size)
                    loss = linear_cross_entropy(hidden[sl], head, targets[sl], shared.loss_chunk_tokens)
                    losses[n] += float(loss.detach()) / shared.grad_accum
                    total = total + loss
                (total / shared.grad_accum).backward()
            dt = time.perf_counter() - t_step
            for n in names:
                t = configs[n].training
                if t.max_grad_norm:
                    gnorm = float(torch.nn.utils.clip_grad_norm_(params[n], t.max_grad_norm))
                else:
                    gnorm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params[n]])))
                lr = scheds[n].get_last_lr()[0]
                optims[n].step()
                scheds[n].step()
                optims[n].zero_grad(set_to_none=True)
                st = states[n]
                st.step += 1
                st.tokens_seen += st.tokens_per_step
                st.train_seconds += dt  # the shared step's time: each adapter's own throughput
                if not math.isfinite(losses[n]):
                    raise UserError(f"{n}: training diverged at step {st.step}; lower its training.lr")
                windows[n].append(losses[n])
                if st.step % shared.log_interval == 0 or st.step == max_steps:
                    logged = {"loss": sum(windows[n]) / len(windows[n]), "lr": lr, "grad_norm": gnorm,
                              "tokens_per_second": st.tokens_seen / st.train_seconds,
                              "tokens_seen": float(st.tokens_seen)}
                    windows[n] = []
                    st.history.append({"step": st.step, **logged})
                    cbs[n].on_log(st, logged)
            bar_state.step += 1
            bar_state.tokens_seen += bar_state.tokens_per_step
            bar_state.train_seconds += dt
            bar.on_step_end(bar_state, {"loss": sum(losses.values()) / len(names), "lr": scheds[names[0]].get_last_lr()[0],
                                        "tokens_per_second": bar_state.tokens_per_step / dt})
        status = "FINISHED"
    finally:
        bar.on_train_end(bar_state, status)
        for n in names:
            cbs[n].on_train_end(states[n], status)
            if status != "FINISHED" and n in trackers:
                trackers[n].end(status)
    model.eval()
    results = []
    for n in names:
        cfg, st = configs[n], states[n]
        model.set_adapter(n)
        after = evaluate(n)
        provenance = provenance_of(paths, base, n, streams[n])

        res = {"status": "FINISHED", "dataset": n, "adapter_name": n, "experiment_dir": str(exp_dirs[n]),
               "mlflow_run_id": st.run_id, "fused_with": names, **provenance,
               "metrics_before": results_metrics(before[n]), "metrics_after": results_metrics(after), "steps": st.step,
               "tokens_seen": st.tokens_seen, "tokens_per_second": st.tokens_seen / st.train_seconds,
               "train_seconds": st.train_seconds, "wall_seconds": time.perf_counter() - t0_all,
               "peak_rss_mb": peak_rss_mb(), "adapter_dir": str(paths.adapter(n)),
               "runtime": {"device": runtime.device, "precision": runtime.precision, "threads": runtime.threads}}
        save_adapter(model, paths.adapter(n), AdapterMetadata(
            adapter_name=n, **provenance, config=cfg.to_dict(),
            final_metrics={"before": res["metrics_before"], "after": res["metrics_after"]},
            mlflow_run_id=st.run_id, experiment_dir=str(exp_dirs[n]), created=now_iso(), origin="trained",
            extra={"fused_with": names}), overwrite=overwrite, adapter_name=n)
        plot_loss_curve(st.history, [{"step": st.step, **after}], exp_dirs[n] / "loss_curve.png", f"{n} (fused)")
        atomic_write_json(exp_dirs[n] / "results.json", res)
        if n in trackers:
            trackers[n].log_metrics(after, step=st.step)
            trackers[n].log_artifact(exp_dirs[n] / "results.json")
            trackers[n].log_artifact(paths.adapter(n), "adapter")
            trackers[n].end("FINISHED")
        results.append(res)
    base.model = model.unload()
    return results
