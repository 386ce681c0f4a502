"""CMA-ES (pycma) on the unit cube, asked and told one trial at a time through the run store.

Why it looks the way it does:

- **Its own RNG.** pycma draws its normal samples from ``np.random.randn`` unless told otherwise,
  and lm-eval's ``simple_evaluate`` reseeds numpy's global RNG on every call: every generation
  would repeat the last one. The strategy gets option ``randn`` bound to a private
  ``np.random.Generator`` seeded from ``seed`` (pycma's own ``seed`` option only seeds the global
  RNG, so it is left unset).
- **Generations, told in a fixed order; workers kept busy by a lookahead.** Results come back
  in any order; pycma is told a generation once, in member order, when its last member is back.
  With ``lookahead = 0`` (today's generational scheme) ``ask`` returns None from the moment the
  last member of a generation is out until it is back, and workers wait for the slowest member
  (population 16 on 16 workers with evaluation times of coefficient of variation 0.3 keeps them
  busy 61% of the time; ``scripts/bench_cma_async.py``). With ``lookahead = A > 0`` the driver
  always has ``A`` candidates beyond the current generation to hand out: right after each ``tell``
  it samples the next generation's candidates from the distribution pycma has then, so the
  candidate stream runs ``A`` candidates ahead of the generation being completed. Generation ``g``
  still consists of the ``popsize`` candidates numbered ``g * popsize ...`` in that stream; those
  sampled before pycma reached iteration ``g`` (from the previous mean and covariance) are told
  as *injected* solutions (``CMAEvolutionStrategy.inject(..., force=True)``: pycma takes their
  steps from its current mean as they are, unclipped, and leaves them out of the active update),
  the rest are its own samples of iteration ``g``. Why this and not a steady-state or fully
  asynchronous CMA-ES: every candidate stays a function of the seed and the results alone,
  never of which worker finished first, so a resumed run proposes exactly what an uninterrupted
  one does (the kill test compares them member by member) and pycma's own update rules are used
  unchanged. ``A`` is recorded with every trial, and a resumed run keeps the ``A`` it started
  with (a run logged before lookahead existed replays with 0).
- **What a lookahead costs per trial, and the default.** A candidate handed out ahead lacks the
  results of the generation in front of it; with a fixed order this is inherent, since only a
  complete prefix of the stream can be told, and keeping ``W`` workers busy needs the stream to
  run ahead of that prefix by about the span of the slowest stragglers. While at most half of
  each generation is stale, the fresh members win most of the selection and the best score per
  trial stays level with the generational loop's (``scripts/bench_cma_async.py``: Rosenbrock,
  ellipsoid, sphere). Once whole generations are sampled a generation early (``A >= popsize``),
  pycma's every mean step starts from the mean the samples were drawn around, one generation
  back: the means form two interleaved chains that each move once per two generations, the
  cumulative step-size path sees their alternating steps as anticorrelated and shrinks sigma,
  and the covariance learns little; by 960 trials the distance to the optimum is many times
  the generational loop's on the sphere and the ellipsoid. (Telling stale samples as if drawn
  around the current mean, leaving them out of the update, or letting them into the active update
  did worse in a pycma-level trial of this stream.) So the search loop's default
  (``evomerge.search.default_lookahead``) is twice the worker count, at most half the
  population: no worse per trial, at the price of idle workers when ``W`` approaches the
  population (``search.lookahead`` buys the utilisation back, at the cost per trial the
  benchmark prints).
- **Why not over-sampling (measured, not adopted).** The other way to fill idle workers is to
  let them evaluate extra candidates sampled from the *current* distribution while a
  generation's stragglers run, and tell pycma whatever has come back (pycma accepts more than
  ``popsize`` solutions: it keeps ``mu`` positive weights and pads the negative ones with zeros);
  extras still running then go into a later tell. It never leaves a worker idle (98-99.6% busy
  in every setting), and the grouping, which depends on timing, could be recorded in the trial
  log and replayed. ``scripts/bench_cma_oversampling.py`` measured five variants on pycma
  (population 16; per trial: worst / median ratio of the distance to the optimum over the
  generational loop's): wherever a lookahead keeps workers 95% busy, it is ahead per trial of
  every variant: 8 workers, cv 0.3: lookahead 8, 1.29 / 0.94 (98.4% busy), against at best
  15.9 / 1.24; cv 0.6: lookahead 12, 2.08 / 1.13 (95.5%), against 11.6 / 1.14; 16 workers,
  cv 0.3: lookahead 24, 6.36 / 1.16 (98.7%), against 72 / 1.58. Only at 16 workers, cv 0.6, where no scheme measured meets both goals,
  is over-sampling ahead (46 / 1.66 against lookahead 48's 453 / 2.34). The cause is the same as
  the lookahead's: with ``W`` results in flight at every tell, about ``W - 1`` of them were
  sampled before the last update whatever the scheme, and telling extras in larger groups
  means fewer updates per trial. Telling every ``popsize / 2`` results (pycma run with half the
  population) did best of those (1.47 / 0.94 at 8 workers, cv 0.6, 99.5% busy), but it changes
  what ``search.population`` means.
- **The alternative that is no worse per trial: ``search.cma_update: window``**
  (:mod:`evomerge.drivers.cma_window`): every candidate a fresh sample of the current
  distribution, pycma told the last ``popsize`` results every ``popsize / 2`` arrivals, the
  timing-dependent grouping recorded in the log and replayed on resume. Same benchmark: 99.6% /
  99.5% busy and 1.04 / 0.27 and 0.974 / 0.37 per trial at 8 workers (cv 0.3 / 0.6); at 16
  workers 99.0% / 98.1% busy, 0.63 / 0.48 in the median but 42 / 48 at worst (the sphere at 960
  trials, where the generational loop is at 2e-4). It is not this driver's default yet: with it a
  run's candidates depend on arrival order, so the kill tests' member-by-member comparison with
  an uninterrupted run holds only for one worker.
- **One number per candidate.** CMA-ES ranks candidates by one value; see :func:`evomerge.objectives.scalarize`.
- **Failed candidates** (no objectives, or a NaN the store refused) get a defined fitness when
  their generation completes: the worst finite fitness of any successful trial so far (this
  generation included) plus ``FAIL_MARGIN``, or ``FAIL_FITNESS_BEFORE_ANY_SUCCESS`` when nothing
  has succeeded yet. CMA-ES only uses ranks, so this puts failures below every success of their
  generation, never in the middle (mergekit's evolve replaced them by the median, which rewards
  breaking things). It depends only on results, not on their arrival order, so replay agrees.
- **Candidates stopped at a lower rung** (multi-fidelity, :mod:`evomerge.rungs`) rank below every
  full-fidelity member of their generation and above its failures, ordered among themselves by the
  rung reached, then by their score there (:func:`stopped_fitness`). Why: their scores are means
  over fewer items, so set against whole evaluations a lucky 16-item mean would outrank a better
  candidate measured on every item; and they were stopped for ranking low at their rung, which is
  what the rung order keeps. pycma uses ranks only, so the values need only put them in that order;
  they depend on results alone, so replay agrees.
- **Resume by deterministic replay, not pickles.** Each trial records its generation, member index
  and unit vector. A new driver with the same seed re-asks pycma generation by generation and
  tells it the logged results; the first incomplete generation's missing members (never asked, or
  interrupted) are handed out again with the same vectors. The replayed vectors are checked
  against the logged ones, so a changed seed or space cannot silently fork the run.
"""

from __future__ import annotations

import heapq
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution
from threadpoolctl import ThreadpoolController

from evomerge.drivers.base import (
    Proposal,
    Value,
    check_against_store,
    record_result,
    refuse_running_trials,
)
from evomerge.errors import EvomergeError
from evomerge.hand_set import HAND_SET_ATTR
from evomerge.objectives import ConstraintSpec, ObjectiveSpec, scalarize
from evomerge.rungs import STOPPED_ATTR
from evomerge.store import RunStore, TrialRecord


def _import_pycma() -> Any:
    """pycma, imported without matplotlib and scipy.stats: pycma imports ``matplotlib.pyplot``
    (when installed: evomerge's ``plot`` extra installs it) for plots evomerge never draws, and
    ``scipy.stats`` for a rank correlation of its surrogate models, which evomerge does not use
    (pycma falls back to its own); the two cost about a second of every CMA search's start, and
    of every test that starts one. A process that already imported them keeps them; pycma's
    warning that matplotlib is missing is not shown."""
    import sys

    hidden = [name for name in ("matplotlib", "matplotlib.pyplot", "scipy.stats") if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # an import of it raises ImportError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            import cma
    finally:
        for name in hidden:
            if sys.modules.get(name, "") is None:
                del sys.modules[name]
    return cma


cma = _import_pycma()

log = logging.getLogger(__name__)

# _ONE_THREAD: pycma decomposes a d x d covariance matrix (d = coordinates, tens) with numpy's BLAS;
# a multi-threaded BLAS spends ~25x longer on a 40 x 40 eigh than one thread does on 2 busy cores
# (21 ms against 0.8 ms measured here), and that time stops the loop. So pycma runs on one thread.
# One controller per process: building one scans the loaded libraries (~2 ms), a limit is ~10 us.
_CONTROLLER: ThreadpoolController | None = None


def _one_thread() -> Any:
    global _CONTROLLER
    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=1)

FAIL_MARGIN = 1.0
FAIL_FITNESS_BEFORE_ANY_SUCCESS = 1e6


def check_start(x0: Sequence[float], popsize: int) -> None:
    """What every CMA-ES driver needs to start: a mean in the unit cube, a population of two or more."""
    if not all(0.0 <= v <= 1.0 for v in x0):
        raise ValueError("x0 must lie in the unit cube")
    if popsize < 2:
        raise ValueError("CMA-ES needs a population of at least 2")


def new_strategy(x0: Sequence[float], sigma0: float, popsize: int, seed: int, *, mirrors: bool) -> Any:
    """pycma's strategy as every evomerge CMA-ES driver runs it: in the unit cube, sampling from a
    private generator seeded with ``seed`` (never ``np.random``: see the module docstring), silent
    and writing no files. ``mirrors``: keep pycma's mirrored sampling (its default below population
    6); a driver that samples ahead or one candidate at a time turns it off."""
    rng = np.random.default_rng(seed)
    options: dict[str, Any] = {
        "bounds": [0.0, 1.0],
        "popsize": popsize,
        "randn": lambda *shape: rng.standard_normal(shape),
        "seed": float("nan"),  # pycma's seed only seeds np.random; ours is ``rng``
        "verbose": -9,
        "verb_disp": 0,
        "verb_log": 0,  # no outcmaes/ files
    }
    if not mirrors:
        options["CMA_mirrors"] = 0
    return cma.CMAEvolutionStrategy(list(map(float, x0)), float(sigma0), options)


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
        lookahead: int = 0,
    ) -> None:
        check_start(x0, popsize)
        if lookahead < 0:
            raise ValueError("lookahead must be 0 or more candidates")
        check_against_store(store, objectives, constraints)
        refuse_running_trials(store)
        trials = store.trials()
        self._store = store
        self._from_unit = from_unit
        self._distributions = dict(distributions)
        self._objectives = tuple(objectives)
        self._constraints = tuple(constraints)
        self.popsize = popsize
        self.seed = seed
        self.lookahead = _logged_lookahead(trials, lookahead)
        # Mirrored sampling (pycma's default below population 6) injects mirror directions ahead
        # of forced injections; the lookahead's own injections must come first.
        self._es = new_strategy(x0, sigma0, popsize, seed, mirrors=not self.lookahead)
        self._worst_fitness: float | None = None
        self.last_fitness: list[float] = []  # fitness pycma got for the last completed generation
        self.generation = 0  # the oldest generation not yet told to pycma
        self._units: dict[int, np.ndarray] = {}  # stream index -> the unit vector a candidate is evaluated at
        self._genos: dict[int, np.ndarray] = {}  # stream index -> pycma genotype, to inject it later
        self._drawn_in: dict[int, int] = {}  # stream index -> the pycma iteration that sampled it
        self._tell_X: list[np.ndarray] = []  # pycma's solutions for the current generation, in member order
        self._results: dict[int, Mapping[str, float] | None] = {}  # stream index -> result (None: failed)
        self._stopped: dict[int, int] = {}  # stream index -> the rung a candidate stopped at (multi-fidelity)
        self._pending: list[int] = []  # heap of stream indices to hand out, lowest first
        self._outstanding: dict[int, int] = {}  # trial number -> stream index
        self._sample(0)
        self._replay(trials)

    # ---- the contract -----------------------------------------------------------------------

    def ask(self) -> Proposal | None:
        if not self._pending:
            return None  # the candidates of the generation being completed are all out
        index = heapq.heappop(self._pending)
        x = self._units[index]
        generation, member = divmod(index, self.popsize)
        values = dict(self._from_unit(list(np.clip(x, 0.0, 1.0))))
        attrs = {"generation": generation, "member": member, "unit_x": [float(v) for v in x],
                 "lookahead": self.lookahead, "sampled_in": self._drawn_in[index]}
        number = self._store.start_trial(values, self._distributions, attrs)
        self._outstanding[number] = index
        return Proposal(number, values, generation=generation)

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
        self._receive(self._outstanding.pop(number), record.objectives if record.state == "complete" else None,
                      record.attrs.get(STOPPED_ATTR))
        return record

    def state_dict(self) -> dict[str, Any]:
        return {
            "driver": self.name,
            "generation": self.generation,
            "lookahead": self.lookahead,
            "sigma": float(self._es.sigma),
            "mean": [float(v) for v in self._es.mean],
            "waiting_for": sorted(self._outstanding),
            "stop": {k: str(v) for k, v in self.stop_reasons().items()},
        }

    def stop_reasons(self) -> dict[str, Any]:
        """pycma's termination criteria that hold now (empty while it is still making progress)."""
        return dict(self._es.stop())

    # ---- the candidate stream and its generations -------------------------------------------

    def _sample(self, iteration: int) -> None:
        """pycma's ask for ``iteration``: re-create generation ``iteration``'s members sampled
        earlier (as injected solutions) and sample ``popsize`` new candidates, the stream's next."""
        k = self.popsize
        first = iteration * k
        older = [i for i in range(first, first + k) if i in self._units]  # sampled in an earlier iteration
        new_from = first + self.lookahead if iteration else 0  # iteration i samples [i*k + A, (i+1)*k + A)
        new_count = k if iteration else k + self.lookahead
        with _one_thread():  # see _ONE_THREAD
            if older:
                self._es.inject([self._genos[i] for i in older], force=True)
            X = [np.asarray(x, dtype=float) for x in self._es.ask(number=len(older) + new_count)]
            for j, x in enumerate(X[len(older):]):
                index = new_from + j
                self._units[index] = x
                self._drawn_in[index] = iteration
                if index >= first + k:  # for a later generation: keep its genotype to inject then
                    self._genos[index] = self._es.gp.geno(
                        np.array(x), from_bounds=self._es.boundary_handler.inverse, archive=self._es.sent_solutions
                    )
                heapq.heappush(self._pending, index)
        # pycma's objects for this generation, in member order: the injected ones, then its own
        self._tell_X = X[: len(older)] + X[len(older): len(older) + k - len(older)]
        for i in older:
            self._genos.pop(i)

    def _receive(self, index: int, measured: Mapping[str, float] | None, stopped_at: int | None = None) -> None:
        self._results[index] = measured
        if stopped_at is not None and measured is not None:
            self._stopped[index] = int(stopped_at)
        k = self.popsize
        while all(i in self._results for i in range(self.generation * k, (self.generation + 1) * k)):
            self._finish_generation()

    def _finish_generation(self) -> None:
        k, first = self.popsize, self.generation * self.popsize
        results = {m: self._results.pop(first + m) for m in range(k)}
        stopped = {m: self._stopped.pop(first + m) for m in range(k) if first + m in self._stopped}
        scores = {m: scalarize(r, self._objectives, self._constraints) for m, r in results.items() if r is not None}
        full = {m: -s for m, s in scores.items() if m not in stopped}
        for f in full.values():
            self._worst_fitness = f if self._worst_fitness is None else max(self._worst_fitness, f)
        ranked = stopped_fitness({m: (stopped[m], scores[m]) for m in stopped}, list(full.values()), self._worst_fitness)
        failed = k - len(scores)
        penalty = FAIL_FITNESS_BEFORE_ANY_SUCCESS if self._worst_fitness is None else self._worst_fitness + FAIL_MARGIN
        if ranked:
            penalty = max(penalty, max(ranked.values()) + FAIL_MARGIN)
        fitness = [full[m] if m in full else ranked.get(m, penalty) for m in range(k)]
        if failed:
            log.warning(
                "CMA generation %d: %d of %d candidates failed; ranked last with fitness %g",
                self.generation, failed, k, penalty,
            )
        with _one_thread():
            self._es.tell(self._tell_X, fitness)
        self.last_fitness = fitness
        for i in range(first, first + k):
            self._units.pop(i)
            self._drawn_in.pop(i)
        self.generation += 1
        self._sample(self.generation)

    # ---- resume -----------------------------------------------------------------------------

    def _replay(self, trials: list[TrialRecord]) -> None:
        """Rebuild the strategy from the log: tell pycma every completed generation again, in order."""
        done: dict[int, TrialRecord] = {}
        for t in trials:
            if not t.finished:
                continue  # interrupted: its candidate is handed out again
            if HAND_SET_ATTR in t.attrs:
                continue  # a hand-set trial, outside the generations (evomerge.drivers.hand_set)
            if "generation" not in t.attrs or "member" not in t.attrs:
                raise EvomergeError(f"trial {t.number} in {self._store.path} was not proposed by the CMA driver")
            done.setdefault(int(t.attrs["generation"]) * self.popsize + int(t.attrs["member"]), t)
        replayed = 0
        for index in sorted(done):
            if index not in self._units:  # not sampled yet: the generation before it never completed
                generation, member = divmod(index, self.popsize)
                raise EvomergeError(
                    f"{self._store.path}: the log has a result for CMA generation {generation}, member {member}, "
                    f"while generation {self.generation} is incomplete; the trial log is inconsistent"
                )
            t = done[index]
            logged = np.asarray(t.attrs["unit_x"], dtype=float)
            if logged.shape != self._units[index].shape or not np.allclose(logged, self._units[index], rtol=0, atol=1e-9):
                raise EvomergeError(
                    f"{self._store.path}: replaying CMA-ES did not reproduce trial {t.number} "
                    f"(generation {t.attrs['generation']}, member {t.attrs['member']}); the seed, population, "
                    f"lookahead or search space differs from the run's, so it cannot be resumed"
                )
            self._pending.remove(index)
            heapq.heapify(self._pending)
            self._receive(index, t.objectives if t.state == "complete" else None, t.attrs.get(STOPPED_ATTR))
            replayed += 1
        if replayed:
            log.info("CMA replayed %d trials; resuming in generation %d", replayed, self.generation)


def stopped_fitness(
    stopped: Mapping[int, tuple[int, float]], full: Sequence[float], worst_so_far: float | None
) -> dict[int, float]:
    """Fitness (lower is better) for a generation's members stopped at a lower rung, ``{member:
    (rung reached, scalar score there)}``: just above the worst full-fidelity fitness of the
    generation (of the run so far when the generation has none), in the order of rung reached,
    then score, a step of ``FAIL_MARGIN / (len(stopped) + 1)`` apart (see the module docstring)."""
    if not stopped:
        return {}
    base = max(full) if full else (worst_so_far if worst_so_far is not None else 0.0)
    order = sorted(stopped, key=lambda m: (-stopped[m][0], -stopped[m][1], m))
    step = FAIL_MARGIN / (len(stopped) + 1)
    return {m: base + step * (i + 1) for i, m in enumerate(order)}


def _logged_lookahead(trials: list[TrialRecord], asked: int) -> int:
    """The lookahead a run was started with (0 for runs logged before it existed), else ``asked``."""
    for t in trials:
        if "member" in t.attrs:
            logged = int(t.attrs.get("lookahead", 0))
            if logged != asked:
                log.info("CMA: this run was started with lookahead %d; keeping it (asked for %d)", logged, asked)
            return logged
    return asked
