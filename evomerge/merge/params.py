"""Resolving a parameter for one tensor, exactly as mergekit does.

A setting is a scalar, a gradient (numeric list interpolated over the layers of a slice), or a
list of ``{filter, value}`` entries whose first match (``filter`` a substring of the tensor name,
or no filter, or ``"*"``) wins. Scopes are searched from the most specific (the source model's
own ``parameters``) to the least (the top level); the first scope that yields a value wins, and
the method's default applies when none does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import ConfigError
from .config import Conditional, ParameterSetting


def coerce(value: Any, kind: type, *, name: str) -> Any:
    """Validate one scalar against the parameter's type (as mergekit's validators do)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"parameter '{name}' takes true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"parameter '{name}' takes a number, got {value!r}")
        try:
            number = kind(float(value)) if kind is int else float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"parameter '{name}' takes a number, got {value!r}") from None
        if isinstance(number, float) and not math.isfinite(number):
            raise ConfigError(f"parameter '{name}' must be finite, got {value!r}")
        return number
    return value


def evaluate_setting(setting: ParameterSetting, *, tensor_name: str, t: float, kind: type, name: str) -> Any:
    """The value a setting gives for ``tensor_name`` at layer position ``t`` (None: no match)."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return coerce(setting, kind, name=name)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, Conditional) for e in setting):
            for cond in setting:
                if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
                    return evaluate_setting(cond.value, tensor_name=tensor_name, t=t, kind=kind, name=name)
            return None
        if any(isinstance(e, Conditional) for e in setting):
            raise ConfigError(f"parameter '{name}' mixes plain values and filter entries in one list")
        values = [coerce(e, kind, name=name) for e in setting]
        if kind is bool or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return coerce((1 - frac) * values[i0] + frac * values[i1], kind, name=name)
    raise ConfigError(f"parameter '{name}' has an unreadable value {setting!r}")


def resolve(
    name: str,
    *,
    kind: type,
    default: Any,
    required: bool,
    scopes: Iterable[Mapping[str, ParameterSetting] | None],
    tensor_name: str,
    t: float,
    where: str,
) -> Any:
    """First value found in ``scopes`` (most specific first), else the default."""
    for scope in scopes:
        if scope is not None and name in scope:
            value = evaluate_setting(scope[name], tensor_name=tensor_name, t=t, kind=kind, name=name)
            if value is not None:
                return value
    if required:
        raise ConfigError(f"missing required parameter '{name}' for {where}: set it on the model or at the top level")
    return default
