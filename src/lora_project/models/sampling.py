"""Text generation from a (possibly adapted) model: greedy, or seeded top-p sampling.

In ``models`` because several features sample: side-by-side generation, story data
generation, and the child-language profile.
"""

from __future__ import annotations

from lora_project.models.tokens import prefix_id


_LINE_BREAK_IDS: dict[int, list[int]] = {}


def line_break_ids(tokenizer) -> list[int]:
    """Every token whose text contains a line break (any of ``str.splitlines``' boundaries),
    found once per tokenizer by decoding the vocabulary."""
    key = id(tokenizer)
    if key not in _LINE_BREAK_IDS:
        ids = []
        for i in range(len(tokenizer)):
            text = tokenizer.decode([i])
            if text and len(("x" + text + "x").splitlines()) > 1:
                ids.append(i)
        _LINE_BREAK_IDS[key] = ids
    return _LINE_BREAK_IDS[key]


def generate_texts(model, tokenizer, prompts: list[str], runtime, *, max_new_tokens: int, temperature: float,
                   top_p: float, seed: int, stop_at_line_break: bool = False) -> list[str]:
    """Continuations of each prompt (greedy, or sampled with a per-prompt seed).

    `stop_at_line_break` ends a continuation at the first token that contains a line break (as
    at the end-of-sequence token), for callers that keep only the first line: the same first line,
    without generating the rest up to `max_new_tokens`.
    """
    import torch

    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if stop_at_line_break:
        stops = sorted(set(stops) | set(line_break_ids(tokenizer)))
    outs = []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([[prefix_id(tokenizer)] + tokenizer(prompt, add_special_tokens=False)["input_ids"]],
                           device=runtime.device)
        torch.manual_seed(seed + i)
        kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        with torch.inference_mode(), runtime.autocast():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.eos_token_id, eos_token_id=stops or None, **kwargs)
        outs.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return outs
