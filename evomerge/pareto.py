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

Trials without objectives (failed, running) are not candidates at all.

The front is kept incrementally (:class:`IncrementalFront`): a new trial is compared with the
current front only, never with every trial seen. That gives the same set as comparing every pair,
because constrained domination is a strict partial order (violation first, then Pareto
dominance; both transitive): a trial beaten by an earlier trial that has since left the front is
beaten by whichever front member beat that one. Comparisons run on numpy arrays, so a trial costs
microseconds whether the run holds a hundred trials or a hundred thousand.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Generic, Protocol, TypeVar

import numpy as np

from evomerge.objectives import DIRECTIONS


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


class IncrementalFront(Generic[R]):
    """The non-dominated records seen so far; :meth:`add` compares a newcomer with the front only."""

    def __init__(self, directions: Mapping[str, str]) -> None:
        _check(directions)
        self.directions = dict(directions)
        self._members: list[R] = []
        self._keys = np.empty((0, len(self.directions)))  # oriented objectives, bigger is better
        self._violations = np.empty(0)

    def __len__(self) -> int:
        return len(self._members)

    @property
    def members(self) -> list[R]:
        """The front, in the order its members were added."""
        return list(self._members)

    def add(self, record: R) -> bool:
        """Take ``record`` into the front when nothing on it dominates it; returns whether it did.

        Members that ``record`` dominates leave the front. Records that are not candidates (see
        :func:`is_candidate`) are ignored.
        """
        if not is_candidate(record, self.directions):
            return False
        key = np.asarray(_oriented(record.objectives, self.directions), dtype=float)  # type: ignore[arg-type]
        violation = float(record.violation)
        if self._members:
            if self._beaten_by_front(key, violation).any():
                return False
            keep = ~self._beaten_by_newcomer(key, violation)
            if not keep.all():
                self._members = [m for m, k in zip(self._members, keep) if k]
                self._keys, self._violations = self._keys[keep], self._violations[keep]
        self._members.append(record)
        self._keys = np.vstack([self._keys, key[None, :]])
        self._violations = np.append(self._violations, violation)
        return True

    # The same rule as _constrained_dominates, one front member per row.
    def _beaten_by_front(self, key: np.ndarray, violation: float) -> np.ndarray:
        feasible, front_feasible = violation <= 0, self._violations <= 0
        pareto = np.all(self._keys >= key, axis=1) & np.any(self._keys > key, axis=1)
        by_violation = ~front_feasible & (self._violations != violation)
        return np.where(front_feasible != feasible, front_feasible,
                        np.where(by_violation, self._violations < violation, pareto))

    def _beaten_by_newcomer(self, key: np.ndarray, violation: float) -> np.ndarray:
        feasible, front_feasible = violation <= 0, self._violations <= 0
        pareto = np.all(key >= self._keys, axis=1) & np.any(key > self._keys, axis=1)
        by_violation = ~front_feasible & (self._violations != violation)
        return np.where(front_feasible != feasible, feasible,
                        np.where(by_violation, violation < self._violations, pareto))


def pareto_front(records: Sequence[R], directions: Mapping[str, str]) -> list[R]:
    """The non-dominated records, in their input order.

    ``directions`` maps each objective name to ``"maximize"`` or ``"minimize"``; values of other
    names in a record (extra metrics) are ignored. Records that are not candidates (see
    :func:`is_candidate`) are neither on the front nor dominate anything.
    """
    front: IncrementalFront[_Indexed] = IncrementalFront(directions)
    for i, r in enumerate(records):
        front.add(_Indexed(i, r))
    on_front = sorted(m.index for m in front.members)
    return [records[i] for i in on_front]


class _Indexed:
    """A record with its input position, so duplicates in the input stay apart."""

    __slots__ = ("index", "objectives", "violation")

    def __init__(self, index: int, record: Scored) -> None:
        self.index, self.objectives, self.violation = index, record.objectives, record.violation
