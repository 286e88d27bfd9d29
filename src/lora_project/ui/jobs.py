"""Trainings started from the board: each is a `lora-project train ...` subprocess.

A subprocess (argv list, never a shell) runs exactly the command line the page shows, through the
same entry point as the CLI, so the run has the same lifecycle: the adapter lock, the experiment
folder, MLflow, and Stop = SIGINT = Ctrl-C, which ends the run KILLED. Its output goes to
outputs/ui/logs/<adapter>-<time>.log. The page reads the run's state from the experiment folder
(state.live_views), not from here, so a reload or a second tab sees the same run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from lora_project.errors import UserError
from lora_project.paths import ProjectPaths


class TrainingJobs:
    """The training processes this board started, by adapter name."""

    def __init__(self, paths: ProjectPaths):
        self.paths = paths
        self._procs: dict[str, tuple[subprocess.Popen, Path]] = {}
        self._lock = threading.Lock()

    @property
    def log_dir(self) -> Path:
        return self.paths.outputs_dir / "ui" / "logs"

    def running(self) -> dict[str, int]:
        """{adapter: pid} of this board's trainings still running (finished ones are reaped)."""
        with self._lock:
            return {a: p.pid for a, (p, _) in self._procs.items() if p.poll() is None}

    def start(self, adapter: str, argv: list[str]) -> int:
        """Start `lora-project <argv>` for `adapter`; refused while another training of it runs."""
        from lora_project.ui.state import locked_adapters

        with self._lock:
            old = self._procs.get(adapter)
            if (old and old[0].poll() is None) or adapter in locked_adapters(self.paths):
                raise UserError(f"adapter '{adapter}' is being trained already; stop that run first")
            self.log_dir.mkdir(parents=True, exist_ok=True)
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
            log_path = self.log_dir / f"{adapter}-{stamp}.log"
            env = dict(os.environ, LORA_PROJECT_ROOT=str(self.paths.root), PYTHONUNBUFFERED="1")
            with open(log_path, "ab") as log:
                proc = subprocess.Popen([sys.executable, "-m", "lora_project", *argv], cwd=self.paths.root,
                                        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # a Ctrl-C in the board's terminal is not theirs
            self._procs[adapter] = (proc, log_path)
            return proc.pid

    def stop(self, adapter: str) -> str:
        """Send SIGINT (Ctrl-C) to this board's training of `adapter`: the run ends KILLED."""
        with self._lock:
            entry = self._procs.get(adapter)
        if entry is None or entry[0].poll() is not None:
            raise UserError(f"no training of '{adapter}' started from this board is running")
        entry[0].send_signal(signal.SIGINT)
        return f"sent Ctrl-C (SIGINT) to the training of '{adapter}' (pid {entry[0].pid})"

    def log_tail(self, adapter: str, chars: int = 3000) -> str:
        with self._lock:
            entry = self._procs.get(adapter)
        if entry is None or not entry[1].is_file():
            return ""
        data = entry[1].read_bytes()[-chars:]
        return data.decode("utf-8", "replace")

    def stop_all(self, wait: float = 20.0) -> None:
        """On shutdown: Ctrl-C every running training and wait for them to record their end."""
        with self._lock:
            procs = [p for p, _ in self._procs.values() if p.poll() is None]
        for p in procs:
            p.send_signal(signal.SIGINT)
        deadline = time.monotonic() + wait
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
