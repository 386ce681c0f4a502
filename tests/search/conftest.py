"""Fixtures for searches run in the test process on the in-process pool: failpoints set for one
test, with their hit log in a folder the test reads."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from evomerge import failpoints


@pytest.fixture
def set_failpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], Path]]:
    """``set_failpoints(spec)`` arms failpoints in this process and returns the folder of their hit log."""
    counters = tmp_path / "failpoints"
    counters.mkdir()
    monkeypatch.setenv(failpoints.DIR_ENV, str(counters))

    def arm(spec: str) -> Path:
        failpoints.configure(spec)
        return counters

    yield arm
    failpoints.configure("")
