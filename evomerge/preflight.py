"""Checks of everything a trial will use, made before the run folder exists.

A search that is accepted and then fails every trial (an lm-eval argument ``simple_evaluate``
does not take, more few-shot examples than a task has) wastes the night it was started for; one
that fails after its folder was made (a negative seed, an unreachable database) leaves a folder
that blocks the corrected config. Each function here checks one thing and raises a
:class:`~evomerge.errors.ConfigError` (exit 2) naming the file, the field and the fix. ``prepare``
in :mod:`evomerge.search` calls the ones that need only the config and its models/tasks;
:func:`check_run_inputs` does those that need the command line too (runs folder, Ray address).
"""

from __future__ import annotations

import inspect
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, EvomergeError, close_matches

#: numpy's and pycma's seeds are unsigned 32-bit numbers.
SEED_RANGE = (0, 2**32 - 1)
#: A donor whose difference from the base is this large a fraction of the base is not a fine-tune
#: of it. Fine-tunes sit far below (the toy world's specialists at about 0.1, published
#: fine-tunes of 7B models at a few percent); an unrelated model of the same shape is near 1.4
#: (two independent random tensors of one size differ by sqrt(2) times either).
UNRELATED_DONOR_RATIO = 0.5
#: How many tensors the donor/base ratio reads: a few are enough to tell a fine-tune from a
#: stranger, and reading all of a 7B model would take a minute.
RATIO_TENSORS = 4


# ---- the space file alone ------------------------------------------------------------------


def check_seeds(config: Any) -> None:
    """``search.seed`` seeds numpy and pycma, which take 0 .. 2**32-1 only."""
    low, high = SEED_RANGE
    seed = config.search.seed
    if not low <= seed <= high:
        raise ConfigError(f"seed {seed} is outside {low} .. {high} (numpy's and pycma's range); use e.g. 0",
                          where=f"{config.source}: search.seed")


def valid_range(name: str, methods: Sequence[str]) -> tuple[float, float] | None:
    """Where parameter ``name`` is defined for every one of ``methods`` (the registry's
    ``Param.valid_range``, intersected); None when they all take any value (or it is a flag)."""
    from .merge.registry import get_method

    low, high = -math.inf, math.inf
    for method in methods:
        declared = [p for p in get_method(method).params if p.name == name]
        if declared and declared[0].valid_range is not None:
            low, high = max(low, declared[0].valid_range[0]), min(high, declared[0].valid_range[1])
    return None if (low, high) == (-math.inf, math.inf) else (low, high)


def check_parameter_ranges(config: Any) -> None:
    """Every pinned value, searched range and start point lies where its method defines it."""
    for p in config.parameters():
        # a pinned value reaches every method that takes it; searched values only those that search it
        valid = valid_range(p.name, p.taken_by if p.mode == "fixed" else p.searched_by)
        if valid is None:
            continue
        field = f"{config.source}: merge.parameters.{p.name}"
        if p.mode == "fixed" and isinstance(p.value, (int, float)) and not isinstance(p.value, bool):
            _within(p.name, p.value, valid, field)
        if p.mode == "search" and p.range is not None:
            low, high = p.range
            if low < valid[0] or high > valid[1]:
                raise ConfigError(f"range [{low:g}, {high:g}] reaches outside [{valid[0]:g}, {valid[1]:g}], where "
                                  f"{p.name} is defined; narrow it", where=f"{field}.range")
            if p.init is not None:
                _within(p.name, p.init, valid, f"{field}.init")


def _within(name: str, value: float, valid: tuple[float, float], where: str) -> None:
    if not valid[0] <= value <= valid[1]:
        raise ConfigError(f"{name} {value:g} is outside [{valid[0]:g}, {valid[1]:g}], where {name} is defined",
                          where=where)


def check_lm_eval_args(config: Any) -> None:
    """``evaluation.lm_eval_args`` go to ``simple_evaluate``: refuse a key it does not take."""
    from lm_eval import evaluator

    params = inspect.signature(evaluator.simple_evaluate).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for key in config.evaluation.lm_eval_args:
        if key not in params:
            raise ConfigError(
                f"lm-eval's simple_evaluate takes no argument {key!r}.{close_matches(key, params)} "
                "Remove it, or see `help(lm_eval.simple_evaluate)` for what it takes",
                where=f"{config.source}: evaluation.lm_eval_args.{key}",
            )


def check_num_fewshot(config: Any, scorer: Any) -> None:
    """Each task must have more documents to draw few-shot examples from than it asks for.

    lm-eval draws ``num_fewshot + 1`` documents and drops the one being scored, so a task whose
    pool is not larger fails every single item.
    """
    for task in config.task_names():
        shots = config.evaluation.for_task(task).num_fewshot
        if not shots:
            continue
        pool = scorer.fewshot_pool_size(task)
        if shots > pool - 1:
            field = f"evaluation.tasks.{task}.num_fewshot" if task in config.evaluation.tasks and \
                config.evaluation.tasks[task].num_fewshot is not None else "evaluation.num_fewshot"
            raise ConfigError(
                f"{shots} few-shot examples asked, but task {task!r} has {pool} documents to draw them from "
                f"(one of them the item being scored); use at most {max(pool - 1, 0)}",
                where=f"{config.source}: {field}",
            )


# ---- the models ----------------------------------------------------------------------------


def check_distinct_models(config: Any, folders: Mapping[str, Any]) -> None:
    """The base and each donor are different folders, however they are spelled.

    ``toy_world/arith`` and ``toy_world/arith/`` (or a symlink) are one model: listed twice it
    would get two weights and twice the say in the merge, and the base as a donor has a task
    vector of zeros.
    """
    def identity(folder: Any) -> tuple[Path, Path | None]:
        """The model a reference means: its folder, and its LoRA adapter's folder for ``base+adapter``."""
        adapter = getattr(folder, "adapter", None)
        return Path(folder.path).resolve(), Path(adapter.path).resolve() if adapter is not None else None

    base = config.models.base
    seen: dict[tuple[Path, Path | None], str] = {identity(folders[base]): "models.base"}
    for i, donor in enumerate(config.models.donors):
        real = identity(folders[donor.model])
        if real in seen:
            other = seen[real]
            what = "the base; donors are the fine-tunes of it" if other == "models.base" else \
                f"the same folder as {other}; list each donor once"
            shown = str(real[0]) + (f"+{real[1]}" if real[1] is not None else "")
            raise ConfigError(f"{donor.model!r} ({shown}) is {what}", where=f"{config.source}: models.donors[{i}].model")
        seen[real] = f"models.donors[{i}]"


def donor_base_ratios(base: Any, donor: Any, count: int = RATIO_TENSORS) -> float | None:
    """||donor - base|| / ||base|| over ``count`` matrices both models hold (None: none in common)."""
    import torch

    names = [n for n in base.tensor_names if donor.has(n) and len(base.shape(n)) == 2 and base.shape(n) == donor.shape(n)]
    if not names:
        return None
    step = max(1, len(names) // count)
    diff = norm = 0.0
    for name in names[::step][:count]:
        b = base.read(name).to(torch.float32)
        d = donor.read(name).to(torch.float32)
        diff += float((d - b).pow(2).sum())
        norm += float(b.pow(2).sum())
    return math.sqrt(diff / norm) if norm > 0 else None


def warn_unrelated_donors(config: Any, folders: Mapping[str, Any]) -> list[str]:
    """Warn (not refuse: it may be meant) of a donor that is not a fine-tune of the base."""
    warnings = []
    base = folders[config.models.base]
    for i, donor in enumerate(config.models.donors):
        ratio = donor_base_ratios(base, folders[donor.model])
        if ratio is not None and ratio > UNRELATED_DONOR_RATIO:
            text = (f"warning: {config.source}: models.donors[{i}] ({donor.model!r}) differs from the base by "
                    f"{ratio:.2f} times the base's own size (fine-tunes differ by a few percent); it does not look "
                    "like a fine-tune of the base, and its task vector will mostly add noise")
            print(text, file=sys.stderr)
            warnings.append(text)
    return warnings


# ---- the command line: storage, Ray, runs folder, workers ------------------------------------


def check_run_inputs(config: Any, *, runs_dir: Path, ray_address: str | None) -> None:
    """What a search needs beyond its space file, checked before anything is created."""
    run = Path(runs_dir) / config.name
    if run.is_dir():
        check_run_folder_writable(run)  # a resume writes in the run folder only
    else:
        check_runs_dir(runs_dir)
    if config.storage:
        check_storage(config.storage, where=f"{config.source}: storage")
    address = ray_address or config.workers.ray_address
    check_ray_address(address, where="--ray-address" if ray_address else f"{config.source}: workers.ray_address")
    if not address:
        check_local_resources(config)


def check_runs_dir(runs_dir: Path) -> None:
    """``--runs-dir`` is a folder this process can write in (or can be created as one)."""
    runs_dir = Path(runs_dir)
    for folder in [runs_dir, *runs_dir.absolute().parents]:
        if folder.exists():
            if not folder.is_dir():
                raise EvomergeError(f"--runs-dir {runs_dir}: {folder} is a file, not a folder; give a folder for runs")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise EvomergeError(f"--runs-dir {runs_dir}: cannot write in {folder}; give a folder you can write to")
            return


def check_run_folder_writable(run: Path) -> None:
    """An existing run folder (a resume) and its files can be written: every trial is recorded there."""
    if not run.is_dir():
        return
    for path in [run, *(p for p in run.iterdir() if p.is_file())]:
        if not os.access(path, os.W_OK):
            raise EvomergeError(
                f"cannot write {path}: the run folder {run} is read-only, and a search records every trial in it. "
                "Make it writable (its owner, its mode, or a disk mounted read-only), or copy the run elsewhere and "
                "resume the copy"
            )


def check_storage(url: str, *, where: str) -> None:
    """The storage URL names a database SQLAlchemy knows, whose driver is installed, that answers."""
    import sqlalchemy as sa

    from .store import expand_env, redact_url

    shown = redact_url(url)
    try:
        parsed = sa.engine.make_url(expand_env(url))
    except sa.exc.ArgumentError as err:
        raise ConfigError(f"{shown} is not a database URL ({err}); write e.g. postgresql://user@host/db", where=where) from None
    try:
        dialect = parsed.get_dialect()
    except sa.exc.NoSuchModuleError:
        raise ConfigError(f"unknown database kind {parsed.drivername!r} in {shown}; use sqlite:///PATH or "
                          "postgresql://USER@HOST/DB (or another SQLAlchemy URL)", where=where) from None
    try:
        dialect.import_dbapi()
    except ImportError as err:
        package = {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient"}.get(
            err.name or "", err.name or "the driver")
        raise ConfigError(f"{shown} needs the Python database driver {err.name!r}, which is not installed; "
                          f"pip install {package}", where=where) from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).absolute().parent
            if not folder.is_dir():
                raise ConfigError(f"the folder of the SQLite file, {folder}, does not exist; create it first", where=where)
            if not os.access(folder, os.W_OK):
                raise ConfigError(f"cannot write in {folder}, the folder of the SQLite file", where=where)
        return
    connect_args = {"connect_timeout": 5} if parsed.get_backend_name() in ("postgresql", "mysql") else {}
    engine = sa.create_engine(parsed, connect_args=connect_args)
    try:
        with engine.connect():
            pass
    except sa.exc.SQLAlchemyError as err:
        text = str(getattr(err, "orig", None) or err).strip()
        reason = text.splitlines()[0] if text else type(err).__name__  # the driver's own first line
        raise ConfigError(f"cannot connect to {shown}: {reason}; check that the server runs and the URL, user and "
                          "password", where=where) from None
    finally:
        engine.dispose()


def check_ray_address(address: str | None, *, where: str) -> None:
    """An address ``ray.init`` can join: ``HOST:PORT``, ``ray://HOST:PORT`` (Ray client) or ``auto``."""
    if not address or address in ("auto", "local"):
        return
    scheme, sep, _ = address.partition("://")
    if not sep:
        return  # HOST:PORT; pool.ray_pool.check_reachable tries it
    if scheme == "ray":
        try:
            import grpc  # noqa: F401  (what ray[client] adds)
        except ImportError:
            raise ConfigError(f"{address} is a Ray client address, which needs `pip install 'ray[client]'`",
                              where=where) from None
        return
    raise ConfigError(
        f"{address}: Ray is joined at HOST:PORT (the head's GCS port, 6379 by default) or ray://HOST:10001 (Ray "
        f"client), not {scheme}:// (that is the dashboard's address)", where=where)


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001  (no usable CUDA: no GPU)
        return 0


def check_local_resources(config: Any) -> None:
    """A local Ray cluster is sized from ``workers:``; refuse one this machine cannot run.

    Ray accepts any number of CPUs it is told about, so ``workers.count: 1000`` on two cores starts
    a thousand actors that never get to evaluate anything.
    """
    w = config.workers
    cores = os.cpu_count() or 1
    where = f"{config.source}: workers"
    if w.cpus_per_worker > cores:
        raise ConfigError(f"cpus_per_worker {w.cpus_per_worker:g} is more than this machine's {cores} cores; "
                          f"use at most {cores}", where=f"{where}.cpus_per_worker")
    if w.count * w.cpus_per_worker > cores + 1e-9:
        fits = int(cores // w.cpus_per_worker)
        raise ConfigError(f"{w.count} workers of {w.cpus_per_worker:g} CPUs need {w.count * w.cpus_per_worker:g} cores; "
                          f"this machine has {cores}: use count: {fits} or less (or a smaller cpus_per_worker, or "
                          "--ray-address to run on a cluster)", where=f"{where}.count")
    if w.gpus_per_worker > 0:
        gpus = _local_gpus()
        if gpus == 0:
            raise ConfigError(f"gpus_per_worker {w.gpus_per_worker:g}, but this machine has no GPU that torch can "
                              "use; set it to 0 (CPU), or run on a machine or --ray-address cluster with GPUs",
                              where=f"{where}.gpus_per_worker")
        if w.count * w.gpus_per_worker > gpus + 1e-9:
            raise ConfigError(f"{w.count} workers of {w.gpus_per_worker:g} GPUs need {w.count * w.gpus_per_worker:g} "
                              f"GPUs; this machine has {gpus}", where=f"{where}.count")


def check_cluster_resources(config: Any, *, where: str) -> None:
    """On a joined cluster (``ray.init`` done), refuse workers it can never place: one that no
    node has room for, or more of them than the whole cluster holds."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    w = config.workers
    for kind, per in (("CPU", w.cpus_per_worker), ("GPU", w.gpus_per_worker)):
        if per <= 0:
            continue
        field = f"{config.source}: workers.{kind.lower()}s_per_worker"
        largest = max((float(n.get(kind, 0.0)) for n in nodes), default=0.0)
        if per > largest:
            raise ConfigError(f"each worker asks for {per:g} {kind}s; no node of the cluster at {where} has that many "
                              f"(the largest has {largest:g})", where=field)
        have = float(total.get(kind, 0.0))
        if w.count * per > have + 1e-9:
            raise ConfigError(f"{w.count} workers of {per:g} {kind}s need {w.count * per:g}; the cluster at {where} has "
                              f"{have:g} in all: use count: {int(have // per)} or less", where=f"{config.source}: workers.count")


# ---- merge configs ---------------------------------------------------------------------------


def _numbers(setting: Any, path: str) -> Iterator[tuple[str, float]]:
    """Every number in one parameter setting: a scalar, a gradient list, ``{filter, value}`` entries."""
    if isinstance(setting, bool) or setting is None or isinstance(setting, str):
        return
    if isinstance(setting, (int, float)):
        yield path, float(setting)
    elif isinstance(setting, Sequence):
        for i, item in enumerate(setting):
            yield from _numbers(item, f"{path}[{i}]")
    elif hasattr(setting, "value"):
        yield from _numbers(setting.value, f"{path}.value")


def check_merge_config_ranges(config: Any, *, source: str) -> None:
    """A mergekit config's parameter values lie where its method defines them (density in [0, 1]...)."""
    blocks: list[tuple[str, Mapping[str, Any] | None]] = [("parameters", config.parameters)]
    blocks += [(f"models[{i}].parameters", m.parameters) for i, m in enumerate(config.models or [])]
    for i, s in enumerate(config.slices or []):
        blocks.append((f"slices[{i}].parameters", s.parameters))
        blocks += [(f"slices[{i}].sources[{j}].parameters", src.parameters) for j, src in enumerate(s.sources)]
    for prefix, params in blocks:
        for name, setting in (params or {}).items():
            valid = valid_range(name, [config.merge_method])
            if valid is None:
                continue
            for path, value in _numbers(setting, f"{prefix}.{name}"):
                if not valid[0] <= value <= valid[1]:
                    raise ConfigError(f"{name} {value:g} is outside [{valid[0]:g}, {valid[1]:g}], where {name} is "
                                      "defined", where=f"{source}: {path}")


def check_out_spares_inputs(out: Path, inputs: Mapping[str, Path]) -> None:
    """``merge ... OUT --overwrite`` must never replace or write into one of the merge's inputs."""
    real_out = Path(out).resolve()
    for ref, path in inputs.items():
        real = Path(path).resolve()
        if real_out == real or real_out in real.parents or real in real_out.parents:
            relation = "is" if real_out == real else "lies inside" if real in real_out.parents else "contains"
            raise EvomergeError(f"output folder {out} {relation} the input model {ref!r} ({real}); writing there "
                                "would destroy an input. Choose another output folder")
