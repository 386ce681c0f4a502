"""Evaluating candidates: merge in memory, score with lm-eval, measure the distance from base.

:class:`CandidateEvaluator` is a plain class (tests use it directly); :func:`start_workers` runs
it as Ray actors. Each evaluator loads the base and donors once, keeps them resident (on its GPU
when it has one), builds one model whose parameters every candidate overwrites in place, and
builds lm-eval's task index once. A candidate that cannot be merged or scores NaN comes back as
an :class:`EvalResult` with ``error`` set: a candidate fault is data for the trial log, not a
crash. Infrastructure faults (a dead actor) surface as Ray errors to the dispatcher, which
retries them elsewhere.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class WorkerSpec:
    """How a worker builds itself: the models to keep resident and how to score."""

    base: str
    donors: tuple[str, ...]
    evaluation: EvalSettings
    dtype: str = "float32"
    trust_remote_code: bool = False
    threads: int | None = None  # torch intra-op threads; None: what the worker was given


@dataclass
class EvalResult:
    """One candidate's outcome, as the loop records it."""

    objectives: dict[str, float] | None
    error: str | None = None
    merge_s: float = 0.0
    eval_s: float = 0.0
    worker: str = ""

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

        # lm-eval and datasets draw progress bars per call; a search prints its own progress
        os.environ.setdefault("TQDM_DISABLE", "1")
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        self.device = _device()
        dtype = getattr(torch, spec.dtype)
        self.resident = ResidentModels([spec.base, *spec.donors], spec.base, device=self.device, dtype=dtype)
        base_path = self.resident.folders[spec.base].path
        self.tokenizer = AutoTokenizer.from_pretrained(base_path, trust_remote_code=spec.trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            base_path, dtype=dtype, trust_remote_code=spec.trust_remote_code
        ).to(self.device)
        self.model.eval()
        self.params = state_view(self.model)
        ev = spec.evaluation
        options: dict[str, Any] = dict(samples=ev.samples, limit=ev.limit, batch_size=ev.batch_size,
                                       num_fewshot=ev.num_fewshot, extra_args=dict(ev.extra_args))
        if ev.include_path:
            options["include_path"] = [Path(p) for p in ev.include_path]
        self.scorer = LmEvalScorer(ev.tasks, **options)
        self.name = f"{os.uname().nodename}:{os.getpid()}:{self.device}{_ray_node()}"

    def evaluate(self, recipe_json: str) -> EvalResult:
        """Merge and score one candidate; candidate faults come back as ``error``."""
        from .merge.config import parse_merge_config
        from .recipe import Recipe

        start = time.perf_counter()
        try:
            recipe = Recipe.from_json(recipe_json)
            config = recipe.merge if not isinstance(recipe.merge, Mapping) else parse_merge_config(recipe.merge)
            plan = self.resident.plan(config)
            outcome = self.resident.merge_into(plan, self.params)
        except EvomergeError as err:
            return EvalResult(None, error=f"merge failed: {err}", merge_s=time.perf_counter() - start, worker=self.name)
        merged = time.perf_counter()
        scores = self.scorer.score(self.model, self.tokenizer)
        done = time.perf_counter()
        objectives = {**scores, "l2_from_base": outcome.l2_from_base}
        bad = [k for k, v in objectives.items() if not math.isfinite(v)]
        if bad:
            return EvalResult(None, error=f"non-finite objective(s): {', '.join(bad)}", merge_s=merged - start,
                              eval_s=done - merged, worker=self.name)
        return EvalResult(objectives, merge_s=merged - start, eval_s=done - merged, worker=self.name)

    def ping(self) -> str:
        return self.name


def _ray_node() -> str:
    """``:node=<id prefix>`` inside a Ray actor (hosts can run several nodes), else ''."""
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
