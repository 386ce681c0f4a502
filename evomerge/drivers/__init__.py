"""Drivers: proposal logic behind ask/tell. ``make_driver(name, store, ...)`` builds one.

=========  ===============================================================================
``cma``    CMA-ES from pycma on the unit cube, objectives scalarised (``cma_driver``)
``tpe``    Optuna ``TPESampler(multivariate=True, constant_liar=True)``, multi-objective
``nsga2``  Optuna ``NSGAIISampler(population_size=popsize)``, multi-objective
``gp``     Optuna ``GPSampler``, multi-objective (log EHVI)
``random`` Optuna ``RandomSampler``: the baseline every other driver must beat
=========  ===============================================================================

The search loop reads like Optuna's own ``optimize`` (DESIGN.md): open the store, requeue trials a
crash left running, build the driver (which resumes from the log), then ask, evaluate, tell::

    store = RunStore.open_or_create(runs, name, yaml_text, config_hash, directions=..., constraints=...)
    store.requeue_interrupted()                       # trials a crash left RUNNING -> FAIL "interrupted"
    driver = make_driver(cfg.driver, store, ...)      # CMA replays the log; Optuna reads the study
    while store.counts().finished + len(out) < budget:  # finished counts every part of the run
        proposal = driver.ask()                       # None: CMA waits for its generation
        ...store.annotate(proposal.number, {"recipe": recipe.to_json(), "worker": w})...
        driver.tell(number, objectives_or_None, failed_reason=..., attrs={"timings": {...}})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from evomerge.drivers.base import Driver, Proposal, Value
from evomerge.drivers.names import DRIVER_NAMES
from evomerge.errors import ConfigError, close_matches
from evomerge.objectives import ConstraintSpec, ObjectiveSpec

if TYPE_CHECKING:  # the drivers load Optuna and the store only when one is built
    from optuna.distributions import BaseDistribution

    from evomerge.store import RunStore

__all__ = [
    "DRIVER_NAMES",
    "Driver",
    "Proposal",
    "make_driver",
]


def make_driver(
    name: str,
    store: RunStore,
    *,
    distributions: Mapping[str, BaseDistribution],
    objectives: Sequence[ObjectiveSpec],
    constraints: Sequence[ConstraintSpec] = (),
    seed: int = 0,
    popsize: int | None = None,
    sigma0: float = 0.2,
    x0: Sequence[float] | None = None,
    dim: int | None = None,
    from_unit: Callable[[Sequence[float]], Mapping[str, Value]] | None = None,
    lookahead: int = 0,
    cma_update: str = "generations",
) -> Driver:
    """Build driver ``name`` on ``store``; it resumes from whatever the store's log holds.

    Every driver needs ``distributions`` (coordinate name -> Optuna distribution, the params
    recorded for each trial) and the run's ``objectives``/``constraints``. CMA also needs
    ``from_unit`` (unit vector -> named values), ``popsize``, and ``x0`` (or ``dim``, to start at
    the centre of the cube), and takes ``lookahead``: how many candidates beyond the generation
    being completed it hands out, so workers never wait for a generation's slowest member (0: the
    generational scheme; see ``cma_driver``), and ``cma_update``: ``"generations"`` (that driver) or
    ``"window"`` (``cma_window``: pycma told a sliding window of arriving results, no worker ever
    waits); a run keeps the one its log was started with. ``popsize`` is NSGA-II's population too. Call
    ``store.requeue_interrupted()`` first on a reopened run.
    """
    if name == "cma":
        if from_unit is None or popsize is None or (x0 is None and dim is None):
            raise ValueError("the cma driver needs from_unit, popsize and x0 (or dim)")
        from evomerge.drivers.cma_driver import CmaDriver  # pycma loads only when used
        from evomerge.drivers.cma_window import CmaWindowDriver, logged_update

        common: dict[str, Any] = dict(
            x0=list(x0) if x0 is not None else [0.5] * int(dim),  # type: ignore[arg-type]
            sigma0=sigma0, popsize=popsize, seed=seed, from_unit=from_unit,
            distributions=distributions, objectives=objectives, constraints=constraints,
        )
        if logged_update(store, cma_update) == "window":
            return CmaWindowDriver(store, **common)
        return CmaDriver(store, **common, lookahead=lookahead)
    if name in DRIVER_NAMES:
        from evomerge.drivers.optuna_driver import OptunaDriver

        return OptunaDriver(
            store,
            name,
            distributions=distributions,
            objectives=objectives,
            constraints=constraints,
            seed=seed,
            population=popsize,
        )
    raise ConfigError(
        f"unknown driver {name!r}; choose one of {', '.join(DRIVER_NAMES)}.{close_matches(name, DRIVER_NAMES)}",
        where="search.driver",
    )
