"""Sampled utterances from the base model and each adapter, seeded and reproducible.

Each sample is one utterance: a prompt (the first word of a corpus utterance drawn with the
seed, or nothing) and the model's continuation up to its first line break or its end-of-sequence
token, sampled at temperature 1 (top-p 1 by default: the model's own distribution, which is
what a profile of "how it talks" should describe). Training packs one utterance per
document, separated by EOS, so an adapter ends its utterance with EOS or a newline.
"""

from __future__ import annotations

import random
from pathlib import Path

from lora_project.errors import UserError

PROMPT_MODES = ("start", "empty")


def draw_prompts(corpus_utterances: list[str], n: int, seed: int, mode: str = "start") -> list[str]:
    """`n` prompts: the first word of corpus utterances drawn with `seed` (with replacement), or n empty ones."""
    if mode not in PROMPT_MODES:
        raise UserError(f"--prompts must be one of {', '.join(PROMPT_MODES)}, got {mode!r}")
    if n < 1:
        raise UserError(f"--samples must be at least 1, got {n}")
    if mode == "empty":
        return [""] * n
    starts = [u.split()[0] for u in corpus_utterances if u.split()]
    if not starts:
        raise UserError("the corpus has no utterance to take a prompt from; use --prompts empty")
    rng = random.Random(seed)
    return [rng.choice(starts) for _ in range(n)]


def first_utterance(prompt: str, continuation: str) -> str:
    """Prompt + continuation, cut at the first line break (EOS already ended the continuation).

    Any line boundary counts (``str.splitlines``: also \\r, \\x0b, \\x1c, \\u2028, ...), so a
    sample is always one line of the samples file.
    """
    lines = (prompt + continuation).splitlines()
    return lines[0].strip() if lines else ""


def sample_utterances(cfg, adapters: list[Path], prompts: list[str], *, seed: int, max_new_tokens: int = 32,
                      temperature: float = 1.0, top_p: float = 1.0, base=None, log=None,
                      chunk: int = 50) -> dict[str, list[str]]:
    """{"base": [...], "<adapter folder name>": [...]}: one utterance per prompt and model.

    The base is loaded once (or passed in); adapters are switched with PEFT, so every model
    sees the same prompts and the same per-prompt seeds (seed + prompt index). Prompts go in
    chunks of `chunk` (same seeds as one call) so that `log` can report progress.
    """
    from lora_project.models.adapter import checked_adapters
    from lora_project.models.base_model import load_base
    from lora_project.models.lora_model import each_model
    from lora_project.models.sampling import generate_texts

    if temperature <= 0:
        raise UserError(f"--temperature must be above 0 for sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    adapters = checked_adapters(adapters)
    base = base or load_base(cfg)
    out = {}
    for label, model in each_model(base, adapters):
        texts: list[str] = []
        for start in range(0, len(prompts), chunk):
            texts += generate_texts(model, base.tokenizer, prompts[start:start + chunk], base.runtime,
                                    max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    seed=seed + start, stop_at_line_break=True)
            if log:
                log(f"sampling {label}: {len(texts)}/{len(prompts)}")
        out[label] = [first_utterance(p, t) for p, t in zip(prompts, texts)]
    return out
