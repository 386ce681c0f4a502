"""Spreading one live model over a worker's GPUs (``workers.gpus_per_worker`` above 1).

A model larger than one GPU (a 70B in bfloat16 is 141 GB) is split by decoder layer over the
worker's GPUs with accelerate's device map: whole layers per GPU, activations moved between them
by accelerate's hooks. The merge then writes each tensor where the map put it
(:meth:`ResidentModels.merge_into` computes on the destination's device), so no GPU ever holds
another's share. The map is computed from the model on the meta device, so it is tested on CPU;
loading onto GPUs is checked by ``scripts/gpu_check.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import EvomergeError


def device_map_for(config: Any, gpus: int, per_gpu_bytes: int, dtype: torch.dtype) -> dict[str, int]:
    """Module name -> GPU index for a model of ``config`` over ``gpus`` GPUs of ``per_gpu_bytes``
    each; refuses (naming ``workers.gpus_per_worker``) a map that would leave weights off the GPUs."""
    from accelerate import infer_auto_device_map
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    mapping = infer_auto_device_map(model, max_memory={i: per_gpu_bytes for i in range(gpus)},
                                    no_split_module_classes=list(model._no_split_modules or ()), dtype=dtype)
    off = sorted({str(v) for v in mapping.values() if not isinstance(v, int)})
    if off:
        raise EvomergeError(f"workers.gpus_per_worker: {gpus} GPU(s) of {per_gpu_bytes / 1e9:.1f} GB do not hold "
                            f"the live model (some layers would go to {', '.join(off)}); give each worker more GPUs")
    return mapping


def spread_over_gpus(path: Path, dtype: torch.dtype, gpus: int, *, trust_remote_code: bool = False,
                     reserve_fraction: float = 0.10) -> Any:
    """The base model loaded over this worker's first ``gpus`` GPUs, a device map leaving
    ``reserve_fraction`` of each GPU's free memory for evaluation. GPU path: runs only with CUDA."""
    from transformers import AutoConfig, AutoModelForCausalLM

    free = min(torch.cuda.mem_get_info(i)[0] for i in range(gpus))
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    mapping = device_map_for(config, gpus, int(free * (1 - reserve_fraction)), dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=mapping,
                                                trust_remote_code=trust_remote_code)
