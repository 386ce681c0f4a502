"""``evomerge toy build``: the base model, its specialists, and a table that shows merging matters.

A build is all or nothing. Everything is written into a hidden sibling folder; ``manifest.json``
is written last (temp file + ``os.replace``) and the folder is then renamed into place, so an
interrupted build leaves nothing that looks complete. A folder whose manifest matches the seed and
:data:`VERSION` is reused as is.

The recipe (data, sizes, steps, learning rates) was tuned for one property: the specialists
stay in the base's basin, so their task vectors add up. What it took, measured on this toy:

- a base that already has the circuits the skills use (it copies under any instruction key,
  writes its input backwards under ``bwd:`` and counts under ``inc:``; see
  :func:`evomerge.toy.skills.base_example`). From a base that could barely copy, every specialist
  rebuilt attention and task arithmetic kept under 10% of either skill.
- gentle fine-tuning: 300 steps at 4e-4, answer-only loss, half of every batch replaying the
  base's own data. Twice the steps at twice the rate made the reversal specialist perfect and
  every merge of it useless.

The result: each specialist masters its skill; task arithmetic with weight 1 keeps nearly all of
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..store.run_folder import current_umask
from .skills import SKILLS, Example, training_stream
from .tasks import EVAL_TASKS_DIR, task_name
from .train import TrainSettings

# Bump when anything that changes the built weights or the table changes: old worlds are rebuilt.
VERSION = 1
FORMAT = "evomerge-toy-world"

# The base is trained on answers only: the inputs are random characters, and predicting them
# teaches nothing but slows the copying circuits down (about 3x more steps to copy reliably).
BASE_TRAINING = TrainSettings(steps=700, lr=3e-3, batch_size=64, warmup=20, answer_only=True)
SPECIALIST_TRAINING = TrainSettings(steps=300, lr=4e-4, batch_size=64, warmup=20, answer_only=True)
# Fraction of each fine-tuning batch drawn from the base's pretraining data: anchors the
# specialists' behaviour outside their skill, which keeps their task vectors from interfering.
REPLAY_FRACTION = 0.5
# Training runs on one thread: the matrices are far too small to gain from more, other threads
# only contend on a shared machine, and a fixed thread count keeps the weights bit-identical.
TRAIN_THREADS = 1

# The hand-set merge that the table shows keeping both skills (task arithmetic, weight per donor).
HAND_WEIGHT = 1.0


@dataclass(frozen=True)
class ToyWorld:
    """A built toy world: where its models are and what the build measured on them."""

    directory: Path
    seed: int
    base: Path
    specialists: dict[str, Path]
    # row (model or merge) -> task -> acc, as printed
    table: dict[str, dict[str, float]] = field(default_factory=dict)
    include_path: Path = EVAL_TASKS_DIR

    @property
    def manifest_path(self) -> Path:
        return self.directory / "manifest.json"


def merge_configs(base: Path, specialists: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """The merges the table shows, as mergekit configs for the project's merge engine."""
    donors = list(specialists.values())
    return {
        "linear 50/50": {
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


def table_problems(table: dict[str, dict[str, float]]) -> list[str]:
    """Every way ``table`` fails to show that merging matters; empty when it shows it.

    Specialists must clearly beat the base on their own skill and not on the others; the 50/50
    linear merge must clearly trail each specialist on its skill; the hand-set task-arithmetic
    merge must keep at least half of each specialist's advantage over the base, at once.
    """
    problems = []
    base = table["base"]
    linear = table["linear 50/50"]
    hand = table[f"task arithmetic w={HAND_WEIGHT:g}"]
    for skill in SKILLS:
        own = [task_name(skill, split) for split in ("search", "heldout")]
        for task in own:
            spec = table[skill][task]
            if spec < base[task] + CLEARLY:
                problems.append(f"{skill} specialist {spec:.3f} does not clearly beat the base {base[task]:.3f} on {task}")
            if linear[task] > spec - CLEARLY:
                problems.append(f"linear 50/50 {linear[task]:.3f} is not clearly below the {skill} specialist {spec:.3f} on {task}")
            if hand[task] - base[task] < 0.5 * (spec - base[task]):
                problems.append(f"task arithmetic {hand[task]:.3f} keeps less than half of the {skill} specialist's advantage ({base[task]:.3f} -> {spec:.3f}) on {task}")
        for other in SKILLS:
            if other == skill:
                continue
            for task in (task_name(other, split) for split in ("search", "heldout")):
                if table[skill][task] > base[task] + NOT_BETTER:
                    problems.append(f"{skill} specialist {table[skill][task]:.3f} beats the base {base[task]:.3f} on another skill's task {task}")
    return problems


def recipe_fingerprint() -> str:
    """A hash of what decides the weights besides the seed: the data, model and training code,
    the settings, and the eval data (training skips eval items). A world built from another
    recipe is rebuilt, not reused, even when someone forgot to bump :data:`VERSION`."""
    from . import skills, tokenizer, train
    from .tasks import eval_task_files

    recipe = {
        "code": [Path(module.__file__).read_text(encoding="utf-8") for module in (skills, tokenizer, train)],
        "base": asdict(BASE_TRAINING),
        "specialists": asdict(SPECIALIST_TRAINING),
        "replay": REPLAY_FRACTION,
        "eval": eval_task_files(),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def table_tasks() -> list[str]:
    """Every toy task, search and held-out split, in table column order."""
    return [task_name(skill, split) for skill in SKILLS for split in ("search", "heldout")]


def build_toy_world(directory: Path, *, seed: int = 0, force: bool = False, started: float | None = None) -> ToyWorld:
    """Builds (or reuses) the toy world in ``directory``; see the module docstring. Each stage is
    reported as it happens, with its time (:mod:`evomerge.reporter`; ``started``: the command's
    start on :func:`time.monotonic`'s clock)."""
    from ..reporter import make_reporter

    report = make_reporter(started=started)
    try:
        return _build_or_reuse(Path(directory), seed=seed, force=force, report=report)
    finally:
        report.close()


def _build_or_reuse(directory: Path, *, seed: int, force: bool, report: Any) -> ToyWorld:
    if not force:
        existing = load_toy_world(directory, seed=seed)
        if existing is not None:
            report.line(f"toy world in {directory} is complete (seed {seed}, version {VERSION}); reusing it")
            report.line(table_text(existing.table))
            return existing
    _check_replaceable(directory)

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.building-", dir=directory.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; the world is the user's folder like any other
    try:
        manifest = _build_into(staging, seed=seed, report=report)
        _write_json_atomic(staging / "manifest.json", manifest)
        _swap_into_place(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    world = load_toy_world(directory, seed=seed)
    assert world is not None, "a freshly built toy world must load"
    report.line(f"built the toy world in {directory}")
    return world


def load_toy_world(directory: Path, *, seed: int | None = None) -> ToyWorld | None:
    """The world in ``directory`` when its manifest is complete, current, and (if given) for ``seed``."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        return None
    if manifest.get("recipe") != recipe_fingerprint():
        return None
    if seed is not None and manifest.get("seed") != seed:
        return None
    models = {name: directory / rel for name, rel in manifest["models"].items()}
    if not all((path / "model.safetensors").is_file() for path in models.values()):
        return None
    return ToyWorld(
        directory=directory,
        seed=manifest["seed"],
        base=models.pop("base"),
        specialists=models,
        table=manifest["table"],
    )


def _build_into(root: Path, *, seed: int, report: Any) -> dict[str, Any]:
    started = time.perf_counter()
    with _step(report, "loading torch and building the tokenizer"):
        import torch

        from .tokenizer import build_tokenizer
        from .train import new_model, train

        tokenizer = build_tokenizer()
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        with _step(report, f"pretraining the base ({BASE_TRAINING.steps} steps)"):
            base = new_model(tokenizer, seed)
            train(base, tokenizer, training_stream("base", seed), BASE_TRAINING, seed=seed)
            _save(base, root / "base")
        base_state = {k: v.clone() for k, v in base.state_dict().items()}
        for i, skill in enumerate(SKILLS):
            with _step(report, f"fine-tuning the {skill} specialist ({SPECIALIST_TRAINING.steps} steps)"):
                base.load_state_dict(base_state)
                stream = _replay(skill, seed + 1 + i, REPLAY_FRACTION)
                train(base, tokenizer, stream, SPECIALIST_TRAINING, seed=seed + 1 + i)
                _save(base, root / skill)
        del base, base_state
    finally:
        torch.set_num_threads(threads)

    models = {"base": "base", **{skill: skill for skill in SKILLS}}
    with _step(report, "scoring models and merges with lm-eval"):
        table = measure_table(root / "base", {skill: root / skill for skill in SKILLS}, root / "_merges")
    shutil.rmtree(root / "_merges", ignore_errors=True)
    report.line(table_text(table))
    for problem in table_problems(table):
        report.notice(f"warning: {problem}")
    return {
        "format": FORMAT,
        "version": VERSION,
        "seed": seed,
        "models": models,
        "recipe": recipe_fingerprint(),
        "sha256": {name: _sha256(root / rel / "model.safetensors") for name, rel in models.items()},
        "training": {
            "base": asdict(BASE_TRAINING),
            "specialists": asdict(SPECIALIST_TRAINING),
            "replay_fraction": REPLAY_FRACTION,
        },
        "merges": {name: _relative_config(cfg, root) for name, cfg in merge_configs(root / "base", {s: root / s for s in SKILLS}).items()},
        "table": table,
        "build_seconds": round(time.perf_counter() - started, 1),
    }


def measure_table(base: Path, specialists: dict[str, Path], scratch: Path) -> dict[str, dict[str, float]]:
    """acc of the base, each specialist and each hand-set merge on every toy task, via lm-eval.

    Merges are computed by the project's merge engine into ``scratch``, loaded back with
    ``from_pretrained`` and scored by :class:`~evomerge.evaluate.LmEvalScorer`, the same path a
    user's merge takes.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..evaluate import LmEvalScorer
    from ..merge.run import merge_from_config

    tasks = table_tasks()
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


def table_text(table: dict[str, dict[str, float]]) -> str:
    """The table as rich draws it, as text no wider than the output: one row per model or
    merge, acc per task."""
    import io

    from rich.console import Console
    from rich.table import Table

    from ..reporter import output_width

    tasks = list(next(iter(table.values())).keys()) if table else []
    out = Table(title="toy world: lm-eval acc per task (toy_<skill> = search split)")
    out.add_column("model or merge", overflow="fold")
    for task in tasks:  # never narrower than a score: a narrow terminal folds the headers, not a number
        out.add_column(task.removeprefix("toy_").replace("_heldout", " held-out"), justify="right", overflow="fold",
                       min_width=len("0.000"))
    for name, scores in table.items():
        out.add_row(name, *(f"{scores[t]:.3f}" for t in tasks))
    text = io.StringIO()
    Console(file=text, width=output_width(sys.stdout) - 8).print(out)  # room for the time stamp before it
    return text.getvalue().rstrip("\n")


def _replay(skill: str, seed: int, fraction: float) -> Iterator[Example]:
    """The skill's stream with ``fraction`` of examples drawn from the base's data instead."""
    import random

    rng = random.Random(f"{seed}:replay")
    skill_stream, base_stream = training_stream(skill, seed), training_stream("base", seed)
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
