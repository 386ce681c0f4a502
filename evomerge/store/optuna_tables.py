"""Optuna's RDB tables, written one transaction per step and read in one pass.

Why this exists: through Optuna's ORM, inserting a trial with 40 parameters costs three queries
per parameter (find the trial, check it is running, find an earlier trial's distribution of that
name), and each user attribute, constraint and the final ``tell`` cost several more, so a trial
took ~50 ms of one core before a worker could get the next candidate, most of the loop's time
(``scripts/bench_loop.py`` prints where it goes). Reading a run back through
``get_all_trials`` parses every parameter's distribution JSON once per trial: minutes at 10,000
trials.

What it writes is what Optuna writes, in Optuna's own table definitions
(``optuna.storages._rdb.models``): parameters in their internal representation with their
distribution JSON, attributes as JSON, constraints as the system attributes ``constraints:<name>``
that ``Trial.set_constraint`` writes, one ``trial_values`` row per objective, datetimes as naive
UTC. So Optuna, its samplers and optuna-dashboard read these trials as their own
(``tests/test_store.py`` checks a trial against Optuna's own ``get_trial``). Only trials the store
inserts whole (CMA's proposals, ``TrialLog.start_trial`` without a sampler) are written here;
trials an Optuna sampler proposes go through Optuna, whose ``tell`` keeps the sampler's
bookkeeping. Like the rest of the store, it relies on one process writing a run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import sqlalchemy
from optuna.distributions import BaseDistribution, distribution_to_json, json_to_distribution
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.trial import TrialState

from evomerge import failpoints

_TRIALS = models.TrialModel.__table__
_PARAMS = models.TrialParamModel.__table__
_USER_ATTRS = models.TrialUserAttributeModel.__table__
_SYSTEM_ATTRS = models.TrialSystemAttributeModel.__table__
_VALUES = models.TrialValueModel.__table__
# Finish a trial only while it is RUNNING, so a trial finished by anyone else is never overwritten.
_FINISH = (
    _TRIALS.update()
    .where(_TRIALS.c.trial_id == sqlalchemy.bindparam("id"), _TRIALS.c.state == sqlalchemy.bindparam("running"))
    .values(state=sqlalchemy.bindparam("state"), datetime_complete=sqlalchemy.bindparam("done"))
)
CONSTRAINT_PREFIX = "constraints:"  # Optuna's key for a named constraint (optuna/study/_constrained_optimization.py)


def _utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


@dataclass
class StoredTrial:
    """One trial as its rows hold it."""

    trial_id: int
    number: int
    state: TrialState
    params: dict[str, Any] = field(default_factory=dict)
    user_attrs: dict[str, Any] = field(default_factory=dict)
    constraints: dict[str, float] = field(default_factory=dict)


class OptunaTables:
    """Bulk access to one study's trials in an RDB storage (see module docstring)."""

    def __init__(self, storage: RDBStorage, study_id: int) -> None:
        self._engine = storage.engine
        self._study_id = study_id
        self._distribution_json: dict[BaseDistribution, str] = {}  # computed once per distribution

    def insert_running(
        self, params: Mapping[str, Any], distributions: Mapping[str, BaseDistribution], user_attrs: Mapping[str, Any]
    ) -> tuple[int, int]:
        """Insert a RUNNING trial whole (one transaction); returns ``(trial_id, number)``."""
        with self._engine.begin() as con:
            number = con.execute(
                sqlalchemy.select(sqlalchemy.func.count()).select_from(_TRIALS).where(_TRIALS.c.study_id == self._study_id)
            ).scalar_one()
            trial_id = con.execute(
                _TRIALS.insert(),
                {"number": number, "study_id": self._study_id, "state": TrialState.RUNNING, "datetime_start": _utc_now()},
            ).inserted_primary_key[0]
            con.execute(_PARAMS.insert(), [
                {"trial_id": trial_id, "param_name": name, "param_value": dist.to_internal_repr(params[name]),
                 "distribution_json": self._json_of(dist)}
                for name, dist in distributions.items()
            ])
            self._put_attrs(con, _USER_ATTRS, trial_id, user_attrs, new=True)
        return int(trial_id), int(number)

    def set_user_attrs(self, trial_id: int, attrs: Mapping[str, Any]) -> None:
        """Set user attributes of a trial this process started and has not finished (one transaction)."""
        with self._engine.begin() as con:
            self._put_attrs(con, _USER_ATTRS, trial_id, attrs)

    def finish(
        self,
        trial_id: int,
        state: TrialState,
        user_attrs: Mapping[str, Any],
        values: Sequence[float] | None = None,
        constraints: Mapping[str, float] | None = None,
    ) -> None:
        """Attributes, constraints, objective values and the final state of a running trial, in one
        transaction: a crash leaves it running with none of them, or finished with all."""
        with self._engine.begin() as con:
            finished = con.execute(_FINISH, {"id": trial_id, "running": TrialState.RUNNING,
                                             "state": state, "done": _utc_now()})
            if finished.rowcount != 1:  # rolls the transaction back
                raise RuntimeError(f"trial id {trial_id} is no longer RUNNING: another process wrote this run")
            self._put_attrs(con, _USER_ATTRS, trial_id, user_attrs)
            self._put_attrs(con, _SYSTEM_ATTRS, trial_id,
                            {CONSTRAINT_PREFIX + k: float(v) for k, v in (constraints or {}).items()}, new=True)
            if values:
                con.execute(_VALUES.insert(), [
                    {"trial_id": trial_id, "objective": i, "value": v,
                     "value_type": models.TrialValueModel.TrialValueType.FINITE}
                    for i, v in enumerate(values)
                ])

    def read(self) -> Iterator[StoredTrial]:
        """Every trial of the study in number order, four queries in all.

        Another process may write the run meanwhile (``evomerge show`` on a live search, a test
        reading the run it watches): each query sees the database as it is then, so rows of trials
        started after the first query are left out, and those trials wait for the next read."""
        sid = self._study_id
        with self._engine.connect() as con:
            rows = con.execute(
                sqlalchemy.select(_TRIALS.c.trial_id, _TRIALS.c.number, _TRIALS.c.state)
                .where(_TRIALS.c.study_id == sid).order_by(_TRIALS.c.number)
            ).all()
            trials = {r.trial_id: StoredTrial(r.trial_id, r.number, r.state) for r in rows}
            failpoints.hit("store.between_reads")  # a writer may add a trial here
            in_study = sqlalchemy.select(_TRIALS.c.trial_id).where(_TRIALS.c.study_id == sid)
            distributions: dict[str, BaseDistribution] = {}
            for trial_id, name, value, dist_json in con.execute(
                sqlalchemy.select(_PARAMS.c.trial_id, _PARAMS.c.param_name, _PARAMS.c.param_value,
                                  _PARAMS.c.distribution_json)
                .where(_PARAMS.c.trial_id.in_(in_study)).order_by(_PARAMS.c.param_id)
            ):
                if trial_id not in trials:
                    continue
                dist = distributions.get(dist_json)
                if dist is None:
                    dist = distributions[dist_json] = json_to_distribution(dist_json)
                trials[trial_id].params[name] = dist.to_external_repr(value)
            for trial_id, key, value_json in con.execute(
                sqlalchemy.select(_USER_ATTRS.c.trial_id, _USER_ATTRS.c.key, _USER_ATTRS.c.value_json)
                .where(_USER_ATTRS.c.trial_id.in_(in_study))
            ):
                if trial_id in trials:
                    trials[trial_id].user_attrs[key] = json.loads(value_json)
            for trial_id, key, value_json in con.execute(
                sqlalchemy.select(_SYSTEM_ATTRS.c.trial_id, _SYSTEM_ATTRS.c.key, _SYSTEM_ATTRS.c.value_json)
                .where(_SYSTEM_ATTRS.c.trial_id.in_(in_study), _SYSTEM_ATTRS.c.key.like(CONSTRAINT_PREFIX + "%"))
            ):
                if trial_id in trials:
                    trials[trial_id].constraints[key[len(CONSTRAINT_PREFIX):]] = json.loads(value_json)
        return iter(trials.values())

    # ---- helpers ------------------------------------------------------------------------------

    def _json_of(self, dist: BaseDistribution) -> str:
        text = self._distribution_json.get(dist)
        if text is None:
            text = self._distribution_json[dist] = distribution_to_json(dist)
        return text

    @staticmethod
    def _put_attrs(
        con: sqlalchemy.Connection, table: sqlalchemy.Table, trial_id: int, attrs: Mapping[str, Any], new: bool = False
    ) -> None:
        """Insert (``new``: none of these keys exists yet) or replace attributes."""
        if not attrs:
            return
        if not new:
            con.execute(table.delete().where(table.c.trial_id == trial_id, table.c.key.in_(list(attrs))))
        con.execute(table.insert(), [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()])
