"""Synthetic children's stories written by the base model (TinyStories style).

Prompts come from ``config/story_themes.yaml`` (characters x themes x places, drawn with
the seed). Instruct models get the tokenizer's chat template; sampling is seeded per batch,
so the same themes file, model, seed and batch size give the same stories. Each story is
one line (whitespace collapsed); exact duplicates and stories without a sentence end are
dropped, and generation goes on until the requested number is reached (or a bounded number
of extra attempts fails).
"""

from __future__ import annotations

import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from lora_project.config import read_yaml
from lora_project.errors import ConfigError, UserError
from lora_project.utils.io_utils import atomic_write_text


@dataclass
class StoryPrompts:
    """The story themes file (config/story_themes.yaml), validated."""
    system: str
    prompt: str
    characters: list[str]
    themes: list[str]
    places: list[str]
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 160
    default_stories: int = 40

    @classmethod
    def load(cls, path: Path) -> "StoryPrompts":
        data = read_yaml(Path(path))
        problems = []
        for key in ("characters", "themes", "places"):
            v = data.get(key)
            if not isinstance(v, list) or not v or not all(isinstance(x, str) and x.strip() for x in v):
                problems.append(f"{key}: expected a non-empty list of strings")
        prompt = data.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append("prompt: expected a string")
        else:
            unknown = set(re.findall(r"{(\w+)}", prompt)) - {"character", "theme", "place"}
            if unknown:
                problems.append(f"prompt: unknown placeholder(s) {', '.join(sorted(unknown))} "
                                "(use {character}, {theme}, {place})")
        sampling = data.get("sampling") or {}
        if not isinstance(sampling, dict):
            problems.append("sampling: expected a mapping")
            sampling = {}
        temperature, top_p = sampling.get("temperature", 0.8), sampling.get("top_p", 0.95)
        max_new = sampling.get("max_new_tokens", 160)
        if not isinstance(temperature, (int, float)) or not 0 < temperature <= 5:
            problems.append(f"sampling.temperature: expected a number in (0, 5], got {temperature!r}")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            problems.append(f"sampling.top_p: expected a number in (0, 1], got {top_p!r}")
        if not isinstance(max_new, int) or not 1 <= max_new <= 4096:
            problems.append(f"sampling.max_new_tokens: expected an integer in [1, 4096], got {max_new!r}")
        n = data.get("default_stories", 40)
        if not isinstance(n, int) or n < 1:
            problems.append(f"default_stories: expected a positive integer, got {n!r}")
        known = {"system", "prompt", "characters", "themes", "places", "sampling", "default_stories"}
        problems += [f"unknown key '{k}'" for k in data if k not in known]
        if problems:
            raise ConfigError(problems, source=str(path))
        return cls(system=str(data.get("system") or ""), prompt=prompt, characters=data["characters"],
                   themes=data["themes"], places=data["places"], temperature=float(temperature),
                   top_p=float(top_p), max_new_tokens=max_new, default_stories=n)

    def draw(self, rng: random.Random) -> str:
        return self.prompt.format(character=rng.choice(self.characters), theme=rng.choice(self.themes),
                                  place=rng.choice(self.places))


def _encode(tokenizer, prompts: StoryPrompts, text: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": prompts.system}] if prompts.system else []) + \
                   [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    from lora_project.models.tokens import prefix_id

    return [prefix_id(tokenizer)] + tokenizer(text, add_special_tokens=False)["input_ids"]


def clean_story(text: str) -> str | None:
    """One line; a leading 'Title:'/'Once upon a time' header line is kept as text; an
    unfinished last sentence is cut back to the last sentence end (None if nothing is left)."""
    text = " ".join(text.replace("*", " ").split())
    text = re.sub(r"^(?:Title|Story)\s*:\s*", "", text, flags=re.I)
    end = max(text.rfind(c) for c in ".!?\"”")
    if end < 0:
        return None
    text = text[: end + 1].strip()
    return text if len(text.split()) >= 5 else None


def generate_stories(model, tokenizer, prompts: StoryPrompts, n: int, seed: int, runtime, batch_size: int = 4,
                     progress: bool = True) -> tuple[list[str], dict]:
    """Sample stories with the base model until `n` distinct finished ones exist (or attempts run out)."""
    import torch

    rng = random.Random(seed)
    stories: list[str] = []
    seen: set[str] = set()
    counts = {"generated": 0, "duplicates": 0, "unfinished": 0}
    max_attempts = 2 * n + 8
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="stories", unit="story", file=sys.stderr)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch_index = 0
    while len(stories) < n and counts["generated"] < max_attempts:
        size = min(batch_size, n - len(stories))
        encoded = [_encode(tokenizer, prompts, prompts.draw(rng)) for _ in range(size)]
        width = max(len(e) for e in encoded)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=runtime.device)  # left pad
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=runtime.device)
        torch.manual_seed((seed * 1_000_003 + batch_index) % 2**64)  # any --seed (up to 2^63-1) fits
        batch_index += 1
        with torch.inference_mode(), runtime.autocast():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                 temperature=prompts.temperature, top_p=prompts.top_p,
                                 max_new_tokens=prompts.max_new_tokens, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id)
        for row in out[:, width:]:
            counts["generated"] += 1
            story = clean_story(tokenizer.decode(row, skip_special_tokens=True))
            if story is None:
                counts["unfinished"] += 1
            elif story in seen:
                counts["duplicates"] += 1
            elif len(stories) < n:
                seen.add(story)
                stories.append(story)
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    return stories, counts


def write_stories(cfg, themes_path: Path, out: Path, n: int | None, seed: int, batch_size: int = 4,
                  progress: bool = True, base=None, overwrite: bool = True) -> dict:
    """Load the base model (or reuse `base`), write `n` stories to `out`, one per line."""
    from lora_project.models.base_model import load_base
    from lora_project.utils.io_utils import check_output_file

    check_output_file(Path(out), overwrite)  # before the model loads

    prompts = StoryPrompts.load(themes_path)
    n = prompts.default_stories if n is None else n
    if n < 1:
        raise UserError(f"--lines must be at least 1, got {n}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    base = base or load_base(cfg)
    base.model.eval()
    stories, counts = generate_stories(base.model, base.tokenizer, prompts, n, seed, base.runtime,
                                       batch_size=batch_size, progress=progress)
    if not stories:
        raise UserError(f"the model finished no story in {counts['generated']} attempts; raise "
                        "sampling.max_new_tokens in the themes file")
    atomic_write_text(Path(out), "\n".join(stories) + "\n")
    return {"out": str(out), "stories": len(stories), "requested": n, "seed": seed, "model": base.ref.name,
            **counts}
