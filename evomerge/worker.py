"""Evaluating candidates: merge in memory, score with lm-eval, measure the distance from base.

:class:`CandidateEvaluator` is a plain class: the in-process pool and tests use it directly, and
:func:`start_workers` runs it as Ray actors. Each evaluator loads the base and donors once, keeps them resident (on its GPU
when it has one), builds one model whose parameters every candidate overwrites in place, and
builds lm-eval's task index once. A candidate that cannot be merged, merges to NaN or infinite
weights (checked on the model's own tensors before scoring: a float32 merge copied into a float16
model can overflow after the merge engine's own check), or scores NaN comes back as an
:class:`EvalResult` with ``error`` set: a candidate fault is data for the trial log, not a crash.
Infrastructure faults (a dead actor, an allocation that fails) surface as exceptions, which the
worker pool turns into events for the loop to retry elsewhere. ``worker.start``, ``worker.evaluate``
and ``worker.after_merge`` are failpoints (see :mod:`evomerge.failpoints`), for the reliability tests.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from . import failpoints
from .errors import EvomergeError


@dataclass(frozen=True)
class EvalSettings:
    """What every candidate is scored on: the same tasks and items for every trial."""

    tasks: tuple[str, ...]
    include_path: tuple[str, ...] | None = None  # task folders; None: the project's eval_tasks/
    samples: Mapping[str, Sequence[int]] | None = None
    limit: int | None = None
    batch_size: int | str = 32  # or "auto", passed to lm-eval
    num_fewshot: int | None = None
    extra_args: Mapping[str, Any] = field(default_factory=dict)

    def scorer_options(self) -> dict[str, Any]:
        """:class:`LmEvalScorer`'s arguments besides the tasks: a worker's scorer and ``evomerge
        validate``'s scoring of the base are built from the same settings by this one method."""
        options: dict[str, Any] = {"samples": self.samples, "limit": self.limit, "batch_size": self.batch_size,
                                   "num_fewshot": self.num_fewshot, "extra_args": dict(self.extra_args)}
        if self.include_path:
            options["include_path"] = [Path(p) for p in self.include_path]
        return options


@dataclass(frozen=True)
class WorkerSpec:
    """How a worker builds itself: the models to keep resident and how to score."""

    base: str
    donors: tuple[str, ...]
    evaluation: EvalSettings
    dtype: str = "float32"
    trust_remote_code: bool = False
    threads: int | None = None  # torch intra-op threads; None: what the worker was given
    # where the inputs are stored, from the memory plan (see evomerge.merge.inmemory):
    # "mapped" (shared through the page cache; streamed per tensor to a GPU) or "resident"
    storage: str = "mapped"
    task_vectors: bool = False  # keep the donors' task vectors (only where the plan says they fit)
    gpus: int = 1  # GPUs the live model is spread over (a device map) when above 1
    keep_free_bytes: int = 0  # the merge's temporaries: left free when batch_size: auto is probed


@dataclass
class EvalResult:
    """One candidate's outcome, as the loop records it."""

    objectives: dict[str, float] | None
    error: str | None = None
    merge_s: float = 0.0
    eval_s: float = 0.0
    worker: str = ""
    cost: dict[str, Any] | None = None  # what scoring cost (EvalCost.to_dict()); None when not scored
    # scored by rung (evomerge.rungs): {"task:<task>/<metric>": {doc_id: value}} for the items asked;
    # ``objectives`` then holds only what is measured whole (l2_from_base)
    per_item: dict[str, dict[int, float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class CandidateEvaluator:
    """Merges candidates into one resident model and scores them."""

    def __init__(self, spec: WorkerSpec) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .evaluate import LmEvalScorer
        from .merge.inmemory import ResidentModels, state_view

        failpoints.hit("worker.start")  # a worker that cannot start (for the pool's start-failure path)
        # lm-eval and datasets draw progress bars per call; a search prints its own progress
        os.environ.setdefault("TQDM_DISABLE", "1")
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        self.device = _device()
        dtype = getattr(torch, spec.dtype)
        self.resident = ResidentModels([spec.base, *spec.donors], spec.base, device=self.device, dtype=dtype,
                                       storage=spec.storage, task_vectors=spec.task_vectors)
        base_path = self.resident.folders[spec.base].path
        self.tokenizer = AutoTokenizer.from_pretrained(base_path, trust_remote_code=spec.trust_remote_code)
        if self.device == "cuda" and spec.gpus > 1:  # GPU path: checked by scripts/gpu_check.py
            from .device_map import spread_over_gpus

            self.model = spread_over_gpus(base_path, dtype, spec.gpus, trust_remote_code=spec.trust_remote_code)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(
                base_path, dtype=dtype, trust_remote_code=spec.trust_remote_code
            ).to(self.device)
        self.model.eval()
        self.params = state_view(self.model)
        ev = spec.evaluation
        self.scorer = LmEvalScorer(ev.tasks, **ev.scorer_options(), keep_free_bytes=spec.keep_free_bytes)
        self.name = f"{os.uname().nodename}:{os.getpid()}:{self.device}{_ray_node()}"
        self._pool_modules: dict[str, Any] | None = None  # routing: modules over the resident tensors

    def evaluate(self, recipe_json: str, items: Mapping[str, Sequence[int]] | None = None) -> EvalResult:
        """Merge and score one candidate; candidate faults come back as ``error``. ``items``
        (task -> document ids): score only those, item by item (``per_item``), for a rung."""
        from .recipe import Recipe

        start = time.perf_counter()
        digest = candidate_digest(recipe_json)  # names the candidate in the failpoints' hit log
        failpoints.hit("worker.evaluate", context=digest)
        model = self.model
        measured: dict[str, float] = {}
        merged_names: list[str] = []
        try:
            recipe = Recipe.from_json(recipe_json)
            if recipe.merge is not None:
                plan = self.resident.plan(recipe.merge)
                outcome = self.resident.merge_into(plan, self.params)
                merged_names = [task.name for task in plan.tasks]
                if recipe.route is None:  # a routed model has other layers: no per-tensor distance
                    measured["l2_from_base"] = outcome.l2_from_base
            if recipe.route is not None:
                model = self._routed(recipe.route)
        except EvomergeError as err:
            return EvalResult(None, error=f"merge failed: {err}", merge_s=time.perf_counter() - start, worker=self.name)
        poison = failpoints.hit("worker.after_merge", context=digest)
        if poison and merged_names:
            _poison(self.params, merged_names, poison)
        broken = nonfinite_tensors(self.params, merged_names)
        merged = time.perf_counter()
        if broken:
            # before scoring: lm-eval on NaN weights scores garbage (or 0) rather than failing
            return EvalResult(None, error=f"merge produced non-finite weights in {len(broken)} tensor(s): "
                              f"{', '.join(broken[:5])}{' ...' if len(broken) > 5 else ''}",
                              merge_s=merged - start, worker=self.name)
        per_item = None
        if items is not None:
            per_item, spent = self.scorer.evaluate_items(model, self.tokenizer, items)
            scores: dict[str, float] = {}
            bad_items = [k for k, values in per_item.items() if not all(math.isfinite(v) for v in values.values())]
        else:
            evaluation = self.scorer.evaluate(model, self.tokenizer)
            scores, spent, bad_items = evaluation.scores, evaluation.cost, []
        done = time.perf_counter()
        cost = spent.to_dict()  # spent whether or not the scores are usable
        objectives = {**scores, **measured}
        bad = bad_items + [k for k, v in objectives.items() if not math.isfinite(v)]
        if bad:
            return EvalResult(None, error=f"non-finite objective(s): {', '.join(bad)}", merge_s=merged - start,
                              eval_s=done - merged, worker=self.name, cost=cost)
        return EvalResult(objectives, merge_s=merged - start, eval_s=done - merged, worker=self.name, cost=cost,
                          per_item=per_item)

    def _routed(self, route_config: Any) -> Any:
        """The candidate's routed model: layers of the resident models (and of this candidate's
        parameter merge, ``merged``), shared, not copied; built per candidate in milliseconds."""
        from .merge.routing import build_routed_model, resident_module, route_from_config
        from .recipe import MERGED_STAGE

        if self._pool_modules is None:
            modules: dict[str, Any] = {MERGED_STAGE: self.model}
            for ref in (self.spec.base, *self.spec.donors):
                modules[ref] = resident_module(self.resident, ref, trust_remote_code=self.spec.trust_remote_code)
            self._pool_modules = modules
        return build_routed_model(route_from_config(route_config), self._pool_modules)

    def ping(self) -> str:
        return self.name


def nonfinite_tensors(params: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    """The merged floating-point tensors holding a NaN or an infinity, by name.

    A merge can overflow without any error (large weights in float16 reach inf), and a NaN in one
    weight spreads to every logit; the candidate is refused before it is scored. The merge
    engine's cheap test decides (one sum per tensor; the elementwise test only where the sum is
    not finite): an elementwise ``isfinite`` per tensor allocated a mask the size of the model
    for every candidate, about a tenth of a small model's merge.
    """
    from .merge.run import all_finite

    return [n for n in names if not all_finite(params[n])]


def _poison(params: Mapping[str, Any], names: Sequence[str], kind: str) -> None:
    """Failpoint ``nan``/``inf``: corrupt one element of the first merged floating tensor."""
    import torch

    name = next(n for n in names if params[n].is_floating_point())
    with torch.no_grad():
        params[name].view(-1)[0] = float(kind)


def candidate_digest(text: str) -> str:
    """A short name for a candidate (its recipe JSON) in the failpoints' hit log."""
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _ray_node() -> str:
    """``:node=<id prefix>`` inside a Ray actor (hosts can run several nodes), else ''."""
    import sys

    if "ray" not in sys.modules:  # the in-process pool: no Ray to ask, and none to import
        return ""
    import ray

    if not ray.is_initialized():
        return ""
    return f":node={ray.get_runtime_context().get_node_id()[:12]}"


def start_workers(spec: WorkerSpec, *, count: int, cpus: float, gpus: float) -> list[Any]:
    """Start ``count`` Ray actors running :class:`CandidateEvaluator` (Ray must be initialised).

    SPREAD places them on as many nodes as have room: losing one node then loses few workers, and
    each node's memory holds fewer copies of the models."""
    import ray

    actor = ray.remote(CandidateEvaluator)
    threads = spec.threads or max(1, int(cpus))
    spec = replace(spec, threads=threads)
    return [
        actor.options(num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_concurrency=1,
                      scheduling_strategy="SPREAD").remote(spec)
        for _ in range(count)
    ]
