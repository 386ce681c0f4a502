"""Per-tensor kernels of the spherical methods beyond slerp: nuslerp, multislerp, karcher.

Each treats a tensor (or each of its rows) as one vector and interpolates directions on the
unit sphere rather than along straight lines, so that merging does not shrink the norm of
vectors that point different ways. They reproduce mergekit 0.1.5 for one output tensor: the
arithmetic runs in the inputs' (already aligned) dtype, in mergekit's order, so float32 results
agree to rounding and bfloat16 ones round alike. karcher measures its norms and its stopping
tests in float32 (float64 for float64 inputs), as mergekit does.
"""

from __future__ import annotations

from collections.abc import Sequence

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:
    from evomerge.lazy_torch import torch  # imported on first use: see evomerge.lazy_torch

from evomerge.errors import ConfigError
from evomerge.merge.methods import require_floating

#: nuslerp takes t = 1/2 when the two weights sum to less than this in magnitude.
NUSLERP_WEIGHT_EPS = 1e-6
#: nuslerp floors vector norms at this before normalising.
NUSLERP_NORM_FLOOR = 1e-7
#: nuslerp interpolates linearly where 1 - cos^2 is at most this (sin theta below 1e-8).
NUSLERP_COLINEAR = 1e-8**2


def _directions(v: torch.Tensor) -> torch.Tensor:
    """Rows of ``v`` divided by their norms (floored, so zero rows stay zero)."""
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_FLOOR)


def _slerp_rows(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of each row (last axis) of ``v0`` toward ``v1`` by ``t``.

    Norms are interpolated with the directions (the coefficients apply to the raw rows); rows
    that are parallel or antiparallel take the straight line instead, where sin theta vanishes.
    """
    cos = (_directions(v0) * _directions(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= NUSLERP_COLINEAR
    # acos(0) in place of the colinear rows keeps their discarded branch finite
    theta = torch.acos(torch.where(colinear, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * v0 + t * v1, spherical)


def nuslerp_merge(
    donors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: torch.Tensor | None = None,
    row_wise: bool = False,
    flatten: bool = True,
) -> torch.Tensor:
    """Slerp between two models at ``t = w1 / (w0 + w1)`` (1/2 when the weights cancel).

    With a base, the task vectors ``x_i - base`` are interpolated and added back to the base.
    ``flatten`` (the default) treats the tensor as one vector; otherwise each row is one vector,
    or with ``row_wise`` each column (the vectors along the first axis).
    """
    if len(donors) != 2:
        raise ConfigError(
            f"nuslerp merges exactly two models besides the base; got {len(donors)}."
        )
    require_floating("nuslerp", donors[0])
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < NUSLERP_WEIGHT_EPS else weights[1] / total
    v0, v1 = donors if base is None else (donors[0] - base, donors[1] - base)
    shape = v0.shape
    if flatten:
        merged = _slerp_rows(t, v0.reshape(-1), v1.reshape(-1))
    elif row_wise:
        merged = _slerp_rows(t, v0.transpose(0, -1), v1.transpose(0, -1)).transpose(0, -1)
    else:
        merged = _slerp_rows(t, v0, v1)
    merged = merged.reshape(shape)
    return merged if base is None else base + merged


def multislerp_merge(
    donors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: torch.Tensor | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
    tensor_name: str = "",
) -> torch.Tensor:
    """Weighted spherical mean of the donors (of their task vectors when there is a base).

    Each vector is divided by its norm (plus ``eps``); the directions' weighted mean, normalised,
    is the point m where the sphere is flattened: each direction's component orthogonal to m is
    averaged with the weights, and the exponential map at m takes that tangent vector back to
    the sphere. The result has the weighted mean of the norms. One donor is returned as it is.
    Weights are rounded to the tensors' dtype first, as mergekit does. When the directions'
    weighted mean is zero (opposite vectors with equal weights) two donors are averaged
    linearly; more raise ConfigError, as mergekit refuses them.
    """
    require_floating("multislerp", donors[0])
    if len(donors) == 1:
        return donors[0]
    stacked = torch.stack(list(donors), dim=0)
    if base is not None:
        stacked -= base
    vectors = stacked.view(len(donors), -1)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        w = w / w.sum()
    column = w.view(-1, 1)
    norms = torch.linalg.vector_norm(vectors, dim=-1, keepdim=True)
    units = vectors / (norms + eps)
    center = (units * column).sum(0)
    center_norm = torch.linalg.vector_norm(center)
    if center_norm < eps:
        if len(donors) != 2:
            raise ConfigError(
                f"multislerp: the weighted mean direction of {tensor_name or 'a tensor'} is zero "
                "(opposite task vectors with weights that cancel); change the weights."
            )
        merged = (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
        return merged if base is None else merged + base
    center = center / center_norm
    along = (units * center).sum(-1, keepdim=True)
    tangent = ((units - along * center) * column).sum(0)
    length = torch.linalg.vector_norm(tangent) + eps
    on_sphere = center * torch.cos(length) + tangent * (torch.sin(length) / length)
    merged = (on_sphere * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])
    return merged if base is None else merged + base


def karcher_merge(
    tensors: Sequence[torch.Tensor], *, max_iter: int = 10, tol: float = 1e-5
) -> torch.Tensor:
    """Equal-weight Karcher mean of the tensors' directions, times their mean norm.

    The Karcher mean is the point on the unit sphere that minimises the summed squared geodesic
    distances to the directions; it is found by Riemannian gradient steps from their normalised
    (Euclidean) mean: the log map of every direction at the current mean, averaged, is the step,
    taken with the exponential map, until the step is shorter than ``tol`` or ``max_iter`` steps
    are done. Inputs whose norm is at most ``tol`` carry no direction and are left out of the
    mean direction (their norms still count in the scale); all of them that small give zeros.
    Norms and stopping tests are in float32 (float64 for float64 inputs), the steps in the
    inputs' dtype, as in mergekit.
    """
    require_floating("karcher", tensors[0])
    if len(tensors) == 1:
        return tensors[0]
    measure = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    alpha = 1.0 / len(tensors)
    norms = [torch.linalg.vector_norm(x.to(measure)) for x in tensors]
    directions = [
        x / n for x, n in zip(tensors, norms) if n.item() > tol
    ]  # a norm above tol is nonzero, so no direction divides by zero
    if not directions:
        return torch.zeros_like(tensors[0])
    # the equal weights renormalised over the inputs that have a direction (summed as mergekit
    # sums them, so the shares round alike)
    share = alpha / sum([alpha] * len(directions))

    def unit(v: torch.Tensor) -> torch.Tensor:
        return (v / torch.linalg.vector_norm(v.to(measure))).to(v.dtype)

    mean = torch.zeros_like(directions[0])
    for d in directions:
        mean += share * d
    if torch.linalg.vector_norm(mean.to(measure)).item() < tol:
        mean = directions[0].clone()  # the directions cancel: start from one of them
    else:
        mean = unit(mean)
    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for d in directions:
            cos = torch.clamp(torch.dot(mean.flatten(), d.flatten()), -1.0, 1.0)
            angle = torch.arccos(cos)
            if angle.item() < tol:
                continue  # log map of a point at the mean is zero
            step += share * (angle / torch.sin(angle)) * (d - cos * mean)
        length = torch.linalg.vector_norm(step.to(measure))
        if length.item() < tol:
            break
        mean = (torch.cos(length) * mean + torch.sin(length) * (step / length)).to(mean.dtype)
        if torch.linalg.vector_norm(mean.to(measure)).item() > tol:
            mean = unit(mean)
    scale = sum(alpha * n for n in norms)
    return scale * mean
