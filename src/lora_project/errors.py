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
        shown, length = [], len(where)
        for i, problem in enumerate(self.problems):  # the line stays short: the first problems, then a count
            if shown and length + len(problem) > 480:
                shown.append(f"and {len(self.problems) - i} more problem(s)")
                break
            shown.append(problem)
            length += len(problem) + 2
        super().__init__(where + "; ".join(shown))


class RunInterrupted(BaseException):
    """Raised from a SIGTERM handler so that runs end as KILLED, like Ctrl-C.

    A BaseException (like KeyboardInterrupt) so that broad `except Exception`
    blocks in library code do not swallow it.
    """



def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' when a close match exists, else ''."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""
