"""Optuna samplers (TPE, NSGA-II, GP, random) behind the evomerge driver contract.

The run's study is the sampler's whole memory, so these drivers hold almost nothing: ``ask`` is
``study.ask(distributions)`` on a view of the run's study that uses this driver's sampler, and
``tell`` goes through the store, which tells the study (with every objective as a study value and
every constraint as an Optuna constraint, which all four samplers honour).

All four handle several objectives in Optuna 5.0: TPE (MOTPE), NSGA-II, random, and GP (log
expected hypervolume improvement; checked in ``optuna/samplers/_gp/sampler.py``).

Resume: the reopened study already holds every finished trial, so a new sampler sees the history.
A sampler's own random state cannot be restored without pickling it, so it is seeded with
``seed + number of trials already in the log``: a resumed part is deterministic for a given log,
and does not replay the random draws of the first part. Trials interrupted by the crash are asked
again first, with their exact parameters (``enqueue_trial``), before the sampler proposes anything
new; ``rerun_of`` records which trial each one re-runs.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution

from evomerge.drivers import DRIVER_NAMES
from evomerge.drivers.base import (
    Proposal,
    check_against_store,
    record_result,
    refuse_running_trials,
)
from evomerge.hand_set import HAND_SET_ATTR
from evomerge.objectives import ConstraintSpec, ObjectiveSpec
from evomerge.store import RunStore, TrialRecord

SAMPLERS = tuple(n for n in DRIVER_NAMES if n != "cma")
DEFAULT_NSGA2_POPULATION = 50
# GPSampler refits a Gaussian process to every finished trial before each proposal (cubic in the
# trials). Its first proposals cost a constant (seconds on a busy CPU: scripts/bench_gp_ask.py);
# once a proposal takes GROWTH times the slowest of the first BASELINE_ASKS, and at least
# SLOW_ASK_S, the history is what costs, and it only grows: say so once.
SLOW_ASK_S = 1.0
BASELINE_ASKS = 20
GROWTH = 2.0

log = logging.getLogger(__name__)


def make_sampler(name: str, seed: int, population: int | None = None) -> optuna.samplers.BaseSampler:
    """The Optuna sampler for a driver name, seeded."""
    with warnings.catch_warnings():  # multivariate / constant_liar are "experimental" in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            # constant_liar: with several workers, trials still running count as bad guesses, so
            # a batch asked at once spreads out instead of piling onto one point.
            return optuna.samplers.TPESampler(multivariate=True, constant_liar=True, seed=seed)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(population_size=population or DEFAULT_NSGA2_POPULATION, seed=seed)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown Optuna sampler {name!r}; choose one of {SAMPLERS}")


class OptunaDriver:
    """Asks an Optuna sampler for candidates on the run's study (see module docstring)."""

    def __init__(
        self,
        store: RunStore,
        sampler: str,
        *,
        distributions: Mapping[str, BaseDistribution],
        objectives: Sequence[ObjectiveSpec],
        constraints: Sequence[ConstraintSpec] = (),
        seed: int = 0,
        population: int | None = None,
    ) -> None:
        check_against_store(store, objectives, constraints)
        refuse_running_trials(store)
        trials = store.trials()
        self.name = sampler
        self._store = store
        self._distributions = dict(distributions)
        self.seed = seed + len(trials)  # see module docstring: deterministic per log, no pickles
        self._study = store.study_for(make_sampler(sampler, self.seed, population))
        rerun = {t.attrs.get("rerun_of") for t in trials}
        # hand-set trials a crash interrupted are run again by evomerge.drivers.hand_set, labelled
        self._redo: deque[TrialRecord] = deque(
            t for t in trials if t.interrupted and t.number not in rerun and HAND_SET_ATTR not in t.attrs
        )
        self._outstanding: set[int] = set()
        self._warned_slow = False
        self._ask_times: list[float] = []

    @property
    def study(self) -> optuna.Study:
        """The run's study as this driver's sampler sees it: trials started on it (hand-set ones,
        see ``evomerge.drivers.hand_set``) go through the sampler's own bookkeeping."""
        return self._study

    def ask(self) -> Proposal:
        if self._redo:
            lost = self._redo.popleft()
            values = dict(lost.params)
            number = self._store.start_trial(values, self._distributions, {"rerun_of": lost.number}, study=self._study)
        else:
            started = time.perf_counter()
            number, values = self._store.ask_trial(self._study, self._distributions)
            self._check_speed(time.perf_counter() - started, number)
        self._outstanding.add(number)
        return Proposal(number, values)

    def _check_speed(self, ask_s: float, number: int) -> None:
        if self.name != "gp" or self._warned_slow:
            return
        if len(self._ask_times) < BASELINE_ASKS:
            self._ask_times.append(ask_s)
            return
        baseline = max(self._ask_times)
        if ask_s > max(SLOW_ASK_S, GROWTH * baseline):
            self._warned_slow = True
            log.warning(
                "the gp driver took %.1f s to propose trial %d (%.1f s at first): its cost grows with the cube of "
                "the trials, and workers now wait for it. For a larger budget use tpe or cma (or start a new run "
                "from the best recipes).", ask_s, number, baseline,
            )

    def tell(
        self,
        number: int,
        objectives: Mapping[str, float] | None,
        *,
        failed_reason: str | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> TrialRecord:
        if number not in self._outstanding:
            raise ValueError(f"trial {number} was not asked from this driver, or was told already")
        self._outstanding.discard(number)
        return record_result(self._store, number, objectives, failed_reason, attrs)

    def state_dict(self) -> dict[str, Any]:
        return {
            "driver": self.name,
            "seed": self.seed,
            "reruns_left": [t.number for t in self._redo],
            "waiting_for": sorted(self._outstanding),
        }
