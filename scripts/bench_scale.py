"""Node memory and merge speed of 2 search workers on a 1B-parameter model (a benchmark, not a test).

    python scripts/bench_scale.py [--donors 2 4] [--workers 2] [--candidates 3]

Builds (or reuses, under ``.bench/scale/``) a random-weight Llama of about 1.0B parameters in
bfloat16 with a 32k vocabulary, and donors that are the base plus noise. For each donor count it
runs ``--workers`` worker processes at once, each storing its inputs as the memory plan does on CPU
(memory-mapped safetensors, task vectors formed per tensor) and merging ``--candidates`` candidates
(task_arithmetic, in bfloat16) into a live model of its own. While they run, this process samples
each worker's ``/proc/<pid>/smaps_rollup``: ``Pss`` (shared pages split between the processes
mapping them, so the sum over workers is what the node holds for them), ``Rss`` and ``Anonymous``
(the worker's own memory). Printed: peak node memory against one model's bytes, beside the goal
(D+1 copies shared + 1 per worker + 15%) and today's resident path (2D+2 copies per worker); merge
seconds per candidate (wall and CPU: user + system of the worker's threads, which a machine
shared with other jobs does not inflate) and the bytes a merge moves per second of each, beside
this machine's memory bandwidth measured in the same run (a large tensor copy), and the major
page faults per candidate (input pages the kernel had dropped, read from disk again). The live model here is a dict of tensors
(the merge side of a worker; lm-eval's side is bench_candidate.py's). A donor count whose
(D+1) + workers copies do not fit in the memory available now is skipped, saying so.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".bench" / "scale"
# about 1.0B parameters: Llama layers of 2048 with grouped-query attention, 32k vocabulary
SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=20,
             num_attention_heads=32, num_key_value_heads=4)


def _tensor_shapes() -> dict[str, tuple[int, ...]]:
    h, i, v, kv = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"], 4 * 64
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
    return shapes


def build_model(folder: Path, donor: int) -> None:
    """Shards of about 500 MB; a donor is the base (regenerated from its seeds) plus noise."""
    from safetensors.torch import save_file

    if (folder / "model.safetensors.index.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    weight_map, shard, size, index = {}, {}, 0, 0
    names = list(_tensor_shapes().items())
    for k, (name, shape) in enumerate(names):
        t = torch.randn(shape, generator=torch.Generator().manual_seed(k)).mul_(0.02)
        if donor:
            t.add_(torch.randn(shape, generator=torch.Generator().manual_seed(10_000 * donor + k)).mul_(0.0005))
        shard[name] = t.to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size > 500e6 or k == len(names) - 1:
            fname = f"model-{index:05d}.safetensors"
            save_file(shard, str(folder / fname))
            weight_map |= {n: fname for n in shard}
            shard, size, index = {}, 0, index + 1
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16",
                                                    "tie_word_embeddings": False, **SHAPE}))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def worker(base: str, donors: list[str], candidates: int) -> None:
    """One worker's merge side: mapped inputs, a live model of its own, candidates merged in place."""
    from evomerge.merge.config import parse_merge_config
    from evomerge.merge.inmemory import ResidentModels

    torch.set_num_threads(1)
    resident = ResidentModels([base, *donors], base, dtype=torch.bfloat16, storage="mapped", task_vectors=False)
    live = {k: v.clone() for k, v in resident.tensors[base].items()}
    seconds, cpu, faults = [], [], []
    for c in range(candidates):
        config = parse_merge_config({"merge_method": "task_arithmetic", "base_model": base, "dtype": "bfloat16",
                                     "models": [{"model": d, "parameters": {"weight": 0.2 + 0.1 * c}} for d in donors]})
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        resident.merge_into(resident.plan(config), live)
        seconds.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        faults.append(after.ru_majflt - before.ru_majflt)
    print(json.dumps({"merge_s": seconds, "cpu_s": cpu, "major_faults": faults}), flush=True)


def _rollup(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            key, value, *_ = line.split()
            out[key.rstrip(":")] = int(value) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def bandwidth() -> float:
    """Bytes per second of a 256 MB tensor copy (read + write), best of 5, one thread."""
    torch.set_num_threads(1)
    src = torch.ones(64 << 20, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def run(donor_count: int, workers: int, candidates: int, model_bytes: int, bandwidth_bps: float) -> None:
    import psutil

    need = (donor_count + 1 + workers) * model_bytes * 1.15
    available = psutil.virtual_memory().available
    if need > available:
        print(f"D={donor_count}: skipped, needs about {need / 1e9:.1f} GB and {available / 1e9:.1f} GB is available now")
        return
    base = str(BENCH / "base")
    donors = [str(BENCH / f"donor{i}") for i in range(1, donor_count + 1)]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", base, *donors, "--candidates", str(candidates)],
                              stdout=subprocess.PIPE, text=True) for _ in range(workers)]
    peak_node = 0
    peak = {p.pid: {"Rss": 0, "Anonymous": 0} for p in procs}
    while any(p.poll() is None for p in procs):
        rollups = {p.pid: _rollup(p.pid) for p in procs}
        peak_node = max(peak_node, sum(r.get("Pss", 0) for r in rollups.values()))
        for pid, r in rollups.items():
            for key in ("Rss", "Anonymous"):
                peak[pid][key] = max(peak[pid][key], r.get(key, 0))
        time.sleep(0.2)
    reports = [json.loads(p.stdout.read().splitlines()[-1]) for p in procs]
    # the first candidate of each worker also maps every input page once: the later ones are the steady state
    steady = all(len(r["merge_s"]) > 1 for r in reports)
    seconds = [s for r in reports for s in (r["merge_s"][1:] or r["merge_s"])]
    cpu = [s for r in reports for s in (r["cpu_s"][1:] or r["cpu_s"])]
    faults = [f for r in reports for f in (r["major_faults"][1:] or r["major_faults"])]
    per_candidate = sorted(seconds)[len(seconds) // 2]
    cpu_per_candidate = sorted(cpu)[len(cpu) // 2]
    copies = peak_node / model_bytes
    goal = (donor_count + 1 + workers) * 1.15
    moved = (donor_count + 2) * model_bytes  # every input read once, the live model written once
    print(f"D={donor_count}, {workers} workers: node peak {peak_node / 1e9:.2f} GB = {copies:.2f} model copies "
          f"(goal <= {goal:.2f}; today's resident path {workers * (2 * donor_count + 2)}): "
          f"{'meets' if copies <= goal else 'MISSES'} the goal")
    for i, p in enumerate(procs):
        print(f"  worker {i}: peak RSS {peak[p.pid]['Rss'] / 1e9:.2f} GB (own memory {peak[p.pid]['Anonymous'] / 1e9:.2f} GB, "
              f"the rest mapped model pages shared through the page cache)")
    print(f"  merge: {per_candidate:.2f} s per candidate (median of {len(seconds)}{', first candidates left out' if steady else ''}), "
          f"{moved / per_candidate / 1e9:.2f} GB/s moved per worker; {cpu_per_candidate:.2f} CPU-s per candidate "
          f"(user + system, the worker's threads), {moved / cpu_per_candidate / 1e9:.2f} GB moved per CPU-second "
          f"= {moved / cpu_per_candidate / bandwidth_bps:.2f} x the copy bandwidth; "
          f"{max(faults)} major page faults per candidate at most (pages read from disk again)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        args = sys.argv[2:]
        candidates = int(args[args.index("--candidates") + 1])
        worker(args[0], args[1:args.index("--candidates")], candidates)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--donors", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--candidates", type=int, default=3)
    args = parser.parse_args()
    for i in range(max(args.donors) + 1):
        build_model(BENCH / ("base" if i == 0 else f"donor{i}"), i)
    model_bytes = sum(f.stat().st_size for f in (BENCH / "base").glob("*.safetensors"))
    params = sum(torch.Size(s).numel() for s in _tensor_shapes().values())
    print(f"model: {params / 1e9:.2f}B parameters, {model_bytes / 1e9:.2f} GB in bfloat16, 32k vocabulary")
    bw = bandwidth()
    print(f"this machine's memory bandwidth (one thread, 256 MB copy): {bw / 1e9:.2f} GB/s")
    for d in args.donors:
        run(d, args.workers, args.candidates, model_bytes, bw)
    print(f"(each worker uses one thread; the bandwidth above is one thread's: {bw / 1e9:.2f} GB/s)")


if __name__ == "__main__":
    main()
