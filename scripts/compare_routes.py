"""Parameter-only vs route-only vs both, at one trial budget, on a toy world's held-out split.

    python scripts/compare_routes.py [--world pair|compose] [--budget 48] [--seed 0] [--runs-dir DIR]

Runs four real searches (each a plain ``evomerge search`` on a copy of a shipped space file with
the budget, the search seed and the run name changed), then scores each run's best trial on the
held-out items of every objective's task with the same evaluator the workers use:

- params:     parameters alone  (pair: toy_ties.yaml; compose: toy3_params.yaml)
- route:      a frankenmerge of the specialists' layers  (toy_route.yaml; toy3_route.yaml)
- joint:      parameters and a route over them, together  (toy_route_joint.yaml; toy3_route_joint.yaml)
- two-stage:  the params space for half the budget, then a route over its best
              (toy_route_stage2.yaml; toy3_route_stage2.yaml)

The compose world (``--world compose``) is where routing should pay: its composed task (rotate,
then shift) asks one specialist to act on the other's output; every space there uses the rotate
and shift specialists and scores the composed task and both skills.

Needs the world (``evomerge toy build toy_world``, or ``evomerge toy build toy_world_compose
--world compose``). Searches resume: run it again after an interruption and finished runs are not
redone.
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


SPACES = {  # world -> setting -> shipped space file
    "pair": {"params": "toy_ties.yaml", "route": "toy_route.yaml", "joint": "toy_route_joint.yaml",
             "stage2": "toy_route_stage2.yaml"},
    "compose": {"params": "toy3_params.yaml", "route": "toy3_route.yaml", "joint": "toy3_route_joint.yaml",
                "stage2": "toy3_route_stage2.yaml"},
}


def space_copy(source: str, name: str, budget: int, seed: int, folder: Path, **route: object) -> Path:
    data = yaml.safe_load((ROOT / "search_spaces" / source).read_text())
    data["name"] = name
    data["search"]["budget"] = budget
    data["search"]["seed"] = seed
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
    parser.add_argument("--world", choices=sorted(SPACES), default="pair")
    parser.add_argument("--budget", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0, help="the search seed of every run")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="default: runs/route_comparison (pair), runs/route_comparison_compose (compose); "
                             "a seed other than 0 adds _seed<N>")
    args = parser.parse_args()
    default_dir = "route_comparison" + ("" if args.world == "pair" else f"_{args.world}")
    default_dir += "" if args.seed == 0 else f"_seed{args.seed}"
    runs = (args.runs_dir or ROOT / "runs" / default_dir).resolve()
    spaces = runs / "spaces"
    spaces.mkdir(parents=True, exist_ok=True)
    b, seed = args.budget, args.seed
    half = b // 2
    files = SPACES[args.world]

    plans = {
        "params": [space_copy(files["params"], "params", b, seed, spaces)],
        "route": [space_copy(files["route"], "route", b, seed, spaces)],
        "joint": [space_copy(files["joint"], "joint", b, seed, spaces)],
        "two-stage": [space_copy(files["params"], "stage1", half, seed, spaces),
                      space_copy(files["stage2"], "stage2", b - half, seed, spaces, merged=str(runs / "stage1"))],
    }
    final_run = {"params": "params", "route": "route", "joint": "joint", "two-stage": "stage2"}
    seconds = {}
    for setting, files in plans.items():
        seconds[setting] = sum(search(f, runs) for f in files)
        print(f"{setting}: searched in {seconds[setting]:.0f} s", flush=True)

    from evomerge.store import RunStore
    from evomerge.toy.compare import compare

    print(f"\n{args.world} world, search seed {seed}, budget {b} trials each (two-stage: {half} + {b - half}); "
          "held-out accuracy of each run's best trial, and of the best hand-set merge or single model")
    hand_best: tuple[str, dict[str, float]] | None = None
    header_tasks: list[str] = []
    lines = []
    for setting, run in final_run.items():
        rows = compare(runs / run)
        best_name = next(n for n in rows if n.startswith("search best"))
        held = rows[best_name]
        header_tasks = [k for k in held if k != "mean"]
        for name, scores in rows.items():  # the same hand-set rows in every run: the best of them
            if not name.startswith("search best") and (hand_best is None or scores["mean"] > hand_best[1]["mean"]):
                hand_best = (name, scores)
        store = RunStore.open(runs / run)
        number = int(best_name.split("trial ")[1].rstrip(")"))
        searched = store.trial(number).objectives
        store.close()
        tasks = [v for k, v in searched.items() if k.startswith("task:")]
        search_mean = sum(tasks) / len(tasks)
        lines.append(f"| {setting} | {b} | {seconds[setting]:.0f} | {search_mean:.3f} | "
                     + " | ".join(f"{held[t]:.3f}" for t in header_tasks) + f" | {held['mean']:.3f} |")
    names = [t.split(":", 1)[-1].split("/")[0].removeprefix("toy_").removesuffix("_heldout") + " held-out"
             for t in header_tasks]
    print("| search | trials | search s | best on search items (mean) | " + " | ".join(names) + " | mean held-out |")
    print("|---|---|---|---|" + "---|" * len(names) + "---|")
    print("\n".join(lines))
    if hand_best is not None:
        name, scores = hand_best
        print(f"| best hand-set: {name} | - | - | - | " + " | ".join(f"{scores[t]:.3f}" for t in header_tasks)
              + f" | {scores['mean']:.3f} |")


if __name__ == "__main__":
    main()
