"""Scoring a live model with lm-evaluation-harness, the way every search worker does it.

One :class:`LmEvalScorer` per worker. It indexes the task folder once (``TaskManager`` with
``include_defaults=False`` takes milliseconds instead of ~12 s for lm-eval's built-in tasks), loads
each task's documents once, builds each task's requests (prompts with their few-shot contexts) once,
and wraps the live model once. Scoring a candidate is then only its forward passes plus lm-eval's
own filters, ``process_results`` and aggregation: the same steps, in the same order, that
``lm_eval.evaluator.evaluate`` runs, so the scores are lm-eval's (a test holds them equal to
``simple_evaluate``'s). ``simple_evaluate`` itself is not called per candidate because it pays
fixed costs a search cannot afford on every trial: it reloads every task's documents, rebuilds
every request, and collects environment information (``pip list`` in a subprocess, git hashes).

lm-eval's traps, avoided:

- ``simple_evaluate`` reseeds Python's, numpy's and torch's global RNGs; the optimiser's sampling
  would then repeat every generation. Nothing here touches a global RNG.
- the response cache keys on the request, not the model, so a shared cache would hand one
  candidate another's answers: no cache is used.
- stderr bootstraps cost seconds and the search never reads them: none are computed.
- fixed ``samples`` (or ``limit``) so that every trial is scored on the same items.

Each evaluation also says what it cost (:class:`EvalCost`): the items scored, the requests sent to
the model by kind (one forward pass over its sequence each; a generation request is its prefill)
and the tokens generated, so a search can count the forward passes it spends.

Options that only ``simple_evaluate`` understands (anything outside :data:`FAST_PATH_ARGS` in
``extra_args``), and task groups (whose scores lm-eval aggregates over subtasks), take the
``simple_evaluate`` path, with the same scores; that path skips its environment report (torch's
``collect_env``, which runs ``pip list``: about 2 s a call) and ``git describe``
(:func:`_skip_run_metadata`), but still reloads documents and rebuilds requests on every call.

lm_eval and transformers are imported inside the methods: ``evomerge merge`` must not load them.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, close_matches

if TYPE_CHECKING:
    from transformers import PreTrainedModel

EVAL_TASKS_DIR = Path(__file__).resolve().parents[1] / "eval_tasks"


# ``simple_evaluate`` options the fast path applies itself, as simple_evaluate would; any other
# option in ``extra_args`` sends scoring through simple_evaluate.
FAST_PATH_ARGS = frozenset({
    "system_instruction", "apply_chat_template", "fewshot_as_multiturn", "gen_kwargs", "fewshot_random_seed",
    "confirm_run_unsafe_code",
})
_FEWSHOT_SEED = 1234  # simple_evaluate's default fewshot_random_seed: the same few-shot contexts as lm-eval picks
# Keys simple_evaluate takes that the fast path must accept and ignore (they only steer what it skips).
_ALWAYS_OFF = ("bootstrap_iters", "use_cache", "cache_requests", "log_samples", "random_seed", "numpy_random_seed",
               "torch_random_seed", "verbosity")


@dataclass(frozen=True)
class EvalCost:
    """What scoring one model cost: the budget a search spends, counted rather than timed.

    ``requests`` counts what was sent to the model by lm-eval request kind (``loglikelihood``,
    ``loglikelihood_rolling``, ``generate_until``), repeats included: each is one forward pass over
    its sequence (for a generation, the prefill); ``generated_tokens`` counts the tokens the
    generations produced, each one more step of the model.
    """

    items: dict[str, int]
    requests: dict[str, int]
    generated_tokens: int = 0

    @property
    def forward_passes(self) -> int:
        return sum(self.requests.values())

    def to_dict(self) -> dict[str, Any]:
        return {"items": dict(self.items), "requests": dict(self.requests), "forward_passes": self.forward_passes,
                "generated_tokens": self.generated_tokens}


@dataclass(frozen=True)
class Evaluation:
    """Scores of one model (``{"task:<task>/<metric>": value}``) and what they cost."""

    scores: dict[str, float]
    cost: EvalCost


@dataclass
class _PreparedTask:
    """One task's requests, built once: per document, its instances in lm-eval's order."""

    task: Any
    by_doc: dict[int, list[Any]] = field(default_factory=dict)


class UnknownTaskError(ConfigError):
    """No task folder defines ``task``; the caller knows which config field named it."""

    def __init__(self, task: str, message: str) -> None:
        self.task = task
        super().__init__(message)


def objective_name(task: str, metric: str) -> str:
    """The project-wide objective name for one metric of one task, e.g. ``task:toy_arith/acc``."""
    return f"task:{task}/{metric}"


def objective_task(name: str) -> str | None:
    """The task of an :func:`objective_name` (``toy_arith`` of ``task:toy_arith/acc``); None for a
    measure (``l2_from_base``)."""
    if not name.startswith("task:"):
        return None
    return name.removeprefix("task:").split("/", 1)[0]


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
        keep_free_bytes: int = 0,
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
        self.keep_free_bytes = keep_free_bytes  # held on the GPU while batch_size: auto is probed
        self.num_fewshot = num_fewshot
        self.extra_args = dict(extra_args or {})
        self._task_objects: dict[str, Any] = {}
        self._groups: set[str] = set()
        self._prepared: dict[str, _PreparedTask] | None = None
        self._lm: Any = None
        self._lm_model: Any = None

    def _load(self, name: str) -> None:
        """Load a task (its documents) or a group (its subtasks) on first use, and keep it."""
        if name not in self._task_objects and name not in self._groups:
            loaded = self.task_manager.load([name])["tasks"]
            self._task_objects.update(loaded)
            if name not in loaded:
                self._groups.add(name)

    def _task(self, task: str) -> Any:
        """lm-eval's Task object (its documents loaded), built on first use and kept."""
        self._load(task)
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
        return self.evaluate(model, tokenizer).scores

    def evaluate(self, model: PreTrainedModel, tokenizer) -> Evaluation:
        """Score ``model`` on the configured items and count what it cost."""
        if not self._fast_path():
            return self._simple_evaluate(self._wrap(model, tokenizer))
        cost = self.run_requests(model, tokenizer)
        scores: dict[str, float] = {}
        for name, p in (self._prepared or {}).items():  # run_requests prepared them
            scores.update(self._task_scores(name, p))
        return Evaluation(scores, cost)

    def evaluate_items(
        self, model: PreTrainedModel, tokenizer, items: Mapping[str, Sequence[int]]
    ) -> tuple[dict[str, dict[int, float]], EvalCost]:
        """Score ``model`` on the given documents of each task only, item by item (multi-fidelity
        rungs: :mod:`evomerge.rungs`): ``{"task:<task>/<metric>": {doc_id: value}}`` and the cost.

        Each value is what lm-eval's ``process_results`` gives that document, after the same
        filters as :meth:`evaluate`; a metric aggregated by ``mean`` over any set of documents is
        then the mean of these values (:meth:`mean_aggregated` says which metrics are)."""
        if not self._fast_path():
            raise ConfigError("scoring by rungs needs plain tasks and lm-eval options evomerge applies itself; "
                              "remove evaluation.rungs or the task group / lm_eval_args option")
        lm = self._wrap(model, tokenizer)
        prepared = self._prepare(lm)
        for task, docs in items.items():
            missing = set(docs) - set(prepared[task].by_doc)
            if missing:
                raise ValueError(f"task {task!r} was not prepared with documents {sorted(missing)[:5]}")
        cost = self.run_requests(model, tokenizer, docs={t: set(d) for t, d in items.items()})
        out: dict[str, dict[int, float]] = {}
        for name, docs in items.items():
            p = prepared[name]
            chosen = [inst for d in docs for inst in p.by_doc[d]]
            for f in getattr(p.task, "_filters", ()):  # lm-eval's own filter ensembles, on these documents' instances only
                f.apply(chosen)
            for filter_key in p.by_doc[docs[0]][0].filtered_resps if docs else ():
                for d in docs:
                    insts = p.by_doc[d]
                    metrics = p.task.process_results(insts[0].doc, [inst.filtered_resps[filter_key] for inst in insts])
                    for metric, value in metrics.items():
                        key = metric if filter_key in ("", "none") else f"{metric},{filter_key}"
                        out.setdefault(objective_name(name, key), {})[d] = float(value)
        return out, cost

    def scores_per_item(self, extra_args: Mapping[str, Any]) -> bool:
        """Whether these tasks with these lm-eval options can be scored item by item
        (:meth:`evaluate_items`): plain tasks, and only options the fast path applies."""
        for name in self.tasks:
            self._load(name)
        return set(extra_args) <= FAST_PATH_ARGS | set(_ALWAYS_OFF) and not self._groups & set(self.tasks)

    def mean_aggregated(self, task: str, metric: str) -> bool:
        """Whether lm-eval aggregates ``metric`` (as :meth:`metrics` names it) of ``task`` by the
        plain mean of per-document values, the only kind rung results can be combined by."""
        from lm_eval.api.metrics import mean

        return self._task(task).aggregation().get(metric.partition(",")[0]) is mean

    def run_requests(self, model: PreTrainedModel, tokenizer, docs: Mapping[str, set[int]] | None = None) -> EvalCost:
        """Run the model on every prepared request (or only those of ``docs``, by task) and keep
        its answers in the instances: the forward passes of an evaluation and nothing else (the
        floor a benchmark compares with)."""
        lm = self._wrap(model, tokenizer)
        prepared = self._prepare(lm)
        if docs is not None:
            prepared = {name: _PreparedTask(p.task, {d: insts for d, insts in p.by_doc.items() if d in docs.get(name, ())})
                        for name, p in prepared.items() if name in docs}
        instances = [inst for p in prepared.values() for insts in p.by_doc.values() for inst in insts]
        for inst in instances:  # the instances are reused: clear the last candidate's answers
            inst.resps.clear()
            inst.filtered_resps.clear()
        by_kind: dict[str, list[Any]] = defaultdict(list)
        for inst in instances:
            by_kind[inst.request_type].extend([inst] * inst.repeats)
        generated = 0
        for kind, requests in by_kind.items():
            answers = getattr(lm, kind)(requests)
            for answer, inst in zip(answers, requests, strict=True):
                inst.resps.append(answer)
            if kind == "generate_until":
                generated += sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
        return EvalCost(items={name: len(p.by_doc) for name, p in prepared.items()},
                        requests={kind: len(reqs) for kind, reqs in by_kind.items()}, generated_tokens=generated)

    def _fast_path(self) -> bool:
        """Whether every option is one the fast path applies and every task is a plain task (a group's
        score is lm-eval's aggregate over its subtasks, which only its own evaluator computes)."""
        for name in self.tasks:
            self._load(name)
        return set(self.extra_args) <= FAST_PATH_ARGS | set(_ALWAYS_OFF) and not self._groups & set(self.tasks)

    def _wrap(self, model: PreTrainedModel, tokenizer) -> Any:
        """lm-eval's wrapper of the live model, built once per model object: merges write into the
        same model in place, and a wrapper keeps what it probed (``batch_size: auto``)."""
        from lm_eval.models.huggingface import HFLM

        logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)  # "handed a live model": the point
        if self._lm is None or self._lm_model is not model:
            self._lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, device=str(model.device))
            self._lm_model = model
            if self.batch_size == "auto":
                self._lm.batch_size_per_gpu = self._probe_batch_size(self._lm)
        return self._lm

    def _probe_batch_size(self, lm: Any) -> int:
        """``batch_size: auto`` resolved once per live model. lm-eval caches its probe for
        loglikelihood requests only and probes again on every call for generation and rolling
        loglikelihood; a fixed number afterwards turns every later probe off. On a GPU the probe
        runs while the merge's temporaries (``keep_free_bytes``, from the memory plan) are held,
        so the batch it finds leaves them room."""
        import torch

        held = None
        if self.keep_free_bytes and lm.device.type == "cuda":  # GPU path: checked by scripts/gpu_check.py
            held = torch.empty(self.keep_free_bytes, dtype=torch.uint8, device=lm.device)
        try:
            return int(lm._detect_batch_size())
        finally:
            del held

    def _prepare(self, lm: Any) -> dict[str, _PreparedTask]:
        """Each task configured as simple_evaluate would configure it, and its requests built, once."""
        if self._prepared is not None:
            return self._prepared
        from lm_eval.evaluator_utils import get_sample_size

        args = self.extra_args
        chat = args.get("apply_chat_template", False)
        gen_kwargs = args.get("gen_kwargs")
        if isinstance(gen_kwargs, str):
            from lm_eval.utils import simple_parse_args_string

            gen_kwargs = simple_parse_args_string(gen_kwargs) or None
        prepared: dict[str, _PreparedTask] = {}
        for name in self.tasks:
            task = self._task(name)
            if getattr(task, "UNSAFE_CODE", False) and not args.get("confirm_run_unsafe_code", False):
                raise ConfigError(f"task {name!r} runs generated code; set lm_eval_args.confirm_run_unsafe_code: true "
                                  "to allow it")
            if gen_kwargs and task.get_config("output_type") == "generate_until":
                task.set_config(key="generation_kwargs", value=gen_kwargs, update=True)
            if self.num_fewshot is not None:
                if task.get_config("num_fewshot") != 0:  # lm-eval never overrides a task's explicit 0
                    task.set_config(key="num_fewshot", value=self.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=args.get("fewshot_random_seed", _FEWSHOT_SEED))
            task.build_all_requests(
                limit=get_sample_size(task, self.limit),
                samples=(self.samples or {}).get(name),
                rank=0,
                world_size=1,
                cache_requests=False,
                system_instruction=args.get("system_instruction"),
                apply_chat_template=bool(chat),
                fewshot_as_multiturn=args.get("fewshot_as_multiturn", True),
                chat_template=getattr(lm, "apply_chat_template", None) if chat else None,
                tokenizer_name=getattr(lm, "tokenizer_name", "") if chat else "",
            )
            p = _PreparedTask(task)
            for inst in task.instances:
                p.by_doc.setdefault(inst.doc_id, []).append(inst)
            for insts in p.by_doc.values():
                insts.sort(key=lambda inst: inst.idx)
            prepared[name] = p
        self._prepared = prepared
        return prepared

    def _task_scores(self, name: str, p: _PreparedTask) -> dict[str, float]:
        """lm-eval's filters, per-document results and aggregation for one task, as ``evaluate`` runs them."""
        task = p.task
        task.apply_filters()
        raw: dict[tuple[str, str], list[Any]] = defaultdict(list)
        first = next(iter(p.by_doc.values()))
        for filter_key in first[0].filtered_resps:
            for insts in p.by_doc.values():
                metrics = task.process_results(insts[0].doc, [inst.filtered_resps[filter_key] for inst in insts])
                for metric, value in metrics.items():
                    raw[(metric, filter_key)].append(value)
        aggregation = task.aggregation()
        scores: dict[str, float] = {}
        for (metric, filter_key), values in raw.items():
            value = aggregation[metric](values)
            name_ = metric if filter_key in ("", "none") else f"{metric},{filter_key}"
            scores[objective_name(name, name_)] = float(value)
        return scores

    def _simple_evaluate(self, lm: Any) -> Evaluation:
        """The general path: lm-eval's ``simple_evaluate``, for options the fast path does not apply."""
        from lm_eval import evaluator

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
        _skip_run_metadata()
        counter = _counting(lm)
        results = evaluator.simple_evaluate(
            model=counter,
            tasks=self.tasks,
            task_manager=self.task_manager,
            samples=self.samples,
            limit=self.limit,
            num_fewshot=self.num_fewshot,
            **args,
        )
        scores: dict[str, float] = {}
        items: dict[str, int] = {}
        for task in self.tasks:
            for key, value in results["results"][task].items():
                metric, _, filter_name = key.partition(",")
                # lm-eval also reports bookkeeping (alias, sample_len) and stderrs next to metrics.
                if metric == "sample_len" and isinstance(value, int):
                    items[task] = value
                if metric in ("alias", "sample_len") or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                    continue
                name = metric if filter_name in ("", "none") else f"{metric},{filter_name}"
                scores[objective_name(task, name)] = float(value)
        return Evaluation(scores, EvalCost(items=items, requests=dict(counter.requests)))


def _counting(lm: Any) -> Any:
    """``lm`` behind lm-eval's LM interface, counting the requests sent to it by kind (see EvalCost):
    simple_evaluate accepts only an ``LM``, so the counter is one."""
    from lm_eval.api.model import LM

    class CountingLM(LM):
        def __init__(self) -> None:
            super().__init__()
            self.requests: dict[str, int] = defaultdict(int)

        def __getattr__(self, name: str) -> Any:  # rank, world_size, tokenizer_name, chat templates...
            return getattr(lm, name)

        @property
        def rank(self) -> int:
            return lm.rank

        @property
        def world_size(self) -> int:
            return lm.world_size

        def _send(self, kind: str, requests: list[Any]) -> list[Any]:
            self.requests[kind] += len(requests)
            return getattr(lm, kind)(requests)

        def loglikelihood(self, requests, disable_tqdm: bool = False):  # type: ignore[no-untyped-def]
            return self._send("loglikelihood", requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):  # type: ignore[no-untyped-def]
            return self._send("loglikelihood_rolling", requests)

        def generate_until(self, requests, disable_tqdm: bool = False):  # type: ignore[no-untyped-def]
            return self._send("generate_until", requests)

    return CountingLM()


@functools.cache
def _skip_run_metadata() -> None:
    """Make ``simple_evaluate`` skip its environment report and ``git describe`` (see the module
    docstring; the general path only): seconds per call that no score depends on. Done once per process."""
    from lm_eval import evaluator

    evaluator.add_env_info = lambda storage: None
    evaluator.get_git_commit_hash = lambda: None
