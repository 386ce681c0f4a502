"""The route part of a search space: how drivers see layer routes, and decoding them.

The data-flow space of Akiba et al. (arXiv:2403.13187) lays the pool's layers out in order,
repeats the sequence ``r`` times (``T = M x r`` slots), and searches an include/skip indicator
per slot. A plain indicator vector is a poor fit for CMA-ES: each bit is a threshold on one
coordinate, most of the cube decodes to routes of the wrong depth (which must be repaired or
penalised), and the step size says nothing about how different two routes are. evomerge
searches the same set of routes through a *random-key* encoding instead:

- one **key** in ``[0, 1]`` per slot, and one **depth** coordinate in ``route.depth``;
- a point decodes to the ``depth`` slots with the largest keys, kept in slot order (ties go
  to the earlier slot);
- with ``route.scale`` searched, one **scale** per slot, applied when the slot is included.

Every point of the cube is a valid route of an allowed depth, so nothing is repaired or
penalised; a small step swaps one layer for its nearest competitor or changes the depth by one,
and CMA-ES's covariance can learn which slots compete. The Optuna samplers see the same floats.

Slots run layer-major within each repeat (``r0/l0/<each pool model>``, ``r0/l1/...``, then
``r1/...``), so a route choosing, at each depth, a layer from any pool model is reachable in one
repeat; repeats add depth (a layer used twice, or a second pass through a stretch of layers).
The starting point is ``route.init``, or the first pool model's layers in order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .merge.routing import RoutedLayer
from .space_config import RouteSection

DEPTH = "route/depth"
_IN = 0.8  # an initial route's keys: well above the others, so sigma0 explores near it first
_OUT = 0.2


@dataclass(frozen=True)
class RouteSlot:
    """One place in the route's layout: repeat ``repeat``, pool model ``entry``'s layer ``layer``."""

    index: int
    repeat: int
    layer: int
    entry: str

    @property
    def key_name(self) -> str:
        return f"route/r{self.repeat}/l{self.layer}/{self.entry}"

    @property
    def scale_name(self) -> str:
        return f"{self.key_name}/scale"


class RouteEncoding:
    """Coordinates and decoding for one ``route:`` section over models with ``num_layers`` layers.

    ``references`` maps each pool entry to the model reference its layers are named by in the
    route config (a folder or Hub id, or the ``merged`` stage).
    """

    def __init__(self, route: RouteSection, num_layers: int, references: Mapping[str, str], *, source: str) -> None:
        self.route = route
        self.num_layers = num_layers
        self.references = dict(references)
        self.slots = tuple(
            RouteSlot(i, repeat, layer, entry)
            for i, (repeat, layer, entry) in enumerate(
                (k, layer, e) for k in range(route.repeats) for layer in range(num_layers) for e in route.pool
            )
        )
        self.initial = self._initial_slots(source)
        self._coordinates = self._build_coordinates()

    # -- coordinates ----------------------------------------------------------------------------

    def coordinates(self) -> list[Any]:
        """The drivers' view: depth (unless fixed), a key per slot, and a scale per slot when searched."""
        return list(self._coordinates)

    def _build_coordinates(self) -> tuple[Any, ...]:
        from .space import Coordinate

        low, high = self.route.depth
        coords = [Coordinate(DEPTH, low=float(low), high=float(high), init=float(len(self.initial)))] if low < high else []
        chosen = set(self.initial)
        coords += [Coordinate(s.key_name, low=0.0, high=1.0, init=_IN if s.index in chosen else _OUT) for s in self.slots]
        scale = self.route.scale
        if scale is not None and scale.range is not None:
            lo, hi = scale.range
            init = scale.init if scale.init is not None else min(hi, max(lo, 1.0))
            coords += [Coordinate(s.scale_name, low=lo, high=hi, init=init) for s in self.slots] if lo < hi else []
        return tuple(coords)

    # -- decoding -------------------------------------------------------------------------------

    def depth_of(self, values: Mapping[str, Any]) -> int:
        low, high = self.route.depth
        if low == high:
            return low
        return int(min(high, max(low, round(float(values[DEPTH])))))

    def decode(self, values: Mapping[str, Any]) -> list[RoutedLayer]:
        """The route a point stands for: the ``depth`` slots with the largest keys, in slot order."""
        depth = self.depth_of(values)
        ranked = sorted(self.slots, key=lambda s: (-float(values[s.key_name]), s.index))
        chosen = sorted(ranked[:depth], key=lambda s: s.index)
        return [RoutedLayer(self.references[s.entry], s.layer, self._scale(s, values)) for s in chosen]

    def _scale(self, slot: RouteSlot, values: Mapping[str, Any]) -> float:
        scale = self.route.scale
        if scale is None:
            return 1.0
        if scale.value is not None:
            return float(scale.value)
        assert scale.range is not None
        if scale.range[0] == scale.range[1]:
            return float(scale.range[0])
        return float(values[slot.scale_name])

    def names(self) -> list[str]:
        """Every route coordinate: all of them shape every candidate."""
        return [c.name for c in self._coordinates]

    # -- the starting route ---------------------------------------------------------------------

    def _initial_slots(self, source: str) -> list[int]:
        """Slot indices of ``route.init`` (placed greedily, in order), or of the first pool
        model's layers in order, as many as the depth bounds allow."""
        route = self.route
        if route.init is None:
            first = [s.index for s in self.slots if s.entry == route.pool[0]]
            want = max(route.depth[0], min(self.num_layers, route.depth[1]))
            return first[:want]
        placed: list[int] = []
        after = -1
        for i, (entry, layer) in enumerate(route.init):
            slot = next((s for s in self.slots if s.index > after and s.entry == entry and s.layer == layer), None)
            if slot is None:
                raise ConfigError(
                    f"layer {layer} of {entry!r} cannot follow the layers before it within {route.repeats} repeat(s) "
                    "of the pool; raise route.repeats",
                    where=f"{source}: route.init[{i}]",
                )
            placed.append(slot.index)
            after = slot.index
        return placed


def resolve_merged(config: Any) -> Any:
    """A two-stage space with ``route.merged`` naming a run folder or a mergekit YAML, with that
    merge written inline, so the new run's space file and identity hold the merge itself (the
    stage-1 run may go on, or move, without changing what this run searched over).

    A run folder stands for its best trial, chosen as ``evomerge export --best`` chooses.
    """
    from pathlib import Path

    from .export import choose
    from .merge.config import load_merge_config
    from .model_refs import resolve_merge
    from .recipe import Recipe
    from .store import RunStore

    route = config.route
    if route is None or not isinstance(route.merged, str):
        return config
    where = f"{config.source}: route.merged"
    path = Path(route.merged)
    if (path / "space.yaml").is_file():
        store = RunStore.open(path)
        try:
            record = choose(store, trial=None, best=True, pareto=False)[0]
        finally:
            store.close()
        recipe = Recipe.from_json(record.recipe_json, source=f"{path} trial {record.number}")
        if recipe.route is not None or recipe.merge is None:
            raise ConfigError(f"the best trial of {path} is itself routed; route over a run of parameter merges",
                              where=where)
        merge = recipe.merge
    elif path.is_file():
        merge = load_merge_config(path)
    else:
        raise ConfigError(f"{path} is neither a run folder (runs/<name>) nor a mergekit YAML file", where=where)
    merge = resolve_merge(merge, config)  # names the models as the (resolved) config does
    known = {config.models.base, *(d.model for d in config.models.donors)}
    strangers = [m for m in merge.referenced_models() if m not in known]
    if strangers:
        raise ConfigError(f"the merge uses {', '.join(map(repr, strangers))}, which models: does not list; the workers "
                          "hold only the base and the donors", where=where)
    dtypes = {d for d in (merge.dtype, merge.out_dtype) if d is not None}
    if dtypes - {config.dtype}:
        # the worker holds the merge in the route's dtype; a stage written in another one would be
        # rounded differently on disk than in memory, and the export would not be what was scored
        raise ConfigError(f"the merge is computed or written in {', '.join(sorted(dtypes))}, the route in "
                          f"{config.dtype}; set route.dtype: {next(iter(dtypes))} (or the merge's dtype to match)",
                          where=where)
    data = merge.model_dump(mode="json", exclude_none=True)
    resolved = config.model_copy(update={"route": route.model_copy(update={"merged": data})})
    resolved._source = config.source
    return resolved
