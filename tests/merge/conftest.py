from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .tiny_models import cast_model_folder, write_tiny_llama


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


@pytest.fixture(scope="session")
def tiny_models_by_dtype(tiny_models, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """The tiny models stored in float32 (as written), bfloat16 and float16, by dtype name."""
    out = {"float32": tiny_models}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        root = tmp_path_factory.mktemp(f"tiny_{name}")
        out[name] = {k: cast_model_folder(p, root / k, dtype) for k, p in tiny_models.items()}
    return out
