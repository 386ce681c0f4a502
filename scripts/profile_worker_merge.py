"""Where a search worker's merge of one candidate spends its CPU time (a profile, not a test).

    python scripts/profile_worker_merge.py [--layers 2] [--donors 2] [--dtype bfloat16]

Builds (or reuses, under ``.bench/profile/``) a random-weight Llama of ``bench_scale.py``'s shapes
(hidden 2048, 32k vocabulary) with ``--layers`` layers, and donors that are the base plus noise.
With the worker's mapped storage (task vectors on the fly, one thread) it merges a candidate
(task_arithmetic) once to map the pages, then times each phase of the next candidates' merges in
CPU seconds (user + system, from ``getrusage``: a machine shared with other jobs inflates wall
time, not these): reading the inputs, the method, the copy into the live model, and the distance
from the base the worker reports (``l2_from_base``). Two ways, interleaved: ``now``, as the worker
merges (inputs stored in another dtype converted into buffers kept between tensors, the distance
summed in a buffer too), and ``fresh``, as it merged before (each conversion a new tensor, and the
distance the plain expression ``sum((merged - base) ** 2)``, whose two tensor-sized temporaries
were a third of the merge at 1B). Both give the same distance (checked). Minor page faults per
candidate are printed with each: first touches of fresh allocations, paid in system time.
Last, whole candidates through ``merge_into`` with the inputs read inline and read one tensor
ahead on a thread (interleaved), wall and CPU seconds each.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scale  # the 1B benchmark's model shapes and builder

from evomerge.merge.config import parse_merge_config
from evomerge.merge.inmemory import ResidentModels
from evomerge.merge.run import compute_task


def _usage() -> tuple[float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_minflt


def profile(resident: ResidentModels, plan, live: dict[str, torch.Tensor], way: str) -> tuple[dict[str, float], int, float]:
    """One candidate merged as ``merge_into`` merges it (inline), phase by phase (CPU seconds)."""
    phases = dict.fromkeys(("read inputs", "method", "copy into live model", "l2_from_base"), 0.0)
    names = list(phases)
    squared = 0.0
    start_faults = _usage()[1]
    for task in plan.tasks:
        marks = [_usage()[0]]
        dest = live[task.name]
        if way == "now":
            inputs = resident._read_inputs(task, dest.device)[0]
        else:
            inputs = [resident._get(m, n, dest.device) for m, n in task.sources]
        marks.append(_usage()[0])
        result = compute_task(plan, task, inputs, None)
        marks.append(_usage()[0])
        dest.copy_(result)
        marks.append(_usage()[0])
        base = inputs[task.base_index]
        if way == "now":
            squared += resident._squared_distance(result, base)
        else:
            squared += float(torch.sum((result.to(base.dtype) - base) ** 2))
        marks.append(_usage()[0])
        for i, name in enumerate(names):
            phases[name] += marks[i + 1] - marks[i]
    return phases, _usage()[1] - start_faults, squared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--donors", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench_scale.SHAPE["num_hidden_layers"] = args.layers
    root = bench_scale.ROOT / ".bench" / "profile" / f"layers{args.layers}"
    for i in range(args.donors + 1):
        bench_scale.build_model(root / ("base" if i == 0 else f"donor{i}"), i)
    base, donors = str(root / "base"), [str(root / f"donor{i}") for i in range(1, args.donors + 1)]
    dtype = getattr(torch, args.dtype)
    resident = ResidentModels([base, *donors], base, dtype=dtype, storage="mapped", task_vectors=False)
    live = {k: resident._for_math(v).clone() for k, v in resident.tensors[base].items()}
    model_bytes = sum(t.numel() * t.element_size() for t in live.values())
    config = parse_merge_config({"merge_method": "task_arithmetic", "base_model": base, "dtype": args.dtype,
                                 "models": [{"model": d, "parameters": {"weight": 0.3}} for d in donors]})
    plan = resident.plan(config)
    resident.merge_into(plan, live)  # maps every input page once
    print(f"model: {args.layers} layers, {model_bytes / 1e9:.3f} GB in {args.dtype}; {args.donors} donors; "
          f"one thread; CPU seconds per candidate (user + system)")
    values = {}
    for way in ("fresh", "now", "fresh", "now"):  # interleaved: a busy moment hits both
        phases, faults, values[way] = profile(resident, plan, live, way)
        total = sum(phases.values())
        print(f"  {way:>5}: {total:.3f} CPU-s, {faults} minor faults: "
              + ", ".join(f"{name} {seconds:.3f}" for name, seconds in phases.items()))
    print(f"l2_from_base: {values['fresh'] ** 0.5!r} (fresh) and {values['now'] ** 0.5!r} (now): "
          f"{'the same' if values['fresh'] == values['now'] else 'DIFFERENT'}")
    for ahead in (0, 1):
        resident.read_ahead = ahead
        resident.merge_into(plan, live)  # this way's buffers made
    for ahead in (0, 1, 0, 1):
        resident.read_ahead = ahead
        cpu, start = _usage()[0], time.perf_counter()
        resident.merge_into(plan, live)
        print(f"  merge_into, inputs read {'one tensor ahead' if ahead else 'inline'}: "
              f"{time.perf_counter() - start:.3f} s wall, {_usage()[0] - cpu:.3f} CPU-s")


if __name__ == "__main__":
    main()
