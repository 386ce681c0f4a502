"""The search loop's own cost per trial, and the cost of reopening a long run.

    python scripts/bench_loop.py [--trials 10000] [--workers 4] [--driver cma]

A search through the real driver and the real run store (SQLite in a temporary folder) on a real
search space (TIES over two donors, 4 layer groups: 40 coordinates), with an instant in-process
evaluator in place of the workers: 3 objectives (two quantised "accuracies" to maximise, a
distance to minimise) computed from the candidate's values. The loop below makes the calls
``evomerge/search.py``'s loop makes, in its order (count, ask, decode the recipe, annotate it, tell
the result with timings), keeping ``--workers`` candidates out at a time, so what it measures is
what stands between a worker finishing and the next candidate leaving: the driver, the store and
the front.

It prints the loop's time per trial around 1,000 and around ``--trials`` trials (each the mean of
the 500 trials before that mark), where that time goes (driver, store, Optuna's own ``tell`` and
attribute writes), and the time to reopen the finished run as ``evomerge resume`` does (open,
requeue, pareto.json, driver rebuilt by replay), each against its goal: at most 5 ms per trial at
10,000 trials, a reopen under 5 s.
"""

from __future__ import annotations

import argparse
import collections
import functools
import logging
import shutil
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

GOAL_PER_TRIAL_S = 0.005
GOAL_REOPEN_S = 5.0
WINDOW = 500

SPACE = {
    "name": "bench",
    "models": {"base": "m/base", "donors": ["m/arith", "m/reverse"]},
    "merge": {
        "method": "ties",
        "layer_groups": 4,
        "filters": ["self_attn", "mlp"],
        "parameters": {
            "weight": {"range": [0.0, 1.2]},  # 4 groups x 3 filters x 2 donors
            "density": {"range": [0.2, 1.0], "filters": ["self_attn"]},  # 4 groups x 2 filters x 2 donors
            "normalize": False,
            "lambda": 1.0,
        },
    },
    "objectives": [
        {"task": "toy_arith", "metric": "acc", "direction": "maximize"},
        {"task": "toy_reverse", "metric": "acc", "direction": "maximize"},
        {"measure": "l2_from_base", "direction": "minimize"},
    ],
    "search": {"driver": "cma", "budget": 10, "population": 16, "seed": 0},
}


class Clock:
    """Seconds spent per label, per trial window."""

    def __init__(self) -> None:
        self.total: collections.Counter[str] = collections.Counter()

    def timed(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total[label] += time.perf_counter() - t

        return wrapper


def evaluate(values: dict[str, Any]) -> dict[str, float]:
    """Three objectives from the values: instant, deterministic, conflicting."""
    xs = [float(v) for v in values.values() if isinstance(v, (int, float))]
    half = len(xs) // 2
    a = 1.0 - sum((x - 0.7) ** 2 for x in xs[:half]) / half
    b = 1.0 - sum((x - 0.3) ** 2 for x in xs[half:]) / (len(xs) - half)
    return {
        "task:toy_arith/acc": round(64 * max(0.0, a)) / 64,  # 64 items: accuracies tie often
        "task:toy_reverse/acc": round(64 * max(0.0, b)) / 64,
        "l2_from_base": sum(xs),
    }


def build_driver(name: str, store: Any, space: Any, config: Any) -> Any:
    from evomerge.drivers import make_driver
    from evomerge.objectives import ObjectiveSpec

    return make_driver(
        name, store,
        distributions=space.optuna_distributions(),
        objectives=[ObjectiveSpec(o.key, o.direction, o.weight) for o in config.objectives],
        seed=0, popsize=config.search.population, sigma0=0.25,
        x0=space.initial_unit(), dim=space.unit_dimension, from_unit=space.from_unit,
    )


def run_loop(
    store: Any, driver: Any, space: Any, budget: int, workers: int, marks: list[int]
) -> dict[int, tuple[float, float]]:
    """search.py's loop over an instant evaluator; returns the mean loop seconds per trial before
    each mark, wall-clock and CPU (this process's CPU time: what the loop itself spent, whatever
    else the machine runs)."""
    out: deque[tuple[int, Any, float, int | None]] = deque()
    finished_at: list[tuple[float, float]] = []  # cumulative loop (wall, CPU) seconds when each trial was told
    spent = cpu = 0.0
    while True:
        t, c = time.perf_counter(), time.process_time()
        wanted = budget - store.counts().finished - len(out)
        while len(out) < workers and wanted > 0:
            proposal = driver.ask()
            if proposal is None:
                break  # CMA waits for its generation to come back
            recipe_json = space.decode(proposal.values).to_json()
            store.annotate(proposal.number, {"recipe": recipe_json})
            out.append((proposal.number, proposal.values, time.perf_counter(), proposal.generation))
            wanted -= 1
        if not out:
            break
        number, values, started, generation = out.popleft()  # the oldest candidate comes back
        objectives = evaluate(dict(values))
        attrs = {"timings": {"merge_s": 0.0, "eval_s": 0.0, "wall_s": time.perf_counter() - started},
                 "worker": "w0", "attempts": 1}
        if generation is not None:
            attrs["generation"] = generation
        driver.tell(number, objectives, failed_reason=None, attrs=attrs)
        spent += time.perf_counter() - t
        cpu += time.process_time() - c
        finished_at.append((spent, cpu))
    means = {}
    for m in marks:
        if m <= len(finished_at) and m > WINDOW:
            (w1, c1), (w0, c0) = finished_at[m - 1], finished_at[m - 1 - WINDOW]
            means[m] = ((w1 - w0) / WINDOW, (c1 - c0) / WINDOW)
    return means


def reopen(path: Path, driver_name: str, space: Any, config: Any) -> dict[str, float]:
    """What run_search does before its first ask on a reopened run, timed step by step."""
    from evomerge.store import RunStore

    steps: dict[str, float] = {}
    cpu = time.process_time()
    t = time.perf_counter()
    store = RunStore.open(path)
    steps["open"] = time.perf_counter() - t
    t = time.perf_counter()
    store.remove_stale_temp_files()
    store.requeue_interrupted()
    steps["read the log, requeue"] = time.perf_counter() - t
    t = time.perf_counter()
    store.write_pareto()
    steps["front, pareto.json"] = time.perf_counter() - t
    t = time.perf_counter()
    build_driver(driver_name, store, space, config)
    store.counts()
    steps["driver (CMA: replay)"] = time.perf_counter() - t
    store.close()
    steps["CPU, all steps"] = time.process_time() - cpu
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--driver", default="cma")
    args = parser.parse_args()
    logging.getLogger("evomerge").setLevel(logging.ERROR)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from evomerge.space import SearchSpace
    from evomerge.space_config import parse_space_config
    from evomerge.store import RunStore

    config = parse_space_config(SPACE, source="bench")
    space = SearchSpace(config, 8)
    clock = Clock()  # where the time goes: wrap the store's and Optuna's calls (wrappers cost ~1 us)
    patches = [
        (optuna.study.Study, "tell", "optuna Study.tell"),
        (optuna.trial.Trial, "set_user_attr", "optuna Trial.set_user_attr"),
        (optuna.trial.Trial, "set_constraint", "optuna Trial.set_constraint"),
        (optuna.storages.RDBStorage, "create_new_trial", "optuna create_new_trial"),
        (optuna.storages.RDBStorage, "get_all_trials", "optuna get_all_trials"),
        (RunStore, "write_pareto", "store write_pareto"),
        (RunStore, "counts", "store counts"),
        (RunStore, "annotate", "store annotate (recipe)"),
        (space.__class__, "decode", "space decode"),
    ]
    for owner, name, label in patches:
        setattr(owner, name, clock.timed(label, getattr(owner, name)))

    folder = Path(tempfile.mkdtemp(prefix="evomerge-loop-bench-"))
    try:
        store = RunStore.create(folder, "bench", "bench: 1\n", "h",
                                directions={o.key: o.direction for o in config.objectives})
        driver = build_driver(args.driver, store, space, config)
        driver.ask = clock.timed("driver ask (with store start_trial)", driver.ask)
        driver.tell = clock.timed("driver tell (with store complete_trial)", driver.tell)
        marks = sorted({min(1000, args.trials), args.trials})
        t = time.perf_counter()
        means = run_loop(store, driver, space, args.trials, args.workers, marks)
        loop_s = time.perf_counter() - t
        store.close()
        spent = dict(clock.total)
        clock.total.clear()
        steps = reopen(folder / "bench", args.driver, space, config)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    import os

    print(f"driver {args.driver}, {space.unit_dimension} coordinates, 3 objectives, {args.workers} candidates out, "
          f"{args.trials} trials in {loop_s:.1f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| trials | loop ms per trial, wall (mean of the 500 before) | CPU | goal | ratio to goal (wall, CPU) |")
    print("|---|---|---|---|---|")
    for m, (w, c) in means.items():
        print(f"| {m} | {1000 * w:.2f} | {1000 * c:.2f} | {1000 * GOAL_PER_TRIAL_S:.0f} "
              f"| {w / GOAL_PER_TRIAL_S:.2f}, {c / GOAL_PER_TRIAL_S:.2f} |")
    print(f"\nwhere the loop's time went (ms per trial, over all {args.trials}; nested labels overlap):")
    for label, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {label:45s} {1000 * s / args.trials:7.3f}")
    cpu_total = steps.pop("CPU, all steps")
    total = sum(steps.values())
    print(f"\nreopen at {args.trials} trials: {total:.2f} s wall, {cpu_total:.2f} s CPU "
          f"(goal {GOAL_REOPEN_S:g} s, ratio {total / GOAL_REOPEN_S:.2f} wall, {cpu_total / GOAL_REOPEN_S:.2f} CPU)")
    for label, s in steps.items():
        print(f"  {label:30s} {s:.2f} s")
    if statistics.mean(w for w, _ in means.values()) > GOAL_PER_TRIAL_S or total > GOAL_REOPEN_S:
        print("\nabove a goal (machines here are shared and noisy: rerun before concluding)")


if __name__ == "__main__":
    main()
