"""Child-language measures of a list of utterances (pure functions: no files, no models).

One definition of a word, shared with ``extract-children`` (``lora_project.data.childes``):
an utterance's words are its whitespace-separated tokens that hold at least one letter, so
``more cookie.`` has two words and ``...`` or ``2`` none. For word identity (vocabulary,
MATTR, divergence, novelty) a word is lower-cased and stripped of punctuation at its edges
(``Cookie!`` -> ``cookie``; ``mommy's`` keeps its apostrophe). Utterances without a word
are left out of every measure and counted as ``empty``.

Sources of the conventions:
- MLU (mean length of utterance) in words or morphemes, and the stages it is read against:
  Brown, R. (1973). *A First Language: The Early Stages*. Harvard University Press.
- MATTR (moving-average type-token ratio): Covington, M. A. & McFall, J. D. (2010). Cutting
  the Gordian knot: the moving-average type-token ratio (MATTR). *Journal of Quantitative
  Linguistics* 17(2), 94-100.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

MATTR_WINDOW = 50   # words per window (Covington & McFall 2010 use 500 on adult text; child corpora are small)
NGRAM = 4           # novelty: an utterance of >= NGRAM words is "recombined" when all its NGRAM-grams were seen
_EDGE_PUNCT = re.compile(r"^[^\w]+|[^\w]+$")

# Brown (1973) stages by MLU in morphemes, as tabulated in the child-language literature:
# (stage, lower bound inclusive, upper bound exclusive).
BROWN_STAGES: tuple[tuple[str, float, float], ...] = (
    ("I", 1.0, 2.0),
    ("II", 2.0, 2.5),
    ("III", 2.5, 3.0),
    ("IV", 3.0, 3.75),
    ("V", 3.75, 4.5),
    ("post-V", 4.5, math.inf),
)


def is_word(token: str) -> bool:
    """A whitespace token counts as a word when it holds a letter (same rule as extract-children)."""
    return any(c.isalpha() for c in token)


def words(utterance: str) -> list[str]:
    """The words of one utterance, lower-cased, punctuation stripped at the edges."""
    return [_EDGE_PUNCT.sub("", tok).lower() for tok in utterance.split() if is_word(tok)]


def normalise(utterance: str) -> str:
    """The utterance as its words joined by one space: what 'verbatim' compares."""
    return " ".join(words(utterance))


def tokenised(utterances: Iterable[str]) -> list[list[str]]:
    """Words of every utterance that holds at least one word (empty ones dropped)."""
    return [w for w in (words(u) for u in utterances) if w]


def mean_length(utts: Sequence[Sequence[str]]) -> float | None:
    """MLU in words: mean number of words per utterance (None for no utterances)."""
    return sum(len(u) for u in utts) / len(utts) if utts else None


def mattr(tokens: Sequence[str], window: int = MATTR_WINDOW) -> float | None:
    """Moving-average type-token ratio: mean TTR over every run of `window` consecutive words.

    With fewer words than the window, the plain TTR of all of them (the caller reports the
    window actually used). None for no words.
    """
    n = len(tokens)
    if n == 0:
        return None
    if n <= window:
        return len(set(tokens)) / n
    counts = Counter(tokens[:window])
    total = len(counts)
    for i in range(window, n):
        out, new = tokens[i - window], tokens[i]
        counts[out] -= 1
        if counts[out] == 0:
            del counts[out]
        counts[new] += 1
        total += len(counts)
    return total / (n - window + 1) / window


def length_shares(utts: Sequence[Sequence[str]]) -> dict[str, float | None]:
    """Share of one-word and of two-word utterances."""
    if not utts:
        return {"one_word_share": None, "two_word_share": None}
    lengths = Counter(len(u) for u in utts)
    return {"one_word_share": lengths[1] / len(utts), "two_word_share": lengths[2] / len(utts)}


def brown_stage(mlu: float | None, *, from_morphemes: bool, source: str | None = None) -> dict | None:
    """Brown's stage for an MLU; `approximate` is True when the MLU is in words, not morphemes;
    `from` names the figure it was read from (default: mlu_morphemes or mlu_words)."""
    if mlu is None:
        return None
    source = source or ("mlu_morphemes" if from_morphemes else "mlu_words")
    if mlu < BROWN_STAGES[0][1]:
        return {"stage": "pre-I", "mlu_range": [0.0, BROWN_STAGES[0][1]], "approximate": not from_morphemes,
                "from": source}
    for name, lo, hi in BROWN_STAGES:
        if lo <= mlu < hi:
            return {"stage": name, "mlu_range": [lo, None if math.isinf(hi) else hi],
                    "approximate": not from_morphemes, "from": source}
    raise AssertionError(mlu)  # the last stage is open-ended


def js_divergence(p: Counter, q: Counter) -> float | None:
    """Jensen-Shannon divergence (base 2, so 0 = same distribution, 1 = disjoint) of two word counts."""
    np_, nq = sum(p.values()), sum(q.values())
    if not np_ or not nq:
        return None
    total = 0.0
    for w in p.keys() | q.keys():
        a, b = p.get(w, 0) / np_, q.get(w, 0) / nq
        m = (a + b) / 2
        if a:
            total += a * math.log2(a / m)
        if b:
            total += b * math.log2(b / m)
    return max(0.0, total / 2)


def ngrams(tokens: Sequence[str], n: int = NGRAM) -> list[tuple[str, ...]]:
    """Consecutive n-word tuples of one utterance."""
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


class TrainingIndex:
    """What novelty compares against: the training split's utterances and their n-grams."""

    def __init__(self, train_utterances: Iterable[str], n: int = NGRAM):
        self.n = n
        utts = tokenised(train_utterances)
        self.utterances = {" ".join(u) for u in utts}
        self.ngrams = {g for u in utts for g in ngrams(u, n)}


def novelty(utterances: Iterable[str], index: TrainingIndex) -> dict:
    """How much of a set of utterances occurs in the training split.

    - ``verbatim_share``: share of utterances (with a word) whose normalised text is a
      training utterance;
    - ``ngram_seen_share``: among utterances of >= n words, the share whose n-grams all occur
      in training utterances (recombined or copied, not new at the n-gram level).
    """
    utts = tokenised(utterances)
    verbatim = sum(1 for u in utts if " ".join(u) in index.utterances)
    long = [u for u in utts if len(u) >= index.n]
    seen = sum(1 for u in long if all(g in index.ngrams for g in ngrams(u, index.n)))
    return {"utterances": len(utts), "verbatim": verbatim,
            "verbatim_share": verbatim / len(utts) if utts else None,
            "ngram": index.n, "long_utterances": len(long), "ngram_seen": seen,
            "ngram_seen_share": seen / len(long) if long else None}


def profile(utterances: Sequence[str], *, top: int = 20, window: int = MATTR_WINDOW,
            mlu_morphemes: float | None = None, chat_words: Sequence[int] | None = None) -> dict:
    """The profile of a list of utterances (one utterance per string).

    Two MLUs in words: ``mlu_words`` counts the words of the text (what a model sees and samples:
    the figure for comparing a corpus with an adapter's samples), ``mlu_words_chat`` the words
    by CHAT conventions (`chat_words`, one count per utterance, from a CHAT source; a compound
    is one word), the figure published tables use. `mlu_morphemes` comes from a source that has
    morphemes (CHAT %mor through pylangacq). The Brown stage is read from MLU in morphemes when
    given, else from mlu_words_chat, else from mlu_words; the last two are marked approximate.
    """
    utts = tokenised(utterances)
    tokens = [w for u in utts for w in u]
    mlu_w = mean_length(utts)
    lengths = [len(u) for u in utts]
    chat = [n for n in chat_words if n] if chat_words is not None else []
    mlu_chat = sum(chat) / len(chat) if chat else None
    if mlu_morphemes is not None:
        stage = brown_stage(mlu_morphemes, from_morphemes=True)
    elif mlu_chat is not None:
        stage = brown_stage(mlu_chat, from_morphemes=False, source="mlu_words_chat")
    else:
        stage = brown_stage(mlu_w, from_morphemes=False)
    return {
        "utterances": len(utts),
        "empty": len(utterances) - len(utts),
        "tokens": len(tokens),
        "vocabulary": len(set(tokens)),
        "mlu_words": mlu_w,
        "mlu_words_sd": (math.sqrt(sum((x - mlu_w) ** 2 for x in lengths) / len(lengths)) if lengths else None),
        "mlu_words_chat": mlu_chat,
        "mlu_morphemes": mlu_morphemes,
        "mattr": mattr(tokens, window),
        "mattr_window": min(window, len(tokens)),
        **length_shares(utts),
        "top_words": Counter(tokens).most_common(top),
        "brown_stage": stage,
        "length_counts": {str(k): v for k, v in sorted(Counter(lengths).items())},
    }


def word_counts(utterances: Iterable[str]) -> Counter:
    """Word frequencies of a set of utterances (the distribution JS divergence compares)."""
    return Counter(w for u in tokenised(utterances) for w in u)


def compare(sampled: Sequence[str], corpus: Sequence[str], index: TrainingIndex | None, *,
            sampled_profile: dict, corpus_profile: dict) -> dict:
    """Sampled utterances against the corpus: MLU and MATTR differences, JSD, novelty."""
    def diff(key):
        a, b = sampled_profile.get(key), corpus_profile.get(key)
        return None if a is None or b is None else a - b

    return {"mlu_words_diff": diff("mlu_words"), "mattr_diff": diff("mattr"),
            "jsd": js_divergence(word_counts(sampled), word_counts(corpus)),
            "novelty": novelty(sampled, index) if index is not None else None}
