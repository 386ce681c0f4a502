"""What a run optimises: named objectives with a direction and a weight, constraints with a bound.

Objectives are named ``task:<task>/<metric>`` or ``l2_from_base``. The Optuna drivers keep them
apart (the Pareto front, in :mod:`evomerge.pareto`, ranks trials by constrained dominance);
CMA-ES and ``evomerge export --best`` need one number per trial, which :func:`scalarize` gives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Direction = Literal["maximize", "minimize"]
DIRECTIONS: tuple[str, ...] = ("maximize", "minimize")


@dataclass(frozen=True)
class ObjectiveSpec:
    """A named objective, which way is better, and its weight when a driver needs one number."""

    name: str
    direction: str  # "maximize" | "minimize"
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"objective {self.name!r}: direction must be 'maximize' or 'minimize'")


@dataclass(frozen=True)
class ConstraintSpec:
    """``value(name) <= bound``; ``penalty`` per unit of excess in a scalarised score (CMA)."""

    name: str
    bound: float
    penalty: float = 1.0


def scalarize(
    measured: Mapping[str, float],
    objectives: Sequence[ObjectiveSpec],
    constraints: Sequence[ConstraintSpec] = (),
) -> float:
    """The score CMA-ES maximises (it minimises ``-score``).

    ``score = sum(w_i * s_i * v_i) - sum(penalty_j * max(0, v_j - bound_j))`` with ``s_i = +1``
    for a maximised objective and ``-1`` for a minimised one.
    """
    score = sum(o.weight * (1.0 if o.direction == "maximize" else -1.0) * measured[o.name] for o in objectives)
    score -= sum(c.penalty * max(0.0, measured[c.name] - c.bound) for c in constraints)
    return score
