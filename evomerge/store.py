"""The run store: one folder per run, and the Optuna study inside it is the trial log.

``runs/<name>/`` holds

- ``space.yaml``: the config the run was started with (normalised by the caller), frozen;
- ``config_hash``: its hash, the run's identity: a different config under the same name is refused;
- ``run.json``: the study name and, when it is not the SQLite file beside it, the storage URL;
- ``trials.db``: the Optuna study (``RDBStorage`` over SQLite, WAL mode, so ``trials.db-wal`` and
  ``trials.db-shm`` sit beside it while the run is open) unless another URL was given;
- ``pareto.json``: the current front and trial counts, rewritten after every finished trial.

The study is the single source of truth (DESIGN.md): each trial carries its named parameters with
their distributions, and user attributes ``objectives`` (every measured value by name),
``recipe`` (JSON), ``error``, ``fail_kind`` (``candidate`` or ``interrupted``), ``timings``, and
whatever else the caller adds (``worker``, ``generation``...). Constraints are stored as Optuna
constraints (``value - bound``, feasible when <= 0), so TPE, NSGA-II and GP honour them too.
Optuna's RDB storage keeps everything as JSON; nothing here pickles or unpickles.

Every file is written to a temporary name and ``os.replace``d; a run folder is built under a
temporary sibling name and renamed into place, so a crash or a refused config never leaves half a
run behind. A process killed inside a write leaves the old file whole and its temporary beside it,
which the next process to drive the run deletes (:meth:`RunStore.remove_stale_temp_files`).

Resume: a process that dies leaves its trials RUNNING, and Optuna's heartbeat does not cover
ask/tell. :meth:`RunStore.requeue_interrupted` (called once when a run is reopened, before any
driver is built) marks them FAIL with ``fail_kind = "interrupted"``; the drivers then hand their
parameters out again (see ``evomerge.drivers``). Interrupted trials never count towards the budget.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sqlite3
import tempfile
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

import optuna
import sqlalchemy
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from evomerge import failpoints
from evomerge.errors import ConfigError, EvomergeError
from evomerge.pareto import DIRECTIONS, pareto_front

SPACE_FILE = "space.yaml"
HASH_FILE = "config_hash"
RUN_FILE = "run.json"
DB_FILE = "trials.db"
PARETO_FILE = "pareto.json"

# User attribute keys the store owns; callers may pass any other JSON-able key in ``attrs``.
OBJECTIVES_ATTR = "objectives"
RECIPE_ATTR = "recipe"
ERROR_ATTR = "error"
FAIL_KIND_ATTR = "fail_kind"
TIMINGS_ATTR = "timings"
_RESERVED = {OBJECTIVES_ATTR, ERROR_ATTR, FAIL_KIND_ATTR}
_STUDY_ATTR = "evomerge"  # study user attr: objective names, directions and constraint bounds

INTERRUPTED_REASON = "interrupted: the process running this trial stopped before its result was recorded"

TrialStateName = Literal["waiting", "running", "complete", "failed"]
_STATE_NAMES: dict[TrialState, TrialStateName] = {
    TrialState.WAITING: "waiting",
    TrialState.RUNNING: "running",
    TrialState.COMPLETE: "complete",
    TrialState.FAIL: "failed",
    TrialState.PRUNED: "failed",  # evomerge never prunes; read defensively
}


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the log holds it (a snapshot: a fresh one is read after every change)."""

    number: int
    state: TrialStateName
    params: Mapping[str, float | int | str]
    objectives: Mapping[str, float] | None  # every measured value by name; None unless complete
    recipe_json: str | None
    error: str | None
    timings: Mapping[str, float]
    constraints: Mapping[str, float]  # value - bound per constraint name; > 0 means broken
    attrs: Mapping[str, Any] = field(default_factory=dict)  # every other user attribute
    interrupted: bool = False  # failed because its process died, not because of the candidate

    @property
    def violation(self) -> float:
        """Total amount by which constraints are broken (0 for a feasible trial)."""
        return sum(v for v in self.constraints.values() if v > 0)

    @property
    def finished(self) -> bool:
        """Whether the trial used up budget: complete, or failed for a reason of its own."""
        return self.state == "complete" or (self.state == "failed" and not self.interrupted)


@dataclass(frozen=True)
class TrialCounts:
    """How many trials are in each state; ``finished`` is what a trial budget counts."""

    waiting: int
    running: int
    complete: int
    failed: int  # failed for a candidate reason (merge error, NaN objective...)
    interrupted: int

    @property
    def finished(self) -> int:
        return self.complete + self.failed


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        failpoints.hit(f"store.before_replace.{path.name}")  # a crash here leaves only the temp file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def config_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths (``search.popsize``, ``objectives[1].weight``) where two configs differ.

    Used to tell the user exactly which fields stop a run from being resumed under its name.
    """
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{path} (added)")
            elif key not in new:
                out.append(f"{path} (removed)")
            else:
                out.extend(config_differences(old[key], new[key], path))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for i, (a, b) in enumerate(zip(old, new)):
            out.extend(config_differences(a, b, f"{prefix}[{i}]"))
        return out
    if old == new and type(old) is type(new):
        return []
    return [f"{prefix or '<whole config>'} (was {_short(old)}, now {_short(new)})"]


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_checked(key: str, value: Any) -> Any:
    # Optuna would store a non-JSON value as its repr or fail deep inside SQLAlchemy; say which key.
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"trial attribute {key!r} must be JSON-serialisable: {e}") from None
    return value


def _fit_to(name: str, value: Any, dist: BaseDistribution) -> Any:
    """Check a proposed value against its distribution; absorb float round-off at the bounds."""
    if isinstance(dist, CategoricalDistribution):
        if value not in dist.choices:
            raise ValueError(f"parameter {name!r}: {value!r} is not one of {dist.choices}")
        return value
    if isinstance(dist, (FloatDistribution, IntDistribution)):
        v = float(value)
        slack = 1e-9 * max(1.0, dist.high - dist.low)
        if not (dist.low - slack <= v <= dist.high + slack):
            raise ValueError(f"parameter {name!r}: {value!r} is outside [{dist.low}, {dist.high}]")
        v = min(max(v, dist.low), dist.high)
        return int(round(v)) if isinstance(dist, IntDistribution) else v
    raise TypeError(f"parameter {name!r}: unsupported distribution {type(dist).__name__}")


class RunStore:
    """A run folder and its trial log. Build it with :meth:`create`, :meth:`open` or :meth:`open_or_create`.

    One process drives a run at a time (the search loop); workers never touch the store. Trials
    are started and finished only by the process that started them: a trial this process did not
    start is either finished already or interrupted. Other processes may read the run (a report,
    optuna-dashboard) through their own store or Optuna directly.
    """

    def __init__(
        self,
        path: Path,
        storage: optuna.storages.RDBStorage,
        study_name: str,
        config_hash: str,
    ) -> None:
        self.path = path
        self.study_name = study_name
        self.config_hash = config_hash
        self._storage = storage
        # The store's own study only creates fixed trials, so its sampler never samples.
        self._study = optuna.load_study(
            study_name=study_name, storage=storage, sampler=optuna.samplers.RandomSampler(seed=0)
        )
        self._study_id = storage.get_study_id_from_name(study_name)
        spec = self._study.user_attrs.get(_STUDY_ATTR)
        if not spec:
            raise EvomergeError(f"{path}: study {study_name!r} was not created by evomerge (no objective list)")
        self.directions: dict[str, str] = {n: d for n, d in spec["objectives"]}
        self.constraints: dict[str, float] = dict(spec.get("constraints", {}))
        self._live: dict[int, optuna.Trial] = {}
        # Records of every trial, filled by one full read and then kept current by this store's
        # own writes: reading every trial back through SQLAlchemy after each trial cost more than
        # the trial itself in tests. Valid because one process writes a run (class docstring).
        self._records: dict[int, TrialRecord] | None = None

    # ---- creating and opening -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: str | os.PathLike[str],
        name: str,
        config_yaml_text: str,
        config_hash: str,
        *,
        directions: Mapping[str, str],
        constraints: Mapping[str, float] | None = None,
        storage_url: str | None = None,
    ) -> RunStore:
        """Create ``root/name`` with a fresh study; fails if the folder already exists.

        ``directions`` maps objective names, in order, to "maximize"/"minimize"; ``constraints``
        maps a measured value's name to its upper bound. ``storage_url`` (any SQLAlchemy URL)
        replaces the SQLite file in the folder, e.g. a PostgreSQL database shared by hosts.
        """
        if not name or "/" in name or name.startswith("."):
            raise ConfigError(f"run name {name!r} must be a plain folder name", where="run name")
        if not directions:
            raise ConfigError("a run needs at least one objective", where="objectives")
        for obj, d in directions.items():
            if d not in DIRECTIONS:
                raise ConfigError(f"direction must be 'maximize' or 'minimize', not {d!r}", where=f"objectives.{obj}")
        root = Path(root)
        final = root / name
        if final.exists():
            raise EvomergeError(f"{final} already exists; open it, or choose another run name")
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{name}.creating-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        remote_created = False
        try:
            write_atomic(tmp / SPACE_FILE, config_yaml_text)
            write_atomic(tmp / HASH_FILE, config_hash + "\n")
            # run.json keeps ${VAR} references as written and never a literal password
            write_atomic(tmp / RUN_FILE, json.dumps({"study_name": name, "storage": redact_url(storage_url)},
                                                    indent=2) + "\n")
            url = storage_url or _sqlite_url(tmp)
            storage = _open_storage(url)
            try:
                study = optuna.create_study(
                    study_name=name,
                    storage=storage,
                    directions=list(directions.values()),
                    load_if_exists=False,
                )
            except optuna.exceptions.DuplicatedStudyError:
                raise EvomergeError(
                    f"storage {redact_url(storage_url)} already holds a study named {name!r}; choose another run name"
                ) from None
            remote_created = storage_url is not None
            study.set_user_attr(
                _STUDY_ATTR,
                {"objectives": [[n, d] for n, d in directions.items()], "constraints": dict(constraints or {})},
            )
            with warnings.catch_warnings():  # experimental in Optuna; names the dashboard's axes
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(list(directions))
            storage.engine.dispose()  # no connection may outlive the rename of the SQLite file
            write_atomic(tmp / PARETO_FILE, _pareto_text(name, dict(directions), dict(constraints or {}), [], None))
            os.rename(tmp, final)  # atomic; fails rather than merge into a folder created meanwhile
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if remote_created:
                optuna.delete_study(study_name=name, storage=storage)
            raise
        return cls.open(final)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, storage_url: str | None = None) -> RunStore:
        """Open an existing run folder. ``storage_url`` overrides the URL recorded in run.json."""
        path = Path(path)
        if not (path / HASH_FILE).is_file() or not (path / RUN_FILE).is_file():
            raise EvomergeError(
                f"{path} is not an evomerge run folder (no {HASH_FILE} or {RUN_FILE}); give the folder "
                "`evomerge search` made, runs/<name>"
            )
        run = json.loads((path / RUN_FILE).read_text(encoding="utf-8"))
        url = storage_url or run.get("storage") or _sqlite_url(path)
        storage = _open_storage(url)
        config_hash = (path / HASH_FILE).read_text(encoding="utf-8").strip()
        return cls(path, storage, run["study_name"], config_hash)

    @classmethod
    def open_or_create(
        cls,
        root: str | os.PathLike[str],
        name: str,
        config_yaml_text: str,
        config_hash: str,
        *,
        directions: Mapping[str, str],
        constraints: Mapping[str, float] | None = None,
        storage_url: str | None = None,
        diff: Callable[[str, str], list[str]] | None = None,
    ) -> RunStore:
        """Resume ``root/name`` when its config is the same, create it when missing, else refuse.

        A different config under an existing name raises :class:`ConfigError` naming every field
        that differs (``diff(old_text, new_text)`` when given, else a key-by-key comparison of the
        two YAML documents), so the user can restore it or pick a new name.
        """
        from evomerge.run_lock import hold  # one writer per run: a second driver is refused

        path = Path(root) / name
        if not path.exists():
            return hold(path, lambda: cls.create(
                root, name, config_yaml_text, config_hash,
                directions=directions, constraints=constraints, storage_url=storage_url,
            ))
        # Compare before opening the database, so a refused config touches nothing in the folder.
        if not (path / HASH_FILE).is_file():
            raise EvomergeError(f"{path} exists and is not an evomerge run folder; choose another run name")
        if (path / HASH_FILE).read_text(encoding="utf-8").strip() != config_hash:
            old_text = (path / SPACE_FILE).read_text(encoding="utf-8")
            found = diff(old_text, config_yaml_text) if diff else config_differences(
                yaml.safe_load(old_text), yaml.safe_load(config_yaml_text)
            )
            listing = "; ".join(found) if found else "no field differs in the text, but the hashes do"
            raise ConfigError(
                f"run {name!r} already exists with a different config ({listing}). "
                f"Restore the original config to resume, or choose a new run name.",
                where=str(path / SPACE_FILE),
            )
        def opened() -> RunStore:
            store = cls.open(path, storage_url=storage_url)
            if store.directions != dict(directions) or store.constraints != dict(constraints or {}):
                store.close()
                raise ConfigError(
                    f"run {name!r} was created with objectives {store.directions} and constraints "
                    f"{store.constraints}, not {dict(directions)} and {dict(constraints or {})}",
                    where=str(path),
                )
            return store

        return hold(path, opened)

    def close(self) -> None:
        """Release database connections and the run, when held (the folder can then be moved or deleted)."""
        if getattr(self, "_writer_lock", None) is not None:
            self._writer_lock.release()
            self._writer_lock = None
        self._storage.engine.dispose()

    # ---- starting trials ------------------------------------------------------------------

    def study_for(self, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
        """A view of this run's study that proposes with ``sampler`` (for the Optuna drivers)."""
        return optuna.load_study(study_name=self.study_name, storage=self._storage, sampler=sampler)

    def start_trial(
        self,
        values: Mapping[str, Any],
        distributions: Mapping[str, BaseDistribution],
        attrs: Mapping[str, Any] | None = None,
        *,
        study: optuna.Study | None = None,
    ) -> int:
        """Record a RUNNING trial with the given parameter values; returns its number.

        Without ``study`` (CMA proposals) the trial is inserted whole, parameters and attributes in
        one transaction: a crash leaves it complete or absent. With an Optuna driver's ``study``
        (re-running an interrupted trial) it goes through Optuna's path for fixed parameters,
        ``enqueue_trial`` then ``ask``, so that sampler's bookkeeping (NSGA-II generations) sees it.
        """
        if set(values) != set(distributions):
            raise ValueError(
                f"values and distributions name different parameters: {sorted(set(values) ^ set(distributions))}"
            )
        fixed = {n: _fit_to(n, values[n], d) for n, d in distributions.items()}
        user_attrs = {k: _json_checked(k, v) for k, v in (attrs or {}).items()}
        if study is None:
            template = optuna.trial.create_trial(
                state=TrialState.RUNNING, params=fixed, distributions=dict(distributions), user_attrs=user_attrs
            )
            trial_id = self._storage.create_new_trial(self._study_id, template_trial=template)
            trial = optuna.Trial(self._study, trial_id)  # the handle study.ask would have returned
        else:
            study.enqueue_trial(fixed, user_attrs=user_attrs)
            trial = study.ask(dict(distributions))
            if trial.params != fixed:
                # Another enqueued trial was popped first: the log is being written by someone else.
                raise RuntimeError(f"trial {trial.number} got params {trial.params}, expected {fixed}")
        self._live[trial.number] = trial
        self.trial(trial.number)
        return trial.number

    def ask_trial(
        self,
        study: optuna.Study,
        distributions: Mapping[str, BaseDistribution],
        attrs: Mapping[str, Any] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Let ``study``'s sampler propose a RUNNING trial; returns its number and params."""
        trial = study.ask(dict(distributions))
        for k, v in (attrs or {}).items():
            trial.set_user_attr(k, _json_checked(k, v))
        self._live[trial.number] = trial
        self.trial(trial.number)
        return trial.number, dict(trial.params)

    def annotate(self, number: int, attrs: Mapping[str, Any]) -> None:
        """Add user attributes (recipe JSON, worker id...) to a trial that is still running."""
        trial = self._live_trial(number)
        for k, v in attrs.items():
            if k in _RESERVED:
                raise ValueError(f"{k!r} is written by the store itself")
            trial.set_user_attr(k, _json_checked(k, v))
        if attrs:
            self.trial(number)

    # ---- finishing trials -----------------------------------------------------------------

    def complete_trial(
        self, number: int, measured: Mapping[str, float], attrs: Mapping[str, Any] | None = None
    ) -> TrialRecord:
        """Record a trial's measured values; returns the record as stored.

        Every objective must be present and finite, and so must every constrained value. When one
        is not, the trial is recorded as FAIL with the reason (errors are data; the run goes on),
        and the returned record says so.
        """
        measured = {k: float(v) for k, v in measured.items()}
        problems = [
            f"{n!r} is {'missing' if n not in measured else measured[n]}"
            for n in [*self.directions, *self.constraints]
            if n not in measured or not math.isfinite(measured[n])
        ]
        if problems:
            reason = "evaluation gave no usable value: " + ", ".join(dict.fromkeys(problems))
            return self.fail_trial(number, reason, {**(attrs or {}), "measured": {k: repr(v) for k, v in measured.items()}})
        trial = self._live_trial(number)
        self.annotate(number, attrs or {})
        trial.set_user_attr(OBJECTIVES_ATTR, measured)
        for name, bound in self.constraints.items():
            trial.set_constraint(name, measured[name] - bound)
        trial.study.tell(trial, [measured[n] for n in self.directions])
        return self._finished(number)

    def fail_trial(self, number: int, reason: str, attrs: Mapping[str, Any] | None = None) -> TrialRecord:
        """Record a candidate that could not be merged or evaluated, with the reason why."""
        trial = self._live_trial(number)
        self.annotate(number, attrs or {})
        trial.set_user_attr(ERROR_ATTR, str(reason))
        trial.set_user_attr(FAIL_KIND_ATTR, "candidate")
        trial.study.tell(trial, state=TrialState.FAIL)
        return self._finished(number)

    def _finished(self, number: int) -> TrialRecord:
        del self._live[number]
        record = self.trial(number)  # refreshes the cached record before the front is recomputed
        self.write_pareto()
        return record

    def _live_trial(self, number: int) -> optuna.Trial:
        try:
            return self._live[number]
        except KeyError:
            raise ValueError(
                f"trial {number} was not started by this process or is finished already "
                f"(trials left running by a previous process are requeued, not completed)"
            ) from None

    # ---- resume ---------------------------------------------------------------------------

    def requeue_interrupted(self) -> list[TrialRecord]:
        """Mark trials left RUNNING (or WAITING) by a dead process as interrupted; return them.

        Call once when a run is reopened, before building a driver and before any worker starts.
        They become FAIL with ``fail_kind = "interrupted"`` (not counted as finished); the drivers
        re-issue their parameters as new trials (``rerun_of`` names the original for Optuna
        drivers; CMA re-issues the same generation member). Trials this process started are left
        alone.
        """
        out = []
        for ft in self._storage.get_all_trials(self._study_id, deepcopy=False):
            if ft.state not in (TrialState.RUNNING, TrialState.WAITING) or ft.number in self._live:
                continue
            trial_id = self._storage.get_trial_id_from_study_id_trial_number(self._study_id, ft.number)
            if ft.state == TrialState.WAITING and not self._storage.set_trial_state_values(
                trial_id, TrialState.RUNNING
            ):
                continue  # someone else took it
            self._storage.set_trial_user_attr(trial_id, ERROR_ATTR, INTERRUPTED_REASON)
            self._storage.set_trial_user_attr(trial_id, FAIL_KIND_ATTR, "interrupted")
            self._study.tell(ft.number, state=TrialState.FAIL)
            out.append(self.trial(ft.number))
        if out:
            self.write_pareto()
        return out

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete temporary files a killed writer left in the run folder (see :func:`write_atomic`).

        Only the process that drives the run may call this (after reopening it): a reader would
        delete the live writer's file under it.
        """
        stale = [p for p in self.path.glob(".*.tmp") if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    # ---- reading --------------------------------------------------------------------------

    def trials(self) -> list[TrialRecord]:
        """Every trial in number order."""
        if self._records is None:
            self.refresh()
        assert self._records is not None
        return [self._records[n] for n in sorted(self._records)]

    def trial(self, number: int) -> TrialRecord:
        """Trial ``number`` read from the database now."""
        trial_id = self._storage.get_trial_id_from_study_id_trial_number(self._study_id, number)
        record = self._record(self._storage.get_trial(trial_id))
        if self._records is not None:
            self._records[number] = record
        return record

    def refresh(self) -> None:
        """Re-read every trial from the database (after someone else wrote to it)."""
        self._records = {
            ft.number: self._record(ft) for ft in self._storage.get_all_trials(self._study_id, deepcopy=False)
        }

    def running_trials(self) -> list[TrialRecord]:
        return [t for t in self.trials() if t.state == "running"]

    def counts(self) -> TrialCounts:
        """Trial counts; ``counts().finished`` is the budget used so far, across every part of the run."""
        return count_trials(self.trials())

    def pareto(self, records: list[TrialRecord] | None = None) -> list[TrialRecord]:
        """The current Pareto front (feasible trials first; see :mod:`evomerge.pareto`)."""
        return pareto_front(self.trials() if records is None else records, self.directions)

    def write_pareto(self) -> None:
        """Rewrite pareto.json from the log (atomically)."""
        records = self.trials()
        text = _pareto_text(self.study_name, self.directions, self.constraints, self.pareto(records), records)
        write_atomic(self.path / PARETO_FILE, text)

    @staticmethod
    def _record(ft: optuna.trial.FrozenTrial) -> TrialRecord:
        ua = dict(ft.user_attrs)
        complete = ft.state == TrialState.COMPLETE
        objectives = ua.pop(OBJECTIVES_ATTR, None)
        error = ua.pop(ERROR_ATTR, None)
        kind = ua.pop(FAIL_KIND_ATTR, None)
        return TrialRecord(
            number=ft.number,
            state=_STATE_NAMES[ft.state],
            params=dict(ft.params),
            objectives=dict(objectives) if complete and objectives is not None else None,
            recipe_json=ua.pop(RECIPE_ATTR, None),
            error=error,
            timings=dict(ua.pop(TIMINGS_ATTR, None) or {}),
            constraints=dict(ft.constraints) if complete else {},
            attrs=ua,
            interrupted=kind == "interrupted",
        )


def count_trials(records: list[TrialRecord]) -> TrialCounts:
    return TrialCounts(
        waiting=sum(t.state == "waiting" for t in records),
        running=sum(t.state == "running" for t in records),
        complete=sum(t.state == "complete" for t in records),
        failed=sum(t.state == "failed" and not t.interrupted for t in records),
        interrupted=sum(t.interrupted for t in records),
    )


def _open_storage(url: str) -> optuna.storages.RDBStorage:
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


def _sqlite_connection_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_url(folder: Path) -> str:
    return f"sqlite:///{(folder / DB_FILE).resolve()}"


def _pareto_text(
    name: str,
    directions: Mapping[str, str],
    constraints: Mapping[str, float],
    front: list[TrialRecord],
    records: list[TrialRecord] | None,
) -> str:
    counts = count_trials(records or [])
    doc = {
        "run": name,
        "objectives": dict(directions),
        "constraints": dict(constraints),
        "counts": {**asdict(counts), "finished": counts.finished},
        "front": [
            {
                "number": t.number,
                "objectives": dict(t.objectives or {}),
                "violation": t.violation,
                "params": dict(t.params),
                "recipe": json.loads(t.recipe_json) if t.recipe_json else None,
            }
            for t in sorted(front, key=lambda t: t.number)
        ],
    }
    return json.dumps(doc, indent=2) + "\n"
