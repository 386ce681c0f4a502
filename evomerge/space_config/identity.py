"""A run's identity: the part of its config that decides which candidates are proposed and how
they are scored, and the one config diff.

The run folder records the hash of the identity; a config under the same run name with another
hash is refused, naming every field that differs, so the user can restore it or pick a new name.
Fields outside the identity (:data:`NON_IDENTITY_FIELDS`) may change on resume.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from .base import _dotted
from .params import ResolvedParam

#: Fields that do not change which candidates are proposed or how they are scored: a run may be
#: resumed with more workers, another storage URL or a larger budget.
NON_IDENTITY_FIELDS = ("name", "workers", "storage", "search.budget", "as_written")


def identity_data(data: dict[str, Any], parameters: Sequence[ResolvedParam]) -> dict[str, Any]:
    """The part of a config's plain data (``SpaceConfig.to_data()``) that defines a run: all but
    :data:`NON_IDENTITY_FIELDS`.

    ``merge.parameters`` appears resolved against the registry (``parameters``), so spelling out
    a default (``weight: {range: [0, 1]}``) is the same run as leaving it out, and a registry
    whose default ranges changed since the run started is a different run.
    """
    if data.get("search", {}).get("hand_set") is True:
        del data["search"]["hand_set"]  # written out or absent, it is on: the same run
    if "merge" in data:
        data["merge"]["parameters"] = {p.name: _resolved_data(p) for p in parameters}
    for field in NON_IDENTITY_FIELDS:
        *parents, last = field.split(".")
        node = data
        for p in parents:
            node = node[p]
        node.pop(last, None)
    return data


def canonical_json(identity: Mapping[str, Any]) -> str:
    return json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def identity_hash(identity: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON: equal for configs that define the same run."""
    return hashlib.sha256(canonical_json(identity).encode("ascii")).hexdigest()


def differences(old: Any, new: Any) -> list[str]:
    """Every field where two configs' plain data differ, as ``path: old -> new``: the one config
    diff (``evomerge search`` and ``evomerge validate`` refuse a changed run with it).

    Mappings are compared key by key; a list of sections (``objectives``, ``models.donors``) of
    the same length item by item (``objectives[0].weight: 1.0 -> 2.0``); any other list, such as
    a range, as one value (``merge.parameters.density.range: [0.1, 1.0] -> [0.2, 1.0]``).
    """
    out: list[str] = []
    _diff(old, new, (), out)
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
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and _sections(a, b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, (*path, i), out)
    elif a != b:
        out.append(f"{_dotted(path)}: {json.dumps(a)} -> {json.dumps(b)}")


def _sections(a: list[Any], b: list[Any]) -> bool:
    return all(isinstance(x, dict) for x in (*a, *b))
