"""The run store: a run folder, its trial log and its front, behind one object.

:class:`RunStore` is what the search loop, the drivers, ``evomerge show`` and ``export`` hold.
It composes three parts, each in its own module:

- :mod:`evomerge.store.run_folder`: creating and opening the folder, its files, atomic writes, the
  run's identity (the config hash) and its database URL;
- :mod:`evomerge.store.trial_log`: the Optuna study as records: starting, annotating, completing,
  failing and requeueing trials, reading them and counting them;
- :mod:`evomerge.store.front`: the Pareto front kept as trials finish, and ``pareto.json``.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution

from evomerge import failpoints
from evomerge.errors import ConfigError, EvomergeError
from evomerge.objectives import DIRECTIONS
from evomerge.pareto import pareto_front
from evomerge.rungs import full_fidelity
from evomerge.store.front import DEFAULT_INTERVAL_S, RunFront, Spent, pareto_text
from evomerge.store.run_folder import (
    PARETO_FILE,
    check_same_run,
    open_storage,
    read_run_files,
    redact_url,
    remove_stale_creations,
    remove_stale_temp_files,
    sqlite_url,
    write_atomic,
    write_run_files,
)
from evomerge.store.trial_log import STUDY_ATTR, TrialCounts, TrialLog, TrialRecord


class RunStore:
    """A run folder, its trial log and its front. Build it with :meth:`create`, :meth:`open` or
    :meth:`open_or_create`.

    One process drives a run at a time (the search loop); workers never touch the store. Trials
    are started and finished only by the process that started them: a trial this process did not
    start is either finished already or interrupted. Other processes may read the run (a report,
    optuna-dashboard) through their own store or Optuna directly. ``pareto_interval_s`` is the
    least time between two rewrites of pareto.json while trials finish (see
    :mod:`evomerge.store.front`); it is always rewritten on :meth:`close`.
    """

    def __init__(
        self,
        path: Path,
        storage: optuna.storages.RDBStorage,
        study_name: str,
        config_hash: str,
        *,
        pareto_interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        self.path = path
        self.study_name = study_name
        self.config_hash = config_hash
        self._storage = storage
        self._log = TrialLog(storage, study_name, str(path))
        self.directions: dict[str, str] = self._log.directions
        self.constraints: dict[str, float] = self._log.constraints
        self._front = RunFront(path, study_name, self.directions, self.constraints, pareto_interval_s)

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
        pareto_interval_s: float = DEFAULT_INTERVAL_S,
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
        tmp = root / f".{name}.creating-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # the pid: see remove_stale_creations
        tmp.mkdir()
        remote_created = False
        try:
            write_run_files(tmp, name, config_yaml_text, config_hash, storage_url)
            url = storage_url or sqlite_url(tmp)
            storage = open_storage(url)
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
                STUDY_ATTR,
                {"objectives": [[n, d] for n, d in directions.items()], "constraints": dict(constraints or {})},
            )
            with warnings.catch_warnings():  # experimental in Optuna; names the dashboard's axes
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(list(directions))
            storage.engine.dispose()  # no connection may outlive the rename of the SQLite file
            write_atomic(tmp / PARETO_FILE, pareto_text(name, dict(directions), dict(constraints or {}), [],
                                                        TrialCounts(0, 0, 0, 0, 0)))
            failpoints.hit("store.before_create_rename")  # another process may create the run meanwhile
            try:
                os.rename(tmp, final)  # atomic; fails rather than merge into a folder created meanwhile
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                raise EvomergeError(
                    f"{final} was created by another process while this one was creating it; "
                    f"resume it with `evomerge resume {final}`, or choose another run name"
                ) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if remote_created:
                optuna.delete_study(study_name=name, storage=storage)
            raise
        return cls.open(final, pareto_interval_s=pareto_interval_s)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        storage_url: str | None = None,
        pareto_interval_s: float = DEFAULT_INTERVAL_S,
    ) -> RunStore:
        """Open an existing run folder. ``storage_url`` overrides the URL recorded in run.json."""
        path = Path(path)
        study_name, recorded_url, config_hash = read_run_files(path)
        storage = open_storage(storage_url or recorded_url or sqlite_url(path))
        return cls(path, storage, study_name, config_hash, pareto_interval_s=pareto_interval_s)

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
        earlier_hashes: Collection[str] = (),
        pareto_interval_s: float = DEFAULT_INTERVAL_S,
    ) -> RunStore:
        """Resume ``root/name`` when its config is the same, create it when missing, else refuse
        (see :func:`~evomerge.store.run_folder.check_same_run`, which ``evomerge validate`` asks too).
        """
        from evomerge.run_lock import hold  # one writer per run: a second driver is refused

        path = Path(root) / name
        remove_stale_creations(root)
        if not check_same_run(path, config_yaml_text, config_hash, diff=diff, earlier_hashes=earlier_hashes):
            return hold(path, lambda: cls.create(
                root, name, config_yaml_text, config_hash,
                directions=directions, constraints=constraints, storage_url=storage_url,
                pareto_interval_s=pareto_interval_s,
            ))

        def opened() -> RunStore:
            store = cls.open(path, storage_url=storage_url, pareto_interval_s=pareto_interval_s)
            if store.directions != dict(directions) or store.constraints != dict(constraints or {}):
                store.close()
                raise ConfigError(
                    f"run {name!r} was created with objectives {store.directions} and constraints "
                    f"{store.constraints}, not {dict(directions)} and {dict(constraints or {})}",
                    where=str(path),
                )
            return store

        return hold(path, opened)

    @property
    def lost_hold(self) -> bool:
        """Whether another process took this run over (this one stalled past its lease on a shared
        database): from then on this process must write nothing more (see :mod:`evomerge.run_lock`)."""
        lock = getattr(self, "_writer_lock", None)
        return lock is not None and lock.lost

    def close(self) -> None:
        """Bring pareto.json up to date, release database connections and the run, when held (the
        folder can then be moved or deleted)."""
        try:
            if self._front.stale:
                self.write_pareto()
        finally:
            if getattr(self, "_writer_lock", None) is not None:
                self._writer_lock.release()
                self._writer_lock = None
            self._storage.engine.dispose()

    # ---- trials ---------------------------------------------------------------------------

    def study_for(self, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
        """A view of this run's study that proposes with ``sampler`` (for the Optuna drivers)."""
        return self._log.study_for(sampler)

    def start_trial(
        self,
        values: Mapping[str, Any],
        distributions: Mapping[str, BaseDistribution],
        attrs: Mapping[str, Any] | None = None,
        *,
        study: optuna.Study | None = None,
    ) -> int:
        """Record a RUNNING trial with the given values; see :meth:`TrialLog.start_trial`."""
        return self._log.start_trial(values, distributions, attrs, study=study)

    def ask_trial(
        self,
        study: optuna.Study,
        distributions: Mapping[str, BaseDistribution],
        attrs: Mapping[str, Any] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Let ``study``'s sampler propose a RUNNING trial; returns its number and params."""
        return self._log.ask_trial(study, distributions, attrs)

    def annotate(self, number: int, attrs: Mapping[str, Any]) -> None:
        """Add user attributes (recipe JSON, worker id...) to a trial that is still running."""
        self._log.annotate(number, attrs)

    def report_rung(self, number: int, step: int, value: float, pruner: optuna.pruners.BasePruner) -> bool:
        """A rung's value as an intermediate value of the study, and ``pruner``'s verdict (True:
        stop); see :meth:`TrialLog.report_rung` and :mod:`evomerge.rungs`."""
        return self._log.report_rung(number, step, value, pruner)

    def complete_trial(
        self, number: int, measured: Mapping[str, float], attrs: Mapping[str, Any] | None = None
    ) -> TrialRecord:
        """Record a trial's measured values; see :meth:`TrialLog.complete_trial` (a missing or
        non-finite value makes it a failed trial, with the reason)."""
        return self._finished(self._log.complete_trial(number, measured, attrs))

    def fail_trial(self, number: int, reason: str, attrs: Mapping[str, Any] | None = None) -> TrialRecord:
        """Record a candidate that could not be merged or evaluated, with the reason why."""
        return self._finished(self._log.fail_trial(number, reason, attrs))

    def _finished(self, record: TrialRecord) -> TrialRecord:
        self._front.add(record)
        if self._front.due():
            self.write_pareto()
        return record

    def requeue_interrupted(self) -> list[TrialRecord]:
        """Mark trials a dead process left RUNNING as interrupted; see :meth:`TrialLog.requeue_interrupted`."""
        out = self._log.requeue_interrupted()
        if out:
            self.write_pareto()
        return out

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete temporary files a killed writer left in the run folder (see :func:`write_atomic`).

        Only the process that drives the run may call this (after reopening it): a reader would
        delete the live writer's file under it.
        """
        return remove_stale_temp_files(self.path)

    # ---- reading --------------------------------------------------------------------------

    def trials(self) -> list[TrialRecord]:
        """Every trial in number order."""
        return self._log.trials()

    def trial(self, number: int) -> TrialRecord:
        """Trial ``number`` read from the database now."""
        return self._log.trial(number)

    def refresh(self) -> None:
        """Re-read every trial from the database (after someone else wrote to it)."""
        self._log.refresh()
        self._front.build(self._log.trials())

    def running_trials(self) -> list[TrialRecord]:
        return [t for t in self.trials() if t.state == "running"]

    def counts(self) -> TrialCounts:
        """Trial counts; ``counts().finished`` is the budget used so far, across every part of the run."""
        return self._log.counts()

    def pareto(self, records: list[TrialRecord] | None = None) -> list[TrialRecord]:
        """The current Pareto front in trial-number order (feasible trials first; see
        :mod:`evomerge.pareto`), or the front of ``records`` when given; full-fidelity trials only
        (a trial stopped at a lower rung is measured on fewer items: :mod:`evomerge.rungs`)."""
        if records is not None:
            return pareto_front([r for r in records if full_fidelity(r)], self.directions)
        if not self._front.built:
            self._front.build(self.trials())
        return self._front.members()

    def spent(self) -> Spent:
        """Forward passes and generated tokens of every scored trial so far (kept as trials finish)."""
        if not self._front.built:
            self._front.build(self.trials())
        return self._front.spent

    def write_pareto(self) -> None:
        """Rewrite pareto.json now (atomically)."""
        if not self._front.built:
            self._front.build(self.trials())
        self._front.rewrite(self.counts())
