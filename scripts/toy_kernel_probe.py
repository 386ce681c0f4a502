"""Which settings change a toy build's weights? Trains the pair world's base for a few steps in a
fresh process per setting and prints a hash of the weights, side by side.

    python scripts/toy_kernel_probe.py [--steps 30]

Rows that print the same hash built the same bits. The first rows let torch and MKL pick their
kernels as an unpinned process would (what differs between CPUs: ATEN_CPU_CAPABILITY stands in
for a CPU with fewer vector units, MKL_CBWR for MKL's per-CPU code path); the last rows run with
evomerge.toy.pinned's environment laid over each of those, as `evomerge toy build` does, and must
all print one hash. Each process trains on one thread (torch.set_num_threads) unless the row
says otherwise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

CHILD = r"""
import hashlib, os, sys
import torch
from evomerge.toy import skills
from evomerge.toy.tokenizer import build_tokenizer
from evomerge.toy.train import TrainSettings, new_model, train
torch.set_num_threads(int(os.environ.get("PROBE_THREADS", "1")))
torch.use_deterministic_algorithms(True)
tok = build_tokenizer()
model = new_model(tok, 0)
train(model, tok, skills.training_stream("base", 0), TrainSettings(steps=int(sys.argv[1]), lr=3e-3, answer_only=True), seed=0)
state = model.state_dict()
digest = hashlib.sha256(b"".join(state[k].contiguous().numpy().tobytes() for k in sorted(state))).hexdigest()[:12]
print(digest, torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())
"""

UNPINNED = [
    ("torch and MKL pick (this CPU's best)", {}),
    ("ATEN_CPU_CAPABILITY=avx2", {"ATEN_CPU_CAPABILITY": "avx2"}),
    ("ATEN_CPU_CAPABILITY=default", {"ATEN_CPU_CAPABILITY": "default"}),
    ("MKL_CBWR=COMPATIBLE", {"MKL_CBWR": "COMPATIBLE"}),
    ("MKL_CBWR=AVX512", {"MKL_CBWR": "AVX512"}),
]


def main() -> None:
    from evomerge.toy.pinned import PINNED_ENV

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    rows = [(f"unpinned: {name}", env) for name, env in UNPINNED]
    rows += [(f"pinned over {name}", {**env, **PINNED_ENV}) for name, env in UNPINNED[::2]]
    rows += [("pinned, 2 threads asked", {**PINNED_ENV, "PROBE_THREADS": "2"})]
    print(f"{'setting':45} {'weights':12} {'kernels':8} threads  seconds")
    for name, env in rows:
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.steps)], env={**os.environ, **env},
                             capture_output=True, text=True, check=True).stdout.split()
        print(f"{name:45} {out[0]:12} {out[1]:8} {out[2]:>7}  {time.perf_counter() - started:7.1f}")


if __name__ == "__main__":
    main()
