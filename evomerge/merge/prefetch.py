"""Reading ahead on the streamed path: the next tensors' inputs prepared while one is merged.

A worker with mapped inputs reads every input tensor again for every candidate. Each read has a
part that is not the merge's arithmetic: pages of the file brought into the page cache (when the
kernel dropped them), a dtype conversion (a bfloat16 file merged in float32), and on a GPU the
copy from host to device. :class:`ReadAhead` does that part for the next tensor on a thread of
its own while the caller merges the current one, so the two overlap. On a GPU the copy runs
from pinned memory on a side stream, and the merge's stream waits for it by an event, not by a
synchronisation of the device.

Bounded: at most ``ahead`` tasks' inputs are prepared beyond the one being merged (the memory
plan counts ``1 + READ_AHEAD`` tasks' inputs in flight: :data:`READ_AHEAD`). The inputs are the
ones the caller's own ``load`` gives, with the same conversions in the same order, so a merge
with read-ahead is bit for bit the merge without it; only when the work happens changes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Sequence
from typing import Generic, TypeVar

Task = TypeVar("Task")
Loaded = TypeVar("Loaded")

#: Tasks whose inputs are prepared ahead of the one being merged (one already hides a tensor's
#: read behind the previous tensor's merge; more only holds more memory).
READ_AHEAD = 1
#: Below this size of a model's largest tensor a worker reads inline: handing a task to the
#: thread costs tens of microseconds, more than reading a small tensor's inputs (a toy model's
#: candidate took 8% longer read ahead), while a large tensor's page-in, conversion or copy to a
#: GPU takes milliseconds.
READ_AHEAD_MIN_BYTES = 1 << 20


class ReadAhead(Generic[Task, Loaded]):
    """Iterate ``(task, load(task))`` in order, ``load`` running up to ``ahead`` tasks ahead on a
    thread. A task's slot is freed when the caller asks for the next one, so the caller must be
    done with a task's inputs (or hold its own reference) by then. An exception from ``load`` is
    raised to the caller at that task; leaving the loop early stops the thread."""

    def __init__(self, tasks: Sequence[Task], load: Callable[[Task], Loaded], *, ahead: int = READ_AHEAD) -> None:
        self._tasks = tasks
        self._load = load
        self._slots = threading.Semaphore(ahead + 1)  # the task being merged and those ahead of it
        self._ready: list[threading.Event] = [threading.Event() for _ in tasks]
        self._results: list[tuple[Loaded | None, BaseException | None]] = [(None, None)] * len(tasks)
        self._stop = False
        self.max_in_flight = 0  # the most tasks loaded and not yet released (tests read it)
        self._in_flight = 0
        self._lock = threading.Lock()

    def _run(self) -> None:
        for i, task in enumerate(self._tasks):
            self._slots.acquire()
            if self._stop:
                return
            with self._lock:
                self._in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self._in_flight)
            try:
                self._results[i] = (self._load(task), None)
            except BaseException as err:  # noqa: BLE001  (handed to the caller, raised there)
                self._results[i] = (None, err)
                self._ready[i].set()
                return
            self._ready[i].set()

    def __iter__(self) -> Generator[tuple[Task, Loaded], None, None]:
        thread = threading.Thread(target=self._run, name="evomerge-read-ahead", daemon=True)
        thread.start()
        try:
            for i, task in enumerate(self._tasks):
                self._ready[i].wait()
                loaded, err = self._results[i]
                self._results[i] = (None, None)  # the caller's reference is the only one left
                if err is not None:
                    raise err
                yield task, loaded  # type: ignore[misc]
                with self._lock:
                    self._in_flight -= 1
                self._slots.release()
        finally:
            self._stop = True
            self._slots.release()  # wake the thread if it waits for a slot
            thread.join()
