"""Where a profile's utterances come from: a prepared dataset split, a text file, CHAT files.

All three give plain text utterances, one per string; CHAT transcripts go through the very
function that ``extract-children`` uses (``lora_project.data.childes``), so ``profile --chat
T`` and ``profile --text`` on what ``extract-children T`` wrote see the same lines. CHAT
sources also carry pylangacq's own MLU in words and in morphemes (%mor tier) for reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lora_project.errors import UserError, first_of


@dataclass
class Corpus:
    """Utterances of one source and how to name it."""
    label: str                       # e.g. "toddler_data:test", "file.txt", "eve.cha (CHI)"
    utterances: list[str]
    source: dict                     # kind and location, for the report
    mlu_morphemes: float | None = None
    pylangacq: dict = field(default_factory=dict)   # CHAT only: pylangacq's mluw/mlum over all files
    chat_words: list[int] | None = None  # CHAT only: words of each utterance by CHAT conventions


def lines_of(documents: list[str]) -> list[str]:
    """Utterances of documents: each non-blank line is one utterance."""
    return [line.strip() for d in documents for line in d.splitlines() if line.strip()]


def dataset_split(paths, name: str, split: str) -> Corpus:
    """One split of a prepared dataset."""
    from lora_project.data.preprocessor import read_split
    from lora_project.paths import check_name

    folder = paths.processed(check_name(name, "dataset name"))
    docs = read_split(folder, split)
    lines = lines_of(docs)
    return Corpus(f"{name}:{split}", lines, {"kind": "dataset", "dataset": name, "split": split},
                  chat_words=_chat_words_of(folder / f"{split}.meta.jsonl", lines, docs))


def _chat_words_of(meta_path: Path, lines: list[str], docs: list[str]) -> list[int] | None:
    """Per-utterance CHAT word counts that prepare kept for a dataset built from CHAT
    (``<split>.meta.jsonl``, one record per utterance), or None when there are none to trust."""
    import json

    if not meta_path.is_file() or len(lines) != len(docs):
        return None
    try:
        counts = [json.loads(line).get("chat_words") for line in meta_path.read_text(encoding="utf-8").splitlines()]
    except (ValueError, AttributeError, OSError, UnicodeDecodeError):
        return None
    ok = len(counts) == len(lines) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts)
    return counts if ok else None


def text_file(path: Path, encoding: str = "utf-8") -> Corpus:
    """A text file, one utterance per line."""
    from lora_project.data.preprocessor import normalise, read_text_file

    lines = lines_of([normalise(read_text_file(Path(path), encoding))])
    if not lines:
        raise UserError(f"{path}: no utterances (the file has no non-blank line)")
    return Corpus(Path(path).name, lines, {"kind": "text", "path": str(path)})


def chat_files(path: Path, participant: str = "CHI", encoding: str = "utf-8", warn=None) -> Corpus:
    """The utterances of one participant in a CHAT file or a folder of them (as extract-children writes them)."""
    from lora_project.data.childes import extract_children

    import codecs
    import sys

    if not participant or not participant.strip():
        raise UserError("--participant is empty (e.g. --participant CHI)")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise UserError(f"--encoding {encoding[:40]!r}: unknown encoding (e.g. utf-8, latin-1)") from None
    skipped: list[str] = []  # said once: in the error when nothing is left, else as warnings
    ex = extract_children([Path(path)], participants=[participant], encoding=encoding, warn=skipped.append)
    if not ex.lines:
        why = f" ({first_of(skipped, 2, '; ')})"
        raise UserError(f"{path}: no utterances of {participant} with a word in it{why if skipped else ''}")
    for message in skipped:
        (warn or (lambda m: print(f"warning: {m}", file=sys.stderr)))(message)
    reference = pylangacq_mlu([Path(f.file) for f in ex.files if f.lines], participant, encoding)
    return Corpus(f"{Path(path).name} ({participant})", ex.lines,
                  {"kind": "chat", "path": str(path), "participant": participant, "files": len(ex.files),
                   "files_used": sum(1 for f in ex.files if f.lines)},
                  mlu_morphemes=reference.pop("mlu_morphemes", None), pylangacq=reference,
                  chat_words=[m["chat_words"] for m in ex.meta])


_NOT_MORPHEMES = {"", "cm", "beg", "end", "bq", "eq"}  # %mor punctuation parts of speech


def morphemes(mor: str) -> int:
    """Morphemes of one %mor word: the stem plus each prefix (#) and suffix (-); fusions (&) count once."""
    return 1 + mor.count("-") + mor.count("#")


def pylangacq_mlu(files: list[Path], participant: str, encoding: str = "utf-8") -> dict:
    """MLU in morphemes from the %mor tier (parsed by pylangacq), plus pylangacq's own mluw/mlum.

    ``mlu_morphemes``: over the utterances extract-children keeps (those with a word) that
    have a %mor analysis, morphemes per utterance, counting stem + prefixes + suffixes of
    every %mor word and each clitic (``I'm`` = 2), not punctuation (Brown's rules count
    regular inflections, treat irregular pasts and compounds as one morpheme).
    ``mluw``/``mlum`` are pylangacq's (n=None): it divides by all of the participant's
    utterances, word-less ones (``xxx .``) included, counts a compound (``bunny+rabbit``) as
    one word and, in 0.23, does not count suffixes in ``mlum``; for reference only.
    Archive members (``x.zip:a.cha``) are skipped.
    """
    from pylangacq import CHAT

    from lora_project.data.childes import utterance_text

    n_all = n_m = 0
    sum_w = sum_pm = 0.0
    total_m = 0
    for f in files:
        if not f.is_file():  # a member of a zip archive
            continue
        text = f.read_bytes().decode(encoding, errors="replace").lstrip("\ufeff").replace("\r\n", "\n")
        try:
            with_mor = CHAT.from_strs([text], ids=[str(f)], strict=False, parallel=False)
            plain = CHAT.from_strs([text], ids=[str(f)], strict=False, parallel=False, mor_tier=None, gra_tier=None)
        except ValueError:
            continue
        utts = [u for u in with_mor.utterances() if u.participant == participant]
        plain_utts = [u for u in plain.utterances() if u.participant == participant]
        if not utts:
            continue
        n_all += len(utts)
        sum_w += with_mor.mluw(participant=participant, n=None)[0] * len(utts)
        sum_pm += with_mor.mlum(participant=participant, n=None)[0] * len(utts)
        if len(utts) != len(plain_utts):
            continue  # cannot pair the tiers safely
        for u, p in zip(utts, plain_utts):
            if p.tokens is None or not utterance_text([t.word for t in p.tokens]):
                continue
            mors = [t.mor for t in u.tokens if t.pos not in _NOT_MORPHEMES and t.pos is not None and t.mor]
            if mors:
                n_m += 1
                total_m += sum(morphemes(m) for m in mors)
    if not n_all:
        return {}
    return {"mlu_morphemes": total_m / n_m if n_m else None, "utterances_with_mor": n_m,
            "mluw": sum_w / n_all, "mlum": sum_pm / n_all, "utterances": n_all}
