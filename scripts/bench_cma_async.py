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

    python scripts/bench_cma_async.py --runs runs/toy_gen runs/toy_ahead

reads real runs instead and prints, for each, the workers' utilisation (the trials' time on
workers over workers x the span from the first start to the last finish) and the best weighted
objective sum reached after n finished trials. ``scripts/bench_cma_lookahead_toy.py`` runs the
toy-world comparison itself.
"""

from __future__ import annotations

import argparse
import heapq
import logging
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


class Run(NamedTuple):
    utilisation: float
    curve: list[float]  # the best score after each finished trial
    finished: list[float]  # the simulated time each trial finished at
    step_cosine: float  # see step_cosine()


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
    cma_update: str = "generations",
) -> Run:
    """Run the driver against simulated workers."""
    from optuna.distributions import FloatDistribution

    from evomerge.drivers import make_driver
    from evomerge.objectives import ObjectiveSpec
    from evomerge.store import RunStore

    name = f"la{lookahead}-w{workers}-cv{cv}-s{seed}-{len(list(folder.iterdir()))}"
    store = RunStore.create(folder, name, "bench: 1\n", "h",
                            directions={"score": "maximize"}, pareto_interval_s=3600)
    dists = {f"x{i}": FloatDistribution(0.0, 1.0) for i in range(DIM)}
    driver = make_driver("cma", store, distributions=dists, objectives=[ObjectiveSpec("score", "maximize")],
                         seed=seed, popsize=POP, sigma0=0.25, dim=DIM, lookahead=lookahead, cma_update=cma_update,
                         from_unit=lambda x: {f"x{i}": float(v) for i, v in enumerate(x)})
    rng = np.random.default_rng(1000 + (seed if timing_seed is None else timing_seed))
    sigma = np.sqrt(np.log(1 + cv**2))
    running: list[tuple[float, int, dict[str, float]]] = []  # (finish time, trial number, values)
    now = busy = 0.0
    asked = 0
    best, curve, finished = -float("inf"), [], []
    means = [np.array(driver.state_dict()["mean"])]
    while len(curve) < trials:
        while len(running) < workers and asked < trials:
            proposal = driver.ask()
            if proposal is None:
                break  # the worker stays idle until something finishes
            duration = float(rng.lognormal(-sigma**2 / 2, sigma))
            busy += duration
            heapq.heappush(running, (now + duration, proposal.number, dict(proposal.values)))
            asked += 1
        now, number, values = heapq.heappop(running)
        score = -objective(values)
        generation = driver.generation
        driver.tell(number, {"score": score})
        if driver.generation != generation:
            means.append(np.array(driver.state_dict()["mean"]))
        best = max(best, score)
        curve.append(best)
        finished.append(now)
    store.close()
    shutil.rmtree(store.path, ignore_errors=True)
    return Run(busy / (workers * now), curve, finished, step_cosine(means))


def step_cosine(means: list[np.ndarray]) -> float:
    """Mean cosine between consecutive steps of pycma's mean: near 0 for a search that turns
    freely, near -1 for a mean that steps back and forth."""
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
    parser.add_argument("--trials", type=int, default=960)
    parser.add_argument("--seeds", type=int, default=5, help="CMA seeds (and timing seeds) per median")
    parser.add_argument("--runs", type=Path, nargs="+", help="compare these finished run folders instead")
    parser.add_argument("--window", action="store_true",
                        help="measure search.cma_update: window against the generational loop instead")
    args = parser.parse_args()
    if args.runs:
        compare_runs(args.runs)
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
    marks = [m for m in MARKS if m <= trials]
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
        for m in (m for m in MARKS if m <= trials):
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
        for m in (m for m in MARKS if m < trials):  # at ``trials`` the lookahead's run has stopped too
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
          f"(n in {[m for m in MARKS if m <= trials]}), over the generational loop's, for "
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
    marks = [m for m in MARKS if m <= trials]
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
