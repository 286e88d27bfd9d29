"""Reading text files that users hand us: one function, one set of messages.

Decode first, then judge: a UTF-16 file holds NUL bytes, but with ``encoding="utf-16"`` it
is perfectly good text, so the "is this binary?" check runs on the decoded characters (a
NUL or a run of C0 control characters in real text means the bytes were not text in that
encoding). A BOM matching the encoding is dropped.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from lora_project.errors import UserError

# Characters that never occur in text files (C0 controls other than tab, newline, carriage
# return, form feed and escape; DEL). A NUL anywhere, or more than 1% of such characters in
# the first 64 KiB, means the file is not text in the given encoding.
_CONTROL = {chr(c) for c in range(32) if chr(c) not in "\t\n\r\f\x1b"} | {"\x7f"}
_SNIFF = 65536


def _set_encoding(encoding_option: bool | str, name: str) -> str:
    """How the user names an encoding where this file was given: the --encoding option (True), a
    template such as a catalog row's option (a str with {}), or nothing to suggest (False)."""
    if isinstance(encoding_option, str):
        return "set " + encoding_option.format(name)
    return f"pass --encoding {name}" if encoding_option else ""


def decode_user_bytes(raw: bytes, where: str, *, what: str = "text", encoding: str = "utf-8",
                      encoding_option: bool | str = True) -> str:
    """`raw` decoded as `encoding`, or a one-line UserError naming `where` and the problem, whose
    advice names the way to give an encoding that the command really has (`encoding_option`)."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise UserError(f"unknown encoding {encoding!r}") from None
    shown = "UTF-8" if codecs.lookup(encoding).name == "utf-8" else encoding
    hint = f"; for UTF-16 text {_set_encoding(encoding_option, 'utf-16')}" if shown == "UTF-8" and encoding_option \
        else ""
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        if b"\x00" in raw[:_SNIFF]:
            raise UserError(f"{where}: looks like a binary file (NUL bytes), expected {what}{hint}") from None
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{where}: not {shown} (byte {exc.start}, line {line}); convert the file to UTF-8"
                        + (f" or {_set_encoding(encoding_option, 'ENCODING')}" if encoding_option else "")) from None
    text = text.removeprefix("\ufeff")
    head = text[:_SNIFF]
    if "\x00" in head or (head and sum(ch in _CONTROL for ch in head) > len(head) / 100):
        raise UserError(f"{where}: looks like a binary file, expected {what}{hint}")
    return text


def read_user_text(path: Path, *, what: str = "text", encoding: str = "utf-8",
                   encoding_option: bool | str = True) -> str:
    """The text of a user-supplied file; missing, unreadable, binary or mis-encoded files are
    one-line UserErrors that say which file and what was expected (`what`, e.g. "YAML")."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"file not found: {path}")
    if not path.is_file():
        raise UserError(f"not a file: {path}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    return decode_user_bytes(raw, str(path), what=what, encoding=encoding, encoding_option=encoding_option)
