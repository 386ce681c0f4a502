"""Ctrl-C and SIGTERM stop a search at any moment, the same way every time.

Python turns SIGINT into ``KeyboardInterrupt`` only when the process did not inherit it ignored,
and a shell starts background jobs (``evomerge search ... > log &``) with SIGINT ignored; SIGTERM
kills outright, and ``ray.init`` replaces its handler with ``sys.exit``. So the search installs
its own handler for both: the first signal raises :class:`Interrupted` in the main thread,
wherever it is (loading models, starting Ray, waiting for a worker, inside a write), and the
search stops its workers, marks running trials interrupted and exits ``128 + signal``. Further
signals are ignored while it cleans up, so the clean-up itself is never cut short; every step of
it is bounded. Raising from a handler alone is not enough (see :func:`check`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A signal asked the search to stop. ``run_dir`` is set once a run folder exists."""

    def __init__(self, signum: int = signal.SIGINT, *, run_dir: Path | None = None, interrupted_trials: int = 0) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.run_dir = run_dir
        self.interrupted_trials = interrupted_trials

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process its signal ended: 130, 143


_received: list[int] = []  # the first signal since install()
_delivered: list[bool] = []  # whether its Interrupted reached the search (see check())
_deferred: list[bool] = []  # inside deferred(): a signal is raised when the block ends


def _raise_once(signum: int, _frame: object) -> None:
    if _received:  # already stopping: let the clean-up finish
        return
    _received.append(signum)
    if not _deferred:
        raise Interrupted(signum)


def check() -> None:
    """Raise :class:`Interrupted` again if a signal came and its exception was lost.

    A handler's exception is raised wherever the main thread is, and Python drops one raised
    while a ``__del__`` method or a weakref callback runs ("Exception ignored in ..."); a library
    may swallow it too. The search calls this at every step of its loop, so a signal stops it
    whatever it was doing when the signal came."""
    if _received and not _delivered:
        raise Interrupted(_received[0])


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block a signal must not cut short (stopping the workers, marking trials interrupted):
    a signal that comes inside is raised when it ends."""
    _deferred.append(True)
    try:
        yield
    finally:
        _deferred.pop()
    check()


def acknowledge() -> None:
    """The search caught the interruption and is cleaning up: :func:`check` stops raising."""
    _delivered.append(True)


def install() -> None:
    """Make SIGINT and SIGTERM raise :class:`Interrupted` (once) in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return
    _received.clear()
    _delivered.clear()
    for signum in SIGNALS:
        signal.signal(signum, _raise_once)


@contextlib.contextmanager
def keep_handlers() -> Iterator[None]:
    """Put back the SIGINT and SIGTERM handlers that a library call (``ray.init``) replaces."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.getsignal(signum) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            if handler is not None:
                signal.signal(signum, handler)
