"""Safetensors tensors as memory-mapped views: one copy per node, whoever reads them.

A search worker reads the same base and donor tensors for every candidate. Mapped from the file
(``mmap``, private copy-on-write), a tensor is a view of the page cache: every worker of a node
that maps the same file shares those pages, nothing is copied into the worker's own memory, and
the kernel may drop clean pages under pressure and read them again later. The streaming merge
(:mod:`evomerge.merge.safetensors_io`) deliberately does not map, because a one-pass merge should
not leave whole models in its resident set; a worker that reads every tensor again per candidate
is the opposite case. Views are read-only by contract (a write would only change this process's
private copy of that page, never the file).
"""

from __future__ import annotations

import mmap
import warnings
from pathlib import Path

import torch

from .safetensors_io import TensorInfo


class MappedFiles:
    """Opened maps, one per file, kept for the life of the tensors viewing them."""

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}

    def will_need(self, info: TensorInfo) -> None:
        """Ask the kernel to read ``info``'s pages now, in the background (``MADV_WILLNEED``):
        pages dropped under memory pressure come back before the merge touches them, instead of
        one blocking fault at a time. A hint: it changes no bytes, and is skipped where absent."""
        mapped = self._maps.get(info.path)
        if mapped is None or info.nbytes == 0 or not hasattr(mmap, "MADV_WILLNEED"):
            return
        start = info.start - info.start % mmap.PAGESIZE
        mapped.madvise(mmap.MADV_WILLNEED, start, info.start + info.nbytes - start)

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        """A view of ``info``'s bytes in the file's map (no copy)."""
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        mapped = self._maps.get(info.path)
        if mapped is None:
            with open(info.path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[info.path] = mapped
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about buffers it cannot prove writable
            flat = torch.frombuffer(mapped, dtype=torch.uint8, count=info.nbytes, offset=info.start)
        if info.dtype == torch.uint8:
            return flat.reshape(info.shape)
        if info.start % info.dtype.itemsize:  # misaligned for its dtype: an owned copy instead
            return flat.clone().view(info.dtype).reshape(info.shape)
        return flat.view(info.dtype).reshape(info.shape)
