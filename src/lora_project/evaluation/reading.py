"""BabyLM's reading task: word surprisal from the model, and how much it adds to regressions of
human reading times, as the official pipeline's `reading` causal backend defines both.

Word probability (upstream `get_p2`): the context `item` is tokenized with the tokenizer's default
special tokens and the distribution is read at its last position; the word is tokenized on its own
(no special tokens, no leading space, as the CSV spells it). Its first token's probability is read
after the context; each further token t is decoded to text, appended to the context string
(`context + decode(first)`, then `+ decode(t)`), the longer string is tokenized again, and the
probability read is that of the first token of decode(t) tokenized on its own. The word's surprisal
is -log of the product. The same for the previous word (`prev_item`, `prev_word`) where the row
has one. Every context of every row goes into one prefix tree; each (context, token) is computed once.

Scores (upstream `reading/run.py`): for each measure an OLS baseline on Subtlex_log10, length,
context_length and their pairwise products, and the same plus surprisal; score = 100 * (R2_model
- R2_base) / (1 - R2_base), over the rows where the variables used are all present. The
eye-tracking score is the mean over the four eye-tracking measures (RTfirstfix, RTfirstpass,
RTgopast, RTrightbound); the self-paced reading score is that of self_paced_reading_time in the
spillover model, whose baseline adds prev_length and the previous word's surprisal (prev_pred)
with all pairwise products. Rows are the unit of the bootstrap.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

from lora_project.errors import UserError

EYE_TRACKING = ("RTfirstfix", "RTfirstpass", "RTgopast", "RTrightbound")
SELF_PACED = "self_paced_reading_time"
BASE_TERMS = ("Subtlex_log10", "length", "context_length")
SPILLOVER_TERMS = BASE_TERMS + ("prev_length", "prev_pred")
NUMERIC = BASE_TERMS + ("prev_length",) + EYE_TRACKING + (SELF_PACED,)
NEEDED = ("item", "word", "prev_item", "prev_word") + NUMERIC
#: Fewest usable rows (every variable of every fit present) for which reading is scored: the
#: spillover fit has 17 coefficients, and a bootstrap over fewer rows than about three times that
#: gives mostly singular fits. Fewer: the task is skipped with one line.
MIN_ROWS = 50


def _row_problem(row, numeric: dict) -> str | None:
    """Why one row cannot be used, or None. A blank number is a missing measurement (upstream
    drops such rows from the fits that use it); text where a number belongs is a bad row."""
    if not isinstance(row["word"], str) or row["word"] == "":
        return "no word"
    for c, ok in numeric.items():
        if not ok:
            return f"{c} is not a number: {str(row[c])[:30]!r}"
    if isinstance(row["prev_item"], str) and (not isinstance(row["prev_word"], str) or row["prev_word"] == ""):
        return "prev_item without a prev_word"
    return None


def load_reading(path: Path, strict: bool = False, warn=print):
    """The rows as upstream reads them (pandas, `item` as text with a missing one read as the text
    "None"); a file without the columns the scores need is refused naming them. A bad row (no
    word, text where a number belongs, a previous context without its word) follows the `--pairs`
    rules: skipped with a warning, or with `strict` refused naming the first few (line numbers of
    the file, the header being line 1)."""
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype={"item": str, "word": str, "prev_item": str, "prev_word": str})
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path} as CSV: {str(exc).splitlines()[0]}") from None
    missing = [c for c in NEEDED if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}")
    if df.empty:
        raise UserError(f"{path}: no rows")
    df["item"] = df["item"].fillna("None")
    numbers = {c: pd.to_numeric(df[c], errors="coerce") for c in NUMERIC}
    number_ok = {c: numbers[c].notna() | df[c].isna() for c in NUMERIC}
    problems, bad = [], []
    for i in range(len(df)):
        why = _row_problem(df.iloc[i], {c: bool(number_ok[c].iat[i]) for c in NUMERIC})
        if why:
            bad.append(i)
            problems.append(f"line {i + 2}: {why}")
    for c in NUMERIC:
        df[c] = numbers[c].astype(float)
    if problems:
        if strict:
            raise UserError(f"{len(problems)} bad row(s) in {path}: " + "; ".join(problems[:5]))
        warn(f"warning: reading: skipped {len(problems)} bad row(s): " + "; ".join(problems[:5]))
        df = df.drop(index=bad)
    if df.empty:
        raise UserError(f"no usable reading rows in {path}")
    return df.reset_index(drop=True)


def usable_rows(df) -> int:
    """Rows usable by the fit with the fewest (before scoring: the previous word's surprisal is
    missing exactly where a row has no previous context)."""
    import numpy as np

    present = {c: df[c].to_numpy(dtype=float) for c in NUMERIC}
    base = np.all([np.isfinite(present[c]) for c in BASE_TERMS], axis=0)
    counts = [int(np.sum(base & np.isfinite(present[m]))) for m in EYE_TRACKING]
    prev = np.array([isinstance(v, str) for v in df["prev_item"]], dtype=bool)
    counts.append(int(np.sum(base & prev & np.isfinite(present["prev_length"]) & np.isfinite(present[SELF_PACED]))))
    return min(counts)


def sample_rows(df, limit: int | None, seed: int):
    """At most `limit` rows, drawn with a seeded RNG, file order kept."""
    import random

    if not limit or limit >= len(df):
        return df
    keep = sorted(random.Random(seed).sample(range(len(df)), limit))
    return df.iloc[keep].reset_index(drop=True)


def _first_id(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError(f"reading: the tokenizer gives no token for {text!r}")
    return int(ids[0])


def word_queries(tokenizer, context: str, word: str) -> list[tuple[str, int]]:
    """The (context text, token id) reads whose probabilities multiply to the word's (upstream get_p2)."""
    target = tokenizer(word, add_special_tokens=False)["input_ids"]
    if not target:
        raise UserError(f"reading: the tokenizer gives no token for the word {word!r}")
    out = [(context, int(target[0]))]
    text = context + tokenizer.decode(target[0])
    for tok in target[1:]:
        piece = tokenizer.decode(tok)
        out.append((text, _first_id(tokenizer, piece)))
        text += piece
    return out


@dataclass(frozen=True)
class ReadingPlan:
    """Everything the reading scores need that does not depend on the model: each row's word and
    previous word, each word's reads (upstream get_p2), and every read as a text of one scored token
    in one prefix tree. The base and its adapters share a tokenizer: one plan serves every model."""
    words: list
    prev: list
    plans: dict
    reads: list
    tree: object  # babylm_score.TextTree


def reading_plan(tokenizer, df) -> ReadingPlan:
    """The rows' reads tokenized once and laid out in one prefix tree."""
    from lora_project.evaluation.babylm_score import ScoredText, text_tree

    words = [(r.item, r.word) for r in df.itertuples()]
    prev = [(r.prev_item, r.prev_word) if isinstance(r.prev_item, str) else None for r in df.itertuples()]
    plans = {w: word_queries(tokenizer, *w) for w in dict.fromkeys(words + [p for p in prev if p])}
    reads = list(dict.fromkeys(q for qs in plans.values() for q in qs))
    contexts = list(dict.fromkeys(c for c, _ in reads))
    enc = dict(zip(contexts, tokenizer(contexts)["input_ids"]))  # default special tokens, as upstream
    empty = [c for c in contexts if not enc[c]]
    if empty:
        raise UserError(f"reading: the context {empty[0]!r} gives no tokens")
    texts = [ScoredText(tuple(enc[c]) + (t,), (len(enc[c]),)) for c, t in reads]
    return ReadingPlan(words, prev, plans, reads, text_tree(texts))


def surprisals(model, tokenizer, df, runtime, *, batch_tokens: int = 2048, progress=None,
               plan: ReadingPlan | None = None):
    """(pred, prev_pred): each row's word surprisal in nats and its previous word's (NaN without one).
    `plan`: the rows' `reading_plan`, to reuse over several models (built here when not given)."""
    from lora_project.evaluation.babylm_score import tree_sums

    plan = plan if plan is not None else reading_plan(tokenizer, df)
    logp = dict(zip(plan.reads, tree_sums(model, plan.tree, runtime, batch_tokens=batch_tokens, progress=progress)))
    nll = {w: -sum(logp[q] for q in qs) for w, qs in plan.plans.items()}
    return (np.array([nll[w] for w in plan.words]), np.array([nll[p] if p else np.nan for p in plan.prev]))


def _design(cols: dict, terms: tuple[str, ...], extra: str | None) -> np.ndarray:
    """Intercept, the terms, their pairwise products, then `extra` (the formula upstream fits)."""
    parts = [np.ones(len(cols[terms[0]]))] + [cols[t] for t in terms]
    parts += [cols[a] * cols[b] for a, b in combinations(terms, 2)]
    if extra:
        parts.append(cols[extra])
    return np.column_stack(parts)


def _r2(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """R^2 (centered, with intercept) of weighted least squares for each weight row of `w`
    (integer bootstrap counts; a row of ones is the plain fit)."""
    out = np.empty(len(w))
    for k, wk in enumerate(w):
        Xw = X * wk[:, None]
        beta = np.linalg.lstsq(Xw.T @ X, Xw.T @ y, rcond=None)[0]
        resid = y - X @ beta
        mean = np.sum(wk * y) / np.sum(wk)
        out[k] = 1 - np.sum(wk * resid ** 2) / np.sum(wk * (y - mean) ** 2)
    return out


def _gain(df, pred, prev_pred, measure: str, spillover: bool, w) -> np.ndarray:
    """100 * dR2 / (1 - R2_base) for one measure, per weight row."""
    terms = SPILLOVER_TERMS if spillover else BASE_TERMS
    cols = {c: df[c].to_numpy(dtype=float) for c in terms if c != "prev_pred"}
    cols.update(pred=pred, prev_pred=prev_pred, y=df[measure].to_numpy(dtype=float))
    # upstream drops rows with a missing value among the variables of each fit; both fits use
    # the same columns apart from pred, which is never missing, so the same rows
    ok = np.all([np.isfinite(cols[c]) for c in terms + ("y", "pred")], axis=0)
    cols = {k: v[ok] for k, v in cols.items()}
    if ok.sum() <= len(terms) * (len(terms) + 1) // 2 + 2:
        raise UserError(f"reading: only {int(ok.sum())} usable rows for {measure}; too few for the regression")
    # a degenerate resample (constant y, or R2_base = 1) gives nan/inf, which the intervals leave out
    with np.errstate(divide="ignore", invalid="ignore"):
        base = _r2(_design(cols, terms, None), cols["y"], w[:, ok])
        full = _r2(_design(cols, terms, "pred"), cols["y"], w[:, ok])
        return 100 * (full - base) / (1 - base)


def reading_scores(df, pred, prev_pred, weights: np.ndarray | None = None) -> dict:
    """The two official figures, per weight row when `weights` (resamples x rows) is given, else
    for the rows as they are: {"eye_tracking": .., "self_paced_reading": .., "measures": {..}}."""
    w = np.ones((1, len(df))) if weights is None else weights
    per = {m: _gain(df, pred, prev_pred, m, False, w) for m in EYE_TRACKING}
    per[SELF_PACED] = _gain(df, pred, prev_pred, SELF_PACED, True, w)
    eye = np.mean([per[m] for m in EYE_TRACKING], axis=0)
    if weights is None:
        return {"eye_tracking": float(eye[0]), "self_paced_reading": float(per[SELF_PACED][0]),
                "measures": {m: float(v[0]) for m, v in per.items()}}
    return {"eye_tracking": eye, "self_paced_reading": per[SELF_PACED]}


def bootstrap_weights(rows: int, resamples: int, seed: int) -> np.ndarray:
    """Bootstrap resamples of the rows as counts per row (resamples x rows)."""
    rng = np.random.default_rng(seed)
    return np.stack([np.bincount(rng.integers(0, rows, rows), minlength=rows) for _ in range(resamples)]).astype(float)
