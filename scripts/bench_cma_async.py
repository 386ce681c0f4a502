"""Idle workers at CMA-ES generation ends: the generational scheme against the lookahead.

    python scripts/bench_cma_async.py [--trials 960] [--seeds 3]

A discrete-event simulation over the real CMA driver and the real run store (SQLite in a
temporary folder): ``W`` simulated workers, each taking the next candidate the moment it is free;
evaluation times are log-normal with mean 1 and coefficient of variation ``cv``; population 16.
Results are told to the driver in the order they finish. The objective is the Rosenbrock function
in 12 dimensions (each coordinate of the unit cube mapped to [-2, 2]; score = -f, maximised).

For W in (8, 16) and cv in (0.3, 0.6) it prints the workers' utilisation (busy time / (W x
makespan); goal at least 95%) for the generational scheme (lookahead 0) and the lookahead
evomerge uses by default (2 W candidates). Candidates do not depend on evaluation times (only on
the seed and the results), so the best score reached per trial depends on the lookahead alone: it
prints the median best score over ``--seeds`` seeds at a few trial counts for lookahead 0, 16 and
32, and the ratio of the lookahead's median distance to the optimum (-score) to the generational
one's (at most 1: no worse than generational).
"""

from __future__ import annotations

import argparse
import heapq
import logging
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np

POP = 16
DIM = 12


def rosenbrock(values: dict[str, float]) -> float:
    x = np.array([values[f"x{i}"] for i in range(DIM)]) * 4.0 - 2.0
    return float(np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2))


def simulate(folder: Path, *, lookahead: int, workers: int, cv: float, trials: int, seed: int) -> tuple[float, list[float]]:
    """Run the driver against simulated workers; returns (utilisation, best score after each trial)."""
    from optuna.distributions import FloatDistribution

    from evomerge.drivers import ObjectiveSpec, make_driver
    from evomerge.store import RunStore

    name = f"la{lookahead}-w{workers}-cv{cv}-s{seed}-{len(list(folder.iterdir()))}"
    store = RunStore.create(folder, name, "bench: 1\n", "h",
                            directions={"score": "maximize"}, pareto_interval_s=3600)
    dists = {f"x{i}": FloatDistribution(0.0, 1.0) for i in range(DIM)}
    driver = make_driver("cma", store, distributions=dists, objectives=[ObjectiveSpec("score", "maximize")],
                         seed=seed, popsize=POP, sigma0=0.25, dim=DIM, lookahead=lookahead,
                         from_unit=lambda x: {f"x{i}": float(v) for i, v in enumerate(x)})
    rng = np.random.default_rng(1000 + seed)
    sigma = np.sqrt(np.log(1 + cv**2))
    running: list[tuple[float, int, dict[str, float]]] = []  # (finish time, trial number, values)
    now = busy = 0.0
    asked = 0
    best, curve = -float("inf"), []
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
        score = -rosenbrock(values)
        driver.tell(number, {"score": score})
        best = max(best, score)
        curve.append(best)
    store.close()
    return busy / (workers * now), curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=960)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("evomerge").setLevel(logging.ERROR)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = Path(tempfile.mkdtemp(prefix="evomerge-cma-async-"))
    try:
        print(f"utilisation, population {POP}, {args.trials} trials, Rosenbrock {DIM}-D (seed 0)")
        print("| workers | cv | generational (lookahead 0) | lookahead 2W (default) | lookahead 3W | goal |")
        print("|---|---|---|---|---|---|")
        for workers in (8, 16):
            for cv in (0.3, 0.6):
                used = [simulate(folder, lookahead=a * workers, workers=workers, cv=cv, trials=args.trials, seed=0)[0]
                        for a in (0, 2, 3)]
                print(f"| {workers} | {cv} | " + " | ".join(f"{u:.1%}" for u in used) + " | 95% |")

        marks = [m for m in (120, 240, 480, 960, 1920) if m <= args.trials]
        curves: dict[int, list[list[float]]] = {}
        for lookahead in (0, 16, 32, 48):
            curves[lookahead] = [simulate(folder, lookahead=lookahead, workers=8, cv=0.3, trials=args.trials, seed=s)[1]
                                 for s in range(args.seeds)]
        print(f"\nmedian best score (-Rosenbrock) over {args.seeds} seeds after n trials "
              "(the same for any worker count or evaluation times: candidates depend on results only)")
        ahead = [a for a in curves if a]
        print("| trials | " + " | ".join(f"lookahead {a}" for a in curves) + " | "
              + " | ".join(f"ratio {a}/0" for a in ahead) + " |")
        print("|---|" + "---|" * (len(curves) + len(ahead)))
        for m in marks:
            med = {a: statistics.median(c[m - 1] for c in cs) for a, cs in curves.items()}
            print(f"| {m} | " + " | ".join(f"{med[a]:.3g}" for a in curves) + " | "
                  + " | ".join(f"{med[a] / med[0]:.2f}" if med[0] else "nan" for a in ahead) + " |")
        print("\n(ratio: lookahead's median distance to the optimum over the generational one's; below 1 is better)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
