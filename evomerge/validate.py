"""``evomerge validate space.yaml``: a dry run. Every check a search makes before it starts, then
one real evaluation of the base model, and nothing written.

The checks are the search's own (:func:`evomerge.prepare.prepare`, imported once below, so a
check added there is a check here), in the order the search makes them: the space file, a
two-stage route's first-stage merge, the models, the tasks and metrics, the Ray address, and
whether the run name is free or holds this same config. Then the base model scores one item of
each task, in this process, through the scorer every worker uses (:class:`LmEvalScorer`): a task
that lm-eval cannot run, or a metric it does not report, fails here in seconds instead of in
every trial of the night's search. No run folder, no ``runs/``, no Ray cluster.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import ConfigError, EvomergeError
from .prepare import Prepared, eval_settings, prepare, resolve_merged  # the search's own checks
from .space_config import SpaceConfig, load_space_config


@dataclass
class ModelSummary:
    field: str  # the space-file field that names it: models.base, models.donors[0]
    reference: str
    layers: int
    parameters: int
    bytes: int
    dtypes: tuple[str, ...]


@dataclass
class Checked:
    """What the checks found, for the summary a person reads."""

    config: SpaceConfig
    prepared: Prepared
    models: list[ModelSummary]
    run_state: str  # what a search would do with the run folder


def check(space_file: Path, *, runs_dir: Path = Path("runs"), ray_address: str | None = None) -> Checked:
    """Run every check ``evomerge search`` makes before it starts; raise its error, write nothing."""
    from .merge_dtype import resolve_merge_dtype
    from .model_refs import resolve_config
    from .pool.ray_pool import check_reachable

    loaded = load_space_config(space_file)
    config = resolve_merged(resolve_merge_dtype(resolve_config(loaded), as_loaded=loaded))  # as the search resolves them
    prepared = prepare(config)
    from .preflight import check_run_inputs

    check_run_inputs(config, runs_dir=runs_dir, ray_address=ray_address)  # storage, Ray address, runs folder, workers
    check_reachable(ray_address or config.workers.ray_address)
    models = [_summary(f, ref) for f, ref in _model_fields(config)]
    return Checked(config, prepared, models, _run_state(config, runs_dir))


def _model_fields(config: SpaceConfig) -> list[tuple[str, str]]:
    return [("models.base", config.models.base),
            *((f"models.donors[{i}]", d.model) for i, d in enumerate(config.models.donors))]


def _summary(field: str, reference: str) -> ModelSummary:
    """Sizes from the safetensors headers (nothing is loaded)."""
    from .merge.model_folder import ModelFolder

    folder = ModelFolder(reference)
    parameters = size = 0
    dtypes: set[str] = set()
    for name in folder.tensor_names:
        dtype = folder.dtype(name)
        count = math.prod(folder.shape(name))
        parameters += count
        size += count * dtype.itemsize
        dtypes.add(str(dtype).removeprefix("torch."))
    return ModelSummary(field, reference, folder.num_layers, parameters, size, tuple(sorted(dtypes)))


def _run_state(config: SpaceConfig, runs_dir: Path) -> str:
    """Whether the search would create the run, resume it, or refuse a different config under
    its name: the run store's own check (:func:`~evomerge.store.run_folder.check_same_run`),
    which reads files only (opening the trial database could create SQLite's side files)."""
    from .model_refs import earlier_hash
    from .search import config_diff
    from .store.run_folder import check_same_run

    folder = Path(runs_dir) / config.name
    if not check_same_run(folder, config.to_yaml(), config.config_hash(), diff=config_diff(config),
                          earlier_hashes=(earlier_hash(config),)):
        return f"{folder} does not exist yet: the search creates it"
    return f"{folder} holds this config: the search resumes it"


def score_base(checked: Checked) -> tuple[dict[str, float], dict[str, tuple[int, int]], float]:
    """Score the base on the first of each task's search items, as a worker scores a candidate.

    Returns the scores by objective name, each task's (items a trial scores, items the task has),
    and the seconds scoring took. A scoring failure is an :class:`EvomergeError`: it is what this
    command is for, and the search would fail every trial on it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluate import LmEvalScorer
    from .merge.model_folder import ModelFolder

    config = checked.config
    settings = replace(eval_settings(config, None), batch_size=1)  # as the workers get them, one item at a time
    tasks = list(settings.tasks)
    counting = LmEvalScorer(tasks, **settings.scorer_options())
    totals = {t: counting.num_docs(t) for t in tasks}
    searched = checked.prepared.samples or {}
    items = {t: (len(searched[t]) if t in searched else totals[t], totals[t]) for t in tasks}
    first = {t: [searched[t][0] if t in searched else 0] for t in tasks}
    scorer = LmEvalScorer(tasks, **replace(settings, samples=first).scorer_options())
    path = ModelFolder(config.models.base).path
    dtype = getattr(torch, config.dtype)
    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=config.trust_remote_code)
        model.eval()
        with _quiet_stderr():
            scores = scorer.score(model, tokenizer)
    except EvomergeError:
        raise
    except Exception as err:  # noqa: BLE001  (whatever lm-eval or transformers raise, said in one line)
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise EvomergeError(f"{config.source}: scoring the base model with lm-eval failed "
                            f"({type(err).__name__}: {first_line[:300]}); the search would fail every trial") from None
    seconds = time.perf_counter() - start
    for i, objective in enumerate(config.objectives):
        if objective.task is not None and objective.key not in scores:
            raise ConfigError(f"lm-eval reported no {objective.key} (it reported {', '.join(sorted(scores))})",
                              where=f"{config.source}: objectives[{i}]")
    return scores, items, seconds


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence what lm-eval writes while scoring: progress bars it draws whatever TQDM_DISABLE
    says (it passes ``disable=`` itself) and ``git`` errors from the environment information it
    collects in a subprocess, so at the file-descriptor level. A failure still arrives as the
    exception, which the caller words in one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def describe(checked: Checked) -> list[str]:
    """The summary lines: what was checked and what the search would run."""
    from .memory_plan import format_bytes

    config, space = checked.config, checked.prepared.space
    lines = [f"{config.source}: the space file, the models, the tasks and their metrics pass every check "
             "`evomerge search` makes before it starts"]
    lines.append("models:")
    for m in checked.models:
        lines.append(f"  {m.field}: {m.reference} ({m.layers} layers, {_count(m.parameters)} parameters, "
                     f"{format_bytes(m.bytes)} in {'/'.join(m.dtypes)})")
    names = space.names
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    lines.append(f"search space: {len(names)} coordinates ({shown}); candidates merged in {config.dtype}")
    lines.append("objectives: " + ", ".join(f"{o.key} ({o.direction})" for o in config.objectives))
    if config.constraints:
        lines.append("constraints: " + ", ".join(
            f"{c.key} at most {c.max:g}" if c.max is not None else f"{c.key} at least {c.min:g}"
            for c in config.constraints))
    s = config.search
    extra = f", population {s.population}" if s.population else ""
    lines.append(f"driver: {s.driver}, budget {s.budget} trials{extra}, seed {s.seed}")
    if s.hand_set_on:  # what a new run starts with (a resumed one never repeats them)
        from .hand_set import hand_set_points

        points, notices = hand_set_points(space)
        if points:
            lines.append(f"hand-set trials first ({len(points)}, within the budget): "
                         + ", ".join(p.label.removeprefix("hand-set: ") for p in points))
        lines += [f"  {n}" for n in notices]
    else:
        lines.append("hand-set trials: off (search.hand_set: false)")
    w = config.workers
    where = f"on the Ray cluster at {w.ray_address}" if w.ray_address else "on a local Ray cluster"
    lines.append(f"workers: {w.count} {where}, {w.cpus_per_worker:g} CPU and {w.gpus_per_worker:g} GPU each"
                 + (f", {w.timeout_s:g} s per candidate at most" if w.timeout_s else ""))
    from .search import cma_idle_notice

    idle = cma_idle_notice(config, space.unit_dimension)
    if idle:
        lines.append(f"  {idle}")
    lines += checked.prepared.memory.describe()
    lines.append(f"run: {checked.run_state}")
    return lines


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


