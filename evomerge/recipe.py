"""The Recipe: the one hand-off between search, merge and export.

A recipe is pure data: the complete mergekit config a worker merges and export writes, and the
named coordinate values that produced it (for the trial log and reports). It travels as JSON
(to Ray workers, into the trial log), never as a pickle, so a run folder can be read by anything
and loading one runs no code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .errors import ConfigError
from .merge.config import MergeConfig, parse_merge_config
from .merge.multi import Stage, stages_to_yaml


#: The stage name a routed recipe's parameter merge gets in an exported multi-stage file; the
#: route names its layers from it (``mergekit-multi`` substitutes the stage's output folder).
MERGED_STAGE = "merged"


@dataclass(frozen=True)
class Recipe:
    """A merge candidate: a parameter merge, a layer route, or a route over a parameter merge.

    ``merge`` names the models by the run's references (resolved: see :mod:`evomerge.model_refs`) and
    sets every parameter explicitly, so the exported YAML does not depend on evomerge's
    defaults. ``route`` is a mergekit ``passthrough`` config in ``slices:`` form whose layers
    come from the base, the donors, or (as model ``merged``) the parameter merge; see
    :mod:`evomerge.merge.routing`. ``params`` are the coordinate values the recipe was decoded
    from, after repair, restricted to those that shaped it (see
    :meth:`evomerge.space.SearchSpace.decode`).
    """

    merge: MergeConfig | None
    params: Mapping[str, float | str] = field(default_factory=dict)
    route: MergeConfig | None = None

    def __post_init__(self) -> None:
        if self.merge is None and self.route is None:
            raise ValueError("a recipe needs a merge, a route, or both")
        # frozen all the way down: a recipe is shared between the log, workers and export
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    def to_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "merge": self.merge.model_dump(mode="json", exclude_none=True) if self.merge is not None else None,
            "params": dict(self.params),
        }
        if self.route is not None:
            data["route"] = self.route.model_dump(mode="json", exclude_none=True)
        return data

    def to_json(self) -> str:
        """Compact JSON with sorted keys: equal recipes give equal strings."""
        return json.dumps(self.to_data(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_data(cls, data: Any, *, source: str = "recipe") -> Recipe:
        if not isinstance(data, Mapping) or not {"merge", "params"} <= set(data) <= {"merge", "params", "route"}:
            raise ConfigError("a recipe is a mapping with 'merge' and 'params' (and 'route' when routed)", where=source)
        params = data["params"]
        plain = (int, float, str)
        if not isinstance(params, Mapping) or not all(
            isinstance(k, str) and isinstance(v, plain) and not isinstance(v, bool) for k, v in params.items()
        ):
            raise ConfigError("'params' must map coordinate names to numbers or text", where=source)
        merge = parse_merge_config(data["merge"], source=f"{source}: merge") if data["merge"] is not None else None
        route = parse_merge_config(data["route"], source=f"{source}: route") if data.get("route") is not None else None
        if merge is None and route is None:
            raise ConfigError("a recipe needs a merge, a route, or both", where=source)
        return cls(merge=merge, params={k: (float(v) if isinstance(v, int) else v) for k, v in params.items()},
                   route=route)

    @classmethod
    def from_json(cls, text: str, *, source: str = "recipe") -> Recipe:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"not valid JSON: {err}", where=source) from None
        return cls.from_data(data, source=source)

    def stages(self) -> list[Stage]:
        """The merges to run in order, named as in a ``mergekit-multi`` file (None: the final one)."""
        if self.route is None:
            assert self.merge is not None
            return [Stage(None, self.merge)]
        if self.merge is None:
            return [Stage(None, self.route)]
        return [Stage(MERGED_STAGE, self.merge), Stage(None, self.route)]

    def to_yaml(self) -> str:
        """The mergekit YAML this recipe exports to: one config, or a multi-stage file
        (``mergekit-multi``, or ``evomerge merge``) when a route follows a parameter merge."""
        return stages_to_yaml(self.stages())
