"""Hand-set trials first, then the driver: how a search is seeded with the obvious merges.

:class:`HandSetFirst` wraps any driver. It hands out the hand-set points
(:mod:`evomerge.hand_set`) as the run's first trials, each with the attribute ``hand_set`` (its
label), then asks the driver it wraps. How each kind of driver learns from them:

- **Optuna** (tpe, nsga2, gp, random): a hand-set trial is started on the driver's own study
  through Optuna's path for fixed parameters (``enqueue_trial`` then ``ask``, via
  ``RunStore.start_trial(..., study=)``) and told through the store like any trial, so the
  sampler's history holds them. The driver is built at once and proposes in parallel while
  hand-set trials run (constant liar counts them as running).
- **CMA-ES**: its trials are generation members, replayed from the log on resume, so hand-set
  trials stay outside the generations (the CMA replay skips them). Instead they decide where the
  search starts: the CMA driver is built once every hand-set trial is finished, with ``x0`` at the
  unit-cube point of the best one (by the same scalarisation CMA ranks by; the space's default
  start when every one failed). Workers wait for the last hand-set trial, a few trials at most.
  x0 depends only on logged results, so a resumed run rebuilds the same CMA stream and the kill
  test's member-by-member comparison holds.
  Why the other workers are not given candidates while they wait: any candidate drawn then is
  drawn around a guess of the start. The best guess, the best hand-set result so far, could be
  logged and replayed, but it is wrong until the final best has arrived, which with equal timing
  is as likely last as first; the candidates drawn around a start that lost are trials CMA
  cannot learn from. ``scripts/bench_cma_async.py --barrier`` (4 hand-set trials, log-normal
  times): at 8 and 16 workers, cv 0.3 and 0.6, more of those candidates would be drawn around a
  losing start (4.8-14.4 per run) than around the final one (3.1-11.8), while the wait itself
  is 6-19% of a 96-trial run's worker-time and 0.7-2.2% of a 1000-trial run's.

Budget: hand-set trials are trials; they count against ``search.budget`` (with a budget smaller
than their number, only the first ones run).

Resume: a label already in the log is never run again. A hand-set trial a crash interrupted is run
again (``rerun_of``), by this wrapper, not by the driver (the Optuna driver leaves labelled trials
to it). A run whose log has trials but no hand-set trial (started with ``search.hand_set: false``
or before hand-set trials existed) gets none: they would not come first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from optuna.distributions import BaseDistribution

from evomerge.drivers.base import Driver, Proposal, record_result
from evomerge.hand_set import ALONE_SUFFIX, HAND_SET_ATTR, HandSet
from evomerge.objectives import ConstraintSpec, ObjectiveSpec, scalarize
from evomerge.store import RunStore, TrialRecord


class HandSetFirst:
    """Hand-set trials first, then ``driver``'s (see module docstring)."""

    def __init__(
        self,
        store: RunStore,
        points: Sequence[HandSet],
        *,
        distributions: Mapping[str, BaseDistribution],
        objectives: Sequence[ObjectiveSpec],
        constraints: Sequence[ConstraintSpec] = (),
        driver: Driver | None = None,
        build_after: Callable[[Mapping[str, Any] | None], Driver] | None = None,
    ) -> None:
        """Give ``driver`` (Optuna: built now, seeded through its study) or ``build_after``
        (CMA: called once the hand-set trials are finished, with the values of the best complete
        one, or None)."""
        if (driver is None) == (build_after is None):
            raise ValueError("give the driver or a way to build it after the hand-set trials, not both")
        self._store = store
        self._distributions = dict(distributions)
        self._objectives = tuple(objectives)
        self._constraints = tuple(constraints)
        self._inner = driver
        self._build_after = build_after
        self._study = getattr(driver, "study", None)  # Optuna: hand-set trials go into the sampler's study
        trials = store.trials()
        labelled = [t for t in trials if HAND_SET_ATTR in t.attrs]
        fresh = not trials or labelled
        done = {t.attrs[HAND_SET_ATTR] for t in labelled if t.finished}
        rerun = {t.attrs.get("rerun_of") for t in labelled}
        lost = {t.attrs[HAND_SET_ATTR]: t.number for t in labelled if t.interrupted and t.number not in rerun}
        self._todo: deque[tuple[HandSet, int | None]] = deque(
            (p, lost.get(p.label)) for p in points if fresh and p.label not in done
        )
        self._outstanding: set[int] = set()
        self._parked: set[int] = set()  # hand-set trials left open at a rung until the run's end (rungs)
        self._alone: set[int] = set()  # hand-set trials that are one input model alone
        self.name = driver.name if driver is not None else "cma"

    @property
    def hand_set_left(self) -> int:
        """Hand-set trials not asked yet."""
        return len(self._todo)

    @property
    def driver(self) -> Driver | None:
        """The wrapped driver (None until a CMA driver is built after the hand-set trials)."""
        return self._inner

    def may_park(self, number: int) -> bool:
        """Whether hand-set trial ``number``, tied with the best one at a rung (with rungs), may
        wait there for the run's end rather than climb to the top first: an input model alone.
        The merges tied with the best climb on, so the driver learns from them at once (TPE told
        task arithmetic only at the end circled the specialists on 2 seeds of 10 of the compose
        world) and CMA-ES starts at the best of them (parking every tied trial let it start at a
        specialist that led on 8 items per task). See :mod:`evomerge.rungs`."""
        return number in self._alone

    def park(self, number: int) -> None:
        """Trial ``number`` waits at a rung until the run's end (:mod:`evomerge.rungs`) and is told
        then: CMA-ES need not wait for it, its start is the best hand-set trial that climbed on."""
        self._outstanding.discard(number)
        self._parked.add(number)

    def ask(self) -> Proposal | None:
        if self._todo:
            point, lost = self._todo.popleft()
            attrs: dict[str, Any] = {HAND_SET_ATTR: point.label}
            if lost is not None:
                attrs["rerun_of"] = lost
            number = self._store.start_trial(dict(point.values), self._distributions, attrs, study=self._study)
            self._outstanding.add(number)
            if point.label.endswith(ALONE_SUFFIX):
                self._alone.add(number)
            return Proposal(number, dict(point.values), hand_set=True)
        if self._inner is None:
            if self._outstanding:
                return None  # CMA starts where the best hand-set trial is: wait for the last one
            assert self._build_after is not None
            self._inner = self._build_after(self._best_values())
        return self._inner.ask()

    def tell(
        self,
        number: int,
        objectives: Mapping[str, float] | None,
        *,
        failed_reason: str | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> TrialRecord:
        if number in self._outstanding or number in self._parked:
            self._outstanding.discard(number)
            self._parked.discard(number)
            return record_result(self._store, number, objectives, failed_reason, attrs)
        if self._inner is None:
            raise ValueError(f"trial {number} was not asked from this driver, or was told already")
        return self._inner.tell(number, objectives, failed_reason=failed_reason, attrs=attrs)

    def state_dict(self) -> dict[str, Any]:
        inner = self._inner.state_dict() if self._inner is not None else {"driver": self.name}
        return {**inner, "hand_set_left": [p.label for p, _ in self._todo], "hand_set_out": sorted(self._outstanding),
                "hand_set_parked": sorted(self._parked)}

    def _best_values(self) -> Mapping[str, Any] | None:
        """The values of the best complete hand-set trial (the first listed on a tie), or None.
        With rungs, one scored on every item outranks those stopped lower (fewer items, and
        stopped for ranking low), and one parked at a rung (:meth:`park`) never counts: it was
        open when CMA-ES started, so a run resumed after it was told rebuilds the same start."""
        from evomerge.rungs import PARKED_ATTR, full_fidelity

        best: tuple[bool, float, int] | None = None
        values = None
        for t in self._store.trials():
            if HAND_SET_ATTR not in t.attrs or PARKED_ATTR in t.attrs or t.state != "complete" or not t.objectives:
                continue
            score = scalarize(t.objectives, self._objectives, self._constraints)
            if best is None or (full_fidelity(t), score, -t.number) > best:
                best, values = (full_fidelity(t), score, -t.number), t.params
        return values
