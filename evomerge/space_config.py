"""The space file: what to merge, what to search, how to score it, and where to run.

A space file is YAML, read by :mod:`evomerge.strict_yaml` (``yaml.safe_load`` that refuses a key
written twice) and validated into frozen pydantic models.
Every mistake becomes one :class:`~evomerge.errors.ConfigError` whose message names the file and
the field path and says how to fix it (``space.yaml: merge.parameters.density.range: low 0.9 is
above high 0.2; write [low, high]``), so the CLI can print it and exit with status 2 before any
run folder exists. Unknown keys are errors with close matches: a misspelled ``densty`` must never
quietly fall back to a default and waste a night of search.

Which parameters are searched is derived from the merge-method registry, not repeated here:

- a parameter written as a number or true/false is pinned to that value;
- a parameter written as a mapping (``{range: [lo, hi]}``, or ``{}`` for the registry's range)
  is searched;
- a parameter not written at all is searched over the registry's ``search_range`` when it has
  one (for ``ties``: ``weight``, ``density`` and ``lambda``) and otherwise set to the method's
  default (``normalize``, ``rescale``, ``int8_mask``). Pin a parameter to stop searching it.

A searched parameter is searched only by the chosen methods that declare it searchable; the
other chosen methods get its default (``density`` searched for ``[task_arithmetic, ties]`` is
used by ``ties`` only: ``task_arithmetic`` accepts and ignores it, as mergekit does).

Layer groups must divide the models' layer count, which is only known once the models are open:
:meth:`SpaceConfig.validate_against_models` does that check at run start.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import ConfigError, close_matches
from .merge.config import DTYPES
from .drivers import DRIVER_NAMES as DRIVERS
from .merge.registry import MergeMethod, Param, get_method
from .pareto import DIRECTIONS

MEASURES = ("l2_from_base",)
#: Drivers that take ``search.population`` / ``search.sigma0``.
POPULATION_DRIVERS = ("cma", "nsga2")
SIGMA_DRIVERS = ("cma",)
DEFAULT_SIGMA0 = 0.25
#: Fields that do not change which candidates are proposed or how they are scored: a run may be
#: resumed with more workers, another storage URL or a larger budget.
NON_IDENTITY_FIELDS = ("name", "workers", "storage", "search.budget")
#: lm-eval arguments evomerge sets itself; passing them through would silently fight its own.
RESERVED_LM_EVAL_ARGS = {
    "model": "evomerge passes the merged model itself",
    "model_args": "evomerge passes the merged model itself",
    "tasks": "tasks come from objectives: and constraints:",
    "task_manager": "evomerge builds one per worker from evaluation.include_path",
    "samples": "use evaluation.items",
    "limit": "use evaluation.items",
    "num_fewshot": "use evaluation.num_fewshot",
    "batch_size": "use evaluation.batch_size",
    "bootstrap_iters": "evomerge sets 0: standard errors are not used by the search",
    "use_cache": "lm-eval's cache keys on the request, not the model; it would mix candidates",
    "cache_requests": "lm-eval's cache keys on the request, not the model; it would mix candidates",
}
BASE_NAME = "base"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class FieldError(ValueError):
    """A validator's error about a sub-field: ``path`` is appended to where pydantic found it."""

    def __init__(self, path: Sequence[str | int], message: str) -> None:
        self.path = tuple(path)
        super().__init__(message)


class _Strict(BaseModel):
    # strict: YAML already types its values; "yes" is not true and "0.5" is not a number here.
    # use_attribute_docstrings: each field's docstring is its description, which
    # scripts/gen_space_reference.py turns into docs/space-reference.md
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True)


def _literal_password(url: str) -> bool:
    """Whether a database URL spells out a password (``${VAR}`` references are fine)."""
    from urllib.parse import urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:
        return False
    return bool(password) and not re.fullmatch(r"\$\{\w+\}", password)


def _finite(value: float | None, what: str) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value}")
    return value


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
# merge:
# ------------------------------------------------------------------------------------------------


def _check_filters(filters: tuple[str, ...] | None) -> tuple[str, ...] | None:
    if filters is None:
        return None
    for i, f in enumerate(filters):
        if not f or f == "*":
            raise FieldError(
                (i,), "a filter is a non-empty substring of tensor names; the catch-all '*' is always added last"
            )
        if "/" in f:
            raise FieldError((i,), f"filter {f!r} contains '/', which separates parts of coordinate names")
    dupes = {f for f in filters if filters.count(f) > 1}
    if dupes:
        raise ValueError(f"filters listed twice: {', '.join(sorted(dupes))}")
    return filters


class ParamSpec(_Strict):
    """One parameter: pinned (``value``) or searched (``range`` or the registry's range).

    Written in YAML as a bare number or true/false (pinned), or as a mapping (searched).
    ``layer_groups`` and ``filters`` override ``merge.layer_groups``/``merge.filters`` for this
    parameter, e.g. one density for the whole model while weights vary per group and filter.
    """

    value: float | bool | None = None
    """Pins the parameter to this number or true/false (write the value alone: ``lambda: 1.0``)."""
    range: tuple[float, float] | None = None
    """Searches the parameter over ``[low, high]``; absent in a mapping: the registry's range for it."""
    log: bool = False
    """Search the range on a log scale (needs low above 0)."""
    init: float | None = None
    """Where the search starts, inside the range; default: the range's centre."""
    layer_groups: int | None = Field(default=None, ge=1)
    """Layer groups for this parameter alone; default: ``merge.layer_groups``."""
    filters: tuple[str, ...] | None = None
    """Tensor-name filters for this parameter alone (``[]``: one value for every tensor); default: ``merge.filters``."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if data is None:
            raise ValueError("empty; write a value to pin it, {range: [low, high]} to search it, or remove the line")
        if isinstance(data, (bool, int, float)):
            return {"value": data}
        if not isinstance(data, Mapping):
            raise ValueError(
                f"expected a number or true/false (to pin it) or a mapping such as {{range: [low, high]}} "
                f"(to search it), got {data!r}"
            )
        return data

    @field_validator("value", "init")
    @classmethod
    def _finite_value(cls, value: float | bool | None) -> float | bool | None:
        if isinstance(value, float):
            _finite(value, "the value")
        return value

    @field_validator("range")
    @classmethod
    def _ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is None:
            return None
        low, high = value
        _finite(low, "low")
        _finite(high, "high")
        if low > high:
            raise ValueError(f"low {low} is above high {high}; write [low, high]")
        if low == high:
            raise ValueError(f"the range [{low}, {high}] is empty; to pin the value write it alone, e.g. {low}")
        return value

    @field_validator("filters")
    @classmethod
    def _filters(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return _check_filters(value)

    @model_validator(mode="after")
    def _consistent(self) -> ParamSpec:
        if self.value is None:
            if self.log and self.range is not None and self.range[0] <= 0:
                raise FieldError(("range",), f"log: true needs a range above 0, got {list(self.range)}")
            if self.init is not None and self.range is not None and not self.range[0] <= self.init <= self.range[1]:
                raise FieldError(("init",), f"init {self.init} lies outside range {list(self.range)}")
            return self
        extra = [k for k in ("range", "init", "layer_groups", "filters") if getattr(self, k) is not None]
        if self.log:
            extra.append("log")
        if extra:
            raise FieldError(
                (extra[0],), f"'{extra[0]}' applies to searched parameters; this one is pinned by value: {self.value}"
            )
        return self

    @property
    def pinned(self) -> bool:
        return self.value is not None


def _method_list(value: Any) -> Any:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise FieldError(
            ("method",), f"expected a method name or a list of them, e.g. [ties, dare_ties]; got {value!r}"
        )
    return value


class MergeSection(_Strict):
    """How candidates are merged: method(s), granularity and parameters."""

    method: tuple[str, ...] = Field(min_length=1)
    """A merge method (``ties``), or a list of them, which makes the method a searched choice."""
    layer_groups: int = Field(default=1, ge=1)
    """Contiguous groups of layers with values of their own (1: the whole model); must divide the layer count."""
    filters: tuple[str, ...] = ()
    """Tensor-name substrings (``self_attn``, ``mlp``) with values of their own; a catch-all ``*`` comes last."""
    parameters: dict[str, ParamSpec] = Field(default_factory=dict)
    """Per parameter name: a number pins it, a mapping searches it; not listed: searched over the registry's range when
    it has one, else the method's default."""
    dtype: str = "float32"
    """The dtype candidates are merged and evaluated in (and the exported ``dtype``)."""
    random_seed: int = 0
    """Seeds the random sparsifiers (dare, della), the same for every trial; exported as ``random_seed``."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "method" in data:
            return {**data, "method": _method_list(data["method"])}
        return data

    @field_validator("method")
    @classmethod
    def _known_methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for i, name in enumerate(value):
            try:
                get_method(name)
            except ConfigError as err:
                raise FieldError((i,) if len(value) > 1 else (), str(err)) from None
            if name == "passthrough":
                raise FieldError(
                    (i,) if len(value) > 1 else (),
                    "passthrough copies one model per layer and has nothing to search; layer routing will "
                    "have its own route: section",
                )
        if len(set(value)) != len(value):
            raise ValueError(f"a method is listed twice in {list(value)}")
        return value

    @field_validator("filters")
    @classmethod
    def _filters(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_filters(value) or ()

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"unknown dtype {value!r}; use one of {', '.join(DTYPES)}.{close_matches(value, DTYPES)}")
        return value

    @model_validator(mode="after")
    def _parameters_exist(self) -> MergeSection:
        resolve_parameters(self)  # raises FieldError naming the parameter and the methods
        return self

    def methods(self) -> tuple[MergeMethod, ...]:
        return tuple(get_method(m) for m in self.method)


@dataclass(frozen=True)
class ResolvedParam:
    """What the space does with one parameter name across the chosen methods.

    ``mode`` is ``search`` (coordinates over ``range``), ``fixed`` (the user's ``value``) or
    ``default`` (each method's own default). ``searched_by`` lists the methods that read the
    search coordinates; the other methods that take the parameter use their default.
    """

    name: str
    kind: type
    per_model: bool
    mode: Literal["search", "fixed", "default"]
    taken_by: tuple[str, ...]
    searched_by: tuple[str, ...] = ()
    base_takes_it: tuple[str, ...] = ()  # methods whose base entry receives it (linear's weight)
    value: float | bool | None = None
    range: tuple[float, float] | None = None
    log: bool = False
    init: float | None = None
    layer_groups: int = 1
    filters: tuple[str, ...] = ()


def resolve_parameters(merge: MergeSection) -> tuple[ResolvedParam, ...]:
    """Apply the registry to ``merge.parameters``: which are searched, pinned or left at default.

    Raises FieldError for a parameter no chosen method takes, a pinned value of the wrong type,
    or a searched parameter with no range anywhere.
    """
    methods = [get_method(m) for m in merge.method]
    declared: dict[str, list[tuple[MergeMethod, Param]]] = {}
    for m in methods:
        for p in m.params:
            declared.setdefault(p.name, []).append((m, p))
    for name in merge.parameters:
        if name not in declared:
            takes = "; ".join(f"{m.name} takes {', '.join(p.name for p in m.params) or 'none'}" for m in methods)
            raise FieldError(
                ("parameters", name),
                f"no chosen method takes '{name}' ({takes}).{close_matches(name, declared)}",
            )
    out = []
    for name, entries in declared.items():
        spec = merge.parameters.get(name)
        kinds = {p.kind for _, p in entries}
        taken_by = tuple(m.name for m, _ in entries)
        per_model = any(p.per_model for _, p in entries)
        base_takes = tuple(m.name for m, p in entries if p.per_model and p.includes_base)
        common = dict(
            name=name, kind=next(iter(kinds)), per_model=per_model, taken_by=taken_by, base_takes_it=base_takes
        )
        if spec is not None and spec.pinned:
            want_bool = bool in kinds
            if want_bool != isinstance(spec.value, bool):
                want = "true or false" if want_bool else "a number"
                raise FieldError(("parameters", name), f"'{name}' takes {want}, got {spec.value!r}")
            out.append(ResolvedParam(mode="fixed", value=spec.value, **common))
            continue
        searchable = [(m, p) for m, p in entries if p.kind is float and p.search_range is not None]
        if spec is None and not searchable:
            out.append(ResolvedParam(mode="default", **common))
            continue
        if spec is None:
            spec = ParamSpec()
        if not searchable:
            why = "a flag" if bool in kinds else "not used by the merge"
            raise FieldError(
                ("parameters", name),
                f"'{name}' is {why} for {', '.join(taken_by)}, so there is nothing to search; pin it to a value "
                "or remove it",
            )
        if spec.range is not None:
            low, high = spec.range
        else:  # the hull of the registry's ranges, in case methods differ
            low = min(p.search_range[0] for _, p in searchable)  # type: ignore[index]
            high = max(p.search_range[1] for _, p in searchable)  # type: ignore[index]
            if spec.log and low <= 0:
                raise FieldError(
                    ("parameters", name, "log"),
                    f"log: true needs a range above 0; the default is [{low}, {high}]: give range:",
                )
            if spec.init is not None and not low <= spec.init <= high:
                raise FieldError(
                    ("parameters", name, "init"), f"init {spec.init} lies outside the default range [{low}, {high}]"
                )
        out.append(
            ResolvedParam(
                mode="search",
                searched_by=tuple(m.name for m, _ in searchable),
                range=(low, high),
                log=spec.log,
                init=spec.init,
                layer_groups=spec.layer_groups or merge.layer_groups,
                filters=merge.filters if spec.filters is None else spec.filters,
                **common,
            )
        )
    return tuple(out)


# ------------------------------------------------------------------------------------------------
# objectives:, constraints:, evaluation:
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
        if value is not None and value not in MEASURES:
            known = ", ".join(MEASURES)
            raise ValueError(f"unknown measure {value!r}; evomerge computes {known}.{close_matches(value, MEASURES)}")
        return value

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
        if value not in DIRECTIONS:
            hint = close_matches(value, DIRECTIONS)
            raise ValueError(f"unknown direction {value!r}; write maximize or minimize.{hint}")
        return value

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


class TaskEvaluation(_Strict):
    """Per-task overrides of the evaluation defaults."""

    items: int | tuple[int, ...] | None = None
    """This task's item count or list of item indices; default: ``evaluation.items``."""
    num_fewshot: int | None = Field(default=None, ge=0)
    """This task's few-shot count; default: ``evaluation.num_fewshot``."""

    @field_validator("items")
    @classmethod
    def _items(cls, value: int | tuple[int, ...] | None) -> int | tuple[int, ...] | None:
        return _check_items(value)


def _check_items(value: int | tuple[int, ...] | None) -> int | tuple[int, ...] | None:
    if isinstance(value, int) and value < 1:
        raise ValueError(f"items must be at least 1, got {value}; remove it to use every item")
    if isinstance(value, tuple):
        if not value:
            raise ValueError("an empty item list evaluates nothing; list item indices or remove it")
        if any(i < 0 for i in value) or len(set(value)) != len(value):
            raise ValueError("item indices must be distinct and not negative")
    return value


class Evaluation(_Strict):
    """How each candidate is scored with lm-eval; every trial sees the same items.

    ``items`` is either a count N (N item indices drawn once, with ``seed``, from the task's
    documents: see :meth:`item_indices`) or an explicit list of indices; absent means all items.
    """

    items: int | None = None
    """Items each trial scores per task: N drawn once with ``seed`` (the same N for every trial); absent: every item."""
    num_fewshot: int | None = Field(default=None, ge=0)
    """Few-shot examples per item (lm-eval's ``num_fewshot``); absent: the task's own default."""
    batch_size: int | Literal["auto"] = 8
    """lm-eval's batch size, a number or ``auto``."""
    seed: int = 0
    """Seeds the draw of ``items`` (per task, independent of the other tasks)."""
    include_path: tuple[str, ...] = ()
    """Folders of lm-eval task YAMLs to search for the tasks named by objectives and constraints; empty: the project's
    ``eval_tasks/``. lm-eval's own tasks are found either way."""
    tasks: dict[str, TaskEvaluation] = Field(default_factory=dict)
    """Per-task overrides of ``items`` and ``num_fewshot``, keyed by task name."""
    lm_eval_args: dict[str, Any] = Field(default_factory=dict)
    """Further arguments for lm-eval's ``simple_evaluate`` (plain values), except those evomerge sets itself."""

    @field_validator("items")
    @classmethod
    def _items(cls, value: int | None) -> int | None:
        return _check_items(value)  # type: ignore[return-value]

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"batch_size must be at least 1 (or auto), got {value}")
        return value

    @field_validator("lm_eval_args")
    @classmethod
    def _passthrough(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key in RESERVED_LM_EVAL_ARGS:
                raise FieldError((key,), f"evomerge sets '{key}' itself: {RESERVED_LM_EVAL_ARGS[key]}")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"must hold plain values (text, numbers, lists, mappings): {err}") from None
        return value

    def for_task(self, task: str) -> TaskEvaluation:
        """The task's settings with the defaults filled in."""
        own = self.tasks.get(task, TaskEvaluation())
        return TaskEvaluation.model_construct(
            items=own.items if own.items is not None else self.items,
            num_fewshot=own.num_fewshot if own.num_fewshot is not None else self.num_fewshot,
        )

    def item_indices(self, task: str, num_docs: int) -> list[int] | None:
        """The fixed item indices ``task`` uses (None: all), for lm-eval's ``samples=``.

        A count draws from its own RNG seeded by (seed, task), so the subset never depends on
        numpy's global RNG (lm-eval reseeds it) nor on which other tasks are listed.
        """
        items = self.for_task(task).items
        if items is None:
            return None
        if isinstance(items, int):
            if items > num_docs:
                raise ConfigError(
                    f"asks for {items} items but task {task!r} has {num_docs}; lower it or remove it to use all",
                    where=f"evaluation.{'tasks.' + task + '.' if task in self.tasks else ''}items",
                )
            return sorted(random.Random(f"{self.seed}:{task}").sample(range(num_docs), items))
        too_big = [i for i in items if i >= num_docs]
        if too_big:
            raise ConfigError(
                f"item indices {too_big[:5]} are past the end of task {task!r}, which has {num_docs} items",
                where=f"evaluation.tasks.{task}.items",
            )
        return sorted(items)


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

    @model_validator(mode="before")
    @classmethod
    def _default_sigma(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("driver") == "cma" and data.get("sigma0") is None:
            return {**data, "sigma0": DEFAULT_SIGMA0}
        return data

    @field_validator("driver")
    @classmethod
    def _known_driver(cls, value: str) -> str:
        if value not in DRIVERS:
            hint = close_matches(value, DRIVERS)
            raise ValueError(f"unknown driver {value!r}; use one of {', '.join(DRIVERS)}.{hint}")
        return value

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
        from .pool.base import POOL_KINDS

        if value not in POOL_KINDS:
            raise ValueError(f"unknown worker pool {value!r}; use one of {', '.join(POOL_KINDS)}.{close_matches(value, POOL_KINDS)}")
        return value

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
    ``depth[1]`` of them. See :mod:`evomerge.route_space` for the encoding the drivers search.
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
        if value is not None and value not in DTYPES:
            raise ValueError(f"unknown dtype {value!r}; use one of {', '.join(DTYPES)}.{close_matches(value, DTYPES)}")
        return value

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

    def identity_data(self) -> dict[str, Any]:
        """The part of the config that defines a run (see NON_IDENTITY_FIELDS).

        ``merge.parameters`` appears resolved against the registry, so spelling out a default
        (``weight: {range: [0, 1]}``) is the same run as leaving it out, and a registry whose
        default ranges changed since the run started is a different run.
        """
        data = self.to_data()
        if self.merge is not None:
            data["merge"]["parameters"] = {p.name: _resolved_data(p) for p in self.parameters()}
        for field in NON_IDENTITY_FIELDS:
            *parents, last = field.split(".")
            node = data
            for p in parents:
                node = node[p]
            node.pop(last, None)
        return data

    def canonical_json(self) -> str:
        return json.dumps(self.identity_data(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def config_hash(self) -> str:
        """sha256 of the canonical JSON: equal for configs that define the same run."""
        return hashlib.sha256(self.canonical_json().encode("ascii")).hexdigest()

    def diff(self, other: SpaceConfig, *, identity_only: bool = True) -> list[str]:
        """The fields that differ, as ``path: old -> new`` (empty when the runs are the same)."""
        a = self.identity_data() if identity_only else self.to_data()
        b = other.identity_data() if identity_only else other.to_data()
        out: list[str] = []
        _diff(a, b, (), out)
        return out


def _resolved_data(p: ResolvedParam) -> dict[str, Any]:
    if p.mode == "fixed":
        return {"mode": p.mode, "value": p.value}
    if p.mode == "default":
        return {"mode": p.mode}
    data = {"mode": p.mode, "range": list(p.range or ()), "log": p.log, "layer_groups": p.layer_groups,
            "filters": list(p.filters), "searched_by": list(p.searched_by)}
    if p.init is not None:
        data["init"] = p.init
    return data


def _diff(a: Any, b: Any, path: tuple[str | int, ...], out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(dict.fromkeys([*a, *b])):
            if key not in a:
                out.append(f"{_dotted((*path, key))}: (absent) -> {json.dumps(b[key])}")
            elif key not in b:
                out.append(f"{_dotted((*path, key))}: {json.dumps(a[key])} -> (absent)")
            else:
                _diff(a[key], b[key], (*path, key), out)
    elif a != b:
        out.append(f"{_dotted(path)}: {json.dumps(a)} -> {json.dumps(b)}")


# ------------------------------------------------------------------------------------------------
# Loading and error messages
# ------------------------------------------------------------------------------------------------


def _dotted(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or "(top level)"


def _tupled(data: Any) -> Any:
    """YAML lists as tuples (strict validation wants tuples for the frozen fields)."""
    if isinstance(data, list):
        return tuple(_tupled(x) for x in data)
    if isinstance(data, dict):
        return {k: _tupled(v) for k, v in data.items()}
    return data


_KIND_WORDS = {
    "float_type": "a number",
    "int_type": "a whole number",
    "bool_type": "true or false",
    "string_type": "text",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "none_required": "nothing (this section is reserved)",
    "literal_error": "auto",
}


_TYPE_TAGS = {"float", "bool", "int", "str", "tuple", "dict", "none", "literal['auto']"}


def plain_data(data: Any) -> Any:
    """Undo the loader's lists-to-tuples (see :func:`_tupled`) for data handed to other parsers."""
    if isinstance(data, Mapping):
        return {k: plain_data(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [plain_data(v) for v in data]
    return data


def _member_tag(part: Any) -> bool:
    """Union-member and validator tags pydantic puts in locations, which are not fields."""
    if not isinstance(part, str):
        return False
    return "[" in part or part in _TYPE_TAGS or part in _MODELS


def _known_fields(path: Sequence[str | int]) -> list[str]:
    """Fields allowed at ``path`` (for 'did you mean'), walking the model classes."""
    model: type[BaseModel] | None = SpaceConfig
    dict_of: dict[tuple[type[BaseModel], str], type[BaseModel]] = {
        (MergeSection, "parameters"): ParamSpec,
        (Evaluation, "tasks"): TaskEvaluation,
    }
    pending_dict: type[BaseModel] | None = None
    for part in path:
        if isinstance(part, int) or model is None:
            continue
        if pending_dict is not None:
            model, pending_dict = pending_dict, None
            continue
        if (model, part) in dict_of:
            pending_dict = dict_of[(model, part)]
            continue
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field is not None else None
    return list(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _explain(err: ValidationError, source: str) -> ConfigError:
    by_loc: dict[str, list[str]] = {}
    for e in err.errors():
        loc: tuple[str | int, ...] = tuple(p for p in e["loc"] if not _member_tag(p))
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            loc = (*loc, *cause.path)
        where = _dotted(loc)
        if e["type"] == "extra_forbidden":
            field = str(loc[-1]) if loc else "?"
            known = _known_fields(loc[:-1])
            by_loc.setdefault(where, []).append(
                f"unknown field.{close_matches(field, known)} Known fields here: {', '.join(known)}"
            )
        elif e["type"] == "missing":
            by_loc.setdefault(where, []).append("missing; this field is required")
        elif e["type"] in _KIND_WORDS:
            by_loc.setdefault(where, []).append(f"expected {_KIND_WORDS[e['type']]}, got {e['input']!r}")
        else:
            by_loc.setdefault(where, []).append(str(e["msg"]).removeprefix("Value error, "))
    lines = []
    for where, msgs in by_loc.items():
        expected = [m.removeprefix("expected ").rsplit(", got ", 1) for m in msgs if m.startswith("expected ")]
        if len(expected) > 1:  # one per union member: say them together
            msgs = [f"expected {' or '.join(dict.fromkeys(x[0] for x in expected))}, got {expected[0][-1]}"] + [
                m for m in msgs if not m.startswith("expected ")
            ]
        lines.extend(f"{where}: {m}" for m in dict.fromkeys(msgs))
    head, *rest = lines or ["invalid"]
    return ConfigError(head + "".join(f"\n  {source}: {line}" for line in rest[:7]), where=source)


_MODELS = {m.__name__ for m in (Donor, Models, ParamSpec, MergeSection, Objective, Constraint, TaskEvaluation,
                                Evaluation, Search, Workers, ScaleSpec, RouteSection, SpaceConfig)}


def parse_space_config(data: Any, *, source: str = "space config", default_name: str | None = None) -> SpaceConfig:
    """Validate a space config given as plain data (e.g. from ``yaml.safe_load``)."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"expected a mapping with models:, merge:, objectives: and search:, got {type(data).__name__}", where=source
        )
    data = dict(data)
    if "name" not in data and default_name is not None:
        data["name"] = default_name
    try:
        config = SpaceConfig.model_validate(_tupled(data))
    except ValidationError as err:
        raise _explain(err, source) from None
    except ConfigError as err:  # raised by code that validators call
        raise ConfigError(str(err), where=source) from None
    config._source = source
    return config


def load_space_config(path: str | Path) -> SpaceConfig:
    """Read and validate a space file; the run name defaults to the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such space file: {path}")
    from .strict_yaml import load  # duplicate keys refused, with both lines

    try:
        data = load(path.read_text(encoding="utf-8"), source=str(path))
    except UnicodeDecodeError as err:
        raise ConfigError(f"not UTF-8 text: {err}", where=str(path)) from None
    return parse_space_config(data, source=str(path), default_name=path.stem)
