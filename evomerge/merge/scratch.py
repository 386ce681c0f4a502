"""Buffers that kernels keep from one output tensor to the next, in the streaming file merge.

A fresh tensor-sized buffer is a fresh mapping (glibc maps every large block, see
evomerge.merge.run) that the kernel zero-fills page by page on first touch: for slerp's float32
temporaries and DARE's uniforms that cost as much system time as the arithmetic. Inside
:func:`reused_scratch` the kernels that support it take such temporaries from one
:class:`Scratch` instead; the values computed are the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:
    from evomerge.lazy_torch import torch  # imported on first use: see evomerge.lazy_torch


class Scratch:
    """Buffers by slot and dtype, grown to the largest request and handed out as prefixes."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def take(self, slot: int, n: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._buffers.get((slot, dtype))
        if buf is None or buf.numel() < n:
            buf = self._buffers[(slot, dtype)] = torch.empty(n, dtype=dtype)
        return buf[:n]


_SCRATCH: ContextVar[Scratch | None] = ContextVar("evomerge_merge_scratch", default=None)


@contextmanager
def reused_scratch() -> Iterator[None]:
    """Let the kernels that support it keep their temporaries between calls in this block (held
    until it ends: up to four float32 copies of the largest tensor). The streaming file merge uses
    it; search workers, whose memory is planned tensor by tensor, do not."""
    token = _SCRATCH.set(Scratch())
    try:
        yield
    finally:
        _SCRATCH.reset(token)


def current_scratch() -> Scratch | None:
    """The scratch of the enclosing :func:`reused_scratch` block, or None outside one."""
    return _SCRATCH.get()

