"""Over-sampling CMA-ES (idle workers evaluate extra candidates of the current generation), measured.

    python scripts/bench_cma_oversampling.py [--trials 960] [--seeds 5]

Issue 10 asks for no idle workers with CMA-ES and the best score per trial no worse than the
generational loop's. The CMA driver keeps workers busy with a fixed-order lookahead
(``scripts/bench_cma_async.py``). This script measures the alternative family before any of it
goes into the driver: while a generation's stragglers run, idle workers evaluate extra candidates
sampled from the *current* distribution (pycma's ``ask`` again, same iteration), so no worker ever
waits. It runs on pycma directly (no store: the same simulation of workers and log-normal times as
``bench_cma_async.py``, the same three objectives, population 16, 12-D, same CMA options as the
driver) and prints, for 8 and 16 workers and cv 0.3 and 0.6, the utilisation and the per-trial
ratios (median over seeds of the distance to the optimum after 120, 240, 480, 960 trials over the
generational loop's; worst / median of the 12; at most 1 is no worse), for these schemes:

- ``all-members``: the generation is told once every one of its ``popsize`` members is back, with
  every extra finished by then (pycma takes more than ``popsize`` solutions: it keeps its ``mu``
  positive weights for the best and pads the negative weights with zeros, ``RecombinationWeights
  .__call__``); extras still running then are injected (``inject(force=True)``) into the next one;
- ``first-k/inject``: told at its ``popsize``-th result (members or extras, whichever come back
  first); those still running are injected into the next generation's tell;
- ``first-k/plain``: the same, late ones told with the next generation as if sampled there;
- ``first-k/drop``: the same, late ones left out of pycma's update (they still count for the best);
- ``half-k/inject``: pycma run with population ``popsize / 2``, told at every ``popsize / 2``-th
  result, late ones injected: what telling twice as often buys (it changes what the population is).

Every scheme's grouping depends on timing, so a driver would have to record it in the trial log
and replay it on resume; the simulation does not need to. On this shared 2-core machine the
default run takes about 5 minutes.
"""

from __future__ import annotations

import argparse
import heapq
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cma_async import DIM, MARKS, OBJECTIVES, POP  # the same objectives

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    import cma
    import cma.utilities.utils

cma.utilities.utils.print_warning = lambda *args, **kwargs: None  # "solutions != popsize": intended here

Key = tuple[int, int]  # (generation, member)


def _strategy(seed: int, popsize: int) -> cma.CMAEvolutionStrategy:
    """The driver's options (its own RNG, bounds, no mirrors)."""
    rng = np.random.default_rng(seed)
    return cma.CMAEvolutionStrategy([0.5] * DIM, 0.25, {
        "bounds": [0.0, 1.0], "popsize": popsize, "randn": lambda *shape: rng.standard_normal(shape),
        "seed": float("nan"), "verbose": -9, "verb_disp": 0, "verb_log": 0, "CMA_mirrors": 0})


class Generational:
    """Today's loop without lookahead: nothing to hand out until the generation is told."""

    def __init__(self, seed: int) -> None:
        self.es = _strategy(seed, POP)
        self._next()

    def _next(self) -> None:
        self.X = [np.asarray(x) for x in self.es.ask()]
        self.pending, self.results = list(range(POP)), {}

    def ask(self) -> tuple[Key, np.ndarray] | None:
        if not self.pending:
            return None
        member = self.pending.pop(0)
        return (0, member), self.X[member]

    def tell(self, key: Key, f: float) -> None:
        self.results[key[1]] = f
        if len(self.results) == POP:
            self.es.tell(self.X, [self.results[m] for m in range(POP)])
            self._next()


class OverSampling:
    """Members first, then extras from the current distribution; see the module docstring."""

    def __init__(self, seed: int, *, rule: str, late: str, popsize: int = POP) -> None:
        self.k, self.rule, self.late = popsize, rule, late
        self.es = _strategy(seed, popsize)
        self.generation = 0
        self.sampled: dict[Key, np.ndarray] = {}
        self.carried: list[tuple[np.ndarray, float]] = []  # late results for the next tell
        self._next([])

    def _next(self, injected: list[tuple[np.ndarray, float]]) -> None:
        if self.late == "inject" and injected:
            self.es.inject([x for x, _ in injected], force=True)
        X = [np.asarray(x) for x in self.es.ask(number=self.k + len(injected) * (self.late == "inject"))]
        self.injected = list(zip(X[: len(X) - self.k], [f for _, f in injected])) if self.late == "inject" else []
        for m, x in enumerate(X[len(X) - self.k:]):
            self.sampled[(self.generation, m)] = x
        self.pending, self.results, self.extras = list(range(self.k)), {}, self.k

    def ask(self) -> tuple[Key, np.ndarray]:
        if self.pending:
            key = (self.generation, self.pending.pop(0))
        else:
            key = (self.generation, self.extras)
            self.extras += 1
            self.sampled[key] = np.asarray(self.es.ask(number=1)[0])
        return key, self.sampled[key]

    def tell(self, key: Key, f: float) -> None:
        x = self.sampled.pop(key)
        if key[0] != self.generation:  # late: its generation was told already
            if self.late != "drop":
                self.carried.append((x, f))
            return
        self.results[key[1]] = (x, f)
        ready = (all(m in self.results for m in range(self.k)) if self.rule == "all-members"
                 else len(self.results) >= self.k)
        if not ready:
            return
        told = [self.results[m] for m in sorted(self.results)] + self.injected
        if self.late == "plain":
            told += self.carried
        self.es.tell([x for x, _ in told], [f for _, f in told])
        self.generation += 1
        injected = self.carried if self.late == "inject" else []
        self.carried = []  # told now (plain) or injected into the next generation's tell
        self._next(injected)


class Window:
    """The driver's ``cma_update: window`` (evomerge.drivers.cma_window) on pycma alone: every
    candidate a fresh sample of the current distribution; every ``popsize // 2`` arrivals pycma is
    told the last ``popsize`` results."""

    def __init__(self, seed: int, popsize: int = POP) -> None:
        self.k, self.step = popsize, max(1, popsize // 2)
        self.es = _strategy(seed, popsize)
        self.sampled: dict[Key, np.ndarray] = {}
        self.window: list[tuple[np.ndarray, float]] = []
        self.count = self.since_tell = 0
        self.asked_since_tell = False

    def ask(self) -> tuple[Key, np.ndarray]:
        key = (0, self.count)
        self.count += 1
        self.sampled[key] = np.asarray(self.es.ask(number=1)[0])
        self.asked_since_tell = True
        return key, self.sampled[key]

    def tell(self, key: Key, f: float) -> None:
        self.window = [*self.window, (self.sampled.pop(key), f)][-self.k:]
        self.since_tell += 1
        if self.since_tell >= self.step and len(self.window) == self.k and self.asked_since_tell:
            self.es.tell([x for x, _ in self.window], [f for _, f in self.window])
            self.since_tell, self.asked_since_tell = 0, False


SCHEMES: dict[str, Callable[[int], object]] = {
    "generational": Generational,
    "all-members/inject": lambda seed: OverSampling(seed, rule="all-members", late="inject"),
    "first-k/inject": lambda seed: OverSampling(seed, rule="first-k", late="inject"),
    "first-k/plain": lambda seed: OverSampling(seed, rule="first-k", late="plain"),
    "first-k/drop": lambda seed: OverSampling(seed, rule="first-k", late="drop"),
    "half-k/inject": lambda seed: OverSampling(seed, rule="first-k", late="inject", popsize=POP // 2),
    "window (chosen)": Window,
}


def simulate(scheme: Callable[[int], object], *, workers: int, cv: float, trials: int, seed: int,
             objective: Callable[[dict[str, float]], float], timing_seed: int) -> tuple[float, list[float]]:
    """(utilisation, best f after each finished trial), as bench_cma_async.simulate measures them."""
    driver = scheme(seed)
    rng = np.random.default_rng(1000 + timing_seed)
    sigma = np.sqrt(np.log(1 + cv**2))
    running: list[tuple[float, int, Key, np.ndarray]] = []
    now = busy = 0.0
    asked, best, curve = 0, float("inf"), []
    while len(curve) < trials:
        while len(running) < workers and asked < trials:
            proposal = driver.ask()
            if proposal is None:
                break
            duration = float(rng.lognormal(-sigma**2 / 2, sigma))
            busy += duration
            heapq.heappush(running, (now + duration, asked, *proposal))
            asked += 1
        now, _, key, x = heapq.heappop(running)
        f = objective({f"x{i}": float(v) for i, v in enumerate(np.clip(x, 0.0, 1.0))})
        driver.tell(key, f)
        best = min(best, f)
        curve.append(best)
    return busy / (workers * now), curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=960)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    marks = [m for m in MARKS if m <= args.trials]
    print(f"population {POP}, {DIM}-D, {args.trials} trials; utilisation: median over {args.seeds} timing seeds; "
          f"per trial: median over {args.seeds} CMA seeds of the distance to the optimum after n in {marks} "
          f"trials over the generational loop's, for {', '.join(OBJECTIVES)}: worst / median (<= 1: no worse)\n")
    print("| workers | cv | " + " | ".join(SCHEMES) + " |")
    print("|---|---|" + "---|" * len(SCHEMES))
    for workers in (8, 16):
        for cv in (0.3, 0.6):
            cells, baseline = [], {}
            for scheme in SCHEMES.values():
                used = statistics.median(
                    simulate(scheme, workers=workers, cv=cv, trials=args.trials, seed=0,
                             objective=OBJECTIVES["sphere"], timing_seed=t)[0] for t in range(args.seeds))
                ratios = []
                for objective_name, objective in OBJECTIVES.items():
                    curves = [simulate(scheme, workers=workers, cv=cv, trials=args.trials, seed=s,
                                       objective=objective, timing_seed=s)[1] for s in range(args.seeds)]
                    for m in marks:
                        median = statistics.median(c[m - 1] for c in curves)
                        baseline.setdefault((objective_name, m), median)
                        ratios.append(median / baseline[(objective_name, m)])
                cells.append(f"{used:.1%}, {max(ratios):.3g} / {statistics.median(ratios):.2f}")
            print(f"| {workers} | {cv} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
