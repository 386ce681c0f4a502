"""Reading and writing safetensors one tensor at a time, with no memory map.

Why not ``safetensors.safe_open``: it memory-maps whole files, and every page a merge touches
then counts in the process's resident set until the map closes, so a streaming merge would
still show whole models in its peak RSS. Here a tensor is read with one ``readinto`` into a
buffer it owns, and the output is written as it is computed: a file's header is known before
any tensor is (shapes and dtypes come from the plan), so nothing waits in memory for a shard to
fill. The format is small and fixed (8-byte little-endian header length, a JSON header, raw
little-endian data); files written here are read back by the ``safetensors`` library in tests.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:
    from evomerge.lazy_torch import torch  # imported on first use: see evomerge.lazy_torch

from ..errors import ModelError

#: safetensors dtype codes evomerge reads, with their element sizes. Headers are parsed and plans
#: made with these codes alone, so that a merge torch does not compute never imports it.
CODE_ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def dtype_of(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code (imports torch)."""
    return getattr(torch, _TORCH_NAMES[code])


def code_of(dtype: torch.dtype | str) -> str:
    """The safetensors code of a torch dtype (a code is returned as it is)."""
    if isinstance(dtype, str):
        return dtype
    name = str(dtype).removeprefix("torch.")
    return next(code for code, torch_name in _TORCH_NAMES.items() if torch_name == name)


def promote_codes(a: str, b: str) -> str:
    """``torch.promote_types`` on codes, without torch for the floating-point ones."""
    if a == b:
        return a
    if a in FLOAT_CODES and b in FLOAT_CODES:
        return "F64" if "F64" in (a, b) else "F32"  # F16 with BF16 meets at F32, as in torch
    return code_of(torch.promote_types(dtype_of(a), dtype_of(b)))


_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives in a file, and what it is."""

    path: Path
    code: str  # safetensors dtype code ("BF16", "F32", ...)
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def dtype(self) -> torch.dtype:
        return dtype_of(self.code)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header; a truncated or foreign file is a ModelError naming it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ModelError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _MAX_HEADER:
                raise ModelError(f"{path}: not a safetensors file (header length {header_len} is implausible)")
            header_bytes = f.read(header_len)
            file_size = os.fstat(f.fileno()).st_size
    except OSError as err:
        raise ModelError(f"{path}: cannot read ({err.strerror})") from None
    if len(header_bytes) != header_len:
        raise ModelError(f"{path}: truncated safetensors file (header cut short); re-download or re-save it")
    try:
        header = json.loads(header_bytes)
    except ValueError:
        raise ModelError(f"{path}: not a safetensors file (header is not JSON)") from None
    data_start = 8 + header_len
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        code = meta.get("dtype")
        if code not in CODE_ITEMSIZE:
            raise ModelError(f"{path}: tensor {name!r} has dtype {meta.get('dtype')!r}, which evomerge cannot merge")
        begin, end = meta["data_offsets"]
        if data_start + end > file_size:
            raise ModelError(
                f"{path}: truncated safetensors file (tensor {name!r} ends past the end of the file); "
                "re-download or re-save it"
            )
        out[name] = TensorInfo(path, code, tuple(meta["shape"]), data_start + begin, end - begin)
    return out


class BufferPool:
    """Byte buffers of finished tensors, kept for the next tensors of the same size.

    A fresh buffer of a large tensor is a fresh mapping that the kernel fills page by page on
    first touch; reading every input of a merge into fresh buffers cost about as much system
    time as the merge's arithmetic. The layers repeat a handful of shapes, so buffers keyed by
    exact size are reused as soon as the tensors they held are merged (or written). At most
    ``max_per_size`` buffers of one size wait (one task reads that many at most: more would
    never be taken before the next ones come back), and at most ``max_idle_bytes`` in all, the
    oldest dropped first. Thread-safe: the reader thread takes while others give.
    """

    def __init__(self, max_idle_bytes: int = 512 << 20, max_per_size: int = 4) -> None:
        self.max_idle_bytes = max_idle_bytes
        self.max_per_size = max_per_size
        self._idle: dict[int, list[torch.Tensor]] = {}
        self._order: list[torch.Tensor] = []  # idle buffers, oldest first
        self._bytes = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of ``nbytes`` (reused when one is idle, else new; contents undefined)."""
        with self._lock:
            same = self._idle.get(nbytes)
            if same:
                buf = same.pop()
                self._order.pop(self._index(buf))
                self._bytes -= nbytes
                return buf
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, tensor: torch.Tensor) -> None:
        """Return the buffer under ``tensor`` (which must own all of it and be dropped after)."""
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes == 0 or nbytes > self.max_idle_bytes or tensor.device.type != "cpu":
            return
        buf = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,), (1,))
        with self._lock:
            same = self._idle.setdefault(nbytes, [])
            if len(same) >= self.max_per_size:
                return
            same.append(buf)
            self._order.append(buf)
            self._bytes += nbytes
            while self._bytes > self.max_idle_bytes:
                old = self._order.pop(0)
                size = old.untyped_storage().nbytes()
                self._idle[size].pop(self._index_in(self._idle[size], old))
                self._bytes -= size

    def _index(self, buf: torch.Tensor) -> int:
        return self._index_in(self._order, buf)

    @staticmethod
    def _index_in(items: list[torch.Tensor], buf: torch.Tensor) -> int:
        return next(i for i, b in enumerate(items) if b is buf)


def read_tensor(info: TensorInfo, pool: BufferPool | None = None) -> torch.Tensor:
    """Read one tensor into memory it owns (no mmap: see the module docstring), from ``pool``
    when given."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8) if pool is None else pool.take(info.nbytes)
    with open(info.path, "rb", buffering=0) as f:
        f.seek(info.start)
        view = memoryview(buf.numpy())
        got = 0
        while got < info.nbytes:
            n = f.readinto(view[got:])
            if not n:
                raise ModelError(f"{info.path}: truncated while reading a tensor; re-download or re-save it")
            got += n
    if info.code == "U8":
        return buf.reshape(info.shape)
    return buf.view(info.dtype).reshape(info.shape)


@dataclass(frozen=True)
class PlannedTensor:
    """An output tensor as the writer needs to know it before it is computed."""

    name: str
    dtype: torch.dtype | str  # a torch dtype or its safetensors code
    shape: tuple[int, ...]

    @property
    def code(self) -> str:
        return code_of(self.dtype)

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * CODE_ITEMSIZE[self.code]


def assign_shards(tensors: Sequence[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Split tensors, in order, into shards no larger than ``max_shard_bytes`` (one oversize tensor
    gets a shard of its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return [s for s in shards if s]


def _header_bytes(tensors: Sequence[PlannedTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.code, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Writes a sharded safetensors model folder tensor by tensor, in plan order.

    The plan fixes every shard's header up front, so each tensor goes straight to disk when it is
    computed. ``write`` checks that tensors arrive in the planned order with the planned shape
    and dtype: a mismatch is a bug in the caller, not a user error.
    """

    def __init__(self, folder: Path, tensors: Sequence[PlannedTensor], *, max_shard_bytes: int) -> None:
        self.folder = Path(folder)
        self.shards = assign_shards(tensors, max_shard_bytes)
        n = len(self.shards)
        self.filenames = (
            ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._order: Iterator[tuple[int, PlannedTensor]] = ((i, t) for i, shard in enumerate(self.shards) for t in shard)
        self._file = None
        self._shard = -1
        self.total_bytes = sum(t.nbytes for t in tensors)

    def _open_shard(self, index: int) -> None:
        if self._file is not None:
            self._file.close()
        self._file = open(self.folder / self.filenames[index], "wb")
        self._file.write(_header_bytes(self.shards[index], {"format": "pt"}))
        self._shard = index

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, planned = next(self._order)
        if planned.name != name or tuple(tensor.shape) != planned.shape or code_of(tensor.dtype) != planned.code:
            raise RuntimeError(
                f"writer expected {planned.name} {planned.shape} {planned.dtype}, got {name} "
                f"{tuple(tensor.shape)} {tensor.dtype}"
            )
        if shard != self._shard:
            self._open_shard(shard)
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        assert self._file is not None
        if data.numel():
            self._file.write(memoryview(data.view(torch.uint8).numpy()))

    def reserve(self, name: str, code: str, shape: tuple[int, ...]) -> tuple[int, int]:
        """Claim planned tensor ``name``'s place in its shard, for its raw little-endian bytes to be
        written there with ``os.pwrite`` (by several threads at once, each its own part: see
        :mod:`evomerge.merge.without_torch`). Returns the shard's file descriptor and the place's
        offset; the place must be filled before the next call to this writer, which may close
        the shard. :meth:`close` checks that every shard came out at its planned size (which
        catches a place left unfilled at a shard's end, as a failed thread would leave it)."""
        shard, planned = next(self._order)
        if planned.name != name or tuple(shape) != planned.shape or code != planned.code:
            raise RuntimeError(f"writer expected {planned.name} {planned.shape} {planned.code}, got {name} {shape} {code}")
        if shard != self._shard:
            self._open_shard(shard)
        assert self._file is not None
        self._file.flush()
        offset = self._file.tell()
        self._file.seek(offset + planned.nbytes)
        return self._file.fileno(), offset

    def copy(self, name: str, source: TensorInfo) -> None:
        """Write planned tensor ``name`` as the stored bytes of ``source``, file to file.

        For outputs that are an input unchanged (passthrough): the kernel copies page-cache
        pages (``copy_file_range``) and no byte passes through this process; where the call is
        missing or refused (another file system, an old kernel) a plain read/write loop runs.
        """
        shard, planned = next(self._order)
        if planned.name != name or source.shape != planned.shape or source.code != planned.code:
            raise RuntimeError(
                f"writer expected {planned.name} {planned.shape} {planned.code}, got a copy of {name} "
                f"{source.shape} {source.code}"
            )
        if shard != self._shard:
            self._open_shard(shard)
        assert self._file is not None
        self._file.flush()
        out_fd = self._file.fileno()
        with open(source.path, "rb", buffering=0) as src:
            done = 0
            if hasattr(os, "copy_file_range"):
                try:
                    while done < source.nbytes:
                        n = os.copy_file_range(src.fileno(), out_fd, source.nbytes - done, source.start + done)
                        if n == 0:
                            break
                        done += n
                except OSError:
                    pass  # nothing written by the failed call: the loop below goes on from `done`
            src.seek(source.start + done)
            while done < source.nbytes:
                chunk = src.read(min(64 << 20, source.nbytes - done))
                if not chunk:
                    raise ModelError(f"{source.path}: truncated while copying a tensor; re-download or re-save it")
                self._file.write(chunk)
                done += len(chunk)
        self._file.flush()

    def close(self) -> None:
        """Finish the last shard and write the index (for more than one shard)."""
        if next(self._order, None) is not None:
            raise RuntimeError("writer closed before every planned tensor was written")
        if self._file is not None:
            self._file.close()
            self._file = None
        for filename, shard in zip(self.filenames, self.shards):
            expected = len(_header_bytes(shard, {"format": "pt"})) + sum(t.nbytes for t in shard)
            if (self.folder / filename).stat().st_size != expected:
                raise RuntimeError(f"writer: {filename} is not its planned {expected} bytes (a tensor left unwritten)")
        if len(self.shards) > 1:
            weight_map = {t.name: self.filenames[i] for i, shard in enumerate(self.shards) for t in shard}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
