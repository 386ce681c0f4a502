"""Where a search's models are stored and how much memory each worker needs, before anything starts.

A worker merges every candidate into one live model and scores it. What else it holds is a
choice: the base and donors (the merge's inputs) and the donors' task vectors can sit on the
math device, next to the live model, or stay in host memory and be streamed to the device one
tensor at a time. On a 7B bfloat16 model with two donors, keeping everything on the GPU is 87 GB;
streaming needs one model (14.5 GB) plus a few tensors in flight. This module makes that choice
from the models' headers alone (shapes and dtypes; a Hub model's config built on the meta device,
no weights read), the worker count, the devices and the host memory, and says why:

- ``device``: inputs (and task vectors, where they also fit) resident on the math device; no
  transfer per candidate. On CPU the "device" is host memory, and the inputs are memory-mapped
  safetensors: shared through the page cache by every worker of the node, never copied.
- ``streamed``: inputs stay in host memory (the page cache: one copy per node, however many
  workers) and each candidate streams them tensor by tensor to the GPU; task vectors are formed
  per tensor on the fly.

When nothing fits, :func:`plan_memory` says so (``fits`` false, ``problem`` and ``fix``), and the
search refuses to start: exit 2 before the run folder exists, naming ``workers`` and the fix.
The sizes are estimates of the weights and the merge's temporaries; activations are covered by a
reserve (:data:`EVAL_RESERVE_FRACTION`), which is also what ``batch_size: auto`` probes within.
Pure: devices and host memory are passed in (:func:`detect_devices` reads them), so tests and the
README's table compute plans for hardware this machine does not have.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ModelError
from .merge.prefetch import READ_AHEAD

#: Of the device memory left after the weights, the share kept back for evaluation (activations,
#: the KV cache of a generation, the CUDA context): at least ``EVAL_RESERVE_MIN`` bytes.
EVAL_RESERVE_FRACTION = 0.10
EVAL_RESERVE_MIN = 1 << 30
#: Of the host memory psutil reports available, the share a plan may count on (the rest is the
#: OS's, the driver's and lm-eval's).
HOST_USABLE_FRACTION = 0.85


@dataclass(frozen=True)
class ModelSize:
    """One model's tensors as the plan needs them: name, element count, stored dtype."""

    reference: str
    tensors: tuple[tuple[str, int, torch.dtype], ...]
    #: for a LoRA donor (``base+adapter``): the bytes a worker holds for it (its factors, and any
    #: full tensors saved with the adapter); its other tensors are the base's, formed per merge
    low_rank_bytes: int | None = None

    @property
    def stored_bytes(self) -> int:
        return sum(n * d.itemsize for _, n, d in self.tensors)

    def bytes_in(self, dtype: torch.dtype) -> int:
        """Bytes with floating tensors in ``dtype`` (integer tensors keep their own)."""
        return sum(n * (dtype.itemsize if d.is_floating_point else d.itemsize) for _, n, d in self.tensors)

    def largest(self) -> int:
        return max((n for _, n, _ in self.tensors), default=0)

    @property
    def parameters(self) -> int:
        return sum(n for _, n, _ in self.tensors)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype most of its bytes are stored in (a model's "own" dtype)."""
        totals: dict[torch.dtype, int] = {}
        for _, n, d in self.tensors:
            totals[d] = totals.get(d, 0) + n * d.itemsize
        return max(totals, key=totals.__getitem__) if totals else torch.float32


def size_from_folder(folder: Any) -> ModelSize:
    """From a :class:`~evomerge.merge.model_folder.ModelFolder`'s safetensors headers (no weights read).

    An adapter donor's tensors are the adapted model's (as its merge reads them), and its
    ``low_rank_bytes`` what a worker keeps of it: the factors in their stored dtype and any saved
    full tensor in the base's dtype (see :class:`evomerge.merge.inmemory.ResidentModels`)."""
    tensors = tuple((name, math.prod(folder.shape(name)), folder.dtype(name)) for name in folder.tensor_names)
    adapter = folder.adapter
    if adapter is None:
        return ModelSize(folder.reference, tensors)
    held = sum(f.a.nbytes + f.b.nbytes for f in adapter.factors.values())
    held += sum(math.prod(info.shape) * folder.dtype(name).itemsize for name, info in adapter.replacements.items())
    return ModelSize(folder.reference, tensors, low_rank_bytes=held)


def size_from_config(config: dict[str, Any], reference: str) -> ModelSize:
    """From a model's ``config.json`` alone: the model is built on the meta device (no memory, no
    weights), so a Hub model can be planned before anything is downloaded. Tied embeddings are
    counted once, as they are stored."""
    from transformers import AutoConfig, AutoModelForCausalLM

    data = dict(config)
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ModelError(f"{reference}: config.json has no model_type; evomerge cannot tell its architecture")
    dtype = _config_dtype(data)
    cfg = AutoConfig.for_model(model_type, **data)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    tensors = tuple((name, p.numel(), dtype if p.is_floating_point() else p.dtype)
                    for name, p in model.named_parameters())  # remove_duplicate: tied weights once
    return ModelSize(reference, tensors)


def _config_dtype(config: dict[str, Any]) -> torch.dtype:
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    found = getattr(torch, str(name), None)
    return found if isinstance(found, torch.dtype) else torch.float32


def model_size(reference: str) -> ModelSize:
    """A local folder's headers; a folder with only a config, or a Hub id, from its config alone."""
    path = Path(reference).expanduser()
    if path.is_dir():
        if any(path.glob("*.safetensors")):
            from .merge.model_folder import ModelFolder

            return size_from_folder(ModelFolder(reference))
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelError(f"{path}: no config.json; is this a Hugging Face model folder?")
        return size_from_config(json.loads(config_file.read_text()), reference)
    try:
        from huggingface_hub import hf_hub_download

        repo, _, revision = reference.partition("@")
        config_file = Path(hf_hub_download(repo, "config.json", revision=revision or None))
    except Exception as err:  # offline, unknown repo, gated: all user-fixable
        raise ModelError(f"model {reference!r}: its config could not be read for the memory plan "
                         f"({type(err).__name__}: {err}); give a local path or check the id and your network") from None
    return size_from_config(json.loads(config_file.read_text()), reference)


@dataclass(frozen=True)
class Devices:
    """What one worker computes on, and the node's host memory (bytes)."""

    kind: str  # "cpu" or "cuda"
    gpus_per_worker: float = 0.0
    free_per_gpu: int = 0  # the least free memory of the node's GPUs, after any cap
    host_available: int = 0  # the node's host memory a plan may count on, after any cap

    @property
    def device_budget(self) -> int:
        """Bytes one worker may use on its math device (for a CPU worker: 0, see host)."""
        return int(self.free_per_gpu * self.gpus_per_worker) if self.kind == "cuda" else 0


def detect_devices(gpus_per_worker: float, *, device_memory: int | None = None,
                   host_memory: int | None = None) -> Devices:
    """This node's devices: free GPU memory from ``torch.cuda.mem_get_info`` when a GPU is asked
    for and present, host memory from psutil; each capped by the config's settings when given."""
    import psutil

    host = host_memory if host_memory is not None else int(psutil.virtual_memory().available * HOST_USABLE_FRACTION)
    if gpus_per_worker > 0 and torch.cuda.is_available():  # GPU path: only runs where CUDA exists
        free = min(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
        if device_memory is not None:
            free = min(free, device_memory)
        return Devices("cuda", gpus_per_worker, free, host)
    if gpus_per_worker > 0 and device_memory is not None:
        # no GPU here but the budget is given (a plan for another machine, or a test)
        return Devices("cuda", gpus_per_worker, device_memory, host)
    if device_memory is not None:
        host = min(host, device_memory)  # a CPU worker's "device" is host memory
    return Devices("cpu", 0.0, 0, host)


@dataclass(frozen=True)
class MemoryPlan:
    """Where the inputs live and what each worker and node needs (bytes)."""

    placement: str  # "device" or "streamed"
    task_vectors: str  # "resident" or "on the fly"
    merge_dtype: str
    workers: int
    device: Devices
    live_bytes: int  # the live model, per worker, on the math device
    device_bytes_per_worker: int  # everything a worker holds on its device (CPU: in its own memory)
    host_bytes_per_worker: int  # host memory a worker owns besides the device's (staging buffers)
    shared_host_bytes: int  # inputs in the page cache, once per node
    transfer_bytes_per_candidate: int  # host to device, per candidate
    reserve_bytes: int  # kept back for evaluation (activations); batch_size: auto probes within it
    merge_work_bytes: int = 0  # one tensor's merge temporaries (and streamed inputs): left free by the probe
    fits: bool = True
    problem: str = ""
    fix: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> list[str]:
        """The lines the search and ``evomerge validate`` print."""
        d = self.device
        where = (f"{d.gpus_per_worker:g} GPU(s) per worker, {_gb(d.free_per_gpu)} free on each" if d.kind == "cuda"
                 else "CPU workers")
        inputs = ("on the math device" if self.placement == "device" and d.kind == "cuda"
                  else "memory-mapped, shared by the node's workers through the page cache"
                  + (", streamed per tensor to the GPU" if d.kind == "cuda" else ""))
        lines = [f"memory plan ({where}, {self.workers} worker(s), merged in {self.merge_dtype}):",
                 f"  inputs: {inputs}; task vectors {self.task_vectors}"]
        if d.kind == "cuda":
            lines += [f"  per worker: {_gb(self.device_bytes_per_worker)} on its GPU(s) (live model "
                      f"{_gb(self.live_bytes)}, evaluation reserve {_gb(self.reserve_bytes)}), "
                      f"{_gb(self.host_bytes_per_worker)} in host memory",
                      f"  shared per node: {_gb(self.shared_host_bytes)} (host memory usable: {_gb(d.host_available)})",
                      f"  transfer per candidate: {_gb(self.transfer_bytes_per_candidate)}"]
        else:
            lines += [f"  per worker: {_gb(self.device_bytes_per_worker)} of its own (live model {_gb(self.live_bytes)})",
                      f"  shared per node: {_gb(self.shared_host_bytes)} (host memory usable: {_gb(d.host_available)})"]
        lines += [f"  note: {n}" for n in self.notes]
        if not self.fits:
            lines.append(f"  does not fit: {self.problem}; {self.fix}")
        return lines


def plan_memory(inputs: Sequence[ModelSize], *, base: int, workers: int, devices: Devices,
                merge_dtype: torch.dtype | None = None) -> MemoryPlan:
    """Choose where ``inputs`` (base at index ``base``) live for ``workers`` workers on ``devices``.

    The most resident placement that fits wins: it transfers nothing per candidate. ``merge_dtype``
    None means the base's own dtype (on a GPU the default: bfloat16 models merge in bfloat16).

    Inputs are read :data:`~evomerge.merge.prefetch.READ_AHEAD` tensors ahead of the merge, so
    ``1 + READ_AHEAD`` tensors' inputs are in flight at once wherever they are copies (streamed
    to a GPU, converted to the merge dtype, or formed from an adapter). A LoRA donor
    (``low_rank_bytes``) costs its factors, held by each worker beside the live model, and each
    of its tensors formed per merge (the base's, plus a float32 delta); it has no task vector.
    """
    base_size = inputs[base]
    dtype = merge_dtype or base_size.dtype
    donors = [m for i, m in enumerate(inputs) if i != base]
    full = [base_size] + [m for m in donors if m.low_rank_bytes is None]
    adapters = [m for m in donors if m.low_rank_bytes is not None]
    held_adapters = sum(m.low_rank_bytes or 0 for m in adapters)
    live = base_size.bytes_in(dtype)
    largest_count = max(m.largest() for m in inputs)
    largest = largest_count * dtype.itemsize
    in_flight = 1 + READ_AHEAD
    # one tensor's merge: a row of terms per donor, the result, and each input converted to dtype
    work = (len(donors) + 2) * largest
    if any(m.dtype != dtype for m in full):
        work += in_flight * len(full) * largest
    if adapters:  # formed per tensor: the tensor itself, and the delta (B @ A, in float32) of one at a time
        work += in_flight * len(adapters) * largest + largest_count * 4
    inputs_on_device = sum(m.bytes_in(dtype) for m in full) + held_adapters
    task_vectors = sum(m.bytes_in(dtype) for m in full[1:])
    stored = sum(m.stored_bytes for m in full)  # an adapter's factors are each worker's own, not shared
    stream = in_flight * len(full) * largest
    # an adapter donor's tensors are formed from the base's, which then cross to the GPU once more
    transfer = stored + len(adapters) * base_size.stored_bytes
    common = dict(merge_dtype=str(dtype).removeprefix("torch."), workers=workers, device=devices, live_bytes=live,
                  merge_work_bytes=work + (stream if devices.kind == "cuda" else 0))
    if devices.kind == "cuda":
        return _plan_gpu(devices, live=live, held=held_adapters, work=work, inputs_on_device=inputs_on_device,
                         task_vectors=task_vectors, stored=stored, stream=stream, transfer=transfer,
                         workers=workers, common=common)
    return _plan_cpu(devices, live=live, held=held_adapters, work=work, task_vectors=task_vectors, stored=stored,
                     workers=workers, common=common)


def _plan_gpu(d: Devices, *, live: int, held: int, work: int, inputs_on_device: int, task_vectors: int, stored: int,
              stream: int, transfer: int, workers: int, common: dict[str, Any]) -> MemoryPlan:
    budget = d.device_budget
    reserve = max(EVAL_RESERVE_MIN, int(EVAL_RESERVE_FRACTION * live))
    # the GPU path (streaming to CUDA) is written here, checked by scripts/gpu_check.py on a GPU
    options = [
        ("device", "resident", live + inputs_on_device + task_vectors + work + reserve, 0, 0, 0),
        ("device", "on the fly", live + inputs_on_device + work + reserve, 0, 0, 0),
        # streamed: inputs of the tensor merged and those read ahead on the device, pinned staging
        # for them on the host
        ("streamed", "on the fly", live + held + work + stream + reserve, stream, stored, transfer),
    ]
    for placement, vectors, need, host_own, shared, moved in options:
        if need <= budget:
            notes = ()
            if shared and shared + workers * host_own > d.host_available:
                notes = (f"the inputs ({_gb(shared)}) exceed usable host memory: they are re-read from disk "
                         "for every candidate",)
            return MemoryPlan(placement, vectors, device_bytes_per_worker=need, host_bytes_per_worker=host_own,
                              shared_host_bytes=shared, transfer_bytes_per_candidate=moved, reserve_bytes=reserve,
                              notes=notes, **common)
    need = live + held + work + stream + reserve
    gpus = math.ceil(need / d.free_per_gpu) if d.free_per_gpu else 0
    fix = (f"give each worker more GPUs (workers.gpus_per_worker: {gpus} spreads the live model over them), "
           "or raise workers.device_memory if it caps the budget" if gpus else "give the workers a GPU")
    return MemoryPlan("streamed", "on the fly", device_bytes_per_worker=need, host_bytes_per_worker=stream,
                      shared_host_bytes=stored, transfer_bytes_per_candidate=transfer, reserve_bytes=reserve,
                      fits=False, problem=f"even streaming its inputs a worker needs {_gb(need)} on its device, "
                      f"and {d.gpus_per_worker:g} GPU(s) with {_gb(d.free_per_gpu)} free each give {_gb(budget)}",
                      fix=fix, **common)


def _plan_cpu(d: Devices, *, live: int, held: int, work: int, task_vectors: int, stored: int, workers: int,
              common: dict[str, Any]) -> MemoryPlan:
    """CPU: the inputs are memory-mapped (shared, never copied); each worker owns its live model,
    the merge's temporaries, any LoRA donor's factors (``held``) and, where they fit, its task vectors."""
    budget = d.host_available
    live += held
    options = [
        ("resident", live + task_vectors + work, ()),
        ("on the fly", live + work, ()),
        ("on the fly", live + work, (f"the inputs ({_gb(stored)}) do not stay in the page cache beside "
                                     f"{workers} live model(s): they are re-read from disk for every candidate",)),
    ]
    for i, (vectors, own, notes) in enumerate(options):
        need = workers * own + (stored if i < 2 else 0)
        if need <= budget:
            return MemoryPlan("device", vectors, device_bytes_per_worker=own, host_bytes_per_worker=0,
                              shared_host_bytes=stored, transfer_bytes_per_candidate=0, reserve_bytes=0,
                              notes=notes, **common)
    own = live + work
    most = budget // own
    fix = (f"use fewer workers (workers.count: {most} fits), or raise workers.device_memory if it caps the budget"
           if most >= 1 else "use a machine with more memory, or a GPU (workers.gpus_per_worker)")
    return MemoryPlan("device", "on the fly", device_bytes_per_worker=own, host_bytes_per_worker=0,
                      shared_host_bytes=stored, transfer_bytes_per_candidate=0, reserve_bytes=0, fits=False,
                      problem=f"{workers} worker(s) need {_gb(workers * own)} of their own and "
                      f"{_gb(budget)} of host memory is usable", fix=fix, **common)


def format_bytes(n: int) -> str:
    """A size as a person reads it: ``2.7 MB``, ``14.5 GB``, ``512 B`` (model sizes in start-up
    lines and ``evomerge validate``)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
