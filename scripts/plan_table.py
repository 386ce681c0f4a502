"""Print the memory plan for Mistral-7B and Llama-3-70B shapes, 2 and 4 donors, on 24 GB and 80 GB GPUs.

The models are built on the meta device from their published configs' shapes (no weights, nothing
downloaded), then planned by :func:`evomerge.memory_plan.plan_memory` exactly as a search plans
real folders. One worker with 1 GPU (the 70B: 8 x 24 GB, or 2 or 4 x 80 GB), 256 GB of host memory per node.

    python scripts/plan_table.py
"""

from __future__ import annotations

import re

from evomerge.memory_plan import Devices, plan_memory, size_from_config

#: The architecture fields of the published configs (bfloat16 checkpoints).
SHAPES = {
    "Mistral-7B": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, torch_dtype="bfloat16",
                       tie_word_embeddings=False),
    "Llama-3-70B": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, torch_dtype="bfloat16",
                        tie_word_embeddings=False),
}
HOST = 256 * 10**9


def rows() -> list[tuple[str, ...]]:
    out = []
    for name, config in SHAPES.items():
        size = size_from_config(config, name)
        for donors in (2, 4):
            for gpu_gb in (24, 80):
                for gpus in (((8,) if gpu_gb == 24 else (2, 4)) if name == "Llama-3-70B" else (1,)):
                    plan = plan_memory([size] * (donors + 1), base=0, workers=1,
                                       devices=Devices("cuda", gpus, gpu_gb * 10**9, HOST))
                    where = (f"{plan.placement}, task vectors {plan.task_vectors}" if plan.fits
                             else f"refused (exit 2): needs {_suggested(plan)}")
                    out.append((name, f"{size.stored_bytes / 1e9:.1f}", str(donors), f"{gpus} x {gpu_gb} GB", where,
                                f"{plan.device_bytes_per_worker / 1e9:.1f}", f"{plan.shared_host_bytes / 1e9:.1f}",
                                f"{plan.transfer_bytes_per_candidate / 1e9:.1f}",
                                f"{(2 * donors + 2) * size.stored_bytes / 1e9:.0f}"))
    return out


def _suggested(plan) -> str:
    """The fix the plan names, in a table cell: ``gpus_per_worker: N``."""
    found = re.search(r"gpus_per_worker: \d+", plan.fix)
    return found[0] if found else plan.fix


def main() -> None:
    head = ("model", "GB", "donors", "GPUs", "placement", "device GB/worker", "host GB/node (shared)",
            "transfer GB/candidate", "all on one device today (GB)")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows():
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
