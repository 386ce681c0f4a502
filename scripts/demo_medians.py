"""The README's demo numbers, as medians over seeds rather than one lucky run.

    python scripts/demo_medians.py [--seeds 5] [--runs-dir DIR] [--space FILE] [--no-hand-set]

Runs ``search_spaces/toy_ties.yaml`` (the space ``scripts/demo.sh`` searches) once per CMA seed
0..N-1 on the in-process pool, with the space's own budget, population and workers (so the
default lookahead, and hence every candidate, is the one the demo's Ray run proposes: CMA
candidates depend on the seed and the results only, not on where they run), then scores each
run's best trial on the held-out items as ``evomerge toy compare`` does. It prints, per seed and
as the median over seeds, the held-out mean accuracy of the best trial against the hand-set
task-arithmetic merge (weights 1) and the best single model, and the margins. Needs the toy world
(``evomerge toy build toy_world``); finished runs in ``--runs-dir`` are reused, not redone.
``--space`` runs another space file the same way (an older demo space, to compare), and
``--no-hand-set`` sets ``search.hand_set: false`` (what the hand-set start adds).
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


def space(file: Path, name: str, seed: int, hand_set: bool) -> dict:
    data = yaml.safe_load(file.read_text())
    data["name"] = name
    data["models"]["base"] = str(ROOT / data["models"]["base"])
    data["models"]["donors"] = [str(ROOT / d) for d in data["models"]["donors"]]
    data["search"]["seed"] = seed
    data["search"]["hand_set"] = hand_set
    data["workers"]["pool"] = "inprocess"
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--runs-dir", type=Path, default=Path(tempfile.gettempdir()) / "evomerge-demo-medians")
    parser.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "toy_ties.yaml")
    parser.add_argument("--no-hand-set", action="store_true")
    args = parser.parse_args()
    file = args.space.resolve()
    os.chdir(ROOT)  # the space file's eval_tasks/ is relative to the repository
    logging.getLogger("evomerge").setLevel(logging.ERROR)

    from evomerge.search import run_search
    from evomerge.space_config import parse_space_config
    from evomerge.store import RunStore
    from evomerge.toy.compare import TASK_ARITHMETIC_1, compare

    runs_dir = args.runs_dir.resolve()
    best_rows, ta_rows, single_rows = [], [], []
    print("| seed | best trial | its recipe | best held-out mean | task arithmetic, weights 1 | best single model |")
    print("|---|---|---|---|---|---|")
    for seed in range(args.seeds):
        name = f"{file.stem}{'-nohand' if args.no_hand_set else ''}-s{seed}"
        data = space(file, name, seed, not args.no_hand_set)
        run_search(parse_space_config(data, default_name=data["name"]), runs_dir=runs_dir, pool="inprocess")
        rows = compare(runs_dir / data["name"])
        best_name = next(n for n in rows if n.startswith("search best"))
        number = int(best_name.split("trial ")[1].rstrip(")"))
        store = RunStore.open(runs_dir / data["name"])
        try:
            record = next(t for t in store.trials() if t.number == number)
        finally:
            store.close()
        singles = {n: r["mean"] for n, r in rows.items() if n.endswith(" alone")}
        best_rows.append(rows[best_name]["mean"])
        ta_rows.append(rows[TASK_ARITHMETIC_1]["mean"])
        single_rows.append(max(singles.values()))
        recipe = record.attrs.get("hand_set", f"searched, {record.params.get('method', '')}".rstrip(", "))
        print(f"| {seed} | {number} | {recipe} | {best_rows[-1]:.3f} | {ta_rows[-1]:.3f} | {single_rows[-1]:.3f} "
              f"({max(singles, key=singles.get)}) |", flush=True)
    med = statistics.median
    print(f"\n{file.name}{' without hand-set trials' if args.no_hand_set else ''}, median over {args.seeds} seeds: best trial {med(best_rows):.3f}, task arithmetic weights 1 {med(ta_rows):.3f}, "
          f"best single model {med(single_rows):.3f}; margin over task arithmetic "
          f"{med(b - t for b, t in zip(best_rows, ta_rows)):+.3f} (min {min(b - t for b, t in zip(best_rows, ta_rows)):+.3f}), "
          f"over the best single model {med(b - s for b, s in zip(best_rows, single_rows)):+.3f}")


if __name__ == "__main__":
    main()
