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

On CPU the merge runs in row chunks that fit in cache (:func:`_merge_in_chunks`): every step
above is elementwise except the sparsifiers' masks and L1 sums, which need the whole tensor and
are computed first. The chunks repeat the whole-tensor ops on slices, so the result is the same
bit for bit, in a few passes over memory instead of some thirty, and with one output-sized
buffer instead of ``count + 3`` of them.
"""

from __future__ import annotations

from collections.abc import Sequence

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:
    from evomerge.lazy_torch import torch  # imported on first use: see evomerge.lazy_torch

from evomerge.merge.methods import require_floating
from evomerge.merge.sparsify import RESCALE_EPS, Sparsifier, apply_mask, mask_for, work_dtype

#: Below this |sum of weights| a non-consensus divisor is taken as 1, as in mergekit.
DIVISOR_EPS = 1e-8
#: Entries per chunk of the chunked CPU merge: each donor's slice of the terms is 256 KiB in
#: float32, so a chunk's terms and temporaries stay in L2 and below glibc's mmap threshold.
CHUNK = 1 << 16


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
    if _chunkable(base, sparsifier):
        return _merge_in_chunks(
            base, donors, weights, sparsifier=sparsifier, consensus=consensus, normalize=normalize,
            rescale=rescale, lambda_=lambda_, densities=densities, gammas=gammas, epsilons=epsilons,
            deltas=deltas, generator=generator,
        )
    return _merge_whole(
        base, donors, weights, sparsifier=sparsifier, consensus=consensus, normalize=normalize,
        rescale=rescale, lambda_=lambda_, densities=densities, gammas=gammas, epsilons=epsilons,
        deltas=deltas, generator=generator,
    )


def _chunkable(base: torch.Tensor, sparsifier: Sparsifier | None) -> bool:
    """Chunk on CPU (on a GPU the whole-tensor ops are already fast, and chunks cost launches),
    for tensors larger than a chunk, when the sparsifier masks in the tensor's own dtype (the
    random ones widen float16 to float32 on CPU; that rare case keeps the whole-tensor path)."""
    if base.device.type != "cpu" or base.numel() <= CHUNK:
        return False
    return sparsifier is None or work_dtype(sparsifier, base) == base.dtype


def _merge_whole(
    base: torch.Tensor,
    donors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sparsifier: Sparsifier | None,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    lambda_: float,
    densities: Sequence[float] | None,
    gammas: Sequence[float] | None,
    epsilons: Sequence[float] | None,
    deltas: Sequence[torch.Tensor] | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The merge on whole tensors, in mergekit's op order: the reference the chunks reproduce."""
    count = len(weights)
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


def _delta(
    j: int, base: torch.Tensor, donors: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor] | None,
    out: torch.Tensor,
) -> torch.Tensor:
    """Donor j's task vector (or a slice of it, for slices of the inputs) written into ``out``."""
    if deltas is not None:
        return out.copy_(deltas[j])
    return torch.sub(donors[j], base, out=out)


def _masks_and_scales(
    base: torch.Tensor,
    donors: Sequence[torch.Tensor],
    count: int,
    *,
    sparsifier: Sparsifier,
    rescale: bool,
    densities: Sequence[float] | None,
    gammas: Sequence[float] | None,
    epsilons: Sequence[float] | None,
    deltas: Sequence[torch.Tensor] | None,
    generator: torch.Generator | None,
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """First pass: each donor's keep-mask and L1 rescale factor, which need the whole tensor.

    One buffer holds |delta_j| for each donor in turn: every sparsifier ranks magnitudes only
    (the random one ignores values), so the masks are those of the deltas themselves, drawn in
    the same donor order from the generator. The L1 sums are the same full-tensor sums as in
    :func:`~evomerge.merge.sparsify.apply_mask` (|delta * mask| is |delta| * mask exactly), so
    the factors agree bit for bit.
    """
    magnitudes = torch.empty_like(base)
    masks: list[torch.Tensor | None] = []
    factors: list[torch.Tensor | None] = []
    for j in range(count):
        _delta(j, base, donors, deltas, magnitudes).abs_()
        mask = mask_for(
            magnitudes,
            sparsifier,
            1.0 if densities is None else densities[j],
            gamma=0.0 if gammas is None else gammas[j],
            epsilon=0.0 if epsilons is None else epsilons[j],
            generator=generator,
            nonnegative=True,
        )
        factor = None
        if mask is not None and rescale:
            before = magnitudes.sum()
            after = torch.mul(magnitudes, mask, out=magnitudes).sum()
            if not (before < RESCALE_EPS or after < RESCALE_EPS):
                factor = before / after
        masks.append(mask)
        factors.append(factor)
    return masks, factors


def _merge_in_chunks(
    base: torch.Tensor,
    donors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sparsifier: Sparsifier | None,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    lambda_: float,
    densities: Sequence[float] | None,
    gammas: Sequence[float] | None,
    epsilons: Sequence[float] | None,
    deltas: Sequence[torch.Tensor] | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """:func:`_merge_whole`, bit for bit, computed chunk by chunk of the flattened tensors.

    Masks and rescale factors come first (:func:`_masks_and_scales`); then each chunk of
    ``CHUNK`` entries runs the whole-tensor ops on slices, so the terms of all donors for that
    chunk never leave the cache. Elementwise ops round per entry whatever the slice, and the one
    reduction in a chunk (the sum over donors) runs over the same axis in the same order.
    """
    count = len(weights)
    dtype = base.dtype
    flat_base = base.reshape(-1)
    flat_donors = None if deltas is not None else [d.reshape(-1) for d in donors]
    flat_deltas = None if deltas is None else [d.reshape(-1) for d in deltas]
    masks: list[torch.Tensor | None] = [None] * count
    factors: list[torch.Tensor | None] = [None] * count
    if sparsifier is not None:
        # in the tensors' own shapes: della ranks within rows
        masks, factors = _masks_and_scales(
            base, donors, count, sparsifier=sparsifier, rescale=rescale,
            densities=densities, gammas=gammas, epsilons=epsilons, deltas=deltas, generator=generator,
        )
        masks = [None if m is None else m.reshape(-1) for m in masks]
    w = torch.tensor(list(weights), dtype=dtype)
    weight_column = w.reshape(count, 1)
    divisor_all = None
    if not consensus:
        divisor_all = w.sum()
        if divisor_all.abs() < DIVISOR_EPS:
            divisor_all = torch.ones_like(divisor_all)
    out = torch.empty_like(flat_base)
    n = flat_base.numel()
    scratch = torch.empty((count, min(CHUNK, n)), dtype=dtype)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        terms = scratch[:, : stop - start]
        b = flat_base[start:stop]
        for j in range(count):
            row = terms[j]
            if flat_deltas is not None:
                row.copy_(flat_deltas[j][start:stop])
            else:
                torch.sub(flat_donors[j][start:stop], b, out=row)
            mask = masks[j]
            if mask is not None:
                row.mul_(mask[start:stop])
                if factors[j] is not None:
                    row.mul_(factors[j])
            row.mul_(w[j])
        _combine(terms, b, weight_column, divisor_all, consensus=consensus, normalize=normalize,
                 lambda_=lambda_, out=out[start:stop])
    return out.reshape(base.shape)


#: Up to this many rows, torch's CPU sum over dim 0 adds the rows one after the other in its
#: accumulation dtype; :func:`sum_rows` relies on it (more rows: torch.sum itself, which then
#: groups float32 rows otherwise, as the tests show from 5 rows on).
SEQUENTIAL_ROWS = 4


def sum_rows(terms: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.sum(terms, dim=0, out=out)``, bit for bit, several times faster on CPU.

    torch reduces a short leading dim with a generic outer-reduction kernel that costs 5-20x an
    elementwise add here. Its result is the rows added in order in the accumulation dtype
    (float32 for 16-bit floats, the dtype itself otherwise) and rounded once, which row adds
    reproduce exactly. ``scratch`` is an optional float32 buffer like ``out`` for 16-bit terms.
    """
    count = terms.shape[0]
    if terms.device.type != "cpu" or count > SEQUENTIAL_ROWS or count < 1:
        return torch.sum(terms, dim=0, out=out)
    if terms.element_size() >= 4:
        if count == 1:
            return out.copy_(terms[0])
        torch.add(terms[0], terms[1], out=out)
        for j in range(2, count):
            out.add_(terms[j])
        return out
    acc = torch.empty(out.shape, dtype=torch.float32) if scratch is None else scratch
    acc.copy_(terms[0])
    for j in range(1, count):
        acc.add_(terms[j])
    return out.copy_(acc)


def _combine(
    terms: torch.Tensor,
    base: torch.Tensor,
    weight_column: torch.Tensor,
    divisor_all: torch.Tensor | None,
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    out: torch.Tensor,
) -> None:
    """Steps 3 to 5 of the module docstring for one chunk of weighted terms, into ``out``."""
    if consensus:
        elected = sum_rows(terms, torch.empty_like(out)).ge_(0).mul_(2).sub_(1)
        flipped = terms.mul_(elected).clamp_(min=0)
        divisor = sum_rows(torch.sign(flipped).mul_(weight_column), torch.empty_like(out))
        divisor.masked_fill_(divisor == 0, 1)
        sum_rows(flipped, out).mul_(elected)
    else:
        sum_rows(terms, out)
        divisor = divisor_all
    if normalize:
        out.div_(divisor)
    if lambda_ != 1:
        out.mul_(lambda_)
    out.add_(base)
