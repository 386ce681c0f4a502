"""``evomerge search``: the loop that asks drivers, dispatches to Ray workers, and records.

It reads like Optuna's own ``optimize``: open (or create) the run, requeue what a crash left
running, build the driver (which resumes from the log), then keep every worker busy: ask a
candidate the moment a worker is free, record each result the moment it arrives. The loop owns
no state of its own that a crash could lose: the run store is the memory.

Everything a user can get wrong is checked before the run folder is created or touched: the
space file, the models (open, same architecture, shapes and vocabulary, layer groups that divide
the layers), the tasks and metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, EvomergeError
from .space_config import SpaceConfig, load_space_config, parse_space_config

MAX_INFRA_RETRIES = 2  # a candidate whose worker dies is retried on another worker this often


@dataclass
class Prepared:
    """What the checks before a run produce, so nothing is computed twice."""

    config: SpaceConfig
    space: Any  # SearchSpace
    num_layers: int
    samples: dict[str, list[int]] | None


@dataclass
class _Flight:
    """A candidate out on a worker."""

    number: int
    recipe_json: str
    worker: Any
    started: float
    generation: int | None
    attempts: int = 1


@dataclass
class Progress:
    """Numbers for the live display and the final summary."""

    budget: int
    finished_before: int
    finished: int = 0
    failed: int = 0
    started_at: float = field(default_factory=time.perf_counter)
    best: dict[str, float] = field(default_factory=dict)

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.started_at
        return self.finished / elapsed if elapsed > 0 and self.finished else 0.0

    def eta_s(self) -> float | None:
        r = self.rate()
        left = self.budget - self.finished_before - self.finished
        return left / r if r > 0 else None


def prepare(config: SpaceConfig) -> Prepared:
    """Check a space against its models and tasks; nothing is written."""
    from .merge.plan import plan_merge
    from .model_checks import check_loadable, check_tokenizer, model_fields
    from .space import SearchSpace

    fields = model_fields(config)  # a model error names the space file and the models.* field too
    folders = {ref: fields.open(ref) for ref in fields.references}
    for ref, folder in folders.items():
        with fields.naming(ref):
            folder.num_layers, folder.tensor_names  # noqa: B018  (reads every header: names a truncated file)
            check_loadable(folder, trust_remote_code=config.trust_remote_code)
            if ref == config.models.base:
                check_tokenizer(folder, trust_remote_code=config.trust_remote_code)
    num_layers = folders[config.models.base].num_layers
    config.validate_against_models(num_layers, folders[config.models.base].tensor_names)
    space = SearchSpace.from_config(config, num_layers)
    with fields.naming():
        # plan the initial candidate: refuses incompatible models (architecture, shapes, vocabulary)
        plan_merge(space.decode(space.from_unit(space.initial_unit())).merge, folders)
    _check_constraints(config)
    scorer = _scorer(config)
    known_metrics = scorer.metrics()
    for i, obj in enumerate([*config.objectives, *config.constraints]):
        if obj.task is None:
            continue
        metrics = known_metrics.get(obj.task, ())
        if obj.metric not in metrics:
            from .errors import close_matches

            kind = "objectives" if i < len(config.objectives) else "constraints"
            index = i if i < len(config.objectives) else i - len(config.objectives)
            raise ConfigError(
                f"task {obj.task!r} has no metric {obj.metric!r}.{close_matches(obj.metric, metrics)} "
                f"Its metrics: {', '.join(metrics)}",
                where=f"{config.source}: {kind}[{index}].metric",
            )
    samples: dict[str, list[int]] = {}
    for task in config.task_names():
        indices = config.evaluation.item_indices(task, scorer.num_docs(task))
        if indices is not None:
            samples[task] = indices
    return Prepared(config, space, num_layers, samples or None)


def _scorer(config: SpaceConfig) -> Any:
    """lm-eval's task index for the config's tasks; a bad folder or task names its field."""
    from .evaluate import LmEvalScorer, UnknownTaskError

    for i, folder in enumerate(config.evaluation.include_path):
        if not Path(folder).is_dir():
            raise ConfigError(f"task folder {folder} does not exist; point it at a folder of lm-eval task YAMLs",
                              where=f"{config.source}: evaluation.include_path[{i}]")
    try:
        return LmEvalScorer(config.task_names(), **_scorer_paths(config))
    except UnknownTaskError as err:
        named = [*config.objectives, *config.constraints]
        i = next(i for i, m in enumerate(named) if m.task == err.task)
        kind, index = ("objectives", i) if i < len(config.objectives) else ("constraints", i - len(config.objectives))
        raise ConfigError(str(err), where=f"{config.source}: {kind}[{index}].task") from None


def _scorer_paths(config: SpaceConfig) -> dict[str, Any]:
    paths = config.evaluation.include_path
    return {"include_path": [Path(p) for p in paths]} if paths else {}


def _check_constraints(config: SpaceConfig) -> None:
    for i, c in enumerate(config.constraints):
        if c.min is not None:
            raise ConfigError(
                "lower bounds (min:) on constraints are not supported yet; use max:, or make it an objective",
                where=f"{config.source}: constraints[{i}].min",
            )


def _driver(prepared: Prepared, store: Any) -> Any:
    from .drivers import ConstraintSpec, ObjectiveSpec, make_driver

    cfg = prepared.config
    space = prepared.space
    return make_driver(
        cfg.search.driver,
        store,
        distributions=space.optuna_distributions(),
        objectives=[ObjectiveSpec(o.key, o.direction, o.weight) for o in cfg.objectives],
        constraints=[ConstraintSpec(c.key, c.max) for c in cfg.constraints if c.max is not None],
        seed=cfg.search.seed,
        popsize=cfg.search.population or _default_popsize(space.unit_dimension, cfg.search.driver),
        sigma0=cfg.search.sigma0 or 0.25,
        x0=space.initial_unit(),
        dim=space.unit_dimension,
        from_unit=space.from_unit,
    )


def _default_popsize(dimension: int, driver: str) -> int | None:
    if driver == "cma":
        return 4 + int(3 * math.log(max(dimension, 1)))
    return None


def open_store(config: SpaceConfig, runs_dir: Path) -> Any:
    from .store import RunStore

    def diff(old_text: str, new_text: str) -> list[str]:
        import yaml

        old = parse_space_config(yaml.safe_load(old_text), source="the run's space.yaml", default_name=config.name)
        return old.diff(config)  # "field: the run's value -> this file's value"

    from .store import SPACE_FILE, write_atomic

    store = RunStore.open_or_create(
        runs_dir,
        config.name,
        config.to_yaml(),
        config.config_hash(),
        directions={o.key: o.direction for o in config.objectives},
        constraints={c.key: c.max for c in config.constraints if c.max is not None},
        storage_url=config.storage,
        diff=diff,
    )
    # Same run, other settings outside its identity (a bigger budget, other workers): the folder
    # keeps the latest, so `evomerge resume` carries on with what the user last asked for.
    space_file = store.path / SPACE_FILE
    if space_file.read_text(encoding="utf-8") != config.to_yaml():
        write_atomic(space_file, config.to_yaml())
    return store


def _init_ray(config: SpaceConfig, address: str | None) -> None:
    import logging
    import os

    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    if ray.is_initialized():
        return
    address = address or config.workers.ray_address
    _check_reachable(address)
    runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(max(1, int(config.workers.cpus_per_worker)))}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, **quiet)
    else:
        w = config.workers
        ray.init(
            address="local",  # our own cluster, never one that `ray start` left running on this machine
            num_cpus=max(1, math.ceil(w.count * w.cpus_per_worker)),
            num_gpus=math.ceil(w.count * w.gpus_per_worker),
            include_dashboard=False,
            runtime_env=runtime_env,
            **quiet,
        )


def _check_reachable(address: str | None) -> None:
    """Refuse an unreachable ``host:port`` in seconds (ray.init would retry for minutes)."""
    import socket

    if not address or "://" in address or address == "auto":
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as err:
        raise EvomergeError(
            f"no Ray cluster answers at {address} (--ray-address or workers.ray_address): {err}. Check the "
            "address with `ray status` on the head node, or leave it out to start a local cluster"
        ) from None


def _worker_spec(prepared: Prepared) -> Any:
    from .worker import EvalSettings, WorkerSpec

    cfg = prepared.config
    ev = cfg.evaluation
    paths = [str(Path(p).resolve()) for p in ev.include_path]
    settings = EvalSettings(
        tasks=tuple(cfg.task_names()),
        include_path=tuple(paths) or None,
        samples=prepared.samples,
        batch_size=ev.batch_size,  # an int, or lm-eval's "auto"
        num_fewshot=ev.num_fewshot,
        extra_args=dict(ev.lm_eval_args),
    )
    return WorkerSpec(
        base=cfg.models.base,
        donors=tuple(d.model for d in cfg.models.donors),
        evaluation=settings,
        dtype=cfg.merge.dtype,
        trust_remote_code=cfg.trust_remote_code,
    )


class _Pool:
    """Ray actors, replaced when one dies (a lost node, an out-of-memory kill)."""

    def __init__(self, spec: Any, count: int, cpus: float, gpus: float) -> None:
        from .worker import start_workers

        self._start = lambda n: start_workers(spec, count=n, cpus=cpus, gpus=gpus)
        self.idle = list(self._start(count))

    def replace(self, dead: Any) -> None:
        import ray

        try:
            ray.kill(dead, no_restart=True)
        except Exception:  # already gone
            pass
        self.idle.extend(self._start(1))


def run_search(
    config: SpaceConfig,
    *,
    runs_dir: Path = Path("runs"),
    ray_address: str | None = None,
    on_progress: Callable[[Progress, Any], None] | None = None,
) -> Path:
    """Run (or resume) the search ``config`` describes; returns the run folder."""
    import ray

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the trial log and the display say it all
    prepared = prepare(config)
    if ray_address or config.workers.ray_address:
        _init_ray(config, ray_address)  # join the cluster before the run folder exists: a bad address changes nothing
    store = open_store(config, runs_dir)
    try:
        store.requeue_interrupted()
        driver = _driver(prepared, store)
        budget = config.search.budget
        progress = Progress(budget=budget, finished_before=store.counts().finished)
        _refresh_best(progress, store, config)
        if progress.finished_before >= budget:
            return store.path
        _init_ray(config, ray_address)
        pool = _Pool(_worker_spec(prepared), config.workers.count, config.workers.cpus_per_worker, config.workers.gpus_per_worker)
        flights: dict[Any, _Flight] = {}
        exhausted = False

        def recorded(record: Any) -> None:
            """Count a told trial, whatever its outcome, and show it."""
            progress.finished += 1
            if record.state != "complete":
                progress.failed += 1
            _refresh_best(progress, store, config, record)
            if on_progress:
                on_progress(progress, record)
        while True:
            counts = store.counts()
            # ask while a worker is free and the budget (finished + in flight) allows
            while pool.idle and not exhausted and counts.finished + len(flights) < budget:
                proposal = driver.ask()
                if proposal is None:
                    break  # CMA waits for its generation to come back
                recipe = prepared.space.decode(proposal.values)
                worker = pool.idle.pop()
                ref = worker.evaluate.remote(recipe.to_json())
                flights[ref] = _Flight(proposal.number, recipe.to_json(), worker, time.perf_counter(), proposal.generation)
                store.annotate(proposal.number, {"recipe": recipe.to_json()})
            if not flights:
                break
            done, _ = ray.wait(list(flights), num_returns=1)
            ref = done[0]
            flight = flights.pop(ref)
            try:
                result = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError) as err:
                pool.replace(flight.worker)
                if flight.attempts <= MAX_INFRA_RETRIES:
                    worker = pool.idle.pop()
                    new_ref = worker.evaluate.remote(flight.recipe_json)
                    flights[new_ref] = _Flight(flight.number, flight.recipe_json, worker, time.perf_counter(),
                                               flight.generation, flight.attempts + 1)
                    continue
                recorded(driver.tell(flight.number, None,
                                     failed_reason=f"worker lost {flight.attempts} times: {type(err).__name__}"))
                continue
            except ray.exceptions.RayTaskError as err:
                # an exception inside the evaluator that is not a candidate fault: a bug, kept as data
                pool.idle.append(flight.worker)
                recorded(driver.tell(flight.number, None, failed_reason=f"evaluation raised {err.cause!r}"[:2000]))
                continue
            pool.idle.append(flight.worker)
            attrs = {"timings": {"merge_s": result.merge_s, "eval_s": result.eval_s,
                                 "wall_s": time.perf_counter() - flight.started},
                     "worker": result.worker, "attempts": flight.attempts}
            if flight.generation is not None:
                attrs["generation"] = flight.generation
            recorded(driver.tell(flight.number, result.objectives, failed_reason=result.error, attrs=attrs))
        return store.path
    finally:
        store.close()


def _refresh_best(progress: Progress, store: Any, config: SpaceConfig, record: Any | None = None) -> None:
    records = [record] if record is not None else store.trials()
    for o in config.objectives:
        for r in records:
            if r.state != "complete" or not r.objectives or o.key not in r.objectives:
                continue
            value = r.objectives[o.key]
            old = progress.best.get(o.key)
            if old is None or (value > old if o.direction == "maximize" else value < old):
                progress.best[o.key] = value


def search_file(path: Path, **kwargs: Any) -> Path:
    """``evomerge search SPACE.yaml``."""
    return run_search(load_space_config(path), **kwargs)


def resume_config(run_dir: Path) -> SpaceConfig:
    """The frozen space config a run folder was created with."""
    import yaml

    run_dir = Path(run_dir)
    space_file = run_dir / "space.yaml"
    if not space_file.is_file():
        raise EvomergeError(f"{run_dir} is not an evomerge run folder (no space.yaml)")
    data = yaml.safe_load(space_file.read_text(encoding="utf-8"))
    return parse_space_config(data, source=str(space_file), default_name=run_dir.name)


def resume(run_dir: Path, **kwargs: Any) -> Path:
    """``evomerge resume runs/<name>``: the run's own frozen space file, same run folder."""
    return run_search(resume_config(run_dir), runs_dir=Path(run_dir).parent, **kwargs)
