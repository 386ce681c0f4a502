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

Inputs are read chunk by chunk with ``os.preadv`` into a few cache-sized buffers and each output
chunk goes straight to the writer, so memory holds a few chunks, not tensors.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

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


def write_all(plan: MergePlan, models: Mapping[str, ModelFolder], writer: ShardedWriter) -> None:
    """Compute every task of a :func:`supports` plan and write it, in plan order."""
    # overflow to infinity is a value here, as in torch (a non-finite result is refused below)
    with _Files() as files, np.errstate(over="ignore", invalid="ignore"):
        for task in plan.tasks:
            infos = [models[m].stored(n) for m, n in task.sources]
            assert all(info is not None for info in infos)
            inputs: list[TensorInfo] = [i for i in infos if i is not None]
            if plan.method.name == "passthrough" and inputs[0].code == task.out_code and task.load_code in (
                None, inputs[0].code
            ):
                writer.copy(task.name, inputs[0])
                continue
            writer.write_chunks(task.name, task.out_code, task.shape, _merged_chunks(plan, task, inputs, files))


class _Files:
    """Read-only descriptors of the input files, opened once each."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def __enter__(self) -> _Files:
        return self

    def __exit__(self, *_: object) -> None:
        for fd in self._fds.values():
            os.close(fd)

    def read(self, info: TensorInfo, first: int, count: int, into: np.ndarray) -> np.ndarray:
        """Entries ``first .. first + count`` of ``info``'s tensor, as raw bits, into ``into``."""
        key = str(info.path)
        fd = self._fds.get(key)
        if fd is None:
            fd = self._fds[key] = os.open(key, os.O_RDONLY)
        size = CODE_ITEMSIZE[info.code]
        view = memoryview(into[:count]).cast("B")
        done, offset = 0, info.start + first * size
        while done < view.nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise ModelError(f"{info.path}: truncated while reading a tensor; re-download or re-save it")
            done += n
        return into[:count]


def _merged_chunks(
    plan: MergePlan, task: TensorTask, inputs: list[TensorInfo], files: _Files
) -> Iterator[memoryview]:
    """The output tensor's bytes, chunk by chunk."""
    n = 1
    for d in task.shape:
        n *= d
    code = _compute_code(task, inputs[0])
    raw = [np.empty(min(n, CHUNK), dtype=np.uint32 if i.code == "F32" else np.uint16) for i in inputs]
    values = [np.empty(min(n, CHUNK), dtype=np.float32) for _ in inputs]
    out32 = np.empty(min(n, CHUNK), dtype=np.float32)
    out16 = np.empty(min(n, CHUNK), dtype=np.uint16)
    scratch = np.empty(min(n, CHUNK), dtype=np.uint32)
    if plan.method.name == "task_arithmetic":
        assert task.base_index is not None
        donors = [i for i in range(len(inputs)) if i != task.base_index]
        weights = [_round_scalar(float(task.per_input[i]["weight"]), code) for i in donors]
    elif plan.method.name == "linear":
        weights = [np.float32(float(values["weight"])) for values in task.per_input]
        total = None
        if task.shared.get("normalize", True):
            total = weights[0] if len(weights) == 1 else np.float32(weights[0] + weights[1])
        wide = _Wide(min(n, CHUNK))
    for start in range(0, n, CHUNK):
        count = min(CHUNK, n - start)
        xs = []
        for info, r, v in zip(inputs, raw, values):
            bits = files.read(info, start, count, r)
            x = v[:count]
            if not _load(bits, info.code, code, x, scratch[:count]):
                raise _non_finite(task)
            xs.append(x)
        out = out32[:count]
        if plan.method.name == "passthrough":
            np.copyto(out, xs[0])
        elif plan.method.name == "linear":
            _linear(xs, weights, total, code, out, wide.view(count), scratch[:count])
        else:
            _task_arithmetic(xs[task.base_index], [xs[i] for i in donors], weights, code, out, scratch[:count])
        if not bool(np.isfinite(out).all()):
            raise _non_finite(task)
        if task.out_code == "F32":
            yield memoryview(out).cast("B")
        else:
            yield memoryview(_to_bf16_bits(out, scratch[:count], out16[:count])).cast("B")


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


def _to_bf16_bits(x: np.ndarray, scratch: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Finite (or infinite) float32 ``x`` rounded to bfloat16 bits in ``out`` (``x`` is changed)."""
    _round_bf16(x, scratch)
    np.right_shift(x.view(np.uint32), 16, out=scratch)
    np.copyto(out, scratch, casting="unsafe")
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
        np.subtract(x, base, out=x)
        if rounded:
            _round_bf16(x, scratch)
        np.multiply(x, w, out=x)
        if rounded:
            _round_bf16(x, scratch)
        if j == 0:
            np.copyto(out, x)
        else:
            np.add(out, x, out=out)
    if rounded:
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
