"""Graceful stops: SIGTERM and Ctrl-C end a run as KILLED without corrupting shared state.

The handler raises at once (so that model loading, evaluation or a long step stop
promptly), except inside a `shielded()` section, where the stop is recorded and raised
when the section ends. MLflow calls are shielded: a stop that lands while SQLAlchemy holds
an open SQLite transaction would otherwise leave the database locked, and the run could not
be marked KILLED.

A raise from a signal handler can also be lost: if the signal arrives while Python runs a
gc or weakref callback, the exception is printed as "Exception ignored" and dropped. Long
loops therefore call `check_stop()` at every step boundary.
"""

from __future__ import annotations

import functools
import signal
import sys
from contextlib import contextmanager

from lora_project.errors import RunInterrupted

_requested: type[BaseException] | None = None
_delivered = False  # the stop was raised once; clean-up code after it is not interrupted again
_depth = 0


def _exception_for(signum: int) -> type[BaseException]:
    return KeyboardInterrupt if signum == signal.SIGINT else RunInterrupted


def handle_signal(signum, frame) -> None:
    """Signal handler for SIGTERM and SIGINT (a second signal always raises at once)."""
    global _requested
    first = _requested is None
    _requested = _exception_for(signum)
    if _depth and first:
        return
    raise _requested()  # may be swallowed (inside a weakref callback): check_stop raises it again


def check_stop() -> None:
    """Raise the pending KeyboardInterrupt / RunInterrupted, once, if a stop was requested.

    Once raised, the stop travels up as an exception; the clean-up it passes through (ending the
    MLflow run, writing results.json) is not torn by raising it again. A second signal still
    raises at once.
    """
    global _delivered
    if _requested is not None and not _delivered:
        _delivered = True
        raise _requested()


def acknowledge() -> None:
    """The stop has reached the code that handles it: later check_stop() calls (in clean-up that
    ends tracking or writes results) no longer raise it again."""
    global _delivered
    if _requested is not None:
        _delivered = True


def clear_stop() -> None:
    """Forget any stop request (start of a command)."""
    global _requested, _depth, _delivered
    _requested, _depth, _delivered = None, 0, False


@contextmanager
def shielded():
    """Defer a stop until the block ends (use around short I/O that must not be torn)."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if _depth == 0:
        check_stop()


def shield(fn):
    """Decorator form of `shielded()`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with shielded():
            return fn(*args, **kwargs)
    return wrapper


def _quiet_unraisable(unraisable, _default=sys.unraisablehook):
    """No traceback for a stop that landed inside a gc/weakref callback (it is still honoured)."""
    if isinstance(unraisable.exc_value, (KeyboardInterrupt, RunInterrupted)):
        return
    _default(unraisable)


def install() -> None:
    """Install the handlers (main thread only) and forget any earlier stop request."""
    clear_stop()
    sys.unraisablehook = _quiet_unraisable
    signal.signal(signal.SIGTERM, handle_signal)
    signal.signal(signal.SIGINT, handle_signal)
