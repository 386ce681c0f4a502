"""What the search loop needs from the workers, whatever runs them: the worker-pool seam.

The loop hands a candidate to an idle worker and waits for the next thing that happens: a result,
a worker lost, an out-of-memory, a timeout, a worker that started or failed to start. Every fault
arrives as one of these events, so the loop's rules (retry on another worker, replace a dead one,
fail the trial with its reason) are written once and hold for every pool.

Two pools implement it: :class:`~evomerge.pool.ray_pool.RayPool` (Ray actors, a local cluster or
one joined by address) and :class:`~evomerge.pool.inprocess.InProcessPool` (the same evaluator in
the search process, one candidate at a time: no Ray, for tests and single-machine runs).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..worker import EvalResult

POOL_KINDS = ("ray", "inprocess")


@dataclass(frozen=True)
class Worker:
    """A handle on one worker; opaque to the loop, which only compares handles and hands them back."""

    id: int = field(default_factory=itertools.count().__next__)

    def __str__(self) -> str:
        return f"worker {self.id}"


@dataclass(frozen=True)
class WorkerStarted:
    """A worker loaded its models and is ready for a candidate."""

    worker: Worker


@dataclass(frozen=True)
class StartFailed:
    """A worker could not start (its models could not be loaded, its process died first...)."""

    worker: Worker
    reason: str


@dataclass(frozen=True)
class Finished:
    """The worker evaluated its candidate (``result.error`` set: a candidate fault); it is idle again."""

    worker: Worker
    result: EvalResult
    wall_s: float


@dataclass(frozen=True)
class WorkerLost:
    """The worker died with the candidate (a killed process, a lost node); it must be replaced."""

    worker: Worker
    reason: str
    wall_s: float


@dataclass(frozen=True)
class OutOfMemory:
    """The candidate ran out of memory. ``worker_alive``: only an allocation failed, and the worker
    (which the next merge overwrites entirely) can take other candidates; else it died."""

    worker: Worker
    reason: str
    wall_s: float
    worker_alive: bool


@dataclass(frozen=True)
class TimedOut:
    """The candidate ran past the pool's ``timeout_s``; the worker is stuck and must be replaced."""

    worker: Worker
    timeout_s: float
    wall_s: float


@dataclass(frozen=True)
class EvaluatorRaised:
    """The evaluator raised an exception that is no candidate fault (a bug); the worker is idle again."""

    worker: Worker
    reason: str
    wall_s: float


PoolEvent = WorkerStarted | StartFailed | Finished | WorkerLost | OutOfMemory | TimedOut | EvaluatorRaised


class WorkerPool(Protocol):
    """Workers that evaluate candidates. Single-threaded: only the search loop calls it.

    Every worker that :meth:`start` or :meth:`replace` returns later produces exactly one
    :class:`WorkerStarted` or :class:`StartFailed`; every :meth:`submit` later produces exactly
    one of the evaluation events (unless the worker is replaced first, which drops its candidate).
    """

    kind: str

    def open(self) -> None:
        """Connect to what the workers run on, before the run folder exists: a bad address is
        refused (an EvomergeError naming the fix) with nothing written. Starts no worker."""
        ...

    def start(self, count: int) -> list[Worker]:
        """Start ``count`` workers; each reports :class:`WorkerStarted` or :class:`StartFailed`."""
        ...

    def describe(self) -> str:
        """What runs the workers, in words, once :meth:`start` returned ("Ray started: a local
        cluster of 2 CPUs"): the start-up line a person reads."""
        ...

    def submit(self, worker: Worker, recipe_json: str, items: Mapping[str, Sequence[int]] | None = None) -> None:
        """Give an idle, started worker one candidate (a :class:`~evomerge.recipe.Recipe` as JSON);
        ``items`` (task -> document ids): score only those, item by item (a rung; see :mod:`evomerge.rungs`)."""
        ...

    def wait(self, timeout_s: float | None = None) -> PoolEvent | None:
        """The next event, or None when none came within ``timeout_s`` (None: wait as long as it
        takes). The pool enforces the per-candidate time limit itself (:class:`TimedOut`), so the
        loop keeps no clock for it. A signal (Ctrl-C) interrupts the wait within a second."""
        ...

    def replace(self, worker: Worker) -> Worker:
        """Stop ``worker`` (dead, stuck or failed to start; a candidate it holds is dropped) and
        start one in its place, which reports like any started worker."""
        ...

    def shutdown(self) -> None:
        """Stop every worker, and whatever the pool started to run them; no process is left."""
        ...


def is_out_of_memory(err: BaseException) -> bool:
    """Whether an exception raised by an evaluation is an allocation failure, not the candidate's fault."""
    if isinstance(err, MemoryError):
        return True
    try:
        import torch

        if isinstance(err, torch.OutOfMemoryError):  # CUDA
            return True
    except (ImportError, AttributeError):
        pass
    # torch's CPU allocator raises a plain RuntimeError
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
