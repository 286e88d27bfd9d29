"""What a cluster train-batch shows while its tasks run: the progress actor the tasks report to, and the
driver's view of the runs in the files the web board reads for a local run.

`ProgressActor` runs on the head node (it outlives worker nodes); a task tells it when it starts and sends
its progress.json state (cluster/tasks.py). `LiveRuns` is the driver's side: the adapter locks, each
started task's experiment folder with logs/progress.json (the driver's pid), and the overall bar.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from lora_project.paths import ProjectPaths


class ProgressActor:
    """A Ray actor on the cluster that tasks tell when they start and how far they are (their
    progress.json state); the driver polls it."""

    def __init__(self):
        self.events: list[tuple] = []
        self.states: dict[str, dict] = {}

    def started(self, key: str, node: str, task_id: str) -> None:
        self.events.append((key, node, task_id, time.time()))

    def update(self, key: str, state: dict) -> None:
        self.states[key] = state

    def drain(self) -> tuple[list[tuple], dict[str, dict]]:
        out, self.events = self.events, []
        states, self.states = self.states, {}
        return out, states


class LiveRuns:
    """What the driver shows while the tasks run, in the files a local run writes, so the web board's Train
    tab and `ui/state.py` read cluster runs as local ones: the adapter lock (``adapters/.<name>_lora.lock``,
    the driver's pid) from submission to the recorded result, and from a task's start its experiment folder
    with ``logs/progress.json`` (the task's step, loss and tokens/s, the driver's pid). Also the overall
    progress bar (steps of every task, with ETA) on stderr."""

    def __init__(self, paths: ProjectPaths, bar: bool, log):
        import contextlib

        self.paths, self._log = paths, log
        self.locks = contextlib.ExitStack()
        self.exp: dict[str, Path] = {}
        self.steps: dict[str, tuple[int, int]] = {}  # adapter: (step, max_steps)
        self.open: set[str] = set()  # adapters whose experiment folder has no end state yet
        self.bar = None
        self._bar_wanted = bar

    def log(self, message: str) -> None:
        if self.bar is not None:
            from tqdm.auto import tqdm

            with tqdm.external_write_mode(file=self.bar.fp):
                self._log(message)
        else:
            self._log(message)

    def lock(self, adapter: str, max_steps: int) -> None:
        from lora_project.training.lifecycle import adapter_lock

        self.locks.enter_context(adapter_lock(self.paths, adapter))
        self.steps[adapter] = (0, max_steps)

    def start_bar(self) -> None:
        if self._bar_wanted and self.steps:
            import sys

            from tqdm.auto import tqdm

            self.bar = tqdm(total=sum(m for _, m in self.steps.values()), unit="step", file=sys.stderr,
                            desc=f"{len(self.steps)} task(s)", dynamic_ncols=True)

    def started(self, adapter: str, cfg) -> None:
        """A task began (again, if retried): its experiment folder, as a local run's at its start."""
        from lora_project.training.lifecycle import new_experiment_dir
        from lora_project.utils.io_utils import atomic_write_text

        if adapter not in self.exp:
            self.exp[adapter] = new_experiment_dir(self.paths, adapter)
            atomic_write_text(self.exp[adapter] / "config.yaml", cfg.to_yaml())
        self.open.add(adapter)
        self.progress(adapter, {"status": "RUNNING", "step": 0, "max_steps": self.steps[adapter][1],
                                "tokens_seen": 0, "train_seconds": 0.0, "loss": None, "tokens_per_second": None,
                                "updated": time.time()})

    def progress(self, adapter: str, state: dict) -> None:
        import os

        from lora_project.utils.io_utils import atomic_write_json

        if adapter not in self.open:
            return  # a late update of a task already recorded
        atomic_write_json(self.exp[adapter] / "logs" / "progress.json", {**state, "pid": os.getpid()})
        self._advance(adapter, state.get("step") or 0)

    def _advance(self, adapter: str, step: int) -> None:
        old, total = self.steps.get(adapter, (0, 0))
        self.steps[adapter] = (step, total)
        if self.bar is not None:
            self.bar.update(step - old)  # a retried task starts over: the bar goes back with it

    def ended(self, adapter: str) -> None:
        """The task's result is recorded (or it failed before a run began): its share of the bar is done."""
        self.open.discard(adapter)
        self._advance(adapter, self.steps.get(adapter, (0, 0))[1])
        if self.bar is not None:
            done = sum(1 for a in self.steps if a not in self.open and a in self.exp)
            self.bar.set_postfix_str(f"{done} recorded", refresh=True)

    def end_without_run(self, adapter: str, status: str, error: str) -> None:
        """The task ended with no run recorded (killed with its worker, lost, or stopped before its run
        began): its experiment folder, if the driver made one, says `status` in results.json and
        progress.json, as a local run's would."""
        import os

        from lora_project.utils.io_utils import atomic_write_json

        exp = self.exp.get(adapter)
        if exp is not None and adapter in self.open:
            step, total = self.steps.get(adapter, (0, 0))
            atomic_write_json(exp / "results.json", {"status": status, "error": error, "adapter_name": adapter,
                                                     "experiment_dir": str(exp), "mlflow_run_id": None,
                                                     "finished": datetime.now(timezone.utc).isoformat()})
            atomic_write_json(exp / "logs" / "progress.json", {"status": status, "pid": os.getpid(), "step": step,
                                                               "max_steps": total, "updated": time.time()})
        self.ended(adapter)

    def close(self, status: str, error: str) -> None:
        """End every experiment folder still open with `status`, then release the adapter locks."""
        try:
            for adapter in sorted(self.open):
                self.end_without_run(adapter, status, error)
        finally:
            if self.bar is not None:
                self.bar.close()
            self.locks.close()
