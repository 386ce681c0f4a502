#!/usr/bin/env python3
"""Benchmark: ``evomerge merge`` against ``mergekit-yaml`` on the same configs, side by side.

Builds (or reuses, under .bench/) a random base and two donors of about 100M parameters each,
runs both tools on each method's config, and prints per method: wall-time ratio (mergekit /
evomerge), peak-RSS ratio (mergekit / evomerge), and evomerge's throughput (bytes read plus
written per second) next to this machine's memory-copy bandwidth, measured in the same run.
The machines are shared and noisy: ratios measured back to back mean more than absolute times.

    python scripts/bench_merge.py [--methods linear,ties] [--repeat 1] [--workdir .bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent

CONFIG = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=8,
    num_attention_heads=12,
    num_key_value_heads=12,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    rms_norm_eps=1e-5,
    hidden_act="silu",
    torch_dtype="float32",
)


def _shapes() -> dict[str, tuple[int, ...]]:
    h, i, v, n = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"], CONFIG["num_hidden_layers"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(n):
        p = f"model.layers.{layer}."
        shapes.update({
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
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def build_models(workdir: Path) -> dict[str, Path]:
    """A random base and two donors (base plus noise), in 2 shards each, reused when present."""
    from safetensors.torch import save_file

    paths = {name: workdir / name for name in ("base", "donor_a", "donor_b")}
    if all((p / "config.json").is_file() for p in paths.values()):
        return paths
    shapes = _shapes()
    names = list(shapes)
    half = len(names) // 2
    for k, (name, path) in enumerate(paths.items()):
        path.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(1000 + k)
        base_gen = torch.Generator().manual_seed(1000)
        weight_map = {}
        for part, chunk in enumerate((names[:half], names[half:])):
            tensors = {}
            for tname in chunk:
                t = torch.randn(shapes[tname], generator=base_gen) * 0.02
                if name != "base":
                    t += torch.randn(shapes[tname], generator=gen) * 0.002
                tensors[tname] = t
            fname = f"model-{part + 1:05d}-of-00002.safetensors"
            save_file(tensors, str(path / fname), metadata={"format": "pt"})
            weight_map.update({t: fname for t in chunk})
        total = sum(torch.Size(s).numel() * 4 for s in shapes.values())
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
        (path / "config.json").write_text(json.dumps(CONFIG))
    return paths


def configs(paths: dict[str, Path]) -> dict[str, dict]:
    base, a, b = (str(paths[k]) for k in ("base", "donor_a", "donor_b"))
    donors = lambda **p: [{"model": a, "parameters": dict(p)}, {"model": b, "parameters": dict(p)}]  # noqa: E731
    n = CONFIG["num_hidden_layers"]
    return {
        "linear": {"merge_method": "linear", "models": donors(weight=0.5), "dtype": "float32"},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "models": donors(weight=0.7), "dtype": "float32"},
        "ties": {"merge_method": "ties", "base_model": base, "models": donors(weight=0.7, density=0.5), "dtype": "float32"},
        "dare_ties": {"merge_method": "dare_ties", "base_model": base, "models": donors(weight=0.7, density=0.5), "dtype": "float32"},
        "slerp": {"merge_method": "slerp", "base_model": base,
                  "slices": [{"sources": [{"model": base, "layer_range": [0, n]}, {"model": a, "layer_range": [0, n]}]}],
                  "parameters": {"t": 0.4}, "dtype": "float32"},
        "passthrough": {"merge_method": "passthrough", "dtype": "float32",
                        "slices": [{"sources": [{"model": a, "layer_range": [0, n // 2 + 2]}]},
                                   {"sources": [{"model": b, "layer_range": [n // 2 - 2, n]}]}]},
    }


_RUNNER = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter(); r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
    "dt = time.perf_counter() - t\n"
    "sys.stderr.write(r.stderr.decode()[-2000:] if r.returncode else '')\n"
    "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)\n"
)


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of one command, measured by a wrapper that waits for it."""
    out = subprocess.run([sys.executable, "-c", _RUNNER, *cmd], capture_output=True, text=True)
    seconds, rss_kib, code = out.stdout.split()
    if int(code) != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{out.stderr}")
    return float(seconds), int(rss_kib) / 2**20


def copy_bandwidth(gib: float = 0.5, reps: int = 5) -> float:
    """This machine's memory-copy bandwidth in GB/s (bytes read + written), best of ``reps``."""
    src = torch.ones(int(gib * 2**30) // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--methods", default="linear,task_arithmetic,ties,dare_ties,slerp,passthrough")
    ap.add_argument("--workdir", type=Path, default=ROOT / ".bench")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool and method; the best is kept")
    args = ap.parse_args()
    mergekit = shutil.which("mergekit-yaml")
    evomerge = shutil.which("evomerge")
    if not mergekit or not evomerge:
        raise SystemExit("needs both `evomerge` and `mergekit-yaml` on PATH: bash scripts/install.sh")
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = build_models(args.workdir)
    params = sum(torch.Size(s).numel() for s in _shapes().values())
    print(f"models: base + 2 donors, {params / 1e6:.0f}M parameters each, float32, {folder_bytes(paths['base']) / 1e9:.2f} GB each")
    bandwidth = copy_bandwidth()
    print(f"memory-copy bandwidth: {bandwidth:.1f} GB/s (torch copy_, 0.5 GiB)\n")
    all_cfgs = configs(paths)
    rows = []
    for method in args.methods.split(","):
        cfg_path = args.workdir / f"{method}.yaml"
        cfg_path.write_text(yaml.safe_dump(all_cfgs[method], sort_keys=False))
        results = {}
        for tool, cmd in (
            ("mergekit", [mergekit, str(cfg_path), str(args.workdir / f"out_mk_{method}"), "--random-seed", "0"]),
            ("evomerge", [evomerge, "merge", str(cfg_path), str(args.workdir / f"out_evo_{method}"), "--overwrite", "--random-seed", "0"]),
        ):
            best = None
            for _ in range(args.repeat):
                # both tools start with no output folder (evomerge's --overwrite would otherwise
                # spend its timed run deleting the previous output)
                for prefix in ("out_mk_", "out_evo_"):
                    shutil.rmtree(args.workdir / f"{prefix}{method}", ignore_errors=True)
                seconds, rss = timed(cmd)
                best = (seconds, rss) if best is None or seconds < best[0] else best
            results[tool] = best
        out_dir = args.workdir / f"out_evo_{method}"
        cfg = all_cfgs[method]
        inputs = {s["model"] for s in cfg.get("models", [])} | ({cfg["base_model"]} if "base_model" in cfg else set())
        if "slices" in cfg:
            read = folder_bytes(out_dir) if method == "passthrough" else sum(folder_bytes(Path(m)) for m in {s["model"] for sl in cfg["slices"] for s in sl["sources"]})
        else:
            read = sum(folder_bytes(Path(m)) for m in inputs)
        moved = read + folder_bytes(out_dir)
        (mk_s, mk_rss), (evo_s, evo_rss) = results["mergekit"], results["evomerge"]
        rows.append((method, mk_s, evo_s, mk_s / evo_s, mk_rss, evo_rss, mk_rss / evo_rss, moved / evo_s / 1e9))
    header = f"{'method':<16}{'mergekit s':>11}{'evomerge s':>11}{'time ratio':>11}{'mk RSS GiB':>11}{'evo RSS GiB':>12}{'RSS ratio':>10}{'evo GB/s':>9}{'of copy bw':>11}"
    print(header)
    print("-" * len(header))
    for m, mk_s, evo_s, tr, mk_r, evo_r, rr, gbps in rows:
        print(f"{m:<16}{mk_s:>11.1f}{evo_s:>11.2f}{tr:>10.1f}x{mk_r:>11.2f}{evo_r:>12.2f}{rr:>9.1f}x{gbps:>9.2f}{gbps / bandwidth:>10.0%}")
    print("\ntime ratio and RSS ratio: mergekit / evomerge (higher is better for evomerge).")
    print("evo GB/s: bytes read plus written per wall second, including process start-up.")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
