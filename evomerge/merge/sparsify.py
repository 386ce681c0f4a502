"""Sparsifiers for task vectors: which entries of a delta survive, and how survivors are rescaled.

These reproduce mergekit 0.1.5's ``mergekit/sparsify.py`` (the ground truth for what an exported
recipe means), written independently and faster:

- ``magnitude`` (ties): keep exactly ``k = max(1, int(density * numel))`` entries of largest
  ``|delta|`` over the whole tensor. mergekit takes the first ``k`` of
  ``torch.argsort(|delta|, descending=True)``; we find the threshold by selection (a sample
  brackets it, a selection finishes it), and when exactly ``k`` entries reach it the kept
  set is determined and no sort is needed. When entries *tie* at the threshold and only some of
  them fit, which ones mergekit keeps is the order its unstable argsort leaves them in: on CPU
  that is x86-simd-sort's (AVX2/AVX-512) quicksort, whose tie order depends on the whole tensor
  and on the CPU, so nothing short of the same sort can reproduce it. Then, and only then, we run
  mergekit's own sort call on mergekit's own input (magnitudes in float32 on CPU, in the tensor's
  dtype elsewhere): the same bits on the same torch build and CPU, by construction. Task vectors
  of bfloat16 and float16 checkpoints tie at almost every threshold, so they take this path.
- ``magnitude_outliers`` (breadcrumbs): drop the ``int(gamma * numel)`` largest entries and enough
  of the smallest that ``int(density * numel)`` remain. Same selection, and mergekit's ascending
  sort where ties straddle either edge of the kept band.
- ``random`` (DARE): Bernoulli(density) mask.
- ``della_magprune`` (DELLA): per row, keep-probability rising linearly with the magnitude rank
  from ``density - epsilon`` to ``density + epsilon``.

Survivors are optionally rescaled so the L1 norm of the delta is preserved (``rescale=True``),
which is what current mergekit does for every sparsifier, rather than DARE's 1/density.

Random sparsifiers take a ``torch.Generator`` (on the tensor's device) so a seed reproduces a
result. Parity with mergekit for DARE and DELLA is statistical (kept fraction, keep probability
per rank, rescale), not bitwise: mergekit draws ``torch.bernoulli`` from the *global* torch RNG in
the order it happens to visit tensors, which no other program can replay anyway; we draw one
float32 uniform per entry and keep it when below its probability, the same law at a quarter of
``torch.bernoulli``'s cost on CPU.

Dtypes follow mergekit: masking and rescaling run in the delta's dtype, except that the random
sparsifiers work in float32 on CPU for every dtype but bfloat16 (mergekit's choice, because
``torch.bernoulli`` lacks a CPU float16 kernel), and cast back.
"""

from __future__ import annotations

import enum

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:
    from evomerge.lazy_torch import torch  # imported on first use: see evomerge.lazy_torch

from evomerge.errors import ConfigError
from evomerge.merge.scratch import current_scratch

#: Norms below this are treated as zero, so a rescale never divides by (almost) nothing.
RESCALE_EPS = 1e-7
#: Below this many entries, a selection over all of them is cheap enough; above it, sample first.
SAMPLE_SELECT_MIN = 1 << 17
#: Size of the strided sample that brackets the k-th value.
SAMPLE_SIZE = 1 << 14
#: Half-width of the bracket, in standard deviations of a sample quantile's position (at most
#: sqrt(SAMPLE_SIZE) / 2): 4 * 2 = 8 sigma, so random layouts essentially never fall back.
SAMPLE_MARGIN = 4.0


class Sparsifier(str, enum.Enum):
    """mergekit's sparsification methods, by mergekit's own names."""

    MAGNITUDE = "magnitude"
    RANDOM = "random"
    MAGNITUDE_OUTLIERS = "magnitude_outliers"
    DELLA_MAGPRUNE = "della_magprune"


# --------------------------------------------------------------------------------------------
# Selection: masks of exactly-counted top entries, without sorting the tensor.
# --------------------------------------------------------------------------------------------


def _selection_view(tensor: torch.Tensor, nonnegative: bool = False) -> torch.Tensor:
    """Flat magnitudes to rank (one temporary, none when the caller passes magnitudes already;
    kthvalue works in every float dtype)."""
    return tensor.detach().reshape(-1) if nonnegative else tensor.detach().abs().reshape(-1)


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry (1-based) of the 1-D ``values``, as a 0-d tensor; ``1 <= k <= n``.

    Equal to ``torch.kthvalue(values, n - k + 1).values``, but for large tensors much cheaper:
    kthvalue copies and partitions the whole tensor, while here a sorted strided sample brackets
    the answer in an interval [lo, hi], a count above hi and the entries within confirm that the
    k-th largest lies in it, and the selection (:func:`_kth_smallest`) runs only on those few
    entries. When the bracket misses (adversarial layouts, heavy ties) it falls back to the
    selection on everything, so the answer is always exact.
    NaNs are not supported (task vectors of finite models have none).
    """
    n = values.numel()
    if n < SAMPLE_SELECT_MIN:
        return _kth_smallest(values, n - k + 1)
    sample = values[:: max(1, n // SAMPLE_SIZE)].sort().values
    s = sample.numel()
    position = s - k * s / n  # where the k-th largest falls in the ascending sample
    margin = SAMPLE_MARGIN * s**0.5 + 2
    lo = sample[max(0, int(position - margin))]
    hi = sample[min(s - 1, int(position + margin))]
    above_hi = int(torch.count_nonzero(values > hi))
    if above_hi < k:
        in_band = (values >= lo).logical_and_(values <= hi)
        band = values[in_band]  # boolean indexing: ~3x faster than masked_select on CPU
        del in_band
        rank = k - above_hi  # of the k-th largest, counted from the top of the band
        if rank <= band.numel():  # else fewer than k entries are >= lo: lo is too high
            return _kth_smallest(band, band.numel() - rank + 1)
    return _kth_smallest(values, n - k + 1)


def _kth_smallest(values: torch.Tensor, j: int) -> torch.Tensor:
    """``torch.kthvalue(values, j).values`` for the 1-D ``values``: the same number, since the
    j-th order statistic does not depend on how it is found. On CPU numpy's introselect finds it
    some 20-30x faster than torch's kthvalue (measured on 32K float32 entries, one thread: 0.05
    against 1.45 ms), which was most of a TIES merge of a small model (every tensor of the toy
    world is below SAMPLE_SELECT_MIN, so each donor's delta went through kthvalue whole)."""
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64, torch.float16):
        import numpy as np  # here, not at the top: the merge engine's imports stay as they are

        array = values.detach().numpy()  # numpy has no bfloat16: that dtype keeps kthvalue
        return torch.from_numpy(np.partition(array, j - 1)[j - 1 : j]).reshape(())
    return torch.kthvalue(values, j).values


def _determined_top_k(values: torch.Tensor, k: int) -> torch.Tensor | None:
    """Mask of the ``k`` largest entries of the 1-D ``values`` when that set is determined by the
    values alone (no tie at the threshold straddles rank ``k``); None when it is not."""
    n = values.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=values.device)
    mask = values >= kth_largest(values, k)
    return mask if int(torch.count_nonzero(mask)) == k else None


def _sort_input(values: torch.Tensor) -> torch.Tensor:
    """What mergekit sorts: the magnitudes in float32 on CPU, in their own dtype elsewhere."""
    return values.float() if values.device.type == "cpu" else values


def _mask_of(indices: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool, device=indices.device)
    mask[indices] = True
    return mask


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` entries of the 1-D ``values`` that mergekit's TIES keeps.

    Selection finds them when no tie straddles the threshold; otherwise mergekit's own
    ``argsort(descending=True)[:k]`` decides which tied entries are kept (module docstring).
    """
    mask = _determined_top_k(values, k)
    if mask is not None:
        return mask
    order = torch.argsort(_sort_input(values), descending=True)
    return _mask_of(order[:k], values.numel())


def _ascending_band_mask(values: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Mask of the entries at ascending ranks ``[start, stop)`` of the 1-D ``values``, as
    mergekit's breadcrumbs keeps them (``sort(ascending).indices[start:stop]``)."""
    n = values.numel()
    # Ascending ranks [start, stop) are the top n - start minus the top n - stop.
    upper = _determined_top_k(values, n - start)
    lower = _determined_top_k(values, n - stop) if upper is not None else None
    if upper is not None and lower is not None:
        return upper.logical_and_(lower.logical_not_())
    order = torch.sort(_sort_input(values), descending=False).indices
    return _mask_of(order[start:stop], n)


def magnitude_mask(tensor: torch.Tensor, density: float, *, nonnegative: bool = False) -> torch.Tensor | None:
    """Mask keeping the ``max(1, int(density * numel))`` largest ``|tensor|``; None keeps all.

    Mirrors mergekit: density >= 1 keeps everything; density <= 0 (or an empty tensor) keeps
    nothing; any positive density keeps at least one entry. (mergekit-semantics.md says k = 0 is an
    error; mergekit 0.1.5 clamps k to 1 instead.)
    """
    if density >= 1:
        return None
    numel = tensor.numel()
    if density <= 0 or numel == 0:
        return torch.zeros(tensor.shape, dtype=torch.bool, device=tensor.device)
    k = max(1, int(density * numel))
    return top_k_mask(_selection_view(tensor, nonnegative), k).reshape(tensor.shape)


def magnitude_outliers_mask(
    tensor: torch.Tensor, density: float, gamma: float, *, nonnegative: bool = False
) -> torch.Tensor | None:
    """Breadcrumbs: drop the ``int(gamma * numel)`` largest, keep ``int(density * numel)`` below.

    mergekit sorts ascending and keeps ``sorted[n_bot : n_bot + target]`` with
    ``n_bot = max(0, numel - target - n_top)``; we keep the same band of ranks, including Python's
    slice rules for out-of-range bounds. Consequences worth knowing (all mirrored):
    when ``target + n_top > numel`` the outlier cut shrinks so ``target`` entries remain; when
    ``int(gamma * numel) == 0`` no outliers are dropped (mergekit-semantics.md describes an older
    mergekit that zeroed the whole delta here; 0.1.5 does not); ``int(density * numel) == 0`` keeps
    nothing. density >= 1 keeps everything, outliers included.
    """
    if density >= 1:
        return None
    numel = tensor.numel()
    target = int(density * numel)
    n_top = int(gamma * numel)
    n_bot = max(0, numel - target - n_top)
    kept = range(numel)[n_bot : n_bot + target]  # ascending ranks, normalised like a slice
    if len(kept) == 0:
        return torch.zeros(tensor.shape, dtype=torch.bool, device=tensor.device)
    mask = _ascending_band_mask(_selection_view(tensor, nonnegative), kept.start, kept.stop)
    return mask.reshape(tensor.shape)


# --------------------------------------------------------------------------------------------
# Random masks.
# --------------------------------------------------------------------------------------------


def random_work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype mergekit's random sparsifiers compute in (float32 on CPU unless bfloat16)."""
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16:
        return tensor.dtype
    return torch.float32


def _uniform(tensor: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One float32 uniform in [0, 1) per entry (float32 even for bfloat16: no coarse quantiles)."""
    scratch = current_scratch() if tensor.device.type == "cpu" else None
    if scratch is None:
        return torch.rand(tensor.shape, generator=generator, device=tensor.device, dtype=torch.float32)
    # the same draws into a kept buffer (see evomerge.merge.scratch): slot 9, apart from slerp's
    out = scratch.take(9, tensor.numel(), torch.float32).view(tensor.shape)
    return torch.rand(tensor.shape, generator=generator, dtype=torch.float32, out=out)


def bernoulli_mask(
    tensor: torch.Tensor, density: float, generator: torch.Generator | None = None
) -> torch.Tensor | None:
    """DARE's mask: each entry kept independently with probability ``density``; None keeps all.

    Raises ConfigError for a density below 0, where mergekit crashes in ``torch.bernoulli``.
    """
    if density >= 1:
        return None
    if density < 0:
        raise ConfigError(
            f"density must be within [0, 1] for DARE; got {density} (mergekit would crash)."
        )
    return _uniform(tensor, generator) < density


def _sortable(magnitudes: torch.Tensor) -> torch.Tensor:
    """Non-negative floats as same-width integers, whose order is theirs: CPU sorts ints ~1.5x
    faster. (GPU sorts floats by radix already.)"""
    if magnitudes.device.type != "cpu":
        return magnitudes
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return magnitudes.view(ints[magnitudes.element_size()])


def della_mask(
    tensor: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """DELLA's MagPrune mask, shaped like ``tensor``; None keeps all.

    Rows are along dim 1 (1-D tensors are one row), as in mergekit. Within a row of n entries the
    entry of ascending magnitude rank r (0-based) is kept with probability
    ``density - epsilon + 2 * epsilon * r / (n - 1)``, computed with mergekit's float steps in
    its work dtype (bfloat16 rounds large ranks). mergekit ranks with two argsorts; one argsort
    suffices here. Ties share no rank: which tied entry gets the higher probability is arbitrary
    in mergekit too.

    Raises ConfigError where mergekit crashes: ``density +/- epsilon`` outside (0, 1), or rows of
    a single entry (mergekit's rank normalisation divides 0 by 0 there).
    """
    if density >= 1:
        return None
    if density <= 0:
        return torch.zeros(tensor.shape, dtype=torch.bool, device=tensor.device)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ConfigError(
            f"della needs density - epsilon > 0 and density + epsilon < 1; got density={density}, "
            f"epsilon={epsilon}. Lower epsilon or move density away from 0 and 1."
        )
    work_dtype = random_work_dtype(tensor)
    rows = tensor.unsqueeze(0) if tensor.dim() < 2 else tensor
    n = rows.shape[1]
    if n < 2 and rows.numel() > 0:
        raise ConfigError(
            f"della cannot rank a tensor of shape {tuple(tensor.shape)}: its rows have one entry "
            "(mergekit crashes on it). Use another method for this tensor (e.g. a filter)."
        )
    order = _sortable(rows.detach().abs()).argsort(dim=1)
    # The keep probability of each rank, with mergekit's float steps (1-based ranks normalised by
    # the rounded largest rank, in its work dtype). It depends on the rank only, so decide in
    # sorted order (one uniform per entry, compared with its rank's probability) and scatter the
    # decisions back: no per-entry rank or probability tensors.
    ranks = torch.arange(n, device=rows.device).to(work_dtype).add_(1)
    span = torch.tensor(n - 1, device=rows.device).to(work_dtype).add(1).sub(1)
    probs = ranks.sub_(1).div_(span).clamp_(0, 1).mul_(2).mul_(epsilon).add_(density - epsilon)
    position_shape = [1] * rows.dim()
    position_shape[1] = n
    keep_sorted = _uniform(rows, generator) < probs.reshape(position_shape)
    mask = torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)
    return mask.reshape(tensor.shape)


# --------------------------------------------------------------------------------------------
# Applying a mask.
# --------------------------------------------------------------------------------------------


def work_dtype(method: Sparsifier, tensor: torch.Tensor) -> torch.dtype:
    """The dtype mergekit masks and rescales ``tensor`` in, for sparsifier ``method``."""
    if method in (Sparsifier.RANDOM, Sparsifier.DELLA_MAGPRUNE):
        return random_work_dtype(tensor)
    return tensor.dtype


def mask_for(
    tensor: torch.Tensor,
    method: Sparsifier,
    density: float,
    *,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    generator: torch.Generator | None = None,
    nonnegative: bool = False,
) -> torch.Tensor | None:
    """The boolean keep-mask of sparsifier ``method`` for ``tensor``; None keeps everything.

    ``nonnegative`` says ``tensor`` holds magnitudes already (every sparsifier ranks |tensor|),
    which saves the magnitude sparsifiers a tensor-sized temporary.
    """
    if method is Sparsifier.MAGNITUDE:
        return magnitude_mask(tensor, density, nonnegative=nonnegative)
    if method is Sparsifier.MAGNITUDE_OUTLIERS:
        return magnitude_outliers_mask(tensor, density, gamma, nonnegative=nonnegative)
    if method is Sparsifier.RANDOM:
        return bernoulli_mask(tensor, density, generator)
    return della_mask(tensor, density, epsilon, generator)


def apply_mask(
    tensor: torch.Tensor,
    mask: torch.Tensor,
    rescale: bool,
    *,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``tensor * mask``, L1-rescaled to ``tensor``'s norm when ``rescale``.

    Computed in ``dtype`` (default: ``tensor``'s; see :func:`work_dtype`) and written to ``out``
    (cast to its dtype) when given, which lets the task-vector merge fill its buffer without a
    temporary. ``out`` may alias ``tensor`` (masking in place); otherwise ``tensor`` is not
    modified. The rescale is skipped when either norm is below ``RESCALE_EPS``, as in mergekit.
    """
    compute = tensor.dtype if dtype is None else dtype
    work = tensor.to(compute)
    # Measured before masking: ``out`` may be ``tensor`` itself.
    before = work.abs().sum() if rescale else None
    if out is not None and out.dtype == compute:
        masked = torch.mul(work, mask, out=out)
    else:
        masked = work * mask
    if before is not None:
        after = masked.abs().sum()
        if not (before < RESCALE_EPS or after < RESCALE_EPS):
            masked.mul_(before / after)
    if out is not None and masked is not out:
        out.copy_(masked)
        return out
    return masked


def sparsify(
    tensor: torch.Tensor,
    method: Sparsifier | str,
    density: float,
    *,
    rescale: bool = False,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sparsify one task vector; returns ``tensor`` itself when nothing is dropped (density >= 1).

    The result has ``tensor``'s dtype. ``gamma`` is used by magnitude_outliers only, ``epsilon``
    by della_magprune only, ``generator`` by the random methods only.
    """
    method = Sparsifier(method)
    mask = mask_for(tensor, method, density, gamma=gamma, epsilon=epsilon, generator=generator)
    if mask is None:
        return tensor
    masked = apply_mask(tensor, mask, rescale, dtype=work_dtype(method, tensor))
    return masked.to(tensor.dtype)
