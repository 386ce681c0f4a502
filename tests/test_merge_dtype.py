"""The merge dtype a space file leaves out: float32 on CPU (run hashes unchanged), the models' own
on a GPU, fixed in the run's config when the run starts (the CUDA path itself: scripts/gpu_check.py)."""

from __future__ import annotations

import json
import shutil

import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.merge_dtype import default_merge_dtype, resolve_merge_dtype
from evomerge.model_refs import resolve_config
from evomerge.space_config import load_space_config, parse_space_config

from .reliability.conftest import good_space, write_yaml


def test_the_default_is_the_stored_dtype_on_a_gpu_and_float32_elsewhere():
    assert default_merge_dtype("cuda", torch.bfloat16) == torch.bfloat16
    assert default_merge_dtype("cuda:1", torch.float16) == torch.float16
    assert default_merge_dtype("cuda", torch.float32) == torch.float32
    assert default_merge_dtype("cpu", torch.bfloat16) == torch.float32
    assert default_merge_dtype("cuda", torch.int8) == torch.float32  # not a floating dtype: never merged in it


def _bfloat16_copy(src, dest):
    dest.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}, str(dest / f.name))
        elif f.is_file():
            shutil.copy(f, dest / f.name)
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    return dest


def test_the_resolved_dtype_is_part_of_the_run_and_cpu_spaces_keep_their_hash(toy_world, tmp_path):
    base16 = _bfloat16_copy(toy_world.base, tmp_path / "base16")
    space = write_yaml(tmp_path / "space.yaml", good_space(toy_world, **{"models.base": str(base16)}))
    loaded = load_space_config(space)
    config = resolve_config(loaded)  # rebuilt with absolute references: the file's omission read from `loaded`

    on_cpu = resolve_merge_dtype(config, as_loaded=loaded, device="cpu")
    assert on_cpu is config and on_cpu.config_hash() == config.config_hash()  # existing spaces: the same run

    on_gpu = resolve_merge_dtype(config, as_loaded=loaded, device="cuda")
    assert on_gpu.merge.dtype == "bfloat16" and on_gpu.dtype == "bfloat16"  # the worker's and the plan's dtype
    assert on_gpu.config_hash() != config.config_hash()
    assert on_gpu.diff(config) == ["merge.dtype: \"bfloat16\" -> \"float32\""]
    # the run folder stores the resolved config: resumed anywhere, it stays what was evaluated
    stored = parse_space_config(yaml.safe_load(on_gpu.to_yaml()), source="space.yaml")
    assert resolve_merge_dtype(stored, device="cpu").merge.dtype == "bfloat16"
    assert resolve_merge_dtype(stored, device="cuda").config_hash() == on_gpu.config_hash()

    # written out, it is the user's choice on every device
    explicit = load_space_config(write_yaml(tmp_path / "f32.yaml", good_space(
        toy_world, **{"models.base": str(base16), "merge.dtype": "float32"})))
    assert resolve_merge_dtype(explicit, device="cuda").merge.dtype == "float32"
