"""``evomerge export``: a trial's recipe as plain mergekit YAML.

The recipe a trial stored is the complete mergekit config the worker merged (the run's model
references, every parameter explicit, per-layer values as gradients of one value per layer), so
export writes it out as it is: running ``mergekit-yaml`` or ``evomerge merge`` on the file gives
the weights the search evaluated. The references are the run's resolved ones (absolute folders,
pinned Hub ids: :mod:`evomerge.model_refs`), so the file works from any folder; a recipe recorded
by an earlier version, with the paths as written, is renamed through the run's stored config. A routed recipe is a ``passthrough`` config in ``slices:``
form; one that routes over its own parameter merge is a multi-stage file (``mergekit-multi``'s
format: the merge named ``merged``, then the route that names it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import EvomergeError
from .model_refs import portable_recipe
from .recipe import Recipe


def _header(run: str, record: Any, directions: Mapping[str, str]) -> str:
    lines = [f"# evomerge run {run!r}, trial {record.number}"]
    if "stopped_at_rung" in record.attrs:
        lines.append(f"# stopped at rung {record.attrs['stopped_at_rung']}: the scores below are means over fewer items")
    for name, value in (record.objectives or {}).items():
        arrow = {"maximize": " (maximize)", "minimize": " (minimize)"}.get(directions.get(name, ""), "")
        lines.append(f"#   {name} = {value:.6g}{arrow}")
    recipe = Recipe.from_json(record.recipe_json)
    seed = recipe.merge.random_seed if recipe.merge is not None else None
    if len(recipe.stages()) > 1:
        lines.append("# a parameter merge, then a layer route over it: run with `mergekit-multi THIS.yaml "
                     "--intermediate-dir DIR --out-path OUT` or `evomerge merge THIS.yaml OUT`")
    if seed is not None:
        lines.append(f"# random method: reproduce with `mergekit-yaml THIS.yaml OUT --random-seed {seed}` (statistically)")
        lines.append("# or exactly with `evomerge merge THIS.yaml OUT`, which reads random_seed below")
    return "\n".join(lines) + "\n"


def _run_config(run_dir: Path) -> Any:
    """The run's stored config (which maps the models as written to where they are), if readable."""
    from .space_config import resume_config

    try:
        return resume_config(run_dir)
    except EvomergeError:
        return None


def _as_written(run_config: Any) -> str:
    """Comment lines saying how the space file named the models the export names by full path."""
    written = (run_config.as_written or {}) if run_config is not None else {}
    return "".join(f"# the space file's {field}: {value}\n" for field, value in written.items())


def scalar_score(record: Any, directions: Mapping[str, str], weights: Mapping[str, float] | None = None) -> float:
    """The weighted sum a single 'best' is chosen by: CMA-ES's own scalarisation of the objectives,
    with any broken constraint ranking a trial below every feasible one."""
    from .objectives import ObjectiveSpec, scalarize

    measured = record.objectives or {}
    if any(name not in measured for name in directions):
        return float("-inf")
    specs = [ObjectiveSpec(name, d, (weights or {}).get(name, 1.0)) for name, d in directions.items()]
    return scalarize(measured, specs) - 1e6 * getattr(record, "violation", 0.0)


def choose(store: Any, *, trial: int | None, best: bool, pareto: bool, weights: Mapping[str, float] | None = None) -> list[Any]:
    """The trials to export: one by number, the best by weighted score, or the whole front."""
    records = [r for r in store.trials() if r.state == "complete" and r.recipe_json]
    if not records:
        raise EvomergeError(f"{store.path}: no completed trial to export yet")
    if trial is not None:
        found = [r for r in records if r.number == trial]
        if not found:
            numbers = ", ".join(str(r.number) for r in records[:20])
            raise EvomergeError(f"{store.path}: trial {trial} is not a completed trial; completed: {numbers}")
        return found
    if pareto:
        return sorted(store.pareto(), key=lambda r: r.number)
    from .rungs import full_fidelity

    whole = [r for r in records if full_fidelity(r)]  # a trial stopped at a lower rung was scored on fewer items
    if not whole:
        raise EvomergeError(f"{store.path}: no trial was scored on every item yet (all stopped at a lower rung); "
                            "export one with --trial N")
    return [max(whole, key=lambda r: scalar_score(r, store.directions, weights))]


def check_out_path(out: Path, *, single: bool) -> None:
    """``-o`` names a new .yaml file, an earlier export (replaced), or a folder; never a user's other file."""
    yaml_file = single and out.suffix in (".yaml", ".yml")
    if yaml_file and out.is_dir():
        raise EvomergeError(f"-o {out} is a folder; give a new .yaml file name, or the folder without .yaml")
    if yaml_file and out.is_file() and not out.read_text(encoding="utf-8", errors="replace").startswith("# evomerge run "):
        raise EvomergeError(f"-o {out} exists and is not an evomerge export; choose another file name, or remove it first")
    if not yaml_file and out.exists() and not out.is_dir():
        what = "a .yaml file name holds one trial only" if out.suffix in (".yaml", ".yml") else "give a folder or a .yaml file name"
        raise EvomergeError(f"-o {out} is a file, and several recipes go into a folder; {what}" if not single else
                            f"-o {out} is a file that is not .yaml; {what}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise EvomergeError(f"-o {out}: {parent} is a file, not a folder")
            break


def export(store: Any, records: Sequence[Any], out: Path | None) -> list[Path]:
    """Write each record's recipe; ``out`` is a file for one record, a folder for several."""
    run = store.path.name
    written: list[Path] = []
    if out is None:
        out = store.path / "exports"
    if len(records) > 1 and out.suffix in (".yaml", ".yml"):
        # a folder named a.yaml holding several files is not what anyone asking for a.yaml wants
        raise EvomergeError(
            f"-o {out} names one file, but {len(records)} recipes are to be written (trials "
            f"{', '.join(str(r.number) for r in records[:8])}{', ...' if len(records) > 8 else ''}); give a folder "
            f"(-o {out.with_suffix('')}/), or export one of them with --trial N"
        )
    check_out_path(out, single=len(records) == 1)
    run_config = _run_config(store.path)
    for r in records:
        recipe = portable_recipe(Recipe.from_json(r.recipe_json), run_config)  # works from any folder
        text = _header(run, r, store.directions) + _as_written(run_config) + recipe.to_yaml()
        if len(records) == 1 and out.suffix in (".yaml", ".yml"):
            target = out
        else:
            target = out / f"trial_{r.number:05d}.yaml"
        target.parent.mkdir(parents=True, exist_ok=True)
        from .store import write_atomic

        write_atomic(target, text)
        written.append(target)
    return written
