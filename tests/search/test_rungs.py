"""Multi-fidelity evaluation (``evaluation.rungs``): real searches on the toy world (in-process pool,
real lm-eval scoring, real Optuna and pycma), checking that candidates are promoted and stopped,
that a promoted candidate scores exactly what a whole evaluation of it scores, that no item is
scored twice for a candidate (its forward passes say so), that the front and ``--best`` hold only
trials scored on every item, that a run killed between a rung and its promotion resumes without
losing or re-scoring an item, and that a bad setting is refused before anything runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from evomerge.errors import ConfigError
from evomerge.rungs import (
    INHERITED_ATTR,
    ITEMS_ATTR,
    PARKED_ATTR,
    STOPPED_ATTR,
    RungLadder,
    full_fidelity,
)
from evomerge.search import run_search
from evomerge.space_config import parse_space_config
from tests.reliability.helpers import read_run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ITEMS = 36  # per task: rungs of 4, 12 and 36 items with min_items 4, eta 3


def space_data(toy_world, *, driver: str, budget: int, objectives: str = "both", **search) -> dict:
    donors = [str(p) for _, p in sorted(toy_world.specialists.items())]
    tasks = sorted(toy_world.specialists)
    if objectives == "mean":  # one objective: Optuna's successive halving decides
        tasks = tasks[:1]
    return {
        "name": f"rungs_{driver}",
        "models": {"base": str(toy_world.base), "donors": donors},
        "merge": {"method": "task_arithmetic", "parameters": {"weight": {"range": [0.0, 1.2]}}},
        "objectives": [{"task": f"toy_{n}", "metric": "acc", "direction": "maximize"} for n in tasks],
        "evaluation": {"items": ITEMS, "batch_size": 36, "include_path": [str(ROOT / "eval_tasks")],
                       "rungs": {"min_items": 4, "eta": 3}},
        "search": {"driver": driver, "budget": budget, "seed": 0, **({"population": 4} if driver == "cma" else {}),
                   **search},
        "workers": {"count": 1, "cpus_per_worker": 1, "pool": "inprocess"},
    }


def config(data: dict, tmp_path: Path):
    return parse_space_config(data, source=str(tmp_path / "space.yaml"))


def whole_evaluation(cfg, records):
    """Each record's recipe scored by a worker on every item at once (the path without rungs)."""
    from evomerge.prepare import prepare, worker_spec
    from evomerge.worker import CandidateEvaluator

    prepared = prepare(cfg)
    evaluator = CandidateEvaluator(worker_spec(prepared))
    return prepared, {r.number: evaluator.evaluate(r.recipe_json) for r in records}


@pytest.mark.parametrize(("driver", "objectives"), [("tpe", "mean"), ("cma", "both")])
def test_rungs_promote_stop_and_equal_a_whole_evaluation(toy_world, tmp_path, driver, objectives):
    # with several objectives, no hand-set trials: on a world where task arithmetic with weight 1
    # dominates most candidates (as on the pair world), it would stop them all, rightly, at rung 1
    cfg = config(space_data(toy_world, driver=driver, budget=18 if driver == "tpe" else 14, objectives=objectives,
                            **({} if objectives == "mean" else {"hand_set": False})), tmp_path)
    run = run_search(cfg, runs_dir=tmp_path / "runs")
    records, _ = read_run(run)
    assert all(r.state == "complete" for r in records)
    hand_set = [r for r in records if "hand_set" in r.attrs]
    searched = [r for r in records if "hand_set" not in r.attrs]
    stopped = [r for r in searched if STOPPED_ATTR in r.attrs]
    whole = [r for r in searched if full_fidelity(r)]
    assert stopped and whole, "a rung search both stops and promotes candidates"
    if hand_set:
        # hand-set trials climb together from rung 0: the best on each rung's items (by the sum
        # --best ranks by) goes up whatever the rule says, so the search never ends below it;
        # one is stopped only where its rung's items show it below that best one
        from evomerge.rungs import VALUES_ATTR

        def at(r, rung):
            return sum(r.attrs[VALUES_ATTR][str(rung)].values())

        assert all("0" in r.attrs[VALUES_ATTR] for r in hand_set)
        on_rung0 = max(hand_set, key=lambda r: (at(r, 0), -r.number))
        for r in hand_set:
            if STOPPED_ATTR in r.attrs:
                k = r.attrs[STOPPED_ATTR]
                assert at(r, k) < max(at(o, k) for o in hand_set if str(k) in o.attrs[VALUES_ATTR])
        climbed = [r for r in hand_set if full_fidelity(r)]
        assert climbed and (on_rung0 in climbed or STOPPED_ATTR not in on_rung0.attrs)
        best_whole = max(sum(r.objectives.values()) for r in records if full_fidelity(r))
        assert best_whole >= max(sum(r.objectives.values()) for r in climbed)

    prepared, full = whole_evaluation(cfg, records)
    ladder: RungLadder = prepared.rungs
    assert [ladder.sizes[t] for t in sorted(ladder.sizes)] == [[4, 12, 36]] * len(ladder.sizes)
    for r in records:
        rung = r.attrs.get(STOPPED_ATTR, ladder.top)
        # items never scored twice: the trial's cost counts exactly its rung's items, and its
        # forward passes are the whole evaluation's scaled to those items
        assert r.cost["items"] == {t: len(docs) for t, docs in ladder.items(rung).items()}
        per_item_pass = full[r.number].cost["forward_passes"] / (ITEMS * len(ladder.sizes))
        assert r.forward_passes == per_item_pass * sum(len(d) for d in ladder.items(rung).values())
        assert sorted(int(d) for d in next(iter(r.attrs[ITEMS_ATTR].values()))) == sorted(
            next(iter(ladder.items(rung).values())))
        if full_fidelity(r):  # promoted to the top (or hand-set): exactly the whole evaluation's scores
            assert dict(r.objectives) == {k: full[r.number].objectives[k] for k in r.objectives}
    # the front and --best: trials scored on every item only
    from evomerge.export import choose
    from evomerge.store import RunStore

    store = RunStore.open(run)
    try:
        assert store.pareto() and all(full_fidelity(r) for r in store.pareto())
        assert full_fidelity(choose(store, trial=None, best=True, pareto=False)[0])
        spent = store.spent().forward_passes
    finally:
        store.close()
    from evomerge.report import rungs_sentence

    stopped_all = [r for r in records if STOPPED_ATTR in r.attrs]  # hand-set trials stop too
    assert rungs_sentence(records) == (f"rungs: {len(records) - len(stopped_all)} trials scored on every item (rung 3 of 3); "
                                       f"stopped lower: " + ", ".join(
                                           f"{n} at rung {k + 1}" for k in range(2)
                                           if (n := sum(r.attrs[STOPPED_ATTR] == k for r in stopped_all)))
                                       + (f" ({n} clearly below a front trial)"
                                          if (n := sum("rung_beaten_by" in r.attrs for r in records)) else ""))
    everything = sum(full[r.number].cost["forward_passes"] for r in records)
    assert spent == sum(r.forward_passes for r in records) < everything  # the saving, counted

    # a candidate the Pareto rule kept but a front trial beats beyond its rung's noise stops, and
    # names that trial: the rule holds when computed again from the log
    from evomerge.rungs import BEATEN_ATTR, RungState, clearly_beaten

    by_number = {r.number: r for r in records}
    directions = {f"task:{o.task}/{o.metric}": o.direction for o in cfg.objectives}
    beaten = [r for r in records if BEATEN_ATTR in r.attrs]
    for r in beaten:
        other = by_number[r.attrs[BEATEN_ATTR]]
        assert full_fidelity(other) and other.number < r.number
        assert "hand_set" not in r.attrs or r.attrs[PARKED_ATTR] is not None  # (parked, then beaten at the end)
        assert clearly_beaten(RungState.from_attrs(r.attrs), RungState.from_attrs(other.attrs), r.objectives,
                              other.objectives, ladder.items(r.attrs[STOPPED_ATTR]), directions)
    if driver == "cma":  # the front, formed by the first candidates to climb, stops later ones
        assert beaten


def test_a_run_killed_between_a_rung_and_its_promotion_resumes_without_rescoring(toy_world, tmp_path, set_failpoints):
    data = space_data(toy_world, driver="tpe", budget=10, hand_set=False)
    cfg = config(data, tmp_path)
    set_failpoints("search.after_rung=raise@3")  # the third rung result is recorded, its promotion not decided
    with pytest.raises(Exception, match="failpoint"):
        run_search(cfg, runs_dir=tmp_path / "runs")
    set_failpoints("")
    run = run_search(cfg, runs_dir=tmp_path / "runs")
    records, _ = read_run(run)
    interrupted = [r for r in records if r.interrupted]
    assert len(interrupted) == 1 and interrupted[0].attrs.get(ITEMS_ATTR)
    lost = interrupted[0]
    heir = next(r for r in records if r.attrs.get(INHERITED_ATTR) == lost.number)
    assert heir.recipe_json == lost.recipe_json and heir.state == "complete"
    # its per-item results went on: what the heir scored itself and what it took over are disjoint
    taken = {k: set(v) for k, v in lost.attrs[ITEMS_ATTR].items()}
    final = {k: set(v) for k, v in heir.attrs[ITEMS_ATTR].items()}
    assert all(taken[k] <= final[k] for k in taken)
    own = heir.cost.get("items", {})
    for task, count in own.items():
        name = next(k for k in final if k.startswith(f"task:{task}/"))
        assert count == len(final[name]) - len(taken[name])  # only new items were scored
    # and an uninterrupted run's same candidates score the same: the heir equals a whole evaluation
    if full_fidelity(heir):
        _, full = whole_evaluation(cfg, [heir])
        assert dict(heir.objectives) == {k: full[heir.number].objectives[k] for k in heir.objectives}
    assert len([r for r in records if r.finished]) == data["search"]["budget"]


def test_hand_set_trials_cut_by_the_budget_still_finish(toy_world, tmp_path):
    # fewer trials than hand-set merges: the ones asked cannot wait for the others to climb together
    cfg = config(space_data(toy_world, driver="tpe", budget=2, objectives="mean"), tmp_path)
    records, _ = read_run(run_search(cfg, runs_dir=tmp_path / "runs"))
    assert len(records) == 2 and all(r.state == "complete" and "hand_set" in r.attrs for r in records)
    assert any(full_fidelity(r) for r in records), "the best of them is scored on every item"


def test_bad_rung_settings_are_refused_before_anything_runs(toy_world, tmp_path):
    data = space_data(toy_world, driver="tpe", budget=4)
    data["evaluation"]["rungs"] = {"min_items": 2, "eta": 1}
    with pytest.raises(ConfigError, match=r"evaluation\.rungs\.eta") as err:
        config(data, tmp_path)
    assert err.value.exit_code == 2
    # a metric lm-eval aggregates other than by mean cannot be combined across rungs: refused, naming it
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name in ("toy_data.py", "toy_arith.jsonl"):
        shutil.copy(ROOT / "eval_tasks" / name, tasks / name)
    text = (ROOT / "eval_tasks" / "toy_arith.yaml").read_text()
    assert text.count("aggregation: mean") == 1
    (tasks / "toy_arith_median.yaml").write_text(text.replace("task: toy_arith", "task: toy_arith_median")
                                                 .replace("aggregation: mean", "aggregation: median"))
    data = space_data(toy_world, driver="tpe", budget=4)
    data["evaluation"]["include_path"] = [str(tasks)]
    data["objectives"] = [{"task": "toy_arith_median", "metric": "acc", "direction": "maximize"}]
    with pytest.raises(ConfigError, match=r"objectives\[0\]\.metric") as err:
        run_search(config(data, tmp_path), runs_dir=tmp_path / "runs")
    assert err.value.exit_code == 2 and "mean" in str(err.value)
    assert not (tmp_path / "runs" / data["name"]).exists()


def test_cma_ranks_stopped_candidates_below_full_ones_by_rung_then_score():
    from evomerge.drivers.cma_driver import stopped_fitness

    full = [-0.9, -0.2]  # fitness: lower is better
    # member: (rung reached, score there); a lucky rung-0 score must not outrank a rung-1 one
    ranked = stopped_fitness({0: (0, 0.99), 1: (1, 0.4), 2: (0, 0.5), 3: (1, 0.6)}, full, None)
    assert sorted(ranked, key=ranked.get) == [3, 1, 0, 2]
    assert min(ranked.values()) > max(full)
    assert stopped_fitness({}, full, None) == {}


def test_pareto_rule_promotes_what_can_still_reach_the_front():
    from evomerge.rungs import ParetoSuccessiveHalving

    rule = ParetoSuccessiveHalving({"a": "maximize", "b": "minimize"}, eta=3)
    assert rule.promote(0, 0, {"a": 0.5, "b": 1.0})  # alone on its rung
    assert rule.promote(1, 0, {"a": 0.9, "b": 0.5})  # dominates the first
    # nothing dominates it, but with 3 at the rung ASHA keeps 1: the other undominated one has the
    # larger sum (0.9 - 0.5 against 0.1 - 0.1)
    assert not rule.promote(2, 0, {"a": 0.1, "b": 0.1})
    assert not rule.promote(3, 0, {"a": 0.2, "b": 2.0})  # two of the three dominate it
    assert rule.promote(4, 1, {"a": 0.0, "b": 9.0})  # rungs compete separately
    # several undominated at a rung: only ASHA's share goes up, the best by sum first
    rule = ParetoSuccessiveHalving({"a": "maximize", "b": "maximize"}, eta=3)
    front = [(0.3, 0.8), (0.0, 1.0), (1.0, 0.0), (0.8, 0.2)]  # none dominates another
    assert [rule.promote(i, 0, {"a": a, "b": b}) for i, (a, b) in enumerate(front)] == [True, False, False, False]
    rule.enter(10, 0, {"a": 0.6, "b": 0.6})  # competes without a verdict (a hand-set trial): sum 1.2
    assert rule.promote(5, 0, {"a": 0.5, "b": 0.65})  # 6 at the rung, 2 kept: second behind trial 10
    assert not rule.promote(6, 0, {"a": 0.55, "b": 0.55})  # trial 10 dominates it


def test_a_candidate_stops_only_when_a_front_trial_beats_it_beyond_the_items_noise():
    """``clearly_beaten`` against the rule computed independently with numpy, on random paired
    per-item results (two accuracies on their own items, one distance measured whole)."""
    import numpy as np

    from evomerge.rungs import RungState, clearly_beaten

    directions = {"task:toy_a/acc": "maximize", "task:toy_b/acc": "maximize", "l2_from_base": "minimize"}
    items = {"toy_a": list(range(3, 43)), "toy_b": list(range(100, 124))}
    rng = np.random.default_rng(0)
    outcomes = []
    for _ in range(400):
        mine, theirs = RungState(), RungState()
        leads, variances = [], []
        for task, docs in items.items():
            p_mine, p_theirs = rng.uniform(0.2, 0.8, 2)
            a = (rng.random(len(docs)) < p_mine).astype(float)
            b = (rng.random(len(docs)) < p_theirs).astype(float)
            mine.per_item[f"task:{task}/acc"] = dict(zip(docs, a.tolist()))
            theirs.per_item[f"task:{task}/acc"] = dict(zip(docs, b.tolist()))
            diff = b - a
            leads.append(diff.mean())
            variances.append(diff.var(ddof=1) / len(docs))
        l2_mine, l2_theirs = rng.uniform(1.0, 2.0, 2)
        values = {"l2_from_base": l2_mine}
        other_values = {"l2_from_base": l2_theirs}
        leads.append(l2_mine - l2_theirs)  # minimised: the other leads when its distance is smaller
        z = 2.0
        behind_somewhere = any(lead < -z * np.sqrt(v) for lead, v in zip(leads[:2], variances)) or leads[2] < 0
        expected = (not behind_somewhere) and sum(leads) > z * np.sqrt(sum(variances))
        got = clearly_beaten(mine, theirs, values, other_values, items, directions)
        assert got == expected
        outcomes.append(got)
    assert 10 < sum(outcomes) < 390, "both verdicts occur"


def test_input_models_as_good_as_the_best_wait_for_the_end_and_survive_a_kill(
        toy_world, tmp_path, set_failpoints):
    """On arith accuracy alone, the arith specialist alone and task arithmetic cannot be told apart
    on 4 items: the merge climbs on at once (TPE learns what it scores, CMA-ES starts there) and
    the input model alone is parked at rung 0; at the end it stops if a front trial clearly beats
    it, else climbs on. Killed while it is parked, the resumed run parks its rerun again without
    scoring an item twice."""
    from evomerge.rungs import BEATEN_ATTR, PARKED_ATTR, UNPARKED_ATTR

    def hand(records, label):
        return next(r for r in records if r.attrs.get("hand_set") == f"hand-set: {label}" and not r.interrupted)

    def searched(records):
        return [r.recipe_json for r in records if "hand_set" not in r.attrs and r.state == "complete"]

    def settled(r):  # a parked trial at the end: climbed to the top, or stopped below a front trial
        return r.attrs[UNPARKED_ATTR] and (full_fidelity(r) != (BEATEN_ATTR in r.attrs))

    data = space_data(toy_world, driver="tpe", budget=14, objectives="mean")
    whole = read_run(run_search(config(data, tmp_path / "a"), runs_dir=tmp_path / "a" / "runs"))[0]
    alone, ta = hand(whole, "arith alone"), hand(whole, "task arithmetic, weight 1")
    assert alone.attrs[PARKED_ATTR] == 0 and settled(alone)
    assert PARKED_ATTR not in ta.attrs and full_fidelity(ta)
    assert max(r.number for r in whole if r.attrs.get("rung") == 0) > alone.number  # decided after the search

    cfg = config(data, tmp_path / "b")
    set_failpoints("search.after_rung=raise@7")  # after the model alone is parked, before the end
    with pytest.raises(Exception, match="failpoint"):
        run_search(cfg, runs_dir=tmp_path / "b" / "runs")
    set_failpoints("")
    records = read_run(run_search(cfg, runs_dir=tmp_path / "b" / "runs"))[0]
    lost = next(r for r in records if r.interrupted and r.attrs.get("hand_set") == alone.attrs["hand_set"])
    assert lost.attrs[PARKED_ATTR] == 0
    heir = next(r for r in records if r.attrs.get(INHERITED_ATTR) == lost.number)
    assert heir.attrs[PARKED_ATTR] == 0 and settled(heir)
    # rung 0's items are not scored again: the heir paid only for the items above them, if any
    assert sum(heir.cost.get("items", {}).values()) == (ITEMS - 4 if full_fidelity(heir) else 0)
    if full_fidelity(heir) and full_fidelity(alone):
        assert heir.objectives == alone.objectives

    # CMA-ES starts at the best hand-set trial that climbed on, the merge, and a run continued
    # with a larger budget after the model alone climbed at the end (here past the merge) rebuilds
    # that start: CMA-ES's replay checks every logged candidate against the one it draws again
    data = space_data(toy_world, driver="cma", budget=10, objectives="mean")
    whole = read_run(run_search(config(data, tmp_path / "c"), runs_dir=tmp_path / "c" / "runs"))[0]
    alone, ta = hand(whole, "arith alone"), hand(whole, "task arithmetic, weight 1")
    assert alone.attrs[PARKED_ATTR] == 0 and settled(alone) and full_fidelity(ta)
    acc = "task:toy_arith/acc"
    assert full_fidelity(alone) and alone.objectives[acc] > ta.objectives[acc]  # the case at stake
    data["search"]["budget"] = 14
    records = read_run(run_search(config(data, tmp_path / "c"), runs_dir=tmp_path / "c" / "runs"))[0]
    assert len(records) == 14 and searched(records)[:len(searched(whole))] == searched(whole)
