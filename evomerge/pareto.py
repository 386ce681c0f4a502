"""The Pareto front of a run: non-dominated trials over named objectives, constraints first.

A run optimises several named objectives at once (``task:toy_arith/acc`` up, ``l2_from_base``
down), so "the best recipe" is a set: the trials that no other trial beats on every objective.
Constraints (``l2_from_base <= bound``) are handled by constrained domination, as NSGA-II and
Optuna do it, so the front the user sees agrees with what the samplers optimised:

1. a feasible trial dominates every infeasible one;
2. between two infeasible trials, the smaller total violation dominates; equal violations fall
   back to objective dominance (so the front never holds a trial that is worse on everything);
3. between two feasible trials, ``a`` dominates ``b`` when it is at least as good on every
   objective and strictly better on one.

Trials without objectives (failed, running) are not candidates at all. The sort is a plain
O(n^2) scan: a run has hundreds of trials, not millions, and this reads top to bottom.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol, TypeVar

Direction = Literal["maximize", "minimize"]
DIRECTIONS: tuple[str, ...] = ("maximize", "minimize")


class Scored(Protocol):
    """What the front needs from a trial: its objective values and its constraint violation."""

    @property
    def objectives(self) -> Mapping[str, float] | None: ...

    @property
    def violation(self) -> float: ...


R = TypeVar("R", bound=Scored)


def _oriented(values: Mapping[str, float], directions: Mapping[str, str]) -> tuple[float, ...]:
    # Turn every objective into "bigger is better" so dominance is one comparison.
    return tuple(values[n] if d == "maximize" else -values[n] for n, d in directions.items())


def _pareto_dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def _check(directions: Mapping[str, str]) -> None:
    for name, d in directions.items():
        if d not in DIRECTIONS:
            raise ValueError(f"objective {name!r}: direction must be 'maximize' or 'minimize', not {d!r}")


def _constrained_dominates(a: tuple[float, ...], va: float, b: tuple[float, ...], vb: float) -> bool:
    feasible_a, feasible_b = va <= 0, vb <= 0
    if feasible_a != feasible_b:
        return feasible_a
    if not feasible_a and va != vb:
        return va < vb
    return _pareto_dominates(a, b)


def dominates(
    a: Mapping[str, float],
    b: Mapping[str, float],
    directions: Mapping[str, str],
    *,
    violation_a: float = 0.0,
    violation_b: float = 0.0,
) -> bool:
    """Whether ``a`` constrained-dominates ``b`` (see the module docstring for the rule)."""
    _check(directions)
    return _constrained_dominates(
        _oriented(a, directions), violation_a, _oriented(b, directions), violation_b
    )


def is_candidate(record: Scored, directions: Mapping[str, str]) -> bool:
    """A trial takes part in the sort only when every objective has a finite value."""
    values = record.objectives
    if values is None:
        return False
    return all(n in values and math.isfinite(values[n]) for n in directions)


def pareto_front(records: Sequence[R], directions: Mapping[str, str]) -> list[R]:
    """The non-dominated records, in their input order.

    ``directions`` maps each objective name to ``"maximize"`` or ``"minimize"``; values of other
    names in a record (extra metrics) are ignored. Records that are not candidates (see
    :func:`is_candidate`) are neither on the front nor dominate anything.
    """
    _check(directions)
    pool = [r for r in records if is_candidate(r, directions)]
    keys = [(_oriented(r.objectives, directions), r.violation) for r in pool]  # type: ignore[arg-type]
    return [
        r
        for i, r in enumerate(pool)
        if not any(
            _constrained_dominates(*keys[j], *keys[i]) for j in range(len(pool)) if j != i
        )
    ]
