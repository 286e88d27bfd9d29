"""A minimal pair as token ids: the shared prefix and the two continuations the scorer sums over.

Both sentences of a pair start with the same tokens (at least the BOS): the shared prefix. Its
tokens' log-probabilities count the same in both sentences' full sums, so the scorer leaves them
out of the pair's margin by default (minimal_pairs.score_pairs). (Until the
prefix tree (prefix_tree.py), one row per pair, [prefix | good[:-1] | bad[:-1]], was the whole
sharing; `row_length` is that row's length, kept for the sharing statistics.)

Below both the prefix tree, which is built from these, and the pair scorer (minimal_pairs.py),
which builds them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class SentencePair(Protocol):
    """What tokenizing needs of a pair (minimal_pairs.Pair is one): its two sentences."""
    good: str
    bad: str


@dataclass(frozen=True)
class PairTokens:
    """Token ids of a pair: the shared prefix (BOS included, at least one id) and each continuation (at least one id)."""
    prefix: tuple[int, ...]
    good: tuple[int, ...]
    bad: tuple[int, ...]

    @property
    def row_length(self) -> int:
        return len(self.prefix) + len(self.good) - 1 + len(self.bad) - 1


def tokenize_pairs(tokenizer, pairs: Sequence[SentencePair]) -> list[PairTokens]:
    """Each pair's ids with BOS (EOS if none) prefixed, split at the first differing token.

    The prefix stops at least one token before either sentence ends, so each continuation is
    non-empty (its first token is predicted from the prefix's last hidden state).
    """
    from lora_project.models.tokens import encode_documents, prefix_id

    first = prefix_id(tokenizer)
    good = encode_documents(tokenizer, [p.good for p in pairs])
    bad = encode_documents(tokenizer, [p.bad for p in pairs])
    out = []
    for g, b in zip(good, bad):
        g, b = [first] + g, [first] + b
        n = 1
        limit = min(len(g), len(b)) - 1
        while n < limit and g[n] == b[n]:
            n += 1
        out.append(PairTokens(tuple(g[:n]), tuple(g[n:]), tuple(b[n:])))
    return out
