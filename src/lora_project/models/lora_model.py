"""Wrap a base model with LoRA (PEFT), and save/load adapters in PEFT's own format.

An adapter folder ``adapters/<name>_lora/`` holds exactly what PEFT writes
(``adapter_config.json``, ``adapter_model.safetensors``; PEFT also writes a README.md model
card) plus our metadata file ``lora_project.json``. Saving builds the folder under a
temporary name and swaps it in, so a crash never leaves a half-written adapter in place.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_project.errors import UserError
from lora_project.utils.config_utils import LoraSection
from lora_project.utils.io_utils import (
    atomic_directory,
    atomic_write_json,
    recover_if_unlocked,
)

METADATA_FILE = "lora_project.json"
REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")


def linear_module_names(model) -> list[str]:
    """Names of the Linear module types of a model (valid LoRA targets)."""
    import torch

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def lora_config(cfg: LoraSection):
    """The PEFT LoraConfig for a LoraSection."""
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.r, lora_alpha=cfg.alpha,
                      lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
                      use_rslora=cfg.use_rslora, bias=cfg.bias)


def wrap_with_lora(model, cfg: LoraSection, seed: int):
    """Attach fresh LoRA weights. The seed is set here, right before initialisation."""
    from peft import get_peft_model

    from lora_project.utils.seed import set_seed

    available = linear_module_names(model)
    missing = [t for t in cfg.target_modules if t not in available]
    if missing:
        raise UserError(f"lora.target_modules: {', '.join(missing)} not found in the model; "
                        f"linear modules are: {', '.join(available)}")
    set_seed(seed)
    # autocast_adapter_dtype (PEFT default) keeps LoRA weights in fp32 on a bf16 base.
    return get_peft_model(model, lora_config(cfg))


def save_adapter(peft_model, target: Path, metadata: dict, overwrite: bool, adapter_name: str | None = None) -> Path:
    """Write the PEFT adapter (one named adapter of a multi-adapter model, if given) plus our
    metadata atomically into `target`."""
    import shutil

    if target.exists() and not overwrite:
        raise UserError(f"adapter {target} already exists; pass --overwrite to replace it")
    with atomic_directory(target, overwrite=overwrite) as tmp:
        if adapter_name is None:
            peft_model.save_pretrained(str(tmp), safe_serialization=True)
        else:  # PEFT puts non-default adapters in a subfolder named after the adapter
            staging = tmp / "_peft"
            peft_model.save_pretrained(str(staging), selected_adapters=[adapter_name], safe_serialization=True)
            src = staging / adapter_name if (staging / adapter_name).is_dir() else staging
            for f in src.iterdir():
                shutil.move(str(f), tmp / f.name)
            shutil.rmtree(staging)
        missing = [f for f in REQUIRED_FILES if not (tmp / f).is_file()]
        if missing:
            raise RuntimeError(f"PEFT did not write {missing}")
        atomic_write_json(tmp / METADATA_FILE, metadata)
    return target


def read_metadata(adapter_dir: Path) -> dict:
    """Our lora_project.json of an adapter ({} when absent or unreadable)."""
    path = Path(adapter_dir) / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path}: corrupt metadata (not JSON)") from None


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
        json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{adapter_dir}/adapter_config.json is corrupt (not JSON)") from None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as fh:
            list(fh.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{adapter_dir}/adapter_model.safetensors is corrupt: {exc}") from None
    return adapter_dir


def attach_adapters(base_model, adapter_dirs: list[Path], base_fingerprint: str | None = None):
    """Load several adapters onto one base (PEFT adapter switching; the base is loaded once).

    Returns (peft_model, names) where names[i] is the adapter name used for adapter_dirs[i].
    """
    from peft import PeftModel

    model = base_model
    names = []
    for i, d in enumerate(adapter_dirs):
        d = check_adapter_dir(Path(d))
        meta = read_metadata(d)
        fp = meta.get("base_model", {}).get("fingerprint")
        if base_fingerprint and fp and fp != base_fingerprint:
            raise UserError(f"adapter {d} was trained on base model "
                            f"{meta.get('base_model', {}).get('name', '?')} ({fp[:12]}), not on the "
                            f"loaded base ({base_fingerprint[:12]})")
        name = f"a{i}"
        try:
            if i == 0:
                model = PeftModel.from_pretrained(base_model, str(d), adapter_name=name, is_trainable=False)
            else:
                model.load_adapter(str(d), adapter_name=name, is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"adapter {d} does not fit the base model: {first[:300]}") from None
        names.append(name)
    return model, names
