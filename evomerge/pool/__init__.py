"""Worker pools behind one protocol (see :mod:`evomerge.pool.base`): ``ray`` and ``inprocess``.

=============  ==================================================================================
``ray``        Ray actors on a local cluster the search starts, or on one joined by address
``inprocess``  the same evaluator in the search process, one candidate at a time: no Ray at all
=============  ==================================================================================
"""

from __future__ import annotations

from typing import Any

from ..errors import EvomergeError
from .base import (
    POOL_KINDS,
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

__all__ = [
    "POOL_KINDS",
    "EvaluatorRaised",
    "Finished",
    "OutOfMemory",
    "PoolEvent",
    "StartFailed",
    "TimedOut",
    "Worker",
    "WorkerLost",
    "WorkerPool",
    "WorkerStarted",
    "make_pool",
]


def make_pool(kind: str, spec: Any, workers: Any, *, ray_address: str | None = None) -> WorkerPool:
    """The pool ``kind`` for workers built from ``spec`` as the space file's ``workers:`` says.
    Nothing starts yet (:meth:`WorkerPool.open`, then :meth:`WorkerPool.start`)."""
    if kind == "ray":
        from .ray_pool import RayPool

        return RayPool(spec, workers, address=ray_address)
    if kind == "inprocess":
        if ray_address or workers.ray_address:
            raise EvomergeError(
                "the in-process pool runs no Ray, so a Ray address (--ray-address or workers.ray_address) means "
                "nothing to it; remove the address, or use --pool ray"
            )
        from .inprocess import InProcessPool

        return InProcessPool(spec, workers)
    raise EvomergeError(f"unknown worker pool {kind!r}; use one of {', '.join(POOL_KINDS)}")
