"""Scoring the BabyLM ranking tasks through the prefix tree, with the official pipeline's definitions.

The official `causal` backend (temperature 1) scores each option on its own: the tokenizer's BOS
is prepended only when the tokenizer has one (no EOS fallback: without a BOS the first token is
not scored), the text is tokenized without special tokens, and the option's score is the sum of
the log-probabilities of the tokens whose character span ends after the context, i.e. every token
that overlaps the completion (`end > len(text) - len(completion)`; a token straddling the
boundary, like " the" after "Box 1 contains ", counts). The chosen option is the first one with the
highest score, so a tie picks option 0, the right one.

Here every option of every item of a task goes into one prefix tree (evaluation/prefix_tree.py):
options that share a context share its computation, across items too, and every token's
log-probability comes from the fp32 pass. The sums are the same numbers up to float rounding
(float64 sums of fp32 log-probabilities here; fp32 sums upstream).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lora_project.evaluation.prefix_tree import ROW_TOKENS, PrefixTree, tree_rows
from lora_project.evaluation.tree_pass import tree_logprobs

_BATCH_TEXTS = 1000  # texts per tokenizer call


def sequence_tree(seqs: Sequence[Sequence[int]]) -> PrefixTree:
    """The prefix tree of token sequences (each: every token but the last is an input node); item
    k of sequence s predicts seqs[s][k + 1]. Sequences of one token have no items."""
    token: list[int] = []
    parent: list[int] = []
    depth: list[int] = []
    children: list[list[int]] = []
    roots: list[int] = []
    child_of: dict[tuple[int, int], int] = {}
    item_of: dict[tuple[int, int], int] = {}
    items: list[tuple[int, int]] = []
    seq_items: list[list[int]] = []
    for full in seqs:
        node, mine = -1, []
        for k in range(len(full) - 1):
            nxt = child_of.get((node, full[k]))
            if nxt is None:
                nxt = child_of[(node, full[k])] = len(token)
                token.append(full[k]), parent.append(node), depth.append(k), children.append([])
                (children[node] if node >= 0 else roots).append(nxt)
            node = nxt
            item = item_of.get((node, full[k + 1]))
            if item is None:
                item = item_of[(node, full[k + 1])] = len(items)
                items.append((node, full[k + 1]))
            mine.append(item)
        seq_items.append(mine)
    return PrefixTree(token, parent, depth, children, roots, items, seq_items)


@dataclass(frozen=True)
class ScoredText:
    """A text as the scorer runs it: token ids (BOS first when the tokenizer has one) and the
    positions (indices into ids, each >= 1) whose log-probabilities are summed."""
    ids: tuple[int, ...]
    scored: tuple[int, ...]


def official_bos(tokenizer) -> list[int]:
    """The official rule: the tokenizer's BOS when it has one, else nothing (no EOS fallback)."""
    return [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]


def completion_texts(tokenizer, texts: Sequence[str], completions: Sequence[str]) -> list[ScoredText]:
    """Each text tokenized without special tokens, BOS prepended per `official_bos`, and the
    positions of the tokens whose character span ends after len(text) - len(completion)."""
    bos = official_bos(tokenizer)
    out: list[ScoredText] = []
    for i in range(0, len(texts), _BATCH_TEXTS):
        chunk = list(texts[i:i + _BATCH_TEXTS])
        enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
        for text, comp, ids, offsets in zip(chunk, completions[i:i + _BATCH_TEXTS], enc["input_ids"],
                                            enc["offset_mapping"]):
            start = len(text) - len(comp)
            scored = tuple(k + len(bos) for k, (_, end) in enumerate(offsets) if end > start and k + len(bos) >= 1)
            out.append(ScoredText(tuple(bos + list(ids)), scored))
    return out


@dataclass(frozen=True)
class TextTree:
    """Texts with their prefix tree and its row layout: everything the scoring pass needs that does
    not depend on the model. The base and its adapters share a tokenizer, so one `TextTree` per task
    serves every model of a run (`text_tree` once, `tree_sums` per model)."""
    texts: tuple[ScoredText, ...]
    tree: PrefixTree
    rows: list[list[int]]
    row_tokens: int

    @property
    def forward_tokens(self) -> int:
        """Positions one pass runs (path copies included, padding not)."""
        return sum(len(r) for r in self.rows)


def text_tree(texts: Sequence[ScoredText], row_tokens: int = ROW_TOKENS) -> TextTree:
    """The prefix tree of the texts' token ids and its rows, built once."""
    tree = sequence_tree([t.ids for t in texts])
    return TextTree(tuple(texts), tree, tree_rows(tree, row_tokens) if texts else [], row_tokens)


def tree_sums(model, texts: Sequence[ScoredText] | TextTree, runtime, *, batch_tokens: int = 2048, progress=None,
              row_tokens: int = ROW_TOKENS) -> np.ndarray:
    """Sum of the scored positions' fp32 log-probabilities of each text (float64), every text in
    one prefix tree. progress(fraction done) after each batch. Given a `TextTree`, its tree and rows
    are used as they are (nothing rebuilt; `row_tokens` is then the tree's own)."""
    built = texts if isinstance(texts, TextTree) else text_tree(texts, row_tokens)
    if not built.texts:
        return np.zeros(0)
    tree = built.tree
    scored = [tree.sentence_items[s][j - 1] for s, t in enumerate(built.texts) for j in t.scored]
    logp, _ = tree_logprobs(model, tree, runtime, "fp32", row_tokens=built.row_tokens, batch_tokens=batch_tokens,
                            progress=progress, rows=built.rows, items=scored)
    return np.array([float(logp[[tree.sentence_items[s][j - 1] for j in t.scored]].sum()) if t.scored else 0.0
                     for s, t in enumerate(built.texts)])


def tree_positions(texts: Sequence[ScoredText] | TextTree, row_tokens: int = ROW_TOKENS) -> dict:
    """Forward positions: one row per text (the official strategy, padding not counted) against the tree."""
    built = texts if isinstance(texts, TextTree) else text_tree(texts, row_tokens)
    plain = sum(max(0, len(t.ids) - 1) for t in built.texts)
    return {"forward_tokens_per_text": plain, "forward_tokens_tree": built.forward_tokens}


def option_scores(model, tokenizer, items, runtime, *, texts: Sequence[ScoredText] | TextTree | None = None,
                  batch_tokens: int = 2048, progress=None) -> list[np.ndarray]:
    """Per item, the score of each of its options (official definition, fp32 tree pass). `texts`:
    the items' `item_texts`, or their `text_tree` to reuse over several models."""
    texts = texts if texts is not None else item_texts(tokenizer, items)
    sums = tree_sums(model, texts, runtime, batch_tokens=batch_tokens, progress=progress)
    out, k = [], 0
    for it in items:
        out.append(sums[k:k + len(it.texts)])
        k += len(it.texts)
    return out


def item_texts(tokenizer, items) -> list[ScoredText]:
    """Every option of every item, in order, as `completion_texts` tokenizes them."""
    return completion_texts(tokenizer, [t for it in items for t in it.texts],
                            [c for it in items for c in it.completions])


def decisions(scores: Sequence[np.ndarray]) -> dict:
    """Official decisions (the first highest option wins, so a tie is right), strict decisions
    (a tie is wrong), ties, and each item's margin: option 0's score minus the best other one."""
    margin = np.array([float(s[0] - np.max(s[1:])) for s in scores])
    return {"official": margin >= 0, "strict": margin > 0, "ties": int(np.sum(margin == 0)), "margin": margin}
