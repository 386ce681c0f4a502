"""Workers that fail, in a real search: a worker killed mid-evaluation, NaN and inf weights, an
evaluation past its timeout, out of memory (once, and every time). Infrastructure faults are
retried on another worker a bounded number of times; candidate faults are failed trials with
their reason; the driver gets a defined penalty; the search goes on; ``evomerge show`` lists
every failure and why. And the non-finite guard on its own, on a merge that really overflows."""

from __future__ import annotations

import subprocess
import sys
from itertools import pairwise

import pytest

from evomerge import failpoints

from .helpers import ROOT, env_with, read_run, run_to_end, write_space
from .helpers import space as toy_space

pytestmark = pytest.mark.slow

TIMEOUT_S = 15  # a toy candidate takes about a second; the stuck one sleeps for ten minutes
# Shared counters: the N-th hit across the search and every worker process, replacements included.
FAULTS = ";".join([
    "worker.evaluate=kill@2",  # the second evaluation: its worker process dies mid-evaluation
    "worker.evaluate=count",
    "worker.after_merge=nan@2",  # a NaN in a merged tensor
    "worker.after_merge=inf@3",  # an infinity
    "worker.after_merge=oom@4",  # an impossible allocation, once: retried on another worker
    "worker.after_merge=sleep(600)@5",  # stuck: killed at the timeout
    "worker.after_merge=oom@9-",  # out of memory on every later try: retries run out
])
BUDGET = 8


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_worker_faults_are_retried_or_recorded_and_the_search_goes_on(toy_world, tmp_path):
    import optuna

    from evomerge.drivers import ObjectiveSpec
    from evomerge.drivers.cma_driver import FAIL_MARGIN, scalarize
    from evomerge.search import MAX_INFRA_RETRIES, build_driver, prepare
    from evomerge.space_config import load_space_config
    from evomerge.store import RunStore

    data = toy_space(toy_world, budget=BUDGET)
    data["workers"]["timeout_s"] = TIMEOUT_S
    cfg = write_space(tmp_path, data)
    counters = tmp_path / "failpoints"
    counters.mkdir()
    rc = run_to_end(["search", str(cfg), "--runs-dir", str(tmp_path / "runs")], cwd=tmp_path,
                    env=env_with(FAULTS, counters), log=tmp_path / "log.txt")
    assert rc == 0, (tmp_path / "log.txt").read_text()[-4000:]
    run = tmp_path / "runs" / "faults"
    records, pareto = read_run(run)
    for r in records:
        print(r.number, r.state, r.attrs.get("attempts"), r.error)

    # the whole budget was used, nothing was left running or interrupted
    assert len(records) == BUDGET and not any(r.interrupted or r.state == "running" for r in records)
    failed = [r for r in records if r.state == "failed"]
    complete = [r for r in records if r.state == "complete"]
    reasons = [r.error or "" for r in failed]
    hits = failpoints.read_hits(counters)
    # candidate faults: failed trials with their reason, never retried
    nonfinite = [r for r in failed if "non-finite weights" in (r.error or "")]
    assert len(nonfinite) == 2, reasons
    assert all("weight" in r.error.split(":", 1)[1] for r in nonfinite), reasons  # names the tensor
    timed_out = [r for r in failed if r.error == f"timed out after {TIMEOUT_S}s"]
    assert len(timed_out) == 1, reasons
    # infrastructure faults: retried on other workers; out of memory every time: failed after the last retry
    exhausted = [r for r in failed if (r.error or "").startswith("out of memory")]
    assert exhausted and all(r.attrs["attempts"] == MAX_INFRA_RETRIES + 1 for r in exhausted), reasons
    assert f"({MAX_INFRA_RETRIES + 1} attempts on different workers)" in exhausted[0].error
    for r in exhausted:  # each retry ran on another worker than the try before it
        pids = [pid for name, _, pid, ctx in hits if name == "worker.after_merge" and ctx == _digest(r.recipe_json)]
        assert len(pids) == MAX_INFRA_RETRIES + 1 and all(a != b for a, b in pairwise(pids)), pids
    assert "can't allocate memory" in exhausted[0].error
    assert len(failed) == len(nonfinite) + len(timed_out) + len(exhausted), reasons
    # the killed worker and the one-off out-of-memory cost one extra attempt each, and were recovered from:
    # those trials went on to an outcome of their own (complete, or a candidate fault hit on the retry)
    assert sum(r.attrs["attempts"] - 1 for r in complete + timed_out + nonfinite) == 2
    assert complete
    # every evaluation the workers started is accounted for by an attempt
    assert sum(1 for h in hits if h[0] == "worker.evaluate") == sum(r.attrs["attempts"] for r in records)
    # the killed and the timed-out workers were replaced by new processes; the out-of-memory ones were not
    assert len({pid for name, _, pid, _ in hits if name == "worker.evaluate"}) == 4
    assert pareto["counts"]["failed"] == len(failed) and pareto["counts"]["complete"] == len(complete)

    # the trial log is an Optuna study: failed trials are FAIL there, with no values filled in
    study = optuna.load_study(study_name="faults", storage=f"sqlite:///{run / 'trials.db'}")
    for r in failed:
        assert study.trials[r.number].state == optuna.trial.TrialState.FAIL and study.trials[r.number].values is None

    # CMA-ES ranked every failed member below every success: worst fitness so far + margin
    config = load_space_config(cfg)
    store = RunStore.open(run)
    try:
        driver = build_driver(prepare(config), store)  # replays the log; writes nothing
    finally:
        store.close()
    objectives = [ObjectiveSpec(o.key, o.direction, o.weight) for o in config.objectives]
    worst = max(-scalarize(r.objectives, objectives) for r in complete)
    last = [r for r in records if r.attrs["generation"] == 1]
    assert any(r.state == "failed" for r in last)
    for r in last:
        fitness = driver.last_fitness[r.attrs["member"]]
        assert fitness == (worst + FAIL_MARGIN if r.state == "failed" else -scalarize(r.objectives, objectives))

    # `evomerge show` lists every failed trial and why
    shown = subprocess.run([sys.executable, "-m", "evomerge.cli", "show", str(run)], capture_output=True, text=True,
                           cwd=tmp_path, env={**env_with(), "COLUMNS": "250"}, timeout=300, check=False)
    assert shown.returncode == 0, shown.stderr
    assert f"Failed trials ({len(failed)})" in shown.stdout
    for r in failed:
        line = next(line for line in shown.stdout.splitlines() if line.strip("│ ").startswith(f"{r.number} "))
        assert r.error[:40] in line, (r.error, line)


def test_merge_that_overflows_float16_is_refused_before_scoring(toy_world):
    """No failpoint: large task-arithmetic weights really overflow a float16 model.

    Computed in float16, the merge engine's own check refuses the tensor. Computed in float32 (the
    recipe's ``dtype``) and written into the float16 resident model, every value the engine sees is
    finite and the overflow happens in the copy: the worker's guard on the model's own tensors
    refuses it before lm-eval scores garbage.
    """
    from evomerge.merge.config import parse_merge_config
    from evomerge.recipe import Recipe
    from evomerge.worker import CandidateEvaluator, EvalSettings, WorkerSpec

    donors = [str(p) for _, p in sorted(toy_world.specialists.items())]
    evaluator = CandidateEvaluator(WorkerSpec(
        base=str(toy_world.base), donors=tuple(donors), dtype="float16",
        evaluation=EvalSettings(tasks=("toy_arith",), include_path=(str(ROOT / "eval_tasks"),), limit=4, batch_size=4),
    ))

    def recipe(weight: float, dtype: str) -> str:
        merge = parse_merge_config({
            "merge_method": "task_arithmetic", "base_model": str(toy_world.base), "dtype": dtype,
            "models": [{"model": d, "parameters": {"weight": weight}} for d in donors],
        })
        return Recipe(merge=merge).to_json()

    in_engine = evaluator.evaluate(recipe(1e6, "float16"))
    assert in_engine.objectives is None and "gave NaN or infinite values" in in_engine.error
    in_copy = evaluator.evaluate(recipe(1e6, "float32"))
    assert in_copy.objectives is None and in_copy.eval_s == 0.0, in_copy
    assert in_copy.error.startswith("merge produced non-finite weights in "), in_copy.error
    assert "weight" in in_copy.error.split(":", 1)[1]
    # the same evaluator, a sane candidate: the guard lets it through and it is scored
    sane = evaluator.evaluate(recipe(1.0, "float32"))
    assert sane.error is None and set(sane.objectives) == {"task:toy_arith/acc", "l2_from_base"}
