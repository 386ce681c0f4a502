"""The CMA lookahead on the toy world: best score per trial against the generational loop.

    python scripts/bench_cma_lookahead_toy.py [--seeds 9] [--budget 48] [--runs-dir DIR]

Real searches of ``search_spaces/toy_ties.yaml`` (TIES over the two specialists, population 8,
both skills' accuracy on 64 search items, ``sigma0`` 0.1: set here, as measured for the README) on the in-process pool, one per CMA seed and lookahead:
0 (the generational loop), the default for a run with 4 or more workers (``default_lookahead``:
half the population, 4) and a whole population (8, the default before the cap), and
``search.cma_update: window`` (pycma told the last 8 results every 4 arrivals). The in-process
pool runs one candidate at a time. With a lookahead CMA candidates depend on the seed and the
results only, never on how many workers evaluate them or when they finish, so each run proposes
exactly the candidates a run with that lookahead proposes on a cluster; what a cluster adds is
only the utilisation that ``scripts/bench_cma_async.py`` simulates. The window's candidates
depend on the order results arrive in as well: here that is the order they were asked in (one
worker); ``scripts/bench_cma_oversampling.py`` simulates it with many workers.

It prints, per lookahead, the median over seeds of the best sum of the two accuracies on the search
items after n trials, the ratio of its shortfall from 2 (both skills perfect) to the generational
loop's (at most 1: no worse per trial), and the median held-out accuracy (items the search never
saw, mean of the two skills) of each run's best trial, scored as ``evomerge toy compare`` scores
it. Needs the toy world (``evomerge toy build toy_world``). On this shared 2-core machine 5 seeds
took 3 minutes, and 9 seeds (4 new) another 12 under a load average of 7; finished runs in
``--runs-dir`` are reused, not redone.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TQDM_DISABLE", "1")  # before lm-eval imports tqdm: its bars read this once
MARKS = (8, 16, 24, 32, 48, 64, 96)


WINDOW = "window"  # the variant run with search.cma_update: window (evomerge.drivers.cma_window)


def space(name: str, seed: int, lookahead: int | str, budget: int) -> dict:
    data = yaml.safe_load((ROOT / "search_spaces" / "toy_ties.yaml").read_text())
    data["name"] = name
    data["models"]["base"] = str(ROOT / data["models"]["base"])
    data["models"]["donors"] = [str(ROOT / d) for d in data["models"]["donors"]]
    if lookahead == WINDOW:
        data["search"].update(budget=budget, seed=seed, cma_update=WINDOW)
    else:
        data["search"].update(budget=budget, seed=seed, lookahead=lookahead)
    data["workers"] = {"count": 1, "pool": "inprocess", "cpus_per_worker": 1}
    # the settings this comparison was measured with (the README's table): 64 search items per task
    # and sigma0 0.1; the shipped space has since moved to every item and a smaller step
    data["evaluation"]["items"] = 64
    data["search"]["sigma0"] = 0.1
    return data


def best_curve(run: Path) -> tuple[list[float], Path]:
    """Best objective sum after each finished trial, in the order they were asked (the in-process
    pool finishes them in that order)."""
    from evomerge.store import RunStore

    store = RunStore.open(run)
    try:
        best, curve = -float("inf"), []
        for t in sorted(store.trials(), key=lambda t: t.number):
            if t.objectives is not None:
                best = max(best, sum(v for k, v in t.objectives.items() if k.startswith("task:")))
            curve.append(best)
        return curve, run
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=9)
    parser.add_argument("--budget", type=int, default=48)
    parser.add_argument("--runs-dir", type=Path, default=Path(tempfile.gettempdir()) / "evomerge-lookahead-toy")
    args = parser.parse_args()
    os.chdir(ROOT)  # the space file's eval_tasks/ is relative to the repository
    logging.getLogger("evomerge").setLevel(logging.ERROR)

    from evomerge.search import default_lookahead, run_search
    from evomerge.space_config import parse_space_config
    from evomerge.toy.compare import compare

    population = int(yaml.safe_load((ROOT / "search_spaces" / "toy_ties.yaml").read_text())["search"]["population"])
    lookaheads = (0, default_lookahead(4, population), population, WINDOW)
    runs_dir = args.runs_dir.resolve()
    curves: dict[int | str, list[list[float]]] = {a: [] for a in lookaheads}
    held_out: dict[int | str, list[float]] = {a: [] for a in lookaheads}
    for seed in range(args.seeds):
        for a in lookaheads:
            name = f"toy-la{a}-s{seed}-b{args.budget}"
            if not (runs_dir / name / "space.yaml").is_file() or len(best_curve(runs_dir / name)[0]) < args.budget:
                run_search(parse_space_config(space(name, seed, a, args.budget), default_name=name),
                           runs_dir=runs_dir, pool="inprocess")
            curve, run = best_curve(runs_dir / name)
            curves[a].append(curve)
            rows = compare(run)
            held_out[a].append(next(r["mean"] for n, r in rows.items() if n.startswith("search best")))
            print(f"seed {seed}, lookahead {a}: best {curve[-1]:.3f}, held-out mean {held_out[a][-1]:.3f}", flush=True)

    marks = [m for m in MARKS if m <= args.budget]
    print(f"\ntoy world, toy_ties.yaml (population {population}), {args.seeds} CMA seeds: median best sum of the two "
          "accuracies on the search items after n trials; ratio: the lookahead's median shortfall from 2 over the "
          "generational loop's (at most 1: no worse per trial)")
    ahead = lookaheads[1:]
    print("| trials | " + " | ".join(_label(a) for a in lookaheads) + " | "
          + " | ".join(f"ratio {_label(a)} / generational" for a in ahead) + " |")
    print("|---|" + "---|" * (len(lookaheads) + len(ahead)))
    for m in marks:
        med = {a: statistics.median(c[m - 1] for c in curves[a]) for a in lookaheads}
        ratios = [(2 - med[a]) / (2 - med[0]) if med[0] < 2 else float("nan") for a in ahead]
        print(f"| {m} | " + " | ".join(f"{med[a]:.3f}" for a in lookaheads) + " | "
              + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    print("| held-out mean accuracy of the best trial | "
          + " | ".join(f"{statistics.median(held_out[a]):.3f}" for a in lookaheads) + " | "
          + " | ".join("" for _ in ahead) + " |")


def _label(a: int | str) -> str:
    return "window" if a == WINDOW else f"lookahead {a}"


if __name__ == "__main__":
    main()
