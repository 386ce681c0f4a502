"""The space file: what to merge, what to search, how to score it, and where to run.

The names the rest of evomerge imports are re-exported here.
"""

from __future__ import annotations

from evomerge.space_config.schema import (
    BASE_NAME,
    MERGED_NAME,
    Constraint,
    Donor,
    Evaluation,
    MergeSection,
    Models,
    Objective,
    ParamSpec,
    ResolvedParam,
    RouteSection,
    ScaleSpec,
    Search,
    SpaceConfig,
    TaskEvaluation,
    Workers,
    load_space_config,
    parse_space_config,
    plain_data,
    resume_config,
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
    "TaskEvaluation",
    "Workers",
    "load_space_config",
    "parse_space_config",
    "plain_data",
    "resume_config",
]
