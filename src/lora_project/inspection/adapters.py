"""Read adapters from disk without loading a model: listing, factors, base weights.

Module names are PEFT module paths, e.g. ``base_model.model.model.layers.3.self_attn.q_proj``;
the frozen weight of that module is ``model.layers.3.self_attn.q_proj.weight`` in the base
model's safetensors files, read lazily with ``safe_open`` (no full model load).
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from lora_project.errors import UserError
from lora_project.models.lora_model import METADATA_FILE, REQUIRED_FILES, read_metadata

_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class LoraModule:
    """The factors A (r x d_in) and B (d_out x r) and scale of one adapted module."""
    name: str          # PEFT module path
    A: object          # torch.Tensor (r, d_in)
    B: object          # torch.Tensor (d_out, r)
    scale: float

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
    metadata: dict
    modules: list[LoraModule]

    @property
    def base_fingerprint(self) -> str | None:
        return self.metadata.get("base_model", {}).get("fingerprint")

    @property
    def base_directory(self) -> Path | None:
        d = self.metadata.get("base_model", {}).get("directory") or self.config.get("base_model_name_or_path")
        return Path(d) if d and Path(d).is_dir() else None


def lora_scale(config: dict) -> float:
    """alpha / r, or alpha / sqrt(r) for rsLoRA, from a PEFT adapter config."""
    r = config.get("r") or 1
    alpha = config.get("lora_alpha", r)
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def load_adapter(path: Path) -> Adapter:
    """Factors of every LoRA module; any problem is a one-line UserError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from lora_project.models.lora_model import check_adapter_dir

    path = check_adapter_dir(Path(path))
    config = json.loads((path / "adapter_config.json").read_text())
    try:
        tensors = load_file(str(path / "adapter_model.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path}/adapter_model.safetensors is corrupt: {exc}") from None
    pairs: dict[str, dict] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
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
        modules.append(LoraModule(name, A, B, scale))
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

    def shape(self, key: str):
        from safetensors import safe_open

        if key not in self._index:
            return None
        with safe_open(str(self._index[key]), framework="pt") as fh:
            return tuple(fh.get_slice(key).get_shape())

    def get(self, key: str):
        from safetensors import safe_open

        if key not in self._index:
            raise UserError(f"base weight {key} not found in {self.directory}")
        with safe_open(str(self._index[key]), framework="pt") as fh:
            return fh.get_tensor(key).float()


def check_fits_base(adapter: Adapter, base: BaseWeights) -> None:
    """Refuse an adapter whose factor shapes do not fit the base model's weights."""
    for m in adapter.modules:
        shape = base.shape(m.base_weight_key)
        if shape is None:
            raise UserError(f"{adapter.path.name}: module {m.name} has no weight {m.base_weight_key} in the "
                            f"base model {base.directory}")
        expect = (m.B.shape[0], m.A.shape[1])
        if tuple(shape) != expect:
            raise UserError(f"{adapter.path.name}: module {m.name} expects a {expect[0]}x{expect[1]} base "
                            f"weight, the base has {shape[0]}x{shape[1]}")


def select_modules(adapter: Adapter, pattern: str) -> list[LoraModule]:
    """Modules whose PEFT path matches a glob (or ends with the given text); close names on a miss."""
    chosen = [m for m in adapter.modules if fnmatch.fnmatchcase(m.name, pattern) or m.name.endswith(pattern)]
    if not chosen:
        import difflib

        close = difflib.get_close_matches(pattern, [m.name for m in adapter.modules], n=3, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else \
            f"; e.g. {adapter.modules[0].name} or '*.layers.0.self_attn.q_proj'"
        raise UserError(f"module pattern {pattern!r} matches nothing in {adapter.path.name}{hint}")
    return chosen


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
                "base_model": meta.get("base_model", {}).get("name") or adapter.config.get("base_model_name_or_path"),
                "dataset": meta.get("dataset", {}).get("name"),
                "r": adapter.config.get("r"), "alpha": adapter.config.get("lora_alpha"),
                "target_modules": sorted(adapter.config.get("target_modules") or []),
                "trainable_parameters": sum(m.A.numel() + m.B.numel() for m in adapter.modules),
                "created": meta.get("created"), "mlflow_run_id": meta.get("mlflow_run_id"),
                "perplexity_before": meta.get("final_metrics", {}).get("before", {}).get("perplexity"),
                "perplexity_after": meta.get("final_metrics", {}).get("after", {}).get("perplexity"),
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
