"""How long the GP driver takes to propose one candidate as the run's history grows.

    python scripts/bench_gp_ask.py [--trials 300] [--dim 10]

Optuna's GPSampler fits a Gaussian process to every finished trial before each proposal, a cost
that grows with the cube of the trials. Through the real driver and run store (SQLite in a
temporary folder), with an instant evaluator (two objectives on ``--dim`` coordinates), it prints
the seconds one ``ask`` takes at several history sizes, against the loop's own cost per trial
(``scripts/bench_loop.py``: a few ms), and as a ratio to its slowest of the first 20 proposals:
the driver warns once a proposal takes twice that (``evomerge.drivers.optuna_driver``).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--dim", type=int, default=10)
    args = parser.parse_args()
    logging.getLogger("evomerge").setLevel(logging.ERROR)
    import optuna
    from optuna.distributions import FloatDistribution

    from evomerge.drivers import make_driver
    from evomerge.drivers.optuna_driver import BASELINE_ASKS
    from evomerge.objectives import ObjectiveSpec
    from evomerge.store import RunStore

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    folder = Path(tempfile.mkdtemp(prefix="evomerge-gp-bench-"))
    marks = [n for n in (25, 50, 100, 200, 300, 400, 600) if n <= args.trials]
    try:
        store = RunStore.create(folder, "gp", "bench: 1\n", "h", directions={"a": "maximize", "b": "minimize"},
                                pareto_interval_s=3600)
        dists = {f"x{i}": FloatDistribution(0.0, 1.0) for i in range(args.dim)}
        driver = make_driver("gp", store, distributions=dists,
                             objectives=[ObjectiveSpec("a", "maximize"), ObjectiveSpec("b", "minimize")], seed=0)
        print(f"GP driver, {args.dim} coordinates, 2 objectives")
        print("| finished trials | seconds per ask | ratio to the slowest of the first 20 (warns at 2) |")
        print("|---|---|---|")
        first: list[float] = []
        for n in range(args.trials + 1):
            t = time.perf_counter()
            proposal = driver.ask()
            ask_s = time.perf_counter() - t
            if len(first) < BASELINE_ASKS:
                first.append(ask_s)
            if n in marks:
                print(f"| {n} | {ask_s:.3f} | {ask_s / max(first):.2f} |", flush=True)
            x = [proposal.values[f"x{i}"] for i in range(args.dim)]
            driver.tell(proposal.number, {"a": -sum((v - 0.3) ** 2 for v in x), "b": sum(x)})
        store.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
