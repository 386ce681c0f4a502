#!/usr/bin/env python3
"""Benchmark: what a LoRA donor costs a search worker, next to a full donor of the same model.

Writes a Llama-shaped base (random, stored in bfloat16), a full fine-tune of it (base plus
noise) and a LoRA adapter of rank --rank on every linear projection (the factors saved in
float32, as PEFT saves them), then loads a worker's resident models (base, full donor, adapter
donor) and prints, side by side in one run:
  - resident bytes: the full donor's (its tensors and task vectors) against the adapter donor's
    (its factors), and their ratio;
  - CPU seconds per candidate (process time: the machine is shared) for the same task_arithmetic
    merge with the full donor and with the adapter donor (which forms B·A·scale per adapted
    tensor), and their ratio.

    python scripts/bench_lora_donor.py [--hidden 4096] [--intermediate 11008] [--layers 1] [--rank 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROJECTIONS = {"self_attn.q_proj": ("hidden", "hidden"), "self_attn.k_proj": ("hidden", "hidden"),
               "self_attn.v_proj": ("hidden", "hidden"), "self_attn.o_proj": ("hidden", "hidden"),
               "mlp.gate_proj": ("intermediate", "hidden"), "mlp.up_proj": ("intermediate", "hidden"),
               "mlp.down_proj": ("hidden", "intermediate")}


def write_models(root: Path, hidden: int, intermediate: int, layers: int, vocab: int, rank: int) -> tuple[Path, Path, Path]:
    import torch
    from safetensors.torch import save_file

    dims = {"hidden": hidden, "intermediate": intermediate}
    gen = torch.Generator().manual_seed(0)
    base: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=gen) * 0.02,
        "lm_head.weight": torch.randn(vocab, hidden, generator=gen) * 0.02,
        "model.norm.weight": torch.ones(hidden),
    }
    for i in range(layers):
        base[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden)
        base[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(hidden)
        for proj, (out_dim, in_dim) in PROJECTIONS.items():
            base[f"model.layers.{i}.{proj}.weight"] = torch.randn(dims[out_dim], dims[in_dim], generator=gen) * 0.02
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": hidden // 128,
              "num_key_value_heads": hidden // 128, "vocab_size": vocab, "torch_dtype": "bfloat16",
              "tie_word_embeddings": False}
    folders = []
    for name, scale in (("base", 0.0), ("full", 0.002)):
        folder = root / name
        folder.mkdir()
        tensors = {k: (v + scale * torch.randn(v.shape, generator=gen)).to(torch.bfloat16) for k, v in base.items()}
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(config))
        folders.append(folder)
    adapter = root / "adapter"
    adapter.mkdir()
    factors = {}
    for i in range(layers):
        for proj, (out_dim, in_dim) in PROJECTIONS.items():
            key = f"base_model.model.model.layers.{i}.{proj}"
            factors[f"{key}.lora_A.weight"] = torch.randn(rank, dims[in_dim], generator=gen) * 0.01
            factors[f"{key}.lora_B.weight"] = torch.randn(dims[out_dim], rank, generator=gen) * 0.01
    save_file(factors, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "base_model_name_or_path": str(folders[0]),
        "target_modules": sorted({p.split(".")[-1] for p in PROJECTIONS})}))
    return folders[0], folders[1], adapter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from evomerge.merge.config import parse_merge_config
    from evomerge.merge.inmemory import ResidentModels

    with tempfile.TemporaryDirectory() as tmp:
        base, full, adapter = write_models(Path(tmp), args.hidden, args.intermediate, args.layers, args.vocab, args.rank)
        lora = f"{base}+{adapter}"
        resident = ResidentModels([str(base), str(full), lora], str(base), dtype=torch.bfloat16)
        full_bytes, lora_bytes = resident.resident_bytes(str(full)), resident.resident_bytes(lora)

        def plan_for(donor: str):
            config = parse_merge_config({"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "bfloat16",
                                         "models": [{"model": donor, "parameters": {"weight": 0.7}}]})
            return resident.plan(config)

        plans = {"full": plan_for(str(full)), "lora": plan_for(lora)}
        target = {t.name: torch.empty(t.shape, dtype=torch.bfloat16) for t in plans["full"].tasks}
        times: dict[str, list[float]] = {"full": [], "lora": []}
        for _ in range(args.repeat):  # interleaved, so both see the same machine load
            for kind, plan in plans.items():
                start = time.process_time()
                resident.merge_into(plan, target)
                times[kind].append(time.process_time() - start)
        full_s, lora_s = statistics.median(times["full"]), statistics.median(times["lora"])
    params = sum(args.hidden * args.hidden * 4 + args.hidden * args.intermediate * 3 for _ in range(args.layers))
    print(f"model: {args.layers} layer(s) of hidden {args.hidden}, intermediate {args.intermediate} "
          f"({params / 1e6:.0f}M projection parameters), bfloat16; adapter rank {args.rank} on every projection")
    print(f"resident bytes  full donor {full_bytes / 2**20:9.1f} MiB   adapter donor {lora_bytes / 2**20:7.1f} MiB   "
          f"ratio {full_bytes / lora_bytes:6.1f}x")
    print(f"merge CPU s     full donor {full_s:9.3f} s     adapter donor {lora_s:7.3f} s     "
          f"ratio {lora_s / full_s:6.2f}x (adapter / full)")


if __name__ == "__main__":
    main()
