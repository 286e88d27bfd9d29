"""Atomic, pickle-free training checkpoints for exact resume.

Layout: ``outputs/checkpoints/<experiment>/step_NNNNNN/``

* ``adapter.safetensors``   trainable (LoRA) weights by parameter name
* ``optimizer.safetensors`` AdamW moments (``<name>.exp_avg``, ``<name>.exp_avg_sq``) and
                            the torch RNG state(s) as uint8 tensors
* ``state.json``            step, counters, optimizer step counts and hyper-parameters,
                            scheduler state, data-loader position, Python/NumPy RNG state,
                            fingerprints (config, base model, dataset), MLflow run id,
                            history and evaluations so far

Each checkpoint folder is built under a temporary name, fsynced and renamed, so a crash
(even SIGKILL) mid-write leaves the previous checkpoints intact; only the last K are kept.
The state saved is the one at the end of the last *completed* optimizer step, so a run
interrupted in the middle of a step resumes from that step's beginning.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from lora_project.errors import UserError
from lora_project.training.callbacks import Callback, TrainState
from lora_project.utils.io_utils import atomic_directory

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def capture_rng() -> dict:
    """Python, numpy, torch (and CUDA) RNG states."""
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state_json: dict, tensors: dict) -> None:
    """Restore states captured by capture_rng."""
    import torch

    py = state_json["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state_json["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), npst[2], npst[3], npst[4]))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def list_checkpoints(folder: Path, recover: bool = False) -> list[Path]:
    """Complete checkpoints, oldest first. `recover` (only under the adapter's lock) first
    restores a checkpoint whose overwrite was killed between its two renames."""
    if not folder.is_dir():
        return []
    if recover:
        from lora_project.utils.io_utils import recover_directory

        # .step_N.old-<pid> (killed between renames) and .step_N.<random>.tmp (killed before them)
        for name in {debris.name[1:].split(".")[0] for debris in folder.glob(".step_*")}:
            recover_directory(folder / name)
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()
             and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


class CheckpointCallback(Callback):
    """Saves a checkpoint every `interval` steps, at the end, and when the run is interrupted."""

    def __init__(self, folder: Path, interval: int, keep: int, meta: dict, on_saved=None):
        self.folder = Path(folder)
        self.interval = interval
        self.keep = keep
        self.meta = meta  # fingerprints, run id, metrics_before: written into state.json
        self._snapshot = None  # (loader state, rng) at the end of the last completed step
        self.failed: str | None = None  # why the interrupt checkpoint could not be written
        self.on_saved = on_saved  # called with each checkpoint folder written (RunOptions.on_checkpoint)

    def on_train_start(self, state: TrainState) -> None:
        self._snapshot = (state.loader.state_dict(), capture_rng())

    def on_step_end(self, state: TrainState, metrics) -> None:
        self._snapshot = (state.loader.state_dict(), capture_rng())
        if self.interval and state.step % self.interval == 0:
            self.save(state)

    def on_train_end(self, state: TrainState, status: str) -> None:
        if status == "KILLED" and state.step and not (self.folder / f"step_{state.step:06d}").exists():
            try:
                self.save(state)
            except OSError as exc:  # a full disk must not hide the interruption itself
                self.failed = f"{exc.strerror or exc}"
                print(f"warning: could not write the interrupt checkpoint of step {state.step} "
                      f"({self.failed})", file=sys.stderr)

    def resume_hint(self, dataset: str, adapter_name: str) -> str:
        """What a user can do after an interruption: the checkpoint and the exact command, or why not."""
        ckpts = list_checkpoints(self.folder) if self.folder.is_dir() else []
        if not ckpts:
            why = f"writing it failed: {self.failed}" if self.failed else "the run stopped before its first step"
            return f"no checkpoint was written ({why}), so there is nothing to resume"
        step = int(ckpts[-1].name.split("_")[1])
        name = "" if adapter_name == dataset else f" --adapter-name {adapter_name}"
        return (f"checkpoint of step {step} in {ckpts[-1]}; continue with: lora-project train {dataset}{name} "
                "--resume (with the same config and --set options)")

    def save(self, state: TrainState) -> Path:
        from safetensors.torch import save_file

        loader_state, rng = self._snapshot
        model, opt = state.model, state.optimizer
        names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        moments, opt_steps = {}, {}
        for p, st in opt.state.items():
            n = names[id(p)]
            moments[f"{n}.exp_avg"] = st["exp_avg"].detach().cpu().contiguous()
            moments[f"{n}.exp_avg_sq"] = st["exp_avg_sq"].detach().cpu().contiguous()
            opt_steps[n] = float(st["step"])
        moments["rng.torch"] = rng["torch"]
        for i, t in enumerate(rng.get("cuda", [])):
            moments[f"rng.cuda.{i}"] = t
        np_state = rng["numpy"]
        info = {
            "step": state.step, "tokens_seen": state.tokens_seen, "train_seconds": state.train_seconds,
            "loader": loader_state,
            # LambdaLR stores None for plain-function lambdas: the schedule is rebuilt from config.
            "scheduler": state.scheduler.state_dict(),
            "optimizer": {"steps": opt_steps, "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                                              for g in opt.param_groups]},
            "rng": {"python": rng["python"], "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]},
            "history": state.history, **self.meta,
        }
        target = self.folder / f"step_{state.step:06d}"
        with atomic_directory(target, overwrite=True) as tmp:
            save_file(weights, str(tmp / "adapter.safetensors"))
            save_file(moments, str(tmp / "optimizer.safetensors"))
            (tmp / "state.json").write_text(json.dumps(info, default=float))
        for old in list_checkpoints(self.folder)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        if self.on_saved is not None:
            self.on_saved(target)
        return target


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(state.json, adapter tensors, optimizer+rng tensors) of one checkpoint folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        info = json.loads((path / "state.json").read_text())
        return info, load_file(str(path / "adapter.safetensors")), load_file(str(path / "optimizer.safetensors"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise UserError(f"checkpoint {path} is unreadable: {exc}") from None


def restore(trainer, info: dict, weights: dict, tensors: dict) -> None:
    """Put a freshly built trainer into the exact state of the checkpoint."""
    import torch

    model, opt = trainer.model, trainer.optimizer
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(weights):
        raise UserError("checkpoint does not match the adapter being trained (different LoRA layers)")
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != weights[n].shape:
                raise UserError(f"checkpoint tensor {n} has shape {tuple(weights[n].shape)}, "
                                f"expected {tuple(p.shape)}")
            p.copy_(weights[n])
    for group, saved in zip(opt.param_groups, info["optimizer"]["param_groups"]):
        group.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items()})
    for n, p in params.items():
        if n in info["optimizer"]["steps"]:
            opt.state[p] = {"step": torch.tensor(info["optimizer"]["steps"][n]),
                            "exp_avg": tensors[f"{n}.exp_avg"].to(p.device),
                            "exp_avg_sq": tensors[f"{n}.exp_avg_sq"].to(p.device)}
    trainer.scheduler.load_state_dict(info["scheduler"])
    trainer.loader.load_state_dict(info["loader"])
    st = trainer.state
    st.step, st.tokens_seen, st.train_seconds = info["step"], info["tokens_seen"], info["train_seconds"]
    st.history = info.get("history", [])
    restore_rng(info["rng"], tensors)
