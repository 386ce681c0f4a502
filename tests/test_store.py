from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution

from evomerge.errors import ConfigError, EvomergeError
from evomerge.space_config.identity import differences
from evomerge.store import PARETO_FILE, RunStore, write_atomic

DIRS = {"task:arith/acc": "maximize", "l2_from_base": "minimize"}
DISTS = {
    "method": CategoricalDistribution(("linear", "ties")),
    "g0/*/arith/weight": FloatDistribution(0.0, 1.0),
}
CONFIG = "name: demo\nsearch:\n  driver: cma\n  popsize: 8\nobjectives:\n  - {task: arith, weight: 1.0}\n"


def _create(tmp_path: Path, **kw) -> RunStore:
    # pareto.json rewritten after every finished trial, so the tests below can read it at once
    # (a search writes it at most every PARETO_INTERVAL_S; see test_pareto_json_is_written_on_a_timer_and_on_close)
    return RunStore.create(tmp_path, "demo", CONFIG, "hash-a", directions=DIRS, pareto_interval_s=0, **kw)


def _pareto(store: RunStore) -> dict:
    return json.loads((store.path / PARETO_FILE).read_text())


def test_create_lays_out_the_run_folder_and_nothing_else(tmp_path):
    store = _create(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temp sibling left behind
    store.close()  # SQLite's WAL side files go away with the last connection
    assert sorted(p.name for p in store.path.iterdir()) == [
        "config_hash", "pareto.json", "run.json", "space.yaml", "trials.db",
    ]
    assert (store.path / "space.yaml").read_text() == CONFIG
    assert (store.path / "config_hash").read_text().strip() == "hash-a"
    assert _pareto(store)["front"] == [] and _pareto(store)["objectives"] == DIRS
    with pytest.raises(EvomergeError, match="already exists"):
        _create(tmp_path)


def test_every_objective_and_attribute_is_stored_and_reopened(tmp_path):
    store = _create(tmp_path, constraints={"l2_from_base": 5.0})
    n = store.start_trial({"method": "ties", "g0/*/arith/weight": 0.25}, DISTS, {"generation": 0})
    store.annotate(n, {"recipe": json.dumps({"merge_method": "ties"}), "worker": "w1"})
    store.complete_trial(
        n,
        {"task:arith/acc": 0.75, "l2_from_base": 7.0, "task:arith/acc_stderr": 0.01},
        {"timings": {"merge_s": 1.5, "eval_s": 2.5}},
    )
    store.close()

    rec = RunStore.open(store.path).trial(n)
    assert rec.state == "complete"
    assert rec.params == {"method": "ties", "g0/*/arith/weight": 0.25}
    assert rec.objectives == {"task:arith/acc": 0.75, "l2_from_base": 7.0, "task:arith/acc_stderr": 0.01}
    assert json.loads(rec.recipe_json) == {"merge_method": "ties"}
    assert rec.timings == {"merge_s": 1.5, "eval_s": 2.5}
    assert rec.attrs["worker"] == "w1" and rec.attrs["generation"] == 0
    assert rec.constraints == {"l2_from_base": 2.0} and rec.violation == 2.0


def test_failed_candidates_keep_their_reason_and_count_towards_budget(tmp_path):
    store = _create(tmp_path)
    a = store.start_trial({"method": "linear", "g0/*/arith/weight": 0.5}, DISTS)
    b = store.start_trial({"method": "linear", "g0/*/arith/weight": 0.6}, DISTS)
    store.fail_trial(a, "CUDA out of memory while merging")
    rec = store.complete_trial(b, {"task:arith/acc": float("nan"), "l2_from_base": 1.0})
    assert store.trial(a).state == "failed" and store.trial(a).error == "CUDA out of memory while merging"
    assert rec.state == "failed" and "'task:arith/acc' is nan" in rec.error  # NaN is data, not a crash
    assert rec.objectives is None
    counts = store.counts()
    assert (counts.failed, counts.complete, counts.finished) == (2, 0, 2)


def test_missing_objective_fails_the_trial_with_its_name(tmp_path):
    store = _create(tmp_path)
    n = store.start_trial({"method": "linear", "g0/*/arith/weight": 0.5}, DISTS)
    rec = store.complete_trial(n, {"task:arith/acc": 0.5})
    assert rec.state == "failed" and "'l2_from_base' is missing" in rec.error


def test_pareto_json_is_current_after_each_finished_trial(tmp_path):
    store = _create(tmp_path)
    results = [(0.5, 3.0), (0.7, 4.0), (0.6, 5.0), (0.9, 1.0)]
    expected_fronts = [[0], [0, 1], [0, 1], [3]]
    for i, ((acc, l2), front) in enumerate(zip(results, expected_fronts)):
        n = store.start_trial({"method": "linear", "g0/*/arith/weight": i / 10}, DISTS)
        store.complete_trial(n, {"task:arith/acc": acc, "l2_from_base": l2})
        doc = _pareto(store)
        assert [m["number"] for m in doc["front"]] == front
        assert doc["counts"]["complete"] == i + 1 and doc["counts"]["running"] == 0
    assert doc["front"][0]["objectives"] == {"task:arith/acc": 0.9, "l2_from_base": 1.0}
    assert [r.number for r in store.pareto()] == [3]


def test_pareto_json_is_written_on_a_timer_and_on_close(tmp_path):
    store = RunStore.create(tmp_path, "demo", CONFIG, "hash-a", directions=DIRS, pareto_interval_s=3600)
    for i, (acc, l2) in enumerate([(0.5, 3.0), (0.7, 4.0), (0.9, 1.0)]):
        n = store.start_trial({"method": "linear", "g0/*/arith/weight": i / 10}, DISTS)
        store.complete_trial(n, {"task:arith/acc": acc, "l2_from_base": l2})
    doc = _pareto(store)  # the first finished trial was written at once, the next ones wait for the timer
    assert [m["number"] for m in doc["front"]] == [0] and doc["counts"]["complete"] == 1
    store.close()
    doc = _pareto(store)
    assert [m["number"] for m in doc["front"]] == [2] and doc["counts"]["complete"] == 3
    assert set(doc["front"][0]) == {"number", "objectives", "violation", "forward_passes"}  # by reference: recipes stay in the log


def test_constraint_breakers_leave_the_front_to_feasible_trials(tmp_path):
    store = _create(tmp_path, constraints={"l2_from_base": 2.0})
    for w, (acc, l2) in [(0.1, (0.99, 9.0)), (0.2, (0.5, 1.0))]:
        n = store.start_trial({"method": "linear", "g0/*/arith/weight": w}, DISTS)
        store.complete_trial(n, {"task:arith/acc": acc, "l2_from_base": l2})
    assert [m["number"] for m in _pareto(store)["front"]] == [1]


def test_interrupted_trials_are_found_on_reopen_and_do_not_count(tmp_path):
    store = _create(tmp_path)
    done = store.start_trial({"method": "linear", "g0/*/arith/weight": 0.1}, DISTS)
    store.complete_trial(done, {"task:arith/acc": 0.5, "l2_from_base": 1.0})
    lost = store.start_trial({"method": "ties", "g0/*/arith/weight": 0.9}, DISTS, {"generation": 3})
    store.close()  # the process dies here: trial `lost` stays RUNNING in the database

    store = RunStore.open(store.path)
    assert [t.number for t in store.running_trials()] == [lost]
    with pytest.raises(ValueError, match="not started by this process"):
        store.complete_trial(lost, {"task:arith/acc": 0.5, "l2_from_base": 1.0})
    requeued = store.requeue_interrupted()
    assert [(t.number, t.params, t.attrs["generation"]) for t in requeued] == [
        (lost, {"method": "ties", "g0/*/arith/weight": 0.9}, 3)
    ]
    rec = store.trial(lost)
    assert rec.state == "failed" and rec.interrupted and rec.error.startswith("interrupted")
    counts = store.counts()
    assert (counts.finished, counts.interrupted, counts.running) == (1, 1, 0)
    assert _pareto(store)["counts"]["interrupted"] == 1
    assert store.requeue_interrupted() == []  # idempotent
    assert store.trials() == RunStore.open(store.path).trials()  # the cached records match the database


def test_open_or_create_resumes_the_same_config(tmp_path):
    first = RunStore.open_or_create(tmp_path, "demo", CONFIG, "hash-a", directions=DIRS)
    n = first.start_trial({"method": "linear", "g0/*/arith/weight": 0.1}, DISTS)
    first.complete_trial(n, {"task:arith/acc": 0.5, "l2_from_base": 1.0})
    first.close()  # one writer per run: `first` holds it until then (evomerge.run_lock)
    again = RunStore.open_or_create(tmp_path, "demo", CONFIG, "hash-a", directions=DIRS)
    assert [t.number for t in again.trials()] == [0]


def test_a_different_config_under_the_same_name_is_refused_naming_the_field(tmp_path):
    _create(tmp_path).close()
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").iterdir()}
    changed = CONFIG.replace("popsize: 8", "popsize: 16").replace("weight: 1.0", "weight: 2.0")
    with pytest.raises(ConfigError) as err:
        RunStore.open_or_create(tmp_path, "demo", changed, "hash-b", directions=DIRS,
                                diff=lambda old, new: differences(yaml.safe_load(old), yaml.safe_load(new)))
    msg = str(err.value)
    assert "search.popsize: 8 -> 16" in msg and "objectives[0].weight: 1.0 -> 2.0" in msg
    assert "name" not in msg.split("(")[1].split(")")[0]  # unchanged fields are not listed
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").iterdir()} == before  # nothing touched


def test_custom_diff_callable_is_used(tmp_path):
    _create(tmp_path)
    with pytest.raises(ConfigError, match="merge.method differs"):
        RunStore.open_or_create(
            tmp_path, "demo", CONFIG + "x: 1\n", "hash-b", directions=DIRS,
            diff=lambda old, new: ["merge.method differs"],
        )


def test_a_refused_create_leaves_nothing(tmp_path):
    with pytest.raises(ConfigError, match="maximize"):
        RunStore.create(tmp_path, "demo", CONFIG, "h", directions={"acc": "up"})
    with pytest.raises(ConfigError):
        RunStore.create(tmp_path, "demo", CONFIG, "h", directions={})
    assert list(tmp_path.iterdir()) == []


def test_a_failed_create_removes_its_temporary_folder(tmp_path, monkeypatch):
    import evomerge.store as store_mod

    def broken_rename(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(store_mod.os, "rename", broken_rename)
    with pytest.raises(OSError, match="disk full"):
        _create(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_any_database_url_can_hold_the_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    store = _create(tmp_path / "runs", storage_url=url)
    n = store.start_trial({"method": "linear", "g0/*/arith/weight": 0.1}, DISTS)
    store.complete_trial(n, {"task:arith/acc": 0.5, "l2_from_base": 1.0})
    assert not (store.path / "trials.db").exists() and (tmp_path / "shared.db").exists()
    assert RunStore.open(store.path).trial(n).objectives["task:arith/acc"] == 0.5


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "pareto.json"
    write_atomic(target, "old")

    class Boom:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(TypeError):
        write_atomic(target, Boom())  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["pareto.json"]


def test_values_outside_their_distribution_are_refused_but_round_off_is_absorbed(tmp_path):
    store = _create(tmp_path)
    n = store.start_trial({"method": "linear", "g0/*/arith/weight": 1.0 + 1e-12}, DISTS)
    assert store.trial(n).params["g0/*/arith/weight"] == 1.0
    with pytest.raises(ValueError, match="outside"):
        store.start_trial({"method": "linear", "g0/*/arith/weight": 1.5}, DISTS)
    with pytest.raises(ValueError, match="not one of"):
        store.start_trial({"method": "dare", "g0/*/arith/weight": 0.5}, DISTS)


def test_nothing_in_the_store_is_pickled(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "dumps", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    store = _create(tmp_path)
    n = store.start_trial({"method": "linear", "g0/*/arith/weight": 0.1}, DISTS, {"unit_x": [0.1, 0.2]})
    store.complete_trial(n, {"task:arith/acc": 0.5, "l2_from_base": 1.0})
    store.close()
    assert RunStore.open(store.path).trials()[0].attrs["unit_x"] == [0.1, 0.2]


def test_trials_the_store_writes_whole_read_back_through_optunas_own_api(tmp_path):
    """start_trial without a sampler writes Optuna's tables directly (one transaction per step):
    Optuna itself must read those trials exactly as if it had written them."""
    import optuna

    store = _create(tmp_path, constraints={"l2_from_base": 5.0})
    a = store.start_trial({"method": "ties", "g0/*/arith/weight": 0.25}, DISTS, {"generation": 0, "unit_x": (0.1, 0.2)})
    store.annotate(a, {"recipe": "{}", "worker": "w1"})
    store.complete_trial(a, {"task:arith/acc": 0.75, "l2_from_base": 4.0}, {"timings": {"eval_s": 2.5}})
    b = store.start_trial({"method": "linear", "g0/*/arith/weight": 1.0}, DISTS)
    store.fail_trial(b, "merge raised", {"attempts": 2})
    store.close()

    study = optuna.load_study(study_name="demo", storage=f"sqlite:///{store.path / 'trials.db'}")
    done, failed = study.get_trials(deepcopy=False)
    assert (done.number, done.state, failed.number, failed.state) == (a, optuna.trial.TrialState.COMPLETE,
                                                                       b, optuna.trial.TrialState.FAIL)
    assert done.params == {"method": "ties", "g0/*/arith/weight": 0.25} and done.distributions == DISTS
    assert done.values == [0.75, 4.0] and done.constraints == {"l2_from_base": -1.0}
    assert done.user_attrs == {"generation": 0, "unit_x": [0.1, 0.2], "recipe": "{}", "worker": "w1",
                               "timings": {"eval_s": 2.5}, "objectives": {"task:arith/acc": 0.75, "l2_from_base": 4.0}}
    assert done.datetime_start <= done.datetime_complete and failed.values is None
    assert failed.user_attrs == {"attempts": 2, "error": "merge raised", "fail_kind": "candidate"}
    assert [t.number for t in study.best_trials] == [a]  # Optuna's own front sees the values, feasible


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_run_files_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    """Atomic writes go through a temp file (mkstemp makes it 0600); the file a user gets has the
    mode any other file of theirs would have."""
    import os
    import stat

    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "space.yaml", "a: 1\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "space.yaml").stat().st_mode) == mode


def test_a_trial_started_while_the_run_is_read_waits_for_the_next_read(tmp_path, monkeypatch):
    """A reader of a live run (``evomerge show`` beside a search, a test watching one) reads the
    trials first and their parameters and attributes after: a trial a writer starts in between is
    left for the next read, not a KeyError for the reader."""
    import threading

    from tests.held_failpoint import HeldFailpoint

    store = _create(tmp_path)
    first = store.start_trial({"method": "ties", "g0/*/arith/weight": 0.25}, DISTS, {"generation": 0})
    reader = RunStore.open(store.path)
    held = HeldFailpoint(monkeypatch, "store.between_reads")  # the reader waits between its queries
    got: list = []
    thread = threading.Thread(target=lambda: got.append(reader.trials()))
    thread.start()
    try:
        held.wait_for_arrival()
        second = store.start_trial({"method": "ties", "g0/*/arith/weight": 0.5}, DISTS, {"generation": 0})
    finally:
        held.release()
        thread.join()
    assert [r.number for r in got[0]] == [first]
    assert got[0][0].params == {"method": "ties", "g0/*/arith/weight": 0.25}
    reader.close()
    again = RunStore.open(store.path)
    assert [r.number for r in again.trials()] == [first, second]  # the next read has it
    again.close()
    store.close()
