"""Children's speech from CHILDES transcripts (CHAT format), parsed with pylangacq.

Sources: ``.cha`` files, folders of them (searched recursively) and the ``.zip`` archives
that CHILDES distributes. Each file is parsed on its own so that one bad file is reported
and skipped instead of failing a whole corpus.

Strictness: pylangacq's strict mode rejects older CHAT releases (ages written ``2;3.04``
instead of ``2;03.04``, the ``&=0`` notation of the 2023+ Brown files, ...). We try strict
first and fall back to its lenient mode, recording the reason per file (``lenient`` in the
sidecar JSON). The %mor/%gra tiers are not used (``mor_tier=None``): lenient mode would
otherwise empty the tokens of utterances whose %mor tier is misaligned.

An utterance becomes one line of plain text: pylangacq's tokens already drop CHAT codes,
unintelligible markers (``xxx``, ``yyy``, ``www``), fillers, retracing and annotation
brackets; we join compounds (``bunny+rabbit`` -> ``bunny rabbit``), drop lengthening colons
(``mi:lk`` -> ``milk``), attach the terminator to the last word (``more cookie.``; ``+...``
becomes ``...``) and drop utterances left without a word.
"""

from __future__ import annotations

import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from lora_project.errors import UserError
from lora_project.utils.text_io import decode_user_bytes

_AGE_RE = re.compile(r"^\s*(\d+)(?:;(\d{1,2})?(?:\.(\d{1,2}))?)?\s*$")
_TERMINATORS = {".", "?", "!"}
_LINKER_END = {"+...": "...", "+..?": "?", "+!?": "?", "+/?": "?", "+//?": "?", "+\"/.": "."}


def parse_age(text: str) -> float:
    """'2;3.04', '1;06.00', '2;06', '3;' or '3' -> age in months (days / 30)."""
    m = _AGE_RE.match(str(text))
    if not m:
        raise UserError(f"age {text!r} is not in CHAT form years;months.days (e.g. 1;06 or 2;3.04)")
    years, months, days = int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)
    if months > 11:
        raise UserError(f"age {text!r}: months must be 0-11")
    return years * 12 + months + days / 30.0


def format_age(months: float | None) -> str | None:
    """Months -> CHAT age text 'Y;MM.DD' (None stays None)."""
    if months is None:
        return None
    years, rest = divmod(months, 12)
    whole = int(rest)
    days = round((rest - whole) * 30)
    return f"{int(years)};{whole:02d}.{days:02d}"


def _word(token: str) -> str:
    """One CHAT token word as plain text ('' when nothing speakable is left)."""
    if token.startswith("+"):
        return ""
    w = token.replace("+", " ").replace("_", " ").replace("^", " ").replace(":", "")
    # Leftovers of malformed codes (brackets, control marks) are not speech: keep letters,
    # digits, apostrophes and hyphens only.
    w = "".join(c if c.isalnum() or c in "'-" else (" " if c.isspace() else "") for c in w)
    return " ".join(w.split())


def utterance_text(words: list[str]) -> str | None:
    """Plain text of one utterance's token words, or None when it holds no word."""
    parts: list[str] = []
    end = ""
    for tok in words:
        if tok in _TERMINATORS:
            end = tok
            continue
        if tok.startswith("+"):
            end = _LINKER_END.get(tok, "." if tok[-1:] in ".!?" else end)
            continue
        if tok == ",":
            if parts:
                parts[-1] += ","
            continue
        w = _word(tok)
        if w and any(ch.isalpha() for ch in w):
            parts.append(w)
    if not parts:
        return None
    return " ".join(parts).rstrip(",") + end


def chat_words(words: list[str]) -> int:
    """Words of one utterance by CHAT conventions (as CLAN and pylangacq count them): a token with a
    letter or digit is one word, a compound or underscore-joined unit (``bunny+rabbit``,
    ``Humpty_Dumpty``) included; terminators, linkers and commas none. Fillers (``&-uh``),
    fragments (``&+``) and ``xxx`` never reach here: pylangacq's tokens leave them out."""
    return sum(1 for tok in words if not tok.startswith("+") and any(ch.isalnum() for ch in _word(tok)))


@dataclass
class FileReport:
    """What one transcript contributed: utterances, lines written, ages, MLU, and why not, if skipped."""
    file: str
    utterances: int = 0          # utterances of the chosen speakers
    lines: int = 0               # lines written (utterances holding at least one word)
    ages: dict = field(default_factory=dict)   # speaker code -> CHAT age string (None if absent)
    age_months: float | None = None   # youngest chosen speaker's age in months
    mlu_words: float | None = None    # mean length of the written utterances, in words of the text
    mlu_words_chat: float | None = None  # the same utterances in words by CHAT conventions (chat_words)
    lenient: str | None = None   # why strict parsing failed, when the lenient parser was used
    skipped: str | None = None   # why the file contributed nothing (age filter, parse error)


@dataclass
class Extraction:
    """The lines extracted from all sources plus one FileReport per file."""
    lines: list[str]
    files: list[FileReport]
    meta: list[dict] = field(default_factory=list)  # per line: transcript, speaker, age_months, chat_words

    @property
    def problems(self) -> list[FileReport]:
        return [f for f in self.files if f.skipped and f.skipped.startswith("error")]

    def summary(self) -> dict:
        return {"lines": len(self.lines), "files": len(self.files),
                "files_used": sum(1 for f in self.files if f.lines),
                "files_with_errors": len(self.problems),
                "per_file": [vars(f) for f in self.files]}


def iter_chat_sources(paths: list[Path]):
    """(display name, raw bytes) of every CHAT file under the given files, folders and zips."""
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise UserError(f"CHAT source not found: {p}")
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in (".cha", ".zip"))
            if not found:
                raise UserError(f"{p}: no .cha files or .zip archives in this folder")
            yield from iter_chat_sources(found)
        elif p.suffix.lower() == ".zip":
            try:
                with zipfile.ZipFile(p) as zf:
                    names = sorted(n for n in zf.namelist() if n.lower().endswith(".cha")
                                   and not n.startswith("__MACOSX/"))
                    if not names:
                        raise UserError(f"{p}: the archive holds no .cha files")
                    for n in names:
                        yield f"{p}:{n}", zf.read(n)
            except zipfile.BadZipFile:
                raise UserError(f"{p}: not a valid zip archive") from None
        else:
            try:
                yield str(p), p.read_bytes()
            except OSError as exc:
                raise UserError(f"cannot read {p}: {exc.strerror}") from None


def _error_line(text: str, message: str) -> int | None:
    """Best-effort line number for a parser message that quotes the offending text."""
    m = re.search(r"(?:got|illegal):?\s*(\S+)\s*$", message) or re.search(r"(\S+)\s*$", message)
    if not m:
        return None
    needle = m.group(1).strip("'\"")
    for i, line in enumerate(text.split("\n"), start=1):
        if needle and needle in line:
            return i
    return None


def _parse(CHAT, text: str, name: str, strict: bool):
    """pylangacq's parser; a panic in its compiled core (a BaseException, not an Exception) on odd
    input becomes a ValueError naming the file, like any other unparsable transcript."""
    try:
        return CHAT.from_strs([text], ids=[name], strict=strict, mor_tier=None, gra_tier=None, parallel=False)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except ValueError:
        raise
    except BaseException as exc:  # noqa: BLE001 - pyo3's PanicException derives from BaseException
        if type(exc).__name__ == "RunInterrupted":
            raise
        raise ValueError(f"{name}: the CHAT parser failed on this file ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]})") from None


def parse_chat(name: str, raw: bytes, encoding: str = "utf-8"):
    """Parse one CHAT text; returns (reader, lenient_reason). Raises ValueError naming file and line."""
    from pylangacq import CHAT

    try:
        text = decode_user_bytes(raw, name, what="a CHAT transcript", encoding=encoding).replace("\r\n", "\n")
    except UserError as exc:
        raise ValueError(str(exc)) from None
    if "\n*" not in "\n" + text:
        raise ValueError(f"{name}: no utterance lines ('*XXX:'), not a CHAT transcript")
    try:
        return _parse(CHAT, text, name, strict=True), None
    except ValueError as exc:
        reason = " ".join(str(exc).split()).replace(f"{name}: ", "")
        line = _error_line(text, reason)
        reason = f"{reason} (line {line})" if line else reason
    try:
        return _parse(CHAT, text, name, strict=False), reason
    except ValueError as exc:
        raise ValueError(f"{name}: {' '.join(str(exc).split())}") from None


def _matches(participant, wanted: set[str]) -> bool:
    return participant.code in wanted or (participant.role or "") in wanted


def extract_children(paths: list[Path], participants: list[str] | tuple[str, ...] = ("CHI",),
                     min_age: str | None = None, max_age: str | None = None,
                     encoding: str = "utf-8", warn=None) -> Extraction:
    """Utterances of the chosen speakers (codes like CHI or roles like Target_Child).

    Age filters use each speaker's age from the @ID headers; a file whose chosen speakers have
    no age is skipped when a filter is set. Files the parser rejects are skipped with a
    warning (`warn`, default stderr) and counted.
    """
    warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr))
    wanted = {p.strip() for p in participants if p.strip()}
    if not wanted:
        raise UserError("no participants given (e.g. --participants CHI)")
    lo = parse_age(min_age) if min_age else None
    hi = parse_age(max_age) if max_age else None
    if lo is not None and hi is not None and lo > hi:
        raise UserError(f"--min-age {min_age} is above --max-age {max_age}")
    lines: list[str] = []
    meta: list[dict] = []
    reports: list[FileReport] = []
    for name, raw in iter_chat_sources([Path(p) for p in paths]):
        rep = FileReport(file=name)
        reports.append(rep)
        try:
            reader, rep.lenient = parse_chat(name, raw, encoding)
        except ValueError as exc:
            rep.skipped = f"error: {exc}"
            warn(f"skipped {exc}")
            continue
        speakers = [p for p in reader.participants() if _matches(p, wanted)]
        rep.ages = {p.code: (format_age(p.age.in_months()) if p.age is not None else None) for p in speakers}
        known = [p.age.in_months() for p in speakers if p.age is not None]
        rep.age_months = round(min(known), 2) if known else None
        if lo is not None or hi is not None:  # per speaker: a sibling's age does not admit the target child
            aged = [p for p in speakers if p.age is not None]
            codes = {p.code for p in aged if (lo is None or p.age.in_months() >= lo)
                     and (hi is None or p.age.in_months() <= hi)}
            if not codes:
                rep.skipped = ("no age for the chosen speakers in the @ID headers" if not aged
                               else "age outside the range")
                continue
        else:
            codes = {p.code for p in speakers} | (wanted & {u.participant for u in reader.utterances()})
        # A speaker is corpus/name; without a name in the headers, the code within this transcript
        # (we cannot tell that two unnamed CHIs are one child, so they count as two).
        who = {p.code: {"speaker": f"{(p.corpus or '?').lower()}/{p.name}" if p.name else f"{name}#{p.code}",
                        "age_months": round(p.age.in_months(), 2) if p.age is not None else None}
               for p in reader.participants()}
        n_words = n_chat = 0
        for utt in reader.utterances():
            if utt.participant not in codes or utt.tokens is None:
                continue
            rep.utterances += 1
            words = [t.word for t in utt.tokens]
            text = utterance_text(words)
            if text:
                lines.append(text)
                speaker = who.get(utt.participant, {"speaker": f"{name}#{utt.participant}", "age_months": None})
                meta.append({"transcript": name, **speaker, "chat_words": chat_words(words)})
                n_chat += meta[-1]["chat_words"]
                rep.lines += 1
                n_words += sum(1 for w in text.split() if any(c.isalpha() for c in w))
        rep.mlu_words = round(n_words / rep.lines, 3) if rep.lines else None
        rep.mlu_words_chat = round(n_chat / rep.lines, 3) if rep.lines else None
    return Extraction(lines, reports, meta)


def extract_children_corpus(sources: list[Path], out: Path, participants: str = "CHI", min_age: str | None = None,
                            max_age: str | None = None, encoding: str = "utf-8",
                            overwrite: bool = False) -> tuple[Extraction, dict]:
    """`lora-project extract-children`: the chosen speakers' utterances into one text file plus a sidecar.

    `participants` is comma-separated. Returns the Extraction and the summary (as in the sidecar,
    plus "out" and "sidecar"); refuses to write when nothing was extracted.
    """
    from lora_project.data.extract import write_corpus
    from lora_project.utils.io_utils import check_output_file

    check_output_file(Path(out), overwrite)  # before any reading, the sidecar too
    check_output_file(Path(out).with_name(Path(out).name + ".json"), overwrite)
    ex = extract_children(sources, participants.split(","), min_age, max_age, encoding=encoding)
    summary = ex.summary()
    summary.update(participants=participants, min_age=min_age, max_age=max_age)
    if not ex.lines:
        reasons = sorted({f.skipped for f in ex.files if f.skipped}) or ["no utterance with words"]
        raise UserError(f"no utterances extracted from {len(ex.files)} files ({'; '.join(reasons)[:300]})")
    side = write_corpus(out, ex.lines, summary, overwrite)
    return ex, dict(summary, out=str(out), sidecar=side)
