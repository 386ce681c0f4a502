"""Searches whose trial log is a real PostgreSQL server (``storage:`` in the space file).

One server per session (``postgres_server``); each test is a few tiny searches through the real
CLI: a holder on another "host" (a copy of the run folder) is refused by the study's lease, a
``kill -9`` holder is taken over and its run resumed to the budget with every trial once, a lost
host's stale lease is taken over while a fresh one is refused, two runs from two processes share
one database without mixing, and ``show``/``export`` read it all back. A holder runs in a process
of its own (it is killed, paused, or runs beside another); the commands that meet it run the same
entry point in the test's process (``tests/cli_inprocess.py``), without a fresh interpreter's
imports for each.

What is tested is the trial log and the lease, not where candidates run: the searches use the
in-process pool (no Ray cluster to start per search; Ray is tested in ``test_worker_faults``,
``test_kill_points``, ``test_two_nodes`` and ``test_signals``), and the holders renew their lease
every half second (``EVOMERGE_LEASE_HEARTBEAT_S``), so a takeover is seen within a second.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import pytest

from tests.cli_inprocess import run_cli

from .helpers import env_with, reap_session, start, write_space
from .helpers import space as toy_space
from .postgres_server import bin_dir, running_server

pytestmark = pytest.mark.slow

BUDGET = 4  # one CMA generation of 4
IN_PROCESS = {"count": 2, "cpus_per_worker": 1, "pool": "inprocess"}
HEARTBEAT = {"EVOMERGE_LEASE_HEARTBEAT_S": "0.5"}


@pytest.fixture(scope="session")
def postgres_url():
    if bin_dir() is None:
        pytest.skip("PostgreSQL is not installed: scripts/install.sh installs Debian's postgresql package")
    with running_server() as url:
        yield url


def _records(url: str, study: str):
    import optuna

    return optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False)


def _lease(url: str, study: str):
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as con:
            if not sa.inspect(con).has_table("evomerge_run_lease"):
                return None
            return con.execute(sa.text("SELECT holder, heartbeat FROM evomerge_run_lease WHERE study_name = :s"),
                               {"s": study}).first()
    finally:
        engine.dispose()


def _put_lease(url: str, study: str, host: str, heartbeat: float) -> None:
    """A lease row as a process on another host leaves it (alive, or lost with its host)."""
    import sqlalchemy as sa

    holder = json.dumps({"host": host, "pid": 4242, "since": "2026-11-30T10:00:00+00:00", "proc_started": 1.0})
    engine = sa.create_engine(url)
    try:
        with engine.begin() as con:
            con.execute(sa.text("DELETE FROM evomerge_run_lease WHERE study_name = :s"), {"s": study})
            con.execute(sa.text("INSERT INTO evomerge_run_lease (study_name, token, holder, heartbeat) "
                                "VALUES (:s, 'elsewhere', :h, :t)"), {"h": holder, "t": heartbeat, "s": study})
    finally:
        engine.dispose()


def _wait_for(condition, timeout_s: float = 300, what: str = "") -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_postgres_run_is_held_taken_over_after_kill_9_resumed_and_read_back(toy_world, tmp_path, postgres_url):
    from optuna.trial import TrialState

    cfg = write_space(tmp_path, toy_space(toy_world, budget=BUDGET, items=8, storage=postgres_url, workers=IN_PROCESS))
    runs, other = tmp_path / "runs", tmp_path / "other_host"
    # the holder stops after its second recorded trial and stays alive, holding the lease
    env = env_with("search.after_tell=sleep(900)@2", **HEARTBEAT)
    holder = start(["search", str(cfg), "--runs-dir", str(runs)], cwd=tmp_path, env=env, log=tmp_path / "holder.txt")
    try:
        complete = lambda: sum(t.state == TrialState.COMPLETE for t in _records(postgres_url, "faults"))  # noqa: E731
        _wait_for(lambda: (runs / "faults" / "run.json").exists() and complete() >= 2, what="two trials")
        assert json.loads(_lease(postgres_url, "faults").holder)["pid"] == holder.pid

        # another host with a copy of the run folder: its folder lock is free, the study's lease is not
        shutil.copytree(runs / "faults", other / "faults")
        refused = run_cli("resume", str(other / "faults"), cwd=tmp_path)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert f"study 'faults' is being searched by pid {holder.pid} on host {socket.gethostname()}" in refused.stderr
        assert "Traceback" not in refused.stderr

        holder.kill()  # kill -9: no handler runs, the lease row stays behind
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
        reap_session(holder.pid)

    # the dead holder is seen as gone at once (its pid is not alive on this host): taken over, resumed
    resumed = run_cli("resume", str(other / "faults"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = _records(postgres_url, "faults")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == BUDGET
    members = [(t.user_attrs["generation"], t.user_attrs["member"]) for t in complete]
    assert sorted(members) == [(0, m) for m in range(BUDGET)]  # every candidate once
    assert all(t.state == TrialState.COMPLETE or t.user_attrs.get("fail_kind") == "interrupted" for t in trials)
    assert _lease(postgres_url, "faults") is None  # a clean exit gives the lease back

    # show and export read the run back from PostgreSQL, from either folder
    for folder in (runs / "faults", other / "faults"):
        shown = run_cli("show", str(folder), cwd=tmp_path)
        # rich folds the run's long path at 80 columns (stdout is not a terminal): unfold it
        assert shown.returncode == 0 and "faults" in shown.stdout.replace("\n", ""), shown.stderr[-3000:]
    out = tmp_path / "best.yaml"
    exported = run_cli("export", str(other / "faults"), "--best", "-o", str(out), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "merge_method: ties" in out.read_text()

    # a lost host: its lease is refused while fresh, taken over once stale (no heartbeat for STALE_S)
    from evomerge.run_lock import STALE_S

    _put_lease(postgres_url, "faults", "lost-host", time.time())
    # fresh for an hour here: a loaded machine may take longer than STALE_S to start the CLI
    fresh = run_cli("resume", str(other / "faults"), cwd=tmp_path, env={"EVOMERGE_LEASE_STALE_S": "3600"})
    assert fresh.returncode == 2 and "by pid 4242 on host lost-host" in fresh.stderr, fresh.stderr[-2000:]
    _put_lease(postgres_url, "faults", "lost-host", time.time() - STALE_S - 5)
    stale = run_cli("resume", str(other / "faults"), cwd=tmp_path)  # budget spent: takes it, nothing to do
    assert stale.returncode == 0, stale.stderr[-3000:]
    assert _lease(postgres_url, "faults") is None


def test_two_runs_from_two_processes_share_one_database(toy_world, tmp_path, postgres_url):
    from optuna.trial import TrialState

    procs = {}
    for name, seed in (("pg_a", 0), ("pg_b", 1)):
        folder = tmp_path / name
        folder.mkdir()
        data = toy_space(toy_world, budget=BUDGET, items=8, storage=postgres_url, name=name,
                         workers={"count": 1, "cpus_per_worker": 1, "pool": "inprocess"})
        data["search"]["seed"] = seed
        cfg = write_space(folder, data)
        procs[name] = start(["search", str(cfg), "--runs-dir", str(tmp_path / "runs")], cwd=folder, env=env_with(),
                            log=folder / "log.txt")
    try:
        for name, proc in procs.items():
            assert proc.wait(timeout=900) == 0, (tmp_path / name / "log.txt").read_text()[-3000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            reap_session(proc.pid)
    units = {}
    for name in procs:
        trials = _records(postgres_url, name)
        assert [t.state for t in trials] == [TrialState.COMPLETE] * BUDGET, name
        units[name] = {json.dumps(t.user_attrs["unit_x"]) for t in trials}
        shown = run_cli("show", str(tmp_path / "runs" / name), cwd=tmp_path)
        assert shown.returncode == 0 and name in shown.stdout.replace("\n", ""), shown.stderr[-2000:]  # unfolded
    assert not units["pg_a"] & units["pg_b"]  # two seeds, two studies: nothing mixed
    assert not (Path(tmp_path / "runs" / "pg_a") / "trials.db").exists()  # the log is in PostgreSQL, not the folder


def test_a_holder_whose_lease_was_taken_over_stops_and_writes_nothing_more(toy_world, tmp_path, postgres_url):
    """A holder that stalls past its lease (here: paused after its first recorded trial while the
    row is taken over, as a process on another host would once the lease looked stale) learns of it
    at its next heartbeat and stops at its next step, exit 1, without another record and without
    marking the run's running trials interrupted: never two writers on one study. The new holder's
    lease is left alone. (The pause is twenty heartbeats long: the test has put the new row and the
    holder's heartbeat has met it well before the holder takes its next step.)"""
    from optuna.trial import TrialState

    cfg = write_space(tmp_path, toy_space(toy_world, budget=8, items=8, storage=postgres_url, name="stolen",
                                          workers=IN_PROCESS))
    runs = tmp_path / "runs"
    env = env_with("search.after_tell=sleep(10)@1", **HEARTBEAT)
    holder = start(["search", str(cfg), "--runs-dir", str(runs)], cwd=tmp_path, env=env, log=tmp_path / "holder.txt")
    try:
        done = lambda: [t for t in _records(postgres_url, "stolen") if t.state == TrialState.COMPLETE]  # noqa: E731
        _wait_for(lambda: (runs / "stolen" / "run.json").exists() and len(done()) >= 1, what="a first trial")
        _put_lease(postgres_url, "stolen", "new-host", time.time())  # taken over while the holder is paused
        before = len(done())
        assert holder.wait(timeout=300) == 1
    finally:
        if holder.poll() is None:
            holder.kill()
        reap_session(holder.pid)
    log = (tmp_path / "holder.txt").read_text()
    assert "another process took over" in log, log[-3000:]
    assert len(done()) == before  # nothing recorded after the takeover
    assert json.loads(_lease(postgres_url, "stolen").holder)["host"] == "new-host"
