"""The ``merge:`` section, and its parameters resolved against the merge-method registry.

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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..errors import ConfigError, close_matches, known_name
from ..merge.config import DTYPES
from ..merge.registry import MergeMethod, Param, get_method
from .base import FieldError, _finite, _Strict


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
    """The dtype candidates are merged and evaluated in (and the exported ``dtype``). Left out: float32
    on CPU; with GPU workers the base's stored dtype (e.g. bfloat16), fixed in the run's config when
    it starts."""
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
        return known_name(value, DTYPES, "dtype")

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
