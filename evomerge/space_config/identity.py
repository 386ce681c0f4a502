"""A run's identity: the part of its config that decides which candidates are proposed and how
they are scored, and the one config diff.

The run folder records the hash of the identity; a config under the same run name with another
hash is refused, naming every field that differs, so the user can restore it or pick a new name.
Fields outside the identity (:data:`NON_IDENTITY_FIELDS`) may change on resume.
"""

from __future__ import annotations

import json
from typing import Any

from .base import _dotted
from .params import ResolvedParam

#: Fields that do not change which candidates are proposed or how they are scored: a run may be
#: resumed with more workers, another storage URL or a larger budget.
NON_IDENTITY_FIELDS = ("name", "workers", "storage", "search.budget")


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
