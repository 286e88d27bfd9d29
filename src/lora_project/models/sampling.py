"""Text generation from a (possibly adapted) model: greedy, or seeded top-p sampling.

In ``models`` because several features sample: side-by-side generation, story data
generation, and the child-language profile.
"""

from __future__ import annotations

from lora_project.models.tokens import prefix_id


def generate_texts(model, tokenizer, prompts: list[str], runtime, *, max_new_tokens: int, temperature: float,
                   top_p: float, seed: int) -> list[str]:
    """Continuations of each prompt (greedy, or sampled with a per-prompt seed)."""
    import torch

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
