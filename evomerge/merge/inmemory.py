"""The search workers' merge path: the same plan and method code, on stored input tensors.

Storage is apart from math (the worker's memory plan, :mod:`evomerge.memory_plan`, chooses):

- ``resident``: the base and donors are loaded once into memory of the worker's own, in the
  merge dtype, on the math device (a GPU when everything fits there);
- ``mapped``: they stay memory-mapped safetensors (:mod:`evomerge.merge.mapped`), shared by every
  worker of the node through the page cache; each candidate reads each input tensor from the map
  and converts it (dtype, device) only while that tensor is merged: on CPU zero-copy when the
  file's dtype is the merge dtype, on a GPU streamed tensor by tensor. The next tensor's inputs
  are read (and on a GPU copied, from pinned memory on a side stream) while the current one is
  merged (:mod:`evomerge.merge.prefetch`).

The donors' task vectors are kept (in the worker's own memory) only when asked; otherwise the
method forms them per tensor, with the same subtraction, so every storage gives the same merge bit
for bit. Each candidate is merged tensor by tensor straight into the parameters of one live
model, in place, so no candidate is ever written to disk and the live model is the only copy the
worker owns in the mapped storage. Because the plan and the method functions are the ones
``evomerge merge`` uses, an exported recipe reproduces exactly what the search evaluated.

A LoRA donor (``base+adapter``) stays low-rank: only its factors (and any full tensors saved with
the adapter) are resident, and each adapted tensor is formed from the resident base when a
candidate is merged, exactly as :meth:`ModelFolder.read` forms it for ``evomerge merge``. It
costs the factors' bytes, not a model's, and a few small matrix products per candidate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch

from .config import MergeConfig
from .references import split_reference
from .mapped import MappedFiles
from .model_folder import ModelFolder
from .plan import MergePlan, TensorTask, plan_merge
from .prefetch import READ_AHEAD, READ_AHEAD_MIN_BYTES, ReadAhead
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
        self._maps = MappedFiles()
        self._scratch: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}  # see _squared_distance
        self._conversions: dict[tuple[int, int], torch.Tensor] = {}  # (slot, input position): see _read_inputs
        self._side_streams: dict[torch.device, Any] = {}  # CUDA copy streams, one per device
        # tasks read ahead on the mapped path; None: READ_AHEAD for models whose tensors are worth
        # it (READ_AHEAD_MIN_BYTES), else 0 (read inline); set to compare (tests, scripts/gpu_check.py)
        self.read_ahead: int | None = None
        self._largest_bytes: int | None = None
        self.base = base
        self.folders = {ref: ModelFolder(ref, allow_pickle=allow_pickle) for ref in references}
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        for ref, folder in self.folders.items():
            if folder.adapter is None:
                self.tensors[ref] = self._load(folder)
        self.adapters = {ref: _ResidentAdapter(folder, self.device) for ref, folder in self.folders.items()
                         if folder.adapter is not None}
        self._base_of = {ref: self._adapter_base(ref, allow_pickle) for ref in self.adapters}
        self.deltas: dict[str, dict[str, torch.Tensor]] = {}
        if base is not None and task_vectors:
            base_tensors = self.model_tensors(base)
            for ref in references:
                tensors = self.tensors.get(ref)
                if ref == base or tensors is None:  # an adapter donor's deltas are formed per merge
                    continue
                self.deltas[ref] = {
                    name: self._for_math(t) - self._for_math(base_tensors[name])
                    for name, t in tensors.items()
                    if name in base_tensors and t.is_floating_point() and t.shape == base_tensors[name].shape
                }

    def _load(self, folder: ModelFolder) -> dict[str, torch.Tensor]:
        """A model's tensors as stored: owned (resident) or views of the files' maps (mapped)."""
        return {name: self._stored(folder, name) for name in folder.tensor_names}

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

    def _adapter_base(self, ref: str, allow_pickle: bool) -> str:
        """The resident model an adapter donor applies to: one already resident from the same
        folder (normally the search's base), else its base loaded once under its own reference."""
        path = self.folders[ref].path.resolve()
        for key in self.tensors:
            if self.folders[key].path.resolve() == path:
                return key
        base_reference = split_reference(ref)[0]
        self.folders[base_reference] = ModelFolder(base_reference, allow_pickle=allow_pickle)
        self.tensors[base_reference] = self._load(self.folders[base_reference])
        return base_reference

    def resident_bytes(self, ref: str) -> int:
        """Bytes this worker holds for model ``ref``: its tensors and task vectors, or, for an
        adapter donor, its factors and saved full tensors (the base's tensors are the base's)."""
        if ref in self.adapters:
            return self.adapters[ref].nbytes
        held = list(self.tensors[ref].values()) + list(self.deltas.get(ref, {}).values())
        return sum(t.numel() * t.element_size() for t in held)

    def model_tensors(self, ref: str) -> Mapping[str, torch.Tensor]:
        """Every tensor of model ``ref`` (an adapter donor's formed in full on first use and kept,
        for the layer routes that build modules over them)."""
        if ref not in self.tensors:
            self.tensors[ref] = {name: self._get(ref, name) for name in self.folders[ref].tensor_names}
        return self.tensors[ref]

    def plan(self, config: MergeConfig) -> MergePlan:
        """Plan a candidate over the resident models (headers only: cheap)."""
        return plan_merge(config, self.folders)

    def _get(self, ref: str, name: str, device: torch.device | None = None) -> torch.Tensor:
        if ref in self.adapters and ref not in self.tensors:
            adapted = self._adapted(ref, name)
            return adapted if device is None else adapted.to(device, non_blocking=True)
        return self._for_math(self._stored_tensor(ref, name), device)

    def _stored_tensor(self, ref: str, name: str) -> torch.Tensor:
        """Model ``ref``'s tensor ``name`` as this worker stores it (a map's view, or owned)."""
        tensors = self.tensors[ref]
        if name not in tensors:
            # tied heads: a model without lm_head.weight uses its embeddings, as mergekit does
            name = self.folders[ref]._require(name)
        return tensors[name]

    def _adapted(self, ref: str, name: str) -> torch.Tensor:
        """Adapter donor ``ref``'s tensor ``name``, formed from the resident base as
        :meth:`ModelFolder.read` forms it from the files (then cast like any resident tensor)."""
        folder = self.folders[ref]
        real = folder.resolve(name)
        base_tensor = self._get(self._base_of[ref], real)
        adapter = self.adapters[ref]
        if not adapter.changes(real):
            return base_tensor
        stored = folder.dtype(real)
        if _holds_exactly(base_tensor.dtype, stored):
            weight = base_tensor.to(stored)
        else:  # the resident copy was rounded: the adapter applies to the stored values
            weight = folder.read_base(real).to(self.device)
        merged = folder.adapter.apply(real, weight, factors=adapter.factors.get(real),
                                      replacement=adapter.replacements.get(real))
        return merged.to(self.dtype) if merged.is_floating_point() else merged

    def merge_into(self, plan: MergePlan, target: MutableMapping[str, torch.Tensor]) -> MergeOutcome:
        """Write every planned tensor into ``target`` (e.g. a model's parameters) in place.

        Mapped inputs are read one task ahead (:class:`~evomerge.merge.prefetch.ReadAhead`): the
        next tensor's pages, conversion and (on a GPU) copy overlap the current tensor's merge
        (a toy model's small tensors are read inline: see ``READ_AHEAD_MIN_BYTES``).
        """
        squared = 0.0
        ahead = self.read_ahead if self.read_ahead is not None else self._default_read_ahead()
        slots = ahead + 1  # tasks whose inputs are held at once: their conversion buffers take turns
        # computed where the live model holds each tensor (with a device map: one of several GPUs)
        def read(item: tuple[int, TensorTask]) -> tuple[list[torch.Tensor], Any]:
            return self._read_inputs(item[1], target[item[1].name].device, slot=item[0] % slots)

        numbered = list(enumerate(plan.tasks))
        if self.storage == "mapped" and ahead > 0:
            loaded = ReadAhead(numbered, read, ahead=ahead).__iter__()
        elif self.storage == "mapped":
            loaded = ((item, read(item)) for item in numbered)
        else:
            loaded = ((item, ([self._get(m, n) for m, n in item[1].sources], None)) for item in numbered)
        try:
            for (_, task), (inputs, copied) in loaded:
                dest = target[task.name]
                if copied is not None:  # GPU path: checked by scripts/gpu_check.py
                    _after_copies(copied, inputs, dest.device)
                deltas = self._task_deltas(task.sources, task.base_index)
                if deltas is not None and self.storage == "mapped":
                    deltas = [None if d is None else d.to(dest.device, non_blocking=True) for d in deltas]
                result = compute_task(plan, task, inputs, deltas)
                with torch.no_grad():
                    dest.copy_(result)
                if task.base_index is not None and result.is_floating_point():
                    squared += self._squared_distance(result, inputs[task.base_index])
                del inputs, result, deltas  # before the next task is loaded into the freed slot
        finally:
            loaded.close()  # a merge that failed stops the read-ahead now, not when its traceback goes
        return MergeOutcome(l2_from_base=math.sqrt(squared), num_tensors=len(plan.tasks))

    def _default_read_ahead(self) -> int:
        if self._largest_bytes is None:
            self._largest_bytes = max((t.numel() * t.element_size() for tensors in self.tensors.values()
                                       for t in tensors.values()), default=0)
        return READ_AHEAD if self._largest_bytes >= READ_AHEAD_MIN_BYTES else 0

    def _read_inputs(self, task: TensorTask, device: torch.device, *, slot: int = 0) -> tuple[list[torch.Tensor], Any]:
        """One task's inputs in the merge dtype on ``device`` (read ahead, on the loader's thread).

        On CPU the file pages of the task's inputs are asked for first (``MADV_WILLNEED``: the
        kernel reads any it dropped in the background), and an input stored in another dtype is
        converted into buffer ``slot`` of its position, kept between tasks and candidates: a fresh
        tensor per conversion cost more in first-touch page faults than the conversion itself (a
        bfloat16 model merged in float32: reading the inputs took 1.2 of 2.2 CPU-s). The caller
        gives a task a slot no task still in use holds. On a GPU each stored tensor is copied
        through pinned memory on a side stream and converted there; the event returned tells the
        merge's stream when the copies are done."""
        if device.type != "cuda":
            inputs = []
            for position, (ref, name) in enumerate(task.sources):
                self._will_need(ref, name)
                inputs.append(self._converted(ref, name, device, (slot, position)))
            return inputs, None
        side = self._side_streams.get(device)  # GPU path: checked by scripts/gpu_check.py
        if side is None:
            side = self._side_streams[device] = torch.cuda.Stream(device)
        with torch.cuda.stream(side):
            inputs = [self._streamed(m, n, device) for m, n in task.sources]
            copied = torch.cuda.Event()
            copied.record(side)
        return inputs, copied

    def _streamed(self, ref: str, name: str, device: torch.device) -> torch.Tensor:
        """A mapped tensor sent to the GPU in its stored dtype from pinned memory (asynchronous,
        on the current stream), then converted there: the dtype cast rounds the same on either
        side, and an upcast then crosses the bus at its stored size."""
        if ref in self.adapters and ref not in self.tensors:
            return self._get(ref, name, device)
        stored = self._stored_tensor(ref, name)
        if stored.device.type == "cpu":
            stored = stored.pin_memory().to(device, non_blocking=True)
        return self._for_math(stored, device)

    def _converted(self, ref: str, name: str, device: torch.device, buffer_key: tuple[int, int]) -> torch.Tensor:
        """Input ``name`` of ``ref`` on CPU in the merge dtype: the map's view when stored in it,
        else converted into the buffer ``buffer_key`` (same values as ``Tensor.to``: one cast)."""
        if ref in self.adapters and ref not in self.tensors:
            return self._get(ref, name, device)
        stored = self._stored_tensor(ref, name)
        if not stored.is_floating_point() or stored.dtype == self.dtype or stored.device != device:
            return self._for_math(stored, device)
        buffer = self._conversions.get(buffer_key)
        if buffer is None or buffer.numel() < stored.numel():
            buffer = self._conversions[buffer_key] = torch.empty(stored.numel(), dtype=self.dtype)
        return buffer[: stored.numel()].view(stored.shape).copy_(stored)

    def _will_need(self, ref: str, name: str) -> None:
        if ref in self.adapters and ref not in self.tensors:
            return
        info = self.folders[ref].tensor_info(name)  # None: a pickled checkpoint's (owned) tensor
        if info is not None:
            self._maps.will_need(info)

    def _squared_distance(self, result: torch.Tensor, base: torch.Tensor) -> float:
        """sum((result - base)^2) in the base's dtype, as ``torch.sum((result - base) ** 2)`` gives
        it, computed in a buffer kept between tensors: the two tensor-sized temporaries of the
        expression were, on a 1B model, a third of a candidate's merge time (first-touch page
        faults of fresh allocations, and a pow kernel slower than a multiply)."""
        key = (base.dtype, base.device)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.numel() < base.numel():
            buffer = self._scratch[key] = torch.empty(base.numel(), dtype=base.dtype, device=base.device)
        diff = buffer[: base.numel()].view(base.shape)
        torch.sub(result.to(base.dtype), base, out=diff)
        return float(torch.sum(diff.mul_(diff)))

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


class _ResidentAdapter:
    """An adapter donor's resident part: its factors in their stored dtype, and any full tensors
    saved with it in the base's dtype (as PEFT loads them)."""

    def __init__(self, folder: ModelFolder, device: torch.device) -> None:
        adapter = folder.adapter
        assert adapter is not None
        self.factors = {name: tuple(t.to(device) for t in adapter.read_factors(name)) for name in adapter.factors}
        self.replacements = {name: adapter.read_replacement(name).to(device=device, dtype=folder.dtype(name))
                             for name in adapter.replacements}

    def changes(self, name: str) -> bool:
        return name in self.factors or name in self.replacements

    @property
    def nbytes(self) -> int:
        held = [t for pair in self.factors.values() for t in pair] + list(self.replacements.values())
        return sum(t.numel() * t.element_size() for t in held)


def _after_copies(copied: Any, inputs: list[torch.Tensor], device: torch.device) -> None:
    """Make the merge's stream wait for the side stream's copies of ``inputs``, and tell the
    caching allocator they are used there (their memory is not reused before the merge is done)."""
    current = torch.cuda.current_stream(device)
    current.wait_event(copied)
    for t in inputs:
        if t.device.type == "cuda":
            t.record_stream(current)


def _holds_exactly(resident: torch.dtype, stored: torch.dtype) -> bool:
    """Whether every value of dtype ``stored`` survives a round trip through ``resident``."""
    return resident == stored or torch.promote_types(resident, stored) == resident


def state_view(model: torch.nn.Module) -> Mapping[str, torch.Tensor]:
    """A model's parameters and buffers by name, sharing storage with the model (for in-place merges)."""
    view: dict[str, torch.Tensor] = dict(model.named_buffers())
    view.update(dict(model.named_parameters(remove_duplicate=False)))
    return view
