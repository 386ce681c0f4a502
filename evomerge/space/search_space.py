"""The search space: named coordinates, and decoding a point into a Recipe.

Every searchable number has a readable name, so the trial log, Optuna's dashboard and reports
all say what was searched::

    method                     which merge method (only when several are listed)
    g0/self_attn/arith/weight  per-model parameter: layer group 0, filter self_attn, donor arith
    g1/*/reverse/density       '*' is the catch-all filter (tensors no other filter matches)
    g0/*/lambda                shared parameters have no model part

Layer group ``k`` of ``G`` covers layers ``[k*n/G, (k+1)*n/G)``. Decoding writes one gradient
value per layer, so mergekit's interpolation lands exactly on each layer's group value; with
one group the value is a scalar. Filters become ``[{filter, value}, ..., {value}]`` lists with
the catch-all last (first match wins, as in mergekit). Embeddings, the final norm and the head
are planned at t = 0 and match no layer filter, so they take the catch-all's group-0 value.

Drivers see the space in one of two ways:

- Optuna: :meth:`SearchSpace.optuna_distributions` (floats, and a categorical ``method``);
- CMA-ES: a vector in the unit cube, :meth:`to_unit` / :meth:`from_unit`. A categorical takes
  one unit coordinate per choice and decodes to the largest (ties go to the first listed), so
  CMA can move between methods smoothly instead of rounding one number.

When the method is searched, the coordinates of parameters the chosen method does not use are
still proposed and logged by the driver, but they shape nothing: decode ignores them and leaves
them out of the recipe's ``params``. CMA-ES lets them drift freely (they do not affect the
score), Optuna samples them like any other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..merge.config import MergeConfig, parse_merge_config
from ..merge.registry import get_method
from ..merge.routing import route_to_config
from ..recipe import MERGED_STAGE, Recipe
from ..space_config import (
    BASE_NAME,
    MERGED_NAME,
    ResolvedParam,
    SpaceConfig,
    plain_data,
)
from .coordinate import Coordinate
from .route import RouteEncoding

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

CATCH_ALL = "*"
METHOD = "method"


class NotExpressible(ValueError):
    """A merge the space cannot decode to exactly (see :meth:`SearchSpace.point`)."""


@dataclass(frozen=True)
class _Slot:
    """Where a searched parameter's coordinates sit: names[participant][filter][group]."""

    param: ResolvedParam
    filters: tuple[str, ...]  # user filters, then the catch-all
    names: Mapping[str | None, tuple[tuple[str, ...], ...]]  # participant None: a shared parameter


class SearchSpace:
    """The coordinates of one space config over models with ``num_layers`` layers."""

    def __init__(self, config: SpaceConfig, num_layers: int) -> None:
        config.validate_against_models(num_layers)
        self.config = config
        self.num_layers = num_layers
        self.params = {p.name: p for p in config.parameters()}
        coords: list[Coordinate] = []
        if config.merge is not None and len(config.merge.method) > 1:
            coords.append(Coordinate(METHOD, choices=config.merge.method))
        self._slots: dict[str, _Slot] = {}
        donors = [d.name for d in config.models.donors]
        # per-model parameters first (weights read first in a log), then shared ones
        ordered = sorted(self.params.values(), key=lambda p: not p.per_model)
        for p in ordered:
            if p.mode != "search":
                continue
            assert p.range is not None
            filters = (*p.filters, CATCH_ALL)
            participants: list[str | None]
            if p.per_model:
                participants = ([BASE_NAME] if p.base_takes_it else []) + donors
            else:
                participants = [None]
            names: dict[str | None, tuple[tuple[str, ...], ...]] = {}
            for who in participants:
                grid = []
                for f in filters:
                    row = []
                    for g in range(p.layer_groups):
                        name = f"g{g}/{f}/{who}/{p.name}" if who is not None else f"g{g}/{f}/{p.name}"
                        coords.append(Coordinate(name, low=p.range[0], high=p.range[1], log=p.log, init=p.init))
                        row.append(name)
                    grid.append(tuple(row))
                names[who] = tuple(grid)
            self._slots[p.name] = _Slot(p, filters, names)
        self.route: RouteEncoding | None = None
        if config.route is not None:
            references = {BASE_NAME: config.models.base, MERGED_NAME: MERGED_STAGE}
            references.update({d.name: d.model for d in config.models.donors})
            self.route = RouteEncoding(config.route, num_layers, references, source=config.source)
            coords.extend(self.route.coordinates())
        self.coordinates: tuple[Coordinate, ...] = tuple(coords)
        self._by_name = {c.name: c for c in coords}

    @classmethod
    def from_config(cls, cfg: SpaceConfig, num_layers: int) -> SearchSpace:
        """ConfigError (naming the field) when layer groups do not divide ``num_layers``."""
        return cls(cfg, num_layers)

    # -- views for the drivers ------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.coordinates]

    def coordinate(self, name: str) -> Coordinate:
        return self._by_name[name]

    def unit_names(self) -> list[str]:
        """A name per unit-cube entry: ``method=ties`` for a choice, the coordinate's name otherwise."""
        out: list[str] = []
        for c in self.coordinates:
            out.extend([f"{c.name}={ch}" for ch in c.choices] if c.choices is not None else [c.name])
        return out

    @property
    def unit_dimension(self) -> int:
        return sum(c.width for c in self.coordinates)

    def default_values(self) -> dict[str, float | str]:
        """The starting point: each coordinate's ``init``, else its range's centre."""
        return {c.name: c.default() for c in self.coordinates}

    def initial_unit(self) -> list[float]:
        """The starting point in the unit cube for CMA-ES: the default values, with every
        method choice at 0.5 so that no method starts ahead of the others."""
        out: list[float] = []
        for c in self.coordinates:
            out.extend([0.5] * c.width if c.choices is not None else c.to_unit(c.default()))
        return out

    def to_unit(self, values: Mapping[str, Any]) -> list[float]:
        """Named values -> unit-cube vector (values clipped into range first)."""
        self._check_names(values, require_all=True)
        out: list[float] = []
        for c in self.coordinates:
            out.extend(c.to_unit(values[c.name]))
        return out

    def from_unit(self, x: Sequence[float]) -> dict[str, float | str]:
        """Unit-cube vector -> named values; entries outside [0, 1] are clipped (repair)."""
        if len(x) != self.unit_dimension:
            raise ValueError(f"expected a vector of {self.unit_dimension} entries, got {len(x)}")
        out: dict[str, float | str] = {}
        i = 0
        for c in self.coordinates:
            out[c.name] = c.from_unit([float(u) for u in x[i : i + c.width]])
            i += c.width
        return out

    def optuna_distributions(self) -> dict[str, BaseDistribution]:
        """One Optuna distribution per coordinate, for ``study.ask(fixed_distributions=...)``."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        return {
            c.name: CategoricalDistribution(c.choices)
            if c.choices is not None
            else FloatDistribution(c.low, c.high, log=c.log)  # type: ignore[arg-type]
            for c in self.coordinates
        }

    def point(
        self,
        method: str,
        per_model: Mapping[str, Mapping[str, float]],
        shared: Mapping[str, float] | None = None,
    ) -> dict[str, float | str]:
        """The named values at which a merge with ``method`` uses exactly the given settings.

        ``per_model[param][who]`` (``who``: a donor's short name, or ``base``) and
        ``shared[param]`` are plain numbers, the same for every layer group and filter. Every
        setting must be expressible without change: the method is one of the space's, a searched
        value lies in its coordinate's range (no clipping), a pinned parameter is pinned to that
        value, and a parameter left at the method's default has that default. Anything else
        raises :class:`NotExpressible` saying why, so a caller skips the point rather than
        evaluating something else under its name. Coordinates the settings leave open take the
        registry default when it lies in range, else the coordinate's own default; coordinates
        the method does not use (another method's, a route's) take their default and shape nothing.
        """
        if self.config.merge is None or self.route is not None:
            raise NotExpressible("the space searches a layer route; a hand-set point would fix it")
        if method not in self.config.merge.method:
            raise NotExpressible(f"{method} is not among the space's methods ({', '.join(self.config.merge.method)})")
        shared = shared or {}
        values: dict[str, float | str] = dict(self.default_values())
        if METHOD in self._by_name:
            values[METHOD] = method
        declared = {p.name: p for p in get_method(method).params}
        for name in set(per_model) | set(shared):
            if name not in declared:
                raise NotExpressible(f"{method} takes no parameter {name!r}")
        for p in declared.values():
            resolved = self.params[p.name]
            wanted: dict[str | None, float] = (
                dict(per_model.get(p.name, {})) if p.per_model  # type: ignore[arg-type]
                else ({None: shared[p.name]} if p.name in shared else {})
            )
            searched = resolved.mode == "search" and method in resolved.searched_by
            if not searched:
                current = resolved.value if resolved.mode == "fixed" else p.default
                for who, v in wanted.items():
                    if current is None or float(current) != float(v):
                        state = f"pinned to {current}" if resolved.mode == "fixed" else f"left at its default {current}"
                        raise NotExpressible(f"{p.name} is {state}, not {v}")
                continue
            slot = self._slots[p.name]
            for who, grid in slot.names.items():
                v = wanted.get(who)
                for row in grid:
                    for name in row:
                        c = self._by_name[name]
                        assert c.low is not None and c.high is not None
                        if v is not None:
                            if not c.low <= v <= c.high:
                                raise NotExpressible(f"{p.name} {v:g} lies outside the range [{c.low:g}, {c.high:g}]")
                            values[name] = float(v)
                        elif p.default is not None and not isinstance(p.default, bool) and c.low <= p.default <= c.high:
                            values[name] = float(p.default)
            unknown = [w for w in wanted if w not in slot.names]
            if unknown:
                raise NotExpressible(f"{p.name} has no coordinate for {unknown[0]}")
        return values

    # -- decoding -------------------------------------------------------------------------------

    def method_of(self, values: Mapping[str, Any]) -> str:
        assert self.config.merge is not None, "a route-only space has no merge method"
        if len(self.config.merge.method) == 1:
            return self.config.merge.method[0]
        return str(self._by_name[METHOD].repair(values.get(METHOD)))

    def used_names(self, method: str | None) -> list[str]:
        """The coordinates that shape a merge with ``method`` (None: no parameter merge), and the route's."""
        used = [METHOD] if METHOD in self._by_name else []
        if self.route is not None:
            used.extend(self.route.names())
        for slot in self._slots.values():
            if method in slot.param.searched_by:
                for who, grid in slot.names.items():
                    if who == BASE_NAME and method not in slot.param.base_takes_it:
                        continue
                    used.extend(name for row in grid for name in row)
        return used

    def decode(self, values: Mapping[str, Any]) -> Recipe:
        """Named values -> a complete mergekit config. Out-of-range numbers are clipped; a
        missing used coordinate, an unknown name or an unknown choice is an error (a bug in the
        caller, or a trial log from another space)."""
        self._check_names(values, require_all=False)
        method_name = self.method_of(values) if self.config.merge is not None else None
        used = self.used_names(method_name)
        missing = [n for n in used if n not in values]
        if missing:
            raise ValueError(f"values lack coordinates {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        repaired = {n: self._by_name[n].repair(values[n]) for n in used}
        merge = self._decode_merge(method_name, repaired) if method_name is not None else self._fixed_merge()
        route = None
        if self.route is not None:
            route = route_to_config(self.route.decode(repaired), dtype=self.config.dtype)
        return Recipe(merge=merge, params=repaired, route=route)

    def _fixed_merge(self) -> MergeConfig | None:
        """A two-stage route's parameter merge: the config ``route.merged`` resolved to (see
        :func:`evomerge.prepare.resolve_merged`)."""
        route = self.config.route
        if route is None or route.merged is None:
            return None
        if not isinstance(route.merged, Mapping):
            raise ValueError("route.merged must be resolved to a merge config before decoding")
        return parse_merge_config(plain_data(route.merged), source=f"{self.config.source}: route.merged")

    def _decode_merge(self, method_name: str, repaired: Mapping[str, Any]) -> MergeConfig:
        method = get_method(method_name)
        cfg = self.config
        assert cfg.merge is not None
        base_params: dict[str, Any] = {}
        donor_params: dict[str, dict[str, Any]] = {d.name: {} for d in cfg.models.donors}
        shared: dict[str, Any] = {}
        for p in method.params:
            resolved = self.params[p.name]
            searched = resolved.mode == "search" and method_name in resolved.searched_by
            if p.per_model:
                targets = [(d.name, donor_params[d.name]) for d in cfg.models.donors]
                if p.includes_base:
                    targets.insert(0, (BASE_NAME, base_params))
                for who, bucket in targets:
                    setting = self._setting(p.name, who, repaired) if searched else self._fixed(resolved, p.default)
                    if setting is not None:
                        bucket[p.name] = setting
            else:
                setting = self._setting(p.name, None, repaired) if searched else self._fixed(resolved, p.default)
                if setting is not None:
                    shared[p.name] = setting

        models = [{"model": cfg.models.base, **({"parameters": base_params} if base_params else {})}]
        models += [
            {"model": d.model, **({"parameters": donor_params[d.name]} if donor_params[d.name] else {})}
            for d in cfg.models.donors
        ]
        merge = MergeConfig.model_validate(
            {
                "merge_method": method_name,
                "base_model": cfg.models.base,
                "models": models,
                "parameters": shared or None,
                "dtype": cfg.merge.dtype,
                "random_seed": cfg.merge.random_seed if method.stochastic else None,
            }
        )
        return merge

    def _fixed(self, resolved: ResolvedParam, default: Any) -> Any:
        if resolved.mode == "fixed":
            value = resolved.value
            return value if isinstance(value, bool) else float(value)  # type: ignore[arg-type]
        return default

    def _setting(self, param: str, who: str | None, values: Mapping[str, Any]) -> Any:
        """mergekit's value for one parameter of one participant: gradients per filter."""
        slot = self._slots[param]
        size = self.num_layers // slot.param.layer_groups
        per_filter = []
        for row in slot.names[who]:
            group_values = [values[name] for name in row]
            if len(group_values) == 1:
                per_filter.append(group_values[0])
            else:
                per_filter.append([group_values[i // size] for i in range(self.num_layers)])
        if len(slot.filters) == 1:
            return per_filter[0]
        entries: list[dict[str, Any]] = [{"filter": f, "value": v} for f, v in zip(slot.filters[:-1], per_filter)]
        entries.append({"value": per_filter[-1]})
        return entries

    def _check_names(self, values: Mapping[str, Any], *, require_all: bool) -> None:
        unknown = [n for n in values if n not in self._by_name]
        if unknown:
            raise ValueError(f"unknown coordinates {unknown[:5]}; this space has {self.names[:5]} ...")
        if require_all:
            missing = [c.name for c in self.coordinates if c.name not in values]
            if missing:
                raise ValueError(f"values lack coordinates {missing[:5]}")

    def describe(self) -> str:
        """A short table of the coordinates, for `evomerge` to print before a search starts."""
        lines = [f"{len(self.coordinates)} coordinates ({self.unit_dimension} in the unit cube):"]
        for c in self.coordinates:
            if c.choices is not None:
                lines.append(f"  {c.name}: one of {', '.join(c.choices)}")
            else:
                lines.append(f"  {c.name}: [{c.low:g}, {c.high:g}]{' log' if c.log else ''}")
        return "\n".join(lines)
