"""Re-create an adapter's initial LoRA factors from its recorded seed, without the base weights.

PEFT initialises A with kaiming-uniform draws from torch's global generator, module by module
in the model's order (B starts at zero), right after `wrap_with_lora` seeds it. Running that
same call under the same seed reproduces A exactly. Only the adapted Linear layers need real
storage for it: the rest of the model is built on the meta device (no weights, no memory), and
the target layers get uninitialised CPU storage, which draws nothing from the generator.
The caller's random states (Python, NumPy, torch) are restored afterwards.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from lora_project.config import LoraSection
from lora_project.errors import UserError

_ADAPTER_KEY = re.compile(r"^(?P<module>.+)\.lora_A\.[^.]+\.weight$")


def lora_section_of(config: dict | None) -> LoraSection | None:
    """The LoRA settings recorded in an adapter's metadata config (None when not recorded)."""
    lora = (config or {}).get("lora")
    if not isinstance(lora, dict):
        return None
    fields = {k: lora[k] for k in ("r", "alpha", "dropout", "target_modules", "use_rslora", "bias") if k in lora}
    try:
        return LoraSection(**fields)
    except TypeError:
        return None


def initial_lora_A(base_directory: Path | str, lora: LoraSection, seed: int) -> dict:
    """{PEFT module path: initial A (r x d_in, float32)} as `wrap_with_lora(model, lora, seed)`
    creates it on the base model whose config.json is in `base_directory`."""
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_project.models.lora_model import wrap_with_lora

    try:
        config = AutoConfig.from_pretrained(str(base_directory))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the base model config in {base_directory}: {str(exc).splitlines()[0]}") from None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    targets = set(lora.target_modules)
    for name, module in skeleton.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            module.to_empty(device="cpu")  # storage for PEFT to wrap; no random draws
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        wrapped = wrap_with_lora(skeleton, lora, seed)
        out = {}
        for key, p in wrapped.named_parameters():
            m = _ADAPTER_KEY.match(key)
            if m:
                out[m.group("module")] = p.detach().float().clone()
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
    return out
