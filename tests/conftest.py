"""Session-wide fixtures shared by the test packages."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory: pytest.TempPathFactory):
    """The toy world for seed 0, built once per session (a few minutes on 2 cores).

    A current ``toy_world/`` at the repository root (what ``evomerge toy build`` makes) is reused
    as is; otherwise the world is built into a session temp folder, never into the repository.
    """
    from evomerge.toy.build import build_toy_world, load_toy_world

    world = load_toy_world(REPO_ROOT / "toy_world", seed=0)
    if world is not None:
        return world
    return build_toy_world(tmp_path_factory.mktemp("toy") / "toy_world", seed=0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the toy world is slow (building it takes minutes where no current
    ``toy_world/`` exists): ``pytest -m "not slow"`` never builds it."""
    for item in items:
        if "toy_world" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
