"""The search workers' merge path: the same plan and method code, on resident tensors.

A worker loads the base and donors once and keeps their tensors (and the donors' task vectors)
resident, on its GPU when it has one. Each candidate is merged tensor by tensor straight into
the parameters of one resident model, in place, so no candidate is ever written to disk and no
second copy of the model is made. Because the plan and the method functions are the ones
``evomerge merge`` uses, an exported recipe reproduces exactly what the search evaluated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import torch

from .config import MergeConfig
from .model_folder import ModelFolder
from .plan import MergePlan, plan_merge
from .run import compute_task


@dataclass
class MergeOutcome:
    """What merging one candidate produced, besides the weights themselves."""

    l2_from_base: float  # Euclidean norm of (merged - base) over every merged tensor
    num_tensors: int


class ResidentModels:
    """Base and donor tensors held in memory, with the donors' task vectors precomputed."""

    def __init__(self, references: list[str], base: str | None, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, allow_pickle: bool = False) -> None:
        self.device = torch.device(device)
        self.base = base
        self.folders = {ref: ModelFolder(ref, allow_pickle=allow_pickle) for ref in references}
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        for ref, folder in self.folders.items():
            self.tensors[ref] = {
                name: (t.to(dtype) if t.is_floating_point() else t).to(self.device)
                for name in folder.tensor_names
                for t in [folder.read(name)]
            }
        self.deltas: dict[str, dict[str, torch.Tensor]] = {}
        if base is not None:
            base_tensors = self.tensors[base]
            for ref, tensors in self.tensors.items():
                if ref == base:
                    continue
                self.deltas[ref] = {
                    name: t - base_tensors[name]
                    for name, t in tensors.items()
                    if name in base_tensors and t.is_floating_point() and t.shape == base_tensors[name].shape
                }

    def plan(self, config: MergeConfig) -> MergePlan:
        """Plan a candidate over the resident models (headers only: cheap)."""
        return plan_merge(config, self.folders)

    def _get(self, ref: str, name: str) -> torch.Tensor:
        tensors = self.tensors[ref]
        if name in tensors:
            return tensors[name]
        # tied heads: a model without lm_head.weight uses its embeddings, as mergekit does
        return tensors[self.folders[ref]._require(name)]

    def merge_into(self, plan: MergePlan, target: MutableMapping[str, torch.Tensor]) -> MergeOutcome:
        """Write every planned tensor into ``target`` (e.g. a model's parameters) in place."""
        squared = 0.0
        for task in plan.tasks:
            inputs = [self._get(m, n) for m, n in task.sources]
            deltas = self._task_deltas(task.sources, task.base_index)
            result = compute_task(plan, task, inputs, deltas)
            dest = target[task.name]
            with torch.no_grad():
                dest.copy_(result)
            if task.base_index is not None and result.is_floating_point():
                base_t = inputs[task.base_index]
                squared += float(torch.sum((result.to(base_t.dtype) - base_t) ** 2))
        return MergeOutcome(l2_from_base=math.sqrt(squared), num_tensors=len(plan.tasks))

    def _task_deltas(self, sources: tuple[tuple[str, str], ...], base_index: int | None) -> list[torch.Tensor | None] | None:
        if base_index is None or self.base is None or sources[base_index][0] != self.base:
            return None
        base_name = sources[base_index][1]
        out: list[torch.Tensor | None] = []
        for i, (ref, name) in enumerate(sources):
            if i == base_index:
                out.append(None)
                continue
            delta = self.deltas.get(ref, {}).get(name)
            if delta is None or name != base_name:
                return None  # a routed or renamed source: let the method compute it
            out.append(delta)
        return out


def state_view(model: torch.nn.Module) -> Mapping[str, torch.Tensor]:
    """A model's parameters and buffers by name, sharing storage with the model (for in-place merges)."""
    view: dict[str, torch.Tensor] = dict(model.named_buffers())
    view.update(dict(model.named_parameters(remove_duplicate=False)))
    return view
