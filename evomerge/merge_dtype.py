"""The dtype a search merges in when its space file does not say: float32 on CPU, the models' own on a GPU.

A worker's live model is kept in the merge dtype. On a GPU that is the memory that decides
whether a search fits: a 7B model is 14.5 GB in bfloat16 and 29 GB in float32, and every input
streamed to the device doubles with it. Merging bfloat16 models in bfloat16 is what mergekit
does by default for its task-vector methods and what mergekit-evolve's in-memory mode does, so
on a GPU the default is the base's stored dtype. On CPU the default stays float32: bfloat16
arithmetic there is no faster, and every space file written so far keeps its meaning and its
run hash.

The choice is made once, when a run starts (:func:`resolve_merge_dtype`): the resolved dtype is
written into the run's config (``merge.dtype``) before its identity is hashed and the run folder
written, so the recipes the search proposes, a resume (on any machine) and ``evomerge export``
all carry the dtype the candidates were actually merged and evaluated in. A run started on a GPU
from a space file without ``merge.dtype`` is therefore another run than the same file started on
CPU; resuming one on the other is refused with the one-field diff (``merge.dtype``).
"""

from __future__ import annotations

from typing import Any

import torch


def math_device(gpus_per_worker: float) -> str:
    """Where the workers merge: ``cuda`` when they ask for GPUs and this machine has one (as the
    memory plan's :func:`~evomerge.memory_plan.detect_devices` decides), else ``cpu``."""
    return "cuda" if gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"


def default_merge_dtype(device: str, stored: torch.dtype) -> torch.dtype:
    """The merge dtype for models stored in ``stored`` when none is set: theirs on a GPU (a
    floating dtype), float32 everywhere else."""
    if torch.device(device).type == "cuda" and stored.is_floating_point:
        return stored
    return torch.float32


def resolve_merge_dtype(config: Any, *, as_loaded: Any | None = None, device: str | None = None) -> Any:
    """``config`` with ``merge.dtype`` set to :func:`default_merge_dtype` where the space file
    leaves it out (read from ``as_loaded``, the config as parsed from the file, when ``config``
    was rebuilt since, e.g. with resolved model references); unchanged where the file sets it,
    where the default is float32 (so the data, and the run hash, are the old ones), and for a
    route with a dtype of its own (a joint search has one dtype, the route's)."""
    written = as_loaded if as_loaded is not None else config
    if config.merge is None or "dtype" in written.merge.model_fields_set:
        return config
    if config.route is not None and config.route.dtype is not None:
        return config
    from .memory_plan import model_size
    from .space_config import parse_space_config

    device = device or math_device(config.workers.gpus_per_worker)
    dtype = default_merge_dtype(device, model_size(config.models.base).dtype)
    if dtype == torch.float32:
        return config
    data = config.to_data()
    data["merge"]["dtype"] = str(dtype).removeprefix("torch.")
    return parse_space_config(data, source=config.source)
