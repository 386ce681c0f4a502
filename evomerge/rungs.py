"""Multi-fidelity evaluation: item rungs per task, promotion while a candidate can still matter.

``evaluation.rungs: {min_items: m, eta: e}`` scores every candidate on ``m`` items of each task
first (rung 0), then ``m*e``, ``m*e**2`` ... up to every item (the top rung). Why it is built so:

- **One fixed item order per task** (a shuffle seeded by the task's name, :func:`fixed_order`):
  rung ``k`` is the first ``size_k`` items of it, so each rung is a superset of the one below and
  a random sample of the task (datasets are often sorted). A promoted candidate is scored on the
  new items only; its per-item results of the rungs below are kept (in the trial log, attribute
  ``rung_items``, after every rung, so a kill loses none) and combined with the new ones. Only
  metrics lm-eval aggregates by ``mean`` combine exactly; :func:`check_mean_metrics` refuses the
  others before the run starts. At the top rung the mean over every item is what a whole
  evaluation of the same candidate gives.
- **Asynchronous promotion** (ASHA): the decision is taken the moment a rung result arrives,
  against the candidates that reached that rung so far; no worker waits for a rung to fill. A
  promoted candidate goes back to the next free worker before any new candidate is asked.
  One objective: Optuna's ``SuccessiveHalvingPruner`` decides, on the run's study, with each rung's
  mean reported as the intermediate value at step ``min_items * eta**k``
  (:class:`OptunaSuccessiveHalving`). Several objectives (Optuna cannot prune multi-objective
  studies): :class:`ParetoSuccessiveHalving` ranks the candidates at a rung by how many others
  dominate them (Fonseca and Fleming's Pareto ranking; 0: it can still reach the front), then by
  the plain sum of their objectives (what ``export --best`` ranks by), and promotes the best
  ``1/eta`` (at least the best one), the same share ASHA keeps. Why not every undominated one:
  with four objectives on 8 items per task most candidates are undominated, and promoting them
  all scored a third of a compose-world search on every item (``scripts/bench_fitness.py``: 1.2x
  instead of eta 3's promise).
- **Only while it can still reach the front.** Whichever rule keeps a searched candidate, it
  stops when a trial of the Pareto front (scored on every item) beats it on the rung's own items
  beyond their noise (:func:`clearly_beaten`: ahead on the plain sum of objectives by more than
  ``BEATEN_Z`` standard errors of the paired per-item differences, and not clearly behind on any
  one objective); the stopped trial names that trial (attribute ``rung_beaten_by``). ASHA's share
  alone is relative to the candidates that reached the rung, and a search's new candidates keep
  beating its old ones: on the compose world 14% of the trials were scored on every item, 70% of
  the forward passes, many of them clearly below the front already at 72 items. One objective
  or several, the same test: with several, a candidate clearly better at any one objective than
  every front member that leads overall goes on, so the front loses nothing the items could show.
- **What a stopped trial is.** It is a complete trial whose objectives are its rung's means, with
  attribute ``stopped_at_rung``. The Pareto front, ``export --best`` and the live "best" use
  full-fidelity trials only (:func:`full_fidelity`); Optuna samplers learn from a stopped trial's
  rung means (an estimate on fewer items; it was stopped for ranking low at its rung); CMA-ES ranks
  it below every full-fidelity member of its generation (``evomerge.drivers.cma_driver``).
- **Hand-set trials** start at rung 0 too and climb together (``evomerge.loop``): once all of
  them are back from a rung, the best by the plain sum goes up whatever the rule says, and so
  does each merge that :func:`indistinguishable` cannot yet tell from it (paired per-item
  differences within ``HAND_SET_Z`` standard errors); the others stop. An *input model alone*
  that the items cannot tell from the best is *parked* at that rung instead (attribute
  ``hand_set_parked``), left open until nothing new will be asked; it climbs on at once only
  when no merge is tied with it. At the run's end a parked trial stops if a front trial clearly
  beats it (:func:`clearly_beaten`, naming it), else climbs on, answering at each rung to the
  front alone. So the best hand-set merge is scored on every item unless a rung's items showed it
  worse, and the search never ends below a hand-set trial its items could not tell from the best
  (issue 12, item 3). Why models alone wait and merges do not: with several objectives each
  specialist alone is as good by the plain sum as task arithmetic on any rung's items (on the
  compose world 1.0 of 4 against 1.125), so climbing them all spent 2,400 of the hand-set trials'
  3,232 forward passes before the search began, and a good search has clearly beaten a model
  alone by its end; while the drivers need the merges now: TPE told the merge only at the end
  circled the specialists on 2 seeds of 10, and CMA-ES starts at the best trial that climbed
  (parking every tied trial let a start picked on 8 items per task land on a specialist). The
  base alone or a specialist beside a merge of both costs a rung-0 score instead of a whole
  evaluation (on the pair world, where the hand-set task arithmetic is already within 5% of any
  search's best, this is most of the saving). Their rung means compete at every rung, so a
  searched candidate must do about as well as them to go up. A run killed while a trial is
  parked parks its rerun again without scoring it.
- **Resume.** A trial a kill interrupted keeps its per-item results in the log. When the driver
  hands the same recipe out again, the new trial inherits them (``rung_items_from`` names the
  old one), the promotion rule is asked again rung by rung, and only items never scored for the
  candidate are sent to a worker. Each trial's ``cost`` counts what that trial itself scored, so
  the run's forward passes count every item once.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import ConfigError
from .evaluate import objective_task

STOPPED_ATTR = "stopped_at_rung"  # a trial promotion stopped below the top rung
RUNG_ATTR = "rung"  # the rung a trial reached (0 = the first); on every trial of a run with rungs
RUNG_OF_ATTR = "rungs"  # how many rungs the run has
ITEMS_ATTR = "rung_items"  # per-item results so far: {"task:<task>/<metric>": {doc_id: value}}
VALUES_ATTR = "rung_values"  # each reached rung's objectives: {"0": {...}, "1": {...}}
INHERITED_ATTR = "rung_items_from"  # the interrupted trial whose per-item results a rerun took over


def parked(record: Any) -> bool:
    """Whether a trial is a hand-set trial left open at a rung until the run's end (module docstring)."""
    return record.attrs.get(PARKED_ATTR) is not None and not record.attrs.get(UNPARKED_ATTR)


def full_fidelity(record: Any) -> bool:
    """Whether a trial's objectives are a whole evaluation (no rungs, or the top rung reached)."""
    return STOPPED_ATTR not in record.attrs


def fixed_order(task: str, items: Sequence[int]) -> list[int]:
    """``items`` in the task's one rung order: a shuffle seeded by the task's name alone, so every
    trial, every resume and every run over the same items climbs them in the same order."""
    order = sorted(items)
    random.Random(f"evomerge-rungs:{task}").shuffle(order)
    return order


@dataclass(frozen=True)
class RungLadder:
    """Each task's items in rung order and how many of them each rung holds (cumulative)."""

    order: dict[str, list[int]]
    sizes: dict[str, list[int]]  # per task, one size per rung; a task with fewer rungs repeats its last
    min_items: int
    eta: int

    @classmethod
    def build(cls, rungs: Any, items: Mapping[str, Sequence[int]]) -> RungLadder:
        """``rungs``: the space file's ``evaluation.rungs``; ``items``: every item each task scores."""
        order = {t: fixed_order(t, ids) for t, ids in items.items()}
        sizes = {t: rungs.sizes(len(ids)) for t, ids in order.items()}
        count = max(len(s) for s in sizes.values())
        sizes = {t: s + [s[-1]] * (count - len(s)) for t, s in sizes.items()}
        return cls(order, sizes, rungs.min_items, rungs.eta)

    @property
    def top(self) -> int:
        return len(next(iter(self.sizes.values()))) - 1

    def items(self, rung: int) -> dict[str, list[int]]:
        """Every item of ``rung`` (and so of every rung below), per task."""
        return {t: self.order[t][: self.sizes[t][rung]] for t in self.order}

    def step(self, rung: int) -> int:
        """The rung as Optuna's successive halving counts it: ``min_items * eta**rung``."""
        return self.min_items * self.eta**rung

    def describe(self) -> str:
        return "; ".join(f"{t}: {' -> '.join(map(str, s))} items" for t, s in self.sizes.items())

    def combine(self, per_item: Mapping[str, Mapping[int, float]]) -> dict[str, float]:
        """Each metric's mean over the items scored so far, in item-number order (the order
        lm-eval's whole evaluation sums them in)."""
        out = {}
        for name, values in per_item.items():
            docs = sorted(values)
            out[name] = sum(values[d] for d in docs) / len(docs)
        return out


@dataclass
class RungState:
    """What a trial has scored so far: per-item results, what each reached rung measured, the cost."""

    per_item: dict[str, dict[int, float]] = field(default_factory=dict)
    values: dict[int, dict[str, float]] = field(default_factory=dict)
    measured: dict[str, float] = field(default_factory=dict)  # measured whole at every rung (l2_from_base)
    cost: dict[str, Any] = field(default_factory=dict)  # this trial's own scoring cost, summed over rungs

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> RungState:
        """A state read back from the trial log (JSON keys are text)."""
        per_item = {k: {int(d): float(v) for d, v in vs.items()} for k, vs in (attrs.get(ITEMS_ATTR) or {}).items()}
        values = {int(k): dict(v) for k, v in (attrs.get(VALUES_ATTR) or {}).items()}
        top = max(values) if values else None
        measured = {k: v for k, v in values[top].items() if k not in per_item} if top is not None else {}
        return cls(per_item, values, measured)

    def scored(self, task: str) -> set[int]:
        for name, values in self.per_item.items():
            if objective_task(name) == task:
                return set(values)
        return set()

    def add(self, per_item: Mapping[str, Mapping[int, float]], cost: Mapping[str, Any] | None) -> None:
        for name, values in per_item.items():
            self.per_item.setdefault(name, {}).update({int(d): float(v) for d, v in values.items()})
        self.cost = add_costs(self.cost, cost or {})

    def attrs(self) -> dict[str, Any]:
        """The trial-log attributes that hold this state (a kill after this write loses nothing)."""
        return {ITEMS_ATTR: {k: {str(d): v for d, v in sorted(vs.items())} for k, vs in self.per_item.items()},
                VALUES_ATTR: {str(k): v for k, v in sorted(self.values.items())},
                RUNG_ATTR: max(self.values) if self.values else 0,
                **({"cost": self.cost} if self.cost else {})}


def add_costs(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Two :class:`~evomerge.evaluate.EvalCost` dicts summed (items per task, requests by kind...)."""
    if not a:
        return dict(b)
    if not b:
        return dict(a)
    out: dict[str, Any] = {}
    for key in ("items", "requests"):
        merged = dict(a.get(key, {}))
        for k, v in b.get(key, {}).items():
            merged[k] = merged.get(k, 0) + v
        out[key] = merged
    out["forward_passes"] = int(a.get("forward_passes", 0)) + int(b.get("forward_passes", 0))
    out["generated_tokens"] = int(a.get("generated_tokens", 0)) + int(b.get("generated_tokens", 0))
    return out


HAND_SET_Z = 2.0  # standard errors of the paired difference under which a hand-set merge stays in
BEATEN_Z = 2.0  # standard errors by which a trial scored on every item must lead to stop a candidate
BEATEN_ATTR = "rung_beaten_by"  # the front trial that showed a stopped candidate could not reach the front
PARKED_ATTR = "hand_set_parked"  # the rung a hand-set trial waited at for the run's end
UNPARKED_ATTR = "hand_set_unparked"  # set when the run's end decided a parked trial's fate


def _paired_gaps(state: RungState, other: RungState, values: Mapping[str, float], other_values: Mapping[str, float],
                 items: Mapping[str, Sequence[int]], directions: Mapping[str, str]) -> dict[str, tuple[float, float]]:
    """Per objective, how far ``other`` leads on ``items`` (signed so that more is better for
    ``other``) and the variance of that lead: the mean of the paired per-item differences and its
    squared standard error. Both were scored on the same items, so the items' own difficulty
    cancels. A value measured whole (``l2_from_base``) has no sampling error: its lead, variance 0."""
    out = {}
    for name, direction in directions.items():
        sign = 1.0 if direction == "maximize" else -1.0
        mine, theirs = state.per_item.get(name), other.per_item.get(name)
        if mine is None or theirs is None:
            out[name] = (sign * (float(other_values[name]) - float(values[name])), 0.0)
            continue
        docs = items[objective_task(name)]
        diffs = [sign * (theirs[d] - mine[d]) for d in docs]
        mean = sum(diffs) / len(diffs)
        variance = sum((x - mean) ** 2 for x in diffs) / (len(diffs) - 1) / len(diffs) if len(diffs) > 1 else 0.0
        out[name] = (mean, variance)
    return out


def indistinguishable(state: RungState, best: RungState, values: Mapping[str, float], best_values: Mapping[str, float],
                      items: Mapping[str, Sequence[int]], directions: Mapping[str, str]) -> bool:
    """Whether a rung's items cannot tell a candidate from ``best``: the plain sum of objectives
    (what ``--best`` ranks by) differs by less than ``HAND_SET_Z`` standard errors of the paired
    per-item differences (:func:`_paired_gaps`)."""
    gaps = _paired_gaps(state, best, values, best_values, items, directions).values()
    return sum(g for g, _ in gaps) <= HAND_SET_Z * sum(v for _, v in gaps) ** 0.5


def clearly_beaten(state: RungState, other: RungState, values: Mapping[str, float], other_values: Mapping[str, float],
                   items: Mapping[str, Sequence[int]], directions: Mapping[str, str], z: float = BEATEN_Z) -> bool:
    """Whether ``other`` (a trial scored on every item) beats a candidate on a rung's items beyond
    the noise of those items: ahead on the plain sum of objectives by more than ``z`` standard
    errors of the paired differences, and not behind by more than ``z`` of its own on any single
    objective (behind at all on one measured whole). Then the candidate cannot be expected to
    reach the Pareto front, and scoring it on more items would only confirm it; a candidate that is
    clearly better at one objective, or that the items cannot separate from ``other``, may."""
    gaps = _paired_gaps(state, other, values, other_values, items, directions)
    if any(g < -z * v**0.5 if v > 0 else g < 0 for g, v in gaps.values()):
        return False
    variance = sum(v for _, v in gaps.values())
    return variance > 0 and sum(g for g, _ in gaps.values()) > z * variance**0.5


class FrontReach:
    """Which trial of the Pareto front, if any, shows that a candidate cannot reach the front
    (:func:`clearly_beaten` on the candidate's rung items). The front's per-item results are read
    from the trial log once per trial and kept: a trial scored on every item does not change."""

    def __init__(self, store: Any, ladder: RungLadder) -> None:
        self._store = store
        self._ladder = ladder
        self._states: dict[int, RungState] = {}
        self._covers: dict[tuple[int, int], bool] = {}  # (front trial, rung): scored on all that rung's items

    def beaten_by(self, state: RungState, values: Mapping[str, float], rung: int) -> int | None:
        items = self._ladder.items(rung)
        for record in self._store.pareto():
            if not record.attrs.get(ITEMS_ATTR):
                continue  # scored before rungs were on (not this run's trials): no per-item results
            other = self._states.get(record.number)
            if other is None:
                other = self._states[record.number] = RungState.from_attrs(record.attrs)
            covers = self._covers.get((record.number, rung))
            if covers is None:
                covers = self._covers[(record.number, rung)] = all(
                    set(docs) <= other.scored(t) for t, docs in items.items())
            if covers and clearly_beaten(state, other, values, record.objectives, items, self._store.directions):
                return record.number
        return None


class Promotion(Protocol):
    """Decides, when a rung result arrives, whether the candidate goes up a rung."""

    def promote(self, number: int, rung: int, values: Mapping[str, float]) -> bool: ...

    def enter(self, number: int, rung: int, values: Mapping[str, float]) -> None:
        """Let a result compete at ``rung`` (it raises the bar) without a verdict on it."""


class OptunaSuccessiveHalving:
    """One objective: Optuna's ``SuccessiveHalvingPruner`` (asynchronous successive halving) on the
    run's study; each rung's mean is reported as the intermediate value at :meth:`RungLadder.step`."""

    def __init__(self, store: Any, ladder: RungLadder) -> None:
        import optuna

        self._store = store
        self._objective = next(iter(store.directions))
        self._ladder = ladder
        self._pruner = optuna.pruners.SuccessiveHalvingPruner(
            min_resource=ladder.min_items, reduction_factor=ladder.eta, min_early_stopping_rate=0, bootstrap_count=0)

    def enter(self, number: int, rung: int, values: Mapping[str, float]) -> None:
        self.promote(number, rung, values)  # reported to the study; the verdict is not used

    def promote(self, number: int, rung: int, values: Mapping[str, float]) -> bool:
        return not self._store.report_rung(number, self._ladder.step(rung), values[self._objective], self._pruner)


class ParetoSuccessiveHalving:
    """Several objectives: promote a candidate that ranks within the best ``1/eta`` of its rung (at
    least the best one), ranked by domination count, then by the plain sum of its objectives (see
    the module docstring)."""

    def __init__(self, directions: Mapping[str, str], eta: int, trials: Sequence[Any] = ()) -> None:
        self._signs = {n: (1.0 if d == "maximize" else -1.0) for n, d in directions.items()}
        self._eta = eta
        self._seen: dict[int, dict[int, tuple[float, ...]]] = {}  # rung -> trial number -> values, all maximised
        inherited = {t.attrs.get(INHERITED_ATTR) for t in trials}
        for t in trials:  # resume: every rung result already in the log competes
            if t.number in inherited:
                continue  # its results live on in the trial that took them over
            for rung, values in (t.attrs.get(VALUES_ATTR) or {}).items():
                if all(n in values for n in self._signs):
                    self._seen.setdefault(int(rung), {})[t.number] = self._vector(values)

    def _vector(self, values: Mapping[str, float]) -> tuple[float, ...]:
        return tuple(s * float(values[n]) for n, s in self._signs.items())

    def enter(self, number: int, rung: int, values: Mapping[str, float]) -> None:
        """Let a result compete at ``rung`` without asking for a verdict on it."""
        self._seen.setdefault(rung, {})[number] = self._vector(values)

    def promote(self, number: int, rung: int, values: Mapping[str, float]) -> bool:
        self.enter(number, rung, values)
        competing = self._seen[rung]
        vectors = list(competing.values())

        def rank(v: tuple[float, ...]) -> tuple[int, float]:
            dominated_by = sum(1 for o in vectors if all(a >= b for a, b in zip(o, v)) and o != v)
            return dominated_by, -sum(v)

        mine = rank(competing[number])
        kept = max(1, len(vectors) // self._eta)  # ASHA's share, and the best one of a rung of fewer than eta
        return sum(1 for v in vectors if rank(v) < mine) < kept


def make_promotion(store: Any, ladder: RungLadder) -> Promotion:
    """Optuna's pruner for one objective, the Pareto rule for several."""
    if len(store.directions) == 1:
        return OptunaSuccessiveHalving(store, ladder)
    return ParetoSuccessiveHalving(store.directions, ladder.eta, store.trials())


def check_mean_metrics(config: Any, scorer: Any) -> None:
    """Refuse rungs when an objective's or constraint's metric is not aggregated by a plain mean:
    per-item results of two rungs could not be combined into what a whole evaluation gives."""
    if config.evaluation.rungs is None:
        return
    named = [*config.objectives, *config.constraints]
    for i, obj in enumerate(named):
        if obj.task is None or scorer.mean_aggregated(obj.task, obj.metric):
            continue
        kind, index = ("objectives", i) if i < len(config.objectives) else ("constraints", i - len(config.objectives))
        raise ConfigError(
            f"evaluation.rungs combines per-item results by their mean, but task {obj.task!r} aggregates "
            f"{obj.metric!r} otherwise; remove evaluation.rungs or choose a metric aggregated by mean",
            where=f"{config.source}: {kind}[{index}].metric",
        )
