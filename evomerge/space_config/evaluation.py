"""The ``evaluation:`` section: how lm-eval scores each candidate, and which items every trial sees.

A count of items is drawn once per task from its own seeded RNG (:meth:`Evaluation.item_indices`),
so every trial of a run, and every resume of it, scores the same items.
"""

from __future__ import annotations

import json
import random
from typing import Any, Literal

from pydantic import Field, field_validator

from ..errors import ConfigError
from .base import FieldError, _Strict

#: lm-eval arguments evomerge sets itself; passing them through would silently fight its own.
RESERVED_LM_EVAL_ARGS = {
    "model": "evomerge passes the merged model itself",
    "model_args": "evomerge passes the merged model itself",
    "tasks": "tasks come from objectives: and constraints:",
    "task_manager": "evomerge builds one per worker from evaluation.include_path",
    "samples": "use evaluation.items",
    "limit": "use evaluation.items",
    "num_fewshot": "use evaluation.num_fewshot",
    "batch_size": "use evaluation.batch_size",
    "bootstrap_iters": "evomerge sets 0: standard errors are not used by the search",
    "use_cache": "lm-eval's cache keys on the request, not the model; it would mix candidates",
    "cache_requests": "lm-eval's cache keys on the request, not the model; it would mix candidates",
}


class TaskEvaluation(_Strict):
    """Per-task overrides of the evaluation defaults."""

    items: int | tuple[int, ...] | None = None
    """This task's item count or list of item indices; default: ``evaluation.items``."""
    num_fewshot: int | None = Field(default=None, ge=0)
    """This task's few-shot count; default: ``evaluation.num_fewshot``."""

    @field_validator("items")
    @classmethod
    def _items(cls, value: int | tuple[int, ...] | None) -> int | tuple[int, ...] | None:
        return _check_items(value)


def _check_items(value: int | tuple[int, ...] | None) -> int | tuple[int, ...] | None:
    if isinstance(value, int) and value < 1:
        raise ValueError(f"items must be at least 1, got {value}; remove it to use every item")
    if isinstance(value, tuple):
        if not value:
            raise ValueError("an empty item list evaluates nothing; list item indices or remove it")
        if any(i < 0 for i in value) or len(set(value)) != len(value):
            raise ValueError("item indices must be distinct and not negative")
    return value


class Rungs(_Strict):
    """Multi-fidelity evaluation: each candidate is scored on a few items per task first and
    promoted to more only while it can still matter (asynchronous successive halving, ASHA).

    Rung ``k`` holds ``min_items * eta**k`` items of each task (every item at the top rung), taken
    in one fixed shuffled order per task, so each rung is a superset of the one below: a promoted
    candidate is scored only on the new items and its per-item results are combined with those of
    the rung below (so only metrics lm-eval aggregates by ``mean`` are accepted). A candidate goes
    up a rung only while it ranks in the best ``1/eta`` of the candidates that reached that rung
    (one objective: Optuna's ``SuccessiveHalvingPruner``) or is dominated by few enough of them
    (several objectives: it is within the best ``1/eta`` of its rung ranked by how many others
    dominate it, then by the sum of its objectives). Hand-set trials start at the first rung
    too and climb together: the best of them goes up, and so does each one its rung's items cannot
    yet tell from the best. The Pareto front, ``export --best`` and CMA-ES's ranking use top-rung results only
    (a candidate stopped early ranks below every full-fidelity one of its generation)."""

    min_items: int = Field(ge=1)
    """Items per task at the first rung (a task with fewer items has one rung: all of them)."""
    eta: int = Field(default=3, ge=2)
    """Each rung holds ``eta`` times the items of the one below; about one candidate in ``eta`` goes up."""

    def sizes(self, total: int) -> list[int]:
        """Items per rung for a task of ``total`` items, the last being ``total``."""
        out: list[int] = []
        n = self.min_items
        while n < total:
            out.append(n)
            n *= self.eta
        return [*out, total]


class Evaluation(_Strict):
    """How each candidate is scored with lm-eval; every trial sees the same items.

    ``items`` is either a count N (N item indices drawn once, with ``seed``, from the task's
    documents: see :meth:`item_indices`) or an explicit list of indices; absent means all items.
    """

    items: int | None = None
    """Items each trial scores per task: N drawn once with ``seed`` (the same N for every trial); absent: every item."""
    num_fewshot: int | None = Field(default=None, ge=0)
    """Few-shot examples per item (lm-eval's ``num_fewshot``); absent: the task's own default."""
    batch_size: int | Literal["auto"] = 8
    """lm-eval's batch size, a number or ``auto``."""
    seed: int = 0
    """Seeds the draw of ``items`` (per task, independent of the other tasks)."""
    include_path: tuple[str, ...] = ()
    """Folders of lm-eval task YAMLs to search for the tasks named by objectives and constraints; empty: the project's
    ``eval_tasks/``. lm-eval's own tasks are found either way."""
    tasks: dict[str, TaskEvaluation] = Field(default_factory=dict)
    """Per-task overrides of ``items`` and ``num_fewshot``, keyed by task name."""
    lm_eval_args: dict[str, Any] = Field(default_factory=dict)
    """Further arguments for lm-eval's ``simple_evaluate`` (plain values), except those evomerge sets itself."""
    rungs: Rungs | None = None
    """Multi-fidelity evaluation (``{min_items: 16, eta: 3}``: 16, 48, 144 ... items per task); absent: every trial
    scores every item."""

    @field_validator("items")
    @classmethod
    def _items(cls, value: int | None) -> int | None:
        return _check_items(value)  # type: ignore[return-value]

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"batch_size must be at least 1 (or auto), got {value}")
        return value

    @field_validator("lm_eval_args")
    @classmethod
    def _passthrough(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key in RESERVED_LM_EVAL_ARGS:
                raise FieldError((key,), f"evomerge sets '{key}' itself: {RESERVED_LM_EVAL_ARGS[key]}")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"must hold plain values (text, numbers, lists, mappings): {err}") from None
        return value

    def for_task(self, task: str) -> TaskEvaluation:
        """The task's settings with the defaults filled in."""
        own = self.tasks.get(task, TaskEvaluation())
        return TaskEvaluation.model_construct(
            items=own.items if own.items is not None else self.items,
            num_fewshot=own.num_fewshot if own.num_fewshot is not None else self.num_fewshot,
        )

    def item_indices(self, task: str, num_docs: int) -> list[int] | None:
        """The fixed item indices ``task`` uses (None: all), for lm-eval's ``samples=``.

        A count draws from its own RNG seeded by (seed, task), so the subset never depends on
        numpy's global RNG (lm-eval reseeds it) nor on which other tasks are listed.
        """
        items = self.for_task(task).items
        if items is None:
            return None
        if isinstance(items, int):
            if items > num_docs:
                raise ConfigError(
                    f"asks for {items} items but task {task!r} has {num_docs}; lower it or remove it to use all",
                    where=f"evaluation.{'tasks.' + task + '.' if task in self.tasks else ''}items",
                )
            return sorted(random.Random(f"{self.seed}:{task}").sample(range(num_docs), items))
        too_big = [i for i in items if i >= num_docs]
        if too_big:
            raise ConfigError(
                f"item indices {too_big[:5]} are past the end of task {task!r}, which has {num_docs} items",
                where=f"evaluation.tasks.{task}.items",
            )
        return sorted(items)
