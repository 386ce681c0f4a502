"""Scoring a live model with lm-evaluation-harness, the way every search worker does it.

One :class:`LmEvalScorer` per worker: it indexes the task folder once (``TaskManager`` with
``include_defaults=False`` takes milliseconds instead of ~12 s for lm-eval's built-in tasks) and
then scores any number of candidate models in memory. Each call avoids lm-eval's traps:

- ``simple_evaluate`` reseeds Python's, numpy's and torch's global RNGs unless told not to; the
  optimiser's sampling would then repeat every generation. All three seeds are passed as ``None``.
- the response cache keys on the request, not the model, so a shared cache would hand one
  candidate another's answers: no cache is used.
- ``bootstrap_iters=0``: stderr bootstraps cost seconds and the search never reads them.
- fixed ``samples`` (or ``limit``) so that every trial is scored on the same items.

lm_eval and transformers are imported inside the methods: ``evomerge merge`` must not load them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, close_matches

if TYPE_CHECKING:
    from transformers import PreTrainedModel

EVAL_TASKS_DIR = Path(__file__).resolve().parents[1] / "eval_tasks"


class UnknownTaskError(ConfigError):
    """No task folder defines ``task``; the caller knows which config field named it."""

    def __init__(self, task: str, message: str) -> None:
        self.task = task
        super().__init__(message)


def objective_name(task: str, metric: str) -> str:
    """The project-wide objective name for one metric of one task, e.g. ``task:toy_arith/acc``."""
    return f"task:{task}/{metric}"


@functools.lru_cache(maxsize=4)
def _full_index(paths: tuple[str, ...]) -> Any:
    """lm-eval's task index with its own tasks and ``paths``: built once per process (it reads
    thousands of YAML files) and only read afterwards."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=True)


class LmEvalScorer:
    """Scores models on a fixed list of lm-eval tasks; build once, call :meth:`score` per model.

    ``samples`` maps a task to the document indices to score (lm-eval's ``samples=``); ``limit``
    takes the first N documents of every task instead. ``extra_args`` go to ``simple_evaluate``
    unchanged, for options this class does not name.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        include_path: Path | Sequence[Path] = EVAL_TASKS_DIR,
        samples: Mapping[str, Sequence[int]] | None = None,
        limit: int | None = None,
        batch_size: int = 32,
        num_fewshot: int | None = None,
        extra_args: Mapping[str, Any] | None = None,
    ) -> None:
        from lm_eval.tasks import TaskManager

        if not tasks:
            raise ConfigError("no evaluation tasks given; name at least one lm-eval task")
        if samples is not None and limit is not None:
            raise ConfigError("give either samples or limit, not both (lm-eval rejects the pair)")
        folders = [Path(include_path)] if isinstance(include_path, (str, Path)) else [Path(p) for p in include_path]
        for folder in folders:
            if not folder.is_dir():
                raise ConfigError(f"task folder {folder} does not exist; point include_path at a folder of lm-eval task YAMLs")
        # lm-eval logs a warning per task per call for tasks with a custom loader (ours); the
        # scores are what matter, and real errors still come through.
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        paths = tuple(str(f) for f in folders)
        # the task folders alone index in milliseconds; lm-eval's own tasks (arc_challenge,
        # gsm8k, ...) take about 10 s to index, so they are indexed only when a task needs them
        self.task_manager = TaskManager(include_path=list(paths), include_defaults=False)
        local = self.task_manager.all_tasks
        if any(task not in local for task in tasks):
            self.task_manager = _full_index(paths)
        known = self.task_manager.all_tasks
        for task in tasks:
            if task not in known:
                where = ", ".join(str(f) for f in folders)
                hint = close_matches(task, local) or close_matches(task, known)  # the user's own tasks first
                raise UnknownTaskError(task, f"unknown lm-eval task {task!r}: not in {where} nor among lm-eval's "
                                             f"own tasks.{hint}")
        for task in samples or {}:
            if task not in tasks:
                raise ConfigError(f"samples names task {task!r}, which is not among the tasks scored: {list(tasks)}")
        self.tasks = list(tasks)
        self.samples = {t: list(idx) for t, idx in samples.items()} if samples is not None else None
        self.limit = limit
        self.batch_size = batch_size
        self.num_fewshot = num_fewshot
        self.extra_args = dict(extra_args or {})
        self._task_objects: dict[str, Any] = {}

    def _task(self, task: str) -> Any:
        """lm-eval's Task object (its documents loaded), built on first use and kept."""
        if task not in self._task_objects:
            self._task_objects.update(self.task_manager.load([task])["tasks"])
        return self._task_objects[task]

    def num_docs(self, task: str) -> int:
        """How many documents ``task`` scores from (its test split, else validation)."""
        return len(list(self._task(task).eval_docs))

    def fewshot_pool_size(self, task: str) -> int:
        """How many documents lm-eval draws ``task``'s few-shot examples from (its fewshot
        split, else training, validation, then test documents)."""
        docs = self._task(task).fewshot_docs()
        return len(list(docs)) if docs is not None else 0

    def metrics(self) -> dict[str, tuple[str, ...]]:
        """The metric names each task reports, e.g. ``{"toy_arith": ("acc",)}``; a task with
        filters (gsm8k) also reports ``metric,filter`` names, as :meth:`score` names them."""
        out: dict[str, tuple[str, ...]] = {}
        for task in self.tasks:
            config = self._task(task).config
            metrics = [m["metric"] for m in config.metric_list]
            filters = [f["name"] for f in (getattr(config, "filter_list", None) or []) if isinstance(f, dict)]
            if not filters:  # lm-eval's default filter is "none", which score() leaves out of the name
                out[task] = tuple(metrics)
            else:  # a filter list replaces the default: each metric is reported per filter
                out[task] = tuple(m if f == "none" else f"{m},{f}" for f in filters for m in metrics)
        return out

    def score(self, model: PreTrainedModel, tokenizer) -> dict[str, float]:
        """Every metric of every task for ``model``, as ``{"task:<task>/<metric>": value}``."""
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM

        # HFLM warns on every call that it was handed a live model; that is the point here.
        logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, device=str(model.device))
        args: dict[str, Any] = {
            "bootstrap_iters": 0,
            "use_cache": None,
            "cache_requests": False,
            "log_samples": False,
            "random_seed": None,
            "numpy_random_seed": None,
            "torch_random_seed": None,
            "verbosity": "ERROR",
        }
        args.update(self.extra_args)
        results = evaluator.simple_evaluate(
            model=lm,
            tasks=self.tasks,
            task_manager=self.task_manager,
            samples=self.samples,
            limit=self.limit,
            num_fewshot=self.num_fewshot,
            **args,
        )
        scores: dict[str, float] = {}
        for task in self.tasks:
            for key, value in results["results"][task].items():
                metric, _, filter_name = key.partition(",")
                # lm-eval also reports bookkeeping (alias, sample_len) and stderrs next to metrics.
                if metric in ("alias", "sample_len") or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                    continue
                name = metric if filter_name in ("", "none") else f"{metric},{filter_name}"
                scores[objective_name(task, name)] = float(value)
        return scores
