"""Pydantic's validation errors worded for the user: one line per field, naming the file and the
field path and saying how to fix it; an unknown field comes with close matches and the fields
known at that place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import ConfigError, close_matches
from .base import FieldError, _dotted
from .evaluation import Evaluation, TaskEvaluation
from .params import MergeSection, ParamSpec
from .schema import (
    Constraint,
    Donor,
    Models,
    Objective,
    RouteSection,
    ScaleSpec,
    Search,
    SpaceConfig,
    Workers,
)

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
