"""The space file: what to merge, what to search, how to score it, and where to run.

A space file is YAML, read by :mod:`evomerge.strict_yaml` (``yaml.safe_load`` that refuses a key
written twice) and validated into frozen pydantic models.
Every mistake becomes one :class:`~evomerge.errors.ConfigError` whose message names the file and
the field path and says how to fix it (``space.yaml: merge.parameters.density.range: low 0.9 is
above high 0.2; write [low, high]``), so the CLI can print it and exit with status 2 before any
run folder exists. Unknown keys are errors with close matches: a misspelled ``densty`` must never
quietly fall back to a default and waste a night of search.

One module per job, from the ground up: ``base`` (strict models, field errors), ``params`` (the
``merge:`` section and parameter resolution), ``evaluation`` (which items every trial scores),
``identity`` (what defines a run; the one config diff), ``schema`` (the other sections and the
whole file), ``messages`` (validation errors in words), ``loading`` (a file or a run folder into
a config). The names the rest of evomerge imports are re-exported here.
"""

from __future__ import annotations

from evomerge.space_config.evaluation import Evaluation, Rungs, TaskEvaluation
from evomerge.space_config.loading import (
    load_space_config,
    parse_space_config,
    plain_data,
    resume_config,
)
from evomerge.space_config.params import MergeSection, ParamSpec, ResolvedParam
from evomerge.space_config.schema import (
    BASE_NAME,
    MERGED_NAME,
    Constraint,
    Donor,
    Models,
    Objective,
    RouteSection,
    ScaleSpec,
    Search,
    SpaceConfig,
    Workers,
)

__all__ = [
    "BASE_NAME",
    "MERGED_NAME",
    "Constraint",
    "Donor",
    "Evaluation",
    "MergeSection",
    "Models",
    "Objective",
    "ParamSpec",
    "ResolvedParam",
    "RouteSection",
    "ScaleSpec",
    "Search",
    "SpaceConfig",
    "Rungs",
    "TaskEvaluation",
    "Workers",
    "load_space_config",
    "parse_space_config",
    "plain_data",
    "resume_config",
]
