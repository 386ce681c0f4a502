"""Cheap fitness, measured: full fidelity against multi-fidelity (item rungs) at equal forward passes.

    python scripts/bench_fitness.py [--world DIR --space FILE ...] [--seeds 5] [--drivers cma tpe]
                                    [--items 200] [--min-items 8] [--eta 3] [--runs-dir DIR] [--quick]

For each world and space given (pairs, in order; default: ``toy_world`` with
``search_spaces/toy_ties.yaml``), each driver and each seed, it runs the space twice on the
in-process pool (one worker, hand-set trials first):

- **full**: the space as it is (its budget in trials), every trial scored on every item; its
  forward passes ``F`` are the budget of the other run;
- **rungs**: the same space with ``evaluation.rungs: {min_items, eta}``, asking new candidates
  until it has spent ``F`` forward passes (``run_search(max_forward_passes=F)``).

Every time the search's best trial (what ``export --best`` picks then, over trials scored on every
item) changes, the new best is scored on the held-out items (``<task>_heldout``, never seen by the
search), as are the run's hand-set trials. Printed per world and driver, as median and
[min, max] over seeds, for each mode:

- the held-out mean of the final best trial ("best held-out");
- the forward passes spent when the best first reached 95% of the full run's final held-out mean
  (the same seed's full run; "-" when never), and the full run's count over the rungs run's
  (the saving; goal: 3x or more; a seed whose rungs run never reached it counts as 0x, so the
  median is not taken over the lucky seeds only; ``--per-seed`` prints each seed's counts);
- the held-out margin of the final best over the best hand-set merge and over the best single
  input model (each model alone; goal: above 0).

``--items N`` scores N search items per task in both modes (default: the space's
``evaluation.items``). Rungs pay off with many items: at 64 items, rungs 8/24/64, a whole
evaluation costs 8 rung-0 scores; at 200 (every search item of a toy task), rungs 8/24/72/200, it
costs 25, and the full-fidelity run it is set against is the less noisy one.

Space files name the models relative to the repository (``toy_world/base``); a model path whose
first part starts with ``toy_world`` (``toy_world_compose/...`` too) is rewritten to the ``--world``
folder, so the same space serves another world built with ``evomerge toy build DIR``. A full run
already complete in ``--runs-dir`` is read back rather than rerun: with one worker its trials
finished in number order, so the log gives the timeline ``on_progress`` saw (the rungs runs are
always run: promotion reorders them; a rungs run left in the folder is resumed, so clear them).
Run names say world, space, driver and seed, not ``--items`` or the rungs: reuse a folder only
with the same settings. ``--quick``: one seed, one driver, a quarter of the
budget, for a smoke run. Output is the table only (no progress lines).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TQDM_DISABLE", "1")  # before lm-eval imports tqdm: its bars read this once
TARGET = 0.95


@dataclass
class Outcome:
    """One search: the held-out mean of its best over the forward passes it spent."""

    timeline: list[tuple[int, float]] = field(default_factory=list)  # (forward passes spent, held-out of the best then)
    spent: int = 0
    hand_set: float = 0.0  # best hand-set merge, held-out mean
    single: float = 0.0  # best single input model, held-out mean

    @property
    def final(self) -> float:
        return self.timeline[-1][1] if self.timeline else float("nan")

    def passes_to(self, target: float) -> int | None:
        return next((fp for fp, score in self.timeline if score >= target), None)


def world_space(space_file: Path, world: Path, name: str, driver: str, seed: int, budget_scale: float,
                hand_set: bool = True, items: int | None = None) -> dict:
    data = yaml.safe_load(space_file.read_text())

    def moved(path: str) -> str:
        parts = Path(path).parts
        return str(world.joinpath(*parts[1:])) if parts and parts[0].startswith("toy_world") else str((ROOT / path).resolve())

    data["name"] = name
    data["models"]["base"] = moved(data["models"]["base"])
    data["models"]["donors"] = [moved(d) for d in data["models"]["donors"]]
    data["evaluation"]["include_path"] = [str((ROOT / p).resolve()) for p in data["evaluation"].get("include_path", [])]
    data["search"].update({"driver": driver, "seed": seed, "hand_set": hand_set,
                           "budget": max(8, int(data["search"]["budget"] * budget_scale))})
    if driver != "cma":
        data["search"].pop("population", None)
        data["search"].pop("sigma0", None)
    data["workers"] = {"count": 1, "cpus_per_worker": 1, "pool": "inprocess"}
    if items is not None:
        data["evaluation"]["items"] = items
    return data


class HeldOut:
    """Held-out means of recipes, scored once each by the evaluator the workers use."""

    def __init__(self, config: Any) -> None:
        from evomerge.toy.compare import heldout_task
        from evomerge.worker import CandidateEvaluator, EvalSettings, WorkerSpec

        paths = tuple(str(Path(p).resolve()) for p in config.evaluation.include_path) or None
        spec = WorkerSpec(base=config.models.base, donors=tuple(d.model for d in config.models.donors),
                          evaluation=EvalSettings(tasks=tuple(heldout_task(t) for t in config.task_names()),
                                                  include_path=paths, batch_size=64))
        self.evaluator = CandidateEvaluator(spec)
        self.cache: dict[str, float] = {}

        self.hand_set: dict[str, float] = {}  # hand-set label -> held-out mean

    def baselines(self, config: Any) -> dict[str, float]:
        """The hand-set merges of the space (each input alone, task arithmetic weight 1, each
        method's defaults), scored whether or not the run itself started with them."""
        if not self.hand_set:
            from evomerge.hand_set import hand_set_points
            from evomerge.prepare import prepare

            space = prepare(config).space
            points, _ = hand_set_points(space)
            self.hand_set = {p.label: self(space.decode(dict(p.values)).to_json()) for p in points}
        return self.hand_set

    def __call__(self, recipe_json: str) -> float:
        if recipe_json not in self.cache:
            with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's progress bars
                result = self.evaluator.evaluate(recipe_json)
            scores = [v for k, v in (result.objectives or {}).items() if k.startswith("task:")]
            self.cache[recipe_json] = sum(scores) / len(scores) if scores else float("nan")
        return self.cache[recipe_json]


def run_one(data: dict, runs_dir: Path, held_out: HeldOut | None, max_fp: int | None) -> tuple[Outcome, HeldOut]:
    from evomerge.search import run_search
    from evomerge.space_config import parse_space_config
    from evomerge.store import RunStore

    config = parse_space_config(data, default_name=data["name"])
    bests: list[tuple[int, int]] = []  # (forward passes spent, best trial number) whenever the best changes

    def on_progress(progress: Any, record: Any) -> None:
        best = progress.best.number if progress.best is not None else None
        if best is not None and (not bests or bests[-1][1] != best):
            bests.append((progress.forward_passes, best))

    run = run_search(config, runs_dir=runs_dir, pool="inprocess", on_progress=on_progress,
                     on_notice=lambda _: None, max_forward_passes=max_fp)
    held_out = held_out or HeldOut(config)
    store = RunStore.open(run)
    try:
        records = {r.number: r for r in store.trials()}
        directions = dict(store.directions)
        outcome = Outcome(spent=store.spent().forward_passes)
    finally:
        store.close()
    if not bests and max_fp is None:  # a full run already complete in --runs-dir: read back, not rerun
        bests = timeline_from_log(records, directions)
    for fp, number in bests:
        outcome.timeline.append((fp, held_out(records[number].recipe_json)))
    hand = held_out.baselines(config)
    outcome.hand_set = max(hand.values())
    outcome.single = max(v for k, v in hand.items() if k.endswith(" alone"))
    return outcome, held_out


def timeline_from_log(records: dict[int, Any], directions: dict[str, str]) -> list[tuple[int, int]]:
    """(forward passes spent, best trial) whenever the best changed, for a run without rungs on one
    worker: its trials finished in number order, so the log gives what ``on_progress`` saw."""
    from evomerge.export import scalar_score

    out: list[tuple[int, int]] = []
    spent, best = 0, None
    for number in sorted(records):
        r = records[number]
        spent += r.forward_passes
        if r.state == "complete" and r.objectives and (
                best is None or scalar_score(r, directions) > scalar_score(records[best], directions)):
            best = number
            out.append((spent, number))
    return out


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    if not values:
        return "-"
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=Path, action="append", help="a toy world folder (repeat, paired with --space)")
    parser.add_argument("--space", type=Path, action="append", help="the space file searched on the --world in its place")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--drivers", nargs="+", default=["cma", "tpe"])
    parser.add_argument("--min-items", type=int, default=8)
    parser.add_argument("--eta", type=int, default=3)
    parser.add_argument("--items", type=int, default=None,
                        help="search items per task in both modes (default: the space's evaluation.items)")
    parser.add_argument("--runs-dir", type=Path, default=None, help="where the runs go (default: a fresh temp folder)")
    parser.add_argument("--quick", action="store_true", help="one seed, one driver, a quarter of the budget")
    parser.add_argument("--per-seed", action="store_true", help="also print each seed's forward passes to 95%% after its rows")
    parser.add_argument("--no-hand-set", action="store_true",
                        help="searches without hand-set trials first (margins are still over the hand-set merges)")
    args = parser.parse_args()
    worlds = args.world or [ROOT / "toy_world"]
    spaces = args.space or [ROOT / "search_spaces" / "toy_ties.yaml"]
    if len(worlds) != len(spaces):
        parser.error("give --world and --space in pairs")
    seeds = 1 if args.quick else args.seeds
    drivers = args.drivers[:1] if args.quick else args.drivers
    scale = 0.25 if args.quick else 1.0
    logging.getLogger("evomerge").setLevel(logging.ERROR)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runs_dir = (args.runs_dir or Path(tempfile.mkdtemp(prefix="evomerge-bench-fitness-"))).resolve()
    rungs = {"min_items": args.min_items, "eta": args.eta}
    print(f"rungs {rungs}; items per task {args.items or 'as in each space'}; {seeds} seed(s); hand-set trials {'off' if args.no_hand_set else 'first'}; "
          f"in-process pool, one worker; runs in {runs_dir}")
    print("| world / space | driver | mode | trials' forward passes | best held-out mean | forward passes to 95% of full's "
          "| full / rungs passes to 95% | margin over best hand-set | margin over best single model |")
    print("|---|---|---|---|---|---|---|---|---|")
    for world, space_file in zip(worlds, spaces, strict=True):
        world, space_file = world.resolve(), space_file.resolve()
        held_out = None
        for driver in drivers:
            rows: dict[str, list[Outcome]] = {"full": [], "rungs": []}
            ratios: list[float] = []
            per_seed: list[str] = []
            reached: dict[str, list[int]] = {"full": [], "rungs": []}
            for seed in range(seeds):
                tag = f"{world.name}-{space_file.stem}-{driver}-s{seed}"
                hand = not args.no_hand_set
                tag += "" if hand else "-nohand"
                data = world_space(space_file, world, f"{tag}-full", driver, seed, scale, hand, args.items)
                full, held_out = run_one(data, runs_dir, held_out, None)
                data = world_space(space_file, world, f"{tag}-rungs", driver, seed, scale, hand, args.items)
                data["evaluation"]["rungs"] = rungs
                data["search"]["budget"] *= 20  # the forward passes end it, not the trials
                multi, held_out = run_one(data, runs_dir, held_out, full.spent)
                rows["full"].append(full)
                rows["rungs"].append(multi)
                target = TARGET * full.final
                a, b = full.passes_to(target), multi.passes_to(target)
                for mode, fp in (("full", a), ("rungs", b)):
                    if fp is not None:
                        reached[mode].append(fp)
                if a is not None:  # a seed whose rungs run never reached counts as 0x: below every other
                    ratios.append(a / b if b else 0.0)
                    per_seed.append(f"s{seed} {a}/{b or 'never'}")
            for mode, outcomes in rows.items():
                got = f"{len(reached[mode])}/{len(outcomes)} reached: " + spread([float(v) for v in reached[mode]], "{:.0f}")
                print(f"| {world.name} / {space_file.name} | {driver} | {mode} | "
                      f"{spread([float(o.spent) for o in outcomes], '{:.0f}')} | {spread([o.final for o in outcomes])} | {got} | "
                      f"{spread(ratios, '{:.1f}x') if mode == 'rungs' else ''} | "
                      f"{spread([o.final - o.hand_set for o in outcomes], '{:+.3f}')} | "
                      f"{spread([o.final - o.single for o in outcomes], '{:+.3f}')} |", flush=True)
            if args.per_seed:
                print(f"per seed, {world.name} / {driver}, full / rungs forward passes to 95%: {', '.join(per_seed)}", flush=True)


if __name__ == "__main__":
    main()
