"""Exceptions that the CLI turns into exit codes.

`UserError` (and subclasses) mean bad input: a missing file, a malformed config, an
unknown name, a value out of range. The CLI prints ``error: <message>`` as one line on
stderr and exits with code 2. Anything else is a bug and exits with code 1.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user; reported as one line, exit code 2."""


class ConfigError(UserError):
    """A config file or override is invalid. Holds every problem found, not just the first."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + one_line(self.problems, 480 - len(where)))


def one_line(problems: list[str], limit: int = 480) -> str:
    """Problems joined with '; ' into one line that stays short: the first ones in full while they
    fit about `limit` characters, then how many more."""
    shown, length = [], 0
    for i, problem in enumerate(problems):
        if shown and length + len(problem) > limit:
            shown.append(f"and {len(problems) - i} more problem(s)")
            break
        shown.append(problem)
        length += len(problem) + 2
    return "; ".join(shown)


def first_of(items: list[str], n: int = 3, sep: str = ", ") -> str:
    """The first `n` items joined, then how many more: a list in an error line never drops some silently."""
    rest = len(items) - n
    return sep.join(list(items[:n]) + ([f"and {rest} more"] if rest > 0 else []))


class RunInterrupted(BaseException):
    """Raised from a SIGTERM handler so that runs end as KILLED, like Ctrl-C.

    A BaseException (like KeyboardInterrupt) so that broad `except Exception`
    blocks in library code do not swallow it.
    """



def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' when a close match exists, else ''."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""
