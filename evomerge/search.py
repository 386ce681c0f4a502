"""``evomerge search`` and ``evomerge resume``: check, open the run, start the pool, run the loop.

1. :func:`~evomerge.prepare.prepare`: everything a user can get wrong is checked before the run
   folder is created or touched (the space file, the models, the tasks and metrics); a Ray address
   is joined then too.
2. :func:`open_store`: the run folder, created or reopened; trials a crash left running are
   requeued, and the driver rebuilds itself from the log.
3. :class:`~evomerge.loop.SearchLoop`: ask, submit, wait, tell, on the pool the space file (or
   ``--pool``) names.
4. Stopping, however it happens (the budget used, a signal, an error): the pool stops every
   worker and the cluster it started, trials still out are marked interrupted (a resume runs them
   again), the store is closed. A run whose trials all failed ends in :class:`SearchStopped`.
"""

from __future__ import annotations

import math
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import failpoints, interrupts
from .interrupts import Interrupted
from .loop import MAX_INFRA_RETRIES, Progress, SearchLoop, SearchStopped
from .prepare import Prepared, prepare, resolve_merged, worker_spec
from .reporter import CallbackReporter, Reporter
from .space_config import (
    SpaceConfig,
    load_space_config,
    parse_space_config,
    resume_config,
)

__all__ = [
    "MAX_INFRA_RETRIES",
    "Prepared",
    "Progress",
    "SearchStopped",
    "build_driver",
    "cma_idle_notice",
    "default_lookahead",
    "idle_workers_notice",
    "open_store",
    "prepare",
    "resume",
    "run_search",
    "search_file",
]


def run_search(
    config: SpaceConfig,
    *,
    runs_dir: Path = Path("runs"),
    ray_address: str | None = None,
    pool: str | None = None,
    report: Reporter | None = None,
    on_progress: Callable[[Progress, Any], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
    max_forward_passes: int | None = None,
) -> Path:
    """Run (or resume) the search ``config`` describes; returns the run folder.

    ``pool`` (``ray`` or ``inprocess``) overrides ``workers.pool``. Faults while evaluating are
    the loop's to handle (see :mod:`evomerge.loop`). Raises :class:`SearchStopped` when the search
    cannot go on or every trial failed, and :class:`~evomerge.interrupts.Interrupted` (naming the
    run folder) on Ctrl-C or SIGTERM, after stopping every worker.

    ``report`` is told every start-up stage, notice and finished trial (see
    :mod:`evomerge.reporter`); without one, ``on_progress`` and ``on_notice`` get the trials and
    notices (notices to stderr when neither is given).

    ``max_forward_passes``: ask no new candidate once the run has spent that many forward passes
    (``scripts/bench_fitness.py`` compares searches at equal cost with it).
    """
    import optuna

    from . import preflight
    from .merge_dtype import resolve_merge_dtype
    from .model_refs import resolve_config
    from .pool import make_pool

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the trial log and the display say it all
    report = report or CallbackReporter(on_progress, on_notice)
    store = None
    interrupted = 0
    try:
        failpoints.hit("search.start")
        # models by absolute path or pinned id (portable), and the merge dtype fixed for this machine
        config = resolve_merged(resolve_merge_dtype(resolve_config(config), as_loaded=config))
        prepared = prepare(config, report=report)
        preflight.check_run_inputs(config, runs_dir=runs_dir, ray_address=ray_address)
        interrupts.check()
        pool_kind = pool or config.workers.pool
        workers = make_pool(pool_kind, worker_spec(prepared), config.workers, ray_address=ray_address)
        try:
            workers.open()  # joins a given cluster before the run folder exists: a bad address changes nothing
            if pool_kind == "ray" and (ray_address or config.workers.ray_address):
                preflight.check_cluster_resources(config, where=ray_address or config.workers.ray_address)
            report.begin("opening the run folder")
            store = open_store(config, runs_dir)
            before, budget = store.counts().finished, config.search.budget
            report.done(f"run folder {store.path}: " + ("new" if not before else f"{before} of {budget} trials done before"
                                                        + ("; nothing left to run" if before >= budget else ", resuming")))
            report.line("\n".join(prepared.memory.describe()))
            store.remove_stale_temp_files()
            store.requeue_interrupted()
            store.write_pareto()  # a process killed between a trial's record and this file left it stale
            loop = SearchLoop(store, build_driver(prepared, store, report), prepared.space, workers, budget=config.search.budget,
                              workers=config.workers.count, report=report, rungs=prepared.rungs,
                              max_forward_passes=max_forward_passes)
            loop.run()
        finally:
            with interrupts.deferred():  # a second Ctrl-C must not leave workers running
                report.begin("stopping the workers")
                workers.shutdown()
                if store is not None:
                    report.done("workers stopped")
                interrupted = _stop(store, config)
        _refuse_all_failed(store)
        return store.path
    except KeyboardInterrupt as err:
        interrupts.acknowledge()
        raise Interrupted(getattr(err, "signum", signal.SIGINT), run_dir=store.path if store else None,
                          interrupted_trials=interrupted) from None


def _stop(store: Any, config: SpaceConfig) -> int:
    """Close the store; mark the trials still out as interrupted (a resume runs them again)."""
    if store is None:
        return 0
    running = 0 if store.lost_hold else store.counts().running  # another process holds the run: touch nothing
    store.close()
    if not running:
        return 0
    from .store import RunStore

    # a fresh view of the run: the trials this process started are no longer its own, and are
    # requeued exactly as the next process would requeue them
    fresh = RunStore.open(store.path, storage_url=config.storage)
    try:
        return len(fresh.requeue_interrupted())
    finally:
        fresh.close()


def _refuse_all_failed(store: Any) -> None:
    """A run in which every trial failed is an error: exit 1, with the reasons counted."""
    records = store.trials()
    failed = [r for r in records if r.state == "failed" and not r.interrupted]
    if not failed or any(r.state == "complete" for r in records):
        return
    reasons = Counter((r.error or "no reason recorded").split(":", 1)[0][:120] for r in failed)
    listing = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common())
    example = failed[-1].error or ""
    raise SearchStopped(f"every trial failed ({len(failed)} of {len(failed)}): {listing}. Last: {example[:300]}. "
                        f"See `evomerge show {store.path}`")


def build_driver(prepared: Prepared, store: Any, report: Reporter | None = None) -> Any:
    """The driver the config names, rebuilt from whatever the store's log holds; with
    ``search.hand_set`` on, wrapped so that the hand-set recipes run first (``report`` gets a
    notice for each one the space cannot express)."""
    from .drivers import make_driver
    from .objectives import ConstraintSpec, ObjectiveSpec

    cfg = prepared.config
    space = prepared.space
    popsize = _popsize(cfg, space.unit_dimension)
    objectives = [ObjectiveSpec(o.key, o.direction, o.weight) for o in cfg.objectives]
    constraints = [ConstraintSpec(c.key, c.max) for c in cfg.constraints if c.max is not None]
    distributions = space.optuna_distributions()

    def build(x0: Any = None) -> Any:
        return make_driver(
            cfg.search.driver,
            store,
            distributions=distributions,
            objectives=objectives,
            constraints=constraints,
            seed=cfg.search.seed,
            popsize=popsize,
            sigma0=cfg.search.sigma0 or 0.25,
            x0=x0 if x0 is not None else space.initial_unit(),
            dim=space.unit_dimension,
            from_unit=space.from_unit,
            lookahead=_lookahead(cfg, popsize),
            cma_update=cfg.search.cma_update or "generations",
        )

    idle = cma_idle_notice(cfg, space.unit_dimension)
    if report is not None and idle:
        report.notice(idle)
    if not cfg.search.hand_set_on:
        return build()
    from .drivers.hand_set import HandSetFirst
    from .hand_set import hand_set_points

    points, notices = hand_set_points(space)
    if report is not None:
        for line in notices:
            report.notice(line)
    common: dict[str, Any] = {"distributions": distributions, "objectives": objectives,
                              "constraints": constraints}
    if cfg.search.driver == "cma":
        # CMA starts at the best hand-set trial once all are back (evomerge.drivers.hand_set)
        return HandSetFirst(store, points, build_after=lambda best: build(None if best is None else space.to_unit(best)),
                            **common)
    return HandSetFirst(store, points, driver=build(), **common)


def _lookahead(cfg: SpaceConfig, popsize: int | None) -> int:
    """``search.lookahead`` when given, else :func:`default_lookahead`."""
    if cfg.search.lookahead is not None:
        return cfg.search.lookahead
    if cfg.search.cma_update == "window":
        return 0  # every candidate is sampled when asked for: nothing to look ahead of
    return default_lookahead(cfg.workers.count, popsize or 0)


def default_lookahead(workers: int, popsize: int) -> int:
    """CMA candidates handed out beyond the generation being completed, when the space file does
    not say: none for one worker (it is the one evaluating a generation's last member, so it never
    waits for it); else twice the workers, so none waits for a generation's slowest member, but at
    most half the population. Why half: a candidate handed out ahead is sampled before the generation in
    front of it is told, so it comes from the distribution one generation old; while at most half
    of each generation is such, the fresh half wins the selection and the best score per trial
    stays level with the generational loop's, but once whole generations are sampled a generation
    early, every mean step starts from the older mean, the mean steps back and forth and the
    search falls behind per trial (``scripts/bench_cma_async.py`` prints utilisation and score
    per trial; the CMA driver's docstring says more). None for a population pycma can only
    sample mirrored (:data:`~evomerge.space_config.schema.MIN_LOOKAHEAD_POPULATION`)."""
    from .space_config.schema import MIN_LOOKAHEAD_POPULATION

    if workers <= 1 or popsize < MIN_LOOKAHEAD_POPULATION:
        return 0
    return min(2 * workers, popsize // 2)


def cma_idle_notice(cfg: SpaceConfig, unit_dimension: int) -> str | None:
    """:func:`idle_workers_notice` for a space file (None unless its driver is CMA-ES); said by
    ``evomerge validate`` and at the start of ``evomerge search``."""
    if cfg.search.driver != "cma":
        return None
    popsize = _popsize(cfg, unit_dimension) or 0
    return idle_workers_notice(cfg.workers.count, popsize, _lookahead(cfg, popsize), cfg.search.cma_update,
                               explicit=cfg.search.lookahead is not None)


def idle_workers_notice(workers: int, popsize: int, lookahead: int, cma_update: str | None, *,
                        explicit: bool = False) -> str | None:
    """What to tell a user whose CMA-ES workers will wait at every generation's end, or None.

    The generational loop keeps ``W`` workers busy only while it can hand out candidates beyond
    the generation being completed; with a lookahead below the worker count the slowest members
    of each generation leave the others idle (``scripts/bench_cma_async.py``: lookahead 8 keeps
    8 workers 88-98% busy, 16 workers 50-69%). The default lookahead stops at half the population
    to keep the score per trial (:func:`default_lookahead`), so from ``W > population / 2`` on the
    space file has to choose: ``search.cma_update: window`` keeps every worker busy (level per
    trial with the generational loop on the toy world at population 16, 8 and 16 workers; README,
    "The loop at scale"), or a larger population. Said once at start, not refused: a user who
    counts trials rather than hours loses nothing by waiting. A lookahead the space file sets
    itself is its author's choice, and one worker never waits for a generation."""
    if cma_update == "window" or explicit or workers <= 1 or lookahead >= workers:
        return None
    return (f"search: {workers} workers on a CMA-ES population of {popsize}: the generational loop can hand out "
            f"{lookahead} candidate(s) beyond a generation, fewer than the workers, so workers will wait at each "
            f"generation's end. `search.cma_update: window` keeps every worker busy (README, \"The loop at "
            f"scale\"); or raise search.population to {2 * workers} or more.")


def _popsize(cfg: SpaceConfig, dimension: int) -> int | None:
    """The population the driver runs with: the space file's, else the driver's default."""
    return cfg.search.population or _default_popsize(dimension, cfg.search.driver)


def _default_popsize(dimension: int, driver: str) -> int | None:
    if driver == "cma":
        return 4 + int(3 * math.log(max(dimension, 1)))
    return None


def config_diff(config: SpaceConfig) -> Callable[[str, str], list[str]]:
    """How a refusal of a different config under the run's name lists the fields that differ."""

    def diff(old_text: str, new_text: str) -> list[str]:
        import yaml

        old = parse_space_config(yaml.safe_load(old_text), source="the run's space.yaml", default_name=config.name)
        return old.diff(config)  # "field: the run's value -> this file's value"

    return diff


def open_store(config: SpaceConfig, runs_dir: Path) -> Any:
    from .model_refs import earlier_hash
    from .store import HASH_FILE, SPACE_FILE, RunStore, write_atomic

    store = RunStore.open_or_create(
        runs_dir,
        config.name,
        config.to_yaml(),
        config.config_hash(),
        directions={o.key: o.direction for o in config.objectives},
        constraints={c.key: c.max for c in config.constraints if c.max is not None},
        storage_url=config.storage,
        diff=config_diff(config),
        earlier_hashes=(earlier_hash(config),),  # a run created before references were resolved
    )
    # Same run, other settings outside its identity (a bigger budget, other workers): the folder
    # keeps the latest, so `evomerge resume` carries on with what the user last asked for.
    space_file = store.path / SPACE_FILE
    if space_file.read_text(encoding="utf-8") != config.to_yaml():
        write_atomic(space_file, config.to_yaml())
    if (store.path / HASH_FILE).read_text(encoding="utf-8").strip() != config.config_hash():
        write_atomic(store.path / HASH_FILE, config.config_hash() + "\n")  # an earlier run, now with resolved models
    return store


def search_file(path: Path, **kwargs: Any) -> Path:
    """``evomerge search SPACE.yaml``."""
    return run_search(load_space_config(path), **kwargs)


def resume(run_dir: Path, **kwargs: Any) -> Path:
    """``evomerge resume runs/<name>``: the run's own frozen space file, same run folder."""
    return run_search(resume_config(run_dir), runs_dir=Path(run_dir).resolve().parent, **kwargs)
