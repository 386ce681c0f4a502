"""Per-tensor kernels of the methods that are not task-vector merges: linear, slerp, model_stock,
passthrough, nearswap, arcee_fusion (the task-vector family lives in
:mod:`evomerge.merge.task_vectors`, the other spherical methods in :mod:`evomerge.merge.spherical`).

Each reproduces mergekit 0.1.5 for one output tensor, including its dtypes: linear and slerp
compute in float32 (float64 when the inputs are float64) and return the input dtype; model_stock
computes in the input dtype; passthrough returns its input (scaled when asked); nearswap computes
in the input dtype and arcee_fusion returns float32 for lower-precision inputs (its mask is). Inputs are
expected in one dtype already; :mod:`evomerge.merge.registry` aligns them as mergekit does.
"""

from __future__ import annotations

from collections.abc import Sequence

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:
    from evomerge.lazy_torch import torch  # imported on first use: see evomerge.lazy_torch

from evomerge.errors import ConfigError, ModelError
from evomerge.merge.scratch import current_scratch

#: slerp falls back to linear interpolation above this |cosine| (nearly parallel or antiparallel).
SLERP_DOT_THRESHOLD = 0.9995
#: slerp leaves a vector unnormalised when its norm is at or below this.
SLERP_NORM_EPS = 1e-8
#: model_stock's floor on the product of two offset norms, and its singular-denominator bound.
MODEL_STOCK_EPS = 1e-6
#: nearswap's floor on |base - other| before dividing t by it.
NEARSWAP_DIFF_FLOOR = 1e-6
#: Added to arcee_fusion's softmax probabilities so their logarithms stay finite.
FUSION_PROB_EPS = 1e-8
#: arcee_fusion keeps the entries whose importance is at least median + this * (q3 - q1).
FUSION_IQR_FACTOR = 1.5


def require_floating(method: str, tensor: torch.Tensor) -> None:
    """ModelError for integer tensors: mergekit's linear and slerp raise TypeError on them, and its
    other methods compute meaningless results (weights truncated to integers)."""
    if not tensor.is_floating_point():
        raise ModelError(
            f"{method} needs floating-point tensors; got {tensor.dtype}. "
            "Merge integer tensors with passthrough (e.g. through a filter)."
        )


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs: where mergekit's linear and slerp do their sums."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_merge(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True
) -> torch.Tensor:
    """``sum_i w_i x_i``, divided by ``sum_i w_i`` when ``normalize``.

    Weights are rounded to float32 (mergekit passes them as a float32 tensor) and the sum is
    accumulated in float32 whatever the input dtype. mergekit divides by a zero weight sum and
    writes inf/NaN; that is a config mistake, so it raises ConfigError instead.
    """
    first = tensors[0]
    require_floating("linear", first)
    dtype = _math_dtype(first.dtype)
    w = torch.tensor(list(weights), dtype=torch.float32, device=first.device).to(dtype)
    total = w.sum()
    if normalize and total == 0:
        raise ConfigError(
            "linear with normalize: true needs weights that do not sum to 0 "
            f"(got {list(weights)}); mergekit would write inf/NaN. Change a weight, or set "
            "normalize: false."
        )
    if first.device.type == "cpu" and first.numel() > LINEAR_CHUNK:
        return _linear_in_chunks(tensors, w, total if normalize else None, dtype)
    result = torch.zeros(first.shape, dtype=dtype, device=first.device)
    for tensor, coefficient in zip(tensors, w):
        result.addcmul_(tensor, coefficient)
    if normalize:
        result.div_(total)
    return result.to(first.dtype)


#: Entries per chunk of the CPU linear merge: a float32 accumulator of 256 KiB stays in L2.
LINEAR_CHUNK = 1 << 16


def _linear_in_chunks(
    tensors: Sequence[torch.Tensor], w: torch.Tensor, total: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """:func:`linear_merge`'s ops on slices of ``LINEAR_CHUNK`` entries: every op is elementwise,
    so the result is the same bit for bit, in one pass over memory instead of one per input and
    without a full-size float32 accumulator for 16-bit inputs."""
    first = tensors[0]
    flat = [t.reshape(-1) for t in tensors]
    out = torch.empty(first.numel(), dtype=first.dtype)
    acc_full = torch.empty(min(LINEAR_CHUNK, first.numel()), dtype=dtype)
    coefficients = list(w)
    for start in range(0, first.numel(), LINEAR_CHUNK):
        stop = min(first.numel(), start + LINEAR_CHUNK)
        acc = acc_full[: stop - start].zero_()
        for tensor, coefficient in zip(flat, coefficients):
            acc.addcmul_(tensor[start:stop], coefficient)
        if total is not None:
            acc.div_(total)
        out[start:stop].copy_(acc)
    return out.reshape(first.shape)


def slerp_merge(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from ``v0`` (the base, t = 0) to ``v1`` (t = 1), per whole tensor.

    The angle comes from the tensors flattened and normalised by their Frobenius norms; the
    interpolation coefficients then apply to the raw tensors, so norms are interpolated too.
    Falls back to linear interpolation when |cos| > 0.9995 (including antiparallel tensors, as in
    mergekit). Coefficients and products are computed in float32 (float64 inputs: float64) and
    the result is returned in ``v0``'s dtype. Inside :func:`~evomerge.merge.scratch.reused_scratch` the float32
    temporaries live in buffers kept from one call to the next (same ops, same bits).
    """
    require_floating("slerp", v0)
    dtype = _math_dtype(v0.dtype)
    n = v0.numel()
    scratch = current_scratch() if v0.device.type == "cpu" and n > 0 else None

    def temp(i: int) -> torch.Tensor:
        return torch.empty(n, dtype=dtype, device=v0.device) if scratch is None else scratch.take(i, n, dtype)

    a = v0.reshape(-1) if v0.dtype == dtype else temp(0).copy_(v0.reshape(-1))
    b = v1.reshape(-1) if v1.dtype == dtype else temp(1).copy_(v1.reshape(-1))
    t_ = torch.tensor(t, dtype=torch.float32, device=a.device).to(dtype)
    if n == 0:
        return ((1 - t_) * a + t_ * b).reshape(v0.shape).to(v0.dtype)
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > SLERP_NORM_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > SLERP_NORM_EPS, norm_b, 1)
    # Normalise before multiplying, so the dot product cannot overflow.
    dot = torch.dot(torch.div(a, norm_a, out=temp(2)), torch.div(b, norm_b, out=temp(3))).clamp(-1, 1)
    if dot.abs() > SLERP_DOT_THRESHOLD:
        coef_a, coef_b = 1 - t_, t_
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a = torch.sin((1 - t_) * theta) / sin_theta
        coef_b = torch.sin(t_ * theta) / sin_theta
    # the result gets memory of its own (a caller may hold it while the next call runs)
    out = torch.empty(n, dtype=v0.dtype, device=v0.device)
    result = torch.mul(a, coef_a, out=out if v0.dtype == dtype else temp(2))
    result.add_(torch.mul(b, coef_b, out=temp(3)))
    if result is not out:
        out.copy_(result)
    return out.reshape(v0.shape)


def model_stock_merge(
    base: torch.Tensor, donors: Sequence[torch.Tensor], *, filter_wise: bool = False
) -> torch.Tensor:
    """Model Stock: move from the base toward the donors' mean by a ratio set by their agreement.

    With offsets o_i = x_i - b and c the mean pairwise cosine of the offsets (each clamped to
    [-1, 1], norm products floored at 1e-6), t = N c / (1 + (N - 1) c), and the result is
    t * mean(x_i) + (1 - t) * b. Where 1 + (N - 1) c is within 1e-6 of zero, t = 0 (the base), as
    in mergekit 0.1.5. ``filter_wise`` computes c per row (last axis) instead of per tensor.
    Needs at least two donors; computed in the input dtype, as mergekit does.
    """
    require_floating("model_stock", base)
    if len(donors) < 2:
        raise ConfigError(
            f"model_stock needs at least two models besides the base; got {len(donors)}."
        )
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [d.unsqueeze(0) if d.dim() == 1 else d for d in donors]
    else:
        w0 = base.reshape(-1)
        ws = [d.reshape(-1) for d in donors]
    offsets = [w - w0 for w in ws]
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            floor = (norms[i] * norms[j]).clamp(min=MODEL_STOCK_EPS)
            cosines.append((dot / floor).clamp(-1, 1))
    del offsets
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < MODEL_STOCK_EPS
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))
    t = t.to(cos.dtype)
    mean = ws[0].clone()
    for w in ws[1:]:
        mean.add_(w)
    mean.div_(n)
    return (t * mean + (1 - t) * w0).reshape(shape)


def passthrough_merge(tensor: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The tensor itself (no copy), or ``tensor * scale`` in its dtype when a scale is given."""
    return tensor if scale is None else tensor * scale


def nearswap_merge(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """Per entry, move from the base toward ``other`` by ``min(1, t / |base - other|)``.

    Entries where the two models are within ``t`` of each other take ``other``'s value; farther
    ones move toward it by a fixed distance ``t`` (so large disagreements keep the base). The
    difference is floored at 1e-6. Computed in the input dtype, as in mergekit.
    """
    require_floating("nearswap", base)
    share = (t / (base - other).abs().clamp(min=NEARSWAP_DIFF_FLOOR)).clamp(min=0, max=1)
    return share * other + (1 - share) * base


def arcee_fusion_merge(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Keep ``other``'s changes where they matter most, the base elsewhere.

    Importance of an entry is its change |other - base| times the KL divergence of its row's
    softmax in ``other`` from that in the base (rows: the last axis). Entries at or above
    median + 1.5 (q3 - q1) of the importances (an upper-outlier fence) take ``other``'s value.
    Quantiles are exact order statistics at index ``floor(q * (n - 1))``; mergekit computes the
    same ones exactly up to a million entries and estimates them from a random sample above
    that, which no seed reproduces, so larger tensors agree with it only statistically. The
    mask is float32, so the result is float32 for lower-precision inputs, as in mergekit.
    """
    require_floating("arcee_fusion", base)
    change = other - base
    p = torch.softmax(other, dim=-1) + FUSION_PROB_EPS
    q = torch.softmax(base, dim=-1) + FUSION_PROB_EPS
    divergence = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    importance = change.abs() * divergence
    del p, q, divergence
    q1, median, q3 = _order_statistics(importance.reshape(-1), (0.25, 0.5, 0.75))
    fence = median + FUSION_IQR_FACTOR * (q3 - q1)
    keep = (importance >= fence).float()
    return base + change * keep


def _order_statistics(values: torch.Tensor, quantiles: tuple[float, ...]) -> list[torch.Tensor]:
    """The entries of rank ``floor(q * (n - 1))`` (0-based, ascending) of the 1-D ``values``,
    found by selection (kthvalue) rather than a full sort. The positions are computed in
    float32, as mergekit does, so both pick the same ranks."""
    n = values.numel()
    positions = (torch.tensor(quantiles, dtype=torch.float32) * (n - 1)).long().tolist()
    return [torch.kthvalue(values, k + 1).values for k in positions]
