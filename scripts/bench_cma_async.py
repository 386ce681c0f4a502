"""Idle workers at CMA-ES generation ends: the generational scheme against the lookahead.

    python scripts/bench_cma_async.py [--trials 960] [--seeds 3]

A discrete-event simulation over the real CMA driver and the real run store (SQLite in a
temporary folder): ``W`` simulated workers, each taking the next candidate the moment it is free;
evaluation times are log-normal with mean 1 and coefficient of variation ``cv``; population 16.
Results are told to the driver in the order they finish. The objective is the Rosenbrock function
in 12 dimensions (each coordinate of the unit cube mapped to [-2, 2]; score = -f, maximised).

For W in (8, 16) and cv in (0.3, 0.6) it prints the workers' utilisation (busy time / (W x
makespan); goal at least 95%) for the generational scheme (lookahead 0), the lookahead evomerge
uses by default (2 W candidates, at most one population), 2 W and 3 W. Candidates do not depend on evaluation times (only on
the seed and the results), so the best score reached per trial depends on the lookahead alone: it
prints the median best score over ``--seeds`` seeds at a few trial counts for lookahead 0, 16, 32
and 48 (8 workers, cv 0.6), then the same at equal simulated time (what a user waiting for the
search sees), and the ratio of the lookahead's median distance to the optimum (-score) to the generational
one's (at most 1: no worse than generational).

    python scripts/bench_cma_async.py --runs runs/toy_gen runs/toy_ahead

reads real runs instead (for instance ``search_spaces/toy_ties.yaml`` with ``search.lookahead: 0``
and without) and prints, for each, the workers' utilisation (the trials' time on workers over
workers x the span from the first start to the last finish) and the best weighted objective sum
reached after n finished trials.
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


def simulate(
    folder: Path, *, lookahead: int, workers: int, cv: float, trials: int, seed: int
) -> tuple[float, list[float], list[float]]:
    """Run the driver against simulated workers; returns (utilisation, best score after each
    finished trial, the simulated time each trial finished at)."""
    from optuna.distributions import FloatDistribution

    from evomerge.drivers import make_driver
    from evomerge.objectives import ObjectiveSpec
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
    best, curve, finished = -float("inf"), [], []
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
        finished.append(now)
    store.close()
    return busy / (workers * now), curve, finished


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
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8, help="workers for the quality comparison")
    parser.add_argument("--cv", type=float, default=0.6, help="coefficient of variation for the quality comparison")
    parser.add_argument("--skip-utilisation", action="store_true")
    parser.add_argument("--runs", type=Path, nargs="+", help="compare these finished run folders instead")
    args = parser.parse_args()
    if args.runs:
        compare_runs(args.runs)
        return
    logging.getLogger("evomerge").setLevel(logging.ERROR)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = Path(tempfile.mkdtemp(prefix="evomerge-cma-async-"))
    try:
        if not args.skip_utilisation:
            utilisation(folder, args.trials)
        quality(folder, args.trials, args.seeds, args.workers, args.cv)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def utilisation(folder: Path, trials: int) -> None:
    print(f"utilisation, population {POP}, {trials} trials, Rosenbrock {DIM}-D (seed 0)")
    print("| workers | cv | generational (lookahead 0) | lookahead min(2W, 16) (default) | lookahead 2W "
          "| lookahead 3W | goal |")
    print("|---|---|---|---|---|---|---|")
    for workers in (8, 16):
        for cv in (0.3, 0.6):
            used = [simulate(folder, lookahead=a, workers=workers, cv=cv, trials=trials, seed=0)[0]
                    for a in (0, min(2 * workers, POP), 2 * workers, 3 * workers)]
            print(f"| {workers} | {cv} | " + " | ".join(f"{u:.1%}" for u in used) + " | 95% |")


def quality(folder: Path, trials: int, seeds: int, workers: int, cv: float) -> None:
    marks = [m for m in (120, 240, 480, 960, 1920) if m <= trials]
    curves: dict[int, list[list[float]]] = {}
    times: dict[int, list[list[float]]] = {}
    for lookahead in (0, 16, 32, 48):
        runs = [simulate(folder, lookahead=lookahead, workers=workers, cv=cv, trials=trials, seed=s)
                for s in range(seeds)]
        curves[lookahead], times[lookahead] = [r[1] for r in runs], [r[2] for r in runs]
    print(f"\nper trial: median best score (-Rosenbrock) over {seeds} seeds after n trials "
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

    def best_by(lookahead: int, seed: int, t: float) -> float:
        done = [b for b, f in zip(curves[lookahead][seed], times[lookahead][seed]) if f <= t]
        return done[-1] if done else -float("inf")

    print(f"\nat equal time, {workers} workers, cv {cv}: median best score when the generational run has "
          "finished n trials")
    print("| generational trials | " + " | ".join(f"lookahead {a}" for a in curves) + " | "
          + " | ".join(f"ratio {a}/0" for a in ahead) + " |")
    print("|---|" + "---|" * (len(curves) + len(ahead)))
    for m in marks:
        med = {a: statistics.median(best_by(a, s, times[0][s][m - 1]) for s in range(seeds)) for a in curves}
        print(f"| {m} | " + " | ".join(f"{med[a]:.3g}" for a in curves) + " | "
              + " | ".join(f"{med[a] / med[0]:.2f}" if med[0] else "nan" for a in ahead) + " |")


if __name__ == "__main__":
    main()
