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
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import failpoints
from .errors import ConfigError, EvomergeError
from .space_config import SpaceConfig, load_space_config, parse_space_config

MAX_INFRA_RETRIES = 2  # a candidate whose worker dies or runs out of memory is retried on another worker this often
MAX_START_FAILURES = 3  # workers failing to start in a row before the search gives up


@dataclass
class Prepared:
    """What the checks before a run produce, so nothing is computed twice."""

    config: SpaceConfig
    space: Any  # SearchSpace
    num_layers: int
    samples: dict[str, list[int]] | None
    memory: Any = None  # MemoryPlan: where each worker stores the models (printed by search and validate)


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
        initial = space.decode(space.from_unit(space.initial_unit()))
        if initial.merge is not None:
            plan_merge(initial.merge, folders)
    if config.route is not None:
        _check_route_models(config, folders)
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
    return Prepared(config, space, num_layers, samples or None, memory_plan(config, folders))


def storage_settings(plan: Any) -> dict[str, Any]:
    """The worker's storage from its memory plan: inputs resident on a GPU that holds them all,
    else memory-mapped (on CPU shared through the page cache; to a GPU streamed per tensor)."""
    resident = plan.device.kind == "cuda" and plan.placement == "device"
    return dict(storage="resident" if resident else "mapped", task_vectors=plan.task_vectors == "resident",
                gpus=max(1, int(plan.device.gpus_per_worker)), keep_free_bytes=plan.merge_work_bytes)


def memory_plan(config: SpaceConfig, folders: dict[str, Any]) -> Any:
    """The workers' memory plan from the models' headers; a plan that cannot fit is refused here,
    before the run folder exists (see :mod:`evomerge.memory_plan`)."""
    import torch

    from .memory_plan import detect_devices, plan_memory, size_from_folder

    w = config.workers
    refs = list(folders)
    plan = plan_memory([size_from_folder(folders[r]) for r in refs], base=refs.index(config.models.base),
                       workers=w.count, merge_dtype=getattr(torch, config.dtype),
                       devices=detect_devices(w.gpus_per_worker, device_memory=w.device_memory, host_memory=w.host_memory))
    if not plan.fits:
        raise ConfigError(f"the models do not fit: {plan.problem}; {plan.fix}", where=f"{config.source}: workers")
    return plan


def _check_route_models(config: SpaceConfig, folders: dict[str, Any]) -> None:
    """A route stacks layers of every pool model into one model: they must agree in kind, width
    and depth (the slots assume one layer count), and ``scale`` needs the output projections it
    multiplies."""
    from .merge.routing import RESIDUAL_OUTPUTS, supports_scale
    from .space_config import BASE_NAME, MERGED_NAME

    route = config.route
    assert route is not None
    refs = {BASE_NAME: config.models.base, **{d.name: d.model for d in config.models.donors}}
    base = folders[config.models.base]
    want = (base.config.get("model_type"), base.config.get("hidden_size"), base.num_layers)
    for i, entry in enumerate(route.pool):
        folder = folders[refs.get(entry, config.models.base)]  # merged: a merge of these models
        got = (folder.config.get("model_type"), folder.config.get("hidden_size"), folder.num_layers)
        if got != want and entry != MERGED_NAME:
            raise ConfigError(
                f"{refs[entry]!r} is a {got[0]} with hidden size {got[1]} and {got[2]} layers, the base a {want[0]} "
                f"with hidden size {want[1]} and {want[2]} layers; a route stacks layers of models of one shape",
                where=f"{config.source}: route.pool[{i}]",
            )
    if route.scale is not None and not supports_scale(base.tensor_names):
        raise ConfigError(
            f"this architecture has no {' / '.join(RESIDUAL_OUTPUTS)} tensors for a layer scale to multiply; remove it",
            where=f"{config.source}: route.scale",
        )


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
    for name in (failpoints.ENV, failpoints.DIR_ENV):  # a testing aid reaches the workers too
        if os.environ.get(name):
            runtime_env["env_vars"][name] = os.environ[name]
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
        dtype=cfg.dtype,
        trust_remote_code=cfg.trust_remote_code,
        **storage_settings(prepared.memory),
    )


class _Pool:
    """Ray actors: ready ones wait in ``idle``; new ones (at start, or replacing a dead one) are
    ``starting`` until their ``ping`` returns, so a candidate's clock starts when a worker takes it."""

    def __init__(self, spec: Any, count: int, cpus: float, gpus: float) -> None:
        from .worker import start_workers

        self._start = lambda n: start_workers(spec, count=n, cpus=cpus, gpus=gpus)
        self.idle: list[Any] = []
        self.starting: dict[Any, Any] = {}  # ping ref -> actor
        self._failed_starts = 0
        self._launch(count)

    def _launch(self, n: int) -> None:
        for actor in self._start(n):
            self.starting[actor.ping.remote()] = actor

    def started(self, ref: Any) -> None:
        """A ``ping`` came back: the actor is ready, or it failed to start and is replaced."""
        import ray

        actor = self.starting.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.RayError as err:
            self._failed_starts += 1
            if self._failed_starts > MAX_START_FAILURES:
                raise EvomergeError(f"workers keep failing to start ({self._failed_starts} times); last: {err}") from None
            self.replace(actor)
            return
        self._failed_starts = 0
        self.idle.append(actor)

    def replace(self, dead: Any) -> None:
        import ray

        try:
            ray.kill(dead, no_restart=True)
        except Exception:  # already gone
            pass
        self._launch(1)


def _out_of_memory(err: BaseException) -> bool:
    """Whether an evaluation failed for lack of memory: an infrastructure fault, not the candidate's."""
    import ray

    if isinstance(err, ray.exceptions.OutOfMemoryError):  # Ray's memory monitor killed the worker
        return True
    cause = getattr(err, "cause", err)
    if isinstance(cause, MemoryError):
        return True
    try:
        import torch

        if isinstance(cause, torch.OutOfMemoryError):  # CUDA
            return True
    except (ImportError, AttributeError):
        pass
    # torch's CPU allocator raises a plain RuntimeError
    return isinstance(cause, RuntimeError) and "can't allocate memory" in str(cause)


def run_search(
    config: SpaceConfig,
    *,
    runs_dir: Path = Path("runs"),
    ray_address: str | None = None,
    on_progress: Callable[[Progress, Any], None] | None = None,
) -> Path:
    """Run (or resume) the search ``config`` describes; returns the run folder.

    Faults while evaluating (see the README's "Workers"): a worker that dies or runs out of
    memory is replaced and the candidate retried on another worker, ``MAX_INFRA_RETRIES`` times at
    most, then recorded as failed; a candidate that cannot be merged, merges to non-finite weights,
    scores NaN, or takes longer than ``workers.timeout_s`` (its worker is killed and replaced; not
    retried) is a failed trial with its reason. Every failure is told to the driver, which gives it
    a defined penalty, and the search goes on.
    """
    import ray

    import optuna

    from .route_space import resolve_merged

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the trial log and the display say it all
    config = resolve_merged(config)
    prepared = prepare(config)
    print("\n".join(prepared.memory.describe()), flush=True)  # the memory plan, before anything starts
    if ray_address or config.workers.ray_address:
        _init_ray(config, ray_address)  # join the cluster before the run folder exists: a bad address changes nothing
    store = open_store(config, runs_dir)
    try:
        store.remove_stale_temp_files()
        store.requeue_interrupted()
        store.write_pareto()  # a process killed between a trial's record and this file left it stale
        driver = _driver(prepared, store)
        budget = config.search.budget
        timeout_s = config.workers.timeout_s
        progress = Progress(budget=budget, finished_before=store.counts().finished)
        _refresh_best(progress, store, config)
        if progress.finished_before >= budget:
            return store.path
        _init_ray(config, ray_address)
        pool = _Pool(_worker_spec(prepared), config.workers.count, config.workers.cpus_per_worker, config.workers.gpus_per_worker)
        flights: dict[Any, _Flight] = {}
        retries: deque[_Flight] = deque()  # candidates whose worker failed, waiting for another

        def dispatch(flight: _Flight, worker: Any = None) -> None:
            worker = worker if worker is not None else pool.idle.pop()
            flight.worker, flight.started = worker, time.perf_counter()
            flights[worker.evaluate.remote(flight.recipe_json)] = flight

        def dispatch_retries() -> None:
            """Each retry goes to an idle worker other than the one it failed on, unless there is no other."""
            alone = len(pool.idle) + len(pool.starting) + len(flights) <= 1
            for flight in list(retries):
                others = [w for w in pool.idle if w is not flight.worker]
                worker = others[-1] if others else (pool.idle[-1] if pool.idle and alone else None)
                if worker is not None:
                    pool.idle.remove(worker)
                    retries.remove(flight)
                    dispatch(flight, worker)

        def recorded(record: Any) -> None:
            """Count a told trial, whatever its outcome, and show it."""
            progress.finished += 1
            if record.state != "complete":
                progress.failed += 1
            _refresh_best(progress, store, config, record)
            if on_progress:
                on_progress(progress, record)

        def infra_fault(flight: _Flight, reason: str, *, worker_alive: bool = False) -> None:
            """Retry the candidate on another worker, or record it failed after too many tries.

            A dead worker is replaced; one that only failed an allocation is healthy (the failed
            allocation freed everything and the next merge overwrites every merged tensor) and goes
            back to work, on other candidates.
            """
            if worker_alive:
                pool.idle.append(flight.worker)
            else:
                pool.replace(flight.worker)
            if flight.attempts <= MAX_INFRA_RETRIES:
                flight.attempts += 1
                retries.append(flight)
                return
            recorded(driver.tell(flight.number, None, failed_reason=f"{reason} ({flight.attempts} attempts on different workers)",
                                 attrs=_fail_attrs(flight)))

        while True:
            dispatch_retries()
            # ask while a worker is free and the budget (finished + in flight) allows
            wanted = budget - store.counts().finished - len(flights) - len(retries)
            while pool.idle and wanted > 0:
                proposal = driver.ask()
                if proposal is None:
                    break  # CMA waits for its generation to come back
                recipe_json = prepared.space.decode(proposal.values).to_json()
                store.annotate(proposal.number, {"recipe": recipe_json})
                dispatch(_Flight(proposal.number, recipe_json, None, 0.0, proposal.generation))
                wanted -= 1
                failpoints.hit("search.after_dispatch")  # candidates are out on workers
            if not flights and not retries and (wanted <= 0 or pool.idle):
                break  # done: nothing out, nothing to retry, nothing more to ask
            waiting = [*flights, *pool.starting]
            wait_s = None
            if timeout_s is not None and flights:
                wait_s = max(0.0, min(f.started for f in flights.values()) + timeout_s - time.perf_counter())
            done, _ = ray.wait(waiting, num_returns=1, timeout=wait_s)
            if not done:  # the oldest candidate ran out of time
                now = time.perf_counter()
                for ref, flight in list(flights.items()):
                    if now - flight.started >= timeout_s:
                        del flights[ref]
                        pool.replace(flight.worker)
                        recorded(driver.tell(flight.number, None, failed_reason=f"timed out after {timeout_s:g}s",
                                             attrs=_fail_attrs(flight)))
                continue
            ref = done[0]
            if ref in pool.starting:
                pool.started(ref)
                continue
            flight = flights.pop(ref)
            try:
                result = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError,
                    ray.exceptions.OutOfMemoryError) as err:
                infra_fault(flight, f"worker lost: {type(err).__name__}" if not _out_of_memory(err) else "out of memory")
                continue
            except ray.exceptions.RayTaskError as err:
                if _out_of_memory(err):
                    infra_fault(flight, f"out of memory: {str(err.cause)[:300]}", worker_alive=True)
                    continue
                # an exception inside the evaluator that is not a candidate fault: a bug, kept as data
                pool.idle.append(flight.worker)
                recorded(driver.tell(flight.number, None, failed_reason=f"evaluation raised {err.cause!r}"[:2000],
                                     attrs=_fail_attrs(flight)))
                continue
            pool.idle.append(flight.worker)
            attrs = {"timings": {"merge_s": result.merge_s, "eval_s": result.eval_s,
                                 "wall_s": time.perf_counter() - flight.started},
                     "worker": result.worker, "attempts": flight.attempts}
            if flight.generation is not None:
                attrs["generation"] = flight.generation
            failpoints.hit("search.before_tell")  # a result is here and not yet recorded
            recorded(driver.tell(flight.number, result.objectives, failed_reason=result.error, attrs=attrs))
            failpoints.hit("search.after_tell")
        return store.path
    finally:
        store.close()


def _fail_attrs(flight: _Flight) -> dict[str, Any]:
    attrs: dict[str, Any] = {"attempts": flight.attempts, "timings": {"wall_s": time.perf_counter() - flight.started}}
    if flight.generation is not None:
        attrs["generation"] = flight.generation
    return attrs


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
