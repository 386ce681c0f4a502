"""The run's front: the Pareto front kept as trials finish, and ``pareto.json``, its summary on disk.

``pareto.json`` is for a person or a script glancing at a run (``jq .front pareto.json``): the run's
objectives and constraints, the trial counts, and each front member by reference (its trial
number, objective values and constraint violation). Recipes stay in the trial log, where
``evomerge show`` and ``evomerge export`` read them; a file that held every front member's whole
recipe grew by kilobytes per member and was rewritten after every trial.

The file is rewritten at most every ``interval_s`` seconds while trials finish, and whenever the
run is closed (so a run that ends, or stops on an error, leaves it current), always atomically.
A process killed between two writes leaves it a few seconds behind the log; the next process to
drive the run rewrites it first thing. The dominance rules are :mod:`evomerge.pareto`'s.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from evomerge.pareto import IncrementalFront
from evomerge.rungs import full_fidelity
from evomerge.store.run_folder import PARETO_FILE, write_atomic
from evomerge.store.trial_log import TrialCounts, TrialRecord

INTERVAL_ENV = "EVOMERGE_PARETO_INTERVAL_S"


def _interval_from_env(default: float = 2.0) -> float:
    """The rewrite interval: ``EVOMERGE_PARETO_INTERVAL_S`` when set to a number of seconds (0: after
    every trial, which a reliability test that kills a search inside the Nth write of pareto.json
    needs, and a person following a run live may want), else ``default``."""
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, default)))
    except ValueError:
        return default


DEFAULT_INTERVAL_S = _interval_from_env()


@dataclass
class Spent:
    """What a run's scoring has cost so far: the budget that decides a real search (DESIGN.md)."""

    forward_passes: int = 0
    generated_tokens: int = 0
    scored_trials: int = 0

    def add(self, record: TrialRecord) -> None:
        if record.cost:
            self.forward_passes += record.forward_passes
            self.generated_tokens += record.generated_tokens
            self.scored_trials += 1


class RunFront:
    """The current front of a run's trials, and the throttled writer of its ``pareto.json``."""

    def __init__(
        self,
        folder: Path,
        run_name: str,
        directions: Mapping[str, str],
        constraints: Mapping[str, float],
        interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        self.path = folder / PARETO_FILE
        self.run_name = run_name
        self.directions = dict(directions)
        self.constraints = dict(constraints)
        self.interval_s = interval_s
        self._front: IncrementalFront[TrialRecord] | None = None  # built from the log when first needed
        self.spent = Spent()  # forward passes and generated tokens of every scored trial, kept as they finish
        self._last_write = -float("inf")
        self._stale = False

    @property
    def built(self) -> bool:
        return self._front is not None

    def build(self, records: list[TrialRecord]) -> None:
        """The front of ``records`` (every trial of the run), from scratch."""
        self._front = IncrementalFront(self.directions)
        self.spent = Spent()
        for r in records:
            self.spent.add(r)
            if r.state == "complete" and full_fidelity(r):
                self._front.add(r)

    def add(self, record: TrialRecord) -> None:
        """A trial finished; it joins the front when nothing on the front dominates it. A trial
        stopped at a lower rung never does: the front ranks whole evaluations only (:mod:`evomerge.rungs`)."""
        if self._front is not None:
            self.spent.add(record)
            if record.state == "complete" and full_fidelity(record):
                self._front.add(record)
        self._stale = True

    def members(self) -> list[TrialRecord]:
        """The front in trial-number order (build first)."""
        assert self._front is not None, "build the front first"
        return sorted(self._front.members, key=lambda r: r.number)

    def due(self) -> bool:
        """Whether pareto.json is behind the log and ``interval_s`` has passed since the last write."""
        return self._stale and time.monotonic() - self._last_write >= self.interval_s

    def rewrite(self, counts: TrialCounts) -> None:
        """Rewrite pareto.json now (atomically; build first)."""
        write_atomic(self.path, pareto_text(self.run_name, self.directions, self.constraints, self.members(), counts,
                                            self.spent))
        self._last_write = time.monotonic()
        self._stale = False

    @property
    def stale(self) -> bool:
        return self._stale


def pareto_text(
    name: str,
    directions: Mapping[str, str],
    constraints: Mapping[str, float],
    front: list[TrialRecord],
    counts: TrialCounts,
    spent: Spent | None = None,
) -> str:
    doc = {
        "run": name,
        "objectives": dict(directions),
        "constraints": dict(constraints),
        "counts": {**asdict(counts), "finished": counts.finished},
        "spent": asdict(spent or Spent()),
        "front": [
            {"number": t.number, "objectives": dict(t.objectives or {}), "violation": t.violation,
             "forward_passes": t.forward_passes}
            for t in sorted(front, key=lambda t: t.number)
        ],
        "front_of": "trials scored on every item (trials stopped at a lower rung are left out)",
        "recipes": "in the trial log: evomerge show / evomerge export --trial N",
    }
    return json.dumps(doc, indent=2) + "\n"
