"""Idle workers at CMA-ES generation ends against the best score per trial: the lookahead's trade-off.

    python scripts/bench_cma_async.py [--trials 960] [--seeds 5]

A discrete-event simulation over the real CMA driver and the real run store (SQLite in a
temporary folder): ``W`` simulated workers, each taking the next candidate the moment it is free;
evaluation times are log-normal with mean 1 and coefficient of variation ``cv``; population 16.
Results are told to the driver in the order they finish. Objectives (12 dimensions, each
coordinate of the unit cube mapped to [-2, 2], score = -f maximised, f = 0 at the optimum):
Rosenbrock, an ellipsoid of condition 1e6 and a sphere, both centred off the cube's centre.

It prints, for W in (8, 16) and cv in (0.3, 0.6):

- the workers' utilisation (busy time / (W x makespan); goal at least 95%), median over
  ``--seeds`` timing seeds, for the generational scheme (lookahead 0), evomerge's default
  lookahead and the smallest lookahead of a few that reaches 95%;
- for each of those lookaheads, the best score reached per trial against the generational
  loop's: for every objective and every trial count n, the median over ``--seeds`` CMA seeds of
  the distance to the optimum (f of the best candidate after n finished trials), divided by the
  generational scheme's; the worst (largest) of these ratios and the median of them (at most 1:
  no worse per trial). Candidates depend on the results only, never on evaluation times, so
  these curves come from one timing (8 workers, cv 0.6) and hold for every row.

Then the ratios per objective and trial count for every lookahead measured, and the same at equal
simulated time (what a user waiting for the search sees; up to the last n, where the lookahead's
run has stopped too), and the mean cosine between consecutive steps of pycma's mean (near -1:
the mean steps back and forth). On this shared 2-core machine (load average about 6) the whole
run took 11 minutes (``--trials 240 --seeds 2``: 1 minute).

    python scripts/bench_cma_async.py --window [--trials 960] [--seeds 5]

measures ``search.cma_update: window`` (evomerge.drivers.cma_window) on the real driver and store
the same way, per setting (its candidates depend on arrival order): utilisation and per-trial
worst / median against the generational loop on the same seeds. ``scripts/bench_cma_oversampling.py``
runs the same scheme on pycma alone, next to the over-sampling variants, in a fraction of the time.

    python scripts/bench_cma_async.py --toy [--trials 96] [--seeds 10] [--jobs 2] [--items N] [--population 16]
                                        [--lookahead] [--no-hand-set]

runs the same simulation (W in (8, 16), cv in (0.3, 0.6), results told in finishing order) on the
toy world: ``search_spaces/toy_ties.yaml`` as shipped (its ``evaluation.items: 200``, every
search item, and its ``sigma0: 0.05``; hand-set trials first, the driver built as ``evomerge
search`` builds it), except the population: 16, the issue's setting for this goal, where the
shipped space has 8 (``--population`` sets it; ``--items`` sets fewer items for a quicker run).
Each candidate is decoded to a recipe and scored on the search items by the worker's evaluator in
the benchmark's process, for the generational loop and the window (``--lookahead``: also the
default lookahead). Per setting and scheme: the utilisation, also up to the last candidate handed
out (a 96-trial budget is 6-12 trials per worker, so the drain at its end weighs) and from the
driver's first candidate to the last one handed out (without the hand-set barrier: CMA starts at
the best hand-set trial, so it waits for all of them); over seeds, the median [min, max] of the
best sum of the two search accuracies after n trials and of the held-out mean accuracy of each
run's final best trial (``scripts/bench_fitness.py``'s ``HeldOut``). Then window minus
generational paired by seed (same seed: the same hand-set start and CMA stream until results
differ): the mean difference, how many seeds are above / level / below, and the exact sign-flip
p-value, and the per-seed differences, so noise can be told from a gap. ``--no-hand-set`` starts
CMA at the space's centre, without the hand-set trials it waits for. Scores are kept per recipe
within a seed, so the generational runs, whose candidates do not depend on timing, are evaluated
once per seed; ``--jobs`` runs seeds in parallel processes. Needs the toy world.

    python scripts/bench_cma_async.py --barrier [--hand-set 4]

prints what the hand-set barrier costs and what the one sound way to fill it would buy, from the
timing alone (the same log-normal times, 20,000 draws per setting): CMA starts at the best
hand-set trial, so with ``H`` hand-set trials (4 on the toy world) ``W - H`` workers wait for the
slowest of them. Any candidate handed out before all ``H`` results are back is drawn around a
start that is only a guess; the best guess, the best hand-set result so far (which a resumed run
could replay, as the window's log records its arrivals), is wrong until the final best has
arrived, and with equal timing that one is equally likely to arrive at any place. Per setting: the
idle worker-time at the barrier (in mean evaluations, and as a share of a 96- and a 1000-trial
run), and, had every idle worker started a candidate around the best result so far until the
barrier would have lifted, how many of those were drawn around a start that lost (orphans: trials
spent that CMA cannot learn from) and how many around the final start.

    python scripts/bench_cma_async.py --runs runs/toy_gen runs/toy_ahead

reads real runs instead and prints, for each, the workers' utilisation (the trials' time on
workers over workers x the span from the first start to the last finish) and the best weighted
objective sum reached after n finished trials. ``scripts/bench_cma_lookahead_toy.py`` runs the
toy-world comparison itself.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import io
import logging
import os
import shutil
import statistics
import tempfile
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import NamedTuple

import numpy as np

POP = 16
DIM = 12
QUALITY_TIMING = (8, 0.6)  # workers and cv of the runs the per-trial curves come from
LOOKAHEADS = (8, 12, 16, 24, 32, 48)  # measured for utilisation; the 95% column picks the smallest
MARKS = (120, 240, 480, 960, 1920)


def marks_for(trials: int, marks: tuple[int, ...] = MARKS) -> list[int]:
    """The trial counts a table reports: the marks within the budget, and the budget itself (a
    budget below the first mark still gets a column)."""
    return sorted({m for m in marks if m <= trials} | {trials})


class Run(NamedTuple):
    utilisation: float
    curve: list[float]  # the best score after each finished trial
    finished: list[float]  # the simulated time each trial finished at
    step_cosine: float  # see step_cosine()
    best: dict | None = None  # the values of the best trial (the toy world scores its recipe held out)
    handing_out: float = float("nan")  # utilisation until the last candidate was handed out (no drain)
    after_start: float = float("nan")  # the same from the driver's first candidate on (no hand-set barrier)


def _coords(values: dict[str, float]) -> np.ndarray:
    return np.array([values[f"x{i}"] for i in range(DIM)]) * 4.0 - 2.0


def rosenbrock(values: dict[str, float]) -> float:
    x = _coords(values)
    return float(np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2))


def ellipsoid(values: dict[str, float]) -> float:
    x = _coords(values) - 0.5
    return float(np.sum(10.0 ** (6.0 * np.arange(DIM) / (DIM - 1)) * x**2))


def sphere(values: dict[str, float]) -> float:
    return float(np.sum((_coords(values) - 0.7) ** 2))


OBJECTIVES: dict[str, Callable[[dict[str, float]], float]] = {
    "rosenbrock": rosenbrock, "ellipsoid": ellipsoid, "sphere": sphere,
}


def default_lookahead(workers: int, popsize: int = POP) -> int:
    """evomerge's default, as ``search.py`` computes it for a run with ``workers`` workers."""
    from evomerge.search import default_lookahead as rule

    return rule(workers, popsize)


def simulate(
    folder: Path, *, lookahead: int, workers: int, cv: float, trials: int, seed: int,
    objective: Callable[[dict[str, float]], float] = rosenbrock, timing_seed: int | None = None,
    cma_update: str = "generations", toy: ToyWorld | None = None,
) -> Run:
    """Run the driver against simulated workers; with ``toy``, the toy world's driver (hand-set
    trials first) and each candidate scored for real instead of ``objective``."""
    name = f"la{lookahead}-w{workers}-cv{cv}-s{seed}-{cma_update}-{len(list(folder.iterdir()))}"
    if toy is None:
        store, driver = _synthetic(folder, name, lookahead=lookahead, seed=seed, cma_update=cma_update)

        def score(values: dict[str, float]) -> tuple[dict[str, float], float]:
            f = -objective(values)
            return {"score": f}, f
    else:
        store, driver = toy.open(folder, name, lookahead=lookahead, seed=seed, cma_update=cma_update)
        score = toy.score
    rng = np.random.default_rng(1000 + (seed if timing_seed is None else timing_seed))
    sigma = np.sqrt(np.log(1 + cv**2))
    running: list[tuple[float, int, dict[str, float]]] = []  # (finish time, trial number, values)
    now = busy = 0.0
    asked = 0
    first_own: float | None = None  # when the driver's first own candidate went out
    spans: list[tuple[float, float]] = []  # (start, finish) of every evaluation
    best, best_values, curve, finished = -float("inf"), None, [], []
    means = [np.array(driver.state_dict()["mean"])] if toy is None else []
    while len(curve) < trials:
        while len(running) < workers and asked < trials:
            proposal = driver.ask()
            if proposal is None:
                break  # the worker stays idle until something finishes
            duration = float(rng.lognormal(-sigma**2 / 2, sigma))
            if not proposal.hand_set and first_own is None:
                first_own = now  # the driver's first candidate: the hand-set barrier (if any) is over
            busy += duration
            spans.append((now, now + duration))
            heapq.heappush(running, (now + duration, proposal.number, dict(proposal.values)))
            asked += 1
        now, number, values = heapq.heappop(running)
        objectives, value = score(values)
        generation = getattr(driver, "generation", None)  # the hand-set wrapper has none
        driver.tell(number, objectives, failed_reason=None if objectives else "the evaluator failed")
        if generation is not None and driver.generation != generation:
            means.append(np.array(driver.state_dict()["mean"]))
        if value > best:
            best, best_values = value, values
        curve.append(best)
        finished.append(now)
    store.close()
    shutil.rmtree(store.path, ignore_errors=True)
    last_ask = max(start for start, _ in spans)  # after it the budget is out and workers drain
    return Run(busy / (workers * now), curve, finished, step_cosine(means), best_values,
               _busy_between(spans, workers, 0.0, last_ask), _busy_between(spans, workers, first_own or 0.0, last_ask))


def _busy_between(spans: list[tuple[float, float]], workers: int, t0: float, t1: float) -> float:
    """The workers' busy share of the interval [t0, t1] (1.0 for an empty interval)."""
    if t1 <= t0:
        return 1.0
    return sum(max(0.0, min(end, t1) - max(begin, t0)) for begin, end in spans) / (workers * (t1 - t0))


def _synthetic(folder: Path, name: str, *, lookahead: int, seed: int, cma_update: str) -> tuple:
    """A run store and the CMA driver over the synthetic objectives' 12-D unit cube."""
    from optuna.distributions import FloatDistribution

    from evomerge.drivers import make_driver
    from evomerge.objectives import ObjectiveSpec
    from evomerge.store import RunStore

    store = RunStore.create(folder, name, "bench: 1\n", "h",
                            directions={"score": "maximize"}, pareto_interval_s=3600)
    dists = {f"x{i}": FloatDistribution(0.0, 1.0) for i in range(DIM)}
    driver = make_driver("cma", store, distributions=dists, objectives=[ObjectiveSpec("score", "maximize")],
                         seed=seed, popsize=POP, sigma0=0.25, dim=DIM, lookahead=lookahead, cma_update=cma_update,
                         from_unit=lambda x: {f"x{i}": float(v) for i, v in enumerate(x)})
    return store, driver


class ToyWorld:
    """``search_spaces/toy_ties.yaml`` as shipped (its ``evaluation.items``, ``sigma0``, hand-set
    trials first, then CMA from the best) but with ``population`` and ``items`` when given, its
    driver built as ``evomerge search`` builds it, each candidate decoded and scored by the
    worker's evaluator in this process. Scores are kept by recipe: the generational and lookahead
    runs propose the same candidates at every timing, so only their first setting pays for
    evaluation."""

    def __init__(self, trials: int, items: int | None = None, *, population: int = POP, hand_set: bool = True) -> None:
        import sys

        import yaml

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_cma_lookahead_toy import ROOT, space
        from bench_fitness import HeldOut

        from evomerge.prepare import prepare, worker_spec
        from evomerge.space_config import parse_space_config
        from evomerge.worker import CandidateEvaluator

        os.chdir(ROOT)  # the space file's eval_tasks/ is relative to the repository
        shipped = yaml.safe_load((ROOT / "search_spaces" / "toy_ties.yaml").read_text())
        self.data = space("bench-cma-async-toy", 0, 0, trials)  # models, in-process pool; items/sigma0 reset below
        self.data["search"].update(population=population, sigma0=shipped["search"]["sigma0"])
        self.data["search"].pop("lookahead", None)
        self.data["search"]["hand_set"] = hand_set
        self.data["evaluation"]["items"] = shipped["evaluation"]["items"] if items is None else items
        self.parse = parse_space_config
        self.prepared = prepare(parse_space_config(self.data, default_name=self.data["name"]))
        self.evaluator = CandidateEvaluator(worker_spec(self.prepared))
        self.held_out = HeldOut(self.prepared.config)
        self.scores: dict[str, tuple[dict[str, float] | None, float]] = {}
        self.evaluations = 0

    def open(self, folder: Path, name: str, *, lookahead: int, seed: int, cma_update: str) -> tuple:
        import dataclasses

        from evomerge.search import build_driver, open_store

        data = {**self.data, "name": name, "search": {**self.data["search"], "seed": seed, "cma_update": cma_update}}
        if cma_update != "window":
            data["search"]["lookahead"] = lookahead
        config = self.parse(data, default_name=name)
        store = open_store(config, folder)
        return store, build_driver(dataclasses.replace(self.prepared, config=config), store)

    def recipe(self, values: dict[str, float]) -> str:
        return self.prepared.space.decode(values).to_json()

    def score(self, values: dict[str, float]) -> tuple[dict[str, float] | None, float]:
        """The trial's objectives and the sum of its search-item accuracies."""
        recipe = self.recipe(values)
        if recipe not in self.scores:
            with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's progress bars
                result = self.evaluator.evaluate(recipe)
            objectives = result.objectives
            total = sum(v for k, v in objectives.items() if k.startswith("task:")) if objectives else -float("inf")
            self.scores[recipe] = (objectives, total)
            self.evaluations += 1
        return self.scores[recipe]


def step_cosine(means: list[np.ndarray]) -> float:
    """Mean cosine between consecutive steps of pycma's mean: near 0 for a search that turns
    freely, near -1 for a mean that steps back and forth."""
    if len(means) < 3:
        return float("nan")
    steps = np.diff(np.array(means), axis=0)
    steps = steps[np.linalg.norm(steps, axis=1) > 0]
    cosines = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in pairwise(steps)]
    return float(np.mean(cosines)) if cosines else float("nan")


def compare_runs(runs: list[Path]) -> None:
    """Utilisation and best score per trial of finished real runs."""
    import optuna
    import yaml

    from evomerge.store import RunStore

    rows = {}
    for run in runs:
        space = yaml.safe_load((run / "space.yaml").read_text())
        workers = int(space.get("workers", {}).get("count", 1))
        weights = {f"task:{o['task']}/{o.get('metric', 'acc')}" if "task" in o else o["measure"]:
                   (1 if o.get("direction", "maximize") == "maximize" else -1) * float(o.get("weight", 1.0))
                   for o in space["objectives"]}
        store = RunStore.open(run)
        name = store.study_name
        store.close()
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{(run / 'trials.db').resolve()}")
        done = sorted((t for t in study.get_trials(deepcopy=False) if t.datetime_complete is not None
                       and t.user_attrs.get("fail_kind") != "interrupted"), key=lambda t: t.datetime_complete)
        busy = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done)
        span = (done[-1].datetime_complete - min(t.datetime_start for t in done)).total_seconds()
        best, curve = -float("inf"), []
        for t in done:
            if t.state == optuna.trial.TrialState.COMPLETE:
                best = max(best, sum(w * t.user_attrs["objectives"][k] for k, w in weights.items()))
            curve.append(best)
        lookahead = next((t.user_attrs.get("lookahead", 0) for t in done), 0)
        rows[run.name] = (workers, lookahead, busy / (workers * span), span, curve)
    marks = [m for m in (8, 16, 24, 32, 48, 64, 96) if all(m <= len(r[4]) for r in rows.values())]
    print("| run | workers | lookahead | utilisation | search wall s | " + " | ".join(f"best after {m}" for m in marks) + " |")
    print("|---|---|---|---|---|" + "---|" * len(marks))
    for name, (workers, lookahead, used, span, curve) in rows.items():
        print(f"| {name} | {workers} | {lookahead} | {used:.1%} | {span:.0f} | "
              + " | ".join(f"{curve[m - 1]:.3f}" for m in marks) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, help="trials per run (default 960; with --toy 96)")
    parser.add_argument("--seeds", type=int, default=5, help="CMA seeds (and timing seeds) per median")
    parser.add_argument("--runs", type=Path, nargs="+", help="compare these finished run folders instead")
    parser.add_argument("--window", action="store_true",
                        help="measure search.cma_update: window against the generational loop instead")
    parser.add_argument("--toy", action="store_true",
                        help="the generational loop, the default lookahead and the window on the toy world "
                             "(search_spaces/toy_ties.yaml, population 16), each candidate scored for real")
    parser.add_argument("--items", type=int, help="with --toy: search items per task (default: the shipped space's)")
    parser.add_argument("--population", type=int, default=POP,
                        help=f"with --toy: CMA population (default {POP}, the issue's; the shipped space has 8)")
    parser.add_argument("--lookahead", action="store_true", help="with --toy: also the default lookahead")
    parser.add_argument("--jobs", type=int, default=1, help="with --toy: seeds run in this many processes")
    parser.add_argument("--save", type=Path,
                        help="with --toy: keep each seed's results in this file and skip the seeds it holds")
    parser.add_argument("--barrier", action="store_true",
                        help="what the hand-set barrier costs and what a best-so-far start would buy (timing only)")
    parser.add_argument("--hand-set", type=int, default=4, help="with --barrier: hand-set trials (the toy world's 4)")
    parser.add_argument("--no-hand-set", action="store_true",
                        help="with --toy: CMA from the first trial (search.hand_set: false), no hand-set barrier")
    args = parser.parse_args()
    args.trials = args.trials or (96 if args.toy else 960)
    if args.runs:
        compare_runs(args.runs)
        return
    if args.barrier:
        barrier_table(args.hand_set)
        return
    if args.toy:
        toy_table(args.trials, args.seeds, args.items, population=args.population, hand_set=not args.no_hand_set,
                  lookahead=args.lookahead, jobs=args.jobs, save=args.save)
        return
    logging.getLogger("evomerge").setLevel(logging.ERROR)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = Path(tempfile.mkdtemp(prefix="evomerge-cma-async-"))
    try:
        if args.window:
            window_table(folder, args.trials, args.seeds)
            return
        used = utilisation(folder, args.trials, args.seeds)
        needed = sorted({0} | {a for row in used.values() for a in row.picks()})
        curves = quality_curves(folder, needed, args.trials, args.seeds)
        print_summary(used, curves, args.trials, args.seeds)
        print_details(curves, args.trials, args.seeds)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def window_table(folder: Path, trials: int, seeds: int) -> None:
    """``search.cma_update: window`` on the real driver and store, per (workers, cv): its
    candidates depend on arrival order, so each setting has its own per-trial curves (CMA seed s
    with timing seed s), against the generational loop's (lookahead 0) on the same seeds."""
    marks = marks_for(trials)
    print(f"search.cma_update: window against the generational loop; population {POP}, {trials} trials, {DIM}-D, "
          f"{seeds} seeds; per trial: worst / median over {', '.join(OBJECTIVES)} and n in {marks} of the median "
          "distance to the optimum after n trials over the generational loop's (<= 1: no worse)\n")
    print("| workers | cv | generational: utilisation | window: utilisation | window: per trial, worst / median |")
    print("|---|---|---|---|---|")
    for workers in (8, 16):
        for cv in (0.3, 0.6):
            runs = {update: {name: [simulate(folder, lookahead=0, workers=workers, cv=cv, trials=trials, seed=s,
                                             objective=objective, timing_seed=s, cma_update=update)
                                    for s in range(seeds)] for name, objective in OBJECTIVES.items()}
                    for update in ("generations", "window")}
            ratios = [statistics.median(-r.curve[m - 1] for r in runs["window"][name])
                      / statistics.median(-r.curve[m - 1] for r in runs["generations"][name])
                      for name in OBJECTIVES for m in marks]
            used = {u: statistics.median(r.utilisation for r in runs[u]["sphere"]) for u in runs}
            print(f"| {workers} | {cv} | {used['generations']:.1%} | {used['window']:.1%} | "
                  f"{max(ratios):.3g} / {statistics.median(ratios):.2f} |", flush=True)


TOY_MARKS = (16, 32, 48, 64, 96)
TOY_SETTINGS = tuple((w, cv) for w in (8, 16) for cv in (0.3, 0.6))


class ToyJob(NamedTuple):
    seed: int
    trials: int
    items: int | None
    population: int
    hand_set: bool
    lookahead: bool  # also the default lookahead's runs
    one_thread: bool  # torch on one thread (several jobs side by side)


class ToyResult(NamedTuple):
    seed: int
    workers: int
    cv: float
    scheme: str
    run: Run
    held_out: float  # the held-out mean accuracy of the run's final best trial


def toy_schemes(population: int, lookahead: bool) -> dict[str, tuple[int, str]]:
    """label -> (lookahead, cma_update) of the schemes compared on the toy world."""
    schemes = {"generational": (0, "generations")}
    if lookahead:
        assert default_lookahead(8, population) == default_lookahead(16, population), "one lookahead row"
        schemes[f"lookahead {default_lookahead(8, population)}"] = (default_lookahead(8, population), "generations")
    schemes["window"] = (0, "window")
    return schemes


def barrier_table(hand_set: int, draws: int = 20000) -> None:
    """The hand-set barrier's idle time and a best-so-far start's orphans (module docstring)."""
    print(f"{hand_set} hand-set trials, every one started at time 0, log-normal times of mean 1; means over {draws} "
          "draws; orphans / useful: candidates a best-so-far start would hand out before the barrier lifts, drawn "
          "around a start that lost / around the final one\n")
    print("| workers | cv | idle worker-time at the barrier | share of a 96-trial run | share of a 1000-trial run "
          "| first result, of the barrier's length | best-so-far start: orphans | useful |")
    print("|---|---|---|---|---|---|---|---|")
    for workers, cv in TOY_SETTINGS:
        sigma = np.sqrt(np.log(1 + cv**2))
        rng = np.random.default_rng(0)
        idle = orphans = useful = first = 0.0
        for _ in range(draws):
            times = rng.lognormal(-sigma**2 / 2, sigma, hand_set)
            t_best, t_all = times[0], times.max()  # which one is the best does not matter: equal timing
            idle += (workers - hand_set) * t_all + float(np.sum(t_all - times))
            first += times.min() / t_all
            for t in [times.min()] * (workers - hand_set) + list(times):  # when each worker is free
                while t < t_all:
                    orphans += t < t_best
                    useful += t >= t_best
                    t += float(rng.lognormal(-sigma**2 / 2, sigma))
        idle, orphans, useful, first = idle / draws, orphans / draws, useful / draws, first / draws
        print(f"| {workers} | {cv} | {idle:.1f} | {idle / (idle + 96):.1%} | {idle / (idle + 1000):.1%} | "
              f"{first:.0%} | {orphans:.1f} | {useful:.1f} |")


def toy_seed(job: ToyJob) -> tuple[list[ToyResult], int]:
    """Every setting and scheme for one seed (CMA seed s, timing seed s), in a process of its own
    when ``--jobs`` > 1; the per-recipe score cache is shared by the settings of that seed."""
    import optuna

    logging.getLogger("evomerge").setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if job.one_thread:
        import torch

        torch.set_num_threads(1)  # processes side by side: torch's default of every core oversubscribes them
    folder = Path(tempfile.mkdtemp(prefix="evomerge-cma-async-"))
    try:
        toy = ToyWorld(job.trials, job.items, population=job.population, hand_set=job.hand_set)
        results = []
        for workers, cv in TOY_SETTINGS:
            for label, (a, update) in toy_schemes(job.population, job.lookahead).items():
                run = simulate(folder, lookahead=a, workers=workers, cv=cv, trials=job.trials, seed=job.seed,
                               timing_seed=job.seed, cma_update=update, toy=toy)
                results.append(ToyResult(job.seed, workers, cv, label, run._replace(finished=[]),
                                         toy.held_out(toy.recipe(run.best))))
        return results, toy.evaluations
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _save_seed(path: Path, key: dict, rows: list[ToyResult]) -> None:
    """Append one seed's results to ``path`` (JSON lines), so a long run can stop and go on."""
    import json

    with path.open("a") as out:
        for r in rows:
            out.write(json.dumps({**key, **r._replace(run=r.run._asdict())._asdict()}) + "\n")


def _load_seeds(path: Path, key: dict) -> dict[int, list[ToyResult]]:
    """The seeds ``path`` already holds for these settings (complete seeds only)."""
    import json

    if not path.is_file():
        return {}
    by_seed: dict[int, list[ToyResult]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if any(row.pop(k) != v for k, v in key.items()):
            continue
        row["run"] = Run(**row["run"])
        by_seed.setdefault(row["seed"], []).append(ToyResult(**row))
    expected = len(TOY_SETTINGS) * len(toy_schemes(key["population"], key["lookahead"]))
    return {s: rows for s, rows in by_seed.items() if len(rows) == expected}


def _spread(values: list[float], digits: int = 3) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def _paired(diffs: list[float]) -> str:
    """Mean of the per-seed differences, how many seeds are above / level / below, and the exact
    two-sided sign-flip p-value of the mean (every one of the 2^n sign patterns up to 20 seeds, 2^20 drawn beyond; a small p: a gap
    the seeds' noise does not explain)."""
    n = len(diffs)
    mean = sum(diffs) / n
    above, level = sum(d > 1e-9 for d in diffs), sum(abs(d) <= 1e-9 for d in diffs)
    if n <= 20:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(np.int8)  # every sign pattern
    else:  # too many to list: 2^20 drawn at random
        signs = np.random.default_rng(0).choice(np.array([-1, 1], dtype=np.int8), size=(2**20, n))
    extreme = int(np.sum(np.abs(signs @ np.array(diffs)) >= abs(sum(diffs)) - 1e-9))
    return f"{_signed(mean)} ({above}/{level}/{n - above - level}, p {extreme / len(signs):.2f})"


def _signed(value: float) -> str:
    """``+0.005``, with a float's rounding noise around zero shown as ``+0.000``, not ``-0.000``."""
    return f"{round(value, 3) + 0.0:+.3f}"


def toy_table(trials: int, seeds: int, items: int | None, *, population: int = POP, hand_set: bool = True,
              lookahead: bool = False, jobs: int = 1, save: Path | None = None) -> None:
    """The schemes on the toy world, per (workers, cv): CMA seed s with timing seed s; per
    scheme the utilisation and, over seeds, the median [min, max] of the best sum of the two
    search-item accuracies after n finished trials and of the held-out mean of the final best;
    then window minus generational seed by seed (paired: the same seed, hence the same hand-set
    start and the same CMA stream until results differ)."""
    import sys
    import time
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    start = time.perf_counter()
    marks = [m for m in TOY_MARKS if m < trials] + [trials]
    key = {"trials": trials, "items": items, "population": population, "hand_set": hand_set, "lookahead": lookahead}
    done = _load_seeds(save, key) if save else {}
    job_list = [ToyJob(s, trials, items, population, hand_set, lookahead, jobs > 1) for s in range(seeds) if s not in done]
    results: list[ToyResult] = [r for s in range(seeds) for r in done.get(s, [])]
    evaluations = 0

    def keep(rows: list[ToyResult], n: int) -> None:
        nonlocal evaluations
        results.extend(rows)
        evaluations += n
        if save:
            _save_seed(save, key, rows)
        print(f"seed {rows[0].seed} done, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            for future in as_completed([pool.submit(toy_seed, job) for job in job_list]):
                keep(*future.result())
    else:
        for job in job_list:
            keep(*toy_seed(job))
    import yaml

    shipped = yaml.safe_load((Path(__file__).resolve().parent.parent / "search_spaces" / "toy_ties.yaml").read_text())
    items = shipped["evaluation"]["items"] if items is None else items
    print(f"toy world: search_spaces/toy_ties.yaml, population {population}, sigma0 {shipped['search']['sigma0']}, "
          f"{'hand-set trials first' if hand_set else 'no hand-set trials'}, {items} search items per task, "
          f"{trials} trials, {seeds} seeds (CMA seed s, timing seed s); utilisation: busy / (workers x makespan), "
          f"the same until the last ask (what is left is the drain at the budget's end, {trials} trials being only "
          f"{trials // 16}-{trials // 8} per worker) and from the driver's first candidate to the last ask (what is "
          "left is the scheme's own idling: the hand-set barrier is before it); best after n: median [min, max] "
          "over seeds of the best sum of the two search-item accuracies after n finished trials; held-out: median "
          "[min, max] of the final best trial's held-out mean accuracy\n", flush=True)
    by = {(r.workers, r.cv, r.scheme, r.seed): r for r in results}
    schemes = list(toy_schemes(population, lookahead))
    print("| workers | cv | scheme | utilisation | until the last ask | from CMA's first candidate | "
          + " | ".join(f"best after {m}" for m in marks) + " | held-out mean |")
    print("|---|---|---|---|---|---|" + "---|" * len(marks) + "---|")
    for workers, cv in TOY_SETTINGS:
        for label in schemes:
            rs = [by[(workers, cv, label, s)] for s in range(seeds)]
            used = [f"{statistics.median(getattr(r.run, field) for r in rs):.1%}"
                    for field in ("utilisation", "handing_out", "after_start")]
            cells = [_spread([r.run.curve[m - 1] for r in rs]) for m in marks]
            print(f"| {workers} | {cv} | {label} | " + " | ".join(used + cells)
                  + f" | {_spread([r.held_out for r in rs])} |")
    print(f"\nwindow minus generational, paired by seed: mean difference (seeds above / level / below, sign-flip "
          f"p over {'the ' + str(2**seeds) if seeds <= 20 else '2^20 random'} sign patterns); one item on one task is {1 / items:.3f} of the sum\n")
    print("| workers | cv | " + " | ".join(f"best after {m}" for m in marks) + " | held-out mean |")
    print("|---|---|" + "---|" * len(marks) + "---|")
    diff = {}
    for workers, cv in TOY_SETTINGS:
        pairs = [(by[(workers, cv, "window", s)], by[(workers, cv, "generational", s)]) for s in range(seeds)]
        cells = [_paired([w.run.curve[m - 1] - g.run.curve[m - 1] for w, g in pairs]) for m in marks]
        diff[(workers, cv)] = ([w.run.curve[-1] - g.run.curve[-1] for w, g in pairs],
                               [w.held_out - g.held_out for w, g in pairs])
        print(f"| {workers} | {cv} | " + " | ".join(cells) + f" | {_paired(diff[(workers, cv)][1])} |")
    print(f"\nper seed, window minus generational: best after {trials} / held-out mean\n")
    print("| seed | " + " | ".join(f"{w} workers, cv {cv}" for w, cv in TOY_SETTINGS) + " |")
    print("|---|" + "---|" * len(TOY_SETTINGS))
    for s in range(seeds):
        print(f"| {s} | " + " | ".join(f"{_signed(diff[k][0][s])} / {_signed(diff[k][1][s])}" for k in TOY_SETTINGS) + " |")
    print(f"\n{evaluations} candidates evaluated, {time.perf_counter() - start:.0f} s in all ({jobs} processes)")


class Setting:
    """One (workers, cv): median utilisation per lookahead measured, and which lookaheads to show."""

    def __init__(self, workers: int, cv: float) -> None:
        self.workers, self.cv = workers, cv
        self.used: dict[int, float] = {}
        self.default = default_lookahead(workers)

    def smallest_busy(self) -> int | None:
        """The smallest lookahead measured that keeps the workers at least 95% busy."""
        return next((a for a in sorted(self.used) if self.used[a] >= 0.95), None)

    def busiest(self) -> int:
        """The smallest lookahead reaching 95%, else the largest measured."""
        busy = self.smallest_busy()
        return max(self.used) if busy is None else busy

    def picks(self) -> list[int]:
        return [0, self.default, self.busiest()]


def utilisation(folder: Path, trials: int, seeds: int) -> dict[tuple[int, float], Setting]:
    """Median utilisation over timing seeds, for lookahead 0, the default, and increasing
    lookaheads until one reaches 95% (utilisation does not depend on the objective)."""
    settings = {}
    for workers in (8, 16):
        for cv in (0.3, 0.6):
            row = Setting(workers, cv)
            for a in sorted({0, row.default, *LOOKAHEADS}):
                if a > row.default and row.smallest_busy() is not None:
                    break
                row.used[a] = statistics.median(
                    simulate(folder, lookahead=a, workers=workers, cv=cv, trials=trials, seed=0,
                             objective=sphere, timing_seed=s).utilisation
                    for s in range(seeds))
            settings[(workers, cv)] = row
    return settings


Curves = dict[tuple[int, str], list[Run]]  # (lookahead, objective) -> one run per seed


def quality_curves(folder: Path, lookaheads: list[int], trials: int, seeds: int) -> Curves:
    workers, cv = QUALITY_TIMING
    curves: Curves = {}
    for a in lookaheads:
        for name, objective in OBJECTIVES.items():
            curves[(a, name)] = [
                simulate(folder, lookahead=a, workers=workers, cv=cv, trials=trials, seed=s, objective=objective)
                for s in range(seeds)
            ]
    return curves


def per_trial_ratios(curves: Curves, lookahead: int, trials: int) -> dict[tuple[str, int], float]:
    """(objective, trials) -> the lookahead's median distance to the optimum over the generational one's."""
    ratios = {}
    for name in OBJECTIVES:
        for m in marks_for(trials):
            ahead = statistics.median(-r.curve[m - 1] for r in curves[(lookahead, name)])
            gen = statistics.median(-r.curve[m - 1] for r in curves[(0, name)])
            ratios[(name, m)] = ahead / gen if gen > 0 else float("nan")
    return ratios


def equal_time_ratios(curves: Curves, lookahead: int, trials: int) -> dict[tuple[str, int], float]:
    """The same, at the simulated time the generational run finished n trials."""

    def best_by(run: Run, t: float) -> float:
        done = [b for b, f in zip(run.curve, run.finished) if f <= t]
        return -done[-1] if done else float("inf")

    ratios = {}
    for name in OBJECTIVES:
        gens, aheads = curves[(0, name)], curves[(lookahead, name)]
        for m in (m for m in marks_for(trials) if m < trials):  # at ``trials`` the lookahead's run has stopped too
            gen = statistics.median(-g.curve[m - 1] for g in gens)
            ahead = statistics.median(best_by(a, g.finished[m - 1]) for a, g in zip(aheads, gens))
            ratios[(name, m)] = ahead / gen if gen > 0 else float("nan")
    return ratios


def _worst_and_median(ratios: dict[tuple[str, int], float]) -> str:
    values = list(ratios.values())
    return f"{max(values):.2f} / {statistics.median(values):.2f}"


def print_summary(settings: dict[tuple[int, float], Setting], curves: Curves, trials: int, seeds: int) -> None:
    print(f"population {POP}, {trials} trials, {DIM}-D; utilisation: median over {seeds} timing seeds; "
          f"per trial: median over {seeds} CMA seeds of the distance to the optimum after n trials "
          f"(n in {marks_for(trials)}), over the generational loop's, for "
          f"{', '.join(OBJECTIVES)}: worst / median of those ratios (at most 1: no worse per trial)\n")
    print("| workers | cv | generational: utilisation | default lookahead | utilisation | per trial, worst / median "
          "| smallest lookahead busy 95% | utilisation | per trial, worst / median |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (workers, cv), row in settings.items():
        busy = row.busiest()
        cells = [f"{workers}", f"{cv}", f"{row.used[0]:.1%}", f"{row.default}", f"{row.used[row.default]:.1%}",
                 _worst_and_median(per_trial_ratios(curves, row.default, trials)) if row.default else "1.00 / 1.00"]
        cells += [f"{busy}" + ("" if row.used[busy] >= 0.95 else " (the largest measured)"), f"{row.used[busy]:.1%}",
                  _worst_and_median(per_trial_ratios(curves, busy, trials)) if busy else "1.00 / 1.00"]
        print("| " + " | ".join(cells) + " |")


def print_details(curves: Curves, trials: int, seeds: int) -> None:
    lookaheads = sorted({a for a, _ in curves} - {0})
    marks = marks_for(trials)
    workers, cv = QUALITY_TIMING
    at_equal_time = f"at equal simulated time ({workers} workers, cv {cv}; n: the generational run's trials)"
    for title, ratio in (("per trial", per_trial_ratios), (at_equal_time, equal_time_ratios)):
        print(f"\n{title}: median distance to the optimum, lookahead over generational ({seeds} seeds; below 1 is better)")
        print("| objective | trials | generational | " + " | ".join(f"lookahead {a}" for a in lookaheads) + " |")
        print("|---|---|---|" + "---|" * len(lookaheads))
        table = {a: ratio(curves, a, trials) for a in lookaheads}
        for name in OBJECTIVES:
            for m in (m for m in marks if (name, m) in table[lookaheads[0]]):
                gen = statistics.median(-r.curve[m - 1] for r in curves[(0, name)])
                print(f"| {name} | {m} | {gen:.3g} | " + " | ".join(f"{table[a][(name, m)]:.2f}" for a in lookaheads) + " |")
    print(f"\nwhy: mean cosine between consecutive steps of pycma's mean, median over {seeds} seeds "
          "(near -1: the mean steps back and forth between two interleaved chains)")
    print("| objective | generational | " + " | ".join(f"lookahead {a}" for a in lookaheads) + " |")
    print("|---|---|" + "---|" * len(lookaheads))
    for name in OBJECTIVES:
        print(f"| {name} | " + " | ".join(f"{statistics.median(r.step_cosine for r in curves[(a, name)]):.2f}"
                                         for a in [0, *lookaheads]) + " |")


if __name__ == "__main__":
    main()
