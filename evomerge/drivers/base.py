"""What every driver is: ask for a candidate, tell its result, through the run store.

A driver owns proposal logic only. It never evaluates anything and never keeps results of its own:
``ask`` starts a RUNNING trial in the store and returns its number and named values; ``tell``
writes the result to the store (every measured value, timings, error text) and lets the driver
learn from it. Because the store is the only memory, a driver rebuilt from a reopened store carries
on where the old one stopped (Optuna: the study is the history; CMA: deterministic replay).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from evomerge.objectives import ConstraintSpec, ObjectiveSpec

if TYPE_CHECKING:
    from evomerge.store import RunStore, TrialRecord

Value = float | int | str


@dataclass(frozen=True)
class Proposal:
    """One candidate to evaluate: the store's trial number and its named coordinate values."""

    number: int
    values: Mapping[str, Value]
    generation: int | None = None  # CMA generation (for logs); None for the Optuna samplers
    hand_set: bool = False  # a hand-set trial (with rungs, they climb together: see evomerge.loop)


class Driver(Protocol):
    """The contract the search loop relies on (see evomerge/drivers/__init__.py for the list)."""

    name: str

    def ask(self) -> Proposal | None:
        """Start a trial and return it; None when nothing can be proposed until trials out on
        workers are told (CMA between generations). Optuna drivers never return None."""
        ...

    def tell(
        self,
        number: int,
        objectives: Mapping[str, float] | None,
        *,
        failed_reason: str | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> TrialRecord:
        """Record trial ``number``'s result in the store and learn from it; in any order.

        ``objectives`` holds every measured value by name; None means the candidate failed
        (``failed_reason`` says why). ``attrs`` adds JSON-able user attributes such as
        ``{"timings": {"merge_s": ..., "eval_s": ...}, "worker": ...}``. Returns the stored
        record, whose ``state`` may be "failed" even with objectives (a NaN, a missing value).
        """
        ...

    def state_dict(self) -> dict[str, Any]:
        """A JSON-able summary for logs and reports; resume never reads it."""
        ...


def record_result(
    store: RunStore,
    number: int,
    objectives: Mapping[str, float] | None,
    failed_reason: str | None,
    attrs: Mapping[str, Any] | None,
) -> TrialRecord:
    """Write one result to the store: the one place both kinds of driver finish a trial."""
    if objectives is None:
        return store.fail_trial(number, failed_reason or "the candidate returned no objectives", attrs)
    return store.complete_trial(number, objectives, attrs)


def check_against_store(
    store: RunStore, objectives: Sequence[ObjectiveSpec], constraints: Sequence[ConstraintSpec] = ()
) -> None:
    """Refuse a driver whose objectives or constraints are not the ones the run was created with.

    The store records what the study optimises; a driver scalarising other names would quietly
    optimise something else.
    """
    mine = {o.name: o.direction for o in objectives}
    if mine != store.directions:
        raise ValueError(f"driver objectives {mine} differ from the run's {store.directions}")
    bounds = {c.name: c.bound for c in constraints}
    if bounds != store.constraints:
        raise ValueError(f"driver constraints {bounds} differ from the run's {store.constraints}")


def refuse_running_trials(store: RunStore) -> None:
    """A driver is built before any worker starts, so a RUNNING trial now was left by a crash; or
    it is a hand-set trial parked at a rung (:mod:`evomerge.rungs`), which CMA-ES, built after the
    hand-set trials, need not wait for."""
    from evomerge.rungs import parked

    running = [t for t in store.running_trials() if not parked(t)]
    if running:
        numbers = [t.number for t in running]
        raise RuntimeError(
            f"trials {numbers} are still RUNNING from an earlier process; "
            f"call store.requeue_interrupted() before building a driver"
        )
