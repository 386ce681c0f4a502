"""The hand-set recipes a person would try before any search, as points of the search space.

A search starts with them (``search.hand_set``, on by default; see
:mod:`evomerge.drivers.hand_set`), so its best trial is never below the obvious merges on its own
items, and the optimiser starts from what they teach. The recipes, in this order:

- ``hand-set: base alone`` and ``hand-set: <donor> alone``: task arithmetic with weight 1 on one
  donor and 0 on the others (all 0 for the base). Task arithmetic is ``base + lambda * sum(w_i *
  tau_i)``, so these are each input model exactly (up to float rounding of ``base + (donor -
  base)``), and they are expressed only where the space lists ``task_arithmetic``;
- ``hand-set: task arithmetic, weight 1``: every donor at weight 1, lambda 1;
- ``hand-set: <method>, registry defaults, weight 1`` for every method of the space: weight 1 on
  every model (weight has no registry default; 1 is what a first config writes) and every other
  parameter at the registry's default (``ties``: density 1, lambda 1, normalize true), so a space
  that pins one of them elsewhere (``normalize: false``) skips it.

Each recipe is a point the space decodes (:meth:`~evomerge.space.SearchSpace.point`), so the
trial log, ``show``, export and resume treat a hand-set trial like any other; only the attribute
``hand_set`` (its label) marks it. A recipe the space cannot express exactly (its method not
among the space's, a weight outside the searched range, a parameter pinned to another value) is
skipped with a notice, never clipped into something else under its name. Two recipes that
decode to the same merge are run once, under the first label.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `evomerge show` imports the label's name; the space (and torch) load only to build points
    from .space import SearchSpace

#: How the label of an input model alone ends (``hand-set: <model> alone``).
ALONE_SUFFIX = " alone"
#: The trial attribute that marks a hand-set trial; its value is the label ``show`` prints.
HAND_SET_ATTR = "hand_set"
LABEL_PREFIX = "hand-set: "
TASK_ARITHMETIC = "task_arithmetic"


@dataclass(frozen=True)
class HandSet:
    """One hand-set recipe: its label and the named values that decode to it."""

    label: str
    values: Mapping[str, float | str]


def _recipes(space: SearchSpace) -> list[tuple[str, str, dict[str, dict[str, float]], dict[str, float]]]:
    """(label, method, per-model settings, shared settings) for every recipe, before checking."""
    from .space_config import BASE_NAME

    assert space.config.merge is not None
    donors = [d.name for d in space.config.models.donors]
    out = []
    for alone in [BASE_NAME, *donors]:
        weights = {d: (1.0 if d == alone else 0.0) for d in donors}
        out.append((f"{alone}{ALONE_SUFFIX}", TASK_ARITHMETIC, {"weight": weights}, {"lambda": 1.0}))
    out.append(("task arithmetic, weight 1", TASK_ARITHMETIC, {"weight": dict.fromkeys(donors, 1.0)}, {"lambda": 1.0}))
    from .merge.registry import get_method

    for method in space.config.merge.method:
        per_model: dict[str, dict[str, float]] = {}
        shared: dict[str, float] = {}
        for p in get_method(method).params:
            value = 1.0 if p.name == "weight" else p.default
            if value is None:
                continue
            if p.per_model:
                per_model[p.name] = dict.fromkeys(([BASE_NAME] if p.includes_base else []) + donors, value)
            else:
                shared[p.name] = value
        out.append((f"{method}, registry defaults, weight 1", method, per_model, shared))
    return out


def hand_set_points(space: SearchSpace) -> tuple[list[HandSet], list[str]]:
    """The hand-set recipes this space can express, and a notice for each one it cannot."""
    from .space import NotExpressible

    if space.config.merge is None or space.route is not None:
        return [], ["no hand-set trials: the space searches a layer route, which no hand-set merge fixes"]
    points: list[HandSet] = []
    notices: list[str] = []
    seen: set[str] = set()
    for label, method, per_model, shared in _recipes(space):
        try:
            values = space.point(method, per_model, shared)
        except NotExpressible as why:
            notices.append(f"hand-set trial '{label}' skipped: {why}")
            continue
        decoded = space.decode(values).merge
        key = decoded.model_dump_json() if decoded is not None else ""
        if key in seen:
            continue  # the same merge as an earlier recipe (ties defaults = ... in some spaces)
        seen.add(key)
        points.append(HandSet(LABEL_PREFIX + label, values))
    return points, notices
