"""The prefix tree the minimal-pair scorer runs: every sentence's tokens once per distinct beginning.

A pair's two sentences share their beginning (at least the BOS). Across pairs, sentences share more: the same
opening words ("The", "There were", a paradigm's template) recur over thousands of pairs. So
every sentence of a scoring call goes into one prefix tree of its input tokens (BOS + every
token but the last), where a token sequence that several sentences start with is one node,
computed once. The tree is cut into pieces of at most `row_tokens` positions (a piece: the path
from the root down to one or more sibling subtrees, then those subtrees), pieces are packed into
rows, and each row runs as one forward pass with position ids = depth and an attention mask
that lets each position see its ancestors and itself only: each node's hidden state equals the
per-sentence one up to float rounding (on SDPA models the mask is applied in chunks of queries
against the keys they may see: evaluation/tree_attention.py). A sentence's sum adds the log-probability of each of its
tokens read at the node of the tokens before it; a (node, next token) shared by several
sentences is computed once and counts in each. On full BLiMP the tree runs 0.50 of the
per-sentence forward tokens, against 0.69 for one row per pair sharing only the pair's own
beginning (research notes).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from lora_project.evaluation.pair_tokens import PairTokens

ROW_TOKENS = 256


@dataclass
class PrefixTree:
    """Nodes (token, parent, depth; parents before children) and, per sentence, its scored items:
    indices into `items`, the unique (node, next token) pairs."""
    token: list[int]
    parent: list[int]
    depth: list[int]
    children: list[list[int]]
    roots: list[int]
    items: list[tuple[int, int]]
    sentence_items: list[list[int]]  # sentence 2i: pair i's good sentence, 2i + 1: its bad one


def restricted(tree: PrefixTree, nodes) -> PrefixTree:
    """The same tree cut down to `nodes` and their ancestors (node ids and items unchanged): what
    `tree_rows` lays out for a second pass over a few nodes."""
    keep: set[int] = set()
    for node in nodes:
        while node >= 0 and node not in keep:
            keep.add(node)
            node = tree.parent[node]
    children = [[c for c in kids if c in keep] if i in keep else [] for i, kids in enumerate(tree.children)]
    return PrefixTree(tree.token, tree.parent, tree.depth, children, [r for r in tree.roots if r in keep],
                      tree.items, tree.sentence_items)


def prefix_tree(tokens: Sequence[PairTokens]) -> PrefixTree:
    """The tree of every pair's two sentences (good, then bad), BOS included, last token excluded."""
    token: list[int] = []
    parent: list[int] = []
    depth: list[int] = []
    children: list[list[int]] = []
    child_of: dict[tuple[int, int], int] = {}  # (parent or -1, token) -> node
    item_of: dict[tuple[int, int], int] = {}
    items: list[tuple[int, int]] = []
    sentence_items: list[list[int]] = []
    roots: list[int] = []
    for t in tokens:
        for cont in (t.good, t.bad):
            full = t.prefix + cont
            node, mine = -1, []
            for k in range(len(full) - 1):
                key = (node, full[k])
                nxt = child_of.get(key)
                if nxt is None:
                    nxt = child_of[key] = len(token)
                    token.append(full[k]), parent.append(node), depth.append(k), children.append([])
                    (children[node] if node >= 0 else roots).append(nxt)
                node = nxt
                item = item_of.get((node, full[k + 1]))
                if item is None:
                    item = item_of[(node, full[k + 1])] = len(items)
                    items.append((node, full[k + 1]))
                mine.append(item)
            sentence_items.append(mine)
    return PrefixTree(token, parent, depth, children, roots, items, sentence_items)


def tree_rows(tree: PrefixTree, row_tokens: int) -> list[list[int]]:
    """The tree's nodes laid out in rows of at most `row_tokens` positions (raised to the deepest
    path where that is longer): each row a list of node ids, every node's parent before it in the
    row or the node a top-level one; every node in at least one row."""
    def dfs(tops: list[int]) -> list[int]:
        out, stack = [], list(reversed(tops))
        while stack:
            i = stack.pop()
            out.append(i)
            stack.extend(reversed(tree.children[i]))
        return out

    reachable = dfs(tree.roots)  # every node, or those a restricted tree keeps
    cap = max(row_tokens, max((tree.depth[i] for i in reachable), default=0) + 2)
    size = dict.fromkeys(reachable, 1)
    for i in sorted(reachable, reverse=True):  # children have larger ids than their parent
        if tree.parent[i] >= 0:
            size[tree.parent[i]] += size[i]
    pieces: list[list[int]] = []
    work = [(tree.roots, [])]
    while work:
        kids, path = work.pop()
        group, used = [], len(path)
        for c in sorted(kids, key=lambda c: -size[c]):
            if len(path) + size[c] > cap:  # too big for one piece: its children get pieces, c on their path
                work.append((tree.children[c], path + [c]))
            elif used + size[c] <= cap:
                group.append(c)
                used += size[c]
            else:
                pieces.append(path + dfs(group))
                group, used = [c], len(path) + size[c]
        if group:
            pieces.append(path + dfs(group))
    # best fit, longest pieces first: each piece into the fullest row that still takes it
    rows: list[list[int]] = []
    free: dict[int, list[int]] = defaultdict(list)  # room left -> rows with that room
    for piece in sorted(pieces, key=len, reverse=True):
        room = next((r for r in range(len(piece), cap + 1) if free[r]), None)
        if room is None:
            rows.append(list(piece))
            free[cap - len(piece)].append(len(rows) - 1)
        else:
            r = free[room].pop()
            rows[r].extend(piece)
            free[room - len(piece)].append(r)
    return rows


def tree_batch(tree: PrefixTree, rows: list[list[int]], device: str):
    """Inputs, position ids (depth) and boolean 4D mask (True = may attend: the position's own
    ancestors in its piece and itself; padding sees itself only) for rows of tree nodes."""
    import numpy as np
    import torch

    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    pos = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width, width), dtype=bool)
    for r, row in enumerate(rows):
        at: dict[int, int] = {}
        for j, node in enumerate(row):
            ids[r, j], pos[r, j] = tree.token[node], tree.depth[node]
            p = at.get(tree.parent[node], -1)
            if p >= 0:
                mask[r, j] = mask[r, p]
            mask[r, j, j] = True
            at[node] = j  # a path copy and a later one: children follow the latest, both are the same node
        for j in range(len(row), width):
            mask[r, j, j] = True
    return (torch.from_numpy(ids).to(device), torch.from_numpy(pos).to(device),
            torch.from_numpy(mask)[:, None].to(device))


def tree_forward_tokens(tokens: Sequence[PairTokens], row_tokens: int = ROW_TOKENS) -> int:
    """Positions the prefix-tree scorer runs for these pairs (path copies included, padding not)."""
    return sum(len(r) for r in tree_rows(prefix_tree(tokens), row_tokens)) if tokens else 0


def length_buckets(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Consecutive index groups over length-sorted rows: rows x the group's longest row <= batch_tokens."""
    groups, i = [], 0
    while i < len(lengths):
        # Sorted by length, so the last row of a group is its longest: grow the group while
        # rows x that length stays within the token budget (little padding).
        end = i + 1
        while end < len(lengths) and (end + 1 - i) * lengths[end] <= batch_tokens:
            end += 1
        groups.append(list(range(i, end)))
        i = end
    return groups
