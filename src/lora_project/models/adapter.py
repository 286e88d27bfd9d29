"""The adapter-folder contract: what an adapter folder holds, our metadata file, reading and validating it.

This is the one place the contract is described and checked:

* An adapter folder ``adapters/<name>_lora/`` holds exactly what PEFT writes
  (``adapter_config.json``, ``adapter_model.safetensors``: `REQUIRED_FILES`) plus our
  ``lora_project.json`` (`METADATA_FILE`).
* ``adapter_config.json`` is a LoRA config (``peft_type`` LORA, a positive integer ``r``, a
  numeric ``lora_alpha``, ``target_modules`` a list of names or a pattern).
* ``adapter_model.safetensors`` holds only LoRA factors, keyed ``<module>.lora_A[.<adapter>].weight``
  and ``<module>.lora_B[.<adapter>].weight`` (`LORA_KEY`): finite, of the configured rank, on
  modules the config targets. Weights of the base itself (an embedding, lm_head, biases) are
  refused: loading them would change the base that the other models of a run share.
* ``lora_project.json`` is :class:`AdapterMetadata`, the one place that metadata is built and
  parsed. Adapters trained elsewhere (adopted, downloaded) have ``None`` for provenance fields
  that nobody recorded: unknown, never invented.

`check_adapter_dir` checks a folder against this contract before anything reads it; the factors
themselves and their math (scale, base weights, shapes) are in `lora_factors.py`.
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
# The key of a LoRA factor in adapter_model.safetensors: <module>.lora_A|B[.<adapter name>].weight
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


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
        m = LORA_KEY.match(key)
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
