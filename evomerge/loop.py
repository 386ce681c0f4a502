"""The search loop: ask the driver, submit to a worker, wait for the pool, tell the driver.

It reads like Optuna's own ``optimize``: ask a candidate the moment a worker is free, record each
result the moment it arrives. It talks to the workers only through the pool protocol
(:mod:`evomerge.pool`), so its rules hold whatever runs the candidates:

- a worker that dies or runs out of memory costs the candidate an attempt, and the candidate
  goes to another worker, ``MAX_INFRA_RETRIES`` times at most, then fails with the reason;
- a candidate past ``workers.timeout_s`` fails "timed out" (not retried: a slow candidate is slow
  everywhere) and its stuck worker is replaced; a dead worker is replaced too;
- a worker that fails to start is started again, ``MAX_START_TRIES`` times, then the search goes
  on without it and says how many workers it has left (none left: it stops);
- ``MAX_CONSECUTIVE_INFRA_FAULTS`` infrastructure faults in a row (no worker answering in between)
  stop the search with the reason: the machine is broken, not the candidates.

Every failure is told to the driver, which gives it a defined penalty. The loop keeps no state a
crash could lose: the run store is the memory; the loop holds only the candidates out on workers
and which workers are idle.

With ``evaluation.rungs`` (:mod:`evomerge.rungs`) a candidate is scored rung by rung: each rung
result is written to its trial at once, the promotion rule decides, and a promoted candidate waits
for the next free worker ahead of any new one (a trial under promotion counts against the budget
as one trial out). Only a candidate's last rung is told to the driver. Hand-set trials climb
together: each rung's decision on them waits until all of them are back from it (a few trials, at
the start), see ``_decide_hand_set``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import failpoints, interrupts
from .errors import EvomergeError
from .pool import (
    EvaluatorRaised,
    Finished,
    OutOfMemory,
    PoolEvent,
    StartFailed,
    TimedOut,
    Worker,
    WorkerLost,
    WorkerPool,
    WorkerStarted,
)
from .reporter import CallbackReporter, Reporter, duration

MAX_INFRA_RETRIES = 2  # a candidate whose worker dies or runs out of memory is retried on another worker this often
MAX_START_TRIES = 3  # tries to start a worker before the search goes on without it
MAX_CONSECUTIVE_INFRA_FAULTS = 5  # lost workers, out-of-memory errors and failed starts in a row that stop the search


class SearchStopped(EvomergeError):
    """The search cannot go on (no worker left, infrastructure failing), or every trial failed.

    Exit status 1: the config was accepted; something while running it went wrong."""

    exit_code = 1


@dataclass
class Flight:
    """A candidate out on a worker, or waiting for another worker after its own failed it."""

    number: int
    recipe_json: str
    generation: int | None
    attempts: int = 1
    failed_on: Worker | None = None  # the worker of the last failed attempt: a retry goes elsewhere
    rung: int | None = None  # with rungs: the rung this job completes (None: a whole evaluation)
    items: Mapping[str, Sequence[int]] | None = None  # with rungs: the items this job scores (the new ones)
    hand_set: bool = False  # a hand-set trial: with rungs, it climbs with the other hand-set trials
    unparked: bool = False  # a hand-set trial parked at a rung, climbing again at the run's end


@dataclass
class Progress:
    """Numbers for the live line and the log: counts, the best trial, the front, what was spent."""

    budget: int
    finished_before: int
    directions: Mapping[str, str] = field(default_factory=dict)
    finished: int = 0
    failed: int = 0
    started_at: float = field(default_factory=time.perf_counter)
    # the complete trial ``export --best`` would pick, shown as one trial with all its scores
    # (never each objective's best from different trials, which reads as one model doing both)
    best: Any = None
    front_size: int = 0
    forward_passes: int = 0  # spent by the whole run, resumed parts included

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.started_at
        return self.finished / elapsed if elapsed > 0 and self.finished else 0.0

    def eta_s(self) -> float | None:
        r = self.rate()
        left = self.budget - self.finished_before - self.finished
        return left / r if r > 0 else None

    def note_best(self, records: Sequence[Any]) -> None:
        """Keep the best complete trial among ``records`` and the best so far."""
        from .export import scalar_score
        from .rungs import full_fidelity

        for r in records:
            if r.state != "complete" or not r.objectives or not full_fidelity(r):
                continue
            if self.best is None or scalar_score(r, self.directions) > scalar_score(self.best, self.directions):
                self.best = r


class SearchLoop:
    """One run of the loop over an open store, a driver built on it, and a pool."""

    def __init__(
        self,
        store: Any,
        driver: Any,
        space: Any,
        pool: WorkerPool,
        *,
        budget: int,
        workers: int,
        report: Reporter | None = None,
        rungs: Any = None,
        max_forward_passes: int | None = None,
    ) -> None:
        """``report``: where stages, notices and finished trials go (default: notices to stderr).
        ``rungs``: a :class:`~evomerge.rungs.RungLadder` (multi-fidelity), or None.
        ``max_forward_passes``: ask no new candidate once the run has spent this many (a benchmark
        comparing searches at equal cost; candidates out, and their promotions, still finish)."""
        self.store = store
        self.driver = driver
        self.space = space
        self.pool = pool
        self.budget = budget
        self.slots = workers  # workers the search runs on: the count asked, less those that never started
        self.report: Reporter = report or CallbackReporter()
        self.notice = self.report.notice
        self.idle: list[Worker] = []
        self.starting: dict[Worker, int] = {}  # worker -> which try at starting its slot this is
        self.start_times: dict[Worker, float] = {}  # worker -> when it was asked to start (for "ready in 4 s")
        self.flights: dict[Worker, Flight] = {}
        self.retries: deque[Flight] = deque()  # candidates whose worker failed, waiting for another
        self.infra_faults_in_a_row = 0
        self.announced = False
        self.progress = Progress(budget=budget, finished_before=store.counts().finished, directions=store.directions,
                                 forward_passes=store.spent().forward_passes, front_size=len(store.pareto()))
        self.progress.note_best(store.trials())
        self.max_forward_passes = max_forward_passes
        self.rungs = rungs
        self.promotions: deque[Flight] = deque()  # promoted candidates, waiting for a free worker
        self._rung_state: dict[int, Any] = {}  # trial number -> RungState, while it climbs
        self._rung_timings: dict[int, dict[str, float]] = {}
        self._inheritable: dict[str, Any] = {}  # recipe JSON -> an interrupted trial's rung results
        self._hand_set_climbing: set[int] = set()  # hand-set trials out or waiting, not told yet
        self._hand_set_waiting: dict[int, tuple[Flight, dict[str, float], str]] = {}  # at a rung, for the others
        self._parked: dict[int, tuple[Flight, dict[str, float], str]] = {}  # hand-set trials waiting for the end
        if rungs is not None:
            from .rungs import INHERITED_ATTR, ITEMS_ATTR, FrontReach, make_promotion

            self.promotion = make_promotion(store, rungs)
            self.reach = FrontReach(store, rungs)
            records = store.trials()
            taken = {t.attrs.get(INHERITED_ATTR) for t in records}
            for t in records:
                if t.interrupted and t.attrs.get(ITEMS_ATTR) and t.recipe_json and t.number not in taken:
                    self._inheritable[t.recipe_json] = t

    # ---- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        """Ask, submit, wait, tell, until the budget is used (finished trials plus those out)."""
        if self.progress.finished_before >= self.budget:
            return  # nothing left to do: no worker is started
        self.report.begin(f"starting {self.slots} worker{'s' if self.slots != 1 else ''} ({self.pool.kind} pool)")
        for worker in self.pool.start(self.slots):
            self._starting(worker, 1)
        self.report.done(self.pool.describe())
        while True:
            interrupts.check()
            if self.store.lost_hold:
                raise SearchStopped(f"another process took over {self.store.path} while this one stalled; this one stops "
                                    "and writes nothing more (the other holds the run now)")
            self._dispatch_retries()
            if self._hand_set_waiting and self._left_to_ask() <= 0:
                self._decide_hand_set(force=True)  # no more hand-set trials will be asked to join
            if self._parked and not self._hand_set_waiting and self._left_to_ask() <= 0:
                self._unpark()  # nothing new will be asked: the parked hand-set trials climb or stop now
            self._dispatch_promotions()
            wanted = self._ask_and_submit()
            if (not self.flights and not self.retries and not self.promotions and not self._parked
                    and (wanted <= 0 or self.idle)):
                return  # done: nothing out, nothing to retry, nothing more to ask
            if not (self.idle or self.starting or self.flights):
                raise SearchStopped("no worker is left to run candidates on")
            event = self.pool.wait()
            if event is not None:
                self._handle(event)

    def _ask_and_submit(self) -> int:
        """Ask while a worker is free and the budget allows; returns how many more it allows."""
        wanted = self._left_to_ask()  # 0 once max_forward_passes is spent
        while self.idle and wanted > 0:
            proposal = self.driver.ask()
            if proposal is None:
                break  # CMA waits for its generation to come back
            recipe_json = self.space.decode(proposal.values).to_json()
            self.store.annotate(proposal.number, {"recipe": recipe_json})
            flight = Flight(proposal.number, recipe_json, proposal.generation, hand_set=proposal.hand_set)
            wanted -= 1
            if self.rungs is not None and not self._first_rung(flight):
                continue  # decided from inherited results: told, or waiting for promotion
            self._submit(flight, self.idle.pop())
            failpoints.hit("search.after_dispatch")  # candidates are out on workers
        return wanted

    def _left_to_ask(self) -> int:
        """New trials the budget allows (those out, waiting or promoted count against it); 0 once
        ``max_forward_passes`` is spent."""
        if (self.max_forward_passes is not None
                and self.progress.forward_passes + self._parked_passes() >= self.max_forward_passes):
            return 0
        return (self.budget - self.store.counts().finished - len(self.flights) - len(self.retries)
                - len(self.promotions) - len(self._hand_set_waiting) - len(self._parked))

    def _parked_passes(self) -> int:
        """The forward passes the parked hand-set trials would cost if each climbed to the top at
        the run's end (at the passes per item each paid so far), held back from
        ``max_forward_passes`` so that a run with parked trials spends no more than one without."""
        if not self._parked:
            return 0
        top = sum(len(docs) for docs in self.rungs.items(self.rungs.top).values())
        total = 0.0
        for number in self._parked:
            state = self._rung_state[number]
            paid = sum(state.cost.get("items", {}).values())  # a rerun's inherited items cost it nothing
            if paid:
                scored = sum(len(state.scored(task)) for task in self.rungs.order)
                total += state.cost.get("forward_passes", 0) / paid * (top - scored)
        return int(total)

    def _dispatch_promotions(self) -> None:
        """Promoted candidates go to idle workers before any new candidate is asked (ASHA)."""
        while self.promotions and self.idle:
            self._submit(self.promotions.popleft(), self.idle.pop())

    def _dispatch_retries(self) -> None:
        """Each retry goes to an idle worker other than the one it failed on, unless there is no other."""
        alone = len(self.idle) + len(self.starting) + len(self.flights) <= 1
        for flight in list(self.retries):
            others = [w for w in self.idle if w != flight.failed_on]
            worker = others[-1] if others else (self.idle[-1] if self.idle and alone else None)
            if worker is not None:
                self.idle.remove(worker)
                self.retries.remove(flight)
                self._submit(flight, worker)

    def _submit(self, flight: Flight, worker: Worker) -> None:
        self.flights[worker] = flight
        if flight.items is None:
            self.pool.submit(worker, flight.recipe_json)
        else:
            self.pool.submit(worker, flight.recipe_json, flight.items)

    # ---- rungs (multi-fidelity; see evomerge.rungs) -------------------------------------------

    def _first_rung(self, flight: Flight) -> bool:
        """Set a new trial's first job: rung 0. A rerun of an interrupted trial takes over its
        per-item results first and asks the promotion rule again for each rung they reach (a
        hand-set rerun climbs on past them: it was promoted to get them). False: nothing to submit now."""
        from .rungs import INHERITED_ATTR, PARKED_ATTR, RUNG_OF_ATTR, UNPARKED_ATTR, RungState

        state = RungState()
        old = self._inheritable.pop(flight.recipe_json, None)
        if old is not None:
            inherited = RungState.from_attrs(old.attrs)
            state = RungState(inherited.per_item, {}, inherited.measured)
            self.store.annotate(flight.number, {INHERITED_ATTR: old.number, **state.attrs()})
        self._rung_state[flight.number] = state
        self.store.annotate(flight.number, {RUNG_OF_ATTR: self.rungs.top + 1})
        target = 0
        if old is not None:
            reached = self._reached(state)
            for rung in range(reached + 1):
                values = self._rung_values(state, rung)
                state.values[rung] = values
                self.store.annotate(flight.number, state.attrs())
                if flight.hand_set and rung < self.rungs.top:
                    self.promotion.enter(flight.number, rung, values)
                elif (stop := self._stop(flight, rung, values, state)) is not None:
                    self._tell_rung_outcome(flight, rung, values, extra=stop)
                    return False
            if flight.hand_set and old.attrs.get(PARKED_ATTR) is not None and not old.attrs.get(UNPARKED_ATTR):
                self._park(flight, reached, state.values[reached], "")  # parked again, as before the kill
                return False
            target = reached + 1
        if flight.hand_set:
            self._hand_set_climbing.add(flight.number)
        return self._set_job(flight, target)

    def _rung_values(self, state: Any, rung: int) -> dict[str, float]:
        """A candidate's objectives over ``rung``'s items alone, from the per-item results it holds."""
        items = self.rungs.items(rung)

        from .evaluate import objective_task

        def docs(objective: str) -> list[int]:
            return items[objective_task(objective)]

        return {**self.rungs.combine({k: {d: v[d] for d in docs(k)} for k, v in state.per_item.items()}),
                **state.measured}

    def _reached(self, state: Any) -> int:
        """The highest rung whose every item ``state`` holds (-1: not even rung 0's)."""
        reached = -1
        for rung in range(self.rungs.top + 1):
            if all(set(docs) <= state.scored(task) for task, docs in self.rungs.items(rung).items()):
                reached = rung
        return reached

    def _set_job(self, flight: Flight, rung: int) -> bool:
        """Point ``flight`` at ``rung``: the items of it not yet scored for this candidate."""
        state = self._rung_state[flight.number]
        flight.rung = rung
        flight.items = {task: [d for d in docs if d not in state.scored(task)]
                        for task, docs in self.rungs.items(rung).items()}
        flight.attempts, flight.failed_on = 1, None
        return True

    def _rung_result(self, flight: Flight, event: Finished) -> None:
        """A rung came back: keep its per-item results in the log, then promote or tell."""
        from .rungs import RungState, add_costs

        result = event.result
        state: RungState = self._rung_state[flight.number]
        timings = self._rung_timings.setdefault(flight.number, {"merge_s": 0.0, "eval_s": 0.0, "wall_s": 0.0})
        for key, value in (("merge_s", result.merge_s), ("eval_s", result.eval_s), ("wall_s", event.wall_s)):
            timings[key] += value
        self.progress.forward_passes += int((result.cost or {}).get("forward_passes", 0))
        if result.error is not None or result.per_item is None:
            self._hand_set_climbing.discard(flight.number)
            cost = add_costs(state.cost, result.cost or {})
            attrs = {"timings": timings, "worker": result.worker, "attempts": flight.attempts, **self._gen(flight)}
            if cost:
                attrs["cost"] = cost
            self._forget(flight.number)
            record = self.driver.tell(flight.number, None, failed_reason=result.error or "no per-item results",
                                      attrs=attrs)
            self._recorded(record, counted=True)
            self._decide_hand_set()  # the others no longer wait for this one
            return
        assert flight.rung is not None
        state.add(result.per_item, result.cost)
        state.measured.update(result.objectives or {})
        values = {**self.rungs.combine(state.per_item), **state.measured}
        state.values[flight.rung] = values
        self.store.annotate(flight.number, state.attrs())
        failpoints.hit("search.after_rung")  # a rung result is recorded, its promotion not yet decided
        if flight.hand_set and flight.rung < self.rungs.top and not flight.unparked:
            self._hand_set_waiting[flight.number] = (flight, values, result.worker)
            self._decide_hand_set()
            return
        self._hand_set_climbing.discard(flight.number)
        if (stop := self._stop(flight, flight.rung, values, state)) is not None:
            self._tell_rung_outcome(flight, flight.rung, values, worker=result.worker, extra=stop)
            self._decide_hand_set()
            return
        self._promote(flight)

    def _stop(self, flight: Flight, rung: int, values: Mapping[str, float], state: Any) -> dict[str, Any] | None:
        """Whether a searched candidate stops at ``rung`` (None: it goes up), with the attributes
        that say why: the top rung is the end; below it, the promotion rule (ASHA's share) must
        keep it, and no trial of the front may show, beyond the noise of the rung's items, that it
        cannot reach the front (:func:`~evomerge.rungs.clearly_beaten`). Without the second test
        most of a search's forward passes went to whole evaluations of candidates that only beat
        older candidates at their rung (a search's new candidates keep beating its old ones)."""
        from .rungs import BEATEN_ATTR

        if rung == self.rungs.top:
            return {}
        if not flight.unparked and not self.promotion.promote(flight.number, rung, values):
            return {}  # (a parked hand-set trial climbing at the end answers to the front alone)
        beaten_by = self.reach.beaten_by(state, values, rung)
        return None if beaten_by is None else {BEATEN_ATTR: beaten_by}

    def _promote(self, flight: Flight) -> None:
        assert flight.rung is not None
        self._set_job(flight, flight.rung + 1)
        self.promotions.append(flight)

    def _decide_hand_set(self, force: bool = False) -> None:
        """Hand-set trials climb together: once every one still climbing waits at its rung (and the
        driver has none left to ask), the best of them by the plain sum ``--best`` ranks by goes up,
        and so does each merge the rung's items cannot yet tell from it
        (:func:`~evomerge.rungs.indistinguishable`); an input model alone that they cannot tell
        from it is parked there until the run's end (:meth:`_park`; the driver says which trials
        may wait, ``may_park``), unless no merge is tied with it; the rest stop there. So the best
        hand-set merge is scored on every item (a search never ends below it, issue item 3) unless
        a rung's items showed it worse, the clearly worse ones (the base alone, a specialist beside
        a merge of both) cost a rung-0 score, and a model alone as good as the best costs more
        only if the search has not clearly beaten it by its end. Each one competes at its rungs,
        setting the bar a searched candidate must pass."""
        if not self._hand_set_waiting or set(self._hand_set_waiting) != self._hand_set_climbing:
            return
        if getattr(self.driver, "hand_set_left", 0) and not force:
            return  # more hand-set trials to come (``force``: none will be asked): they join this rung's decision
        from .objectives import ObjectiveSpec, scalarize
        from .rungs import indistinguishable

        waiting = sorted(self._hand_set_waiting.values(), key=lambda w: w[0].number)
        self._hand_set_waiting.clear()
        rung = waiting[0][0].rung
        assert rung is not None
        items = self.rungs.items(rung)
        directions = self.store.directions
        unweighted = [ObjectiveSpec(name, direction) for name, direction in directions.items()]  # as --best ranks
        best, best_values, _ = max(waiting, key=lambda w: (scalarize(w[1], unweighted), -w[0].number))
        tied = {flight.number for flight, values, _ in waiting if flight is best or indistinguishable(
            self._rung_state[flight.number], self._rung_state[best.number], values, best_values, items, directions)}
        may_park = getattr(self.driver, "may_park", lambda number: False)
        parks = {number for number in tied if may_park(number)}
        if parks == tied:
            parks.discard(best.number)  # one of them climbs on whatever
        for flight, values, worker in waiting:
            self.promotion.enter(flight.number, rung, values)
            if flight.number in parks:
                self._park(flight, rung, values, worker)
            elif flight.number in tied:
                self._promote(flight)
            else:
                self._hand_set_climbing.discard(flight.number)
                self._tell_rung_outcome(flight, rung, values, worker=worker)

    def _park(self, flight: Flight, rung: int, values: dict[str, float], worker: str) -> None:
        """Leave a hand-set trial the rung's items cannot tell from the best one open at ``rung``
        until nothing new will be asked (:meth:`_unpark`). Scoring every such trial on every item
        first would cost whole evaluations at the start of every run (on the compose world the
        three specialists alone, each as good by the plain sum as task arithmetic, were 2,400 of
        the 3,232 forward passes of the hand-set trials), and most of them are clearly beaten by
        then.
        The trial is marked in the log (``hand_set_parked``: its rung), so a run killed meanwhile
        parks its rerun again without scoring, and CMA-ES, which starts at the best hand-set trial
        that climbed on, rebuilds the same start."""
        from .rungs import PARKED_ATTR

        flight.rung = rung
        self._hand_set_climbing.discard(flight.number)
        self._parked[flight.number] = (flight, values, worker)
        self.store.annotate(flight.number, {PARKED_ATTR: rung})
        park = getattr(self.driver, "park", None)
        if park is not None:
            park(flight.number)

    def _unpark(self) -> None:
        """The run's end: each parked hand-set trial stops if a front trial clearly beats it on its
        rung's items (:func:`~evomerge.rungs.clearly_beaten`), else climbs on, answering at each
        rung to the front alone. So the search still never ends below a hand-set trial its items
        could not tell from the best one (issue 12, item 3)."""
        from .rungs import BEATEN_ATTR, UNPARKED_ATTR

        for number in sorted(self._parked):
            flight, values, worker = self._parked.pop(number)
            assert flight.rung is not None
            self.store.annotate(number, {UNPARKED_ATTR: True})
            beaten_by = self.reach.beaten_by(self._rung_state[number], values, flight.rung)
            if beaten_by is not None:
                self._tell_rung_outcome(flight, flight.rung, values, worker=worker, extra={BEATEN_ATTR: beaten_by})
                continue
            flight.unparked = True
            self._promote(flight)

    def _tell_rung_outcome(self, flight: Flight, rung: int, values: Mapping[str, float], worker: str = "",
                           extra: Mapping[str, Any] | None = None) -> None:
        """Tell the driver a candidate's last rung: complete, stopped below the top when ``rung`` is."""
        from .rungs import STOPPED_ATTR

        state = self._rung_state[flight.number]
        attrs: dict[str, Any] = {"timings": self._rung_timings.get(flight.number, {}), "attempts": flight.attempts,
                                 **self._gen(flight), **state.attrs(), **(extra or {})}
        if worker:
            attrs["worker"] = worker
        if rung < self.rungs.top:
            attrs[STOPPED_ATTR] = rung
        self._forget(flight.number)
        failpoints.hit("search.before_tell")
        self._recorded(self.driver.tell(flight.number, dict(values), attrs=attrs), counted=True)
        failpoints.hit("search.after_tell")

    def _forget(self, number: int) -> None:
        self._rung_state.pop(number, None)
        self._rung_timings.pop(number, None)

    @staticmethod
    def _gen(flight: Flight) -> dict[str, Any]:
        return {"generation": flight.generation} if flight.generation is not None else {}

    # ---- events -------------------------------------------------------------------------------

    def _handle(self, event: PoolEvent) -> None:
        match event:
            case WorkerStarted(worker):
                self._started(worker)
            case StartFailed(worker, reason):
                self._start_failed(worker, reason)
            case Finished(worker, _, _):
                self.infra_faults_in_a_row = 0
                self.idle.append(worker)
                flight = self.flights.pop(worker)
                if flight.rung is not None:
                    self._rung_result(flight, event)
                else:
                    self._tell_result(flight, event)
            case EvaluatorRaised(worker, reason, wall_s):
                self.infra_faults_in_a_row = 0  # the worker answered; the fault is the evaluator's
                self.idle.append(worker)
                self._tell_failed(self.flights.pop(worker), reason, wall_s)
            case TimedOut(worker, timeout_s, wall_s):
                flight = self.flights.pop(worker)
                self._replace(worker)
                self._tell_failed(flight, f"timed out after {timeout_s:g}s", wall_s)
            case OutOfMemory(worker, reason, wall_s, worker_alive):
                self._infra_fault(self.flights.pop(worker), worker, reason, wall_s, worker_alive=worker_alive)
            case WorkerLost(worker, reason, wall_s):
                self._infra_fault(self.flights.pop(worker), worker, reason, wall_s, worker_alive=False)

    def _starting(self, worker: Worker, tries: int) -> None:
        self.starting[worker] = tries
        self.start_times[worker] = time.perf_counter()

    def _started(self, worker: Worker) -> None:
        self.starting.pop(worker)
        self.idle.append(worker)
        took = time.perf_counter() - self.start_times.pop(worker, time.perf_counter())
        ready = len(self.idle) + len(self.flights)
        if self.announced:
            self.report.line(f"a new worker is ready, {duration(took)} after its start ({ready} at work)")
        else:
            self.report.line(f"worker {ready} of {self.slots} ready, {duration(took)} after its start")
        if not self.announced and not self.starting:
            self.announced = True
            self.report.line(f"running on {self.slots} worker{'s' if self.slots != 1 else ''} ({self.pool.kind} pool)")

    def _start_failed(self, worker: Worker, reason: str) -> None:
        tries = self.starting.pop(worker)
        self.start_times.pop(worker, None)
        if tries < MAX_START_TRIES:
            self.notice(f"a worker failed to start ({reason}); starting another (try {tries + 1} of {MAX_START_TRIES})")
            self._starting(self.pool.replace(worker), tries + 1)
        else:
            self.slots -= 1
            self.notice(f"a worker could not be started in {MAX_START_TRIES} tries (last: {reason}); the search goes on "
                        f"with {self.slots} worker{'s' if self.slots != 1 else ''}")
            if self.slots == 0:
                raise SearchStopped(f"no worker could be started ({MAX_START_TRIES} tries; last: {reason})")
        self._count_infra_fault(f"a worker failed to start: {reason}")

    def _infra_fault(self, flight: Flight, worker: Worker, reason: str, wall_s: float, *, worker_alive: bool) -> None:
        """Retry the candidate on another worker, or record it failed after too many tries.

        A dead worker is replaced; one that only failed an allocation is healthy (the failed
        allocation freed everything and the next merge overwrites every merged tensor) and goes
        back to work, on other candidates.
        """
        if worker_alive:
            self.idle.append(worker)
        else:
            self._replace(worker)
        if flight.attempts <= MAX_INFRA_RETRIES:
            flight.attempts += 1
            flight.failed_on = worker
            self.retries.append(flight)
            self.notice(f"trial {flight.number}: {reason}; trying another worker "
                        f"(attempt {flight.attempts} of {MAX_INFRA_RETRIES + 1})")
        else:
            self._tell_failed(flight, f"{reason} ({flight.attempts} attempts on different workers)", wall_s)
        self._count_infra_fault(reason)

    def _count_infra_fault(self, reason: str) -> None:
        self.infra_faults_in_a_row += 1
        if self.infra_faults_in_a_row >= MAX_CONSECUTIVE_INFRA_FAULTS:
            raise SearchStopped(
                f"stopped after {self.infra_faults_in_a_row} infrastructure faults in a row with no worker answering "
                f"in between (last: {reason}); fix the workers (memory, devices, nodes), then `evomerge resume {self.store.path}`"
            )

    def _replace(self, worker: Worker) -> None:
        self._starting(self.pool.replace(worker), 1)

    # ---- telling ------------------------------------------------------------------------------

    def _tell_result(self, flight: Flight, event: Finished) -> None:
        result = event.result
        attrs: dict[str, Any] = {"timings": {"merge_s": result.merge_s, "eval_s": result.eval_s, "wall_s": event.wall_s},
                                 "worker": result.worker, "attempts": flight.attempts}
        if flight.generation is not None:
            attrs["generation"] = flight.generation
        if result.cost is not None:
            attrs["cost"] = result.cost
        failpoints.hit("search.before_tell")  # a result is here and not yet recorded
        self._recorded(self.driver.tell(flight.number, result.objectives, failed_reason=result.error, attrs=attrs))
        failpoints.hit("search.after_tell")

    def _tell_failed(self, flight: Flight, reason: str, wall_s: float) -> None:
        attrs: dict[str, Any] = {"attempts": flight.attempts, "timings": {"wall_s": wall_s}}
        if flight.generation is not None:
            attrs["generation"] = flight.generation
        counted = flight.rung is not None  # its earlier rungs were counted as they came back
        if counted:
            state = self._rung_state.get(flight.number)
            if state is not None and state.cost:
                attrs["cost"] = state.cost
            self._forget(flight.number)
        self._recorded(self.driver.tell(flight.number, None, failed_reason=reason, attrs=attrs), counted=counted)
        if counted and flight.number in self._hand_set_climbing:
            self._hand_set_climbing.discard(flight.number)
            self._decide_hand_set()  # the others no longer wait for this one

    def _recorded(self, record: Any, *, counted: bool = False) -> None:
        """Count a told trial, whatever its outcome, and show it (``counted``: its forward passes
        were added rung by rung already)."""
        self.progress.finished += 1
        if not counted:
            self.progress.forward_passes += record.forward_passes
        if record.state != "complete":
            self.progress.failed += 1
        if record.state == "complete":
            self.progress.note_best([record])
            self.progress.front_size = len(self.store.pareto())
        self.report.trial(self.progress, record)
