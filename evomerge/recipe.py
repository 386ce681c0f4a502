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


@dataclass(frozen=True)
class Recipe:
    """A merge candidate.

    ``merge`` names the models by their original references (as the space file wrote them) and
    sets every parameter explicitly, so the exported YAML does not depend on evomerge's
    defaults. ``params`` are the coordinate values the merge was decoded from, after repair,
    restricted to those that shaped it (see :meth:`evomerge.space.SearchSpace.decode`).
    """

    merge: MergeConfig
    params: Mapping[str, float | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # frozen all the way down: a recipe is shared between the log, workers and export
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    def to_data(self) -> dict[str, Any]:
        return {"merge": self.merge.model_dump(mode="json", exclude_none=True), "params": dict(self.params)}

    def to_json(self) -> str:
        """Compact JSON with sorted keys: equal recipes give equal strings."""
        return json.dumps(self.to_data(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_data(cls, data: Any, *, source: str = "recipe") -> Recipe:
        if not isinstance(data, Mapping) or set(data) != {"merge", "params"}:
            raise ConfigError("a recipe is a mapping with exactly 'merge' and 'params'", where=source)
        params = data["params"]
        plain = (int, float, str)
        if not isinstance(params, Mapping) or not all(
            isinstance(k, str) and isinstance(v, plain) and not isinstance(v, bool) for k, v in params.items()
        ):
            raise ConfigError("'params' must map coordinate names to numbers or text", where=source)
        merge = parse_merge_config(data["merge"], source=f"{source}: merge")
        return cls(merge=merge, params={k: (float(v) if isinstance(v, int) else v) for k, v in params.items()})

    @classmethod
    def from_json(cls, text: str, *, source: str = "recipe") -> Recipe:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"not valid JSON: {err}", where=source) from None
        return cls.from_data(data, source=source)

    def to_yaml(self) -> str:
        """The mergekit YAML this recipe exports to."""
        return self.merge.to_yaml()
