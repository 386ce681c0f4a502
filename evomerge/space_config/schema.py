"""The space file's sections as frozen pydantic models: what to merge, what to search, how to
score it, and where to run.

Every field has a docstring: it is the field's description, which
``scripts/gen_space_reference.py`` turns into ``docs/space-reference.md``. The ``merge:`` section
and its parameters are in :mod:`~evomerge.space_config.params`, ``evaluation:`` in
:mod:`~evomerge.space_config.evaluation`; a run's identity (hash and diff) in
:mod:`~evomerge.space_config.identity`.

Layer groups must divide the models' layer count, which is only known once the models are open:
:meth:`SpaceConfig.validate_against_models` does that check at run start.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from pydantic import Field, PrivateAttr, field_validator, model_validator

from ..drivers.names import DRIVER_NAMES as DRIVERS
from ..errors import ConfigError, close_matches, known_name
from ..merge.config import DTYPES
from ..objectives import DIRECTIONS
from . import identity
from .base import FieldError, _dotted, _finite, _Strict
from .evaluation import Evaluation
from .params import MergeSection, ResolvedParam, resolve_parameters

MEASURES = ("l2_from_base",)
#: Drivers that take ``search.population`` / ``search.sigma0``.
POPULATION_DRIVERS = ("cma", "nsga2")
SIGMA_DRIVERS = ("cma",)
#: How CMA-ES is told results: whole generations (evomerge.drivers.cma_driver) or a sliding window
#: of arriving results (evomerge.drivers.cma_window).
CMA_UPDATES = ("generations", "window")
#: pycma samples a population of 2 only as a mirrored pair, and a lookahead turns mirroring off
#: (its mirrors would be injected ahead of the lookahead's own candidates).
MIN_LOOKAHEAD_POPULATION = 3
DEFAULT_SIGMA0 = 0.25
BASE_NAME = "base"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _literal_password(url: str) -> bool:
    """Whether a database URL spells out a password (``${VAR}`` references are fine)."""
    from urllib.parse import urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:
        return False
    return bool(password) and not re.fullmatch(r"\$\{\w+\}", password)


# ------------------------------------------------------------------------------------------------
# models:
# ------------------------------------------------------------------------------------------------


def derived_name(reference: str) -> str:
    """A donor's short name from its reference: ``org/Model-7B@main`` -> ``Model-7B``."""
    stem = reference.split("@", 1)[0].rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem) or "donor"


class Donor(_Strict):
    """A fine-tune of the base. ``name`` appears in coordinate names (``g0/mlp/<name>/weight``)."""

    model: str = Field(min_length=1)
    """The fine-tune: a local Hugging Face folder, or a Hub id ``org/name[@revision]``."""
    name: str
    """Its short name in coordinate names and exports; default: the last part of ``model``."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"model": data, "name": derived_name(data)}
        if isinstance(data, Mapping) and "name" not in data and isinstance(data.get("model"), str):
            return {**data, "name": derived_name(data["model"])}
        return data

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(f"name {value!r} may hold only letters, digits, '_', '.', '-'; set name: explicitly")
        if value == BASE_NAME:
            raise ValueError(f"the name {BASE_NAME!r} is reserved for the base model; set another name:")
        return value


class Models(_Strict):
    """The base and its fine-tunes: local folders or Hub ids (``org/name[@revision]``)."""

    base: str = Field(min_length=1)
    """The model every donor was fine-tuned from: a local folder or a Hub id ``org/name[@revision]``."""
    donors: tuple[Donor, ...] = Field(min_length=1)
    """The fine-tunes to merge, at least one; each a reference (``toy_world/arith``) or ``{model: ..., name: ...}``."""

    @model_validator(mode="after")
    def _distinct(self) -> Models:
        seen_names: dict[str, int] = {}
        seen_models: dict[str, int] = {}
        for i, d in enumerate(self.donors):
            if d.model == self.base:
                raise FieldError(("donors", i, "model"), f"{d.model!r} is the base; donors are the fine-tunes of it")
            if d.model in seen_models:
                first = seen_models[d.model]
                raise FieldError(("donors", i, "model"), f"{d.model!r} is listed twice (also donors[{first}])")
            if d.name in seen_names:
                raise FieldError(
                    ("donors", i, "name"),
                    f"two donors are named {d.name!r} (also donors[{seen_names[d.name]}]); "
                    "write each as {model: ..., name: ...} with distinct names",
                )
            seen_names[d.name] = i
            seen_models[d.model] = i
        return self


# ------------------------------------------------------------------------------------------------
# objectives:, constraints:
# ------------------------------------------------------------------------------------------------


class _Measured(_Strict):
    """Names one measurement: an lm-eval task's metric, or a measure evomerge computes."""

    task: str | None = Field(default=None, min_length=1)
    """An lm-eval task name (from ``evaluation.include_path`` or lm-eval's own tasks); give ``metric`` with it."""
    metric: str | None = Field(default=None, min_length=1)
    """The task's metric, as lm-eval reports it (``acc``, ``exact_match,strict-match``)."""
    measure: str | None = None
    """Instead of a task: a measure evomerge computes, ``l2_from_base`` (distance of the merged weights from the base)."""

    @field_validator("measure")
    @classmethod
    def _known_measure(cls, value: str | None) -> str | None:
        return None if value is None else known_name(value, MEASURES, "measure", f"evomerge computes {', '.join(MEASURES)}")

    @model_validator(mode="after")
    def _one_kind(self) -> _Measured:
        if self.measure is not None and (self.task is not None or self.metric is not None):
            raise FieldError(("measure",), "give either task: and metric:, or measure:, not both")
        if self.measure is None:
            if self.task is None:
                raise ValueError("give task: (an lm-eval task) with metric:, or measure: l2_from_base")
            if self.metric is None:
                raise FieldError(("metric",), f"task {self.task!r} needs a metric:, e.g. metric: acc")
        return self

    @property
    def key(self) -> str:
        """The measurement's name: ``task:<task>/<metric>`` or ``l2_from_base``."""
        return self.measure if self.measure is not None else f"task:{self.task}/{self.metric}"


class Objective(_Measured):
    """A measurement to optimise. ``weight`` scales it when a driver (CMA-ES) needs one score."""

    direction: str
    """``maximize`` or ``minimize``."""
    weight: float = Field(default=1.0, gt=0)
    """Its weight in the one score CMA-ES ranks by (the sum of weight x value, minimised ones negated); Optuna drivers
    keep objectives apart."""

    @model_validator(mode="before")
    @classmethod
    def _needs_direction(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "direction" not in data:
            raise FieldError(("direction",), "missing; write direction: maximize or direction: minimize")
        return data

    @field_validator("direction")
    @classmethod
    def _known_direction(cls, value: str) -> str:
        return known_name(value, DIRECTIONS, "direction", "write maximize or minimize")

    @field_validator("weight")
    @classmethod
    def _finite_weight(cls, value: float) -> float:
        return _finite(value, "weight")  # type: ignore[return-value]


class Constraint(_Measured):
    """A bound a candidate must keep (``max`` and/or ``min``), e.g. l2_from_base at most 0.5."""

    min: float | None = None
    """Lower bound (not supported yet: refused before a run starts)."""
    max: float | None = None
    """Upper bound: a candidate above it breaks the constraint (ranked below every feasible one)."""

    @model_validator(mode="after")
    def _bounded(self) -> Constraint:
        _finite(self.min, "min")
        _finite(self.max, "max")
        if self.min is None and self.max is None:
            raise ValueError(f"constraint on {self.key} has no bound; write max: <number> (or min:)")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise FieldError(("min",), f"min {self.min} is above max {self.max}")
        return self


# ------------------------------------------------------------------------------------------------
# search:, workers:, the whole file
# ------------------------------------------------------------------------------------------------


class Search(_Strict):
    """The driver and its budget.

    ``sigma0`` is CMA-ES's initial step in the unit cube (written out as 0.25 when absent, so
    that it is part of the run's identity). ``population`` absent leaves it to the driver:
    pycma's 4 + 3 ln(dimension) for cma, Optuna's default for nsga2.
    """

    driver: str
    """Who proposes candidates: ``cma`` (pycma's CMA-ES), or Optuna's ``tpe``, ``nsga2``, ``gp``, ``random``."""
    budget: int = Field(ge=1)
    """Trials in all, across resumes (a larger budget continues the same run)."""
    population: int | None = Field(default=None, ge=2)
    """Candidates per generation (cma, nsga2); absent: the driver's default."""
    sigma0: float | None = Field(default=None, gt=0, le=1)
    """CMA-ES's initial step size in the unit cube of the coordinates (cma only; 0.25 when absent)."""
    seed: int = 0
    """Seeds the driver's own random generator."""
    lookahead: int | None = Field(default=None, ge=0)
    """CMA-ES: candidates handed out beyond the generation being completed (0: generational, workers
    wait for each generation's slowest member). Absent: twice ``workers.count``, at most half the
    population (none for one worker), when the run starts (more keeps more workers busy but loses
    score per trial); a resumed run keeps the value it started with."""
    cma_update: str | None = None
    """CMA-ES: ``generations`` (absent: pycma told one whole generation at a time, in member order,
    with ``lookahead``) or ``window`` (pycma told the last ``population`` results every
    ``population / 2`` arrivals, each candidate sampled from the current distribution: no worker
    ever waits, and no worse per trial in ``scripts/bench_cma_oversampling.py``); a resumed run
    keeps the one it started with."""
    hand_set: bool | None = None
    """Start with the hand-set merges a person would try (each input model alone, task arithmetic
    with weight 1 and lambda 1, each method's registry defaults with weight 1), labelled
    ``hand-set: ...`` in ``evomerge show``, and seed the driver with them; absent: true. They count
    against ``budget``; a recipe the space cannot express exactly is skipped with a notice."""

    @property
    def hand_set_on(self) -> bool:
        """Whether hand-set trials run (absent counts as true)."""
        return self.hand_set is not False

    @model_validator(mode="before")
    @classmethod
    def _default_sigma(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("driver") == "cma" and data.get("sigma0") is None:
            return {**data, "sigma0": DEFAULT_SIGMA0}
        return data

    @field_validator("driver")
    @classmethod
    def _known_driver(cls, value: str) -> str:
        return known_name(value, DRIVERS, "driver")

    @model_validator(mode="after")
    def _used(self) -> Search:
        if self.population is not None and self.driver not in POPULATION_DRIVERS:
            raise FieldError(
                ("population",),
                f"driver {self.driver!r} has no population (only {', '.join(POPULATION_DRIVERS)}); remove it",
            )
        if self.sigma0 is not None and self.driver not in SIGMA_DRIVERS:
            raise FieldError(("sigma0",), f"driver {self.driver!r} has no step size (only cma); remove it")
        if self.lookahead is not None and self.driver != "cma":
            raise FieldError(("lookahead",), f"driver {self.driver!r} has no generations to look ahead of (only cma); remove it")
        if self.cma_update is not None:
            if self.driver != "cma":
                raise FieldError(("cma_update",), f"driver {self.driver!r} has no CMA-ES update (only cma); remove it")
            if self.cma_update not in CMA_UPDATES:
                raise FieldError(("cma_update",), f"cma_update must be one of {', '.join(CMA_UPDATES)}, "
                                                  f"not {self.cma_update!r}")
            if self.cma_update == "window" and self.lookahead:
                raise FieldError(("lookahead",), "cma_update: window samples every candidate when it is asked for, "
                                                 "so there is nothing to look ahead of; remove lookahead")
        if self.lookahead and self.population is not None and self.population < MIN_LOOKAHEAD_POPULATION:
            raise FieldError(
                ("lookahead",),
                f"a lookahead needs a population of at least {MIN_LOOKAHEAD_POPULATION} (pycma samples "
                f"{self.population} only as a mirrored pair); set population: {MIN_LOOKAHEAD_POPULATION} or more, "
                "or lookahead: 0",
            )
        return self


class Workers(_Strict):
    """Where candidates run. ``pool: ray`` (the default) without ``ray_address``: a local Ray
    cluster sized by these numbers; ``pool: inprocess``: in the search process, no Ray."""

    pool: str = "ray"
    """Where candidates run: ``ray`` (worker actors on a Ray cluster) or ``inprocess`` (the search process
    itself, one candidate at a time, no Ray: the cheapest way to run with ``count: 1``)."""
    ray_address: str | None = None
    """An existing Ray cluster to join (``HEAD_IP:6379``); absent: a local cluster sized by these numbers."""
    count: int = Field(default=1, ge=1)
    """Worker actors, each holding the models and evaluating one candidate at a time."""
    gpus_per_worker: float = Field(default=0.0, ge=0)
    """GPUs each worker asks Ray for (0: CPU)."""
    cpus_per_worker: float = Field(default=1.0, gt=0)
    """CPUs each worker asks Ray for; also its torch thread count."""
    # Seconds one candidate may take on a worker before the worker is killed and replaced and the
    # trial fails "timed out" (not retried: a slow candidate is as slow elsewhere). None: no limit.
    timeout_s: float | None = Field(default=None, gt=0)
    """Seconds one candidate may take: then its worker is replaced and the trial fails "timed out" (not retried);
    absent: no limit."""
    device_memory: int | str | None = None
    """Caps the memory one worker's GPU may use (``24GB``, ``80GiB`` or bytes; a CPU worker: its host memory);
    absent: the free memory torch reports. The memory plan must fit within it."""
    host_memory: int | str | None = None
    """The host memory of a node the plan may count on (``64GB``); absent: what psutil reports available."""

    @field_validator("device_memory", "host_memory")
    @classmethod
    def _memory_size(cls, value: int | str | None) -> int | None:
        return None if value is None else parse_bytes(value)

    @field_validator("pool")
    @classmethod
    def _known_pool(cls, value: str) -> str:
        from ..pool.base import POOL_KINDS

        return known_name(value, POOL_KINDS, "worker pool")

    @model_validator(mode="after")
    def _address_needs_ray(self) -> Workers:
        if self.pool == "inprocess" and self.ray_address is not None:
            raise FieldError(("ray_address",), "the in-process pool runs no Ray; remove ray_address, or set pool: ray")
        return self


_BYTE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: int | str) -> int:
    """``24GB`` (powers of 10), ``80GiB`` (powers of 2) or a number of bytes, as bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"a memory size must be positive, got {value}")
        return value
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
    if m is None or m[2].upper() not in _BYTE_UNITS or float(m[1]) <= 0:
        raise ValueError(f"not a memory size: {value!r}; write e.g. 24GB or 80GiB")
    return int(float(m[1]) * _BYTE_UNITS[m[2].upper()])


# ------------------------------------------------------------------------------------------------
# route:
# ------------------------------------------------------------------------------------------------

#: The pool entry that stands for this recipe's parameter merge (also the stage name in exports).
MERGED_NAME = "merged"
#: Scales the route may put on a layer's residual-branch outputs: above 0 (0 is skipping the
#: layer, which the route already expresses) and at most 2 (beyond, a layer's update dominates
#: the residual stream and the model diverges: not a useful region to spend trials on).
SCALE_LIMITS = (0.0, 2.0)


class ScaleSpec(_Strict):
    """Per-included-layer scale on the layer's output projections: a number pins it, a range searches it."""

    value: float | None = None
    """Pins the scale (write the number alone: ``scale: 1.0``)."""
    range: tuple[float, float] | None = None
    """Searches the scale over ``[low, high]``, within (0, 2]."""
    init: float | None = None
    """Where the search starts, inside the range."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return {"value": float(data)}
        return data

    @model_validator(mode="after")
    def _within_limits(self) -> ScaleSpec:
        low, high = SCALE_LIMITS
        if (self.value is None) == (self.range is None):
            raise ValueError("write scale as a number (pinned) or as {range: [low, high]} (searched)")
        checks = [((), self.value)] if self.value is not None else []
        if self.range is not None:
            lo, hi = self.range
            if lo > hi:
                raise FieldError(("range",), f"low {lo} is above high {hi}; write [low, high]")
            checks += [(("range",), lo), (("range",), hi)]
            if self.init is not None:
                if not lo <= self.init <= hi:
                    raise FieldError(("init",), f"init {self.init} is outside range [{lo}, {hi}]")
        for path, v in checks:
            if not (math.isfinite(v) and low < v <= high):
                raise FieldError(path, f"scale {v} is outside ({low:g}, {high:g}]; a layer's output scale must be "
                                       f"above {low:g} (skip the layer instead) and at most {high:g}")
        return self

    @property
    def searched(self) -> bool:
        return self.range is not None


class RouteSection(_Strict):
    """Layer routing (frankenmerges): which layers, from which models, in which order.

    The pool's layers in order, repeated ``repeats`` times, are the route's slots (T = M x r for
    M pool layers); a candidate includes some slots, in slot order, between ``depth[0]`` and
    ``depth[1]`` of them. See :mod:`evomerge.space.route` for the encoding the drivers search.
    """

    pool: tuple[str, ...] = Field(min_length=1)
    """Models whose layers the route may use: ``base``, donor names, or ``merged`` (this candidate's parameter merge)."""
    repeats: int = Field(default=1, ge=1, le=16)
    """How many times the pool's layers, in order, make up the route's slots."""
    depth: tuple[int, int]
    """``[min, max]`` layers of the routed model."""
    scale: ScaleSpec | None = None
    """A scale per included layer on its residual outputs (o_proj, down_proj): a number pins it, ``{range: [low,
    high]}`` searches it; absent: none."""
    init: tuple[tuple[str, int], ...] | None = None
    """The starting route as ``[model, layer]`` pairs; default: the first pool model's layers in order."""
    merged: str | dict[str, Any] | None = None
    """A two-stage search: a finished run folder (its best trial) or a mergekit YAML whose merge the route uses as
    ``merged``."""
    dtype: str | None = None  # a route-only space's load and output dtype; with merge: it is merge.dtype
    """A route-only space's dtype (with ``merge:`` it is ``merge.dtype``); absent: float32."""

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str | None) -> str | None:
        return None if value is None else known_name(value, DTYPES, "dtype")

    @field_validator("depth")
    @classmethod
    def _depth(cls, value: tuple[int, int]) -> tuple[int, int]:
        low, high = value
        if low < 1:
            raise ValueError(f"the shallowest route needs at least 1 layer, got {low}")
        if low > high:
            raise ValueError(f"min {low} is above max {high}; write [min, max]")
        return value

    @field_validator("pool")
    @classmethod
    def _distinct(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for i, name in enumerate(value):
            if name in value[:i]:
                raise FieldError((i,), f"{name!r} is listed twice; list each pool model once (repeats: repeats them)")
        return value

    @field_validator("merged")
    @classmethod
    def _merged(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(value, str) and not value.strip():
            raise ValueError("give a run folder (runs/<name>: its best trial) or a mergekit YAML file")
        return value

    def slots_per_repeat(self, num_layers: int) -> int:
        return len(self.pool) * num_layers


class SpaceConfig(_Strict):
    """A validated, frozen space file."""

    name: str
    """The run's name, and its folder ``runs/<name>/``; default: the space file's stem."""
    models: Models
    """The base model and its fine-tunes."""
    merge: MergeSection | None = None
    """The parameter merge to search; a space has ``merge:``, ``route:``, or both."""
    objectives: tuple[Objective, ...] = Field(min_length=1)
    """What to optimise, at least one: ``{task, metric, direction}`` or ``{measure: l2_from_base, direction}``."""
    constraints: tuple[Constraint, ...] = ()
    """Bounds a candidate must keep, e.g. ``{measure: l2_from_base, max: 0.5}``."""
    evaluation: Evaluation = Evaluation()
    """How lm-eval scores each candidate."""
    search: Search
    """The driver and its budget."""
    workers: Workers = Workers()
    """Where candidates are merged and scored."""
    storage: str | None = None
    """A database URL for the trial log (PostgreSQL for several hosts; a password only as ``${VAR}``); absent: SQLite
    in the run folder."""
    trust_remote_code: bool = False
    """Run model code shipped in the model folders (``auto_map``); read that code first."""
    route: RouteSection | None = None
    """Layer routing (frankenmerges): which layers, from which models, in which order."""
    as_written: dict[str, str] | None = None
    """Set by evomerge in a run's stored config: each model path or task folder as the space file wrote it, by field,
    where the run holds it resolved (absolute, or a Hub id pinned to a commit); see evomerge/model_refs.py."""

    _source: str = PrivateAttr(default="space config")

    @field_validator("name")
    @classmethod
    def _run_name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(
                f"run name {value!r} may hold only letters, digits, '_', '.', '-' (it names the run folder); set name:"
            )
        return value

    @field_validator("storage")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError(
                f"{value!r} is not a database URL; write e.g. postgresql://user@host/db, or remove it for SQLite "
                "in the run folder"
            )
        if value is not None and _literal_password(value):
            # the URL is copied into runs/<name>/space.yaml and run.json, which get shared
            raise ValueError(
                "the URL holds a password, which would be written into the run folder; write ${VAR} in its "
                "place (postgresql://user:${EVOMERGE_DB_PASSWORD}@host/db, read from the environment when "
                "connecting), or leave it out and use PGPASSWORD or ~/.pgpass"
            )
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> SpaceConfig:
        self._check_route()
        for i, m in enumerate(self.merge.methods() if self.merge is not None else ()):
            try:
                m.check_inputs(len(self.models.donors) + 1, has_base=True)
            except ConfigError as err:
                where: tuple[str | int, ...] = ("merge", "method") + ((i,) if len(self.merge.method) > 1 else ())
                raise FieldError(where, f"{err} You listed the base and {len(self.models.donors)} donor(s).") from None
        seen: dict[str, int] = {}
        for i, o in enumerate(self.objectives):
            if o.key in seen:
                raise FieldError(("objectives", i), f"{o.key} is already objectives[{seen[o.key]}]")
            seen[o.key] = i
        tasks = self.task_names()
        for task in self.evaluation.tasks:
            if task not in tasks:
                raise FieldError(
                    ("evaluation", "tasks", task),
                    f"no objective or constraint uses task {task!r}.{close_matches(task, tasks)}",
                )
        return self

    def _check_route(self) -> None:
        route = self.route
        if route is None:
            if self.merge is None:
                raise FieldError(("merge",), "missing; a space searches a merge (merge:), a layer route (route:), or both")
            return
        names = [BASE_NAME, *(d.name for d in self.models.donors)]
        for i, entry in enumerate(route.pool):
            if entry != MERGED_NAME and entry not in names:
                known = [MERGED_NAME, *names]
                raise FieldError(("route", "pool", i), f"{entry!r} is not a pool model.{close_matches(entry, known)} "
                                 f"Use {', '.join(known)} ({MERGED_NAME}: this recipe's parameter merge)")
        uses_merged = MERGED_NAME in route.pool
        if uses_merged and self.merge is None and route.merged is None:
            raise FieldError(("route", "pool"), f"'{MERGED_NAME}' needs a parameter merge: add a merge: section to "
                             "search it jointly with the route, or route.merged: (a finished run folder or a mergekit "
                             "YAML) to route over a merge found before")
        if self.merge is not None and route.dtype is not None and route.dtype != self.merge.dtype:
            raise FieldError(("route", "dtype"), f"differs from merge.dtype {self.merge.dtype!r}; a joint search has "
                             "one dtype: remove route.dtype")
        if self.merge is not None and route.merged is not None:
            raise FieldError(("route", "merged"), "give either merge: (searched jointly) or route.merged: (fixed), not both")
        if not uses_merged and (self.merge is not None or route.merged is not None):
            field = ("merge",) if self.merge is not None else ("route", "merged")
            raise FieldError(field, f"the route never uses the parameter merge; add '{MERGED_NAME}' to route.pool "
                             "or remove this")
        for i, (entry, _layer) in enumerate(route.init or ()):
            if entry not in route.pool:
                raise FieldError(("route", "init", i), f"{entry!r} is not in route.pool ({', '.join(route.pool)})")
        if route.init is not None and not route.depth[0] <= len(route.init) <= route.depth[1]:
            raise FieldError(("route", "init"), f"the initial route has {len(route.init)} layers, outside route.depth "
                             f"{list(route.depth)}; shorten it or widen depth")
        for kind, items in (("objectives", self.objectives), ("constraints", self.constraints)):
            for i, m in enumerate(items):
                if m.measure == "l2_from_base":
                    raise FieldError((kind, i), "l2_from_base compares each tensor with the base's and is not defined "
                                     "for a routed model (other layers, other depth); remove it or the route: section")

    @property
    def dtype(self) -> str:
        """The dtype candidates are merged and evaluated in."""
        if self.merge is not None:
            return self.merge.dtype
        return (self.route.dtype if self.route is not None else None) or "float32"

    def searches_parameters(self) -> bool:
        """Whether the drivers search merge parameters (``merge:``), not only a route."""
        return self.merge is not None

    # -- what other modules ask of a config ------------------------------------------------------

    @property
    def source(self) -> str:
        """The file this config came from (for messages)."""
        return self._source

    def task_names(self) -> list[str]:
        """Every lm-eval task the evaluation must run (objectives and constraints), in order."""
        names = [m.task for m in (*self.objectives, *self.constraints) if m.task is not None]
        return list(dict.fromkeys(names))

    def measurement_keys(self) -> list[str]:
        """Every measurement a trial must produce: objectives first, then constraint-only ones."""
        keys = [m.key for m in (*self.objectives, *self.constraints)]
        return list(dict.fromkeys(keys))

    def parameters(self) -> tuple[ResolvedParam, ...]:
        """The registry applied to ``merge.parameters`` (see :func:`resolve_parameters`); none for a route-only space."""
        return resolve_parameters(self.merge) if self.merge is not None else ()

    def validate_against_models(self, num_layers: int, tensor_names: Sequence[str] | None = None) -> None:
        """Checks that need the opened models: layer groups divide the layer count, and (given
        the tensor names) every filter matches some tensor, so a typo is not a silent no-op; a
        route's depth fits its slots and its initial layers exist."""
        if self.route is not None:
            self._check_route_layers(num_layers)
        if self.merge is None:
            return
        checks = [(("merge", "layer_groups"), self.merge.layer_groups)]
        checks += [
            (("merge", "parameters", name, "layer_groups"), spec.layer_groups)
            for name, spec in self.merge.parameters.items()
            if spec.layer_groups is not None
        ]
        for path, groups in checks:
            if groups > num_layers or num_layers % groups:
                divisors = [d for d in range(1, num_layers + 1) if num_layers % d == 0]
                raise ConfigError(
                    f"{groups} layer groups do not divide the models' {num_layers} layers; use one of "
                    f"{', '.join(map(str, divisors))}",
                    where=f"{self.source}: {_dotted(path)}",
                )
        if tensor_names is None:
            return
        filter_sets = [(("merge", "filters"), self.merge.filters)]
        filter_sets += [
            (("merge", "parameters", name, "filters"), spec.filters)
            for name, spec in self.merge.parameters.items()
            if spec.filters
        ]
        parts = sorted({p for n in tensor_names for p in n.split(".") if not p.isdigit()})
        for path, filters in filter_sets:
            for i, f in enumerate(filters):
                if not any(f in n for n in tensor_names):
                    raise ConfigError(
                        f"filter {f!r} matches no tensor of the models.{close_matches(f, parts)}",
                        where=f"{self.source}: {_dotted((*path, i))}",
                    )

    def _check_route_layers(self, num_layers: int) -> None:
        route = self.route
        assert route is not None
        slots = route.slots_per_repeat(num_layers) * route.repeats
        if route.depth[1] > slots:
            raise ConfigError(
                f"max depth {route.depth[1]} is more than the route's {slots} slots ({len(route.pool)} pool models x "
                f"{num_layers} layers x {route.repeats} repeats); lower it or raise route.repeats",
                where=f"{self.source}: route.depth",
            )
        for i, (_entry, layer) in enumerate(route.init or ()):
            if not 0 <= layer < num_layers:
                raise ConfigError(f"layer {layer} does not exist; the models have layers 0..{num_layers - 1}",
                                  where=f"{self.source}: route.init[{i}]")

    def to_data(self) -> dict[str, Any]:
        """The normalised config as plain data (defaults explicit, unset options left out); it loads
        back to an equal config."""
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_data(), sort_keys=False, default_flow_style=None)

    def __eq__(self, other: object) -> bool:
        # equal content is an equal config, wherever it was read from (the source is not data)
        return isinstance(other, SpaceConfig) and self.to_data() == other.to_data()

    __hash__ = None  # type: ignore[assignment]  # holds dicts; never a dict key

    # -- the run's identity (see :mod:`evomerge.space_config.identity`) ---------------------------

    def identity_data(self) -> dict[str, Any]:
        """The part of the config that defines a run, with ``merge.parameters`` resolved."""
        return identity.identity_data(self.to_data(), self.parameters())

    def canonical_json(self) -> str:
        return identity.canonical_json(self.identity_data())

    def config_hash(self) -> str:
        """sha256 of the canonical JSON: equal for configs that define the same run."""
        return identity.identity_hash(self.identity_data())

    def diff(self, other: SpaceConfig, *, identity_only: bool = True) -> list[str]:
        """The fields that differ, as ``path: old -> new`` (empty when the runs are the same)."""
        a = self.identity_data() if identity_only else self.to_data()
        b = other.identity_data() if identity_only else other.to_data()
        return identity.differences(a, b)
