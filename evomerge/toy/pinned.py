"""The kernels and threads a toy build runs on, pinned so its weights are the same on every CPU.

A build trains for about a thousand steps; one float rounded differently in step one is a
different model by the end. Measured here (torch 2.13 CPU, an AMD EPYC with AVX-512; 30 base
training steps, hashes of the weights; ``python scripts/toy_kernel_probe.py`` prints them):

- torch's own vectorised kernels (softmax, norms, reductions, the optimiser's elementwise ops)
  are chosen by CPU feature at start-up (``ATEN_CPU_CAPABILITY``): ``avx512``, ``avx2`` and
  ``default`` gave three different models. A newcomer's AVX2 laptop and this AVX-512 server
  therefore built different worlds before this module existed.
- MKL's matrix products are chosen by CPU too, and can be pinned with ``MKL_CBWR`` (conditional
  numerical reproducibility): ``COMPATIBLE`` changed the result here, ``AVX2`` and ``AVX512`` gave
  the default's bits on this AMD CPU. On an Intel AVX-512 CPU MKL's default would be its AVX-512
  path (not measured: no second CPU model was at hand).
- the thread count: pinned to 1 (with torch's ``default`` kernels and MKL's ``COMPATIBLE`` path,
  1 and 2 threads gave the same bits, but 2 threads on a shared 2-core machine ran 13x slower).
- oneDNN is not on the path: a profile of a float32 ``Linear``'s forward and backward shows
  ``aten::addmm``/``aten::mm`` (MKL's sgemm) and no oneDNN op.

So a build runs in a child process whose environment pins all three before torch starts (these
settings are read once, at start-up, so they cannot be changed in a running process):
AVX2 kernels for torch and MKL (AVX2 is on x86-64 desktop and server CPUs since 2013-2015; about
as fast as the default here, where ``default``/``COMPATIBLE`` kernels were 2-4x slower), one
thread, and ``torch.use_deterministic_algorithms(True)``. What is not pinned: the torch version
(its kernels change between releases; the manifest records it and a world built with another
version is rebuilt) and CPUs without AVX2, where torch falls back to its ``default`` kernels; the
build then warns that its weights differ from other machines'. Whether MKL's AVX2 path gives the
same bits on Intel and AMD CPUs is MKL's promise (``MKL_CBWR``), not checked here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from ..errors import ModelError

PINNED_ENV: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MKL_DYNAMIC": "FALSE",
}
THREADS = 1
EXPECTED_CAPABILITY = "AVX2"


def run_pinned_module(module: str, args: list[str]) -> None:
    """Runs ``python -m module args`` in a child with :data:`PINNED_ENV`; raises if it fails.

    The child's output goes to this process's terminal (progress and the build table)."""
    env = {**os.environ, **PINNED_ENV}
    completed = subprocess.run([sys.executable, "-m", module, *args], env=env, check=False)
    if completed.returncode != 0:
        raise ModelError(f"the toy build (python -m {module}) failed with exit status {completed.returncode}; see its output above")


def pin_this_process() -> dict[str, Any]:
    """In the child: one thread, deterministic algorithms; returns what the weights were built
    on, for the manifest. Warns when the CPU could not run the pinned kernels."""
    import torch

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != EXPECTED_CAPABILITY:
        print(
            f"warning: this CPU runs torch's {capability} kernels, not {EXPECTED_CAPABILITY}: "
            "the toy world's weights will differ from other machines' builds",
            file=sys.stderr,
        )
    return {
        "torch": torch.__version__,
        "cpu_capability": capability,
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        "threads": torch.get_num_threads(),
    }
