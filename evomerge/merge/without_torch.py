"""Merges that ``evomerge merge`` computes with numpy, without importing torch.

Importing torch costs about 1.4 s of CPU, more than a light merge of a 100M-parameter model
itself. For a plan whose every output tensor is one of

- ``passthrough`` without ``scale`` (a byte copy, or a cast between float32 and bfloat16), or
- ``task_arithmetic`` with its defaults ``normalize: false`` and ``lambda: 1`` and at most
  :data:`MAX_DONORS` donors, or
- ``linear`` (with ``normalize: true`` only for two models, whose weight sum is one addition),

over float32 or bfloat16 tensors stored in safetensors files (no adapter), this module reproduces
the torch path's result bit for bit: the same IEEE operations in the same order, each bfloat16
operation computed in float32 and rounded to nearest-even as torch's CPU kernels do. torch's CPU
``addcmul`` (linear's accumulation) is a fused multiply-add, rounded once; numpy has none, so
:func:`_fused_multiply_add` forms it in float64 (the product is exact there) and redoes with a
round-to-odd sum the rare entries where rounding twice could differ. Any other plan returns
False from :func:`supports` and runs through torch.

Inputs are read where the page cache holds them, through read-only memory maps of one task's
tensors at a time (no copy), and computed chunk by chunk in a few cache-sized buffers per thread,
on as many threads as there are cores (up to :data:`MAX_WORKERS`), each writing its output chunks
in place in the output file (``os.pwrite``). Memory holds one task's mapped inputs and a few
chunks per thread; the bytes do not depend on the thread count (every chunk is computed alike).
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import queue
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import ModelError
from .model_folder import ModelFolder
from .plan import MergePlan, TensorTask
from .safetensors_io import CODE_ITEMSIZE, ShardedWriter, TensorInfo

#: Codes whose arithmetic is reproduced here.
CODES = ("F32", "BF16")
#: Up to this many donors torch's sum over donors adds them in order (see task_vectors.sum_rows).
MAX_DONORS = 4
#: Entries per chunk: a float32 chunk is 256 KiB, so a chunk's inputs and temporaries stay in L2.
CHUNK = 1 << 16
#: Most threads :func:`write_all` computes on (a merge this light is bound by memory beyond a few).
MAX_WORKERS = 4
_EXPONENT = np.uint32(0x7F800000)
_HALF_MINUS_ONE = np.uint32(0x7FFF)
_HIGH_HALF = np.uint32(0xFFFF0000)


def supports(plan: MergePlan, models: Mapping[str, ModelFolder]) -> bool:
    """Whether every task of ``plan`` is one this module computes exactly (see the docstring)."""
    return all(_supports_task(plan, task, models) for task in plan.tasks)


def _supports_task(plan: MergePlan, task: TensorTask, models: Mapping[str, ModelFolder]) -> bool:
    infos = [models[m].stored(n) for m, n in task.sources]
    if any(info is None or info.code not in CODES for info in infos):
        return False
    if task.load_code not in (None, *CODES) or task.out_code not in CODES:
        return False
    if len({_compute_code(task, info) for info in infos if info is not None}) != 1:
        return False
    name = plan.method.name
    if name == "passthrough":
        return len(task.sources) == 1 and task.per_input[0].get("scale") is None
    if name == "task_arithmetic":
        donors = [i for i in range(len(task.sources)) if i != task.base_index]
        return (
            task.base_index is not None
            and len(donors) <= MAX_DONORS
            and all("weight" in task.per_input[i] for i in donors)
            and not task.shared.get("normalize", False)
            and float(task.shared.get("lambda", 1.0)) == 1.0
        )
    if name == "linear":
        weights = [values.get("weight") for values in task.per_input]
        if any(w is None for w in weights):
            return False
        if not task.shared.get("normalize", True):
            return True
        return len(weights) <= 2 and float(sum(np.float32(w) for w in weights)) != 0.0
    return False


def _compute_code(task: TensorTask, info: TensorInfo) -> str:
    return task.load_code or info.code


def write_all(plan: MergePlan, models: Mapping[str, ModelFolder], writer: ShardedWriter,
              workers: int | None = None) -> None:
    """Compute every task of a :func:`supports` plan and write it, in plan order, on ``workers``
    threads (default :func:`worker_count`) that share each tensor's chunks."""
    workers = workers or worker_count()
    scratch: queue.SimpleQueue[_Scratch] = queue.SimpleQueue()
    width = max((len(task.sources) for task in plan.tasks), default=1)
    for _ in range(workers):
        scratch.put(_Scratch(width))
    # overflow to infinity is a value here, as in torch (a non-finite result is refused below)
    with _Maps() as maps, ThreadPoolExecutor(max_workers=max(1, workers - 1),
                                             thread_name_prefix="evomerge-numpy") as pool:
        for task in plan.tasks:
            infos = [models[m].stored(n) for m, n in task.sources]
            assert all(info is not None for info in infos)
            inputs: list[TensorInfo] = [i for i in infos if i is not None]
            if plan.method.name == "passthrough" and inputs[0].code == task.out_code and task.load_code in (
                None, inputs[0].code
            ):
                writer.copy(task.name, inputs[0])
                continue
            fd, offset = writer.reserve(task.name, task.out_code, task.shape)
            try:
                kernel = _Kernel(plan, task, inputs, maps.open(inputs), fd, offset)
                helpers = [pool.submit(kernel.run, scratch) for _ in range(min(workers, kernel.batches) - 1)]
                try:
                    kernel.run(scratch)
                finally:
                    for done in helpers:
                        done.result()
            finally:
                kernel = None  # its arrays view the maps
                maps.release()


def worker_count() -> int:
    """Threads for the numpy merge: the cores this process may run on, at most :data:`MAX_WORKERS`.
    numpy's loops release the GIL, so the threads compute at once; on a busy machine a thread
    that waits for a core leaves its chunks to the others (see :class:`_Kernel`)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))


class _Maps:
    """Read-only memory maps of the input tensors of one task at a time.

    A tensor's bytes are read where the page cache holds them, with no copy into a buffer of
    ours (reading them with ``preadv`` was a sixth of a bfloat16 task arithmetic's time); each
    map is closed when its task is written, so the resident set holds one task's inputs.
    """

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._open: list[mmap.mmap] = []

    def __enter__(self) -> _Maps:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()
        for fd in self._fds.values():
            os.close(fd)

    def open(self, infos: list[TensorInfo]) -> list[np.ndarray]:
        """Each tensor's raw bits (uint32 for float32, uint16 for bfloat16), read-only."""
        return [self._bits(info) for info in infos]

    def _bits(self, info: TensorInfo) -> np.ndarray:
        dtype = np.uint32 if info.code == "F32" else np.uint16
        if info.nbytes == 0:
            return np.empty(0, dtype=dtype)
        key = str(info.path)
        fd = self._fds.get(key)
        if fd is None:
            fd = self._fds[key] = os.open(key, os.O_RDONLY)
        first = info.start - info.start % mmap.ALLOCATIONGRANULARITY
        try:
            mapped = mmap.mmap(fd, info.start + info.nbytes - first, access=mmap.ACCESS_READ, offset=first)
        except (OSError, ValueError) as err:
            raise ModelError(f"{info.path}: cannot map a tensor ({err}); re-download or re-save it") from None
        self._open.append(mapped)
        return np.frombuffer(mapped, dtype=dtype, count=info.nbytes // CODE_ITEMSIZE[info.code],
                             offset=info.start - first)

    def release(self) -> None:
        """Close the maps of the last task (whose arrays the caller has dropped)."""
        for mapped in self._open:
            try:
                mapped.close()
            except BufferError:  # an array of it outlived its task (an error's traceback): let GC close it
                pass
        self._open = []


class _Scratch:
    """One thread's chunk-sized buffers, kept from tensor to tensor."""

    def __init__(self, width: int) -> None:
        self.values = [np.empty(CHUNK, dtype=np.float32) for _ in range(width)]
        self.out32 = np.empty(CHUNK, dtype=np.float32)
        self.out16 = np.empty(CHUNK, dtype=np.uint16)
        self.bits = np.empty(CHUNK, dtype=np.uint32)
        self.wide = _Wide(CHUNK)


class _Kernel:
    """One task's merge, computed batch by batch of chunks by whichever thread takes the next batch
    (a shared counter), each output chunk written in place with ``os.pwrite``: threads that a
    busy machine slows take fewer batches, and nothing waits for chunks to come in order."""

    #: Chunks per batch: a few MB of output, so that taking a batch costs nothing against computing it.
    BATCH = 8

    def __init__(self, plan: MergePlan, task: TensorTask, inputs: list[TensorInfo], bits: list[np.ndarray],
                 fd: int, offset: int) -> None:
        self.plan, self.task, self.inputs, self.bits = plan, task, inputs, bits
        self.fd, self.offset = fd, offset
        self.n = math.prod(task.shape)
        self.code = _compute_code(task, inputs[0])
        self.batch = CHUNK * self.BATCH
        self.batches = max(1, -(-self.n // self.batch))
        self._next = itertools.count()
        self.failed = False
        self.out_itemsize = CODE_ITEMSIZE[task.out_code]
        self.total: np.float32 | None = None
        if plan.method.name == "task_arithmetic":
            assert task.base_index is not None
            self.donors = [i for i in range(len(inputs)) if i != task.base_index]
            self.weights = [_round_scalar(float(task.per_input[i]["weight"]), self.code) for i in self.donors]

        elif plan.method.name == "linear":
            self.weights = [np.float32(float(values["weight"])) for values in task.per_input]
            if task.shared.get("normalize", True):
                w = self.weights
                self.total = w[0] if len(w) == 1 else np.float32(w[0] + w[1])

    def run(self, pool: queue.SimpleQueue[_Scratch]) -> None:
        """Take batches until none is left; write each chunk of the output where it belongs."""
        scratch = pool.get()
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                while not self.failed and (batch := next(self._next)) < self.batches:
                    first = batch * self.batch
                    for start in range(first, min(self.n, first + self.batch), CHUNK):
                        chunk = self._chunk(start, min(CHUNK, self.n - start), scratch)
                        _pwrite_all(self.fd, chunk, self.offset + start * self.out_itemsize)
        except BaseException:
            self.failed = True  # the other threads stop at their next batch
            raise
        finally:
            pool.put(scratch)

    def _chunk(self, start: int, count: int, s: _Scratch) -> memoryview:
        """Output entries ``start .. start + count``, as raw bytes."""
        task, code, name = self.task, self.code, self.plan.method.name
        xs = []
        for info, bits, v in zip(self.inputs, self.bits, s.values):
            x = v[:count]
            if not _load(bits[start:start + count], info.code, code, x, s.bits[:count]):
                raise _non_finite(task)
            xs.append(x)
        out = s.out32[:count]
        if name == "passthrough":
            np.copyto(out, xs[0])
        elif name == "linear":
            _linear(xs, self.weights, self.total, code, out, s.wide.view(count), s.bits[:count])
        else:
            assert task.base_index is not None
            _task_arithmetic(xs[task.base_index], [xs[i] for i in self.donors], self.weights, code, out, s.bits[:count])
        if not bool(np.isfinite(out).all()):
            raise _non_finite(task)
        if task.out_code == "F32":
            return memoryview(out).cast("B")
        return memoryview(_to_bf16_bits(out, s.bits[:count], s.out16[:count], rounded=code == "BF16")).cast("B")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < data.nbytes:
        done += os.pwrite(fd, data[done:], offset + done)


def _non_finite(task: TensorTask) -> ModelError:
    """The torch path's error (evomerge.merge.run.compute_task) for a non-finite result."""
    return ModelError(f"merging {task.name} gave NaN or infinite values; check the weights and parameters")


def _load(bits: np.ndarray, stored: str, compute: str, out: np.ndarray, scratch: np.ndarray) -> bool:
    """Stored bits -> float32 values of the compute dtype (bfloat16 values held exactly in float32),
    as torch's load cast does: bfloat16 -> float32 is exact, float32 -> bfloat16 rounds.

    False when a float32 input to be rounded holds NaN or infinity, which the rounding here does
    not carry through: every supported merge of such an input is non-finite in torch too."""
    if stored == "BF16":
        u = out.view(np.uint32)
        np.copyto(u, bits, casting="unsafe")
        np.left_shift(u, 16, out=u)
        return True
    np.copyto(out.view(np.uint32), bits)
    if compute == "BF16":
        if not bool(np.isfinite(out).all()):
            return False
        _round_bf16(out, scratch)
    return True


def _round_bf16(x: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Round float32 ``x`` in place to the nearest bfloat16 (ties to even), kept as float32: the
    rounding of torch's float -> bfloat16 conversion, for finite values and infinities."""
    u = x.view(np.uint32)
    np.right_shift(u, 16, out=scratch)
    np.bitwise_and(scratch, 1, out=scratch)
    np.add(scratch, _HALF_MINUS_ONE, out=scratch)
    np.add(u, scratch, out=u)
    np.bitwise_and(u, _HIGH_HALF, out=u)
    return x


def _to_bf16_bits(x: np.ndarray, scratch: np.ndarray, out: np.ndarray, *, rounded: bool = False) -> np.ndarray:
    """Finite (or infinite) float32 ``x`` rounded to bfloat16 bits in ``out`` (``x`` is changed).
    ``rounded``: ``x`` holds bfloat16 values already (a merge computed in bfloat16 rounds its
    last op), so only the bits move: rounding again changes nothing and was a tenth of the work."""
    if not rounded:
        _round_bf16(x, scratch)
    np.right_shift(x.view(np.uint32), 16, out=out, casting="unsafe")
    return out


def _round_scalar(value: float, code: str) -> np.float32:
    """A Python float as ``torch.tensor([value], dtype=...)`` stores it: float32, then bfloat16."""
    x = np.array([value], dtype=np.float32)
    if code == "BF16":
        _round_bf16(x, np.empty(1, dtype=np.uint32))
    return x[0]


def _task_arithmetic(
    base: np.ndarray, donors: list[np.ndarray], weights: list[np.float32], code: str, out: np.ndarray,
    scratch: np.ndarray,
) -> None:
    """``base + sum_i w_i (x_i - base)`` in the op order of task_vectors._merge_in_chunks and
    sum_rows: each term in the compute dtype, the sum over donors in float32 (for bfloat16,
    rounded once at the end), then the base added in the compute dtype."""
    rounded = code == "BF16"
    if not donors:
        np.copyto(out, base)
        return
    for j, (x, w) in enumerate(zip(donors, weights)):
        term = out if j == 0 else x  # the first term is the sum so far
        np.subtract(x, base, out=term)
        if rounded:
            _round_bf16(term, scratch)
        np.multiply(term, w, out=term)
        if rounded:
            _round_bf16(term, scratch)
        if j > 0:
            np.add(out, term, out=out)
    if rounded and len(donors) > 1:  # one term is a bfloat16 value already
        _round_bf16(out, scratch)
    np.add(out, base, out=out)
    if rounded:
        _round_bf16(out, scratch)


def _linear(
    xs: list[np.ndarray], weights: list[np.float32], total: np.float32 | None, code: str, out: np.ndarray,
    wide: _Wide, scratch: np.ndarray,
) -> None:
    """methods.linear_merge: ``acc = 0``, ``acc = fma(x_i, w_i, acc)`` per input in float32, divided
    by the weight sum when normalizing, then rounded to the inputs' dtype."""
    # the first step is fma(x, w, +0) = x * w rounded once, a zero product made +0 as in 0 + x * w
    np.multiply(xs[0], weights[0], out=out)
    np.add(out, np.float32(0), out=out)
    for x, w in zip(xs[1:], weights[1:]):
        _fused_multiply_add(x, w, out, wide)
    if total is not None:
        np.divide(out, total, out=out)
    if code == "BF16":
        _round_bf16(out, scratch)


class _Wide:
    """float64, int64 and boolean scratch of one chunk for :func:`_fused_multiply_add`."""

    def __init__(self, n: int) -> None:
        self.buffers = [np.empty(n, dtype=np.float64) for _ in range(4)]
        self.bits = np.empty(n, dtype=np.int64)
        self.flags = [np.empty(n, dtype=np.bool_) for _ in range(2)]

    def view(self, count: int) -> _Wide:
        part = _Wide(0)
        part.buffers = [b[:count] for b in self.buffers]
        part.bits = self.bits[:count]
        part.flags = [f[:count] for f in self.flags]
        return part


#: The low 29 bits of a float64's mantissa, below float32's 23, and their value at a float32 midpoint.
_BELOW_FLOAT32 = np.int64((1 << 29) - 1)
_MIDPOINT = np.int64(1 << 28)
#: float64 bits of 2**-126 (float32's smallest normal) and the mask of a float64's magnitude.
_FLOAT32_TINY = np.int64((1023 - 126) << 52)
_MAGNITUDE = np.int64((1 << 63) - 1)


def _fused_multiply_add(x: np.ndarray, w: np.float32, acc: np.ndarray, wide: _Wide) -> None:
    """``acc = round_float32(x * w + acc)`` with one rounding, as a fused multiply-add gives.

    The float32 product is exact in float64 (24 + 24 bits), so only the sum rounds twice: to
    float64, then to float32. That double rounding differs from one rounding only where the
    float64 sum lands exactly on a float32 midpoint (float32 midpoints are float64 numbers, so
    elsewhere the sum stays on the exact value's side of every one), and below float32's normal
    range, where midpoints lie elsewhere: those rare entries are redone by :func:`_exact_sum`.
    """
    p, s = wide.buffers[:2]
    np.multiply(x, np.float64(w), out=p, dtype=np.float64)
    np.add(p, acc, out=s)
    bits, (suspect, tiny) = wide.bits, wide.flags
    np.bitwise_and(s.view(np.int64), _BELOW_FLOAT32, out=bits)
    np.equal(bits, _MIDPOINT, out=suspect)
    np.bitwise_and(s.view(np.int64), _MAGNITUDE, out=bits)
    np.less(bits, _FLOAT32_TINY, out=tiny)
    np.logical_or(suspect, tiny, out=suspect)
    count = int(np.count_nonzero(suspect))
    if count > suspect.size // 16:
        # many: sums of two nearby float32 numbers (weights like 0.5) are exact and often
        # midpoints; redoing the whole chunk is cheaper than gathering them
        _exact_sum_in_place(acc, p, wide)
        return
    redo = np.flatnonzero(suspect) if count else None
    if redo is not None:
        exact = _exact_sum(acc[redo].astype(np.float64), p[redo])
    np.copyto(acc, s, casting="unsafe")
    if redo is not None:
        acc[redo] = exact


def _exact_sum(a: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``round_float32(a + p)`` for float64 ``a`` and ``p``, rounded once: the float64 sum made
    round-to-odd (its exact error from TwoSum moves an even result one ulp toward the exact
    value), which rounds to float32 as the exact sum does (Boldo and Melquiond: round-to-odd with
    two more bits than the target). Infinities stay infinite, NaNs non-finite."""
    s = a + p
    b = s - a
    error = (a - (s - b)) + (p - b)
    step = (np.sign(error) * np.sign(s)).astype(np.int64)  # +1: exact value beyond s, -1: below
    bits = s.view(np.int64)
    bits += step * (1 - (bits & 1))  # only an even (round-to-nearest) result moves
    return s.astype(np.float32)


def _exact_sum_in_place(acc: np.ndarray, p: np.ndarray, wide: _Wide) -> None:
    """:func:`_exact_sum` of float32 ``acc`` and float64 ``p`` into ``acc``, in ``wide``'s buffers
    (``p`` is overwritten): temporaries of a whole chunk would be allocated and returned to the
    system by glibc on every call, a page fault per 4 KiB."""
    a, s, t = wide.buffers[2], wide.buffers[1], wide.buffers[3]
    np.copyto(a, acc)
    np.add(a, p, out=s)
    np.subtract(s, a, out=t)  # b: the part of s that came from p
    np.subtract(p, t, out=p)  # p - b
    np.subtract(s, t, out=t)  # s - b
    np.subtract(a, t, out=a)  # a - (s - b)
    np.add(a, p, out=t)  # the exact error of s
    np.sign(t, out=t)
    np.multiply(t, np.sign(s, out=a), out=t)  # +1: the exact value lies beyond s, -1: below, 0: s exact
    steps = wide.bits
    np.copyto(steps, t, casting="unsafe")
    odd = a.view(np.int64)
    np.bitwise_and(s.view(np.int64), 1, out=odd)
    np.multiply(steps, odd, out=odd)
    np.subtract(steps, odd, out=steps)  # only an even (round-to-nearest) result moves
    np.add(s.view(np.int64), steps, out=s.view(np.int64))
    np.copyto(acc, s, casting="unsafe")
