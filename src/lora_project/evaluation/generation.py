"""Continuations of prompts from the base model and each adapter, side by side.

Greedy by default; with ``temperature > 0`` tokens are sampled (top-p), seeded per prompt
and model so that reruns print the same text. The base is loaded once; adapters are
switched with PEFT, and the base is run with adapters disabled.
"""

from __future__ import annotations

from pathlib import Path

from lora_project.errors import UserError
from lora_project.models.adapter import checked_adapters


def generate_side_by_side(cfg, prompts: list[str], adapters: list[Path], *, max_new_tokens: int = 30,
                          temperature: float = 0.0, top_p: float = 0.95, seed: int = 0, base=None,
                          prompts_file: Path | None = None) -> dict:
    """Continuations from the base and every adapter, with one base load.

    `prompts_file` adds one prompt per non-blank line of a UTF-8 file after `prompts`.
    """
    from lora_project.models.base_model import load_base
    from lora_project.models.lora_model import each_model
    from lora_project.models.sampling import generate_texts

    prompts = list(prompts)
    if prompts_file:
        from lora_project.data.preprocessor import read_text_file

        prompts += [line.strip() for line in read_text_file(prompts_file, encoding_option=False).splitlines() if line.strip()]
    if not prompts:
        raise UserError("give at least one prompt (--prompt TEXT or --prompts-file FILE)")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise UserError("--temperature must be >= 0 and --top-p in (0, 1]")
    adapters = checked_adapters(adapters)  # duplicate folder names would overwrite each other's output
    base = base or load_base(cfg)
    args = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    outputs = {label: generate_texts(model, base.tokenizer, prompts, base.runtime, **args)
               for label, model in each_model(base, adapters)}
    return {"prompts": prompts, "settings": args,
            "samples": [{"prompt": p, **{m: outputs[m][i] for m in outputs}} for i, p in enumerate(prompts)]}
