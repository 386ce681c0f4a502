"""One writer per run: a search holds its run until it stops, and a second one is refused.

Two ``evomerge search`` processes on one run would both ask, evaluate and record: every candidate
twice, a budget spent twice, a front that disagrees with the log. So the process that drives a
run holds it:

- **the folder** (every run): ``runs/<name>/writer.lock`` holds who (host, pid, when) and an OS
  lock (``fcntl.flock``) on that file. The OS drops the lock when the process dies, however it
  dies (``kill -9`` too), so a dead holder never blocks a resume, and the text is only there to
  name a live holder.
- **the study** (a storage URL shared by hosts, e.g. PostgreSQL): a row in the table
  ``evomerge_run_lease`` of that database, keyed by study name, that the holder renews every
  ``HEARTBEAT_S`` seconds from a background thread. A row whose heartbeat is older than
  ``STALE_S`` (its host was lost), or whose holder is a process of this host that no longer
  exists (killed), is taken over; the take-over is a compare-and-set on the row's token, so two
  processes racing for a stale lease cannot both win. Hosts' clocks must agree to well within
  ``STALE_S`` (NTP does that).

A refused process exits 2 naming the holder. Readers (``show``, ``export``, the dashboard) take
no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import EvomergeError

LOCK_FILE = "writer.lock"
LEASE_TABLE = "evomerge_run_lease"
HEARTBEAT_ENV = "EVOMERGE_LEASE_HEARTBEAT_S"
STALE_ENV = "EVOMERGE_LEASE_STALE_S"


def _seconds_from_env(name: str, default: float) -> float:
    """A positive number of seconds from the environment, else ``default``: the reliability tests
    shorten the lease so that a takeover takes a second, not half a minute."""
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


#: How often the holder renews its lease (``EVOMERGE_LEASE_HEARTBEAT_S``, default 5).
HEARTBEAT_S = _seconds_from_env(HEARTBEAT_ENV, 5.0)
#: A lease not renewed for this long belongs to a lost host (``EVOMERGE_LEASE_STALE_S``, default
#: 30). Six missed heartbeats: a busy database or a paused VM does not lose a live run its lease.
STALE_S = _seconds_from_env(STALE_ENV, 30.0)


class RunHeldError(EvomergeError):
    """Another live process drives this run."""


@dataclass(frozen=True)
class Holder:
    """Who holds a run; ``proc_started`` (the process's start time) tells a reused pid apart."""

    host: str
    pid: int
    since: str
    proc_started: float

    @classmethod
    def me(cls) -> Holder:
        import psutil

        return cls(socket.gethostname(), os.getpid(), datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   psutil.Process().create_time())

    @classmethod
    def from_text(cls, text: str) -> Holder | None:
        try:
            data = json.loads(text)
            return cls(str(data["host"]), int(data["pid"]), str(data["since"]), float(data.get("proc_started", 0)))
        except (ValueError, KeyError, TypeError):
            return None

    def to_text(self) -> str:
        return json.dumps(asdict(self)) + "\n"

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} since {self.since}"

    def gone(self) -> bool:
        """Whether this holder is a process of this host that no longer exists (killed, crashed)."""
        import psutil

        if self.host != socket.gethostname():
            return False
        try:
            return abs(psutil.Process(self.pid).create_time() - self.proc_started) > 1.0  # pid reused
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return False


def _refusal(what: str, holder: Holder | None) -> RunHeldError:
    who = holder.describe() if holder else "another process"
    stop = f" (`kill {holder.pid}` on {holder.host})" if holder else ""
    return RunHeldError(
        f"{what} is being searched by {who}; one process drives a run at a time. Wait for it to finish, "
        f"or stop it{stop} and run the command again to resume"
    )


class RunLock:
    """The hold one process has on a run; :meth:`release` (or process exit) gives it back."""

    def __init__(self, folder: Path, file: Any, lease: _Lease | None, holder: Holder) -> None:
        self.folder = folder
        self._file = file
        self._lease = lease
        self.holder = holder

    @property
    def lost(self) -> bool:
        """Whether another process took the lease over (this one stalled past ``STALE_S``)."""
        return self._lease is not None and self._lease.lost.is_set()

    def take_lease(self, storage_url: Any, study_name: str) -> None:
        """Also hold the study in a database other hosts share (see the module docstring)."""
        if self._lease is None:
            self._lease = _Lease.take(storage_url, study_name, self.holder)

    def release(self) -> None:
        if self._lease is not None:
            self._lease.release()
            self._lease = None
        if self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._file, fcntl.LOCK_UN)  # the text stays: the last holder, named only while locked
            self._file.close()
            self._file = None


def acquire(folder: Path, *, storage_url: Any = None, study_name: str | None = None) -> RunLock:
    """Hold the run in ``folder`` (and, for shared storage, its study), or raise RunHeldError.

    ``storage_url`` (a SQLAlchemy URL, password included) is given when the study lives outside
    the folder, where other hosts may drive it too.
    """
    folder = Path(folder)
    path = folder / LOCK_FILE
    try:
        file = open(path, "a+", encoding="utf-8")  # noqa: SIM115  (held until release)
    except OSError as err:
        raise EvomergeError(
            f"cannot write in the run folder {folder} ({err.strerror}); a search records every trial there: "
            "make it writable (check its owner and mode, and that its disk is not mounted read-only)"
        ) from None
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = Holder.from_text(file.read())
        file.close()
        raise _refusal(str(folder), holder) from None
    me = Holder.me()
    try:
        file.seek(0)
        file.truncate(0)
        file.write(me.to_text())
        file.flush()
    except OSError as err:
        file.close()
        raise EvomergeError(f"cannot write {path}: {err.strerror}; free space or make the run folder writable") from None
    lease = None
    if storage_url is not None and study_name is not None:
        try:
            lease = _Lease.take(storage_url, study_name, me)
        except BaseException:
            fcntl.flock(file, fcntl.LOCK_UN)
            file.close()
            raise
    return RunLock(folder, file, lease, me)


class _Lease:
    """The row in the shared database that says which process drives a study, kept alive by a thread."""

    def __init__(self, engine: Any, table: Any, study_name: str, token: str) -> None:
        self._engine = engine
        self._table = table
        self._study = study_name
        self._token = token
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="evomerge-lease", daemon=True)
        self._thread.start()

    @classmethod
    def take(cls, url: Any, study_name: str, me: Holder) -> _Lease:
        import sqlalchemy as sa

        engine = sa.create_engine(url, pool_pre_ping=True)
        table = sa.Table(
            LEASE_TABLE, sa.MetaData(),
            sa.Column("study_name", sa.String(512), primary_key=True),
            sa.Column("token", sa.String(64), nullable=False),
            sa.Column("holder", sa.Text, nullable=False),
            sa.Column("heartbeat", sa.Float, nullable=False),
        )
        token = uuid.uuid4().hex
        try:
            for attempt in range(3):
                try:
                    table.metadata.create_all(engine, checkfirst=True)
                    if cls._try_take(engine, table, study_name, token, me):
                        return cls(engine, table, study_name, token)
                except sa.exc.IntegrityError:  # another process inserted first, or created the table
                    if attempt == 2:
                        raise
                except sa.exc.ProgrammingError:  # CREATE TABLE raced with another process's
                    if attempt == 2:
                        raise
        except BaseException:
            engine.dispose()
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _try_take(engine: Any, table: Any, study: str, token: str, me: Holder) -> bool:
        import sqlalchemy as sa

        now = time.time()
        values = {"token": token, "holder": me.to_text(), "heartbeat": now}
        with engine.begin() as con:
            row = con.execute(sa.select(table).where(table.c.study_name == study)).first()
            if row is None:
                con.execute(sa.insert(table).values(study_name=study, **values))
                return True
            holder = Holder.from_text(row.holder)
            stale = now - row.heartbeat > STALE_S or holder is None or holder.gone()
            if not stale:
                raise _refusal(f"study {study!r}", holder)
            taken = con.execute(sa.update(table).where(table.c.study_name == study, table.c.token == row.token)
                                .values(**values))
            if taken.rowcount != 1:
                raise _refusal(f"study {study!r}", None)  # someone took the stale lease first
            return True

    def _beat(self) -> None:
        import sqlalchemy as sa

        t = self._table
        while not self._stop.wait(HEARTBEAT_S):
            try:
                with self._engine.begin() as con:
                    kept = con.execute(sa.update(t).where(t.c.study_name == self._study, t.c.token == self._token)
                                       .values(heartbeat=time.time())).rowcount
            except Exception:  # noqa: BLE001  (the database is briefly away: try again next beat)
                continue
            if kept != 1:
                self.lost.set()
                print(f"warning: another process took over the lease on study {self._study!r}; this process "
                      "stalled for longer than the lease lasts and no longer holds the run", file=sys.stderr)
                return

    def release(self) -> None:
        import sqlalchemy as sa

        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_S)
        t = self._table
        with contextlib.suppress(Exception):  # an unreachable database: the lease goes stale instead
            with self._engine.begin() as con:
                con.execute(sa.delete(t).where(t.c.study_name == self._study, t.c.token == self._token))
        self._engine.dispose()


def hold(folder: Path, open_store: Callable[[], Any]) -> Any:
    """The store ``open_store()`` opens (or creates) at ``folder``, held by this process; its
    ``close`` releases it. An existing folder is locked before its database is opened, so a
    refused process touches nothing; a new one is locked as soon as it exists."""
    lock = acquire(folder) if Path(folder).is_dir() else None
    try:
        store = open_store()
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    try:
        if lock is None:
            lock = acquire(folder)
        from .store import DB_FILE

        url = store._storage.engine.url
        local = url.get_backend_name() == "sqlite" and bool(url.database) and \
            Path(url.database).resolve() == (Path(store.path) / DB_FILE).resolve()
        if not local:
            lock.take_lease(url, store.study_name)
    except BaseException:
        if lock is not None:
            lock.release()
        store.close()
        raise
    store._writer_lock = lock
    return store
