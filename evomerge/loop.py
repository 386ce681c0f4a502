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

        for r in records:
            if r.state != "complete" or not r.objectives:
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
    ) -> None:
        """``report``: where stages, notices and finished trials go (default: notices to stderr)."""
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
            wanted = self._ask_and_submit()
            if not self.flights and not self.retries and (wanted <= 0 or self.idle):
                return  # done: nothing out, nothing to retry, nothing more to ask
            if not (self.idle or self.starting or self.flights):
                raise SearchStopped("no worker is left to run candidates on")
            event = self.pool.wait()
            if event is not None:
                self._handle(event)

    def _ask_and_submit(self) -> int:
        """Ask while a worker is free and the budget allows; returns how many more it allows."""
        wanted = self.budget - self.store.counts().finished - len(self.flights) - len(self.retries)
        while self.idle and wanted > 0:
            proposal = self.driver.ask()
            if proposal is None:
                break  # CMA waits for its generation to come back
            recipe_json = self.space.decode(proposal.values).to_json()
            self.store.annotate(proposal.number, {"recipe": recipe_json})
            self._submit(Flight(proposal.number, recipe_json, proposal.generation), self.idle.pop())
            wanted -= 1
            failpoints.hit("search.after_dispatch")  # candidates are out on workers
        return wanted

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
        self.pool.submit(worker, flight.recipe_json)

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
                self._tell_result(self.flights.pop(worker), event)
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
        self._recorded(self.driver.tell(flight.number, None, failed_reason=reason, attrs=attrs))

    def _recorded(self, record: Any) -> None:
        """Count a told trial, whatever its outcome, and show it."""
        self.progress.finished += 1
        self.progress.forward_passes += record.forward_passes
        if record.state != "complete":
            self.progress.failed += 1
        if record.state == "complete":
            self.progress.note_best([record])
            self.progress.front_size = len(self.store.pareto())
        self.report.trial(self.progress, record)
