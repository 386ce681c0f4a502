"""The task-vector family: task_arithmetic, ties, dare_*, breadcrumbs*, della*.

All eight are one computation with two switches, exactly as in mergekit 0.1.5's
``GeneralizedTaskArithmeticMerge``: a sparsifier for each task vector and an optional sign
consensus. For base b and donors x_i with weight w_i:

1. delta_i = x_i - b (or a precomputed, resident task vector), sparsified at density d_i;
2. wdelta_i = w_i * delta_i, with w_i rounded to the compute dtype;
3. with consensus: s = (sum_i wdelta_i >= 0 ? +1 : -1) per entry; mask_i = sign(wdelta_i) == s
   (so zeros never vote); mixed = sum_i mask_i * wdelta_i and divisor = sum_i mask_i * w_i,
   a zero divisor replaced by 1;
   without: mixed = sum_i wdelta_i and divisor = sum_i w_i, replaced by 1 when |divisor| < 1e-8;
4. mixed /= divisor when ``normalize``; mixed *= lambda when lambda != 1;
5. result = b + mixed.

Everything runs in the base's dtype (mergekit aligns all inputs to their promoted dtype first and
does not widen bfloat16 here, unlike linear and slerp), and the op order follows mergekit's so
that float32 results agree to rounding and low-precision results round alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.merge.methods import require_floating
from evomerge.merge.sparsify import Sparsifier, apply_mask, mask_for, work_dtype

#: Below this |sum of weights| a non-consensus divisor is taken as 1, as in mergekit.
DIVISOR_EPS = 1e-8


def task_vector_merge(
    base: torch.Tensor,
    donors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sparsifier: Sparsifier | None = None,
    consensus: bool = False,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    densities: Sequence[float] | None = None,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    deltas: Sequence[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Merge donors into ``base`` through their task vectors; see the module docstring.

    ``donors`` and ``weights`` (and ``densities``, ``gammas``, ``epsilons``, ``deltas`` when given)
    are aligned, one item per donor. When ``deltas`` is given the donors are not read at all:
    search workers keep task vectors resident and must not pay for recomputing them. Neither
    donors nor deltas are modified. With no donors the base itself is returned, as in mergekit.
    Raises ConfigError where mergekit would crash (see :mod:`evomerge.merge.sparsify`), and
    ModelError for integer tensors, which mergekit would merge with truncated weights.
    """
    count = len(weights)
    if count == 0:
        return base
    require_floating("task-vector merging", base)
    dtype, device = base.dtype, base.device
    w = torch.tensor(list(weights), dtype=dtype, device=device)
    terms = torch.empty((count, *base.shape), dtype=dtype, device=device)
    for j in range(count):
        row = terms[j]
        if deltas is not None:
            delta = deltas[j] if deltas[j].dtype == dtype else deltas[j].to(dtype)
        else:
            delta = torch.sub(donors[j], base, out=row)
        density = 1.0 if densities is None else densities[j]
        mask = None
        if sparsifier is not None:
            mask = mask_for(
                delta,
                sparsifier,
                density,
                gamma=0.0 if gammas is None else gammas[j],
                epsilon=0.0 if epsilons is None else epsilons[j],
                generator=generator,
            )
        if mask is not None:
            apply_mask(delta, mask, rescale, dtype=work_dtype(sparsifier, delta), out=row)
            row.mul_(w[j])
        else:
            torch.mul(delta, w[j], out=row)
        del mask, delta

    weight_shape = (count,) + (1,) * base.dim()
    if consensus:
        # Flip every term by the elected sign s; then the agreeing terms are exactly the positive
        # ones, and clamping at 0 drops the rest. Sums of same-signed terms round symmetrically,
        # so s * sum|agreeing| equals mergekit's sum of masked terms bit for bit, in fewer passes
        # and without casting boolean masks.
        # (torch.where with broadcast operands is several times slower on CPU than these.)
        elected = (terms.sum(dim=0) >= 0).to(dtype).mul_(2).sub_(1)
        flipped = terms.mul_(elected).clamp_(min=0)
        divisor = torch.sign(flipped).mul_(w.reshape(weight_shape)).sum(dim=0)
        divisor.masked_fill_(divisor == 0, 1)
        mixed = flipped.sum(dim=0).mul_(elected)
        del flipped, elected
    else:
        mixed = terms.sum(dim=0)
        divisor = w.sum()
        if divisor.abs() < DIVISOR_EPS:
            divisor = torch.ones_like(divisor)
    del terms

    if normalize:
        mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(base)
