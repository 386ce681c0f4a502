"""Session-wide fixtures shared by the test packages, and how the suite is ordered and spread.

The whole suite (``bash scripts/test.sh``) runs on two pytest-xdist workers. Where no current
``toy_world/`` exists (a fresh clone, CI), the toy world is built once, in a process of its own
started with the session's first test, while the tests that need no world run beside it; the
tests that need it run after them and wait for it. Each test file runs on one worker (its module
fixtures are built once), split in two where part of it needs the world; every test that starts
or joins a Ray cluster runs on one worker, so the session's shared cluster is started once.
Every process runs one OpenMP thread unless ``OMP_NUM_THREADS`` says otherwise (see below).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# One OpenMP/MKL thread per process unless the caller set another: the suite runs two workers, the
# toy-world build and the CLI processes they start on two cores, where every extra OpenMP thread
# only spin-waits (about a fifth more CPU time for the same tests here). Set before torch is
# imported; the processes tests start inherit it. Workers still set their own (cpus_per_worker).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
PREBUILT_WORLD = REPO_ROOT / "toy_world"
# The files whose tests start or join a Ray cluster: one worker runs them all (see the docstring).
RAY_FILES = ("test_kill_points.py", "test_signals.py", "test_two_nodes.py", "test_worker_faults.py")


def _needs_toy_world(item: pytest.Item) -> bool:
    return "toy_world" in getattr(item, "fixturenames", ())


def _worker_group(item: pytest.Item) -> str:
    """The xdist group of a test: ``ray`` for the Ray tests, else its file (and ``+toy`` for the
    part of the file that needs the toy world)."""
    if item.path.name in RAY_FILES:
        return "ray"
    rel = item.path.relative_to(REPO_ROOT).as_posix()
    return rel + ("+toy" if _needs_toy_world(item) else "")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the toy world is slow (building it takes minutes where no current
    ``toy_world/`` exists): ``pytest -m "not slow"`` never builds it.

    The tests that need no toy world run first (a stable sort: each group keeps its order), so
    that where the world must be built, the build runs beside them instead of before them; the
    Ray tests, the longest run of one worker, come first among the rest.

    First of the hooks (``tryfirst``): pytest-xdist's own hook turns each test's ``xdist_group``
    mark into the suffix of its node id, which is what ``--dist loadgroup`` groups by; run after
    it, the marks came too late, every test was a group of its own, and a file's module fixtures,
    the shared Ray cluster and the PostgreSQL server were made once on each worker."""
    for item in items:
        if _needs_toy_world(item):
            item.add_marker(pytest.mark.slow)
        item.add_marker(pytest.mark.xdist_group(_worker_group(item)))
    items.sort(key=lambda item: (_needs_toy_world(item), _worker_group(item) != "ray"))


class _WorldBuild:
    """``evomerge toy build`` of the seed-0 world into a folder every worker of the session sees,
    in a process of its own (it trains on one thread). The first worker to start a test starts
    it; every worker that needs the world waits for its exit status file."""

    def __init__(self, shared: Path) -> None:
        self.root = shared / "toy_build"
        self.folder = self.root / "toy_world"
        self.log = self.root / "build.log"
        self.status = self.root / "build.status"
        self.proc: subprocess.Popen | None = None
        from filelock import FileLock

        with FileLock(str(shared / "toy_build.lock")):
            if self.root.exists():  # another worker started it
                return
            self.root.mkdir()
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
            script = '"$0" -m evomerge.cli toy build "$1" > "$2" 2>&1; echo $? > "$3.tmp"; mv "$3.tmp" "$3"'
            self.proc = subprocess.Popen(["sh", "-c", script, sys.executable, str(self.folder), str(self.log),
                                          str(self.status)], cwd=self.root, env=env, start_new_session=True)

    def world(self):
        from evomerge.toy.build import load_toy_world

        while not self.status.exists():
            time.sleep(0.5)
        code = self.status.read_text().strip()
        world = load_toy_world(self.folder, seed=0) if code == "0" else None
        if world is None:
            raise RuntimeError(f"`evomerge toy build` exited {code}:\n{self.log.read_text()[-3000:]}")
        return world

    def finish(self, session: pytest.Session) -> None:
        """A build this worker started and nobody waited for yet: let it end (another worker may
        still wait for it), unless the session is stopping early."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if session.shouldfail or session.shouldstop:
            self._kill()
        try:
            self.proc.wait()
        except KeyboardInterrupt:
            self._kill()
            raise

    def _kill(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the shell and the build it runs
        self.proc.wait()


def _shared_temp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of this session that every xdist worker sees (each has a base temp of its own)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def _toy_world_build(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[_WorldBuild | None]:
    """Starts building the toy world with the session's first test when a selected test needs it
    and no current ``toy_world/`` exists; None otherwise."""
    if not any(_needs_toy_world(item) for item in request.session.items):
        yield None
        return
    from evomerge.toy.build import load_toy_world

    if load_toy_world(PREBUILT_WORLD, seed=0) is not None:
        yield None
        return
    build = _WorldBuild(_shared_temp(tmp_path_factory))
    try:
        yield build
    finally:
        build.finish(request.session)


@pytest.fixture(scope="session")
def toy_world(_toy_world_build: _WorldBuild | None, tmp_path_factory: pytest.TempPathFactory):
    """The toy world for seed 0, built once per session (a few minutes on 2 cores).

    A current ``toy_world/`` at the repository root (what ``evomerge toy build`` makes) is reused
    as is; otherwise the world is built into a session temp folder, never into the repository, by
    the build the session started with its first test (or now, for a test that asked for the
    world without naming it as an argument).
    """
    from evomerge.toy.build import load_toy_world

    build = _toy_world_build
    if build is None:
        world = load_toy_world(PREBUILT_WORLD, seed=0)
        if world is not None:
            return world
        build = _WorldBuild(_shared_temp(tmp_path_factory))
    return build.world()
