"""Can stacking layers do what weighted averages cannot, on the compose world's composed task?

    python scripts/toy_compose_routes.py [WORLD_DIR]   # default toy_world_compose/

Scores, on rotate-then-shift (``toy_rotate_shift``, search and held-out split) and on the two
skills it composes, every hand-set "stack" route (the rotate specialist's first k layers under the
shift specialist's layers k..3, and the other way round, and both whole models stacked, 8 layers)
next to the two specialists and task arithmetic of the two with weights 1, the best weighted
average a person would set. Routed models are built in memory from the loaded specialists
(evomerge.merge.routing), as a search worker builds them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from pathlib import Path

TASKS = ["toy_rotate_shift", "toy_rotate_shift_heldout", "toy_rotate", "toy_shift"]


def main() -> None:
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate import LmEvalScorer
    from evomerge.merge.routing import RoutedLayer, build_routed_model
    from evomerge.merge.run import merge_from_config
    from evomerge.toy.build import load_toy_world
    from evomerge.toy.tasks import EVAL_TASKS_DIR

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("world", nargs="?", type=Path, default=Path("toy_world_compose"))
    args = parser.parse_args()
    world = load_toy_world(args.world, world="compose")
    if world is None:
        raise SystemExit(f"no current compose world in {args.world}: evomerge toy build {args.world} --world compose")

    def load(path: Path):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype="float32").eval()

    rot, sft = str(world.specialists["rotate"]), str(world.specialists["shift"])
    modules = {rot: load(rot), sft: load(sft)}
    tokenizer = AutoTokenizer.from_pretrained(rot)
    layers = modules[rot].config.num_hidden_layers
    with tempfile.TemporaryDirectory() as scratch:
        merged = load(merge_from_config({
            "merge_method": "task_arithmetic", "base_model": str(world.base), "dtype": "float32",
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in (rot, sft)],
        }, Path(scratch) / "task_arithmetic"))

    candidates = {"rotate specialist": modules[rot], "shift specialist": modules[sft], "task arithmetic rotate+shift, w=1": merged}
    for first, second, a, b in ((rot, sft, "rotate", "shift"), (sft, rot, "shift", "rotate")):
        for k in range(1, layers):
            route = [RoutedLayer(first, i) for i in range(k)] + [RoutedLayer(second, i) for i in range(k, layers)]
            candidates[f"{a} l0-{k - 1}, {b} l{k}-{layers - 1}"] = build_routed_model(route, modules)
        route = [RoutedLayer(first, i) for i in range(layers)] + [RoutedLayer(second, i) for i in range(layers)]
        candidates[f"all of {a}, then all of {b}"] = build_routed_model(route, modules)

    scorer = LmEvalScorer(TASKS, include_path=EVAL_TASKS_DIR, batch_size=64)
    table = Table(title=f"compose world {args.world}: lm-eval acc")
    table.add_column("model, merge or route")
    for task in TASKS:
        table.add_column(task.removeprefix("toy_").replace("_heldout", " held-out"), justify="right")
    for name, model in candidates.items():
        with contextlib.redirect_stderr(io.StringIO()):
            scores = scorer.score(model, tokenizer)
        table.add_row(name, *(f"{scores[f'task:{t}/acc']:.3f}" for t in TASKS))
    Console(width=160).print(table)  # full names in a log or a pipe too


if __name__ == "__main__":
    main()
