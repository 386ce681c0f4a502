"""The run store: one folder per run, the Optuna study inside it as the trial log, and its front.

``RunStore`` (in :mod:`~evomerge.store.run_store`) joins three parts, each a module with one job:
:mod:`~evomerge.store.run_folder` (the folder, its files, atomic writes, identity, database URL),
:mod:`~evomerge.store.trial_log` (the study as trial records: ask/tell, annotate, requeue, counts)
and :mod:`~evomerge.store.front` (the incremental Pareto front and ``pareto.json``). The names the
rest of evomerge imports are re-exported here.
"""

from __future__ import annotations

import os  # noqa: F401  (tests patch os.rename through this module)

from evomerge.store.front import DEFAULT_INTERVAL_S as PARETO_INTERVAL_S
from evomerge.store.run_folder import (
    DB_FILE,
    HASH_FILE,
    PARETO_FILE,
    RUN_FILE,
    SPACE_FILE,
    expand_env,
    redact_url,
    write_atomic,
)
from evomerge.store.run_store import RunStore
from evomerge.store.trial_log import (
    ERROR_ATTR,
    FAIL_KIND_ATTR,
    INTERRUPTED_REASON,
    OBJECTIVES_ATTR,
    RECIPE_ATTR,
    TIMINGS_ATTR,
    TrialCounts,
    TrialRecord,
    count_trials,
)

__all__ = [
    "DB_FILE",
    "ERROR_ATTR",
    "FAIL_KIND_ATTR",
    "HASH_FILE",
    "INTERRUPTED_REASON",
    "OBJECTIVES_ATTR",
    "PARETO_FILE",
    "PARETO_INTERVAL_S",
    "RECIPE_ATTR",
    "RUN_FILE",
    "SPACE_FILE",
    "TIMINGS_ATTR",
    "RunStore",
    "TrialCounts",
    "TrialRecord",
    "count_trials",
    "expand_env",
    "redact_url",
    "write_atomic",
]
