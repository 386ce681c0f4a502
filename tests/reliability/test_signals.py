"""SIGINT and SIGTERM sent to the search process alone, at named moments: it stops, marks what
was running as interrupted, stops every worker and the Ray cluster it started, exits 130 or 143
and says how to resume; no process of the run is left (checked by PID: the search's session,
where Ray's workers run in process groups of their own, and the actors' PIDs from the hit log).

The moments are failpoints counted in a shared hit log: the test waits for the hit, then sends
the signal, so the signal lands in the step after it (loading models, inside ``ray.init``,
inside an evaluation, inside an atomic write) whatever the machine's load."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psutil
import pytest

from evomerge import failpoints

from .helpers import env_with, read_run, reap_session, session_processes, start, write_space
from .helpers import space as toy_space

pytestmark = pytest.mark.slow

EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


def wait_for_hit(counters: Path, name: str, proc, timeout_s: float = 300) -> list[tuple]:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        hits = [h for h in failpoints.read_hits(counters) if h[0] == name]
        if hits:
            return hits
        assert proc.poll() is None, f"the search ended (rc {proc.returncode}) before failpoint {name}"
        time.sleep(0.2)
    raise AssertionError(f"failpoint {name} was never hit")


def alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def interrupt(tmp_path: Path, toy_world, *, pool: str, spec: str, moment: str, signum: int, after: int = 1,
              budget: int = 4) -> tuple[int, str, set[int]]:
    """Start a search, send ``signum`` to its process once failpoint ``moment`` was hit ``after``
    times; returns its exit status, its output and the PIDs of its processes and actors."""
    data = toy_space(toy_world, budget=budget, items=8)
    data["workers"].update(pool=pool, count=2 if pool == "ray" else 1)
    cfg = write_space(tmp_path, data)
    counters = tmp_path / "failpoints"
    counters.mkdir()
    log = tmp_path / "log.txt"
    proc = start(["search", str(cfg), "--runs-dir", str(tmp_path / "runs")], cwd=tmp_path,
                 env=env_with(f"{spec};{moment}=count;worker.evaluate=count", counters), log=log)
    try:
        deadline = time.time() + 300
        while len(wait_for_hit(counters, moment, proc)) < after and time.time() < deadline:
            time.sleep(0.2)
        pids = {p.pid for p in session_processes(proc.pid)}
        pids |= {pid for name, _, pid, _ in failpoints.read_hits(counters) if name == "worker.evaluate"}
        proc.send_signal(signum)  # the search process alone, not its group or session
        rc = proc.wait(timeout=120)  # a guard against a hang, not a timing assertion
        survivors = alive(pids - {proc.pid}) + [p.pid for p in session_processes(proc.pid)
                                                 if p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if proc.poll() is None:
            proc.kill()
        reap_session(proc.pid, grace_s=0)
    assert not survivors, f"processes of the run outlived it: {survivors}\n{log.read_text()[-3000:]}"
    return rc, log.read_text(), pids


def test_sigint_mid_trial_stops_ray_workers_and_cluster_and_marks_trials_interrupted(toy_world, tmp_path):
    rc, output, pids = interrupt(tmp_path, toy_world, pool="ray", spec="worker.after_merge=sleep(600)",
                                 moment="worker.after_merge", signum=signal.SIGINT, after=2)
    assert rc == EXIT[signal.SIGINT], output[-3000:]
    run = tmp_path / "runs" / "faults"
    assert f"Resume with: evomerge resume {run}" in " ".join(output.split()), output[-2000:]
    assert "2 running trial(s) marked interrupted" in output, output[-2000:]
    assert len(pids) > 3  # the search, the cluster's processes and both actors were watched
    records, pareto = read_run(run)
    assert [r.interrupted for r in records] == [True, True] and pareto["counts"]["interrupted"] == 2


def test_sigterm_inside_ray_init_stops_whatever_it_had_started(toy_world, tmp_path):
    rc, output, _ = interrupt(tmp_path, toy_world, pool="ray", spec="", moment="pool.ray_init", signum=signal.SIGTERM)
    assert rc == EXIT[signal.SIGTERM], output[-3000:]
    assert "Resume with: evomerge resume" in " ".join(output.split()), output[-2000:]
    records, _ = read_run(tmp_path / "runs" / "faults")
    assert records == []  # the loop had not asked anything yet


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_loading_models_leaves_nothing(toy_world, tmp_path, signum):
    rc, output, _ = interrupt(tmp_path, toy_world, pool="inprocess", spec="", moment="search.start", signum=signum)
    assert rc == EXIT[signum], output[-3000:]
    assert "before the run started; nothing was recorded" in output, output[-2000:]
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_sigterm_mid_trial_in_process(toy_world, tmp_path):
    rc, output, _ = interrupt(tmp_path, toy_world, pool="inprocess", spec="worker.after_merge=sleep(600)@2",
                              moment="worker.after_merge", signum=signal.SIGTERM, after=2)
    assert rc == EXIT[signal.SIGTERM], output[-3000:]
    records, pareto = read_run(tmp_path / "runs" / "faults")
    assert [(r.state, r.interrupted) for r in records] == [("complete", False), ("failed", True)]
    assert pareto["counts"]["interrupted"] == 1 and "1 running trial(s) marked interrupted" in output


def test_sigterm_inside_an_atomic_write_keeps_the_old_file_and_no_temp(toy_world, tmp_path):
    # pareto.json is written when the run is created, when it is opened, then after every trial
    rc, output, _ = interrupt(tmp_path, toy_world, pool="inprocess", spec="store.before_replace.pareto.json=sleep(600)@3",
                              moment="store.before_replace.pareto.json", signum=signal.SIGTERM, after=3)
    assert rc == EXIT[signal.SIGTERM], output[-3000:]
    run = tmp_path / "runs" / "faults"
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # the temp file was removed
    # whole, and current: the interrupted write left nothing behind, and the clean-up's close wrote the
    # file again from the log (a kill -9 inside the same write, which runs no clean-up, is
    # test_kill_points' case: there the old file must be left whole)
    pareto = json.loads((run / "pareto.json").read_text())
    records, _ = read_run(run)
    assert [r.state for r in records] == ["complete"] and pareto["counts"]["complete"] == 1
