"""Variants of the demo space, full fidelity only: the held-out margin of the best over task arithmetic.

    python scripts/demo_space_variants.py [--space FILE] [--driver cma|tpe|...] [--seeds 5]
                                          [--set SECTION.KEY=VALUE ...]

Runs the space (default ``search_spaces/toy_ties.yaml``) once per seed 0..N-1, with each ``--set``
applied on top (``--set evaluation.items=64 --set search.sigma0=0.1``: the demo space as it was),
the way ``scripts/bench_fitness.py`` runs its full-fidelity rows (its own functions: in-process
pool, one worker, hand-set trials first), without the multi-fidelity run beside each, so that a
few variants cost minutes, not an hour. Prints per seed the held-out mean of the best trial (best
by the mean of the search-item scores, as ``export --best`` picks), its search-item mean, and the
margin over the best hand-set merge, then the median and spread of the margins. The search
chooses on search items only; held-out items measure the choice.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fitness  # the same space rewriting, runs and held-out scoring as the benchmark)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--space", type=Path, default=bench_fitness.ROOT / "search_spaces" / "toy_ties.yaml")
    parser.add_argument("--world", type=Path, default=bench_fitness.ROOT / "toy_world")
    parser.add_argument("--driver", default="cma")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    settings = []
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep or key.count(".") != 1:
            parser.error(f"--set {item}: write SECTION.KEY=VALUE, e.g. evaluation.items=64")
        settings.append((*key.split("."), yaml.safe_load(value)))
    logging.getLogger("evomerge").setLevel(logging.ERROR)
    import optuna

    from evomerge.store import RunStore

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runs_dir = Path(tempfile.mkdtemp(prefix="evomerge-demo-variants-"))
    space_file, held_out, margins = args.space.resolve(), None, []
    label = " ".join(args.settings) or "as shipped"
    print(f"{space_file.name}, {args.driver}, {label}")
    for seed in range(args.seeds):
        data = bench_fitness.world_space(space_file, args.world.resolve(), f"{space_file.stem}-s{seed}",
                                         args.driver, seed, 1.0)
        for section, key, value in settings:
            data[section][key] = value
        outcome, held_out = bench_fitness.run_one(data, runs_dir, held_out, None)
        store = RunStore.open(runs_dir / data["name"])
        try:
            search_mean = max(statistics.fmean(v for k, v in t.objectives.items() if k.startswith("task:"))
                              for t in store.trials() if t.objectives)
        finally:
            store.close()
        margins.append(outcome.final - outcome.hand_set)
        print(f"  seed {seed}: best held-out mean {outcome.final:.4f} (search items {search_mean:.4f}), "
              f"best hand-set {outcome.hand_set:.4f}, margin {margins[-1]:+.4f}", flush=True)
    print(f"  median margin {statistics.median(margins):+.4f} [{min(margins):+.4f}, {max(margins):+.4f}]")


if __name__ == "__main__":
    main()
