"""Workers as Ray actors: a local cluster the search starts (and stops), or one joined by address.

Each actor is a :class:`~evomerge.worker.CandidateEvaluator` with one CPU slot of concurrency, so
a candidate starts the moment it is submitted and its clock (``workers.timeout_s``) starts then.
Ray's exceptions become pool events here and nowhere else: a dead actor (``RayActorError``, a
crashed worker, a lost node) is :class:`WorkerLost`, Ray's memory monitor or an allocation error
inside the actor is :class:`OutOfMemory`, any other exception inside it is :class:`EvaluatorRaised`.

Stopping: every actor is killed, and a cluster this pool started is shut down and then every
process it left is killed by PID (a Ray worker runs in its own process group, so a signal to the
search's group does not reach it).
"""

from __future__ import annotations

import logging
import math
import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .. import failpoints
from ..errors import EvomergeError
from .. import interrupts
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

WAIT_SLICE_S = 0.5  # ray.wait blocks in C++; the loop wakes this often so that a signal is handled
STOP_GRACE_S = 5.0  # how long a stopped cluster's processes get to exit before they are killed


class RayPool:
    """Ray actors running :class:`~evomerge.worker.CandidateEvaluator`."""

    kind = "ray"

    def __init__(self, spec: Any, workers: Any, *, address: str | None = None) -> None:
        """``spec``: a :class:`~evomerge.worker.WorkerSpec`; ``workers``: the space file's ``workers:``."""
        self._spec = spec
        self._workers = workers
        self._address = address or workers.ray_address
        self._timeout_s: float | None = workers.timeout_s
        self._actors: dict[Worker, Any] = {}
        self._starting: dict[Any, Worker] = {}  # ping ref -> worker
        self._running: dict[Any, tuple[Worker, float]] = {}  # evaluate ref -> worker, start time
        self._ray_started_here = False  # whether this pool called ray.init (and must shut it down)
        self._local_cluster = False  # whether that started a cluster of our own (its processes are ours)
        self._children_before: set[int] = set()  # this process's children before the cluster started

    # ---- starting ---------------------------------------------------------------------------

    def open(self) -> None:
        if self._address:
            self.connect()  # join before the run folder exists: a bad address changes nothing

    def start(self, count: int) -> list[Worker]:
        from ..worker import start_workers

        self.connect()
        w = self._workers
        out = []
        for actor in start_workers(self._spec, count=count, cpus=w.cpus_per_worker, gpus=w.gpus_per_worker):
            worker = Worker()
            self._actors[worker] = actor
            self._starting[actor.ping.remote()] = worker
            out.append(worker)
        return out

    def describe(self) -> str:
        if not self._ray_started_here:
            return "Ray workers on the cluster this process had already joined"
        if self._address:
            return f"joined the Ray cluster at {self._address}"
        w = self._workers
        gpus = math.ceil(w.count * w.gpus_per_worker)
        cpus = max(1, math.ceil(w.count * w.cpus_per_worker))
        return (f"Ray started: a local cluster of {cpus} CPU{'s' if cpus != 1 else ''}"
                + (f" and {gpus} GPU{'s' if gpus != 1 else ''}" if gpus else ""))

    def connect(self) -> None:
        """Start a local cluster of our own, or join the address given (once per process)."""
        import ray

        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        w = self._workers
        check_reachable(self._address)
        runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
                                    "OMP_NUM_THREADS": str(max(1, int(w.cpus_per_worker)))}}
        for name in (failpoints.ENV, failpoints.DIR_ENV):  # a testing aid reaches the workers too
            if os.environ.get(name):
                runtime_env["env_vars"][name] = os.environ[name]
        quiet = {"log_to_driver": False, "logging_level": logging.ERROR, "runtime_env": runtime_env}
        self._ray_started_here = True  # set first: a signal inside ray.init still gets its processes stopped
        self._local_cluster = not self._address
        self._children_before = {p.pid for p in _children()}
        failpoints.hit("pool.ray_init")
        with _search_keeps_its_signal_handlers():
            if self._address:
                ray.init(address=self._address, **quiet)
            else:
                ray.init(
                    address="local",  # our own cluster, never one that `ray start` left running on this machine
                    num_cpus=max(1, math.ceil(w.count * w.cpus_per_worker)),
                    num_gpus=math.ceil(w.count * w.gpus_per_worker),
                    include_dashboard=False,
                    **quiet,
                )
        interrupts.check()

    # ---- running ----------------------------------------------------------------------------

    def submit(self, worker: Worker, recipe_json: str, items: Mapping[str, Sequence[int]] | None = None) -> None:
        items = {t: list(d) for t, d in items.items()} if items is not None else None
        self._running[self._actors[worker].evaluate.remote(recipe_json, items)] = (worker, time.perf_counter())

    def wait(self, timeout_s: float | None = None) -> PoolEvent | None:
        import ray

        end = None if timeout_s is None else time.perf_counter() + timeout_s
        while True:
            refs = [*self._running, *self._starting]
            if not refs:
                raise RuntimeError("wait() with no worker starting and no candidate out")
            now = time.perf_counter()
            slice_s = WAIT_SLICE_S
            if end is not None:
                slice_s = min(slice_s, end - now)
            oldest = min((started for _, started in self._running.values()), default=None)
            if self._timeout_s is not None and oldest is not None:
                slice_s = min(slice_s, oldest + self._timeout_s - now)
            interrupts.check()
            done, _ = ray.wait(refs, num_returns=1, timeout=max(0.0, slice_s))
            if done:
                return self._event(done[0])
            now = time.perf_counter()
            if self._timeout_s is not None:
                for ref, (worker, started) in list(self._running.items()):
                    if now - started >= self._timeout_s:
                        del self._running[ref]
                        return TimedOut(worker, self._timeout_s, now - started)
            if end is not None and now >= end:
                return None

    def _event(self, ref: Any) -> PoolEvent:
        import ray

        if ref in self._starting:
            worker = self._starting.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayError as err:
                return StartFailed(worker, _short(err))
            return WorkerStarted(worker)
        worker, started = self._running.pop(ref)
        try:
            result = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError,
                ray.exceptions.OutOfMemoryError) as err:
            wall_s = time.perf_counter() - started
            if isinstance(err, ray.exceptions.OutOfMemoryError) or is_out_of_memory(getattr(err, "cause", err)):
                return OutOfMemory(worker, "out of memory", wall_s, worker_alive=False)  # Ray's memory monitor killed it
            return WorkerLost(worker, f"worker lost: {type(err).__name__}", wall_s)
        except ray.exceptions.RayTaskError as err:
            wall_s = time.perf_counter() - started
            if is_out_of_memory(err.cause):
                return OutOfMemory(worker, f"out of memory: {str(err.cause)[:300]}", wall_s, worker_alive=True)
            # an exception inside the evaluator that is not a candidate fault: a bug, kept as data
            return EvaluatorRaised(worker, f"evaluation raised {err.cause!r}"[:2000], wall_s)
        return Finished(worker, result, time.perf_counter() - started)

    # ---- replacing and stopping -------------------------------------------------------------

    def replace(self, worker: Worker) -> Worker:
        self._forget(worker)
        return self.start(1)[0]

    def _forget(self, worker: Worker) -> None:
        """Kill the worker's actor and drop whatever it held."""
        import ray

        actor = self._actors.pop(worker)
        self._starting = {ref: w for ref, w in self._starting.items() if w != worker}
        self._running = {ref: run for ref, run in self._running.items() if run[0] != worker}
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001  (already gone)
            pass

    def shutdown(self) -> None:
        import psutil
        import ray

        for worker in list(self._actors):
            self._forget(worker)
        if not self._ray_started_here:
            return  # Ray belongs to whoever initialised it (a test, a notebook): leave it running
        self._ray_started_here = False
        ours = [p for p in _children() if p.pid not in self._children_before] if self._local_cluster else []
        ray.shutdown(wait_for_processes=False)
        _, alive = psutil.wait_procs(ours, timeout=STOP_GRACE_S)
        for proc in alive:  # what the cluster's own shutdown left: its workers, in their own process groups
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=STOP_GRACE_S)


@contextlib.contextmanager
def _search_keeps_its_signal_handlers() -> Iterator[None]:
    """``ray.init`` installs SIGTERM handlers of its own (``sys.exit``, from its init and from the
    local node's shutdown hook); a SystemExit raised there while Ray runs a ``__del__`` is lost,
    and with it the signal. For the call, Ray's installer does nothing, so the search's handler
    (see :mod:`evomerge.interrupts`) stays in place; handlers replaced any other way are put back."""
    import ray._private.utils as ray_utils

    original = getattr(ray_utils, "set_sigterm_handler", None)
    if original is not None:
        ray_utils.set_sigterm_handler = lambda handler: None
    try:
        with interrupts.keep_handlers():
            yield
    finally:
        if original is not None:
            ray_utils.set_sigterm_handler = original


def check_reachable(address: str | None) -> None:
    """Refuse an unreachable ``host:port`` in seconds (ray.init would retry for minutes)."""
    import socket

    if not address or address == "auto" or ("://" in address and not address.startswith("ray://")):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as err:
        raise EvomergeError(
            f"no Ray cluster answers at {address} (--ray-address or workers.ray_address): {err}. Check the "
            "address with `ray status` on the head node, or leave it out to start a local cluster"
        ) from None


def _short(err: BaseException) -> str:
    """The last line of a Ray error, the exception itself (they carry whole remote tracebacks)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:300]


def _children() -> list[Any]:
    import psutil

    return psutil.Process().children(recursive=True)
