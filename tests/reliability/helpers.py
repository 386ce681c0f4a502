"""Running real searches as a user does (the CLI in its own process session) and cleaning up
exactly the processes a test started: never ``ray stop --force``, which would also stop every
other Ray cluster on the machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from tests.search.test_search_e2e import write as write_space  # noqa: F401  (one space writer for all tests)

ROOT = Path(__file__).resolve().parents[2]


def space(toy_world: Any, *, budget: int, driver: str = "cma", items: int = 16, **overrides: Any) -> dict:
    """A small search on the toy world: TIES over both specialists, 2 workers of 1 CPU."""
    donors = [str(p) for _, p in sorted(toy_world.specialists.items())]
    data = {
        "name": "faults",
        "models": {"base": str(toy_world.base), "donors": donors},
        "merge": {
            "method": "ties",
            "layer_groups": 1,
            "filters": ["mlp"],
            "parameters": {"weight": {"range": [0.2, 1.2]}, "density": {"range": [0.3, 1.0]}, "lambda": 1.0},
        },
        "objectives": [{"task": f"toy_{n}", "metric": "acc", "direction": "maximize"} for n in sorted(toy_world.specialists)]
        + [{"measure": "l2_from_base", "direction": "minimize"}],
        "evaluation": {"items": items, "batch_size": items, "include_path": [str(ROOT / "eval_tasks")]},
        # hand_set off: these tests count CMA generations from trial 0 (hand-set trials: tests/search/test_hand_set.py)
        "search": {"driver": driver, "budget": budget, "seed": 0, "hand_set": False,
                   **({"population": 4} if driver == "cma" else {})},
        "workers": {"count": 2, "cpus_per_worker": 1},
    }
    data.update(overrides)
    return data




def env_with(failpoints: str | None = None, counter_dir: Path | None = None, **extra: str) -> dict[str, str]:
    """This worktree's code on PYTHONPATH (Ray workers inherit it), plus the failpoints asked for."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVOMERGE_FAILPOINTS")}
    # pareto.json after every trial, not on a timer: failpoints count its writes (store.before_replace)
    env["EVOMERGE_PARETO_INTERVAL_S"] = "0"
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if failpoints:
        env["EVOMERGE_FAILPOINTS"] = failpoints
    if counter_dir is not None:
        env["EVOMERGE_FAILPOINTS_DIR"] = str(counter_dir)
    return env


def start(args: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """``python -m evomerge.cli ARGS`` in a new session (its Ray processes share that session id)."""
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "evomerge.cli", *args], cwd=cwd, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def session_processes(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                out.append(p)
        except (ProcessLookupError, psutil.Error, PermissionError):
            pass
    return out


def reap_session(sid: int, grace_s: float = 10.0) -> list[str]:
    """Wait up to ``grace_s`` for the processes of session ``sid`` to exit (Ray's fate-sharing with a
    killed driver), then SIGKILL the ones left; returns the names of those that had to be killed."""
    deadline = time.time() + grace_s
    left = session_processes(sid)
    while left and time.time() < deadline:
        time.sleep(0.5)
        left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    names = []
    for p in left:
        try:
            names.append(p.name())
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    return names


def run_to_end(args: list[str], *, cwd: Path, env: dict[str, str], log: Path, timeout_s: float = 600) -> int:
    """Run the CLI to its end; returns its exit status (-9 when a failpoint killed it)."""
    proc = start(args, cwd=cwd, env=env, log=log)
    try:
        return proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reap_session(proc.pid, grace_s=0 if proc.returncode == 0 else 10.0)


def read_run(run: Path) -> tuple[list[Any], dict]:
    """The run's trials and its pareto.json, both read fresh."""
    from evomerge.store import RunStore

    store = RunStore.open(run)
    try:
        records = store.trials()
    finally:
        store.close()
    return records, json.loads((run / "pareto.json").read_text())
