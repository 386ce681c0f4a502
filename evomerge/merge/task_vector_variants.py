"""Task-vector methods that weigh donors by the task vectors themselves: sce, ram, ramplus_tl.

Unlike the task-vector family (:mod:`evomerge.merge.task_vectors`) these take no per-donor
weights: SCE derives a weight per donor from its task vector's mean square, RAM averages only
where several donors changed an entry. They reproduce mergekit 0.1.5 for one output tensor,
computing on the stacked task vectors in the inputs' dtype in mergekit's order (reductions over
the donors are single ``sum`` calls over the stack, so low-precision sums round alike).
``deltas``, when given, are the donors' precomputed task vectors (search workers keep them).
"""

from __future__ import annotations

from collections.abc import Sequence

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:
    from evomerge.lazy_torch import torch  # imported on first use: see evomerge.lazy_torch

from evomerge.merge.methods import require_floating

#: SCE's weights fall back to equal shares when the donors' mean squares sum below this.
SCE_WEIGHT_EPS = 1e-6
#: SCE's floor on the sum of the surviving weights of an entry.
SCE_DIVISOR_FLOOR = 1e-6


def _stacked_task_vectors(
    base: torch.Tensor, donors: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor] | None
) -> torch.Tensor:
    if deltas is not None:
        return torch.stack(list(deltas), dim=0)
    return torch.stack([x - base for x in donors], dim=0)


def sce_merge(
    base: torch.Tensor,
    donors: Sequence[torch.Tensor],
    *,
    select_topk: float = 1.0,
    int8_mask: bool = False,
    deltas: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """SCE: select, calculate, erase, then merge the task vectors.

    1. Select: below ``select_topk`` 1, keep only the ``int(select_topk * n)`` entries with the
       largest variance across donors (n counts entries of nonzero variance), in every donor.
    2. Calculate: donor i's weight is the mean of its squared (selected) task vector, divided by
       the sum over donors (equal weights when that sum is below 1e-6).
    3. Erase: per entry, drop the donors whose sign disagrees with the sign of the sum of the
       task vectors (zero counts as positive; zero entries never agree).
    4. Each entry is the weighted mean of its surviving task-vector entries (weights summed,
       floored at 1e-6), added to the base.
    ``int8_mask`` (mergekit's memory option) does not change the result.
    """
    if not donors:
        return base
    require_floating("sce", base)
    vectors = _stacked_task_vectors(base, donors, deltas)
    if select_topk < 1:
        vectors = vectors * _high_variance_mask(vectors, select_topk).unsqueeze(0)
    # step 3: signs are compared as booleans, which is what int8_mask's int8 signs give too
    elected = vectors.sum(dim=0) >= 0
    agree = vectors.sign() == torch.where(elected, 1, -1).to(vectors.dtype)
    weights = _energy_weights(vectors)
    while weights.dim() < vectors.dim():
        weights = weights.unsqueeze(-1)
    kept = weights * agree
    mixed = (vectors * kept).sum(dim=0)
    return base + mixed / torch.sum(kept, dim=0).clamp(min=SCE_DIVISOR_FLOOR)


def _high_variance_mask(vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 at the entries whose task vectors vary most across donors, 0 elsewhere (in the task
    vectors' dtype): ``int(fraction * n)`` of them, n the entries of nonzero variance."""
    if fraction <= 0:
        return torch.zeros_like(vectors[0])
    variance = torch.var(vectors, dim=0, unbiased=False)
    # the count times the fraction is a float32 product, as in mergekit: it decides k
    k = int(torch.count_nonzero(variance) * fraction)
    mask = torch.zeros_like(variance)
    if k > 0:
        mask.view(-1)[torch.topk(variance.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def _energy_weights(vectors: torch.Tensor) -> torch.Tensor:
    """Each donor's mean squared task-vector entry, as a share of the donors' total."""
    energy = vectors.square().reshape(vectors.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    if abs(total) < SCE_WEIGHT_EPS:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


def _ram_terms(
    base: torch.Tensor,
    donors: Sequence[torch.Tensor],
    epsilon: float,
    deltas: Sequence[torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat task vectors with entries at most ``epsilon`` zeroed, and per entry: which donors
    changed it, how many did, and whether one (unique) or several (shared) did."""
    vectors = _stacked_task_vectors(base, donors, deltas)
    flat = vectors.view(vectors.shape[0], -1)
    changed = flat.abs() > epsilon
    count = changed.sum(dim=0, keepdim=True)
    return flat * changed, changed, count, count > 1, count == 1


def ram_merge(
    base: torch.Tensor,
    donors: Sequence[torch.Tensor],
    *,
    epsilon: float = 1e-5,
    deltas: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """RAM: an entry changed (|task vector| > ``epsilon``) by exactly one donor takes that
    donor's change; one changed by several takes the mean of their changes; the rest stay."""
    if not donors:
        return base
    require_floating("ram", base)
    changes, _, count, shared, unique = _ram_terms(base, donors, epsilon, deltas)
    merged = ((changes * unique) + (changes * shared / count.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ramplus_tl_merge(
    base: torch.Tensor,
    donors: Sequence[torch.Tensor],
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
    deltas: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """RAM+ within each tensor: as :func:`ram_merge`, but each donor's unique changes are scaled
    by ``1 + r * min(alpha, rho)``, rho its shared-to-unique count ratio in this tensor, so a
    donor whose changes mostly overlap others' keeps more of what only it changed.

    The boost is float32 (counts divided by a float floor), so low-precision inputs give a
    float32 result, as in mergekit; the executor casts it to the output dtype.
    """
    if not donors:
        return base
    require_floating("ramplus_tl", base)
    changes, changed, count, shared, unique = _ram_terms(base, donors, epsilon, deltas)
    shared_count = (changed & shared).sum(dim=1)
    unique_count = (changed & unique).sum(dim=1)
    rho = shared_count / unique_count.clamp(min=epsilon)
    boost = 1 + r * rho.clamp(min=0, max=alpha)
    merged = (
        (changes * unique * boost.unsqueeze(-1)) + (changes * shared / count.clamp(min=1))
    ).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)
