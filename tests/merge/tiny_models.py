"""Tiny random Llama models written as real Hugging Face folders, for merge tests.

Donors are the base plus a seeded perturbation, as fine-tunes of one base are, so task vectors
are small and signs disagree between donors: every branch of the merge methods gets exercised.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def tiny_llama_config(**overrides) -> "object":
    from transformers import LlamaConfig

    cfg = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def write_tiny_llama(folder: Path, *, seed: int, base: Path | None = None, scale: float = 0.02, **config) -> Path:
    """A random tiny Llama at ``folder``; with ``base``, the base's weights plus noise of ``scale``."""
    from transformers import LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config))
    if base is not None:
        from safetensors.torch import load_file

        base_sd = load_file(str(base / "model.safetensors"))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                b = base_sd[name]
                p.copy_(b + scale * torch.randn(b.shape, generator=gen) * b.abs().mean().clamp_min(1e-3))
    model.save_pretrained(folder)
    return folder


def write_state_dict_model(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """A model folder from raw tensors and a config dict (for shapes transformers would not build)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def cast_model_folder(source: Path, folder: Path, dtype: torch.dtype) -> Path:
    """A copy of the model folder ``source`` with its floating tensors stored in ``dtype``.

    Published checkpoints are stored in bfloat16 (some in float16): their task vectors are
    differences of coarsely rounded numbers, so magnitudes tie far more often than in float32,
    which is what makes the trim thresholds of TIES and breadcrumbs choose among tied entries.
    """
    import json

    from safetensors.torch import load_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(source / "model.safetensors"))
    cast = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(cast, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config))
    return folder
