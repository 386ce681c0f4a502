"""The memory plan: sizes from headers or a config on the meta device, the placement chosen for the
budget, and the refusal (exit 2, nothing written) when the workers cannot fit."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from evomerge.memory_plan import (EVAL_RESERVE_MIN, Devices, ModelSize, model_size, plan_memory, size_from_config,
                                  size_from_folder)
from evomerge.merge.model_folder import ModelFolder

ROOT = Path(__file__).resolve().parents[1]
GB = 10**9


def _model(gb: float, *, largest_share: float = 0.01, dtype: torch.dtype = torch.bfloat16) -> ModelSize:
    """A synthetic model of ``gb`` gigabytes in tensors of ``largest_share`` of it each."""
    count = round(1 / largest_share)
    numel = int(gb * GB / dtype.itemsize / count)
    return ModelSize("m", tuple((f"t{i}", numel, dtype) for i in range(count)))


def test_sizes_from_the_headers_equal_sizes_from_the_config_on_the_meta_device(toy_world, tmp_path):
    from_headers = size_from_folder(ModelFolder(str(toy_world.base)))
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_text((Path(toy_world.base) / "config.json").read_text())
    from_config = model_size(str(config_only))  # no weights: built on the meta device
    assert dict((n, c) for n, c, _ in from_config.tensors) == dict((n, c) for n, c, _ in from_headers.tensors)
    assert from_config.stored_bytes == from_headers.stored_bytes == sum(
        f.stat().st_size for f in Path(toy_world.base).glob("*.safetensors")) - _header_bytes(toy_world.base)


def _header_bytes(folder) -> int:
    total = 0
    for f in Path(folder).glob("*.safetensors"):
        with open(f, "rb") as fh:
            total += 8 + int.from_bytes(fh.read(8), "little")
    return total


def test_a_bfloat16_config_is_counted_in_bfloat16_and_tied_embeddings_once():
    config = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=100, torch_dtype="bfloat16")
    untied = size_from_config({**config, "tie_word_embeddings": False}, "x")
    tied = size_from_config({**config, "tie_word_embeddings": True}, "x")
    assert untied.dtype == torch.bfloat16
    assert untied.parameters - tied.parameters == 100 * 64
    assert untied.stored_bytes == 2 * untied.parameters


def test_the_most_resident_placement_that_fits_is_chosen_on_a_gpu():
    m = _model(14.5)
    inputs = [m, m, m]  # base and two donors
    big = plan_memory(inputs, base=0, workers=1, devices=Devices("cuda", 1, 200 * GB, 512 * GB))
    assert (big.placement, big.task_vectors, big.transfer_bytes_per_candidate) == ("device", "resident", 0)
    assert big.device_bytes_per_worker >= 5 * m.stored_bytes  # live + 3 inputs + 2 task vectors
    mid = plan_memory(inputs, base=0, workers=1, devices=Devices("cuda", 1, 80 * GB, 512 * GB))
    assert (mid.placement, mid.task_vectors) == ("device", "on the fly")
    small = plan_memory(inputs, base=0, workers=1, devices=Devices("cuda", 1, 24 * GB, 512 * GB))
    assert (small.placement, small.task_vectors) == ("streamed", "on the fly")
    assert small.fits and small.device_bytes_per_worker <= 24 * GB
    assert small.shared_host_bytes == small.transfer_bytes_per_candidate == 3 * m.stored_bytes
    assert small.device_bytes_per_worker >= m.stored_bytes + EVAL_RESERVE_MIN


def test_a_model_larger_than_its_gpus_is_refused_with_the_gpu_count_that_fits():
    m = _model(141)
    plan = plan_memory([m, m, m], base=0, workers=1, devices=Devices("cuda", 1, 80 * GB, 512 * GB))
    assert not plan.fits
    needed = int(plan.fix.split("gpus_per_worker: ")[1].split(" ")[0])
    assert needed >= 2
    again = plan_memory([m, m, m], base=0, workers=1, devices=Devices("cuda", needed, 80 * GB, 512 * GB))
    fewer = plan_memory([m, m, m], base=0, workers=1, devices=Devices("cuda", needed - 1, 80 * GB, 512 * GB))
    assert again.fits and not fewer.fits


def test_cpu_workers_share_the_inputs_and_own_one_model_each():
    m = _model(2, dtype=torch.float32)
    inputs = [m] * 3
    roomy = plan_memory(inputs, base=0, workers=2, devices=Devices("cpu", host_available=40 * GB))
    assert roomy.task_vectors == "resident"
    assert roomy.shared_host_bytes == 3 * m.stored_bytes  # once per node, however many workers
    tight = plan_memory(inputs, base=0, workers=2, devices=Devices("cpu", host_available=12 * GB))
    assert tight.task_vectors == "on the fly" and tight.fits
    assert tight.device_bytes_per_worker < 1.2 * m.stored_bytes  # the live model and one tensor's temporaries
    refused = plan_memory(inputs, base=0, workers=8, devices=Devices("cpu", host_available=12 * GB))
    assert not refused.fits and "workers.count: 5" in refused.fix


def test_a_float32_merge_of_bfloat16_models_counts_the_live_model_in_float32():
    m = _model(1)
    plan = plan_memory([m, m], base=0, workers=1, merge_dtype=torch.float32,
                       devices=Devices("cpu", host_available=100 * GB))
    assert plan.live_bytes == 2 * m.stored_bytes and plan.merge_dtype == "float32"
    own = plan_memory([m, m], base=0, workers=1, devices=Devices("cpu", host_available=100 * GB))
    assert own.live_bytes == m.stored_bytes and own.merge_dtype == "bfloat16"


@pytest.mark.slow
def test_validate_prints_the_plan_and_a_budget_too_small_exits_2_naming_workers(toy_world, tmp_path):
    import yaml

    from tests.cli_inprocess import run_cli

    data = yaml.safe_load((ROOT / "search_spaces" / "toy_ties.yaml").read_text())
    data["models"] = {"base": str(toy_world.base),
                      "donors": [str(toy_world.specialists[n]) for n in ("arith", "reverse")]}
    data["evaluation"]["include_path"] = [str(ROOT / "eval_tasks")]
    space = tmp_path / "space.yaml"

    def validate(**workers) -> subprocess.CompletedProcess:
        space.write_text(yaml.safe_dump({**data, "workers": {**data.get("workers", {}), **workers}}, sort_keys=False))
        return run_cli("validate", str(space), cwd=tmp_path)  # the entry point, in this process

    too_small = validate(device_memory="1MB")
    assert too_small.returncode == 2, too_small.stderr
    assert "space.yaml: workers: the models do not fit" in too_small.stderr
    assert "a machine with more memory" in too_small.stderr  # the fix: no worker count fits 1 MB
    assert "Traceback" not in too_small.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]
    fine = validate(device_memory="8GB")
    assert fine.returncode == 0, fine.stderr
    assert "memory plan (CPU workers, 2 worker(s), merged in float32):" in fine.stdout
    assert "task vectors resident" in fine.stdout
