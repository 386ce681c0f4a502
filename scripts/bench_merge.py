#!/usr/bin/env python3
"""Benchmark: ``evomerge merge`` against ``mergekit-yaml`` on the same configs, side by side.

Builds (or reuses, under .bench/) a random base and two donors, stored in float32 and in
bfloat16, and runs both tools on each method's config for each case (stored dtype -> merge
dtype). Per method and case it prints the wall-time ratio (mergekit / evomerge), the peak-RSS
ratio (mergekit / evomerge), and evomerge's throughput (input bytes read per wall second,
process start-up included) next to this machine's page-cache read bandwidth, measured in the
same run on the same files, and next to the I/O floor: the time to read the inputs and write the
output at the page-cache read and write bandwidths (writing into the page cache costs several
times what reading from it does, and every merge writes its output). The load average is printed
with each figure. The machines are shared and noisy: ratios measured back to back mean more
than absolute times.

    python scripts/bench_merge.py                  # 106M parameters per model, a few minutes
    python scripts/bench_merge.py --large          # 1.1B parameters per model, bfloat16
    python scripts/bench_merge.py --methods linear,ties --cases bfloat16:float32 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMALL = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
             num_attention_heads=12, num_key_value_heads=12)
LARGE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=18,
             num_attention_heads=16, num_key_value_heads=16)
COMMON = dict(max_position_embeddings=2048, tie_word_embeddings=False, model_type="llama",
              architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5, hidden_act="silu")
METHODS = "linear,task_arithmetic,ties,dare_ties,slerp,passthrough"
DEFAULT_CASES = "float32:float32,bfloat16:bfloat16,bfloat16:float32,float32:bfloat16"
SHARD_BYTES = 1 << 30


def shapes(config: dict) -> dict[str, tuple[int, ...]]:
    h, i, v, n = (config[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers"))
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(n):
        p = f"model.layers.{layer}."
        out.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (h, h),
            p + "self_attn.v_proj.weight": (h, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (v, h)
    return out


def build_models(root: Path, config: dict, stored: str) -> dict[str, Path]:
    """A random base and two donors (base plus noise) stored in ``stored``, in shards of at most
    1 GiB, reused when present. bfloat16 copies round the same float32 weights, as a checkpoint
    saved in bfloat16 does, so their task vectors tie as real ones do."""
    from safetensors.torch import save_file

    dtype = getattr(torch, stored)
    paths = {name: root / stored / name for name in ("base", "donor_a", "donor_b")}
    if all((p / "config.json").is_file() for p in paths.values()):
        return paths
    all_shapes = shapes(config)
    for k, (name, path) in enumerate(paths.items()):
        path.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(1000 + k)
        base_gen = torch.Generator().manual_seed(1000)
        weight_map, shard, shard_bytes, files = {}, {}, 0, []

        def flush() -> None:
            nonlocal shard, shard_bytes
            fname = f"part-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(path / fname), metadata={"format": "pt"})
            weight_map.update({t: fname for t in shard})
            files.append(fname)
            shard, shard_bytes = {}, 0

        for tname, shape in all_shapes.items():
            t = torch.randn(shape, generator=base_gen) * 0.02
            if name != "base":
                t += torch.randn(shape, generator=gen) * 0.002
            t = t.to(dtype)
            if shard and shard_bytes + t.nbytes > SHARD_BYTES:
                flush()
            shard[tname] = t
            shard_bytes += t.nbytes
        flush()
        total = sum(torch.Size(s).numel() * dtype.itemsize for s in all_shapes.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
        (path / "config.json").write_text(json.dumps({**config, **COMMON, "torch_dtype": stored}))
    return paths


def configs(paths: dict[str, Path], layers: int, dtype: str) -> dict[str, dict]:
    base, a, b = (str(paths[k]) for k in ("base", "donor_a", "donor_b"))
    donors = lambda **p: [{"model": a, "parameters": dict(p)}, {"model": b, "parameters": dict(p)}]  # noqa: E731
    n = layers
    return {
        "linear": {"merge_method": "linear", "models": donors(weight=0.5), "dtype": dtype},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "models": donors(weight=0.7), "dtype": dtype},
        "ties": {"merge_method": "ties", "base_model": base, "models": donors(weight=0.7, density=0.5), "dtype": dtype},
        "dare_ties": {"merge_method": "dare_ties", "base_model": base, "models": donors(weight=0.7, density=0.5), "dtype": dtype},
        "slerp": {"merge_method": "slerp", "base_model": base,
                  "slices": [{"sources": [{"model": base, "layer_range": [0, n]}, {"model": a, "layer_range": [0, n]}]}],
                  "parameters": {"t": 0.4}, "dtype": dtype},
        "passthrough": {"merge_method": "passthrough", "dtype": dtype,
                        "slices": [{"sources": [{"model": a, "layer_range": [0, n // 2 + 2]}]},
                                   {"sources": [{"model": b, "layer_range": [n // 2 - 2, n]}]}]},
    }


_RUNNER = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter(); r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
    "dt = time.perf_counter() - t\n"
    "sys.stderr.write(r.stderr.decode()[-2000:] if r.returncode else '')\n"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(dt, u.ru_maxrss, r.returncode, u.ru_utime + u.ru_stime)\n"
)


def timed(cmd: list[str]) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (GiB) and CPU seconds (user + system) of one command, measured by a
    wrapper that waits for it. CPU seconds move less than wall seconds on a loaded machine."""
    out = subprocess.run([sys.executable, "-c", _RUNNER, *cmd], capture_output=True, text=True)
    seconds, rss_kib, code, cpu = out.stdout.split()
    if int(code) != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{out.stderr}")
    return float(seconds), int(rss_kib) / 2**20, float(cpu)


def page_cache_bandwidth(folders: list[Path], reps: int = 3) -> float:
    """GB/s of reading these folders' safetensors files from the page cache (one pass warms it),
    with 1 MiB ``readinto`` calls into one reused buffer: the most a merge that reads its inputs
    once can get out of this machine's reads. (A 64 MiB buffer, used before, falls out of the
    cache and measured 2-5x less: 2.4-7.3 against 13-16 GB/s, back to back.) Best of ``reps``."""
    files = [f for folder in folders for f in sorted(folder.glob("*.safetensors"))]
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    total, best = 0, float("inf")
    for rep in range(reps + 1):
        start, total = time.perf_counter(), 0
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(view):
                    total += n
        if rep:  # the first pass only warms the cache
            best = min(best, time.perf_counter() - start)
    return total / best / 1e9


def _preallocate(fd: int, nbytes: int) -> None:
    """fallocate(2) with FALLOC_FL_KEEP_SIZE: the file's blocks allocated before it is written
    (ext4 otherwise allocates them write by write). Skipped where unavailable."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        libc.fallocate(fd, 1, 0, nbytes)
    except (OSError, AttributeError):
        pass


def page_cache_write_bandwidth(folder: Path, nbytes: int, reps: int = 2) -> float:
    """GB/s of writing ``nbytes`` into a new file in ``folder`` (the page cache, no sync) with
    1 MiB writes from one reused buffer (larger buffers fall out of the cache and measured less),
    into a plain file and into one whose blocks are allocated first: the most a merge that
    writes its output once can get. Best of ``reps`` of each; the file is deleted."""
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    best = float("inf")
    path = folder / "write_bandwidth.tmp"
    try:
        for preallocated in [False, True] * reps:
            start = time.perf_counter()
            with open(path, "wb", buffering=0) as fh:
                if preallocated:
                    _preallocate(fh.fileno(), nbytes)
                left = nbytes
                while left > 0:
                    left -= fh.write(view[: min(left, len(buf))])
            best = min(best, time.perf_counter() - start)
            path.unlink()
    finally:
        path.unlink(missing_ok=True)
    return nbytes / best / 1e9


def bytes_moved(config: dict) -> tuple[int, int]:
    """Bytes of input tensors the merge reads and of output tensors it writes, from evomerge's own
    plan of it (mergekit reads and writes the same tensors)."""
    from evomerge.merge.config import parse_merge_config
    from evomerge.merge.run import open_models
    from evomerge.merge.plan import plan_merge
    from evomerge.merge.safetensors_io import CODE_ITEMSIZE

    parsed = parse_merge_config(config)
    models = open_models(parsed)
    plan = plan_merge(parsed, models)
    seen = {(m, n) for task in plan.tasks for m, n in task.sources}
    read = sum(math.prod(models[m].shape(n)) * models[m].dtype(n).itemsize for m, n in seen)
    written = sum(math.prod(task.shape) * CODE_ITEMSIZE[task.out_code] for task in plan.tasks)
    return read, written


def run_case(args, paths: dict[str, Path], layers: int, stored: str, dtype: str, mergekit: str, evomerge: str,
             bandwidth: tuple[float, float]) -> list[tuple]:
    all_cfgs = configs(paths, layers, dtype)
    rows = []
    for method in args.methods.split(","):
        tag = f"{stored}_{dtype}_{method}"
        cfg_path = args.workdir / f"{tag}.yaml"
        cfg_path.write_text(yaml.safe_dump(all_cfgs[method], sort_keys=False))
        results = {}
        for tool, cmd in (
            ("mergekit", [mergekit, str(cfg_path), str(args.workdir / f"out_mk_{tag}"), "--random-seed", "0"]),
            ("evomerge", [evomerge, "merge", str(cfg_path), str(args.workdir / f"out_evo_{tag}"), "--random-seed", "0"]),
        ):
            best = None
            for _ in range(args.repeat):
                for prefix in ("out_mk_", "out_evo_"):
                    shutil.rmtree(args.workdir / f"{prefix}{tag}", ignore_errors=True)
                measured = timed(cmd)
                best = measured if best is None or measured[0] < best[0] else best
            results[tool] = best
        for prefix in ("out_mk_", "out_evo_"):
            shutil.rmtree(args.workdir / f"{prefix}{tag}", ignore_errors=True)
        (mk_s, mk_rss, mk_cpu), (evo_s, evo_rss, evo_cpu) = results["mergekit"], results["evomerge"]
        read, written = bytes_moved(all_cfgs[method])
        floor_s = read / 1e9 / bandwidth[0] + written / 1e9 / bandwidth[1]
        rows.append((f"{stored}->{dtype}", method, mk_s, evo_s, mk_cpu / evo_cpu, mk_rss, evo_rss, read / evo_s / 1e9,
                     read / 1e9 / bandwidth[0], floor_s / evo_s))
        print(f"  {stored}->{dtype} {method}: mergekit {mk_s:.1f} s ({mk_cpu:.1f} s CPU, {mk_rss:.2f} GiB), "
              f"evomerge {evo_s:.2f} s ({evo_cpu:.1f} s CPU, {evo_rss:.2f} GiB); load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--cases", default=None,
                    help=f"stored:merge dtype pairs (default {DEFAULT_CASES}; with --large bfloat16:bfloat16)")
    ap.add_argument("--large", action="store_true", help="models of 1.1B parameters (2.2 GB each in bfloat16)")
    ap.add_argument("--workdir", type=Path, default=ROOT / ".bench")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool and method; the best is kept")
    args = ap.parse_args()
    mergekit = shutil.which("mergekit-yaml")
    evomerge = shutil.which("evomerge")
    if not mergekit or not evomerge:
        raise SystemExit("needs both `evomerge` and `mergekit-yaml` on PATH: bash scripts/install.sh")
    model_config = LARGE if args.large else SMALL
    size = "large" if args.large else "small"
    cases = [tuple(c.split(":")) for c in (args.cases or ("bfloat16:bfloat16" if args.large else DEFAULT_CASES)).split(",")]
    params = sum(torch.Size(s).numel() for s in shapes(model_config).values())
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows, bandwidths = [], {}
    for stored in dict.fromkeys(s for s, _ in cases):
        paths = build_models(args.workdir / size, model_config, stored)
        gb = sum(f.stat().st_size for f in paths["base"].glob("*.safetensors")) / 1e9
        read_bw = page_cache_bandwidth(list(paths.values()))
        write_bw = page_cache_write_bandwidth(args.workdir, int(gb * 1e9))
        bandwidths[stored] = (read_bw, write_bw)
        print(f"models stored in {stored}: base + 2 donors, {params / 1e6:.0f}M parameters, {gb:.2f} GB each; "
              f"page-cache read bandwidth {read_bw:.2f} GB/s, write {write_bw:.2f} GB/s; load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        for case_stored, dtype in cases:
            if case_stored == stored:
                rows += run_case(args, paths, model_config["num_hidden_layers"], stored, dtype, mergekit, evomerge,
                                 bandwidths[stored])
    header = (f"{'stored->merge':<19}{'method':<16}{'mergekit s':>11}{'evomerge s':>11}{'time ratio':>11}{'CPU ratio':>10}"
              f"{'mk RSS GiB':>11}{'evo RSS GiB':>12}{'RSS ratio':>10}{'evo GB/s':>9}{'of read bw':>11}{'of I/O floor':>13}")
    print()
    print(header)
    print("-" * len(header))
    for case, m, mk_s, evo_s, cpu_ratio, mk_r, evo_r, gbps, read_s, of_floor in rows:
        print(f"{case:<19}{m:<16}{mk_s:>11.1f}{evo_s:>11.2f}{mk_s / evo_s:>10.1f}x{cpu_ratio:>9.1f}x{mk_r:>11.2f}{evo_r:>12.2f}"
              f"{mk_r / evo_r:>9.1f}x{gbps:>9.2f}{read_s / evo_s:>10.0%}{of_floor:>12.0%}")
    for stored, (read_bw, write_bw) in bandwidths.items():
        print(f"\npage-cache bandwidth for the {stored} models (same files, same run): read {read_bw:.2f} GB/s, "
              f"write {write_bw:.2f} GB/s")
    print("time ratio (wall), CPU ratio (user + system) and RSS ratio: mergekit / evomerge "
          "(higher is better for evomerge).")
    print("evo GB/s: input bytes read per wall second of `evomerge merge`, process start-up included; of read bw:\n"
          "that over the page-cache read bandwidth of its stored dtype; of I/O floor: the time to read the\n"
          "inputs and write the output at the page-cache bandwidths over evomerge's wall time.")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
