"""``evomerge toy compare RUN``: does the search's best recipe beat the obvious merges?

Scores, on the held-out split of every skill (items the search never saw), the run's best
trial against what a user would try by hand: each specialist alone, task arithmetic with weight
1 on every specialist (the build table's best hand-set merge), a 50/50 linear average and a
default TIES merge (density 0.5, equal weights). Candidates are merged in memory and scored by
the same evaluator the search workers use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import EvomergeError

TASK_ARITHMETIC_1 = "task arithmetic, weights 1"


def heldout_task(task: str) -> str:
    return task if task.endswith("_heldout") else f"{task}_heldout"


def baselines(base: str, donors: list[str]) -> dict[str, dict[str, Any]]:
    """The hand-set merges the search must beat, as mergekit configs."""
    n = len(donors)
    alone = {f"{Path(d).name} alone": {"merge_method": "linear", "dtype": "float32",
                                        "models": [{"model": d, "parameters": {"weight": 1.0}}]} for d in donors}
    return {
        **alone,
        TASK_ARITHMETIC_1: {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
                            "parameters": {"lambda": 1.0},
                            "models": [{"model": d, "parameters": {"weight": 1.0}} for d in donors]},
        "linear 50/50": {"merge_method": "linear", "dtype": "float32",
                         "models": [{"model": d, "parameters": {"weight": 1.0 / n}} for d in donors]},
        "ties default (density 0.5)": {"merge_method": "ties", "base_model": base, "dtype": "float32",
                                       "models": [{"model": d, "parameters": {"weight": 1.0 / n, "density": 0.5}} for d in donors]},
    }


def compare(run_dir: Path, *, include_path: Path | None = None) -> dict[str, dict[str, float]]:
    """Held-out scores per skill (and their mean) for the run's best trial and the baselines."""
    from ..export import choose
    from ..merge.config import parse_merge_config
    from ..recipe import Recipe
    from ..space_config import resume_config
    from ..store import RunStore
    from ..worker import CandidateEvaluator, EvalSettings, WorkerSpec

    config = resume_config(run_dir)
    store = RunStore.open(run_dir)
    try:
        weights = {o.key: o.weight for o in config.objectives}
        best = choose(store, trial=None, best=True, pareto=False, weights=weights)[0]
    finally:
        store.close()
    tasks = tuple(heldout_task(t) for t in config.task_names())
    paths = [str(Path(p).resolve()) for p in config.evaluation.include_path]
    if include_path is not None:
        paths.append(str(include_path))
    spec = WorkerSpec(
        base=config.models.base,
        donors=tuple(d.model for d in config.models.donors),
        evaluation=EvalSettings(tasks=tasks, include_path=tuple(paths) or None, batch_size=64),
    )
    evaluator = CandidateEvaluator(spec)
    rows: dict[str, dict[str, float]] = {}
    candidates = {f"search best (trial {best.number})": Recipe.from_json(best.recipe_json)}
    for name, cfg in baselines(config.models.base, list(spec.donors)).items():
        candidates[name] = Recipe(merge=parse_merge_config(cfg), params={})
    for name, recipe in candidates.items():
        result = _quietly(evaluator.evaluate, recipe.to_json())
        if result.objectives is None:
            raise EvomergeError(f"{name}: {result.error}")
        scores = {k: v for k, v in result.objectives.items() if k.startswith("task:")}
        scores["mean"] = sum(scores.values()) / len(scores)
        rows[name] = scores
    return rows


def _quietly(function: Any, *args: Any) -> Any:
    """Call ``function`` with stderr captured: lm-eval draws its progress bars with ``disable=False``
    passed explicitly, so TQDM_DISABLE cannot silence them. On an exception the capture is shown."""
    import contextlib
    import io
    import sys

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return function(*args)
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise


def print_comparison(rows: dict[str, dict[str, float]]) -> None:
    from rich.console import Console
    from rich.table import Table

    columns = list(next(iter(rows.values())))
    table = Table(title="Held-out accuracy (items the search never saw)")
    table.add_column("merge")
    for c in columns:
        table.add_column(c.removeprefix("task:").removesuffix("/acc"), justify="right")
    for name, scores in rows.items():
        table.add_row(name, *(f"{scores[c]:.3f}" for c in columns))
    Console().print(table)
