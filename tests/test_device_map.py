"""The device map that spreads a live model over a worker's GPUs, computed on CPU (meta device)."""

from __future__ import annotations

import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.device_map import device_map_for
from evomerge.memory_plan import size_from_config

CONFIG = dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=8,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)


def _config():
    from transformers import AutoConfig

    data = dict(CONFIG)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def test_a_model_larger_than_one_gpu_is_spread_over_two_by_whole_layers():
    model_bytes = size_from_config(CONFIG, "x").bytes_in(torch.bfloat16)
    mapping = device_map_for(_config(), 2, int(0.65 * model_bytes), torch.bfloat16)
    assert set(mapping.values()) == {0, 1}
    layers = {k: v for k, v in mapping.items() if k.startswith("model.layers.")}
    assert all(k.count(".") == 2 for k in layers), "a decoder layer is never split between GPUs"
    gpus_by_layer = [layers[f"model.layers.{i}"] for i in range(8) if f"model.layers.{i}" in layers]
    assert gpus_by_layer == sorted(gpus_by_layer)  # in order: activations cross once


def test_gpus_too_small_for_the_model_are_refused_naming_the_setting():
    model_bytes = size_from_config(CONFIG, "x").bytes_in(torch.bfloat16)
    with pytest.raises(EvomergeError, match="workers.gpus_per_worker: 2 GPU"):
        device_map_for(_config(), 2, int(0.3 * model_bytes), torch.bfloat16)


@pytest.mark.gpu
def test_the_live_model_loads_over_two_gpus(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from evomerge.device_map import spread_over_gpus

    from .merge.tiny_models import write_tiny_llama

    folder = write_tiny_llama(tmp_path / "m", seed=0)
    model = spread_over_gpus(folder, torch.float32, 2)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
