"""The failpoint switchboard itself: parsing, when rules fire, counters shared across processes,
and the atomic write that a kill inside leaves whole (fast: no models, no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge import failpoints

from .helpers import env_with


def test_parse_and_when_rules_fire():
    rules = failpoints.parse("a.b=kill@3; a.b=sleep(0.5)@1,2 ;c=count;d=oom@4-")
    assert [r.action for r in rules["a.b"]] == ["kill", "sleep"] and rules["a.b"][1].arg == "0.5"
    assert [n for n in range(1, 7) if rules["a.b"][0].fires(n)] == [3]
    assert [n for n in range(1, 7) if rules["a.b"][1].fires(n)] == [1, 2]
    assert all(rules["c"][0].fires(n) for n in range(1, 7))
    assert [n for n in range(1, 7) if rules["d"][0].fires(n)] == [4, 5, 6]
    assert failpoints.parse("") == {}


@pytest.mark.parametrize("bad", ["nope", "a=explode", "a=kill@x", "=kill"])
def test_a_malformed_entry_is_an_error_not_a_silent_no_op(bad):
    with pytest.raises(ValueError, match="EVOMERGE_FAILPOINTS"):
        failpoints.parse(bad)


def test_unset_failpoints_do_nothing():
    assert not failpoints.active() and failpoints.hit("search.before_tell") is None


def _child(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False)


def test_counters_in_a_folder_are_shared_by_processes_and_kill_is_a_real_sigkill(tmp_path):
    env = env_with("p=kill@3;p=nan@2;q=raise@1", tmp_path)
    code = "from evomerge import failpoints as f; print(f.hit('p'), flush=True); print(f.hit('p'), flush=True)"
    first = _child(code, env)
    assert first.returncode == 0 and first.stdout.split() == ["None", "nan"]
    second = _child(code, env)  # hit 3 is the first of this process: SIGKILL, nothing after it runs
    assert second.returncode == -9 and second.stdout == ""
    third = _child(code, env)  # fired once in the whole test: hits 4 and 5 do nothing
    assert third.returncode == 0 and third.stdout.split() == ["None", "None"]
    raised = _child("from evomerge import failpoints as f; f.hit('q', 'ctx')", env)
    assert raised.returncode == 1 and "FailpointError: failpoint q (hit 1)" in raised.stderr
    assert [(n, k, c) for n, k, _, c in failpoints.read_hits(tmp_path)] == [
        ("p", 1, ""), ("p", 2, ""), ("p", 3, ""), ("p", 4, ""), ("p", 5, ""), ("q", 1, "ctx")]


def test_kill_inside_an_atomic_write_leaves_the_old_file_and_a_temp_that_a_resume_removes(tmp_path):
    from evomerge.store import RunStore

    run = RunStore.create(tmp_path, "r", "name: r\n", "0" * 16, directions={"x": "maximize"})
    before = (tmp_path / "r" / "pareto.json").read_text()
    code = ("from evomerge.store import RunStore; import sys; s = RunStore.open(sys.argv[1]); "
            "s.write_pareto()")
    killed = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r")], capture_output=True, text=True,
                            env=env_with("store.before_replace.pareto.json=kill"), timeout=120, check=False)
    assert killed.returncode == -9
    assert (tmp_path / "r" / "pareto.json").read_text() == before  # the old file, whole
    temps = list((tmp_path / "r").glob(".pareto.json.*.tmp"))
    assert len(temps) == 1 and json.loads(temps[0].read_text())["run"] == "r"  # the new one, complete but unnamed
    assert run.remove_stale_temp_files() == temps and not list(Path(tmp_path / "r").glob(".*"))
    run.close()


@pytest.mark.parametrize("driver_name", ["tpe", "nsga2", "gp", "random"])
def test_optuna_drivers_get_failed_trials_as_fail_and_go_on(tmp_path, driver_name):
    """What the search tells a driver for a failed candidate reaches Optuna as FAIL with no values
    (not a filled-in number), the reason is in the log, and the sampler keeps proposing."""
    import optuna
    from optuna.distributions import FloatDistribution

    from evomerge.drivers import make_driver
    from evomerge.objectives import ObjectiveSpec
    from evomerge.store import RunStore

    store = RunStore.create(tmp_path, "run", "seed: 1\n", "h", directions={"loss": "minimize"})
    driver = make_driver(driver_name, store, distributions={"a": FloatDistribution(0.0, 1.0)},
                         objectives=[ObjectiveSpec("loss", "minimize")], seed=0, popsize=4)
    outcomes = {}
    for i in range(6):
        proposal = driver.ask()
        if i % 2:
            outcomes[proposal.number] = driver.tell(proposal.number, None, failed_reason="timed out after 9s")
        else:
            outcomes[proposal.number] = driver.tell(proposal.number, {"loss": float(proposal.values["a"])})
    study = optuna.load_study(study_name="run", storage=f"sqlite:///{tmp_path / 'run' / 'trials.db'}")
    for number, record in outcomes.items():
        trial = study.trials[number]
        if number % 2:
            assert record.state == "failed" and record.error == "timed out after 9s"
            assert trial.state == optuna.trial.TrialState.FAIL and trial.values is None
        else:
            assert trial.state == optuna.trial.TrialState.COMPLETE
    store.close()


def test_a_half_built_run_folder_of_a_dead_process_is_removed_by_the_next_start(tmp_path):
    """A kill -9 inside RunStore.create leaves .NAME.creating-PID-*; the next start removes those
    whose process is gone (and those of the old unnamed format), never one still being built."""
    import os

    from evomerge.store import RunStore

    dead = tmp_path / ".r.creating-999999999-0a1b2c3d"  # no such pid
    old_format = tmp_path / ".r.creating-0a1b2c3d"
    building = tmp_path / f".other.creating-{os.getpid()}-0a1b2c3d"  # this process is alive
    for folder in (dead, old_format, building):
        folder.mkdir()
        (folder / "space.yaml").write_text("name: r\n")
    store = RunStore.open_or_create(tmp_path, "r", "name: r\n", "0" * 16, directions={"x": "maximize"})
    store.close()
    assert not dead.exists() and not old_format.exists() and building.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [building.name, "r"]


def test_two_creators_of_one_run_leave_the_first_run_whole_and_refuse_the_second(tmp_path, monkeypatch):
    """A run folder created by another process between this one's check and its rename (two
    searches started at once on a new run) is a one-line refusal naming the folder and the fix:
    the folder that won is left exactly as its creator wrote it, and no half-built folder remains.

    The late creator is held at the failpoint before its rename until the first creator has
    finished (an event, not a sleep: on a loaded machine creating a study can take longer than
    any fixed pause, and the two would swap roles)."""
    import threading

    from evomerge.errors import EvomergeError
    from evomerge.store import RunStore
    from tests.held_failpoint import HeldFailpoint

    runs = tmp_path / "runs"
    outcome: list[BaseException | None] = []
    held = HeldFailpoint(monkeypatch, "store.before_create_rename")

    def late() -> None:
        try:
            RunStore.create(runs, "r", "name: late\n", "1" * 16, directions={"x": "maximize"}).close()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            outcome.append(e)

    slow = threading.Thread(target=late)
    slow.start()
    try:
        held.wait_for_arrival()
        first = RunStore.create(runs, "r", "name: early\n", "0" * 16, directions={"x": "maximize"})
        first.close()
    finally:
        held.release()
        slow.join()
    (err,) = outcome
    assert isinstance(err, EvomergeError), err
    assert str(runs / "r") in str(err) and "evomerge resume" in str(err)
    assert (runs / "r" / "space.yaml").read_text() == "name: early\n"
    assert sorted(p.name for p in runs.iterdir()) == ["r"]
