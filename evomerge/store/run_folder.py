"""The run folder: its files, their atomic writes, the run's identity, and its database URL.

``runs/<name>/`` holds

- ``space.yaml``: the config the run was started with (normalised by the caller), frozen;
- ``config_hash``: its hash, the run's identity: a different config under the same name is refused;
- ``run.json``: the study name and, when it is not the SQLite file beside it, the storage URL;
- ``trials.db``: the Optuna study (``RDBStorage`` over SQLite, WAL mode, so ``trials.db-wal`` and
  ``trials.db-shm`` sit beside it while the run is open) unless another URL was given;
- ``pareto.json``: a summary of the front and the trial counts (see :mod:`evomerge.store.front`).

Every file is written to a temporary name and ``os.replace``d; a run folder is built under a
temporary sibling name and renamed into place, so a crash or a refused config never leaves half a
run behind. A process killed inside a write leaves the old file whole and its temporary beside it,
which the next process to drive the run deletes (:func:`remove_stale_temp_files`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import optuna
import sqlalchemy

from evomerge import failpoints
from evomerge.errors import EvomergeError

SPACE_FILE = "space.yaml"
HASH_FILE = "config_hash"
RUN_FILE = "run.json"
DB_FILE = "trials.db"
PARETO_FILE = "pareto.json"


def current_umask() -> int:
    """This process's umask (read without changing it where Linux allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read, set back at once
    os.umask(mask)
    return mask


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; the file is the user's, as open() would make it
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        failpoints.hit(f"store.before_replace.{path.name}")  # a crash here leaves only the temp file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete temporary files a killed writer left in ``folder`` (see :func:`write_atomic`)."""
    stale = [p for p in folder.glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def write_run_files(folder: Path, study_name: str, config_yaml_text: str, config_hash: str,
                    storage_url: str | None) -> None:
    """The identity files of a new run: its config, the config's hash, and where its study lives."""
    write_atomic(folder / SPACE_FILE, config_yaml_text)
    write_atomic(folder / HASH_FILE, config_hash + "\n")
    # run.json keeps ${VAR} references as written and never a literal password
    write_atomic(folder / RUN_FILE, json.dumps({"study_name": study_name, "storage": redact_url(storage_url)},
                                               indent=2) + "\n")


def read_run_files(folder: Path) -> tuple[str, str | None, str]:
    """``(study name, recorded storage URL or None, config hash)`` of an existing run folder."""
    if not (folder / HASH_FILE).is_file() or not (folder / RUN_FILE).is_file():
        raise EvomergeError(
            f"{folder} is not an evomerge run folder (no {HASH_FILE} or {RUN_FILE}); give the folder "
            "`evomerge search` made, runs/<name>"
        )
    run = json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))
    config_hash = (folder / HASH_FILE).read_text(encoding="utf-8").strip()
    return run["study_name"], run.get("storage"), config_hash


def recorded_hash(folder: Path) -> str | None:
    """The config hash a run folder was created with; None when the folder is not a run."""
    if not (folder / HASH_FILE).is_file():
        return None
    return (folder / HASH_FILE).read_text(encoding="utf-8").strip()


def check_same_run(
    path: Path,
    config_yaml_text: str,
    config_hash: str,
    *,
    diff: Callable[[str, str], list[str]] | None = None,
    earlier_hashes: Collection[str] = (),
) -> bool:
    """Whether ``path`` holds this run (True) or does not exist yet (False); a folder that is not
    a run, or a run with a different config, is refused. Reads two files only, so a refused config
    touches nothing in the folder (``evomerge validate`` asks the same question).

    A different config raises :class:`ConfigError` naming every field that differs, as
    ``diff(old_text, new_text)`` lists them (the store does not know what a config means;
    :meth:`evomerge.space_config.SpaceConfig.diff` does), so the user can restore it or pick a new
    name; without ``diff`` it names the two hashes. ``earlier_hashes`` are the hashes earlier
    versions of evomerge recorded for the same config (see :func:`evomerge.model_refs.earlier_hash`).
    """
    from evomerge.errors import ConfigError

    if not path.exists():
        return False
    found_hash = recorded_hash(path)
    if found_hash is None:
        raise EvomergeError(f"{path} exists and is not an evomerge run folder; choose another run name")
    if found_hash != config_hash and found_hash not in earlier_hashes:
        old_text = (path / SPACE_FILE).read_text(encoding="utf-8")
        if diff is None:
            listing = f"config hash {found_hash[:12]}..., not {config_hash[:12]}..."
        else:
            listing = "; ".join(diff(old_text, config_yaml_text)) or "no field differs in the text, but the hashes do"
        raise ConfigError(
            f"run {path.name!r} already exists with a different config ({listing}). "
            f"Restore the original config to resume, or choose a new run name.",
            where=str(path / SPACE_FILE),
        )
    return True


# ---- the database -----------------------------------------------------------------------------


def sqlite_url(folder: Path) -> str:
    return f"sqlite:///{(folder / DB_FILE).resolve()}"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage; for a SQLite file, in WAL mode without an fsync per commit.

    A trial takes a dozen small commits; with SQLite's default (rollback journal, fsync on every
    commit) that is ~150 ms per trial on an ordinary disk, and most of a test run. WAL with
    ``synchronous=NORMAL`` stays atomic and survives a killed process (the crash a resume is for);
    only a power cut can lose the last commits, which a resume then sees as trials never started
    or still running, and re-runs.
    """
    url = expand_env(url)
    sqlite_file = url.startswith("sqlite:///") and ":memory:" not in url
    if sqlite_file:
        # journal_mode=WAL is a property of the database file: set it before Optuna builds tables.
        with contextlib.closing(sqlite3.connect(url[len("sqlite:///") :])) as con:
            con.execute("PRAGMA journal_mode=WAL")
    storage = _rdb_storage(url)
    if sqlite_file:
        sqlalchemy.event.listen(storage.engine, "connect", _sqlite_connection_pragmas)
        storage.engine.dispose()  # connections made while building tables lack the pragma
    return storage


def _rdb_storage(url: str, attempts: int = 3) -> optuna.storages.RDBStorage:
    """Optuna's storage; on a new shared database, two processes may create its tables at once and
    one of them lose the race (PostgreSQL: ``type "studydirection" already exists``). The loser
    tries again and finds the tables made."""
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _sqlite_connection_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


_ENV_REF = re.compile(r"\$\{(\w+)\}")


def expand_env(url: str) -> str:
    """``${VAR}`` in a storage URL replaced from the environment, only when connecting, so a
    password never sits in the space file or the run folder."""

    def value(m: re.Match[str]) -> str:
        if m[1] not in os.environ:
            raise EvomergeError(f"the storage URL {url} needs the environment variable {m[1]}; export it first")
        return quote(os.environ[m[1]], safe="")

    return _ENV_REF.sub(value, url)


def redact_url(url: str | None) -> str | None:
    """``url`` with a literal password replaced by ``***`` (``${VAR}`` references kept)."""
    if url is None:
        return None
    parts = urlsplit(url)
    try:
        password = parts.password
    except ValueError:
        return url
    if not password or _ENV_REF.fullmatch(password):
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{host}"))


def remove_stale_creations(root: str | os.PathLike[str]) -> list[Path]:
    """Delete the half-built run folders (``.<name>.creating-<pid>-*``) of processes that died
    (kill -9 while creating a run); a folder whose creator still runs on this host is left alone."""
    removed = []
    for folder in Path(root).glob(".*.creating-*"):
        pid = folder.name.rsplit(".creating-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
