"""The trial log: the Optuna study of a run, wrapped so the rest of evomerge reads plain records.

The study is the single source of truth (DESIGN.md): each trial carries its named parameters with
their distributions, and user attributes ``objectives`` (every measured value by name),
``recipe`` (JSON), ``error``, ``fail_kind`` (``candidate`` or ``interrupted``), ``timings``, and
whatever else the caller adds (``worker``, ``generation``...). Constraints are stored as Optuna
constraints (``value - bound``, feasible when <= 0), so TPE, NSGA-II and GP honour them too.
Optuna's RDB storage keeps everything as JSON; nothing here pickles or unpickles.

Constant work per trial: the log is read from the database once, when it is first needed, and
from then on kept current from this process's own writes (one process writes a run; see
:class:`TrialLog`). Reading a trial back after each write cost more than the trial itself; reading
every trial back after each cost more the longer a run went. Counts are kept as trials change state.

Resume: a process that dies leaves its trials RUNNING, and Optuna's heartbeat does not cover
ask/tell. :meth:`TrialLog.requeue_interrupted` (called once when a run is reopened, before any
driver is built) marks them FAIL with ``fail_kind = "interrupted"``; the drivers then hand their
parameters out again (see ``evomerge.drivers``). Interrupted trials never count towards the budget.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from evomerge.errors import EvomergeError
from evomerge.store.optuna_tables import OptunaTables

# User attribute keys the store owns; callers may pass any other JSON-able key in ``attrs``.
OBJECTIVES_ATTR = "objectives"
RECIPE_ATTR = "recipe"
ERROR_ATTR = "error"
FAIL_KIND_ATTR = "fail_kind"
TIMINGS_ATTR = "timings"
COST_ATTR = "cost"  # what scoring cost: see TrialRecord.cost
_RESERVED = {OBJECTIVES_ATTR, ERROR_ATTR, FAIL_KIND_ATTR}
STUDY_ATTR = "evomerge"  # study user attr: objective names, directions and constraint bounds

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
    """One trial as the log holds it (a snapshot: a new one replaces it after every change)."""

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

    @property
    def cost(self) -> Mapping[str, Any]:
        """What scoring this trial cost (:class:`evomerge.evaluate.EvalCost` as a dict): items per
        task, requests by kind, ``forward_passes``, ``generated_tokens``; empty when not scored."""
        return self.attrs.get(COST_ATTR) or {}

    @property
    def forward_passes(self) -> int:
        return int(self.cost.get("forward_passes", 0))

    @property
    def generated_tokens(self) -> int:
        return int(self.cost.get("generated_tokens", 0))


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


def _kind(record: TrialRecord) -> str:
    """The TrialCounts field a record counts towards."""
    return "interrupted" if record.interrupted else record.state


def count_trials(records: list[TrialRecord]) -> TrialCounts:
    kinds = Counter(_kind(t) for t in records)
    return TrialCounts(**{k: kinds.get(k, 0) for k in ("waiting", "running", "complete", "failed", "interrupted")})


def make_record(
    number: int,
    state: TrialState,
    params: Mapping[str, Any],
    user_attrs: Mapping[str, Any],
    constraints: Mapping[str, float],
) -> TrialRecord:
    """A record from what Optuna stores for a trial (read back, or what this process just wrote)."""
    ua = dict(user_attrs)
    complete = state == TrialState.COMPLETE
    objectives = ua.pop(OBJECTIVES_ATTR, None)
    error = ua.pop(ERROR_ATTR, None)
    kind = ua.pop(FAIL_KIND_ATTR, None)
    return TrialRecord(
        number=number,
        state=_STATE_NAMES[state],
        params=dict(params),
        objectives=dict(objectives) if complete and objectives is not None else None,
        recipe_json=ua.pop(RECIPE_ATTR, None),
        error=error,
        timings=dict(ua.pop(TIMINGS_ATTR, None) or {}),
        constraints=dict(constraints) if complete else {},
        attrs=ua,
        interrupted=kind == "interrupted",
    )


def _record(ft: optuna.trial.FrozenTrial) -> TrialRecord:
    return make_record(ft.number, ft.state, ft.params, ft.user_attrs, ft.constraints)


@dataclass
class _Written:
    """What Optuna holds for a trial this process writes, mirrored so it is never read back."""

    state: TrialState
    params: dict[str, Any]
    user_attrs: dict[str, Any]
    constraints: dict[str, float] = field(default_factory=dict)

    def record(self, number: int) -> TrialRecord:
        return make_record(number, self.state, self.params, self.user_attrs, self.constraints)


def _json_checked(key: str, value: Any) -> Any:
    """``value`` as it will read back from the database (JSON round trip: tuples become lists)."""
    # Optuna would store a non-JSON value as its repr or fail deep inside SQLAlchemy; say which key.
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"trial attribute {key!r} must be JSON-serialisable: {e}") from None
    return value if isinstance(value, (str, int, float, bool)) or value is None else json.loads(text)


def _fit_to(name: str, value: Any, dist: BaseDistribution) -> Any:
    """Check a proposed value against its distribution; absorb float round-off at the bounds."""
    if isinstance(dist, CategoricalDistribution):
        if value not in dist.choices:
            raise ValueError(f"parameter {name!r}: {value!r} is not one of {dist.choices}")
        return dist.choices[dist.choices.index(value)]  # the stored choice, as a read gives it back
    if isinstance(dist, (FloatDistribution, IntDistribution)):
        v = float(value)
        slack = 1e-9 * max(1.0, dist.high - dist.low)
        if not (dist.low - slack <= v <= dist.high + slack):
            raise ValueError(f"parameter {name!r}: {value!r} is outside [{dist.low}, {dist.high}]")
        v = min(max(v, dist.low), dist.high)
        return int(round(v)) if isinstance(dist, IntDistribution) else v
    raise TypeError(f"parameter {name!r}: unsupported distribution {type(dist).__name__}")


class TrialLog:
    """A run's Optuna study as a list of :class:`TrialRecord`, written through ask/tell records.

    One process drives a run at a time (the search loop); workers never touch the log. Trials are
    started and finished only by the process that started them: a trial this process did not
    start is either finished already or interrupted. That is what lets the records be kept from
    this process's own writes after one read. Other processes may read the run (a report,
    optuna-dashboard) through their own log or Optuna directly.
    """

    def __init__(self, storage: optuna.storages.RDBStorage, study_name: str, where: str) -> None:
        self._storage = storage
        self.study_name = study_name
        # The log's own study only creates fixed trials, so its sampler never samples.
        self._study = optuna.load_study(
            study_name=study_name, storage=storage, sampler=optuna.samplers.RandomSampler(seed=0)
        )
        self._study_id = storage.get_study_id_from_name(study_name)
        spec = self._study.user_attrs.get(STUDY_ATTR)
        if not spec:
            raise EvomergeError(f"{where}: study {study_name!r} was not created by evomerge (no objective list)")
        self.directions: dict[str, str] = {n: d for n, d in spec["objectives"]}
        self.constraints: dict[str, float] = dict(spec.get("constraints", {}))
        self._tables = OptunaTables(storage, self._study_id)
        # Trials this process started and has not finished: an Optuna handle (a sampler proposed
        # it), or the trial id of one inserted whole through OptunaTables.
        self._live: dict[int, optuna.Trial | int] = {}
        self._written: dict[int, _Written] = {}  # trials this process started, as it wrote them
        self._records: dict[int, TrialRecord] | None = None  # every trial; None until first read
        self._kinds: Counter[str] = Counter()

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
            trial_id, number = self._tables.insert_running(fixed, distributions, user_attrs)
            self._started(number, trial_id, fixed, user_attrs)
            return number
        study.enqueue_trial(fixed, user_attrs=user_attrs)
        trial = study.ask(dict(distributions))
        if trial.params != fixed:
            # Another enqueued trial was popped first: the log is being written by someone else.
            raise RuntimeError(f"trial {trial.number} got params {trial.params}, expected {fixed}")
        self._started(trial.number, trial, fixed, user_attrs)
        return trial.number

    def ask_trial(
        self,
        study: optuna.Study,
        distributions: Mapping[str, BaseDistribution],
        attrs: Mapping[str, Any] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Let ``study``'s sampler propose a RUNNING trial; returns its number and params."""
        trial = study.ask(dict(distributions))
        user_attrs = {}
        for k, v in (attrs or {}).items():
            user_attrs[k] = _json_checked(k, v)
            trial.set_user_attr(k, user_attrs[k])
        params = dict(trial.params)
        self._started(trial.number, trial, params, user_attrs)
        return trial.number, params

    def _started(self, number: int, trial: optuna.Trial | int, params: dict[str, Any], user_attrs: dict[str, Any]) -> None:
        self._live[number] = trial
        self._written[number] = _Written(TrialState.RUNNING, dict(params), dict(user_attrs))
        self._put(self._written[number].record(number))

    def annotate(self, number: int, attrs: Mapping[str, Any]) -> None:
        """Add user attributes (recipe JSON, worker id...) to a trial that is still running."""
        trial = self._live_trial(number)
        written = self._written[number]
        checked = self._checked(attrs)
        if not checked:
            return
        if isinstance(trial, int):
            self._tables.set_user_attrs(trial, checked)
        else:
            for k, v in checked.items():
                trial.set_user_attr(k, v)
        written.user_attrs.update(checked)
        self._put(written.record(number))

    def report_rung(self, number: int, step: int, value: float, pruner: optuna.pruners.BasePruner) -> bool:
        """Report a running trial's intermediate ``value`` at ``step`` to the study and ask
        ``pruner`` whether to stop it (True: stop). The pruner's own bookkeeping (Optuna's
        successive halving keeps each trial's rung values as system attributes) goes to the study."""
        trial = self._live_trial(number)
        trial_id = trial if isinstance(trial, int) else trial._trial_id
        self._storage.set_trial_intermediate_value(trial_id, step, float(value))
        return bool(pruner.prune(self._study, self._storage.get_trial(trial_id)))

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
        written = self._written[number]
        constraints = {name: measured[name] - bound for name, bound in self.constraints.items()}
        values = [measured[n] for n in self.directions]
        if isinstance(trial, int):
            user_attrs = {**self._checked(attrs), OBJECTIVES_ATTR: measured}
            self._tables.finish(trial, TrialState.COMPLETE, user_attrs, values, constraints)
            written.user_attrs.update(user_attrs)
        else:
            self.annotate(number, attrs or {})
            trial.set_user_attr(OBJECTIVES_ATTR, measured)
            written.user_attrs[OBJECTIVES_ATTR] = measured
            for name, value in constraints.items():
                trial.set_constraint(name, value)
            trial.study.tell(trial, values)
        written.constraints.update(constraints)
        written.state = TrialState.COMPLETE
        return self._finished(number)

    def fail_trial(self, number: int, reason: str, attrs: Mapping[str, Any] | None = None) -> TrialRecord:
        """Record a candidate that could not be merged or evaluated, with the reason why."""
        trial = self._live_trial(number)
        written = self._written[number]
        failure = {ERROR_ATTR: str(reason), FAIL_KIND_ATTR: "candidate"}
        if isinstance(trial, int):
            user_attrs = {**self._checked(attrs), **failure}
            self._tables.finish(trial, TrialState.FAIL, user_attrs)
            written.user_attrs.update(user_attrs)
        else:
            self.annotate(number, attrs or {})
            for k, v in failure.items():
                trial.set_user_attr(k, v)
            written.user_attrs.update(failure)
            trial.study.tell(trial, state=TrialState.FAIL)
        written.state = TrialState.FAIL
        return self._finished(number)

    @staticmethod
    def _checked(attrs: Mapping[str, Any] | None) -> dict[str, Any]:
        for k in attrs or {}:
            if k in _RESERVED:
                raise ValueError(f"{k!r} is written by the store itself")
        return {k: _json_checked(k, v) for k, v in (attrs or {}).items()}

    def _finished(self, number: int) -> TrialRecord:
        del self._live[number]
        record = self._written.pop(number).record(number)
        self._put(record)
        return record

    def _live_trial(self, number: int) -> optuna.Trial | int:
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
        for t in self.trials():
            if t.state not in ("running", "waiting") or t.number in self._live:
                continue
            trial_id = self._storage.get_trial_id_from_study_id_trial_number(self._study_id, t.number)
            if t.state == "waiting" and not self._storage.set_trial_state_values(trial_id, TrialState.RUNNING):
                continue  # someone else took it
            self._storage.set_trial_user_attr(trial_id, ERROR_ATTR, INTERRUPTED_REASON)
            self._storage.set_trial_user_attr(trial_id, FAIL_KIND_ATTR, "interrupted")
            self._study.tell(t.number, state=TrialState.FAIL)
            out.append(self.trial(t.number))
        return out

    # ---- reading --------------------------------------------------------------------------

    def trials(self) -> list[TrialRecord]:
        """Every trial in number order."""
        return [self._all()[n] for n in sorted(self._all())]

    def trial(self, number: int) -> TrialRecord:
        """Trial ``number`` read from the database now."""
        trial_id = self._storage.get_trial_id_from_study_id_trial_number(self._study_id, number)
        record = _record(self._storage.get_trial(trial_id))
        if self._records is not None:
            self._put(record)
        return record

    def refresh(self) -> None:
        """Re-read every trial from the database (after someone else wrote to it)."""
        self._records, self._kinds = {}, Counter()
        for t in self._tables.read():
            self._put(make_record(t.number, t.state, t.params, t.user_attrs, t.constraints))

    def counts(self) -> TrialCounts:
        """Trial counts; ``counts().finished`` is the budget used so far, across every part of the run."""
        self._all()
        return TrialCounts(**{k: self._kinds.get(k, 0) for k in ("waiting", "running", "complete", "failed", "interrupted")})

    def _all(self) -> dict[int, TrialRecord]:
        if self._records is None:
            self.refresh()
        assert self._records is not None
        return self._records

    def _put(self, record: TrialRecord) -> None:
        """Keep ``record`` as the current one for its number, and the counts with it."""
        if self._records is None:
            return  # nothing read yet: the first read will see this trial in the database
        old = self._records.get(record.number)
        if old is not None:
            self._kinds[_kind(old)] -= 1
        self._records[record.number] = record
        self._kinds[_kind(record)] += 1
