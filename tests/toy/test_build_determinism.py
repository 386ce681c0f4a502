"""A build's weights do not depend on the machine it runs on: thread counts and the CPU kernels
torch would pick are pinned in the build's child process (evomerge.toy.pinned)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evomerge.toy.build import build_toy_world
from evomerge.toy.pinned import PINNED_ENV


def _weights(folder: Path) -> dict[str, bytes]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return {name: (folder / rel / "model.safetensors").read_bytes() for name, rel in manifest["models"].items()}


@pytest.mark.slow
def test_reduced_build_is_bit_identical_under_other_threads_and_cpu_kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two reduced builds of the compose world (unscored: the weights are what varies), one from
    an environment that asks for 2 threads and torch's unvectorised kernels, one that asks for 1
    thread and lets torch pick (AVX-512 where the CPU has it): what a newcomer's machine would
    differ in. Same weights, byte for byte. The compose world, because the session's toy world
    already builds the pair world in full; a reduced world is never taken for a full one."""
    from evomerge.toy.build import load_toy_world
    from evomerge.toy.worlds import world_spec

    compose = world_spec("compose")
    builds = []
    for i, env in enumerate(({"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"},
                             {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": None, "MKL_CBWR": None})):
        for name, value in env.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        world = build_toy_world(tmp_path / f"build{i}", world="compose", steps_fraction=0.01, score=False)
        assert world.world == "compose" and world.seed == compose.default_seed
        builds.append(world.directory)
    first, second = (_weights(folder) for folder in builds)
    assert sorted(first) == sorted(["base", *compose.specialists])
    assert first == second
    manifests = [json.loads((folder / "manifest.json").read_text()) for folder in builds]
    assert manifests[0]["sha256"] == manifests[1]["sha256"]
    # the child ran on the pinned kernels and thread count, not on what the environment asked for
    for manifest in manifests:
        assert manifest["kernels"]["mkl_cbwr"] == PINNED_ENV["MKL_CBWR"]
        assert manifest["kernels"]["threads"] == 1
        assert manifest["training"]["base"]["steps"] == round(compose.base_training.steps * 0.01)  # really trained
    # and the fine-tunes moved the weights: identical bytes are not identical untrained models
    assert len({first[name] for name in first}) == len(first)
    # a reduced world is only ever taken for itself: not for a full one, nor for the other world
    assert load_toy_world(builds[0], world="compose", steps_fraction=0.01) is not None
    assert load_toy_world(builds[0], world="compose") is None
    assert load_toy_world(builds[0], world="pair", steps_fraction=0.01) is None


def test_a_failed_build_leaves_nothing_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child's failure is the parent's error, and no staging folder is left behind."""
    from evomerge.errors import ModelError

    # the child runs `python -m <the build module>`: point it at a module that does not exist
    monkeypatch.setattr("evomerge.toy.build.__name__", "evomerge.toy.no_such_module")
    with pytest.raises(ModelError, match="toy build .* failed with exit status"):
        build_toy_world(tmp_path / "world", seed=3, steps_fraction=0.02, score=False)
    assert list(tmp_path.iterdir()) == []
