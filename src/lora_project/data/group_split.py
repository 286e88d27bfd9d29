"""Group-aware splits: whole transcripts, speakers, age bins or source documents per split.

Hashing each utterance into a split (the default) puts the same child and the same recording
in train and test alike, with their near-identical routines. With the catalog option
``split_by`` every group goes to exactly one split instead. Groups are assigned to meet the
split fractions (counted in documents) as closely as their sizes allow, deterministically
given ``split_seed``: the groups are shuffled by the seed (ties between equal sizes), then
taken largest first, each into the split furthest below its target. When as many groups are
left as there are non-empty splits still without a group, the next group goes to such a
split, so every split with a non-zero fraction gets at least one group whenever there are
enough groups; when there are not, the split is refused with one line.
"""

from __future__ import annotations

import random

from lora_project.errors import UserError

SPLITS = ("train", "validation", "test")
CHILDES_KEYS = ("transcript", "speaker", "age_bin", "document")
OTHER_KEYS = ("document",)


def age_bin(age_months: float | None, width: int) -> str | None:
    """'24-30 months' style label of the bin holding an age (None when the age is unknown)."""
    if age_months is None:
        return None
    lo = int(age_months // width) * width
    return f"{lo}-{lo + width} months"


def group_of(meta: dict, split_by: str, bin_months: int) -> str | None:
    """The group label of one document's metadata ({transcript, speaker, age_months} or {document})."""
    if split_by == "age_bin":
        return age_bin(meta.get("age_months"), bin_months)
    if split_by == "document":
        return meta.get("document") or meta.get("transcript")
    return meta.get(split_by)


def assign_groups(sizes: dict[str, int], fractions: tuple[float, float, float], seed: int = 0,
                  what: str = "groups") -> dict[str, str]:
    """{group: split} for groups of the given sizes (documents), as the module docstring says."""
    wanted = [s for s, f in zip(SPLITS, fractions) if f > 0]
    if len(sizes) < len(wanted):
        raise UserError(f"split_by: only {len(sizes)} {what} for {len(wanted)} non-empty splits "
                        f"({'/'.join(map(str, fractions))}); every group goes to one split, so each of "
                        f"{', '.join(wanted)} needs one: add data, choose another split_by, or set a fraction to 0")
    order = sorted(sizes)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: -sizes[g])  # stable: equal sizes keep the seeded order
    total = sum(sizes.values())
    target = {s: f * total for s, f in zip(SPLITS, fractions)}
    filled = {s: 0 for s in SPLITS}
    out: dict[str, str] = {}
    for i, g in enumerate(order):
        empty = [s for s in wanted if filled[s] == 0]
        pool = empty if len(order) - i <= len(empty) else wanted
        best = max(pool, key=lambda s: (target[s] - filled[s], -SPLITS.index(s)))
        out[g] = best
        filled[best] += sizes[g]
    return out


def split_by_groups(docs: list[str], metas: list[dict] | None, split_by: str, fractions, seed: int,
                    bin_months: int, source: str) -> tuple[dict[str, list[str]], dict[str, list[dict]], dict]:
    """Documents (and their metadata) per split, plus the stats entry recording the groups."""
    if metas is None:  # no per-document provenance: the whole source is one document
        metas = [{"document": source}] * len(docs)
    labels = [group_of(m, split_by, bin_months) for m in metas]
    unknown = sum(1 for g in labels if g is None)
    if unknown:
        raise UserError(f"split_by={split_by}: {unknown} of {len(docs)} documents have no {split_by} "
                        "(e.g. a transcript without the speaker's age); choose another split_by")
    sizes: dict[str, int] = {}
    for g in labels:
        sizes[g] = sizes.get(g, 0) + 1
    where = assign_groups(sizes, fractions, seed, what=f"{split_by} groups")
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    part_meta: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for d, m, g in zip(docs, metas, labels):
        parts[where[g]].append(d)
        part_meta[where[g]].append(m)
    groups = {s: {g: sizes[g] for g in sorted(sizes) if where[g] == s} for s in SPLITS}
    total = len(docs)
    stats = {"by": split_by, "split_seed": seed, "groups": groups,
             "target_fractions": list(fractions),
             "fractions": {s: round(len(parts[s]) / total, 4) for s in SPLITS}}
    if split_by == "age_bin":
        stats["age_bin_months"] = bin_months
    return parts, part_meta, stats
