"""``evomerge toy build``: a world's base model, its specialists, and a table that shows merging matters.

Which world (specialists, data, seed) is :mod:`evomerge.toy.worlds`' job. Training and scoring
run in a child process with pinned kernels and one thread (:mod:`evomerge.toy.pinned`), so the
same seed gives the same weights on any x86-64 CPU with AVX2.

A build is all or nothing. Everything is written into a hidden sibling folder; ``manifest.json``
is written last (temp file + ``os.replace``) and the folder is then renamed into place, so an
interrupted build leaves nothing that looks complete. A folder whose manifest matches the world,
the seed, :data:`VERSION` and the recipe's fingerprint is reused as is.

The recipe (data, sizes, steps, learning rates) was tuned for one property: the specialists
stay in the base's basin, so their task vectors add up. What it took, measured on this toy:

- a base that already has the circuits the skills use (it copies under any instruction key,
  writes its input backwards under ``bwd:`` and counts under ``inc:``; see
  :func:`evomerge.toy.skills.base_example`). From a base that could barely copy, every specialist
  rebuilt attention and task arithmetic kept under 10% of either skill.
- gentle fine-tuning: 300 steps, answer-only loss, half of every batch replaying the base's own
  data, at a low rate (the pair world 1.5e-4, the compose world 4e-4; see
  :mod:`evomerge.toy.worlds`). Twice the steps at twice the rate made the reversal specialist
  perfect and every merge of it useless; under the pinned kernels, 4e-4 made task arithmetic
  lose reversal, and 1.5e-4 keeps both.

The result: each specialist masters its skill; task arithmetic with weight 1 keeps most of
both; a 50/50 average, which halves each task vector, keeps almost nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..store.run_folder import current_umask
from .skills import Example, training_stream
from .tasks import EVAL_TASKS_DIR, task_name
from .train import TrainSettings
from .worlds import DEFAULT_WORLD, world_spec

# Bump when anything that changes the built weights or the table changes: old worlds are rebuilt.
# 2: kernels and threads pinned (pinned.py), which changed the pair world's weights; worlds.
VERSION = 2
FORMAT = "evomerge-toy-world"

# The base is trained on answers only (every world's settings in worlds.py): the inputs are random
# characters, and predicting them teaches nothing but slows the copying circuits down (about 3x
# more steps to copy reliably). Specialists train 300 steps, half of each batch replayed.

# The hand-set merge that the table shows keeping both skills (task arithmetic, weight per donor).
HAND_WEIGHT = 1.0


@dataclass(frozen=True)
class ToyWorld:
    """A built toy world: where its models are and what the build measured on them."""

    directory: Path
    seed: int
    world: str
    base: Path
    specialists: dict[str, Path]
    # row (model or merge) -> task -> acc, as printed
    table: dict[str, dict[str, float]] = field(default_factory=dict)
    include_path: Path = EVAL_TASKS_DIR

    @property
    def manifest_path(self) -> Path:
        return self.directory / "manifest.json"


def linear_row(donors: int) -> str:
    """The table's name for the plain average of ``donors`` specialists."""
    return "linear 50/50" if donors == 2 else f"linear 1/{donors} each"


def merge_configs(base: Path, specialists: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """The merges the table shows, as mergekit configs for the project's merge engine."""
    donors = list(specialists.values())
    return {
        linear_row(len(donors)): {
            "merge_method": "linear",
            "models": [{"model": str(p), "parameters": {"weight": 1.0 / len(donors)}} for p in donors],
            "dtype": "float32",
        },
        f"task arithmetic w={HAND_WEIGHT:g}": {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": HAND_WEIGHT}} for p in donors],
            "dtype": "float32",
        },
        "ties d=0.5 w=1": {
            "merge_method": "ties",
            "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in donors],
            "dtype": "float32",
        },
    }


# What "merging matters" means, in acc points (fractions of items), checked on both splits.
CLEARLY = 0.2  # a specialist beats the base on its skill, and the 50/50 average trails it, by this
NOT_BETTER = 0.05  # a specialist is at most this far above the base on another skill


def table_problems(table: dict[str, dict[str, float]], world: str = DEFAULT_WORLD) -> list[str]:
    """Every way ``table`` fails to show that merging matters; empty when it shows it.

    Specialists must clearly beat the base on their own skill and not on the others; the plain
    linear average must clearly trail each specialist on its skill; where the world asks for it
    (``hand_merge_keeps_half``), the hand-set task-arithmetic merge must keep at least half of
    each specialist's advantage over the base, at once. A composed task must not be solved by
    any single specialist.
    """
    spec = world_spec(world)
    problems = []
    base = table["base"]
    linear_name = linear_row(len(spec.specialists))
    linear = table[linear_name]
    hand = table[f"task arithmetic w={HAND_WEIGHT:g}"]
    for skill in spec.specialists:
        own = [task_name(skill, split) for split in ("search", "heldout")]
        for task in own:
            own_score = table[skill][task]
            if own_score < base[task] + CLEARLY:
                problems.append(f"{skill} specialist {own_score:.3f} does not clearly beat the base {base[task]:.3f} on {task}")
            if linear[task] > own_score - CLEARLY:
                problems.append(f"{linear_name} {linear[task]:.3f} is not clearly below the {skill} specialist {own_score:.3f} on {task}")
            if spec.hand_merge_keeps_half and hand[task] - base[task] < 0.5 * (own_score - base[task]):
                problems.append(f"task arithmetic {hand[task]:.3f} keeps less than half of the {skill} specialist's advantage ({base[task]:.3f} -> {own_score:.3f}) on {task}")
        for other in spec.specialists:
            if other == skill:
                continue
            for task in (task_name(other, split) for split in ("search", "heldout")):
                if table[skill][task] > base[task] + NOT_BETTER:
                    problems.append(f"{skill} specialist {table[skill][task]:.3f} beats the base {base[task]:.3f} on another skill's task {task}")
        for composed in spec.composed:
            for task in (task_name(composed, split) for split in ("search", "heldout")):
                if table[skill][task] > base[task] + NOT_BETTER:
                    problems.append(f"{skill} specialist {table[skill][task]:.3f} alone beats the base {base[task]:.3f} on the composed task {task}")
    return problems


def scaled(settings: TrainSettings, fraction: float) -> TrainSettings:
    """``settings`` with ``fraction`` of the steps (at least 2, warm-up at most half): reduced
    builds for tests, which check how a world is built, not what it learns."""
    if fraction == 1.0:
        return settings
    steps = max(2, round(settings.steps * fraction))
    return replace(settings, steps=steps, warmup=min(settings.warmup, steps // 2))


def recipe_fingerprint(world: str = DEFAULT_WORLD, steps_fraction: float = 1.0) -> str:
    """A hash of what decides the weights besides the seed: the data, model, training and
    kernel-pinning code, the world's settings, the eval data (training skips eval items) and the
    torch version (its kernels change between releases). A world built from another recipe is
    rebuilt, not reused, even when someone forgot to bump :data:`VERSION`."""
    import importlib

    import torch

    from . import pinned, skills, tokenizer, train
    from .tasks import eval_task_files

    spec = world_spec(world)
    modules = [skills, tokenizer, train, pinned, *(importlib.import_module(f"{__package__}.{m}") for m in spec.data_modules)]
    own_tasks = {f"{task}.{ext}" for task in table_tasks(world) for ext in ("yaml", "jsonl")}
    recipe = {
        "code": [Path(module.__file__).read_text(encoding="utf-8") for module in modules],
        "world": {k: v for k, v in asdict(spec).items() if k != "hand_merge_keeps_half"},  # the table's, not the weights
        "steps_fraction": steps_fraction,
        "eval": {name: text for name, text in eval_task_files().items() if name in own_tasks},
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def table_tasks(world: str = DEFAULT_WORLD) -> list[str]:
    """Every task of a world, search and held-out split, in table column order."""
    return [task_name(skill, split) for skill in world_spec(world).skills for split in ("search", "heldout")]


def build_toy_world(
    directory: Path,
    *,
    seed: int | None = None,
    world: str = DEFAULT_WORLD,
    force: bool = False,
    steps_fraction: float = 1.0,
    score: bool = True,
    started: float | None = None,
) -> ToyWorld:
    """Builds (or reuses) a toy world in ``directory``; see the module docstring.

    ``seed`` defaults to the world's own. ``steps_fraction`` < 1 and ``score=False`` make the
    reduced, unscored builds that tests use; such a world is never taken for a full one. Each
    stage is reported as it happens, with its time (:mod:`evomerge.reporter`; ``started``: the
    command's start on :func:`time.monotonic`'s clock, which the pinned child shares).
    """
    from ..reporter import make_reporter

    spec = world_spec(world)
    seed = spec.default_seed if seed is None else seed
    report = make_reporter(started=started)
    try:
        return _build_or_reuse(Path(directory), world=world, seed=seed, force=force, steps_fraction=steps_fraction,
                               score=score, started=started, report=report)
    finally:
        report.close()


def _build_or_reuse(directory: Path, *, world: str, seed: int, force: bool, steps_fraction: float, score: bool,
                    started: float | None, report: Any) -> ToyWorld:
    if not force:
        existing = load_toy_world(directory, seed=seed, world=world, steps_fraction=steps_fraction)
        if existing is not None:
            report.line(f"toy world {world!r} in {directory} is complete (seed {seed}, version {VERSION}); reusing it")
            if existing.table:
                report.line(table_text(existing.table, world=world))
            return existing
    _check_replaceable(directory)

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.building-", dir=directory.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; the world is the user's folder like any other
    try:
        from .pinned import run_pinned_module

        build_started = time.perf_counter()
        request = {"world": world, "seed": seed, "steps_fraction": steps_fraction, "score": score, "started": started}
        _write_json_atomic(staging / _REQUEST, request)
        run_pinned_module(__name__, [str(staging)])
        manifest = json.loads((staging / _RESULT).read_text(encoding="utf-8"))
        (staging / _REQUEST).unlink()
        (staging / _RESULT).unlink()
        manifest["build_seconds"] = round(time.perf_counter() - build_started, 1)
        _write_json_atomic(staging / "manifest.json", manifest)
        _swap_into_place(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    built = load_toy_world(directory, seed=seed, world=world, steps_fraction=steps_fraction)
    assert built is not None, "a freshly built toy world must load"
    report.line(f"built the toy world {world!r} in {directory}")
    return built


def load_toy_world(
    directory: Path, *, seed: int | None = None, world: str = DEFAULT_WORLD, steps_fraction: float = 1.0
) -> ToyWorld | None:
    """The world in ``directory`` when its manifest is complete, current, of ``world`` built with
    ``steps_fraction`` of the steps, and (if given) for ``seed``."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        return None
    if manifest.get("world") != world or manifest.get("steps_fraction") != steps_fraction:
        return None
    if manifest.get("recipe") != recipe_fingerprint(world, steps_fraction):
        return None
    if seed is not None and manifest.get("seed") != seed:
        return None
    if steps_fraction == 1.0 and not manifest.get("table"):
        return None  # an unscored build is a test's, never a full world
    models = {name: directory / rel for name, rel in manifest["models"].items()}
    if not all((path / "model.safetensors").is_file() for path in models.values()):
        return None
    return ToyWorld(
        directory=directory,
        seed=manifest["seed"],
        world=manifest["world"],
        base=models.pop("base"),
        specialists=models,
        table=manifest["table"],
    )


# The parent hands the child its request and reads back the manifest through these files.
_REQUEST, _RESULT = ".build-request.json", ".build-result.json"


def _build_into(root: Path, *, world: str, seed: int, steps_fraction: float, score: bool, report: Any) -> dict[str, Any]:
    """Trains and scores a world into ``root``; returns its manifest. Runs in the pinned child."""
    from .pinned import pin_this_process
    from .tokenizer import build_tokenizer
    from .train import new_model, train

    kernels = pin_this_process()
    spec = world_spec(world)
    base_training = scaled(spec.base_training, steps_fraction)
    specialist_training = scaled(spec.specialist_training, steps_fraction)
    tokenizer = build_tokenizer()
    with _step(report, f"pretraining the {world} world's base ({base_training.steps} steps)"):
        base = new_model(tokenizer, seed)
        train(base, tokenizer, training_stream(spec.base_data, seed), base_training, seed=seed)
        _save(base, root / "base")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    for i, skill in enumerate(spec.specialists):
        with _step(report, f"fine-tuning the {skill} specialist ({specialist_training.steps} steps)"):
            base.load_state_dict(base_state)
            stream = _replay(skill, spec.base_data, seed + 1 + i, spec.replay_fraction)
            train(base, tokenizer, stream, specialist_training, seed=seed + 1 + i)
            _save(base, root / skill)
    del base, base_state

    models = {"base": "base", **{skill: skill for skill in spec.specialists}}
    table: dict[str, dict[str, float]] = {}
    if score:
        with _step(report, "scoring models and merges with lm-eval"):
            table = measure_table(root / "base", {s: root / s for s in spec.specialists}, root / "_merges", world=world)
        shutil.rmtree(root / "_merges", ignore_errors=True)
        report.line(table_text(table, world=world))
        for problem in table_problems(table, world):
            report.notice(f"warning: {problem}")
    return {
        "format": FORMAT,
        "version": VERSION,
        "world": world,
        "seed": seed,
        "steps_fraction": steps_fraction,
        "models": models,
        "recipe": recipe_fingerprint(world, steps_fraction),
        "kernels": kernels,
        "sha256": {name: _sha256(root / rel / "model.safetensors") for name, rel in models.items()},
        "training": {
            "base": asdict(base_training),
            "specialists": asdict(specialist_training),
            "replay_fraction": spec.replay_fraction,
        },
        "merges": {name: _relative_config(cfg, root) for name, cfg in merge_configs(root / "base", {s: root / s for s in spec.specialists}).items()},
        "table": table,
    }


def _child_main(staging: str) -> None:
    """The pinned child: builds what the request in ``staging`` asks, writes the manifest back."""
    from ..quiet import quiet_libraries
    from ..reporter import make_reporter

    quiet_libraries()  # transformers draws "Writing model shards" for every model saved
    root = Path(staging)
    request = json.loads((root / _REQUEST).read_text(encoding="utf-8"))
    report = make_reporter(started=request.pop("started"))
    try:
        manifest = _build_into(root, report=report, **request)
    finally:
        report.close()
    _write_json_atomic(root / _RESULT, manifest)


def measure_table(base: Path, specialists: dict[str, Path], scratch: Path, *, world: str = DEFAULT_WORLD) -> dict[str, dict[str, float]]:
    """acc of the base, each specialist and each hand-set merge on every task of the world, via lm-eval.

    Merges are computed by the project's merge engine into ``scratch``, loaded back with
    ``from_pretrained`` and scored by :class:`~evomerge.evaluate.LmEvalScorer`, the same path a
    user's merge takes.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..evaluate import LmEvalScorer
    from ..merge.run import merge_from_config

    tasks = table_tasks(world)
    scorer = LmEvalScorer(tasks, include_path=EVAL_TASKS_DIR, batch_size=64)
    rows: dict[str, Path] = {"base": base, **specialists}
    for i, (name, config) in enumerate(merge_configs(base, specialists).items()):
        rows[name] = merge_from_config(config, scratch / f"merge{i}")
    table: dict[str, dict[str, float]] = {}
    with _quiet_progress_bars():
        for name, path in rows.items():
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype="float32")
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            scores = scorer.score(model.eval(), tokenizer)
            table[name] = {task: round(scores[f"task:{task}/acc"], 4) for task in tasks}
    return table


def table_text(table: dict[str, dict[str, float]], *, world: str = DEFAULT_WORLD) -> str:
    """The table as rich draws it, as text no wider than the output: one row per model or
    merge, acc per task."""
    from rich.console import Console
    from rich.table import Table

    from ..reporter import output_width

    tasks = list(next(iter(table.values())).keys()) if table else []
    out = Table(title=f"toy world {world!r}: lm-eval acc per task (toy_<skill> = search split)")
    out.add_column("model or merge", overflow="fold")
    for task in tasks:  # never narrower than a score: a narrow terminal folds the headers, not a number
        out.add_column(task.removeprefix("toy_").replace("_heldout", " held-out"), justify="right", overflow="fold",
                       min_width=len("0.000"))
    for name, scores in table.items():
        out.add_row(name, *(f"{scores[t]:.3f}" for t in tasks))
    text = io.StringIO()
    Console(file=text, width=output_width(sys.stdout) - 8).print(out)  # room for the time stamp before it
    return text.getvalue().rstrip("\n")


def _replay(skill: str, base_data: str, seed: int, fraction: float) -> Iterator[Example]:
    """The skill's stream with ``fraction`` of examples drawn from the base's data instead."""
    import random

    rng = random.Random(f"{seed}:replay")
    skill_stream, base_stream = training_stream(skill, seed), training_stream(base_data, seed)
    while True:
        yield next(base_stream) if rng.random() < fraction else next(skill_stream)


def _save(model, folder: Path) -> None:
    from .tokenizer import save_tokenizer

    model.save_pretrained(str(folder), safe_serialization=True)
    save_tokenizer(folder)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _relative_config(config: dict[str, Any], root: Path) -> dict[str, Any]:
    """A merge config with model paths relative to the world folder, for the manifest."""
    text = json.dumps(config).replace(str(root) + "/", "")
    return json.loads(text)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _check_replaceable(directory: Path) -> None:
    """Refuse to replace a folder that is neither empty nor a toy world: it may be the user's."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ModelError(f"{directory} exists and is not a folder; choose another toy world folder")
    if any(directory.iterdir()) and not (directory / "manifest.json").is_file():
        raise ModelError(
            f"{directory} exists, is not empty and holds no toy world manifest; "
            "refusing to replace it. Choose another folder or empty this one."
        )


def _swap_into_place(staging: Path, directory: Path) -> None:
    """Rename the finished build to ``directory``, moving any old world aside first."""
    if directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
        os.replace(directory, old / "world")
        os.replace(staging, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, directory)


@contextmanager
def _step(report: Any, what: str) -> Iterator[None]:
    report.begin(what)
    yield
    report.done(f"{what}: done")


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Hides what lm-eval and transformers draw on stderr (a dozen progress bars per model scored);
    shows it after all if scoring fails, since it may then say why."""
    captured = io.StringIO()
    try:
        with redirect_stderr(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise


if __name__ == "__main__":
    _child_main(sys.argv[1])
