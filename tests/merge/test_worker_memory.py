"""A worker with mapped inputs owns one live model and one tensor's temporaries, within its plan.

Base and two donors of 320 MiB each (float32): today's resident path owns 3 models and 2 task
vectors (1.6 GB) besides the live model. With the inputs memory-mapped (the plan's CPU placement
when the task vectors do not fit) the worker's own memory grows by the live model plus the merge's
temporaries only, whatever the donor count. Measured as the growth of the process's private
anonymous memory (``RssAnon`` in /proc/self/status, sampled every millisecond while merging two
candidates): mapped file pages are page cache, shared with every worker of the node, and are
counted by ``RssFile`` instead (reported, not bounded).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from .test_merge_memory import _write_model

_CHILD = """
import sys, threading, time
from pathlib import Path
import torch
from evomerge.memory_plan import Devices, plan_memory, size_from_folder
from evomerge.merge.config import parse_merge_config
from evomerge.merge.inmemory import ResidentModels

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

base, donors, storage = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], status("RssAnon"))
        time.sleep(0.001)
before = status("RssAnon")
threading.Thread(target=sample, daemon=True).start()
resident = ResidentModels([base, *donors], base, storage=storage, task_vectors=storage == "resident")
plan_inputs = [size_from_folder(resident.folders[r]) for r in (base, *donors)]
plan = plan_memory(plan_inputs, base=0, workers=1, merge_dtype=torch.float32, devices=Devices("cpu", host_available=1 << 30))
live = {k: resident._for_math(v).clone() for k, v in resident.tensors[base].items()}  # the live model
for weight in (0.3, 0.7):
    config = parse_merge_config({"merge_method": "task_arithmetic", "base_model": base, "models": [
        {"model": d, "parameters": {"weight": weight}} for d in donors]})
    resident.merge_into(resident.plan(config), live)
time.sleep(0.01)
print(before, peak[0], plan.device_bytes_per_worker, plan.task_vectors, status("RssFile"), sep="|")
"""


def _run(base, donors, storage):
    done = subprocess.run([sys.executable, "-c", _CHILD, str(base), ",".join(map(str, donors)), storage],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    before, peak, planned, vectors, file_rss = done.stdout.splitlines()[-1].split("|")
    return int(peak) - int(before), int(planned), vectors, int(file_rss)


@pytest.mark.slow
def test_a_mapped_worker_owns_the_live_model_and_stays_within_its_plan(tmp_path):
    _write_model(tmp_path / "base", 0)
    donors = [tmp_path / "d1", tmp_path / "d2"]
    for seed, d in enumerate(donors, 1):
        _write_model(d, seed)
    model = sum(f.stat().st_size for f in (tmp_path / "base").glob("*.safetensors"))
    grown, planned, vectors, file_rss = _run(tmp_path / "base", donors, "mapped")
    print(f"mapped: own memory grew {grown / 2**20:.0f} MiB (plan {planned / 2**20:.0f} MiB, one model "
          f"{model / 2**20:.0f} MiB), mapped file pages {file_rss / 2**20:.0f} MiB")
    assert vectors == "on the fly"  # a 1 GiB budget holds no task vectors beside the shared inputs
    assert planned < 1.2 * model  # the plan: the live model and one tensor's temporaries
    assert grown <= planned * 1.1 + (32 << 20), f"grew {grown >> 20} MiB, plan {planned >> 20} MiB"
    assert file_rss > 2 * model  # the inputs were read through the maps, not copied
    # the measurement sees owned copies: today's resident path grows by 6 models
    grown_resident, _, _, _ = _run(tmp_path / "base", donors, "resident")
    print(f"resident: own memory grew {grown_resident / 2**20:.0f} MiB")
    assert grown_resident > 5 * model
