"""The LoRA training loop (our own; docs/research_notes.md says why not HF Trainer).

One step = ``grad_accum`` micro-batches of ``batch_size`` packed blocks of ``seq_len``
tokens. The forward pass runs the decoder under bf16 autocast when the runtime says so and
the output layer + cross-entropy through the fused chunked loss (no full logits kept).
Only LoRA parameters have gradients; AdamW state lives in fp32.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from lora_project.config import TrainingSection
from lora_project.data.tokenizer_utils import block, num_blocks
from lora_project.errors import RunInterrupted, UserError
from lora_project.training.callbacks import CallbackList, TrainState
from lora_project.utils.interrupts import check_stop


class BlockLoader:
    """Seeded, resumable iteration over packed blocks of a token stream (no copies until batching).

    Epoch e visits the blocks in the order of ``default_rng(seed + e).permutation``; the
    position (epoch, index) is all the state needed to resume exactly.
    """

    def __init__(self, stream: np.ndarray, seq_len: int, batch_size: int, seed: int):
        self.stream = stream
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.n_blocks = num_blocks(len(stream), seq_len)
        if self.n_blocks < 1:
            raise UserError(f"the training split has {len(stream)} tokens, fewer than one block of "
                            f"seq_len={seq_len} + 1; lower training.seq_len or add data")
        self.epoch = 0
        self.index = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(self.seed + epoch).permutation(self.n_blocks)

    def next_batch(self):
        import torch

        rows = []
        for _ in range(self.batch_size):
            if self.index >= self.n_blocks:
                self.epoch += 1
                self.index = 0
                self._order = self._permutation(self.epoch)
            rows.append(block(self.stream, int(self._order[self.index]), self.seq_len))
            self.index += 1
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n_blocks": self.n_blocks}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)


def lr_lambda(cfg: TrainingSection, max_steps: int):
    """Multiplier of the peak lr at optimizer step s (0-based): linear warm-up, then schedule."""
    warm = cfg.warmup_steps

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, max_steps - warm))
        if cfg.schedule == "linear":
            shape = 1.0 - progress
        else:  # cosine
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape

    return f


def total_steps(cfg: TrainingSection, n_blocks: int) -> int:
    """Optimizer steps of a run: max_steps, or epochs over the training blocks."""
    if cfg.max_steps:
        return cfg.max_steps
    per_step = cfg.batch_size * cfg.grad_accum
    return max(1, math.ceil(cfg.epochs * n_blocks / per_step))


def optimizer_step(params, optimizer, scheduler, max_grad_norm: float, step: int | None = None,
                   who: str = "") -> tuple[float, float]:
    """One optimizer step, the same in every trainer: clip (or just measure) the gradient norm,
    step the optimizer and the schedule, zero the gradients. Returns (grad norm, lr used).

    Parameters without a gradient (not reached this step) are left out of the norm. Non-finite
    gradients stop the run before they reach the weights (`step` is the 1-based step they belong
    to): the loss can still be finite on that step, and AdamW would turn every LoRA weight into NaN.
    """
    import torch

    with_grad = [p for p in params if p.grad is not None]
    if max_grad_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(with_grad, max_grad_norm))
    elif with_grad:
        grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in with_grad])))
    else:
        grad_norm = 0.0
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        prefix = f"{who}: " if who else ""
        at = f" at step {step}" if step is not None else ""
        raise UserError(f"{prefix}training diverged{at}: non-finite gradients (norm {grad_norm}), stopped before "
                        f"the weights were updated; lower training.lr, or set training.precision=fp32 if this run "
                        f"used bf16")
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def check_finite(loss: float, step: int, who: str = "") -> None:
    """Stop a diverged run with a clear line instead of training on NaN."""
    if not math.isfinite(loss):
        prefix = f"{who}: " if who else ""
        raise UserError(f"{prefix}training diverged at step {step} (loss {loss}); lower training.lr")


@dataclass
class FitResult:
    """Steps, tokens, time and final loss of a finished fit()."""
    steps: int
    tokens_seen: int
    train_seconds: float
    tokens_per_second: float
    final_loss: float
    status: str
    stop_reason: str | None = None  # why the run ended before max_steps (None: it ran them all)


class LoraTrainer:
    """Runs the optimisation loop on a PEFT model; evaluation is injected as a function."""

    def __init__(self, model, cfg: TrainingSection, loader: BlockLoader, runtime, callbacks,
                 eval_fn=None, dist=None):
        import torch

        from lora_project.training.distributed import DistInfo, wrap_decoder

        self.model = model
        self.cfg = cfg
        self.loader = loader
        self.runtime = runtime
        self.callbacks = CallbackList(callbacks)
        self.eval_fn = eval_fn
        self.max_steps = total_steps(cfg, loader.n_blocks)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("no trainable parameters: LoRA wrapping failed")
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.max_steps))
        from lora_project.models.scoring import decoder_and_head

        self.decoder, self.head = decoder_and_head(model)
        # Under bf16 autocast PEFT's cast of each LoRA layer's input to the fp32 LoRA weights is
        # undone at once by autocast (the LoRA matmuls run in bf16 either way): two copies of the
        # activations per LoRA layer and step for nothing. The forward skips them (same numerics).
        self.uncast_lora = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")] \
            if runtime.precision == "bf16" else []
        if cfg.gradient_checkpointing:
            # Recompute each decoder layer's activations in backward instead of keeping them.
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Llama-family norms and SwiGLU MLPs keep less for backward (models/lean.py), same numerics;
        # off, a base patched by an earlier run in this process gets its own forwards back.
        from lora_project.models.lean import set_lean_activations

        set_lean_activations(model, cfg.lean_activations)
        # Data parallel (torchrun): DDP averages LoRA gradients across processes in backward.
        self.dist = dist or DistInfo()
        self.decoder = wrap_decoder(self.decoder, runtime.device, self.dist)
        self.state = TrainState(self.max_steps, cfg.batch_size * cfg.grad_accum * cfg.seq_len)
        self.state.model, self.state.optimizer = model, self.optimizer
        self.state.scheduler, self.state.loader = self.scheduler, loader

    def micro_step(self, inputs, targets) -> float:
        from lora_project.models.losses import linear_cross_entropy

        if self.dist.enabled:  # this process's disjoint slice of the global micro-batch
            inputs, targets = inputs[self.dist.rank::self.dist.world_size], targets[self.dist.rank::self.dist.world_size]
        inputs = inputs.to(self.runtime.device, non_blocking=True)
        targets = targets.to(self.runtime.device, non_blocking=True)
        before = [m.cast_input_dtype_enabled for m in self.uncast_lora]
        for m in self.uncast_lora:
            m.cast_input_dtype_enabled = False
        try:
            with self.runtime.autocast():
                hidden = self.decoder(input_ids=inputs, use_cache=False).last_hidden_state
        finally:
            for m, flag in zip(self.uncast_lora, before):
                m.cast_input_dtype_enabled = flag
        loss = linear_cross_entropy(hidden, self.head, targets, self.cfg.loss_chunk_tokens)
        (loss / self.cfg.grad_accum).backward()
        return float(loss.detach())

    def fit(self) -> FitResult:
        import torch

        state = self.state
        self.model.train()
        self.callbacks.on_train_start(state)
        loss_window: list[float] = []
        last_loss = float("nan")
        status = "FAILED"
        try:
            while state.step < self.max_steps:
                check_stop()
                t0 = time.perf_counter()
                losses = [self.micro_step(*self.loader.next_batch()) for _ in range(self.cfg.grad_accum)]
                check_stop()  # before the optimizer step, so a stopped run never applies a partial step
                grad_norm, lr = optimizer_step(self.params, self.optimizer, self.scheduler, self.cfg.max_grad_norm,
                                               step=state.step + 1)
                if self.runtime.device == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                state.step += 1
                state.tokens_seen += state.tokens_per_step
                state.train_seconds += dt
                from lora_project.training.distributed import mean_across

                last_loss = mean_across(sum(losses) / len(losses), self.dist)
                check_finite(last_loss, state.step)
                loss_window.append(last_loss)
                metrics = {"loss": last_loss, "lr": lr, "grad_norm": grad_norm,
                           "tokens_per_second": state.tokens_per_step / dt,
                           "tokens_seen": float(state.tokens_seen)}
                if state.step % self.cfg.log_interval == 0 or state.step == self.max_steps:
                    logged = dict(metrics, loss=sum(loss_window) / len(loss_window),
                                  tokens_per_second=state.tokens_seen / state.train_seconds)
                    loss_window = []
                    state.history.append({"step": state.step, **logged})
                    self.callbacks.on_log(state, logged)
                if (self.eval_fn and self.cfg.eval_interval and state.step % self.cfg.eval_interval == 0
                        and state.step < self.max_steps):
                    self.callbacks.on_eval(state, self.eval_fn())
                    self.model.train()
                # Last, so that a checkpoint taken here includes this step's log and evaluation.
                self.callbacks.on_step_end(state, metrics)
                if state.stop_reason:  # a callback ended the run (early stopping)
                    break
            status = "FINISHED"
        except (KeyboardInterrupt, RunInterrupted):
            status = "KILLED"
            raise
        finally:
            self.callbacks.on_train_end(state, status)
        self.model.eval()
        return FitResult(steps=state.step, tokens_seen=state.tokens_seen, train_seconds=state.train_seconds,
                         tokens_per_second=state.tokens_seen / max(state.train_seconds, 1e-9),
                         final_loss=last_loss, status="FINISHED", stop_reason=state.stop_reason)
