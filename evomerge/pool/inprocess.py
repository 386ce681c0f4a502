"""Workers in the search process: the same merge and evaluation as a Ray actor, without Ray.

Each worker is a :class:`~evomerge.worker.CandidateEvaluator` object with its own resident models.
They take turns: :meth:`InProcessPool.wait` builds the workers still starting, then runs the oldest
submitted candidate to its end and returns what happened, so a search on one machine with one
worker pays for no cluster, no actor process and no serialisation, and a test of the loop runs in
seconds with the order of events fixed. ``count`` above 1 gives several evaluators taking turns
(each holding its own copy of the models), which is what tests of dispatch and retries need; it
is not parallelism.

Faults are the real ones, reported as the Ray pool reports them: an exception while building a
worker is :class:`StartFailed`; an allocation error while evaluating is :class:`OutOfMemory`
(the worker stays); any other exception escaping the evaluator is :class:`EvaluatorRaised`; a
candidate past ``workers.timeout_s`` is stopped by a SIGALRM timer (in the main thread; elsewhere
no limit is enforced) and is :class:`TimedOut`, its evaluator thrown away as a killed actor would
be. A worker process cannot die here, so the failpoint ``inprocess.evaluate``, passed before
every evaluation, stands for it: its ``raise`` action reports the worker lost and throws its
evaluator away (its hit log names the worker and the candidate of every attempt).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from .. import failpoints, interrupts
from ..worker import candidate_digest
from .base import (
    EvaluatorRaised,
    Finished,
    OutOfMemory,
    PoolEvent,
    StartFailed,
    TimedOut,
    Worker,
    WorkerLost,
    WorkerStarted,
    is_out_of_memory,
)


def _quiet() -> contextlib.AbstractContextManager[Any]:
    """What a Ray actor prints goes to its log; here, lm-eval's and transformers' progress bars
    (drawn even when TQDM_DISABLE is set) would scroll through the search's progress. Exceptions
    still propagate; the reporter writes to stdout (:mod:`evomerge.reporter`), not to ``sys.stderr``."""
    return contextlib.redirect_stderr(io.StringIO())


class _TimeLimit(BaseException):
    """Raised by the SIGALRM timer inside an evaluation; a BaseException so no ``except Exception``
    inside lm-eval or transformers swallows it."""


class InProcessPool:
    """:class:`~evomerge.worker.CandidateEvaluator` objects in this process, one candidate at a time."""

    kind = "inprocess"

    def __init__(self, spec: Any, workers: Any, *, evaluator: Callable[[Any], Any] | None = None) -> None:
        """``spec``: a :class:`~evomerge.worker.WorkerSpec`; ``workers``: the space file's ``workers:``;
        ``evaluator``: builds a worker from the spec (default
        :class:`~evomerge.worker.CandidateEvaluator`; a benchmark of the loop passes an instant one)."""
        self._spec = replace(spec, threads=spec.threads or max(1, int(workers.cpus_per_worker)))
        self._new_evaluator = evaluator
        self._timeout_s: float | None = workers.timeout_s
        self._evaluators: dict[Worker, Any] = {}
        self._starting: deque[Worker] = deque()
        self._queue: deque[tuple[Worker, str, Any]] = deque()  # submitted candidates, oldest first

    def open(self) -> None:
        """Nothing to connect to."""

    def start(self, count: int) -> list[Worker]:
        workers = [Worker() for _ in range(count)]
        self._starting.extend(workers)
        return workers

    def describe(self) -> str:
        return "in-process pool: the workers take turns in this process (no Ray)"

    def submit(self, worker: Worker, recipe_json: str, items: Mapping[str, Sequence[int]] | None = None) -> None:
        if worker not in self._evaluators:
            raise ValueError(f"{worker} has not started")
        self._queue.append((worker, recipe_json, items))

    def wait(self, timeout_s: float | None = None) -> PoolEvent | None:
        """The next event: a worker built, else the oldest candidate run to its end (this pool
        never waits idle, so ``timeout_s`` never cuts a wait short)."""
        interrupts.check()
        if self._starting:
            return self._build(self._starting.popleft())
        if self._queue:
            return self._evaluate(*self._queue.popleft())
        raise RuntimeError("wait() with no worker starting and no candidate out")

    def _build(self, worker: Worker) -> PoolEvent:
        from ..worker import CandidateEvaluator

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            with _quiet():
                self._evaluators[worker] = (self._new_evaluator or CandidateEvaluator)(self._spec)
        except Exception as err:  # noqa: BLE001  (whatever stops a worker from starting is reported, as Ray reports it)
            return StartFailed(worker, f"{type(err).__name__}: {err}"[:300])
        return WorkerStarted(worker)

    def _evaluate(self, worker: Worker, recipe_json: str, items: Any = None) -> PoolEvent:
        evaluator = self._evaluators[worker]
        start = time.perf_counter()
        try:  # the context names the worker and the candidate in the failpoints' hit log
            failpoints.hit("inprocess.evaluate", context=f"{worker.id}:{candidate_digest(recipe_json)}")
        except failpoints.FailpointError as err:
            del self._evaluators[worker]
            return WorkerLost(worker, f"worker lost: {err}", time.perf_counter() - start)
        try:
            with self._time_limit(), _quiet():
                result = evaluator.evaluate(recipe_json) if items is None else evaluator.evaluate(recipe_json, items)
        except _TimeLimit:
            del self._evaluators[worker]  # stopped halfway through a merge: thrown away, as a killed actor is
            assert self._timeout_s is not None
            return TimedOut(worker, self._timeout_s, time.perf_counter() - start)
        except Exception as err:  # noqa: BLE001  (sorted into pool events exactly as the Ray pool sorts them)
            wall_s = time.perf_counter() - start
            if is_out_of_memory(err):
                return OutOfMemory(worker, f"out of memory: {str(err)[:300]}", wall_s, worker_alive=True)
            return EvaluatorRaised(worker, f"evaluation raised {err!r}"[:2000], wall_s)
        return Finished(worker, result, time.perf_counter() - start)

    @contextlib.contextmanager
    def _time_limit(self) -> Iterator[None]:
        """Raise :class:`_TimeLimit` inside the block once ``timeout_s`` has passed."""
        if self._timeout_s is None or threading.current_thread() is not threading.main_thread():
            yield
            return
        armed = [True]

        def expire(_signum: int, _frame: object) -> None:
            if armed[0]:  # a timer that fired just as the block ended changes nothing
                raise _TimeLimit

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, self._timeout_s)
        try:
            yield
        finally:
            armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)

    def replace(self, worker: Worker) -> Worker:
        self._evaluators.pop(worker, None)
        self._queue = deque(job for job in self._queue if job[0] != worker)
        with contextlib.suppress(ValueError):
            self._starting.remove(worker)
        return self.start(1)[0]

    def shutdown(self) -> None:
        self._evaluators.clear()
        self._starting.clear()
        self._queue.clear()
