"""Streaming: `evomerge merge` holds the tensors in flight, never whole models.

The models here are 320 MiB each (two of them are read); the merge may grow its resident set by
at most 96 MiB over what the process held after its imports. Holding either input model, or
the output, in memory would break that bound.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file

LAYERS, DIM = 20, 1024  # 4 matrices of 4 MiB per layer: 320 MiB per model
BOUND_MIB = 96  # about 24 of its 4 MiB tensors; measured here: about 40 MiB


def _write_model(folder, seed: int) -> None:
    folder.mkdir()
    gen = torch.Generator().manual_seed(seed)
    names = [f"model.layers.{i}.{m}.weight" for i in range(LAYERS) for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")]
    half = len(names) // 2
    weight_map = {}
    for part, chunk in enumerate((names[:half], names[half:])):
        fname = f"model-{part + 1:05d}-of-00002.safetensors"
        save_file({n: torch.randn(DIM, DIM, generator=gen) for n in chunk}, str(folder / fname))
        weight_map.update({n: fname for n in chunk})
    save_file({"model.embed_tokens.weight": torch.randn(64, DIM, generator=gen), "model.norm.weight": torch.ones(DIM)},
              str(folder / "model-extra.safetensors"))
    weight_map.update({"model.embed_tokens.weight": "model-extra.safetensors", "model.norm.weight": "model-extra.safetensors"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": LAYERS, "hidden_size": DIM}))


_CHILD = """
import sys
from pathlib import Path
from evomerge.merge.run import merge_from_file

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])

Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
merge_from_file(sys.argv[1], sys.argv[2], shard_size="100MB")
if len(sys.argv) > 3:  # sensitivity check: what holding one whole model would show
    from safetensors.torch import load_file
    held = [t.clone() for f in Path(sys.argv[3]).glob("*.safetensors") for t in load_file(str(f)).values()]
print(before, status("VmHWM"))
"""


@pytest.mark.slow
def test_peak_memory_stays_near_tensors_in_flight(tmp_path):
    _write_model(tmp_path / "base", 0)
    _write_model(tmp_path / "donor", 1)
    model_mib = sum(f.stat().st_size for f in (tmp_path / "base").glob("*.safetensors")) / 2**20
    assert model_mib > 2 * BOUND_MIB
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic",
        "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / "donor"), "parameters": {"weight": 0.5}}],
    }))
    result = subprocess.run([sys.executable, "-c", _CHILD, str(cfg), str(tmp_path / "out")], capture_output=True, text=True)
    held = subprocess.run([sys.executable, "-c", _CHILD, str(cfg), str(tmp_path / "out2"), str(tmp_path / "base")],
                          capture_output=True, text=True)
    before_kib, peak_kib = map(int, held.stdout.split())
    assert (peak_kib - before_kib) / 1024 > model_mib * 0.9, "the measurement must see a whole model when one is held"
    assert result.returncode == 0, result.stderr
    before_kib, peak_kib = map(int, result.stdout.split())
    grown_mib = (peak_kib - before_kib) / 1024
    written = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors")) / 2**20
    assert written == pytest.approx(model_mib, rel=0.01)
    print(f"RSS grew {grown_mib:.0f} MiB merging two {model_mib:.0f} MiB models")
    assert grown_mib < BOUND_MIB, f"merge grew RSS by {grown_mib:.0f} MiB for {model_mib:.0f} MiB models"
