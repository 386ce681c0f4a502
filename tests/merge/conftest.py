from __future__ import annotations

from pathlib import Path

import pytest

from .tiny_models import write_tiny_llama


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny random base and three donors derived from it."""
    root = tmp_path_factory.mktemp("tiny")
    base = write_tiny_llama(root / "base", seed=0)
    return {
        "base": base,
        "a": write_tiny_llama(root / "a", seed=1, base=base),
        "b": write_tiny_llama(root / "b", seed=2, base=base),
        "c": write_tiny_llama(root / "c", seed=3, base=base),
    }
