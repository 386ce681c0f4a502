"""Parameter-only vs route-only vs both, at one trial budget, on the toy world's held-out split.

    python scripts/compare_routes.py [--budget 48] [--runs-dir runs/route_comparison]

Runs four real searches (each a plain ``evomerge search`` on a copy of a shipped space file with
the budget and run name changed), then scores each run's best trial on the held-out items of both
skills with the same evaluator the workers use:

- params:     search_spaces/toy_ties.yaml         (TIES weights and densities)
- route:      search_spaces/toy_route.yaml        (a frankenmerge of the specialists' layers)
- joint:      search_spaces/toy_route_joint.yaml  (TIES parameters and a route over them, together)
- two-stage:  toy_ties.yaml for half the budget, then toy_route_stage2.yaml over its best

Needs the toy world (``evomerge toy build toy_world``). Searches resume: run it again after an
interruption and finished runs are not redone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TQDM_DISABLE", "1")  # before lm-eval imports tqdm: its bars read this once


def space_copy(source: str, name: str, budget: int, folder: Path, **route: object) -> Path:
    data = yaml.safe_load((ROOT / "search_spaces" / source).read_text())
    data["name"] = name
    data["search"]["budget"] = budget
    if route:
        data["route"].update(route)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def search(space: Path, runs_dir: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "evomerge.cli", "search", str(space), "--runs-dir", str(runs_dir)],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=int, default=48)
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "route_comparison")
    args = parser.parse_args()
    runs = args.runs_dir.resolve()
    spaces = runs / "spaces"
    spaces.mkdir(parents=True, exist_ok=True)
    b = args.budget
    half = b // 2

    plans = {
        "params": [space_copy("toy_ties.yaml", "params", b, spaces)],
        "route": [space_copy("toy_route.yaml", "route", b, spaces)],
        "joint": [space_copy("toy_route_joint.yaml", "joint", b, spaces)],
        "two-stage": [space_copy("toy_ties.yaml", "stage1", half, spaces),
                      space_copy("toy_route_stage2.yaml", "stage2", b - half, spaces, merged=str(runs / "stage1"))],
    }
    final_run = {"params": "params", "route": "route", "joint": "joint", "two-stage": "stage2"}
    seconds = {}
    for setting, files in plans.items():
        seconds[setting] = sum(search(f, runs) for f in files)
        print(f"{setting}: searched in {seconds[setting]:.0f} s", flush=True)

    from evomerge.store import RunStore
    from evomerge.toy.compare import compare

    print(f"\nbudget {b} trials each (two-stage: {half} + {b - half}); held-out accuracy of each run's best trial")
    print("| search | trials | search s | best on search items (mean) | arith held-out | reverse held-out | mean held-out |")
    print("|---|---|---|---|---|---|---|")
    for setting, run in final_run.items():
        rows = compare(runs / run)
        best_name = next(n for n in rows if n.startswith("search best"))
        held = rows[best_name]
        store = RunStore.open(runs / run)
        number = int(best_name.split("trial ")[1].rstrip(")"))
        searched = store.trial(number).objectives
        store.close()
        tasks = [v for k, v in searched.items() if k.startswith("task:")]
        search_mean = sum(tasks) / len(tasks)
        arith = next(v for k, v in held.items() if "arith" in k)
        reverse = next(v for k, v in held.items() if "reverse" in k)
        print(f"| {setting} | {b} | {seconds[setting]:.0f} | {search_mean:.3f} | {arith:.3f} | {reverse:.3f} | "
              f"{held['mean']:.3f} |")


if __name__ == "__main__":
    main()
