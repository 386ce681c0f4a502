"""The eight methods mergekit 0.1.5 added (nuslerp, multislerp, karcher, sce, ram, ramplus_tl,
nearswap, arcee_fusion): each against a plain float64 NumPy computation written from the method's
description, and against mergekit's own kernel on the same tensors, bit for bit in float32,
bfloat16 and float16 (karcher, an iteration, within a stated tolerance as well as exactly here).

The references loop over models and entries in float64 and use none of evomerge's or mergekit's
helpers; they follow the papers' and descriptions' formulas, so an error shared by both
implementations would still show.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.merge.registry import MergeInputs, get_method

SHAPE = (6, 10)


def gaussian(seed: int, shape: tuple[int, ...] = SHAPE, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.fixture
def models() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and three donors that differ from it by small, sign-mixed task vectors."""
    base = gaussian(0)
    return base, [base + gaussian(s, scale=0.05) for s in (1, 2, 3)]


def run(name: str, entries: Sequence[torch.Tensor], base_index: int | None,
        per_input: Sequence[dict[str, Any]], shared: dict[str, Any] | None = None) -> torch.Tensor:
    return get_method(name).merge(MergeInputs(list(entries), base_index, per_input, shared or {}))


def f64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


# ---------------------------------------------------------------- plain references ----------


def np_slerp(v0: np.ndarray, v1: np.ndarray, t: float) -> np.ndarray:
    """Shoemake's slerp of two vectors, norms interpolated with the angle; a line when parallel."""
    cos = np.dot(v0, v1) / (np.linalg.norm(v0) * np.linalg.norm(v1))
    cos = min(1.0, max(-1.0, cos))
    if 1 - cos * cos <= 1e-16:
        return (1 - t) * v0 + t * v1
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def np_nuslerp(donors, weights, base=None, *, flatten=True, row_wise=False) -> np.ndarray:
    t = weights[1] / (weights[0] + weights[1])
    v0, v1 = (donors if base is None else [d - base for d in donors])
    if flatten:
        out = np_slerp(v0.reshape(-1), v1.reshape(-1), t).reshape(v0.shape)
    elif row_wise:  # the vectors along the first axis: columns of a matrix
        out = np.stack([np_slerp(v0[:, j], v1[:, j], t) for j in range(v0.shape[1])], axis=1)
    else:
        out = np.stack([np_slerp(v0[i], v1[i], t) for i in range(v0.shape[0])])
    return out if base is None else base + out


def np_multislerp(donors, weights, base=None) -> np.ndarray:
    """Barycentric interpolation on the sphere: tangent space at the normalised weighted mean
    of the unit vectors, weighted mean of the log-ish projections, exponential map back, times
    the weighted mean norm (Goddard's multislerp)."""
    vs = [(d if base is None else d - base).reshape(-1) for d in donors]
    w = np.array(weights) / sum(weights)
    norms = [np.linalg.norm(v) for v in vs]
    units = [v / n for v, n in zip(vs, norms)]
    m = sum(wi * u for wi, u in zip(w, units))
    m = m / np.linalg.norm(m)
    tangent = sum(wi * (u - np.dot(u, m) * m) for wi, u in zip(w, units))
    length = np.linalg.norm(tangent)
    point = m * math.cos(length) + tangent * (math.sin(length) / length)
    out = (point * sum(wi * n for wi, n in zip(w, norms))).reshape(donors[0].shape)
    return out if base is None else base + out


def np_karcher(tensors, steps: int = 500) -> np.ndarray:
    """The point on the unit sphere minimising the summed squared geodesic distances to the
    tensors' directions, by Riemannian gradient descent to convergence, times the mean norm."""
    vs = [t.reshape(-1) for t in tensors]
    norms = [np.linalg.norm(v) for v in vs]
    units = [v / n for v, n in zip(vs, norms)]
    m = sum(units) / np.linalg.norm(sum(units))
    for _ in range(steps):
        grad = np.zeros_like(m)
        for u in units:
            c = min(1.0, max(-1.0, float(np.dot(m, u))))
            angle = math.acos(c)
            if angle > 1e-15:
                grad += (angle / math.sin(angle)) * (u - c * m) / len(units)
        g = np.linalg.norm(grad)
        if g < 1e-15:
            break
        m = math.cos(g) * m + math.sin(g) * grad / g
        m /= np.linalg.norm(m)
    return (np.mean(norms) * m).reshape(tensors[0].shape)


def np_sce(base, donors, topk: float) -> np.ndarray:
    deltas = np.stack([(d - base).reshape(-1) for d in donors])
    n = deltas.shape[1]
    if topk < 1:
        var = deltas.var(axis=0)
        k = int(np.count_nonzero(var) * topk)
        keep = np.zeros(n)
        keep[np.argsort(-var, kind="stable")[:k]] = 1
        deltas = deltas * keep
    energy = (deltas**2).mean(axis=1)
    w = energy / energy.sum()
    out = np.zeros(n)
    for j in range(n):
        elected = 1.0 if deltas[:, j].sum() >= 0 else -1.0
        agree = [i for i in range(len(donors)) if np.sign(deltas[i, j]) == elected]
        total = max(sum(w[i] for i in agree), 1e-6)
        out[j] = sum(w[i] * deltas[i, j] for i in agree) / total
    return base + out.reshape(base.shape)


def np_ram(base, donors, epsilon: float, r: float | None = None, alpha: float = 0.0) -> np.ndarray:
    """RAM: unique changes kept, shared ones averaged. With ``r`` (RAM+, per tensor), each
    donor's unique changes are scaled by 1 + r * min(alpha, shared count / unique count)."""
    deltas = [(d - base).reshape(-1) for d in donors]
    n = deltas[0].size
    changed = [[abs(d[j]) > epsilon for j in range(n)] for d in deltas]
    count = [sum(c[j] for c in changed) for j in range(n)]
    boost = [1.0] * len(donors)
    if r is not None:
        for i, c in enumerate(changed):
            shared = sum(1 for j in range(n) if c[j] and count[j] > 1)
            unique = sum(1 for j in range(n) if c[j] and count[j] == 1)
            boost[i] = 1 + r * min(alpha, shared / max(unique, epsilon))
    out = np.zeros(n)
    for j in range(n):
        for i, d in enumerate(deltas):
            if changed[i][j]:
                out[j] += d[j] * boost[i] if count[j] == 1 else d[j] / count[j]
    return base + out.reshape(base.shape)


def np_nearswap(base, other, t: float) -> np.ndarray:
    out = base.copy()
    for idx in np.ndindex(base.shape):
        gap = abs(base[idx] - other[idx])
        share = 1.0 if gap <= t else t / gap
        out[idx] = base[idx] + share * (other[idx] - base[idx])
    return out


def np_arcee_fusion(base, other) -> np.ndarray:
    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(other) + 1e-8, softmax(base) + 1e-8
    kl = (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    importance = np.abs(other - base) * kl
    ranked = np.sort(importance.reshape(-1))
    q1, med, q3 = (ranked[int(math.floor(f * (ranked.size - 1)))] for f in (0.25, 0.5, 0.75))
    return np.where(importance >= med + 1.5 * (q3 - q1), other, base)


# ---------------------------------------------------------------- against references --------


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("flatten, row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_matches_slerp_of_the_two_models(models, with_base, flatten, row_wise) -> None:
    base, donors = models
    # without a base the models themselves are interpolated: take two unrelated ones, so that no
    # row is nearly (anti)parallel and float32 angles are well conditioned
    a, b = donors[0], donors[1] if with_base else gaussian(9)
    shared = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    if with_base:
        out = run("nuslerp", [base, a, b], 0, [{}, {"weight": 0.3}, {"weight": 0.9}], shared)
        expected = np_nuslerp([f64(a), f64(b)], [0.3, 0.9], f64(base), flatten=flatten, row_wise=row_wise)
    else:
        out = run("nuslerp", [a, b], None, [{"weight": 0.3}, {"weight": 0.9}], shared)
        expected = np_nuslerp([f64(a), f64(b)], [0.3, 0.9], flatten=flatten, row_wise=row_wise)
    np.testing.assert_allclose(f64(out), expected, rtol=1e-5, atol=1e-6)


def test_nuslerp_weights_pick_the_ends(models) -> None:
    base, donors = models
    entries = [base, donors[0], donors[1]]
    first = run("nuslerp", entries, 0, [{}, {"weight": 1.0}, {"weight": 0.0}])
    np.testing.assert_allclose(f64(first), f64(donors[0]), atol=1e-6)
    second = run("nuslerp", entries, 0, [{}, {"weight": 0.0}, {"weight": 2.0}])
    np.testing.assert_allclose(f64(second), f64(donors[1]), atol=1e-6)


@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp_matches_the_barycentric_spherical_mean(models, with_base) -> None:
    base, donors = models
    weights = [0.5, 0.2, 0.8]
    per = [{"weight": w} for w in weights]
    if with_base:
        out = run("multislerp", [*donors, base], 3, per + [{}])
        expected = np_multislerp([f64(d) for d in donors], weights, f64(base))
    else:
        out = run("multislerp", donors, None, per)
        expected = np_multislerp([f64(d) for d in donors], weights)
    np.testing.assert_allclose(f64(out), expected, rtol=1e-5, atol=1e-5)


def test_multislerp_of_one_donor_is_that_donor(models) -> None:
    base, donors = models
    assert run("multislerp", [base, donors[0]], 0, [{}, {"weight": 0.4}]) is donors[0]


def test_multislerp_refuses_directions_that_cancel() -> None:
    a = gaussian(7)
    with pytest.raises(ConfigError, match="weighted mean direction .* is zero"):
        run("multislerp", [a, -a, a * 0 - a], None, [{"weight": 1.0}, {"weight": 2.0}, {"weight": -1.0}])


def test_karcher_converges_to_the_riemannian_mean(models) -> None:
    """With enough iterations the result is the geodesic mean to float32 accuracy; with
    mergekit's default ten it is within 1e-4 of it on these inputs (they are close together,
    so the iteration converges fast)."""
    base, donors = models
    entries = [base, *donors]
    expected = np_karcher([f64(e) for e in entries])
    converged = run("karcher", entries, 0, [{}] * 4, {"max_iter": 200, "tol": 1e-9})
    np.testing.assert_allclose(f64(converged), expected, rtol=1e-5, atol=1e-5)
    default = run("karcher", entries, 0, [{}] * 4)
    np.testing.assert_allclose(f64(default), expected, rtol=1e-4, atol=1e-4)


def test_karcher_of_spread_directions(models) -> None:
    """Far-apart directions need the iteration: the Euclidean mean direction is off, the
    result is not."""
    entries = [gaussian(s) for s in (11, 12, 13)]
    expected = np_karcher([f64(e) for e in entries])
    out = run("karcher", entries, None, [{}] * 3, {"max_iter": 100, "tol": 1e-9})
    np.testing.assert_allclose(f64(out), expected, rtol=1e-4, atol=1e-5)
    euclid = sum(f64(e) for e in entries)
    euclid = euclid / np.linalg.norm(euclid) * np.mean([np.linalg.norm(f64(e)) for e in entries])
    assert np.abs(euclid - expected).max() > 1e-3  # so the test can tell the two apart


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.2])
def test_sce_matches_select_calculate_erase(models, topk) -> None:
    base, donors = models
    out = run("sce", [base, *donors], 0, [{}] * 4, {"select_topk": topk})
    np.testing.assert_allclose(f64(out), np_sce(f64(base), [f64(d) for d in donors], topk),
                               rtol=1e-5, atol=1e-6)
    masked = run("sce", [base, *donors], 0, [{}] * 4, {"select_topk": topk, "int8_mask": True})
    assert torch.equal(masked, out)


def test_ram_keeps_unique_changes_and_averages_shared_ones(models) -> None:
    base, donors = models
    # zero some entries of each task vector so that some entries are unique, some shared
    sparse = [base + (d - base) * (gaussian(20 + i) > 0.3) for i, d in enumerate(donors)]
    out = run("ram", [base, *sparse], 0, [{}] * 4, {"epsilon": 0.01})
    expected = np_ram(f64(base), [f64(d) for d in sparse], 0.01)
    np.testing.assert_allclose(f64(out), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("r, alpha", [(0.1, 0.2), (0.7, 5.0)])
def test_ramplus_tl_boosts_unique_changes(models, r, alpha) -> None:
    base, donors = models
    sparse = [base + (d - base) * (gaussian(30 + i) > 0.1 * i) for i, d in enumerate(donors)]
    out = run("ramplus_tl", [base, *sparse], 0, [{}] * 4, {"r": r, "alpha": alpha, "epsilon": 0.01})
    expected = np_ram(f64(base), [f64(d) for d in sparse], 0.01, r=r, alpha=alpha)
    np.testing.assert_allclose(f64(out), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t", [0.0, 0.02, 0.05, 10.0])
def test_nearswap_takes_near_values(models, t) -> None:
    base, donors = models
    out = run("nearswap", [base, donors[0]], 0, [{}, {}], {"t": t})
    np.testing.assert_allclose(f64(out), np_nearswap(f64(base), f64(donors[0]), t), rtol=1e-6, atol=1e-6)


def test_arcee_fusion_keeps_the_outlying_changes(models) -> None:
    base, donors = models
    out = run("arcee_fusion", [base, donors[0]], 0, [{}, {}])
    expected = np_arcee_fusion(f64(base), f64(donors[0]))
    np.testing.assert_allclose(f64(out), expected, rtol=1e-6, atol=1e-6)
    kept = (out != base).float().mean().item()
    assert 0 < kept < 0.5  # an outlier fence keeps some changes, not most


def test_added_methods_refuse_what_they_cannot_merge(models) -> None:
    base, donors = models
    with pytest.raises(ConfigError, match="exactly two models besides the base"):
        run("nuslerp", [base, *donors], 0, [{}] + [{"weight": 1.0}] * 3)
    with pytest.raises(ConfigError, match="'t'"):
        run("nearswap", [base, donors[0]], 0, [{}, {}])
    with pytest.raises(ConfigError, match="'weight'.*model 2"):
        run("multislerp", [base, *donors[:2]], 0, [{}, {"weight": 1.0}, {}])
    for name in ("sce", "ram", "ramplus_tl", "nearswap", "arcee_fusion"):
        with pytest.raises(ConfigError, match="base"):
            run(name, donors[:2], None, [{}, {}], {"t": 0.1})


@pytest.mark.parametrize("name", ["sce", "ram", "ramplus_tl"])
def test_resident_deltas_give_the_same_result(models, name) -> None:
    base, donors = models
    entries = [donors[0], base, donors[1]]
    deltas = [donors[0] - base, None, donors[1] - base]
    method = get_method(name)
    a = method.merge(MergeInputs(entries, 1, [{}] * 3))
    b = method.merge(MergeInputs(entries, 1, [{}] * 3, deltas=deltas))
    assert torch.equal(a, b)


def test_identities_of_the_added_methods(models) -> None:
    """Cases whose answer is known without any formula."""
    base, donors = models
    d = donors[0]
    # the mean of one point, however it is taken, is that point
    copies = [d.clone() for _ in range(3)]
    np.testing.assert_allclose(f64(run("karcher", copies, None, [{}] * 3)), f64(d), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(f64(run("multislerp", copies, None, [{"weight": 1.0}] * 3)), f64(d),
                               rtol=1e-5, atol=1e-6)
    # one donor's task vector survives RAM whole (every entry is its own), and SCE too (it agrees
    # with itself and is its own weighted mean)
    sparse = base + (d - base) * (gaussian(50) > 0)
    np.testing.assert_allclose(f64(run("ram", [base, sparse], 0, [{}, {}])), f64(sparse), atol=1e-6)
    np.testing.assert_allclose(f64(run("sce", [base, d], 0, [{}, {}])), f64(d), atol=1e-6)
    # nearswap with t = 0 moves nowhere; with a huge t it takes the other model
    assert torch.equal(run("nearswap", [base, d], 0, [{}, {}], {"t": 0.0}), base)
    np.testing.assert_allclose(f64(run("nearswap", [base, d], 0, [{}, {}], {"t": 1e6})), f64(d), atol=1e-6)
    # arcee_fusion of a model with itself changes nothing
    assert torch.equal(run("arcee_fusion", [base, base.clone()], 0, [{}, {}]), base)


# ---------------------------------------------------------------- parity with mergekit ------

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def mergekit_kernel(name: str, entries, base_index, params: dict) -> torch.Tensor:
    registry = pytest.importorskip("mergekit.merge_methods.registry")
    from mergekit.merge_methods.base import TensorGroup

    group = TensorGroup.from_tensors(list(entries), base_index=base_index)
    return registry.get(name)([group], parameters=params)[0]


def cases(base: torch.Tensor, donors: list[torch.Tensor]) -> dict[str, tuple]:
    """name -> (method, entries, base_index, our per_input, our shared, mergekit's parameters)."""
    a, b, c = donors
    sparse = [base + (d - base) * (gaussian(40 + i) > 0) for i, d in enumerate(donors)]
    return {
        "nuslerp": ("nuslerp", [base, a, b], 0, [{}, {"weight": 0.3}, {"weight": 0.6}], {},
                    {"weight": [0.3, 0.6]}),
        "nuslerp_rows": ("nuslerp", [a, b], None, [{"weight": 0.5}, {"weight": 0.2}],
                         {"nuslerp_flatten": False}, {"weight": [0.5, 0.2], "nuslerp_flatten": False}),
        "nuslerp_columns": ("nuslerp", [a, base, b], 1, [{"weight": 0.5}, {}, {"weight": 0.2}],
                            {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                            {"weight": [0.5, 0.2], "nuslerp_flatten": False, "nuslerp_row_wise": True}),
        "multislerp": ("multislerp", [base, a, b, c], 0, [{}, {"weight": 0.5}, {"weight": 0.2}, {"weight": 0.9}],
                       {}, {"weight": [0.5, 0.2, 0.9]}),
        "multislerp_nobase": ("multislerp", [a, b], None, [{"weight": 1.0}, {"weight": 0.5}],
                              {"normalize_weights": False}, {"weight": [1.0, 0.5], "normalize_weights": False}),
        "karcher": ("karcher", [base, a, b, c], None, [{}] * 4, {}, {}),
        "sce": ("sce", [base, a, b, c], 0, [{}] * 4, {}, {}),
        "sce_topk": ("sce", [a, base, b, c], 1, [{}] * 4, {"select_topk": 0.3}, {"select_topk": 0.3}),
        "ram": ("ram", [base, *sparse], 0, [{}] * 4, {"epsilon": 1e-3}, {"epsilon": 1e-3}),
        "ramplus_tl": ("ramplus_tl", [base, *sparse], 0, [{}] * 4, {"r": 0.4, "alpha": 0.9},
                       {"r": 0.4, "alpha": 0.9}),
        "nearswap": ("nearswap", [base, a], 0, [{}, {}], {"t": 0.03}, {"t": 0.03}),
        "arcee_fusion": ("arcee_fusion", [base, a], 0, [{}, {}], {}, {}),
    }


CASES = list(cases(gaussian(0), [gaussian(1)] * 3))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_kernels_equal_mergekit_bit_for_bit(models, case: str, dtype: torch.dtype) -> None:
    base, donors = models
    method, entries, base_index, per, shared, theirs_params = cases(base, donors)[case]
    entries = [e.to(dtype) for e in entries]
    ours = run(method, entries, base_index, per, shared)
    theirs = mergekit_kernel(method, entries, base_index, theirs_params)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    if method == "karcher":
        # an iteration: stated tolerance 1e-6 relative to the largest entry in float32, one ulp of
        # it below; on this torch build both take the same steps and agree exactly
        scale = theirs.double().abs().max().item()
        tol = max(1e-6, torch.finfo(dtype).eps) * scale
        assert (ours.double() - theirs.double()).abs().max().item() <= tol
    assert torch.equal(ours, theirs), f"max |diff| {(ours.double() - theirs.double()).abs().max().item():.3g}"


def test_mixed_input_dtypes_are_promoted_as_mergekit_does(models) -> None:
    base, donors = models
    entries = [base.to(torch.bfloat16), donors[0], donors[1].to(torch.float16)]
    ours = run("nuslerp", entries, 0, [{}, {"weight": 0.4}, {"weight": 0.6}])
    theirs = mergekit_kernel("nuslerp", entries, 0, {"weight": [0.4, 0.6]})
    assert ours.dtype == torch.float32 and torch.equal(ours, theirs)


# ---------------------------------------------------------------- whole models, both tools ----


def _stored_as(models: dict[str, Path], dtype: torch.dtype, root: Path) -> dict[str, Path]:
    """The tiny models rewritten with their tensors stored in ``dtype`` (as published
    checkpoints are: bfloat16 almost always)."""
    from safetensors.torch import load_file, save_file

    name = str(dtype).removeprefix("torch.")
    out = {}
    for key, folder in models.items():
        dest = root / f"{key}_{name}"
        dest.mkdir()
        tensors = load_file(str(folder / "model.safetensors"))
        save_file({k: v.to(dtype) for k, v in tensors.items()}, str(dest / "model.safetensors"))
        config = json.loads((folder / "config.json").read_text())
        config["torch_dtype"] = name
        (dest / "config.json").write_text(json.dumps(config))
        out[key] = dest
    return out


@pytest.fixture(scope="module", params=["float32", "bfloat16", "float16"])
def stored(request, tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The tiny base and donors, stored in each dtype in turn."""
    if request.param == "float32":
        return tiny_models
    dtype = getattr(torch, request.param)
    return _stored_as(tiny_models, dtype, tmp_path_factory.mktemp(request.param))


def whole_model_configs(m: dict[str, Path]) -> dict[str, dict]:
    base, a, b, c = (str(m[k]) for k in ("base", "a", "b", "c"))

    def donors(*params):
        return [{"model": x, "parameters": p} for x, p in zip((a, b, c), params)]

    return {
        "nuslerp": {"merge_method": "nuslerp", "base_model": base,
                    "models": donors({"weight": [0.2, 0.8]}, {"weight": 0.5})},
        "nuslerp_rows_no_base": {"merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False},
                                 "models": donors({"weight": 0.3}, {"weight": 0.6})},
        "multislerp": {"merge_method": "multislerp", "base_model": base,
                       "models": donors({"weight": 0.5}, {"weight": [0.1, 0.9]}, {"weight": 0.7})},
        "karcher": {"merge_method": "karcher", "base_model": base, "models": donors({}, {})},
        "sce": {"merge_method": "sce", "base_model": base, "parameters": {"select_topk": 0.4},
                "models": donors({}, {}, {})},
        "ram": {"merge_method": "ram", "base_model": base, "parameters": {"epsilon": 2e-4},
                "models": donors({}, {}, {})},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": base,
                       "parameters": {"epsilon": 2e-4, "r": 0.5, "alpha": 0.6}, "models": donors({}, {})},
        "nearswap": {"merge_method": "nearswap", "base_model": base,
                     "parameters": {"t": [{"filter": "mlp", "value": 1e-4}, {"value": 3e-4}]}, "models": donors({})},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": base, "models": donors({})},
        # the merge dtype differs from the stored one
        "sce_bfloat16": {"merge_method": "sce", "base_model": base, "dtype": "bfloat16",
                         "models": donors({}, {})},
        "multislerp_float32": {"merge_method": "multislerp", "dtype": "float32",
                               "models": donors({"weight": 0.4}, {"weight": 0.6})},
    }


def _load(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("name", list(whole_model_configs(dict.fromkeys(("base", "a", "b", "c"), Path()))))
def test_whole_merges_equal_mergekit_bit_for_bit(name: str, stored, tmp_path) -> None:
    """``evomerge merge`` and mergekit 0.1.5 on the same config and models, for models stored in
    float32, bfloat16 and float16: every tensor equal, dtype included (karcher too: its
    iteration takes the same steps in both)."""
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from evomerge.merge.run import merge_from_config

    config = whole_model_configs(stored)[name]
    merge_from_config(config, tmp_path / "evo")
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mk"),
              MergeOptions(copy_tokenizer=False, quiet=True))
    ours, theirs = _load(tmp_path / "evo"), _load(tmp_path / "mk")
    assert set(ours) == set(theirs)
    for key, t in theirs.items():
        assert ours[key].dtype == t.dtype, key
        differ = (ours[key] != t).sum().item()
        assert torch.equal(ours[key], t), f"{key}: {differ} of {t.numel()} entries differ"
