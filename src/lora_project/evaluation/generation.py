"""Continuations of prompts from the base model and each adapter, side by side.

Greedy by default; with ``temperature > 0`` tokens are sampled (top-p), seeded per prompt
and model so that reruns print the same text. The base is loaded once; adapters are
switched with PEFT, and the base is run with adapters disabled.
"""

from __future__ import annotations

from pathlib import Path

from lora_project.errors import UserError


def generate_texts(model, tokenizer, prompts: list[str], runtime, *, max_new_tokens: int, temperature: float,
                   top_p: float, seed: int) -> list[str]:
    """Continuations of each prompt (greedy, or sampled with a per-prompt seed)."""
    import torch

    from lora_project.data.tokenizer_utils import prefix_id

    outs = []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([[prefix_id(tokenizer)] + tokenizer(prompt, add_special_tokens=False)["input_ids"]],
                           device=runtime.device)
        torch.manual_seed(seed + i)
        kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        with torch.inference_mode(), runtime.autocast():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs)
        outs.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return outs


def generate_side_by_side(cfg, prompts: list[str], adapters: list[Path], *, max_new_tokens: int = 30,
                          temperature: float = 0.0, top_p: float = 0.95, seed: int = 0, base=None) -> dict:
    """Continuations from the base and every adapter, with one base load."""
    from lora_project.models.lora_model import attach_adapters, check_adapter_dir
    from lora_project.training.run import load_base

    if not prompts:
        raise UserError("give at least one prompt (--prompt TEXT or --prompts-file FILE)")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise UserError("--temperature must be >= 0 and --top-p in (0, 1]")
    adapters = [check_adapter_dir(Path(a)) for a in adapters]
    base = base or load_base(cfg)
    model, ids = attach_adapters(base.model, adapters, base.ref.fingerprint) if adapters else (base.model, [])
    args = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    outputs = {}
    if adapters:
        with model.disable_adapter():
            outputs["base"] = generate_texts(model, base.tokenizer, prompts, base.runtime, **args)
        for d, aid in zip(adapters, ids):
            model.set_adapter(aid)
            outputs[d.name] = generate_texts(model, base.tokenizer, prompts, base.runtime, **args)
        base.model = model.unload()
    else:
        outputs["base"] = generate_texts(model, base.tokenizer, prompts, base.runtime, **args)
    return {"prompts": prompts, "settings": args,
            "samples": [{"prompt": p, **{m: outputs[m][i] for m in outputs}} for i, p in enumerate(prompts)]}
