"""Training callbacks: small objects that observe the loop through ``on_*`` hooks.

The trainer calls every hook on every callback in order; a callback implements only the
hooks it needs (the `Callback` base class gives no-op defaults). Callbacks observe and
record; they do not change the optimisation.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from lora_project.utils.mlflow_utils import MlflowTracker


class TrainerCallback(Protocol):
    """The hooks a callback may implement, in the order the trainer calls them within a step."""

    def on_train_start(self, state: "TrainState") -> None: ...
    def on_step_end(self, state: "TrainState", metrics: dict[str, float]) -> None: ...
    def on_log(self, state: "TrainState", metrics: dict[str, float]) -> None: ...
    def on_eval(self, state: "TrainState", metrics: dict[str, float]) -> None: ...
    def on_train_end(self, state: "TrainState", status: str) -> None: ...


class TrainState:
    """What callbacks may read: progress counters and the objects being trained."""

    def __init__(self, max_steps: int, tokens_per_step: int):
        self.step = 0
        self.max_steps = max_steps
        self.tokens_per_step = tokens_per_step
        self.tokens_seen = 0
        self.train_seconds = 0.0  # time inside training steps only (no evaluation)
        self.model = None
        self.optimizer = None
        self.scheduler = None
        self.loader = None
        self.history: list[dict[str, float]] = []


class Callback:
    """No-op base: subclass and override the hooks you need."""

    def on_train_start(self, state: TrainState) -> None:
        pass

    def on_step_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        pass

    def on_log(self, state: TrainState, metrics: dict[str, float]) -> None:
        pass

    def on_eval(self, state: TrainState, metrics: dict[str, float]) -> None:
        pass

    def on_train_end(self, state: TrainState, status: str) -> None:
        pass


class ProgressBar(Callback):
    """tqdm bar with loss, learning rate and tokens/s (on stderr)."""

    def __init__(self, enabled: bool = True, desc: str = "train"):
        self.enabled = enabled
        self.desc = desc
        self.bar = None

    def on_train_start(self, state):
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.step, desc=self.desc, unit="step",
                            file=sys.stderr, dynamic_ncols=True)

    def on_step_end(self, state, metrics):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.1e}",
                                 tok_s=f"{metrics['tokens_per_second']:.0f}", refresh=False)

    def on_eval(self, state, metrics):
        if self.bar is not None:
            self.bar.write(f"step {state.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def on_train_end(self, state, status):
        if self.bar is not None:
            self.bar.close()


class JsonlLogger(Callback):
    """Appends one JSON object per logged step and evaluation to a file (flushed each time)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def on_log(self, state, metrics):
        self._write({"event": "train", "step": state.step, "time": time.time(), **metrics})

    def on_eval(self, state, metrics):
        self._write({"event": "eval", "step": state.step, "time": time.time(), **metrics})

    def on_train_end(self, state, status):
        self._write({"event": "end", "step": state.step, "time": time.time(), "status": status})


class ProgressFile(Callback):
    """``logs/progress.json``: the live state of a run (step of max_steps, latest loss, tokens/s, pid,
    status), rewritten atomically at most every `every` seconds and at the end. The web board reads it,
    so a page reload or a second browser tab sees the same run."""

    def __init__(self, path: Path, every: float = 0.5):
        self.path, self.every = Path(path), every
        self._last = 0.0
        self._loss: float | None = None

    def _write(self, state, status: str) -> None:
        import os

        from lora_project.utils.io_utils import atomic_write_json

        self._last = time.time()
        atomic_write_json(self.path, {
            "status": status, "pid": os.getpid(), "step": state.step, "max_steps": state.max_steps,
            "tokens_seen": state.tokens_seen, "train_seconds": state.train_seconds, "loss": self._loss,
            "tokens_per_second": state.tokens_seen / state.train_seconds if state.train_seconds else None,
            "updated": self._last})

    def on_train_start(self, state):
        self._write(state, "RUNNING")

    def on_step_end(self, state, metrics):
        self._loss = metrics.get("loss")
        if time.time() - self._last >= self.every or state.step == state.max_steps:
            self._write(state, "RUNNING")

    def on_train_end(self, state, status):
        try:
            self._write(state, status)
        except OSError:
            pass  # the run's own end state (results.json, MLflow) matters more than the board's view


class MlflowCallback(Callback):
    """Per-step metrics to an MLflow run that the caller started (and ends)."""

    def __init__(self, tracker: MlflowTracker):
        self.tracker = tracker

    def on_log(self, state, metrics):
        self.tracker.log_metrics(metrics, step=state.step)

    def on_eval(self, state, metrics):
        self.tracker.log_metrics(metrics, step=state.step)


class CallbackList:
    """Calls each hook on every callback in order."""
    def __init__(self, callbacks: list[Callback]):
        self.callbacks = list(callbacks)

    def __getattr__(self, hook: str):
        if not hook.startswith("on_"):
            raise AttributeError(hook)

        def call(*args, **kwargs):
            for cb in self.callbacks:
                getattr(cb, hook)(*args, **kwargs)

        return call
