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

import time
from contextlib import ExitStack

from lora_project.config import RunConfig
from lora_project.errors import RunInterrupted, UserError
from lora_project.paths import ProjectPaths
from lora_project.training.lifecycle import Outcome, Run, adapter_lock
from lora_project.training.options import RunOptions
from lora_project.utils.interrupts import check_stop

SHARED_FIELDS = ("seq_len", "batch_size", "grad_accum", "max_steps", "epochs", "precision", "device", "threads",
                 "loss_chunk_tokens", "gradient_checkpointing", "lean_activations", "eval_max_tokens",
                 "log_interval")


def check_fusable(configs: dict[str, RunConfig]) -> None:
    """Refuse datasets whose shared settings (model, shapes, steps) differ: they cannot share a pass."""
    first_name, first = next(iter(configs.items()))
    problems = []
    for name, cfg in configs.items():
        for f in SHARED_FIELDS:
            if getattr(cfg.training, f) != getattr(first.training, f):
                problems.append(f"training.{f} differs ({first_name}: {getattr(first.training, f)!r}, "
                                f"{name}: {getattr(cfg.training, f)!r})")
        if cfg.lora.use_dora:
            problems.append(f"{name}: lora.use_dora is true (PEFT cannot route a mixed batch through DoRA layers)")
        if cfg.model != first.model:
            problems.append(f"model differs between {first_name} and {name}")
        if cfg.training.keep_best or cfg.training.early_stopping_patience:
            problems.append(f"{name}: training.keep_best and training.early_stopping_patience are not "
                            "supported with --fused yet; train without --fused")
    if problems:
        raise UserError("--fused trains the adapters in one batch, so these must be equal: " + "; ".join(problems))


def _route(model, adapter_names: list[str]):
    """Register pre-hooks that make every LoRA layer apply adapter_names[i] to row i."""
    from peft.tuners.lora import LoraLayer

    def hook(module, args, kwargs):
        return args, {**kwargs, "adapter_names": adapter_names}

    return [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules() if isinstance(m, LoraLayer)]


def train_fused(paths: ProjectPaths, names: list[str], configs: dict[str, RunConfig], base,
                options: RunOptions) -> list[dict]:
    """Train several adapters in one forward/backward pass per step, each on its own data and optimizer.
    Each adapter is named after its dataset and is its own run (kind "fused"); `options` apply to all."""
    check_fusable(configs)
    for n in names:
        if paths.adapter(n).exists() and not options.overwrite:
            raise UserError(f"adapter {paths.adapter(n)} already exists; pass --overwrite to replace it")
    with ExitStack() as locks:
        for n in names:
            locks.enter_context(adapter_lock(paths, n))
        return _train_fused_locked(paths, names, configs, base, options)


def _train_fused_locked(paths, names, configs, base, options: RunOptions):
    from peft import get_peft_model

    from lora_project.data.dataset_loader import load_streams, prepare_dataset
    from lora_project.models.lora_model import lora_config, resolved_config
    from lora_project.training.trainer import (
        BlockLoader,
    )
    from lora_project.utils.seeding import set_seed

    shared = configs[names[0]].training
    streams, loaders = {}, {}
    configs = dict(configs)
    for n in names:  # everything that can be refused is checked before any folder or run exists
        try:
            configs[n] = resolved_config(configs[n], base.model, who=n)  # 'auto' -> the model's module names
            prepared = prepare_dataset(paths, n)
            streams[n] = load_streams(paths, prepared, base.tokenizer, base.tokenizer_fingerprint)
            loaders[n] = BlockLoader(streams[n].train, shared.seq_len, shared.batch_size, configs[n].training.seed)
        except UserError as exc:
            exc.dataset = n  # train-batch gives this dataset the reason, the others "not trained"
            raise
    # Each adapter is initialised right after setting its own seed, in the same module order
    # as a single-adapter run: the same seed gives the same initial weights as sequential training.
    model = None
    for n in names:
        set_seed(configs[n].training.seed)
        if model is None:
            model = get_peft_model(base.model, lora_config(configs[n].lora, base.model), adapter_name=n)
        else:
            model.add_adapter(n, lora_config(configs[n].lora, base.model))
    try:
        with ExitStack() as stack:
            runs = {n: stack.enter_context(Run(
                paths, configs[n], dataset=n, adapter_name=n, base=base, streams=streams[n],
                use_mlflow=options.use_mlflow, parent_run_id=options.parent_run_id, kind="fused",
                tags={"fused_with": ",".join(names)}, params={"fused": True})) for n in names}
            return _fused_loop(model, names, configs, base, runs, streams, loaders, overwrite=options.overwrite,
                               progress=options.progress)
    finally:
        base.model = model.unload()


def _fused_loop(model, names, configs, base, runs, streams, loaders, *, overwrite, progress) -> list[dict]:
    """The shared steps of a fused run, then each adapter's evaluation and finish()."""
    from lora_project.models.lean import set_lean_activations
    from lora_project.models.scoring import decoder_and_head, tokenize_split, validation_metrics
    from lora_project.training.callbacks import CallbackList, ProgressBar, TrainState
    from lora_project.training.trainer import optimizer_step

    runtime = base.runtime
    shared = configs[names[0]].training
    params, optims, scheds, max_steps = _optimizers(model, names, configs, loaders)
    set_lean_activations(model, shared.lean_activations)  # as LoraTrainer
    decoder, head = decoder_and_head(model)
    val_docs = {n: tokenize_split(base.tokenizer, streams[n].validation_docs, streams[n].separator, shared.eval_max_tokens)
                for n in names}  # the cap is recorded with every evaluation

    def evaluate(n):
        return validation_metrics(model, base.tokenizer, val_docs[n], streams[n].separator, runtime)

    before, cbs, states = {}, {}, {}
    with model.disable_adapter():
        for n in names:
            before[n] = evaluate(n)
    for n in names:
        runs[n].log_metrics(before[n], step=0)
        states[n] = TrainState(max_steps, shared.batch_size * shared.grad_accum * shared.seq_len)
        cbs[n] = CallbackList(runs[n].callbacks(progress=False))  # one shared bar below
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
    status = "FAILED"
    try:
        for _ in range(max_steps):
            check_stop()
            t_step = time.perf_counter()
            losses = _forward_backward(model, names, shared, loaders, runtime, decoder, head)
            check_stop()  # before the optimizer steps, as in the single trainer
            stepped = {n: optimizer_step(params[n], optims[n], scheds[n], configs[n].training.max_grad_norm,
                                         step=states[n].step + 1, who=n) for n in names}
            dt = time.perf_counter() - t_step  # measured after the optimizer steps, as in the single trainer
            for n in names:
                _record_step(states[n], cbs[n], windows[n], losses[n], *stepped[n], dt, shared.log_interval,
                             max_steps, who=n)
            bar_state.step += 1
            bar_state.tokens_seen += bar_state.tokens_per_step
            bar_state.train_seconds += dt
            bar.on_step_end(bar_state, {"loss": sum(losses.values()) / len(names),
                                        "lr": scheds[names[0]].get_last_lr()[0],
                                        "tokens_per_second": bar_state.tokens_per_step / dt})
        status = "FINISHED"
    except (KeyboardInterrupt, RunInterrupted):
        status = "KILLED"
        raise
    finally:
        bar.on_train_end(bar_state, status)
        for n in names:
            cbs[n].on_train_end(states[n], status)
    model.eval()
    return [_finish_one(model, n, names, runs[n], states[n], params[n], before[n], evaluate, overwrite)
            for n in names]


def _optimizers(model, names, configs, loaders):
    """Each adapter's LoRA parameters, its own AdamW and schedule, and the run's step count (the
    longest adapter's)."""
    import torch

    from lora_project.training.trainer import lr_lambda, total_steps

    params = {n: [p for pn, p in model.named_parameters() if "lora_" in pn and f".{n}." in pn] for n in names}
    max_steps = max(total_steps(configs[n].training, loaders[n].n_blocks) for n in names)
    optims, scheds = {}, {}
    for n in names:
        t = configs[n].training
        optims[n] = torch.optim.AdamW(params[n], lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                      weight_decay=t.weight_decay)
        scheds[n] = torch.optim.lr_scheduler.LambdaLR(optims[n], lr_lambda(t, max_steps))
    return params, optims, scheds, max_steps


def _forward_backward(model, names, shared, loaders, runtime, decoder, head) -> dict[str, float]:
    """One step's forward and backward passes (`grad_accum` micro-batches, each holding every
    adapter's rows); returns each adapter's mean loss over the micro-batches."""
    import torch

    from lora_project.models.losses import linear_cross_entropy

    rows = [n for n in names for _ in range(shared.batch_size)]
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
    return losses


def _record_step(st, cbs, window: list[float], loss: float, grad_norm, lr, dt: float, log_interval: int,
                 max_steps: int, *, who: str) -> None:
    """Count one shared step for one adapter (the shared step's time: each adapter's own throughput)
    and log its window's mean loss every `log_interval` steps and at the last."""
    from lora_project.training.trainer import check_finite

    st.step += 1
    st.tokens_seen += st.tokens_per_step
    st.train_seconds += dt
    check_finite(loss, st.step, who=who)
    window.append(loss)
    if st.step % log_interval == 0 or st.step == max_steps:
        logged = {"loss": sum(window) / len(window), "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_second": st.tokens_seen / st.train_seconds,
                  "tokens_seen": float(st.tokens_seen)}
        window.clear()
        st.history.append({"step": st.step, **logged})
        cbs.on_log(st, logged)


def _finish_one(model, n, names, run, st, params, before, evaluate, overwrite) -> dict:
    """Adapter `n`'s evaluation after training and its run's finish() (folder, metadata, results)."""
    model.set_adapter(n)
    after = evaluate(n)
    run.log_metrics(after, step=st.step)
    outcome = Outcome(st.step, st.tokens_seen, st.train_seconds, st.history[-1]["loss"] if st.history else
                      float("nan"), st.history, sum(p.numel() for p in params))
    return run.finish(model, outcome, before, after, [{"step": 0, **before}, {"step": st.step, **after}],
                      peft_adapter=n, overwrite=overwrite, extra_results={"fused_with": names},
                      extra_metadata={"fused_with": names}, plot_title=f"{n} (fused)")
