"""The search loop's rules, on the in-process pool with real faults: dispatch, retries on another
worker, timeouts, out-of-memory moves, failed trials, workers that cannot start, a search that
stops, and resume. The same merge and lm-eval scoring as a Ray worker, in this process, with the
toy world; faults come from the failpoints (a real allocation error, a real NaN in a merged
tensor, a real stuck evaluation) and the in-process pool's own ``inprocess.evaluate`` failpoint
for a worker that dies. What only Ray can show (a killed worker process, a lost node, a killed
search) is in ``tests/reliability``."""

from __future__ import annotations

import io
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest

from evomerge import failpoints
from evomerge.loop import MAX_CONSECUTIVE_INFRA_FAULTS, MAX_INFRA_RETRIES, MAX_START_TRIES
from evomerge.search import SearchStopped, build_driver, prepare, run_search
from evomerge.space_config import parse_space_config
from evomerge.worker import candidate_digest
from tests.reliability.helpers import read_run
from tests.reliability.helpers import space as toy_space

pytestmark = pytest.mark.slow

TIMEOUT_S = 2  # a toy candidate takes well under a second here; the stuck one sleeps ten minutes


def config(toy_world, tmp_path: Path, *, budget: int, count: int = 2, **workers):
    data = toy_space(toy_world, budget=budget, items=8)
    data["workers"] = {"count": count, "cpus_per_worker": 1, "pool": "inprocess", **workers}
    return parse_space_config(data, source=str(tmp_path / "space.yaml"))


def attempts_by_candidate(counters: Path) -> dict[str, list[int]]:
    """Candidate digest -> the in-process worker id of each of its attempts, in order (logged when
    a rule names ``inprocess.evaluate``, if only ``count``)."""
    out: dict[str, list[int]] = {}
    for name, _, _, context in failpoints.read_hits(counters):
        if name == "inprocess.evaluate":
            worker, digest = context.split(":")
            out.setdefault(digest, []).append(int(worker))
    return out


def test_faults_are_retried_elsewhere_or_recorded_and_the_search_goes_on(toy_world, tmp_path, set_failpoints):
    import optuna

    from evomerge.drivers.cma_driver import FAIL_MARGIN
    from evomerge.objectives import ObjectiveSpec, scalarize
    from evomerge.report import show
    from evomerge.store import RunStore

    budget = 8  # two CMA generations of 4
    counters = set_failpoints(";".join([
        "inprocess.evaluate=raise@2",  # the second attempt: its worker dies (before merging)
        "worker.after_merge=nan@2",  # a NaN in a merged tensor
        "worker.after_merge=inf@3",  # an infinity
        "worker.after_merge=oom@4",  # a real allocation error, once: moved to another worker
        "worker.after_merge=sleep(600)@5",  # stuck: stopped at the timeout
        "worker.after_merge=nan@8",  # a failure in the second generation too
    ]))
    cfg = config(toy_world, tmp_path, budget=budget, timeout_s=TIMEOUT_S)
    notices: list[str] = []
    run = run_search(cfg, runs_dir=tmp_path / "runs", on_notice=notices.append)
    records, pareto = read_run(run)
    for r in records:
        print(r.number, r.state, r.attrs.get("attempts"), r.error)
    print("\n".join(notices))

    # the whole budget was used, nothing was left running or interrupted
    assert len(records) == budget and not any(r.interrupted or r.state == "running" for r in records)
    failed = [r for r in records if r.state == "failed"]
    complete = [r for r in records if r.state == "complete"]
    reasons = [r.error or "" for r in failed]
    # candidate faults: failed trials with their reason, never retried
    nonfinite = [r for r in failed if "non-finite weights" in (r.error or "")]
    assert len(nonfinite) == 3, reasons
    assert all("weight" in r.error.split(":", 1)[1] for r in nonfinite), reasons  # names the tensor
    timed_out = [r for r in failed if r.error == f"timed out after {TIMEOUT_S}s"]
    assert len(timed_out) == 1, reasons
    assert len(failed) == len(nonfinite) + len(timed_out), reasons
    # the dead worker and the out-of-memory cost one extra attempt each, on another worker
    assert sum(r.attrs["attempts"] - 1 for r in records) == 2
    attempts = attempts_by_candidate(counters)
    assert sum(len(a) for a in attempts.values()) == sum(r.attrs["attempts"] for r in records)
    for r in records:
        workers = attempts[candidate_digest(r.recipe_json)]
        assert len(workers) == r.attrs["attempts"] and all(a != b for a, b in pairwise(workers)), (r.number, workers)
    # the dead and the stuck workers were replaced by new ones; the one out of memory was not
    assert len({w for ws in attempts.values() for w in ws}) == 4
    assert any("trying another worker (attempt 2 of 3)" in n for n in notices), notices
    assert pareto["counts"]["failed"] == len(failed) and pareto["counts"]["complete"] == len(complete)

    # the trial log is an Optuna study: failed trials are FAIL there, with no values filled in
    study = optuna.load_study(study_name="faults", storage=f"sqlite:///{run / 'trials.db'}")
    for r in failed:
        assert study.trials[r.number].state == optuna.trial.TrialState.FAIL and study.trials[r.number].values is None

    # CMA-ES ranked every failed member below every success: worst fitness so far + margin
    store = RunStore.open(run)
    try:
        driver = build_driver(prepare(cfg), store)  # replays the log; writes nothing
        console_text = io.StringIO()
        from rich.console import Console

        show(store, console=Console(file=console_text, width=250))
    finally:
        store.close()
    objectives = [ObjectiveSpec(o.key, o.direction, o.weight) for o in cfg.objectives]
    worst = max(-scalarize(r.objectives, objectives) for r in complete)
    last = [r for r in records if r.attrs["generation"] == 1]
    assert any(r.state == "failed" for r in last)
    for r in last:
        fitness = driver.last_fitness[r.attrs["member"]]
        assert fitness == (worst + FAIL_MARGIN if r.state == "failed" else -scalarize(r.objectives, objectives))

    # `evomerge show` lists every failed trial and why
    shown = console_text.getvalue()
    assert f"Failed trials ({len(failed)})" in shown
    for r in failed:
        line = next(line for line in shown.splitlines() if line.strip("│ ").startswith(f"{r.number} "))
        assert r.error[:40] in line, (r.error, line)


def test_out_of_memory_everywhere_runs_out_of_retries_and_a_run_of_failures_exits_non_zero(
        toy_world, tmp_path, set_failpoints):
    counters = set_failpoints("worker.after_merge=oom;inprocess.evaluate=count")
    with pytest.raises(SearchStopped) as stopped:
        run_search(config(toy_world, tmp_path, budget=1), runs_dir=tmp_path / "runs", on_notice=lambda _: None)
    assert stopped.value.exit_code == 1
    message = str(stopped.value)
    assert "every trial failed (1 of 1): 1 x out of memory" in message and "evomerge show" in message, message
    (record,), _ = read_run(tmp_path / "runs" / "faults")
    assert record.state == "failed" and record.attrs["attempts"] == MAX_INFRA_RETRIES + 1
    assert f"({MAX_INFRA_RETRIES + 1} attempts on different workers)" in record.error
    assert "can't allocate memory" in record.error
    (workers,) = attempts_by_candidate(counters).values()
    assert len(workers) == MAX_INFRA_RETRIES + 1 and all(a != b for a, b in pairwise(workers)), workers


def test_infrastructure_faults_in_a_row_stop_the_search_and_a_resume_finishes_it(toy_world, tmp_path, set_failpoints):
    set_failpoints("worker.after_merge=oom")
    cfg = config(toy_world, tmp_path, budget=4)
    with pytest.raises(SearchStopped) as stopped:
        run_search(cfg, runs_dir=tmp_path / "runs", on_notice=lambda _: None)
    assert f"stopped after {MAX_CONSECUTIVE_INFRA_FAULTS} infrastructure faults in a row" in str(stopped.value)
    assert "out of memory" in str(stopped.value) and "evomerge resume" in str(stopped.value)
    run = tmp_path / "runs" / "faults"
    records, pareto = read_run(run)
    # what was out or waiting for another worker is interrupted, not left running
    assert records and all(r.state != "running" for r in records)
    interrupted = [r for r in records if r.interrupted]
    assert interrupted and pareto["counts"]["interrupted"] == len(interrupted)
    assert not any(r.state == "complete" for r in records)

    # the fault is fixed: a resume re-runs the interrupted candidates and uses the rest of the budget
    set_failpoints("")
    run_search(cfg, runs_dir=tmp_path / "runs", on_notice=lambda _: None)
    after, _ = read_run(run)
    assert sum(r.state == "complete" for r in after) + sum(r.state == "failed" and not r.interrupted for r in after) == 4
    rerun = {r.recipe_json for r in after if r.state == "complete"}
    assert {r.recipe_json for r in interrupted} <= rerun  # the same candidates, run again
    assert after[: len(records)] == records  # what the first part recorded is untouched


def test_a_worker_that_cannot_start_is_reported_and_the_search_goes_on_without_it(toy_world, tmp_path, set_failpoints):
    set_failpoints("worker.start=raise@2-")  # the first worker starts; every later one fails
    notices: list[str] = []
    run = run_search(config(toy_world, tmp_path, budget=3), runs_dir=tmp_path / "runs", on_notice=notices.append)
    records, _ = read_run(run)
    assert [r.state for r in records] == ["complete"] * 3
    failed_starts = [n for n in notices if n.startswith("a worker failed to start")]
    assert len(failed_starts) == MAX_START_TRIES - 1 and "FailpointError" in failed_starts[0], notices
    assert any(f"could not be started in {MAX_START_TRIES} tries" in n and "goes on with 1 worker" in n
               for n in notices), notices


def test_no_worker_at_all_stops_the_search_with_the_reason(toy_world, tmp_path, set_failpoints):
    set_failpoints("worker.start=raise")
    with pytest.raises(SearchStopped, match=r"no worker could be started \(3 tries; last: FailpointError"):
        run_search(config(toy_world, tmp_path, budget=2, count=1), runs_dir=tmp_path / "runs", on_notice=lambda _: None)
    records, _ = read_run(tmp_path / "runs" / "faults")
    assert records == []  # nothing was asked: no candidate waits for a worker that never came


def test_an_evaluator_that_raises_fails_the_trial_and_keeps_its_worker(toy_world, tmp_path, set_failpoints):
    counters = set_failpoints("worker.evaluate=raise@2;inprocess.evaluate=count")
    run = run_search(config(toy_world, tmp_path, budget=3, count=1), runs_dir=tmp_path / "runs",
                     on_notice=lambda _: None)
    records, _ = read_run(run)
    assert Counter(r.state for r in records) == {"complete": 2, "failed": 1}
    (failed,) = [r for r in records if r.state == "failed"]
    assert failed.error.startswith("evaluation raised FailpointError('failpoint worker.evaluate (hit 2)')")
    assert failed.attrs["attempts"] == 1  # not an infrastructure fault: not retried
    assert len({w for ws in attempts_by_candidate(counters).values() for w in ws}) == 1  # nor replaced


@pytest.mark.parametrize("driver", ["tpe", "nsga2"])
def test_optuna_drivers_keep_every_worker_busy_and_use_the_budget_once(toy_world, tmp_path, driver):
    data = toy_space(toy_world, budget=5, items=8, driver=driver)
    data["workers"] = {"count": 2, "pool": "inprocess"}
    run = run_search(parse_space_config(data, source="space.yaml"), runs_dir=tmp_path / "runs", on_notice=lambda _: None)
    records, pareto = read_run(run)
    assert [r.number for r in records] == list(range(5)) and all(r.state == "complete" for r in records)
    assert len({r.params["g0/mlp/arith/weight"] for r in records}) == 5  # the sampler proposed, not repeated
    assert pareto["counts"]["complete"] == 5 and pareto["front"]


def test_every_trial_records_what_its_scoring_cost_and_the_run_adds_it_up(toy_world, tmp_path):
    """Forward passes are the budget of a real search: each scored trial records its items and
    requests (here one loglikelihood request per item: 8 items of each of 2 tasks), a candidate
    that fails after scoring still records what it spent, and pareto.json, ``show`` and a resumed
    run add them up over the whole run."""
    from rich.console import Console

    from evomerge.report import show
    from evomerge.store import RunStore

    cfg = config(toy_world, tmp_path, budget=4, count=1)
    run = run_search(cfg, runs_dir=tmp_path / "runs", on_notice=lambda _: None)
    cfg = config(toy_world, tmp_path, budget=6, count=1)
    seen = []
    run_search(cfg, runs_dir=tmp_path / "runs", on_notice=lambda _: None, on_progress=lambda p, r: seen.append(p.forward_passes))
    records, pareto = read_run(run)
    assert len(records) == 6
    for r in records:
        assert r.cost["items"] == {"toy_arith": 8, "toy_reverse": 8}
        assert r.cost["requests"] == {"loglikelihood": 16} and r.forward_passes == 16
    assert pareto["spent"] == {"forward_passes": 96, "generated_tokens": 0, "scored_trials": 6}
    assert all(m["forward_passes"] == 16 for m in pareto["front"])
    assert seen == [80, 96]  # the resumed part counts on from the first part's 64
    out = io.StringIO()
    store = RunStore.open(run)
    try:
        show(store, console=Console(file=out, width=200))
    finally:
        store.close()
    assert "scoring cost 96 forward passes over 6 scored trials (16 a trial)" in out.getvalue()
