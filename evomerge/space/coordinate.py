"""One named dimension of the search space, and its unit-cube view for CMA-ES.

A coordinate is a float in ``[low, high]`` (optionally log-scaled) or a choice among names. The
unit cube gives a float one entry and a choice one entry per option (it decodes to the largest),
so CMA-ES moves between choices smoothly instead of rounding one number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Coordinate:
    """One named dimension: a float in ``[low, high]`` (optionally log-scaled) or a choice."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[str, ...] | None = None
    init: float | str | None = None

    @property
    def categorical(self) -> bool:
        return self.choices is not None

    @property
    def width(self) -> int:
        """How many unit-cube entries this coordinate takes."""
        return len(self.choices) if self.choices is not None else 1

    def default(self) -> float | str:
        """The user's ``init``, else the centre of the range (geometric for log), else the first choice."""
        if self.init is not None:
            return self.init
        if self.choices is not None:
            return self.choices[0]
        assert self.low is not None and self.high is not None
        if self.log:
            return math.sqrt(self.low * self.high)
        return (self.low + self.high) / 2

    def repair(self, value: Any) -> float | str:
        """A value the merge can use: numbers clipped into the range; anything else is a bug upstream."""
        if self.choices is not None:
            if value not in self.choices:
                raise ValueError(f"{self.name}: {value!r} is not one of {list(self.choices)}")
            return value
        assert self.low is not None and self.high is not None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{self.name}: expected a number, got {value!r}")
        return min(self.high, max(self.low, float(value)))

    def to_unit(self, value: Any) -> list[float]:
        if self.choices is not None:
            chosen = self.repair(value)
            return [1.0 if c == chosen else 0.0 for c in self.choices]
        v = self.repair(value)
        assert self.low is not None and self.high is not None and isinstance(v, float)
        if self.log:
            return [(math.log(v) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))]
        return [(v - self.low) / (self.high - self.low)]

    def from_unit(self, x: Sequence[float]) -> float | str:
        if any(math.isnan(u) for u in x):
            raise ValueError(f"{self.name}: NaN in the unit vector")
        if self.choices is not None:
            best = max(range(len(x)), key=lambda i: (x[i], -i))
            return self.choices[best]
        assert self.low is not None and self.high is not None
        u = min(1.0, max(0.0, float(x[0])))
        if self.log:
            value = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            value = self.low + u * (self.high - self.low)
        return min(self.high, max(self.low, value))
