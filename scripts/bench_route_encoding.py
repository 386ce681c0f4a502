"""How well CMA-ES searches routes: evomerge's random-key encoding vs the paper's indicator vector.

    python scripts/bench_route_encoding.py [--seeds 8] [--budget 160]

A synthetic target, so that thousands of trials cost seconds, not hours: the score of a route is
minus its edit distance (insert, delete, replace a layer) to a hidden 5-layer route over a pool of
two 4-layer models repeated twice (16 slots, depth 4 to 8). Both encodings go through the real CMA
driver and run store:

- random keys (``evomerge.space.route``): a key per slot and a depth; every point is a valid route;
- indicator (Akiba et al.): a coordinate per slot, included when above 0.5; a point with a depth
  outside the bounds is an invalid route, told to CMA as a failed trial (its defined penalty).

It prints, per encoding, how many seeds found the target exactly, the median trials to find it,
the mean best distance, and the share of invalid proposals, then the ratios.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

TARGET = [("m/arith", 0), ("m/reverse", 1), ("m/reverse", 2), ("m/arith", 3), ("m/reverse", 3)]
SPACE = {
    "name": "bench",
    "models": {"base": "m/base", "donors": ["m/arith", "m/reverse"]},
    "route": {"pool": ["arith", "reverse"], "repeats": 2, "depth": [4, 8]},
    "objectives": [{"task": "t", "metric": "acc", "direction": "maximize"}],
    "search": {"driver": "cma", "budget": 8},
}


def edit_distance(a: Sequence[Any], b: Sequence[Any]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def random_keys(space: Any) -> tuple[list[float], Callable, Callable, dict]:
    from evomerge.merge.routing import route_from_config

    def decode(values: Mapping[str, Any]) -> list[tuple[str, int]] | None:
        return [(layer.model, layer.layer) for layer in route_from_config(space.decode(values).route)]

    return space.initial_unit(), space.from_unit, decode, space.optuna_distributions()


def indicator(space: Any) -> tuple[list[float], Callable, Callable, dict]:
    from optuna.distributions import FloatDistribution

    encoding = space.route
    slots = encoding.slots
    low, high = encoding.route.depth
    initial = set(encoding.initial)
    x0 = [0.8 if s.index in initial else 0.2 for s in slots]

    def from_unit(x: Sequence[float]) -> dict[str, float]:
        return {s.key_name: min(1.0, max(0.0, float(v))) for s, v in zip(slots, x)}

    def decode(values: Mapping[str, Any]) -> list[tuple[str, int]] | None:
        chosen = [s for s in slots if values[s.key_name] > 0.5]
        if not low <= len(chosen) <= high:
            return None  # not a route the space allows
        return [(encoding.references[s.entry], s.layer) for s in chosen]

    return x0, from_unit, decode, {s.key_name: FloatDistribution(0.0, 1.0) for s in slots}


def run(encode: Callable, space: Any, seed: int, budget: int, folder: Path) -> tuple[int, int | None, float]:
    from evomerge.drivers import make_driver
    from evomerge.objectives import ObjectiveSpec
    from evomerge.store import RunStore

    x0, from_unit, decode, dists = encode(space)
    store = RunStore.create(folder, f"s{seed}", "bench: 1\n", "h", directions={"score": "maximize"})
    driver = make_driver("cma", store, distributions=dists, objectives=[ObjectiveSpec("score", "maximize")],
                         seed=seed, popsize=8, sigma0=0.25, x0=x0, dim=len(x0), from_unit=from_unit)
    best, found, invalid = -len(TARGET) * 2, None, 0
    for i in range(budget):
        proposal = driver.ask()
        route = decode(proposal.values)
        if route is None:
            invalid += 1
            driver.tell(proposal.number, None, failed_reason="depth outside route.depth")
            continue
        score = -edit_distance(route, TARGET)
        best = max(best, score)
        if score == 0 and found is None:
            found = i + 1
        driver.tell(proposal.number, {"score": float(score)})
    store.close()
    return -best, found, invalid / budget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--budget", type=int, default=160)
    args = parser.parse_args()
    logging.getLogger("evomerge").setLevel(logging.ERROR)  # CMA logs each generation's failures
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from evomerge.space import SearchSpace
    from evomerge.space_config import parse_space_config

    space = SearchSpace(parse_space_config(SPACE, source="bench"), 4)
    folder = Path(tempfile.mkdtemp(prefix="evomerge-route-bench-"))
    results: dict[str, list[tuple[int, int | None, float]]] = {}
    try:
        for name, encode in (("random keys", random_keys), ("indicator", indicator)):
            results[name] = [run(encode, space, seed, args.budget, folder / name.replace(" ", "_"))
                             for seed in range(args.seeds)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"CMA-ES, {args.budget} trials, {args.seeds} seeds, target: a 5-layer route in 16 slots (depth 4-8)")
    print("| encoding | found exactly | median trials to find | mean best distance | invalid proposals |")
    print("|---|---|---|---|---|")
    summary = {}
    for name, rows in results.items():
        found = [f for _, f, _ in rows if f is not None]
        mean_best = statistics.mean(d for d, _, _ in rows)
        invalid = statistics.mean(v for _, _, v in rows)
        median = statistics.median(found) if found else float("nan")
        summary[name] = (len(found), mean_best)
        print(f"| {name} | {len(found)}/{len(rows)} | {median:g} | {mean_best:.2f} | {invalid:.0%} |")
    keys, ind = summary["random keys"], summary["indicator"]
    print(f"\nfound: random keys {keys[0]} vs indicator {ind[0]} seeds; mean best distance ratio "
          f"(indicator / random keys): {ind[1] / keys[1] if keys[1] else float('inf'):.2f}")


if __name__ == "__main__":
    main()
