"""A failpoint that holds another thread until the test lets it go: for race tests.

A fixed ``sleep`` at a failpoint opens a window the test's own step must fit in; on a loaded
machine that step can take longer than any pause, and the two sides swap roles. Held on an
event instead, the other thread waits exactly until the test's step is done.
"""

from __future__ import annotations

import threading

import pytest

from evomerge import failpoints


class HeldFailpoint:
    """The first thread other than the test's own to reach failpoint ``name`` waits there until
    :meth:`release`; ``arrived`` is set when it gets there."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, timeout_s: float = 120.0) -> None:
        self.arrived, self._released = threading.Event(), threading.Event()
        self._timeout_s = timeout_s
        own, real_hit = threading.current_thread(), failpoints.hit

        def hit(hit_name: str, context: str = "") -> str | None:
            if hit_name == name and threading.current_thread() is not own and not self.arrived.is_set():
                self.arrived.set()
                self._released.wait(timeout_s)
            return real_hit(hit_name, context)

        monkeypatch.setattr(failpoints, "hit", hit)

    def wait_for_arrival(self) -> None:
        assert self.arrived.wait(self._timeout_s), "no other thread reached the failpoint"

    def release(self) -> None:
        self._released.set()
