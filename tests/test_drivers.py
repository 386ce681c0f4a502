from __future__ import annotations

import math
import pickle
import shutil
from collections import Counter

import numpy as np
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution

from evomerge.drivers import make_driver
from evomerge.drivers.cma_driver import FAIL_FITNESS_BEFORE_ANY_SUCCESS, FAIL_MARGIN
from evomerge.objectives import ConstraintSpec, ObjectiveSpec, scalarize
from evomerge.errors import ConfigError, EvomergeError
from evomerge.store import RunStore

# A toy problem on two named coordinates: the loss is smallest at a=0.3, b=0.7.
DISTS = {"a": FloatDistribution(0.0, 1.0), "b": FloatDistribution(0.0, 1.0)}
LOSS = [ObjectiveSpec("loss", "minimize")]
POP = 6


def from_unit(x):
    return {"a": float(x[0]), "b": float(x[1])}


def loss(values) -> dict[str, float]:
    return {"loss": (values["a"] - 0.3) ** 2 + (values["b"] - 0.7) ** 2}


def new_store(path, directions=None, constraints=None) -> RunStore:
    return RunStore.create(path, "run", "seed: 1\n", "h", directions=directions or {"loss": "minimize"},
                           constraints=constraints)


def cma(store, seed=1, **kw):
    return make_driver("cma", store, distributions=DISTS, objectives=kw.pop("objectives", LOSS), popsize=POP,
                       seed=seed, dim=2, sigma0=0.3, from_unit=from_unit, **kw)


def run_generation(driver, order=None, result=loss):
    """Ask a whole generation, tell it back (in ``order`` of members); return the proposals."""
    props = [driver.ask() for _ in range(POP)]
    for i in order or range(POP):
        driver.tell(props[i].number, result(props[i].values))
    return props


def xs(props):
    return [(p.values["a"], p.values["b"]) for p in props]


# ---- CMA ----------------------------------------------------------------------------------


def test_cma_converges_on_a_quadratic_through_ask_and_tell(tmp_path):
    driver = cma(new_store(tmp_path))
    for _ in range(14):
        props = run_generation(driver)
    best = min(loss(p.values)["loss"] for p in props)
    assert best < 1e-3
    assert np.allclose(driver.state_dict()["mean"], [0.3, 0.7], atol=0.05)


def test_cma_asks_nothing_while_its_generation_is_out(tmp_path):
    driver = cma(new_store(tmp_path))
    props = [driver.ask() for _ in range(POP)]
    assert [p.number for p in props] == list(range(POP)) and {p.generation for p in props} == {0}
    assert driver.ask() is None
    for p in props[:-1]:
        driver.tell(p.number, loss(p.values))
    assert driver.ask() is None
    driver.tell(props[-1].number, loss(props[-1].values))
    assert driver.ask().generation == 1


def test_reseeding_numpy_between_asks_does_not_change_the_proposals(tmp_path):
    # lm-eval's simple_evaluate calls np.random.seed(...) for every candidate (DESIGN.md, Known traps).
    plain = cma(new_store(tmp_path / "plain"))
    plain_x = [xs(run_generation(plain)) for _ in range(3)]

    reseeded = cma(new_store(tmp_path / "reseeded"))
    reseeded_x = []
    for _ in range(3):
        props = []
        for _ in range(POP):
            np.random.seed(1234)
            props.append(reseeded.ask())
        for p in props:
            np.random.seed(1234)
            reseeded.tell(p.number, loss(p.values))
        reseeded_x.append(xs(props))
    assert reseeded_x == plain_x
    assert plain_x[0] != plain_x[1] != plain_x[2]  # and generations do not repeat each other


def test_tell_order_within_a_generation_does_not_matter(tmp_path):
    a, b = cma(new_store(tmp_path / "a")), cma(new_store(tmp_path / "b"))
    run_generation(a)
    run_generation(b, order=[5, 2, 0, 4, 1, 3])
    assert xs(run_generation(a)) == xs(run_generation(b))


def test_same_seed_same_tells_same_proposals_and_a_different_seed_differs(tmp_path):
    first = [xs(run_generation(cma(new_store(tmp_path / "1"), seed=7))) for _ in range(1)]
    again = [xs(run_generation(cma(new_store(tmp_path / "2"), seed=7))) for _ in range(1)]
    other = [xs(run_generation(cma(new_store(tmp_path / "3"), seed=8))) for _ in range(1)]
    assert first == again and first != other


def test_failed_candidates_are_ranked_last_with_the_documented_fitness(tmp_path):
    store = new_store(tmp_path)
    driver = cma(store)
    # Generation 0: everything fails -> the fixed fitness, and the failures are in the log with reasons.
    props = [driver.ask() for _ in range(POP)]
    for p in props:
        rec = driver.tell(p.number, None, failed_reason="merge raised ValueError")
        assert rec.state == "failed" and rec.error == "merge raised ValueError"
    assert driver.last_fitness == [FAIL_FITNESS_BEFORE_ANY_SUCCESS] * POP
    # Generation 1: members 1 and 4 fail (one by a NaN objective); the rest succeed.
    props = [driver.ask() for _ in range(POP)]
    for i, p in enumerate(props):
        if i == 1:
            driver.tell(p.number, None, failed_reason="out of memory")
        elif i == 4:
            assert driver.tell(p.number, {"loss": math.nan}).state == "failed"
        else:
            driver.tell(p.number, loss(p.values))
    fit = driver.last_fitness
    worst = max(loss(props[i].values)["loss"] for i in (0, 2, 3, 5))
    assert fit[1] == fit[4] == pytest.approx(worst + FAIL_MARGIN)
    assert all(fit[i] < fit[1] for i in (0, 2, 3, 5))
    # Generation 2: the worst success so far (generation 1's) still sets the penalty.
    props = [driver.ask() for _ in range(POP)]
    for i, p in enumerate(props):
        driver.tell(p.number, None if i == 0 else loss(p.values), failed_reason="timeout")
    worst = max(worst, *(loss(p.values)["loss"] for p in props[1:]))
    assert driver.last_fitness[0] == pytest.approx(worst + FAIL_MARGIN)
    assert store.counts().failed == POP + 3


def test_scalarize_signs_weights_and_constraint_penalty():
    objs = [ObjectiveSpec("acc", "maximize", 2.0), ObjectiveSpec("l2", "minimize", 0.5)]
    cons = [ConstraintSpec("l2", 3.0, penalty=10.0)]
    assert scalarize({"acc": 0.5, "l2": 2.0}, objs, cons) == pytest.approx(2 * 0.5 - 0.5 * 2.0)
    assert scalarize({"acc": 0.5, "l2": 4.0}, objs, cons) == pytest.approx(1.0 - 2.0 - 10.0 * 1.0)


def test_cma_resumes_by_replay_after_a_crash_mid_generation(tmp_path):
    # Reference: an uninterrupted run of three generations.
    reference = cma(new_store(tmp_path / "ref"))
    ref_x = [xs(run_generation(reference)) for _ in range(3)]

    # Part one: generation 0 done; generation 1 all asked, members 4 and 1 back, then the process dies.
    store = new_store(tmp_path / "run")
    driver = cma(store)
    run_generation(driver)
    props = [driver.ask() for _ in range(POP)]
    for i in (4, 1):
        driver.tell(props[i].number, loss(props[i].values))
    store.close()

    # Part two: reopen, requeue the four lost trials, rebuild the driver from the log.
    store = RunStore.open(store.path)
    with pytest.raises(RuntimeError, match="requeue_interrupted"):
        cma(store)
    assert sorted(t.number for t in store.requeue_interrupted()) == [props[i].number for i in (0, 2, 3, 5)]
    driver = cma(store)
    again = [driver.ask() for _ in range(4)]
    assert driver.ask() is None  # only the missing members of generation 1 are handed out
    assert xs(again) == [ref_x[1][i] for i in (0, 2, 3, 5)]
    assert [p.number for p in again] == list(range(12, 16)) and {p.generation for p in again} == {1}
    for p in reversed(again):
        driver.tell(p.number, loss(p.values))
    assert xs(run_generation(driver)) == ref_x[2]  # generation 2 as if nothing had happened
    counts = store.counts()
    assert (counts.finished, counts.interrupted) == (3 * POP, 4)


def test_cma_refuses_to_resume_a_log_made_with_another_seed(tmp_path):
    store = new_store(tmp_path)
    run_generation(cma(store, seed=1))
    with pytest.raises(EvomergeError, match="did not reproduce"):
        cma(store, seed=2)


def test_cma_refuses_objectives_the_run_was_not_created_with(tmp_path):
    with pytest.raises(ValueError, match="differ from the run"):
        cma(new_store(tmp_path), objectives=[ObjectiveSpec("loss", "maximize")])


# ---- CMA with a lookahead ------------------------------------------------------------------

AHEAD = 4


def run_stream(driver, trials, arrival):
    """Keep ``AHEAD + 2`` candidates out; tell them back in the order ``arrival`` picks from those out."""
    out, asked, told = [], [], 0
    while told < trials:
        while len(out) < AHEAD + 2 and len(asked) < trials:
            p = driver.ask()
            if p is None:
                break
            out.append(p)
            asked.append(p)
        p = out.pop(arrival(len(out)))
        driver.tell(p.number, loss(p.values))
        told += 1
    return asked


def test_cma_lookahead_hands_out_candidates_beyond_the_generation_being_completed(tmp_path):
    driver = cma(new_store(tmp_path), lookahead=AHEAD)
    props = [driver.ask() for _ in range(POP + AHEAD)]
    assert driver.ask() is None  # generation 0 and the next AHEAD candidates are all out
    assert [(p.generation, p.number) for p in props] == [(0, n) for n in range(POP)] + [(1, n) for n in range(POP, POP + AHEAD)]
    for p in props[:POP - 1] + props[POP:]:  # everything but generation 0's last member
        driver.tell(p.number, loss(p.values))
    assert driver.ask() is None and driver.generation == 0  # pycma is told generation 0 only when all of it is back
    driver.tell(props[POP - 1].number, loss(props[POP - 1].values))
    more = [driver.ask() for _ in range(POP)]  # generation 1's last 2 members, and AHEAD of generation 2
    assert [p.generation for p in more] == [1, 1, 2, 2, 2, 2] and driver.ask() is None


def test_cma_lookahead_candidates_do_not_depend_on_the_order_results_arrive_in(tmp_path):
    first = run_stream(cma(new_store(tmp_path / "fifo"), lookahead=AHEAD), 5 * POP, lambda n: 0)
    last = run_stream(cma(new_store(tmp_path / "lifo"), lookahead=AHEAD), 5 * POP, lambda n: n - 1)
    assert xs(first) == xs(last)
    generational = run_stream(cma(new_store(tmp_path / "gen")), 5 * POP, lambda n: 0)
    assert xs(first)[: POP + AHEAD] == xs(generational)[: POP] + xs(first)[POP: POP + AHEAD]
    assert xs(first)[POP + AHEAD:] != xs(generational)[POP + AHEAD:]  # later ones see other distributions


def test_cma_lookahead_converges_and_resumes_by_replay_after_a_crash(tmp_path):
    reference = run_stream(cma(new_store(tmp_path / "ref"), lookahead=AHEAD), 14 * POP, lambda n: n // 2)
    assert min(loss(p.values)["loss"] for p in reference[-POP:]) < 1e-3

    store = new_store(tmp_path / "run")
    driver = cma(store, lookahead=AHEAD)
    run_stream(driver, 2 * POP + 1, lambda n: n // 2)  # mid-generation 2, candidates of 3 out
    lost = [driver.ask() for _ in range(3)]
    store.close()
    store = RunStore.open(store.path)
    requeued = store.requeue_interrupted()
    driver = cma(store, lookahead=0)  # asked for another lookahead: the run keeps the one it started with
    assert driver.lookahead == AHEAD
    again = []
    while (p := driver.ask()) is not None:
        again.append(p)
    told = 2 * POP + 1
    assert [t.number for t in requeued] == [p.number for p in lost]
    assert len(again) == 3 * POP + AHEAD - told  # the 3 lost, then the rest of what was sampled
    ref_x = xs(reference)
    assert xs(again) == ref_x[told: told + len(again)]  # each the candidate the uninterrupted run had there
    for p in reversed(again):
        driver.tell(p.number, loss(p.values))
    assert xs([driver.ask() for _ in range(POP)]) == ref_x[told + len(again): told + len(again) + POP]


# ---- CMA told a sliding window of arriving results -------------------------------------------


def window(store, seed=1, **kw):
    kw.setdefault("cma_update", "window")
    return cma(store, seed=seed, **kw)


def keep_busy(driver, out, asked, tells, workers, arrival):
    """``workers`` candidates out at all times; tell ``tells`` of them back, each picked from those
    out by ``arrival``; ``out`` and ``asked`` carry over between calls."""
    for _ in range(tells):
        while len(out) < workers:
            p = driver.ask()
            assert p is not None, "the windowed driver always has a candidate"
            out.append(p)
            asked.append(p)
        p = out.pop(arrival(len(out), len(asked)))
        driver.tell(p.number, loss(p.values))


def scrambled(n_out, n_asked):
    return (n_asked * 7) % n_out  # results come back out of order, deterministically


def test_cma_window_keeps_every_worker_busy_tells_every_half_population_and_converges(tmp_path):
    driver = window(new_store(tmp_path))
    out, asked = [], []
    keep_busy(driver, out, asked, POP - 1, POP, scrambled)
    assert driver.generation == 0  # the first tell needs a full window of POP results
    keep_busy(driver, out, asked, 1, POP, scrambled)
    assert driver.generation == 1
    keep_busy(driver, out, asked, POP // 2, POP, scrambled)
    assert driver.generation == 2  # then every POP // 2 arrivals
    keep_busy(driver, out, asked, 20 * POP, POP, scrambled)
    assert min(loss(p.values)["loss"] for p in asked[-POP:]) < 1e-3


def test_cma_window_resumes_by_replay_and_proposes_what_an_uninterrupted_run_does(tmp_path):
    reference = window(new_store(tmp_path / "ref"))
    ref_out, ref_asked = [], []
    keep_busy(reference, ref_out, ref_asked, 5 * POP + 1, 4, scrambled)

    store = new_store(tmp_path / "run")
    driver = window(store)
    out, asked = [], []
    keep_busy(driver, out, asked, 5 * POP + 1, 4, scrambled)
    lost = list(out)  # out on workers when the search process dies
    store.close()
    store = RunStore.open(store.path)
    assert [t.number for t in store.requeue_interrupted()] == [p.number for p in lost]
    driver = window(store, cma_update="generations")  # a run keeps the update it was started with
    assert driver.state_dict()["cma_update"] == "window"
    again = [driver.ask() for _ in lost]  # the interrupted candidates first, with their vectors
    assert xs(again) == xs(lost)
    assert [store.trial(p.number).attrs["reissue_of"] for p in again] == [p.number for p in lost]
    # told back in the order the uninterrupted run tells its own, the stream goes on as it does
    keep_busy(driver, again, asked, 4 * POP, 4, scrambled)
    keep_busy(reference, ref_out, ref_asked, 4 * POP, 4, scrambled)
    assert xs(asked[len(lost) + 5 * POP + 1:]) == xs(ref_asked[5 * POP + 1 + len(lost):])
    assert driver.state_dict()["mean"] == reference.state_dict()["mean"]

    store.close()
    store = RunStore.open(store.path)
    store.requeue_interrupted()
    with pytest.raises(EvomergeError, match="did not reproduce"):
        window(store, seed=2)


@pytest.mark.parametrize("workers", [2, 8, 16])
def test_cma_default_lookahead_leaves_at_most_half_of_each_generation_stale(tmp_path, workers):
    """The search's default lookahead hands out candidates beyond the generation being completed,
    but never so many that more than half of a generation is sampled before the generation in
    front of it is told (whole stale generations lose score per trial; scripts/bench_cma_async.py);
    one worker, which never waits for a generation, gets none."""
    from evomerge.search import default_lookahead

    assert default_lookahead(1, POP) == 0
    assert default_lookahead(workers, 2) == 0  # pycma samples a population of 2 only mirrored
    lookahead = default_lookahead(workers, POP)
    first = cma(new_store(tmp_path / "first"), lookahead=lookahead)
    assert None not in [first.ask() for _ in range(POP + lookahead)] and first.ask() is None
    store = new_store(tmp_path / "stream")
    run_stream(cma(store, lookahead=lookahead), 6 * POP, lambda n: 0)
    stale: Counter[int] = Counter()
    for t in store.trials():
        stale[t.attrs["generation"]] += t.attrs["sampled_in"] < t.attrs["generation"]
    assert 0 < max(stale.values()) <= POP // 2
    assert stale[1] == lookahead  # generation 1's first members were sampled with generation 0


def test_cma_population_of_two_runs_with_several_workers(tmp_path):
    """A population of 2 is sampled as a mirrored pair, which a lookahead would turn off: the
    search's default for several workers must leave it generational, and the stream must run."""
    from evomerge.search import default_lookahead

    store = new_store(tmp_path / "pair")
    driver = make_driver("cma", store, distributions=DISTS, objectives=LOSS, popsize=2, seed=1, dim=2, sigma0=0.3,
                         from_unit=from_unit, lookahead=default_lookahead(4, 2))
    for _ in range(3):
        props = [driver.ask(), driver.ask()]
        assert None not in props and driver.ask() is None  # generational: nothing beyond the pair
        for p in props:
            driver.tell(p.number, loss(p.values))
    assert len(store.trials()) == 6


def test_cma_says_at_start_when_its_workers_will_wait_and_what_keeps_them_busy():
    """Beyond ``population / 2`` workers the default lookahead cannot supply them all, so the
    generational loop idles them at every generation's end: validate and search say so once, with
    the fixes; not where the lookahead keeps up, nor where the space file chose already."""
    from evomerge.search import cma_idle_notice, default_lookahead, idle_workers_notice
    from evomerge.space_config import parse_space_config
    from tests.test_space_config import minimal_config

    for workers, pop in [(1, 16), (2, 8), (4, 8), (8, 16), (16, 32)]:  # the lookahead keeps up
        assert idle_workers_notice(workers, pop, default_lookahead(workers, pop), None) is None
    line = idle_workers_notice(16, 16, default_lookahead(16, 16), None)
    assert line is not None and "16 workers on a CMA-ES population of 16" in line and "8 candidate(s)" in line
    assert "search.cma_update: window" in line and "search.population to 32" in line
    assert idle_workers_notice(4, 2, default_lookahead(4, 2), None) is not None  # a mirrored pair: no lookahead at all
    assert idle_workers_notice(16, 16, 0, "window") is None  # nobody waits
    assert idle_workers_notice(16, 16, 4, None, explicit=True) is None  # the space file's own lookahead

    def config(search, count):
        return parse_space_config(minimal_config(search={"budget": 10, **search},
                                                 workers={"count": count, "cpus_per_worker": 1}))

    assert "2 workers on a CMA-ES population of 2" in cma_idle_notice(config({"driver": "cma", "population": 2}, 2), 8)
    assert cma_idle_notice(config({"driver": "cma", "population": 2, "cma_update": "window"}, 2), 8) is None
    assert cma_idle_notice(config({"driver": "tpe"}, 8), 8) is None
    default_pop = cma_idle_notice(config({"driver": "cma"}, 8), 8)  # population 4 + 3 ln 8 = 10: lookahead 5
    assert default_pop is not None and "population of 10" in default_pop and "5 candidate(s)" in default_pop


# ---- Optuna -------------------------------------------------------------------------------

MO_DIRS = {"loss": "minimize", "a_plus_b": "maximize"}
MO_OBJS = [ObjectiveSpec("loss", "minimize"), ObjectiveSpec("a_plus_b", "maximize")]
MO_DISTS = {**DISTS, "method": CategoricalDistribution(("linear", "ties"))}


def mo_result(values):
    return {**loss(values), "a_plus_b": values["a"] + values["b"], "extra_metric": 1.0}


def optuna_driver(name, store, seed=3):
    constraints = [ConstraintSpec(n, b) for n, b in store.constraints.items()]
    return make_driver(name, store, distributions=MO_DISTS, objectives=MO_OBJS, constraints=constraints,
                       seed=seed, popsize=4)


@pytest.mark.parametrize("name,n", [("tpe", 8), ("nsga2", 8), ("random", 6), ("gp", 12)])
def test_each_optuna_driver_runs_multi_objective_trials_through_the_store(tmp_path, name, n):
    store = new_store(tmp_path, MO_DIRS, constraints={"loss": 0.2})
    driver = optuna_driver(name, store)
    props = [driver.ask() for _ in range(2)]  # two out at once, as with two workers
    for k in range(n):
        p = props.pop(0)
        assert set(p.values) == set(MO_DISTS) and p.values["method"] in ("linear", "ties")
        if k == 3:
            driver.tell(p.number, None, failed_reason="worker died")
        else:
            driver.tell(p.number, mo_result(p.values), attrs={"timings": {"merge_s": 0.1, "eval_s": 0.2}})
        if k < n - 2:
            props.append(driver.ask())
    for p in props:
        driver.tell(p.number, mo_result(p.values))
    recs = store.trials()
    assert [t.number for t in recs] == list(range(n))
    assert [t.state for t in recs].count("failed") == 1 and recs[3].error == "worker died"
    for t in recs:
        if t.state == "complete":
            assert t.objectives == pytest.approx(mo_result(t.params))  # every measured value kept
            assert t.constraints == pytest.approx({"loss": t.objectives["loss"] - 0.2})
    assert all(m.state == "complete" for m in store.pareto())
    assert store.counts().finished == n


def test_gp_proposes_with_its_model_after_the_startup_trials(tmp_path):
    # GPSampler's first 10 trials come from RandomSampler(seed); the 11th must be the GP's own.
    def proposals(name, n):
        driver = optuna_driver(name, new_store(tmp_path / name, MO_DIRS))
        out = []
        for _ in range(n):
            p = driver.ask()
            out.append(dict(p.values))
            driver.tell(p.number, mo_result(p.values))
        return out

    gp, rnd = proposals("gp", 11), proposals("random", 11)
    assert gp[:10] == rnd[:10]
    assert gp[10] != rnd[10]


def test_optuna_resume_reruns_interrupted_trials_first_with_the_same_params(tmp_path):
    store = new_store(tmp_path / "runs", MO_DIRS)
    driver = optuna_driver("tpe", store)
    done = driver.ask()
    driver.tell(done.number, mo_result(done.values))
    lost = [driver.ask(), driver.ask()]
    store.close()

    # Two copies of the crashed run resume identically: the sampler is seeded from the log.
    copies = []
    for k in range(2):
        path = tmp_path / f"copy{k}"
        shutil.copytree(store.path, path)
        copies.append(RunStore.open(path))
    outcomes = []
    for copy in copies:
        assert [t.number for t in copy.requeue_interrupted()] == [p.number for p in lost]
        d = optuna_driver("tpe", copy)
        assert d.state_dict()["seed"] == 3 + 3
        reruns = [d.ask(), d.ask()]
        assert [dict(p.values) for p in reruns] == [dict(p.values) for p in lost]
        assert [copy.trial(p.number).attrs["rerun_of"] for p in reruns] == [p.number for p in lost]
        for p in reruns:
            d.tell(p.number, mo_result(p.values))
        fresh = d.ask()
        assert fresh.number == 5 and "rerun_of" not in copy.trial(fresh.number).attrs
        outcomes.append(dict(fresh.values))
        assert copy.counts().finished == 3 and copy.counts().interrupted == 2
        # A second resume does not re-run them again.
        copy.close()
        reopened = RunStore.open(copy.path)
        reopened.requeue_interrupted()
        assert optuna_driver("tpe", reopened).state_dict()["reruns_left"] == [5]
    assert outcomes[0] == outcomes[1]


def test_tell_of_an_unknown_trial_is_refused(tmp_path):
    driver = optuna_driver("random", new_store(tmp_path, MO_DIRS))
    p = driver.ask()
    driver.tell(p.number, mo_result(p.values))
    with pytest.raises(ValueError, match="told already"):
        driver.tell(p.number, mo_result(p.values))


def test_unknown_driver_name_suggests_the_right_one(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'nsga2'"):
        make_driver("nsga", new_store(tmp_path), distributions=DISTS, objectives=LOSS)


def test_no_driver_pickles_anything(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("pickle used")

    for fn in ("dumps", "loads", "dump", "load"):
        monkeypatch.setattr(pickle, fn, refuse)
    run_generation(cma(new_store(tmp_path / "cma")))
    store = new_store(tmp_path / "tpe", MO_DIRS)
    driver = optuna_driver("tpe", store)
    for _ in range(3):
        p = driver.ask()
        driver.tell(p.number, mo_result(p.values))


def test_the_gp_driver_warns_once_when_a_proposal_holds_up_the_loop(tmp_path, monkeypatch, caplog):
    import evomerge.drivers.optuna_driver as optuna_driver

    # every proposal after the first counts as slow: more than 0 s, and more than 0 x the first one
    monkeypatch.setattr(optuna_driver, "SLOW_ASK_S", 0.0)
    monkeypatch.setattr(optuna_driver, "GROWTH", 0.0)
    monkeypatch.setattr(optuna_driver, "BASELINE_ASKS", 1)
    store = new_store(tmp_path)
    driver = make_driver("gp", store, distributions=DISTS, objectives=LOSS, seed=0)
    with caplog.at_level("WARNING", logger="evomerge.drivers.optuna_driver"):
        for _ in range(4):
            p = driver.ask()
            driver.tell(p.number, loss(p.values))
    slow = [r for r in caplog.records if "cube of the trials" in r.getMessage()]
    assert len(slow) == 1 and "trial 1" in slow[0].getMessage()
