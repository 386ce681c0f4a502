"""Workers that fail in a real search on Ray: the faults only Ray workers have. A worker process
killed mid-evaluation (Ray reports the actor dead), an allocation error inside an actor (the actor
lives on), a candidate past its timeout (the actor is killed). Each becomes a pool event that the
loop handles; the loop's rules in full (NaN and inf weights, retries running out, infrastructure
faults in a row, workers that cannot start, the driver's penalty, ``evomerge show``) are tested on
the in-process pool in ``tests/search/test_loop.py``. And the non-finite guard on its own, on a
merge that really overflows."""

from __future__ import annotations

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
    "worker.after_merge=oom@3",  # an impossible allocation, once: retried on another worker
    "worker.after_merge=sleep(600)@4",  # stuck: killed at the timeout
])
BUDGET = 6


def test_ray_worker_faults_are_retried_or_recorded_and_the_search_goes_on(toy_world, tmp_path, ray_cluster):
    from evomerge.worker import candidate_digest

    data = toy_space(toy_world, budget=BUDGET)
    data["workers"]["timeout_s"] = TIMEOUT_S
    cfg = write_space(tmp_path, data)
    counters = tmp_path / "failpoints"
    counters.mkdir()
    rc = run_to_end(["search", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--ray-address", ray_cluster], cwd=tmp_path,
                    env=env_with(FAULTS, counters, RAY_AUTH_MODE="disabled"), log=tmp_path / "log.txt")
    assert rc == 0, (tmp_path / "log.txt").read_text()[-4000:]
    records, pareto = read_run(tmp_path / "runs" / "faults")
    for r in records:
        print(r.number, r.state, r.attrs.get("attempts"), r.error)

    # the whole budget was used, nothing was left running or interrupted
    assert len(records) == BUDGET and not any(r.interrupted or r.state == "running" for r in records)
    failed = [r for r in records if r.state == "failed"]
    assert [r.error for r in failed] == [f"timed out after {TIMEOUT_S}s"]  # not retried
    assert pareto["counts"]["failed"] == 1 and pareto["counts"]["complete"] == BUDGET - 1
    # the killed worker and the out-of-memory cost one extra attempt each, on another worker process
    assert sum(r.attrs["attempts"] - 1 for r in records) == 2
    hits = failpoints.read_hits(counters)
    evaluations = [(pid, ctx) for name, _, pid, ctx in hits if name == "worker.evaluate"]
    assert len(evaluations) == sum(r.attrs["attempts"] for r in records)  # every evaluation is an attempt
    for r in records:
        if r.attrs["attempts"] > 1:
            pids = [pid for pid, ctx in evaluations if ctx == candidate_digest(r.recipe_json)]
            assert len(pids) == r.attrs["attempts"] and all(a != b for a, b in pairwise(pids)), pids
    # the killed and the timed-out workers never evaluated again (they were replaced: the killed one's
    # candidate ran on a third process); the out-of-memory one was not killed
    (stuck,) = failed
    killed_at = 1  # the second evaluation (worker.evaluate=kill@2)
    stuck_at = max(i for i, (_, ctx) in enumerate(evaluations) if ctx == candidate_digest(stuck.recipe_json))
    for at in (killed_at, stuck_at):
        assert evaluations[at][0] not in [pid for pid, _ in evaluations[at + 1:]], (at, evaluations)
    assert len({pid for pid, _ in evaluations}) >= 3
    assert "can't allocate memory" not in " ".join(r.error or "" for r in records)  # recovered from, not recorded


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

    # a weight far past float16's range: the toy specialists' task vectors (entries of 1e-5 and
    # up) times it overflow 65504 in every tuned tensor, however gently the world was fine-tuned
    in_engine = evaluator.evaluate(recipe(1e12, "float16"))
    assert in_engine.objectives is None and "gave NaN or infinite values" in in_engine.error
    in_copy = evaluator.evaluate(recipe(1e12, "float32"))
    assert in_copy.objectives is None and in_copy.eval_s == 0.0, in_copy
    assert in_copy.error.startswith("merge produced non-finite weights in "), in_copy.error
    assert "weight" in in_copy.error.split(":", 1)[1]
    # the same evaluator, a sane candidate: the guard lets it through and it is scored
    sane = evaluator.evaluate(recipe(1.0, "float32"))
    assert sane.error is None and set(sane.objectives) == {"task:toy_arith/acc", "l2_from_base"}
