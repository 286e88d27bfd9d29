"""LoRA factor math: the factors of an adapter's modules, their scale, and the base weights they update.

Reading needs no model: `load_adapter` reads the factors from a folder that `adapter.check_adapter_dir`
has checked against the adapter-folder contract (models/adapter.py), and the frozen weight of
module ``base_model.model.model.layers.3.self_attn.q_proj`` is ``model.layers.3.self_attn.q_proj.weight``
in the base model's safetensors files (or the same key without its first component, as in
checkpoints saved from the bare decoder: GPT-2's ``h.3.attn.c_attn.weight``), read lazily with
``safe_open`` (`BaseWeights`). Every update is dW = scale * B @ A in the nn.Linear orientation
(d_out x d_in), with scale = `lora_scale`; GPT-2's Conv1D layers store W0 transposed (d_in x d_out,
PEFT's ``fan_in_fan_out``), so `BaseWeights.weight_of` returns W0 transposed back for them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from lora_project.errors import UserError
from lora_project.models.adapter import (
    LORA_KEY,
    METADATA_FILE,
    REQUIRED_FILES,
    AdapterMetadata,
    check_adapter_dir,
    read_metadata,
)

_LAYER = re.compile(r"\.(\d+)\.")  # the block index: model.layers.3. / transformer.h.3. / gpt_neox.layers.3.


@dataclass
class LoraModule:
    """The factors A (r x d_in) and B (d_out x r) and scale of one adapted module."""
    name: str          # PEFT module path
    A: object          # torch.Tensor (r, d_in)
    B: object          # torch.Tensor (d_out, r)
    scale: float
    fan_in_fan_out: bool = False  # the base layer stores its weight d_in x d_out (GPT-2's Conv1D)

    @property
    def layer(self) -> int | None:
        m = _LAYER.search(self.name + ".")
        return int(m.group(1)) if m else None

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def base_weight_key(self) -> str:
        name = self.name
        for prefix in ("base_model.model.",):
            if name.startswith(prefix):
                name = name[len(prefix):]
        return name + ".weight"


@dataclass
class Adapter:
    """An adapter folder read with safetensors: config, our metadata and every LoRA module."""
    path: Path
    config: dict
    metadata: AdapterMetadata
    modules: list[LoraModule]

    @property
    def base_fingerprint(self) -> str | None:
        return self.metadata.base_fingerprint

    @property
    def base_directory(self) -> Path | None:
        d = self.metadata.base_directory or self.config.get("base_model_name_or_path")
        return Path(d) if d and Path(d).is_dir() else None


def lora_scale(config: dict) -> float:
    """alpha / r, or alpha / sqrt(r) for rsLoRA, from a PEFT adapter config."""
    r = config.get("r") or 1
    alpha = config.get("lora_alpha", r)
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def require_plain_lora(adapter: Adapter, what: str) -> Adapter:
    """Refuse a DoRA adapter where the code assumes the update is exactly scale * B @ A."""
    if adapter.config.get("use_dora"):
        raise UserError(f"{adapter.path.name} is a DoRA adapter (use_dora): {what} assumes the update is "
                        "scale * B @ A and would leave out its trained magnitude vector; not supported")
    return adapter


def load_adapter(path: Path) -> Adapter:
    """Factors of every LoRA module; any problem is a one-line UserError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = check_adapter_dir(Path(path))
    config = json.loads((path / "adapter_config.json").read_text())
    try:
        tensors = load_file(str(path / "adapter_model.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path}/adapter_model.safetensors is corrupt: {exc}") from None
    pairs: dict[str, dict] = {}
    for key, t in tensors.items():
        m = LORA_KEY.match(key)
        if m:
            pairs.setdefault(m.group("module"), {})[m.group("which")] = t.float()
    scale = lora_scale(config)
    modules = []
    for name in sorted(pairs, key=_natural_key):
        ab = pairs[name]
        if set(ab) != {"A", "B"}:
            raise UserError(f"{path}: module {name} lacks lora_{'A' if 'A' not in ab else 'B'}")
        A, B = ab["A"], ab["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise UserError(f"{path}: module {name} has factors of shapes {tuple(A.shape)} and "
                            f"{tuple(B.shape)} that do not multiply")
        modules.append(LoraModule(name, A, B, scale, bool(config.get("fan_in_fan_out"))))
    if not modules:
        raise UserError(f"{path}: no LoRA weights found in adapter_model.safetensors")
    return Adapter(path, config, read_metadata(path), modules)


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


class BaseWeights:
    """Lazy access to a base model's frozen weights by name (safetensors only)."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        self._handles = {}
        self._index: dict[str, Path] = {}
        for f in sorted(self.directory.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    self._index[k] = f
        if not self._index:
            raise UserError(f"base model folder {self.directory} has no .safetensors weights")

    def key_of(self, key: str) -> str | None:
        """The stored key for a weight name, also when the checkpoint holds the bare decoder (its keys
        lack the first component, e.g. ``transformer.``) or a wrapper (one more leading component)."""
        if key in self._index:
            return key
        short = key.split(".", 1)[-1]
        if short in self._index:
            return short
        longer = [k for k in self._index if k.endswith("." + key)]
        return longer[0] if len(longer) == 1 else None

    def shape(self, key: str):
        from safetensors import safe_open

        key = self.key_of(key)
        if key is None:
            return None
        with safe_open(str(self._index[key]), framework="pt") as fh:
            return tuple(fh.get_slice(key).get_shape())

    def get(self, key: str):
        from safetensors import safe_open

        found = self.key_of(key)
        if found is None:
            raise UserError(f"base weight {key} not found in {self.directory}")
        with safe_open(str(self._index[found]), framework="pt") as fh:
            return fh.get_tensor(found).float()

    def weight_of(self, m: LoraModule):
        """The frozen weight W0 of an adapted module in the orientation of its update, d_out x d_in."""
        w = self.get(m.base_weight_key)
        return w.T if _transposed(m, tuple(w.shape)) else w


def _transposed(m: LoraModule, shape: tuple) -> bool:
    """Whether the base stores this module's weight d_in x d_out: PEFT's fan_in_fan_out (Conv1D), or a
    non-square weight that only fits that way round."""
    d_out, d_in = m.B.shape[0], m.A.shape[1]
    return shape == (d_in, d_out) and (m.fan_in_fan_out or d_in != d_out)


def check_fits_base(adapter: Adapter, base: BaseWeights) -> None:
    """Refuse an adapter whose factor shapes do not fit the base model's weights."""
    for m in adapter.modules:
        shape = base.shape(m.base_weight_key)
        if shape is None:
            raise UserError(f"{adapter.path.name}: module {m.name} has no weight {m.base_weight_key} in the "
                            f"base model {base.directory}")
        expect = (m.B.shape[0], m.A.shape[1])
        if _transposed(m, tuple(shape)):
            shape = tuple(reversed(shape))
        if tuple(shape) != expect:
            raise UserError(f"{adapter.path.name}: module {m.name} expects a {expect[0]}x{expect[1]} base "
                            f"weight, the base has {shape[0]}x{shape[1]}")


def list_adapters(folder: Path) -> list[dict]:
    """One row per adapter folder; broken adapters are rows with status 'broken' and a reason."""
    rows = []
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"adapter folder not found: {folder}")
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        row = {"name": d.name, "path": str(d), "status": "ok", "reason": "",
               "size_bytes": sum(f.stat().st_size for f in d.rglob("*") if f.is_file())}
        try:
            missing = [f for f in REQUIRED_FILES if not (d / f).is_file()]
            if missing:
                raise UserError(f"missing {', '.join(missing)}")
            adapter = load_adapter(d)
            meta = adapter.metadata
            row.update({
                "base_model": meta.base_name or adapter.config.get("base_model_name_or_path"),
                "dataset": meta.dataset_name,
                "r": adapter.config.get("r"), "alpha": adapter.config.get("lora_alpha"),
                "target_modules": sorted(adapter.config.get("target_modules") or []),
                "trainable_parameters": sum(m.A.numel() + m.B.numel() for m in adapter.modules),
                "created": meta.created, "mlflow_run_id": meta.mlflow_run_id,
                "perplexity_before": meta.metric("before", "perplexity"),
                "perplexity_after": meta.metric("after", "perplexity"),
            })
            if adapter.base_directory is not None:
                check_fits_base(adapter, BaseWeights(adapter.base_directory))
            if not (d / METADATA_FILE).is_file():
                row["reason"] = "no lora_project.json (not trained by this tool)"
        except UserError as exc:
            row.update(status="broken", reason=str(exc).replace(str(d) + "/", "").replace(str(d) + ": ", ""))
        except Exception as exc:  # the listing never crashes on one bad folder
            row.update(status="broken", reason=f"{type(exc).__name__}: {exc}"[:300])
        rows.append(row)
    return rows
