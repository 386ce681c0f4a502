"""CMA-ES (pycma) on the unit cube, asked and told one trial at a time through the run store.

Why it looks the way it does:

- **Its own RNG.** pycma draws its normal samples from ``np.random.randn`` unless told otherwise,
  and lm-eval's ``simple_evaluate`` reseeds numpy's global RNG on every call: every generation
  would repeat the last one. The strategy gets option ``randn`` bound to a private
  ``np.random.Generator`` seeded from ``seed`` (pycma's own ``seed`` option only seeds the global
  RNG, so it is left unset).
- **Generations, asynchronously.** The loop may ask a whole generation at once and results come
  back in any order; pycma is told once, in member order, when the last member is back. Until
  then ``ask`` returns None.
- **One number per candidate.** CMA-ES ranks candidates by one value; see :func:`scalarize`.
- **Failed candidates** (no objectives, or a NaN the store refused) get a defined fitness when
  their generation completes: the worst finite fitness of any successful trial so far (this
  generation included) plus ``FAIL_MARGIN``, or ``FAIL_FITNESS_BEFORE_ANY_SUCCESS`` when nothing
  has succeeded yet. CMA-ES only uses ranks, so this puts failures below every success of their
  generation, never in the middle (mergekit's evolve replaced them by the median, which rewards
  breaking things). It depends only on results, not on their arrival order, so replay agrees.
- **Resume by deterministic replay, not pickles.** Each trial records its generation, member index
  and unit vector. A new driver with the same seed re-asks pycma generation by generation and
  tells it the logged results; the first incomplete generation's missing members (never asked, or
  interrupted) are handed out again with the same vectors. The replayed vectors are checked
  against the logged ones, so a changed seed or space cannot silently fork the run.
"""

from __future__ import annotations

import logging
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution
from threadpoolctl import threadpool_limits

from evomerge.drivers.base import (
    ConstraintSpec,
    ObjectiveSpec,
    Proposal,
    Value,
    check_against_store,
    record_result,
    refuse_running_trials,
)
from evomerge.errors import EvomergeError
from evomerge.store import RunStore, TrialRecord

with warnings.catch_warnings():  # pycma warns at import when matplotlib is absent; plots are not used
    warnings.simplefilter("ignore", UserWarning)
    import cma

log = logging.getLogger(__name__)

# _ONE_THREAD: pycma decomposes a d x d covariance matrix (d = coordinates, tens) with numpy's BLAS;
# a multi-threaded BLAS spends ~25x longer on a 40 x 40 eigh than one thread does on 2 busy cores
# (21 ms against 0.8 ms measured here), and that time stops the loop. So pycma runs on one thread.

FAIL_MARGIN = 1.0
FAIL_FITNESS_BEFORE_ANY_SUCCESS = 1e6


def scalarize(
    measured: Mapping[str, float],
    objectives: Sequence[ObjectiveSpec],
    constraints: Sequence[ConstraintSpec] = (),
) -> float:
    """The score CMA-ES maximises (it minimises ``-score``).

    ``score = sum(w_i * s_i * v_i) - sum(penalty_j * max(0, v_j - bound_j))`` with ``s_i = +1``
    for a maximised objective and ``-1`` for a minimised one.
    """
    score = sum(o.weight * (1.0 if o.direction == "maximize" else -1.0) * measured[o.name] for o in objectives)
    score -= sum(c.penalty * max(0.0, measured[c.name] - c.bound) for c in constraints)
    return score


class CmaDriver:
    """pycma's CMAEvolutionStrategy behind the evomerge driver contract (see module docstring)."""

    name = "cma"

    def __init__(
        self,
        store: RunStore,
        *,
        x0: Sequence[float],
        sigma0: float,
        popsize: int,
        seed: int,
        from_unit: Callable[[Sequence[float]], Mapping[str, Value]],
        distributions: Mapping[str, BaseDistribution],
        objectives: Sequence[ObjectiveSpec],
        constraints: Sequence[ConstraintSpec] = (),
    ) -> None:
        if not all(0.0 <= v <= 1.0 for v in x0):
            raise ValueError("x0 must lie in the unit cube")
        if popsize < 2:
            raise ValueError("CMA-ES needs a population of at least 2")
        check_against_store(store, objectives, constraints)
        refuse_running_trials(store)
        self._store = store
        self._from_unit = from_unit
        self._distributions = dict(distributions)
        self._objectives = tuple(objectives)
        self._constraints = tuple(constraints)
        self.popsize = popsize
        self.seed = seed
        rng = np.random.default_rng(seed)
        self._es = cma.CMAEvolutionStrategy(
            list(map(float, x0)),
            float(sigma0),
            {
                "bounds": [0.0, 1.0],
                "popsize": popsize,
                "randn": lambda *shape: rng.standard_normal(shape),
                "seed": float("nan"),  # pycma's seed only seeds np.random; ours is ``rng``
                "verbose": -9,
                "verb_disp": 0,
                "verb_log": 0,  # no outcmaes/ files
            },
        )
        self._worst_fitness: float | None = None
        self.last_fitness: list[float] = []  # fitness pycma got for the last completed generation
        self._start_generation(0)
        self._replay(store.trials())

    # ---- the contract -----------------------------------------------------------------------

    def ask(self) -> Proposal | None:
        if not self._pending:
            return None  # every member is out; the next generation needs their results first
        member = self._pending.popleft()
        x = self._X[member]
        values = dict(self._from_unit(list(np.clip(x, 0.0, 1.0))))
        attrs = {"generation": self.generation, "member": member, "unit_x": [float(v) for v in x]}
        number = self._store.start_trial(values, self._distributions, attrs)
        self._outstanding[number] = member
        return Proposal(number, values, generation=self.generation)

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
        record = record_result(self._store, number, objectives, failed_reason, attrs)
        self._receive(self._outstanding.pop(number), record.objectives if record.state == "complete" else None)
        return record

    def state_dict(self) -> dict[str, Any]:
        return {
            "driver": self.name,
            "generation": self.generation,
            "sigma": float(self._es.sigma),
            "mean": [float(v) for v in self._es.mean],
            "waiting_for": sorted(self._outstanding),
            "stop": {k: str(v) for k, v in self.stop_reasons().items()},
        }

    def stop_reasons(self) -> dict[str, Any]:
        """pycma's termination criteria that hold now (empty while it is still making progress)."""
        return dict(self._es.stop())

    # ---- generations ------------------------------------------------------------------------

    def _start_generation(self, generation: int) -> None:
        self.generation = generation
        with threadpool_limits(limits=1):  # see _ONE_THREAD
            self._X: list[np.ndarray] = [np.asarray(x, dtype=float) for x in self._es.ask()]
        self._results: dict[int, Mapping[str, float] | None] = {}
        self._pending: deque[int] = deque(range(self.popsize))
        self._outstanding: dict[int, int] = {}  # trial number -> member index

    def _receive(self, member: int, measured: Mapping[str, float] | None) -> None:
        self._results[member] = measured
        if len(self._results) == self.popsize:
            self._finish_generation()

    def _finish_generation(self) -> None:
        scores = {m: scalarize(r, self._objectives, self._constraints) for m, r in self._results.items() if r is not None}
        for s in scores.values():
            self._worst_fitness = -s if self._worst_fitness is None else max(self._worst_fitness, -s)
        failed = self.popsize - len(scores)
        penalty = FAIL_FITNESS_BEFORE_ANY_SUCCESS if self._worst_fitness is None else self._worst_fitness + FAIL_MARGIN
        fitness = [-scores[m] if m in scores else penalty for m in range(self.popsize)]
        if failed:
            log.warning(
                "CMA generation %d: %d of %d candidates failed; ranked last with fitness %g",
                self.generation, failed, self.popsize, penalty,
            )
        with threadpool_limits(limits=1):
            self._es.tell(self._X, fitness)
        self.last_fitness = fitness
        self._start_generation(self.generation + 1)

    # ---- resume -----------------------------------------------------------------------------

    def _replay(self, trials: list[TrialRecord]) -> None:
        """Rebuild the strategy from the log: tell pycma every completed generation again."""
        done: dict[tuple[int, int], TrialRecord] = {}
        for t in trials:
            if not t.finished:
                continue  # interrupted: its member is handed out again below
            if "generation" not in t.attrs or "member" not in t.attrs:
                raise EvomergeError(f"trial {t.number} in {self._store.path} was not proposed by the CMA driver")
            done.setdefault((int(t.attrs["generation"]), int(t.attrs["member"])), t)
        replayed = 0
        while True:
            members = {m: done.get((self.generation, m)) for m in range(self.popsize)}
            for m, t in members.items():
                if t is None:
                    continue
                logged = np.asarray(t.attrs["unit_x"], dtype=float)
                if logged.shape != self._X[m].shape or not np.allclose(logged, self._X[m], rtol=0, atol=1e-9):
                    raise EvomergeError(
                        f"{self._store.path}: replaying CMA-ES did not reproduce trial {t.number} "
                        f"(generation {self.generation}, member {m}); the seed, population or search "
                        f"space differs from the run's, so it cannot be resumed"
                    )
                self._pending.remove(m)
            complete = all(t is not None for t in members.values())
            for m, t in members.items():
                if t is not None:
                    self._receive(m, t.objectives if t.state == "complete" else None)
                    replayed += 1
            if not complete:
                break
        ahead = sorted(g for g, _ in done if g > self.generation)
        if ahead:
            raise EvomergeError(
                f"{self._store.path}: the log has results for CMA generation {ahead[0]} while generation "
                f"{self.generation} is incomplete; the trial log is inconsistent"
            )
        if replayed:
            log.info("CMA replayed %d trials; resuming in generation %d", replayed, self.generation)
