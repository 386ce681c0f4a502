"""What every section of the space file is built from: strict frozen models, and errors that
name the field.

A validator raises :class:`FieldError` to point below the field pydantic is validating (the
``range`` inside one parameter); :mod:`~evomerge.space_config.messages` appends that path when it
words the error for the user.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict


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


def _finite(value: float | None, what: str) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value}")
    return value


def _dotted(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or "(top level)"
