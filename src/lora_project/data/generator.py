"""Seeded, grammar-driven synthetic corpora (toddler and kids' speech).

The grammar is a YAML data file (``config/grammars/<kind>.yaml``) that users can edit; its
format is documented at the top of ``toddler.yaml``. Generation uses its own
``random.Random(seed)``, so the same grammar, seed and line count give the same bytes.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from lora_project.config import read_yaml
from lora_project.errors import UserError, did_you_mean
from lora_project.utils.io_utils import atomic_write_text, check_output_file

_REF = re.compile(r"<([A-Za-z_][A-Za-z0-9_]*)>")
_MAX_DEPTH = 20  # guards against a grammar whose symbols recurse forever

GRAMMAR_KINDS = ("toddler", "kids")
OUTPUT_NAMES = {"toddler": "toddler_data.txt", "kids": "kids.txt"}


@dataclass(frozen=True)
class Grammar:
    """An editable generative grammar (config/grammars/*.yaml): symbols -> alternatives."""
    name: str
    start: str
    rules: dict[str, list[str]]
    default_lines: int
    capitalise: bool

    @classmethod
    def load(cls, path: Path) -> "Grammar":
        data = read_yaml(path)
        problems = []
        rules = data.get("rules")
        if not isinstance(rules, dict) or not rules:
            raise UserError(f"{path}: 'rules' must be a mapping of symbol -> list of alternatives")
        clean: dict[str, list[str]] = {}
        for sym, alts in rules.items():
            if not isinstance(alts, list) or not alts:
                problems.append(f"rules.{sym}: expected a non-empty list")
                continue
            clean[str(sym)] = [str(a) for a in alts]
        start = str(data.get("start", "S"))
        if start not in clean:
            problems.append(f"start: symbol '{start}' has no rule{did_you_mean(start, clean)}")
        for sym, alts in clean.items():
            for alt in alts:
                for ref in _REF.findall(alt):
                    if ref not in clean:
                        problems.append(f"rules.{sym}: <{ref}> has no rule{did_you_mean(ref, clean)}")
        lines = data.get("default_lines", 5000)
        if not isinstance(lines, int) or lines < 1:
            problems.append(f"default_lines: expected a positive integer, got {lines!r}")
        if problems:
            raise UserError(f"{path}: " + "; ".join(sorted(set(problems))))
        name = str(data.get("name", path.stem))
        return cls(name, start, clean, lines, capitalise=(name == "kids" or bool(data.get("capitalise"))))

    def expand(self, rng: random.Random, symbol: str | None = None, depth: int = 0) -> str:
        if depth > _MAX_DEPTH:
            raise UserError(f"grammar '{self.name}': recursion deeper than {_MAX_DEPTH} at <{symbol}>")
        alt = rng.choice(self.rules[symbol or self.start])
        return _REF.sub(lambda m: self.expand(rng, m.group(1), depth + 1), alt)

    def sentence(self, rng: random.Random) -> str:
        text = " ".join(self.expand(rng).split())
        text = re.sub(r"\s+([.!?,])", r"\1", text)  # "ball ." -> "ball."
        if self.capitalise and text:
            text = text[0].upper() + text[1:]
        return text


def generate_lines(grammar: Grammar, n_lines: int, seed: int) -> list[str]:
    """`n_lines` sentences from `grammar`, seeded: the same grammar and seed give the same lines."""
    rng = random.Random(seed)
    return [grammar.sentence(rng) for _ in range(n_lines)]


def generate_corpus(grammar_path: Path, out_path: Path, seed: int = 0, n_lines: int | None = None,
                    overwrite: bool = True) -> dict:
    """Write one utterance per line to `out_path` (atomically). Returns a small summary."""
    grammar = Grammar.load(Path(grammar_path))
    n = grammar.default_lines if n_lines is None else n_lines
    if n < 1:
        raise UserError(f"--lines must be at least 1, got {n}")
    check_output_file(Path(out_path), overwrite)
    lines = generate_lines(grammar, n, seed)
    atomic_write_text(out_path, "\n".join(lines) + "\n")
    return {"grammar": str(grammar_path), "output": str(out_path), "lines": n,
            "unique_lines": len(set(lines)), "seed": seed}
