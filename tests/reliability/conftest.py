"""Helpers for the reliability tests: a small valid space on the toy world, the real CLI as a
subprocess, fingerprints of folders (to prove a refused command changed nothing), and the one
Ray cluster that the tests of Ray itself share."""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def good_space(world: Any, **changes: Any) -> dict[str, Any]:
    """A valid two-donor TIES space on the toy world; ``changes`` set dotted paths (None deletes)."""
    data: dict[str, Any] = {
        "name": "bad",
        "models": {"base": str(world.base), "donors": [str(p) for _, p in sorted(world.specialists.items())]},
        "merge": {"method": "ties", "layer_groups": 1, "filters": ["mlp"],
                  "parameters": {"weight": {"range": [0.2, 1.2]}, "density": {"range": [0.3, 1.0]}, "lambda": 1.0}},
        "objectives": [{"task": f"toy_{n}", "metric": "acc", "direction": "maximize"} for n in sorted(world.specialists)],
        "evaluation": {"items": 8, "batch_size": 8, "include_path": [str(ROOT / "eval_tasks")]},
        "search": {"driver": "cma", "budget": 2, "population": 2, "seed": 0},
        "workers": {"count": 1, "cpus_per_worker": 1},
    }
    for path, value in changes.items():
        data = set_path(data, path, value)
    return data


def set_path(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of ``data`` with ``a.b.0.c`` set to ``value`` (``None`` deletes the key)."""
    data = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node: Any = data
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    key: Any = int(last) if isinstance(node, list) else last
    if value is None:
        del node[key]
    else:
        node[key] = value
    return data


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: this checkout's code first, no network."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra)
    return env


def evomerge(*args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], check=False, capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env or cli_env())


def fingerprint(folder: Path) -> dict[str, str] | None:
    """sha256 of every file under ``folder`` by relative path (None when it does not exist)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local Ray cluster for the whole session, started once; searches join it with
    ``--ray-address`` (and ``RAY_AUTH_MODE=disabled`` in their environment). Starting a cluster
    costs tens of seconds on 2 shared cores; the tests where a search must start (and stop) its
    own, or where a node is lost, start their own."""
    from .ray_nodes import RayNode, node_env

    temp = Path(f"/tmp/evmrc{os.getpid()}")  # short: Ray's socket paths must fit in 107 bytes
    # logical CPUs: room for two searches of two workers, and for the actors of a killed search
    # while Ray removes them
    node = RayNode(["--include-dashboard=false", "--num-cpus=8", f"--temp-dir={temp}"], node_env(str(ROOT)),
                   tmp_path_factory.mktemp("ray_cluster") / "head.log", head=True)
    try:
        node.wait_started()
        yield node.address
    finally:
        node.kill()
        shutil.rmtree(temp, ignore_errors=True)
