"""The search workers' merge path: the same plan and method code, on stored input tensors.

Storage is apart from math (the worker's memory plan, :mod:`evomerge.memory_plan`, chooses):

- ``resident``: the base and donors are loaded once into memory of the worker's own, in the
  merge dtype, on the math device (a GPU when everything fits there);
- ``mapped``: they stay memory-mapped safetensors (:mod:`evomerge.merge.mapped`), shared by every
  worker of the node through the page cache; each candidate reads each input tensor from the map
  and converts it (dtype, device) only while that tensor is merged: on CPU zero-copy when the
  file's dtype is the merge dtype, on a GPU streamed tensor by tensor.

The donors' task vectors are kept (in the worker's own memory) only when asked; otherwise the
method forms them per tensor, with the same subtraction, so every storage gives the same merge bit
for bit. Each candidate is merged tensor by tensor straight into the parameters of one live
model, in place, so no candidate is ever written to disk and the live model is the only copy the
worker owns in the mapped storage. Because the plan and the method functions are the ones
``evomerge merge`` uses, an exported recipe reproduces exactly what the search evaluated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import torch

from .config import MergeConfig
from .mapped import MappedFiles
from .model_folder import ModelFolder
from .plan import MergePlan, plan_merge
from .run import compute_task


@dataclass
class MergeOutcome:
    """What merging one candidate produced, besides the weights themselves."""

    l2_from_base: float  # Euclidean norm of (merged - base) over every merged tensor
    num_tensors: int


STORAGES = ("resident", "mapped")


class ResidentModels:
    """The base and donors as a worker stores them (see the module docstring), with the donors'
    task vectors precomputed when ``task_vectors`` is true."""

    def __init__(self, references: list[str], base: str | None, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, allow_pickle: bool = False, storage: str = "resident",
                 task_vectors: bool = True) -> None:
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.storage = storage
        self.base = base
        self.folders = {ref: ModelFolder(ref, allow_pickle=allow_pickle) for ref in references}
        self._maps = MappedFiles()
        #: per model, its tensors as stored: owned (resident) or views of the files' maps (mapped)
        self.tensors: dict[str, dict[str, torch.Tensor]] = {
            ref: {name: self._stored(folder, name) for name in folder.tensor_names}
            for ref, folder in self.folders.items()
        }
        self.deltas: dict[str, dict[str, torch.Tensor]] = {}
        if base is not None and task_vectors:
            for ref, tensors in self.tensors.items():
                if ref == base:
                    continue
                self.deltas[ref] = {
                    name: self._for_math(t) - self._for_math(self.tensors[base][name])
                    for name, t in tensors.items()
                    if name in self.tensors[base] and t.is_floating_point() and t.shape == self.tensors[base][name].shape
                }

    def _stored(self, folder: ModelFolder, name: str) -> torch.Tensor:
        if self.storage == "mapped":
            info = folder.tensor_info(name)
            if info is not None:
                return self._maps.tensor(info)  # a pickled checkpoint has no file offsets: owned below
        return self._for_math(folder.read(name))

    def _for_math(self, t: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """``t`` in the merge dtype on ``device`` (default: the math device); itself when it
        already is (no copy). From a map to a GPU this is the per-tensor stream."""
        if t.is_floating_point() and t.dtype != self.dtype:
            t = t.to(self.dtype)
        return t.to(device or self.device, non_blocking=True)

    def plan(self, config: MergeConfig) -> MergePlan:
        """Plan a candidate over the resident models (headers only: cheap)."""
        return plan_merge(config, self.folders)

    def _get(self, ref: str, name: str, device: torch.device | None = None) -> torch.Tensor:
        tensors = self.tensors[ref]
        if name not in tensors:
            # tied heads: a model without lm_head.weight uses its embeddings, as mergekit does
            name = self.folders[ref]._require(name)
        return self._for_math(tensors[name], device)

    def merge_into(self, plan: MergePlan, target: MutableMapping[str, torch.Tensor]) -> MergeOutcome:
        """Write every planned tensor into ``target`` (e.g. a model's parameters) in place."""
        squared = 0.0
        for task in plan.tasks:
            dest = target[task.name]
            # computed where the live model holds this tensor (with a device map: one of several GPUs)
            device = dest.device if self.storage == "mapped" else None
            inputs = [self._get(m, n, device) for m, n in task.sources]
            deltas = self._task_deltas(task.sources, task.base_index)
            if deltas is not None and device is not None:
                deltas = [None if d is None else d.to(device, non_blocking=True) for d in deltas]
            result = compute_task(plan, task, inputs, deltas)
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
