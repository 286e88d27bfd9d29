"""Wrap a base model with LoRA (PEFT), and save/load adapters in PEFT's own format.

An adapter folder ``adapters/<name>_lora/`` holds exactly what PEFT writes
(``adapter_config.json``, ``adapter_model.safetensors``; PEFT also writes a README.md model
card) plus our metadata file ``lora_project.json``. Saving builds the folder under a
temporary name and swaps it in, so a crash never leaves a half-written adapter in place.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from lora_project.config import LoraSection
from lora_project.errors import UserError
from lora_project.models.adapter import (
    METADATA_FILE,
    REQUIRED_FILES,
    AdapterMetadata,
    check_adapter_dir,
    read_metadata,
    unique_adapter_labels,
)
from lora_project.utils.io_utils import atomic_directory, atomic_write_json


AUTO = "auto"              # the family's attention query/value projections, as PEFT maps them
ALL_LINEAR = "all-linear"  # every linear layer (nn.Linear and GPT-2's Conv1D) but the output layer


def target_kinds(model) -> dict[str, str]:
    """Module name (last path component) -> kind, for every layer offered as a LoRA target: 'linear'
    (torch.nn.Linear) or 'conv1d' (transformers' Conv1D, GPT-2 style, weight stored d_in x d_out,
    which PEFT wraps with fan_in_fan_out=True). Embedding layers are not offered: PEFT would save
    a full copy of the embedding matrix into every adapter. A name used by both kinds keeps the first."""
    import torch
    from transformers.pytorch_utils import Conv1D

    kinds: dict[str, str] = {}
    for name, m in model.named_modules():
        kind = "conv1d" if isinstance(m, Conv1D) else "linear" if isinstance(m, torch.nn.Linear) else None
        parts = name.split(".")
        if not kind or not name or any(p.startswith("lora_") for p in parts):
            continue  # LoRA's own factors, when the model already carries an adapter
        if parts[-1] == "base_layer" and len(parts) > 1:  # a layer PEFT has wrapped: named by its wrapper
            parts = parts[:-1]
        kinds.setdefault(parts[-1], kind)
    return kinds


def linear_module_names(model) -> list[str]:
    """Names of the linear layers of a model (nn.Linear and Conv1D): the valid LoRA targets."""
    return sorted(target_kinds(model))


def _output_layer_names(model) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if head is not None and m is head}


def default_targets(model_type: str):
    """PEFT's default target modules for a model type (a list, a regex string, or None)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)


def resolve_targets(model, targets: list[str], who: str = "") -> list[str]:
    """The explicit module names that `targets` means on this model.

    ``[auto]``: PEFT's default for the architecture (``config.model_type``): q_proj, v_proj for
    Llama, OPT, Qwen2, Gemma; c_attn for GPT-2; query_key_value for GPT-NeoX; ...
    ``[all-linear]``: every nn.Linear / Conv1D layer name except the output layer's.
    Anything else is returned unchanged (check_targets checks it exists)."""
    prefix = f"{who}: " if who else ""
    targets = list(targets)
    special = [t for t in targets if t in (AUTO, ALL_LINEAR)]
    if not special:
        return targets
    if len(targets) > 1:
        raise UserError(f"{prefix}lora.target_modules: '{special[0]}' stands alone, not in a list with other names")
    available = linear_module_names(model)
    if special[0] == ALL_LINEAR:
        head = _output_layer_names(model)
        return [n for n in available if n not in head]
    model_type = getattr(getattr(model, "config", None), "model_type", None) or "?"
    default = default_targets(model_type)
    if isinstance(default, str):  # a regex over full module paths (PEFT does this for a few families)
        import re

        default = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if re.fullmatch(default, n)})
    found = [t for t in (default or []) if t in available]
    if not default or len(found) != len(default):
        head = _output_layer_names(model)
        raise UserError(f"{prefix}lora.target_modules: auto has no default for architecture '{model_type}'; "
                        "set it to all-linear or to a list of the model's linear modules: "
                        f"{', '.join(n for n in available if n not in head)}")
    return list(default)


def lora_config(cfg: LoraSection, model=None):
    """The PEFT LoraConfig for a LoraSection; with the model, 'auto'/'all-linear' are resolved and
    fan_in_fan_out is set where the targets are Conv1D layers (GPT-2), as PEFT requires."""
    from peft import LoraConfig, TaskType

    targets = list(cfg.target_modules)
    fan_in_fan_out = False
    if model is not None:
        targets = resolve_targets(model, targets)
        kinds = target_kinds(model)
        # PEFT applies the flag per layer (and corrects it on a mismatched layer), so one Conv1D decides.
        fan_in_fan_out = any(kinds.get(t) == "conv1d" for t in targets)
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.r, lora_alpha=cfg.alpha,
                      lora_dropout=cfg.dropout, target_modules=targets, fan_in_fan_out=fan_in_fan_out,
                      use_rslora=cfg.use_rslora, bias=cfg.bias, use_dora=cfg.use_dora,
                      init_lora_weights=True if cfg.init_lora_weights == "default" else cfg.init_lora_weights)


def check_targets(model, cfg: LoraSection, who: str = "") -> list[str]:
    """The resolved target modules; refuses names the model does not have, naming the ones it has."""
    targets = resolve_targets(model, cfg.target_modules, who)
    kinds = target_kinds(model)
    head = _output_layer_names(model)
    prefix = f"{who}: " if who else ""
    offered = ", ".join(n for n in linear_module_names(model) if n not in head)
    on_head = [t for t in targets if t in head]
    if on_head:  # PEFT saves a full copy of the (often tied) output/embedding matrix with such an adapter,
        # and loading it writes that copy into the base every other model of the run shares
        raise UserError(f"{prefix}lora.target_modules: {', '.join(on_head)} is the output layer (its weight "
                        "shared with the input embedding where tied), not offered: its adapter would carry a full "
                        f"copy of it and change the base for other models; adapt these instead: {offered}")
    missing = [t for t in targets if t not in kinds]
    if missing:
        raise UserError(f"{prefix}lora.target_modules: {', '.join(missing)} not found in the model "
                        f"({getattr(model.config, 'model_type', '?')}); linear modules are: {offered}")
    return targets


def resolved_config(cfg, model, who: str = ""):
    """The RunConfig with lora.target_modules resolved on this model (what experiments and adapter
    metadata record)."""
    import dataclasses

    targets = check_targets(model, cfg.lora, who)
    return dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, target_modules=targets))


def skeleton_of(ref):
    """The model's architecture on the meta device (no weights, no memory), or None when it
    cannot be built that way (the checks that use it then run on the loaded model)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(ref.directory)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception:
        return None


def check_before_loading(ref, lora: LoraSection, training, precision: str) -> None:
    """The checks that need only the model's architecture, on one meta-device skeleton, so a bad
    target list or a step that cannot fit in memory is refused before any work."""
    skeleton = skeleton_of(ref)
    if skeleton is not None:
        check_targets(skeleton, lora)
        from lora_project.models.scoring import model_context

        context = model_context(skeleton)
        if context and context < training.seq_len:
            raise UserError(f"training.seq_len={training.seq_len} exceeds the model's context of {context} "
                            f"positions ({skeleton.config.model_type}); lower it")
        check_fits_memory(skeleton, training, precision)


def training_memory_gib(skeleton, batch_size: int, seq_len: int, bytes_per_value: int,
                        gradient_checkpointing: bool) -> float:
    """A rough lower bound on one training step's memory, in GiB: the frozen weights plus the
    activations autograd keeps. Activations per layer follow Korthikanti et al. (2022),
    34*s*b*h bytes at 16 bits (doubled for 32-bit values), without their 5*a*s^2*b term for the
    attention matrix, which SDPA's fused kernels never materialise; with gradient checkpointing
    only each layer's input (s*b*h values) is kept. A lower bound, so it refuses only settings
    that cannot fit, never one that might."""
    cfg = skeleton.config
    h = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
    weights = sum(p.numel() for p in skeleton.parameters()) * bytes_per_value
    tokens = batch_size * seq_len
    if gradient_checkpointing:
        acts = layers * tokens * h * bytes_per_value
    else:
        acts = layers * tokens * h * 34 * bytes_per_value / 2
    return (weights + acts) / 2**30


def available_memory_gib() -> float | None:
    """MemAvailable from /proc/meminfo (Linux), in GiB; None where it cannot be read."""
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def check_fits_memory(skeleton, training, precision: str) -> None:
    """Refuse a training step that needs far more memory than this machine has (the estimate is
    a lower bound; refused only above twice what is available)."""
    have = available_memory_gib()
    if have is None or training.device == "cuda":
        return
    need = training_memory_gib(skeleton, training.batch_size, training.seq_len, 2 if precision == "bf16" else 4,
                               training.gradient_checkpointing)
    if need > 2 * have:
        raise UserError(f"training.batch_size={training.batch_size} x training.seq_len={training.seq_len} needs "
                        f"about {need:,.0f} GiB for one step, this machine has {have:,.1f} GiB available; lower "
                        "them (or set training.gradient_checkpointing=true)")


def wrap_with_lora(model, cfg: LoraSection, seed: int):
    """Attach fresh LoRA weights. The seed is set here, right before initialisation."""
    from peft import get_peft_model

    from lora_project.utils.seeding import set_seed

    check_targets(model, cfg)
    config = lora_config(cfg, model)
    set_seed(seed)
    # autocast_adapter_dtype (PEFT default) keeps LoRA weights in fp32 on a bf16 base.
    return get_peft_model(model, config)


def save_adapter(peft_model, target: Path, metadata: AdapterMetadata | dict, overwrite: bool,
                 adapter_name: str | None = None) -> Path:
    """Write the PEFT adapter (one named adapter of a multi-adapter model, if given) plus our
    metadata (a plain dict is read as AdapterMetadata) atomically into `target`."""
    import shutil

    if isinstance(metadata, dict):
        metadata = AdapterMetadata.from_dict(metadata)

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
        atomic_write_json(tmp / METADATA_FILE, metadata.to_dict())
    return target


def attach_adapters(base_model, adapter_dirs: list[Path], base_fingerprint: str | None = None,
                    base_name: str | None = None):
    """Load several adapters onto one base (PEFT adapter switching; the base is loaded once).
    An adapter whose metadata names another base (by fingerprint) is refused, naming both bases.

    Returns (peft_model, names) where names[i] is the adapter name used for adapter_dirs[i].
    """
    from peft import PeftModel

    model = base_model
    names = []
    for i, d in enumerate(adapter_dirs):
        d = check_adapter_dir(Path(d))
        meta = read_metadata(d)
        fp = meta.base_fingerprint
        if base_fingerprint and fp and fp != base_fingerprint and not _both_embedded(meta.base_name, base_name):
            loaded = base_name or getattr(getattr(base_model, "config", None), "_name_or_path", "") or "?"
            raise UserError(f"adapter {d} was trained on base model {meta.base_name or '?'} ({fp[:12]}), "
                            f"not on the loaded base {loaded} ({base_fingerprint[:12]})")
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


def _both_embedded(recorded: str | None, loaded: str | None) -> bool:
    """The adapter's recorded base is the embedded model's cache folder and the loaded base is the
    embedded model (the folder's weights hash is not the GGUF's fingerprint; the model is the same)."""
    from lora_project.models.base_model import names_embedded

    return loaded == "embedded" and names_embedded(recorded)


def each_model(base, adapter_dirs: list[Path]) -> Iterator[tuple[str, object]]:
    """Yield ("base", model) and then (folder name, model) for each adapter, on one loaded base.

    The adapters are attached once with PEFT's adapter switching; the base is run with adapters
    disabled. Two adapters with the same folder name are refused before anything loads. When
    the loop ends (or breaks, or raises) the plain base model is put back into `base.model`.
    """
    adapter_dirs = [check_adapter_dir(Path(d)) for d in adapter_dirs]
    labels = unique_adapter_labels(adapter_dirs)
    if not adapter_dirs:
        yield "base", base.model
        return
    model, ids = attach_adapters(base.model, adapter_dirs, base.ref.fingerprint, base.ref.name)
    try:
        with model.disable_adapter():
            yield "base", model
        for label, aid in zip(labels, ids):
            model.set_adapter(aid)
            yield label, model
    finally:
        base.model = model.unload()
