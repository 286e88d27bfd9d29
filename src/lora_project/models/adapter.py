"""The adapter contract: what an adapter folder holds, our metadata file, and reading it.

An adapter folder ``adapters/<name>_lora/`` holds exactly what PEFT writes
(``adapter_config.json``, ``adapter_model.safetensors``) plus our ``lora_project.json``,
described by :class:`AdapterMetadata` — the one place that metadata is built and parsed.
Adapters trained elsewhere (adopted, downloaded) have ``None`` for provenance fields that
nobody recorded: unknown, never invented.

Reading needs no model: factors come from safetensors, and the frozen weight of module
``base_model.model.model.layers.3.self_attn.q_proj`` is ``model.layers.3.self_attn.q_proj.weight``
in the base model's safetensors files (or the same key without its first component, as in
checkpoints saved from the bare decoder: GPT-2's ``h.3.attn.c_attn.weight``), read lazily with
``safe_open``. Every update is dW = scale * B @ A in the nn.Linear orientation (d_out x d_in);
GPT-2's Conv1D layers store W0 transposed (d_in x d_out, PEFT's ``fan_in_fan_out``), so
`BaseWeights.weight_of` returns W0 transposed back for them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from lora_project.errors import UserError, first_of
from lora_project.utils.io_utils import recover_if_unlocked

METADATA_FILE = "lora_project.json"
METADATA_FORMAT = "lora_project.adapter/1"
REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class AdapterMetadata:
    """Our ``lora_project.json``: where an adapter came from and how well it did.

    Every field but ``format`` may be None (unknown) for adapters not trained by this tool.
    Keys this version does not know are kept in ``extra`` and written back unchanged.
    """

    adapter_name: str | None = None
    base_model: dict | None = None  # {name, kind, fingerprint, directory}
    dataset: dict | None = None  # {name, fingerprint, train_tokens, validation_tokens}
    tokenizer_fingerprint: str | None = None
    git_commit: str | None = None
    packages: dict | None = None  # package -> version at training time
    config: dict | None = None  # the resolved RunConfig as a dict
    final_metrics: dict | None = None  # {before: {...}, after: {...}} validation metrics
    mlflow_run_id: str | None = None
    experiment_dir: str | None = None
    created: str | None = None  # ISO 8601, UTC
    origin: str | None = None  # "trained", "merged", "adopted"; None in files older than this field
    extra: dict = field(default_factory=dict)
    format: str = METADATA_FORMAT

    @property
    def base_fingerprint(self) -> str | None:
        return (self.base_model or {}).get("fingerprint")

    @property
    def base_name(self) -> str | None:
        return (self.base_model or {}).get("name")

    @property
    def base_directory(self) -> str | None:
        return (self.base_model or {}).get("directory")

    @property
    def lora_variant(self) -> dict:
        """use_rslora, use_dora and init_lora_weights as trained (from the resolved config; {} if unknown)."""
        lora = (self.config or {}).get("lora") or {}
        return {k: lora[k] for k in ("use_rslora", "use_dora", "init_lora_weights") if k in lora}

    @property
    def dataset_name(self) -> str | None:
        return (self.dataset or {}).get("name")

    def metric(self, when: str, key: str) -> float | None:
        """A final validation metric, e.g. metric("after", "perplexity"); None when unknown."""
        return ((self.final_metrics or {}).get(when) or {}).get(key)

    def to_dict(self) -> dict:
        """Every known field (null = unknown, written so that readers see it was not recorded)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {"format": d.pop("format"), **d, **self.extra}

    @classmethod
    def from_dict(cls, data: dict, where: str = "metadata") -> AdapterMetadata:
        if not isinstance(data, dict):
            raise UserError(f"{where}: corrupt metadata (a JSON object was expected, got {type(data).__name__})")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        for k in ("base_model", "dataset", "packages", "config", "final_metrics"):
            if kwargs.get(k) is not None and not isinstance(kwargs[k], dict):
                raise UserError(f"{where}: corrupt metadata ('{k}' should be an object)")
        for k in ("adapter_name", "tokenizer_fingerprint", "git_commit", "mlflow_run_id", "experiment_dir",
                  "created", "origin", "format"):
            if kwargs.get(k) is not None and not isinstance(kwargs[k], str):
                raise UserError(f"{where}: corrupt metadata ('{k}' should be a string)")
        return cls(**kwargs, extra={k: v for k, v in data.items() if k not in known})


def now_iso() -> str:
    """The current time as ISO 8601 UTC, as ``created`` fields record it."""
    return datetime.now(timezone.utc).isoformat()


def read_metadata(adapter_dir: Path) -> AdapterMetadata:
    """The adapter's lora_project.json (all fields unknown when the file is absent)."""
    path = Path(adapter_dir) / METADATA_FILE
    if not path.is_file():
        return AdapterMetadata(format="")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path}: corrupt metadata (not JSON)") from None
    return AdapterMetadata.from_dict(data, str(path))


def check_adapter_dir(adapter_dir: Path) -> Path:
    """A complete, safetensors-only adapter folder, or a one-line UserError."""
    adapter_dir = Path(adapter_dir)
    recover_if_unlocked(adapter_dir)  # a save killed between its two renames left the old copy aside
    if not adapter_dir.is_dir():
        raise UserError(f"adapter folder not found: {adapter_dir}")
    missing = [f for f in REQUIRED_FILES if not (adapter_dir / f).is_file()]
    if missing:
        raise UserError(f"{adapter_dir} is not a complete adapter: missing {', '.join(missing)}")
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{adapter_dir}/adapter_config.json is corrupt (not JSON)") from None
    _check_config(adapter_dir, config)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{adapter_dir}/adapter_model.safetensors is corrupt: {exc}") from None
    _check_weights(adapter_dir, config, tensors)
    return adapter_dir


def _check_config(adapter_dir: Path, config) -> None:
    """The adapter_config.json fields every reader relies on, with the right types."""
    where = f"{adapter_dir}/adapter_config.json"
    if not isinstance(config, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(config).__name__}")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise UserError(f"{where}: peft_type {kind!r} is not a LoRA adapter (only LORA is supported)")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise UserError(f"{where}: 'r' must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise UserError(f"{where}: 'lora_alpha' must be a number, got {alpha!r}")
    targets = config.get("target_modules")
    if not (targets is None or isinstance(targets, str)
            or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise UserError(f"{where}: 'target_modules' must be a list of module names or a pattern")


def _check_weights(adapter_dir: Path, config: dict, tensors: dict) -> None:
    """LoRA factors present, finite, of the configured rank, on modules the config targets."""
    where = f"{adapter_dir}/adapter_model.safetensors"
    modules: dict[str, dict] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m:
            modules.setdefault(m.group("module"), {})[m.group("which")] = t
    if not modules:
        raise UserError(f"{where}: no LoRA weights (lora_A/lora_B) found")
    # Anything but LoRA's own tensors (an embedding or output-layer copy, modules_to_save, biases) is
    # loaded into the base itself, which the other models of a run share: refused, never loaded.
    full = sorted(k for k in tensors if ".lora_" not in k)
    if full:
        shown = first_of([k.removeprefix("base_model.model.") for k in full])
        raise UserError(f"{where}: carries weights of the base model itself ({shown}), as an adapter on "
                        "lm_head, an embedding or with trained biases does; loading it would change the base "
                        "for every other model, so it is not supported: retrain it on the linear layers inside "
                        "the blocks")
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(t.float().isfinite().all()):
            raise UserError(f"{where}: tensor {key} holds NaN or infinite values")
    targets = config.get("target_modules")
    if isinstance(targets, list) and targets:
        def targeted(name: str) -> bool:  # PEFT matches a target name as a suffix of the module path
            return any(name == t or name.endswith("." + t) for t in targets)

        stray = sorted({name.rsplit(".", 1)[-1] for name in modules if not targeted(name)})
        if stray:
            raise UserError(f"{where}: its weights are on modules {', '.join(stray) or '(none)'} but "
                            f"adapter_config.json targets {', '.join(targets)}; the adapter would do nothing")
    rank_pattern = config.get("rank_pattern") or {}
    for name, ab in modules.items():
        a = ab.get("A")
        if a is not None and a.ndim == 2 and not rank_pattern and a.shape[0] != config["r"]:
            raise UserError(f"{where}: module {name} has rank {a.shape[0]} but adapter_config.json says "
                            f"r={config['r']}")


def checked_adapters(adapters) -> list[Path]:
    """Complete adapter folders with distinct folder names, checked before any model loads."""
    dirs = [check_adapter_dir(Path(a)) for a in adapters]
    unique_adapter_labels(dirs)
    return dirs


def unique_adapter_labels(adapter_dirs: list[Path]) -> list[str]:
    """Display labels (folder names) of adapters; two adapters with one folder name are refused,
    since their outputs, table columns and saved results would overwrite each other."""
    labels = [Path(d).name for d in adapter_dirs]
    dupes = sorted({n for n in labels if labels.count(n) > 1})
    if dupes:
        raise UserError(f"two adapters share the folder name {dupes[0]!r}; their results would overwrite each "
                        "other (rename or copy one of them)")
    if "base" in labels:
        raise UserError("an adapter folder may not be called 'base' here: that label is the base model")
    return labels


_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
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
