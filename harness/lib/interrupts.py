"""SIGINT and SIGTERM as an exception: ``Interrupted``, so a run can record that it was stopped.

``raise_on_signals()`` (a context manager) makes both signals raise ``Interrupted`` in the main
thread; ``run_trial`` catches it, writes the record as ``interrupted`` (with the stage) and re-raises
it; the CLI prints one line and exits ``128 + signal`` (130 for SIGINT, 143 for SIGTERM).
``Interrupted`` is a ``KeyboardInterrupt``, so ``except Exception`` blocks (retries, fallbacks) never
swallow it. Handlers are only installed where the process still has the default ones (a Ray
worker keeps Ray's), and only from the main thread. ``deferred()`` holds both signals back while a
record is being written, so a second Ctrl-C cannot cut the record of the first.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The process received SIGINT or SIGTERM. ``exit_code`` is ``128 + signal number``."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def __str__(self) -> str:
        return f"interrupted by {self.name}"


def _raise(signum, frame) -> None:
    raise Interrupted(signum)


def _is_default(sig: int, handler) -> bool:
    return handler in (signal.SIG_DFL, signal.default_int_handler, _raise) or (
        sig == signal.SIGINT and handler is None)


@contextmanager
def raise_on_signals() -> Iterator[bool]:
    """Within the block, SIGINT and SIGTERM raise ``Interrupted`` (main thread, default handlers
    only); yields whether the handlers were installed. The previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    if not all(_is_default(sig, h) for sig, h in previous.items()):
        yield False
        return
    for sig in SIGNALS:
        signal.signal(sig, _raise)
    try:
        yield True
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def deferred() -> Iterator[None]:
    """Block SIGINT and SIGTERM in this thread for the block (e.g. while the interrupted record is
    written); a signal that arrives meanwhile is delivered right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def exit_code(exc: BaseException) -> int:
    """The exit status for an interruption (``Interrupted.exit_code``; 130 for a plain KeyboardInterrupt)."""
    return int(getattr(exc, "exit_code", 128 + signal.SIGINT))
