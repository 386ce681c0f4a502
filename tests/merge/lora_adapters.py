"""Real PEFT LoRA adapters for tests, made with ``peft`` on a tiny model folder.

A fresh adapter's B factors are zero (its delta is zero), so the factors are filled with seeded
noise: every adapted tensor then really changes, and a test that ignored the adapter would fail.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def write_adapter(
    folder: Path,
    base: Path,
    *,
    seed: int = 0,
    targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"),
    r: int = 4,
    alpha: float = 8,
    safe: bool = True,
    **config: Any,
) -> Path:
    """A PEFT LoRA adapter for the model at ``base`` (loaded in its stored dtype), saved at ``folder``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_" in name or ".modules_to_save." in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.dtype))
    peft_model.save_pretrained(folder, safe_serialization=safe)
    return folder


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own ``merge_and_unload()`` of ``adapter`` into ``base`` (loaded in its stored dtype)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def edit_config(adapter: Path, **changes: Any) -> Path:
    """Change fields of an adapter's adapter_config.json (None deletes one)."""
    path = adapter / "adapter_config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return adapter
