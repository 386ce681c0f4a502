"""Every merge method against a plain NumPy computation and against mergekit itself.

The references below are written from the formulas (float64 NumPy, loops over models), not with
evomerge's helpers. Task vectors are built from multiples of 1/64 so that ``x - base`` is exact in
float32 and magnitude ranks cannot be disturbed by rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

from evomerge.errors import ConfigError, ModelError
from evomerge.merge.registry import MergeInputs, get_method

SHAPE = (6, 10)


def grid_tensor(seed: int, scale: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-scale, scale + 1, SHAPE, generator=g).float() / 64).contiguous()


def distinct_delta(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = math.prod(SHAPE)
    mags = (torch.randperm(n, generator=g) + 1).float() / 64
    signs = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    return (mags * signs).reshape(SHAPE)


@pytest.fixture
def models() -> tuple[torch.Tensor, list[torch.Tensor]]:
    base = grid_tensor(0)
    donors = [base + distinct_delta(s) for s in (1, 2, 3)]
    return base, donors


def as_np(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def run(
    name: str,
    entries: Sequence[torch.Tensor],
    base_index: int | None,
    per_input: Sequence[dict[str, Any]],
    shared: dict[str, Any] | None = None,
    **kw: Any,
) -> torch.Tensor:
    return get_method(name).merge(MergeInputs(entries, base_index, per_input, shared or {}, **kw))


# ---------------------------------------------------------------- plain references ----------


def np_top_k(delta: np.ndarray, density: float) -> np.ndarray:
    flat = delta.reshape(-1)
    k = max(1, int(density * flat.size))
    order = sorted(range(flat.size), key=lambda i: -abs(flat[i]))
    keep = np.zeros(flat.size)
    keep[order[:k]] = 1
    return (flat * keep).reshape(delta.shape)


def np_breadcrumbs(delta: np.ndarray, density: float, gamma: float) -> np.ndarray:
    flat = delta.reshape(-1)
    n = flat.size
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    order = sorted(range(n), key=lambda i: abs(flat[i]))
    keep = np.zeros(n)
    keep[order[bottom : bottom + target]] = 1
    return (flat * keep).reshape(delta.shape)


def np_task_vectors(
    base: np.ndarray,
    deltas: list[np.ndarray],
    weights: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float = 1.0,
) -> np.ndarray:
    weighted = [w * d for w, d in zip(weights, deltas)]
    if consensus:
        total = sum(weighted)
        elected = np.where(total >= 0, 1.0, -1.0)
        mixed = np.zeros_like(base)
        divisor = np.zeros_like(base)
        for w, wd in zip(weights, weighted):
            agree = np.sign(wd) == elected
            mixed += np.where(agree, wd, 0.0)
            divisor += np.where(agree, w, 0.0)
        divisor[divisor == 0] = 1
    else:
        mixed = sum(weighted)
        divisor = sum(weights)
        if abs(divisor) < 1e-8:
            divisor = 1.0
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def np_slerp(v0: np.ndarray, v1: np.ndarray, t: float) -> np.ndarray:
    a, b = v0.reshape(-1), v1.reshape(-1)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    dot = float(np.clip(np.dot(a / (na if na > 1e-8 else 1), b / (nb if nb > 1e-8 else 1)), -1, 1))
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def np_model_stock(base: np.ndarray, donors: list[np.ndarray]) -> np.ndarray:
    offsets = [(d - base).reshape(-1) for d in donors]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norm = max(np.linalg.norm(offsets[i]) * np.linalg.norm(offsets[j]), 1e-6)
            cosines.append(np.clip(np.dot(offsets[i], offsets[j]) / norm, -1, 1))
    c = float(np.mean(cosines))
    n = len(donors)
    t = n * c / (1 + (n - 1) * c)
    return t * (sum(donors) / n) + (1 - t) * base


# ---------------------------------------------------------------- against references --------


def test_linear_matches_weighted_average(models) -> None:
    base, donors = models
    entries = [donors[0], base, donors[1]]
    weights = [0.2, 0.5, 0.7]
    per = [{"weight": w} for w in weights]
    expected = sum(w * as_np(x) for w, x in zip(weights, entries))
    np.testing.assert_allclose(as_np(run("linear", entries, 1, per)), expected / sum(weights),
                               rtol=1e-6, atol=1e-6)
    out = run("linear", entries, None, per, {"normalize": False})
    np.testing.assert_allclose(as_np(out), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_matches_formula(models, t: float) -> None:
    base, donors = models
    out = run("slerp", [donors[0], base], 1, [{}, {}], {"t": t})
    np.testing.assert_allclose(as_np(out), np_slerp(as_np(base), as_np(donors[0]), t),
                               rtol=1e-5, atol=1e-6)


def test_slerp_falls_back_to_lerp_for_parallel_tensors(models) -> None:
    base, _ = models
    other = base * 3
    out = run("slerp", [base, other], 0, [{}, {}], {"t": 0.25})
    np.testing.assert_allclose(as_np(out), 0.75 * as_np(base) + 0.25 * as_np(other), rtol=1e-6)


def test_task_arithmetic_matches_sum_of_task_vectors(models) -> None:
    base, donors = models
    weights = [0.5, -0.25, 1.5]
    per = [{}] + [{"weight": w} for w in weights]
    out = run("task_arithmetic", [base, *donors], 0, per, {"lambda": 0.8})
    expected = np_task_vectors(as_np(base), [as_np(d - base) for d in donors], weights,
                               consensus=False, normalize=False, lam=0.8)
    np.testing.assert_allclose(as_np(out), expected, rtol=1e-6, atol=1e-6)
    out = run("task_arithmetic", [base, *donors], 0, per, {"normalize": True})
    expected = np_task_vectors(as_np(base), [as_np(d - base) for d in donors], weights,
                               consensus=False, normalize=True)
    np.testing.assert_allclose(as_np(out), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_trim_elect_merge(models, normalize: bool) -> None:
    base, donors = models
    weights, densities = [0.6, 0.3, 1.0], [0.3, 0.5, 0.8]
    per = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    out = run("ties", [*donors, base], 3, per + [{}], {"normalize": normalize})
    deltas = [np_top_k(as_np(d - base), den) for d, den in zip(donors, densities)]
    expected = np_task_vectors(as_np(base), deltas, weights, consensus=True, normalize=normalize)
    np.testing.assert_allclose(as_np(out), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_matches_band_sparsified_task_vectors(models, name: str) -> None:
    base, donors = models
    weights, densities, gammas = [0.6, 0.3, 1.0], [0.5, 0.7, 0.2], [0.05, 0.1, 0.0]
    per = [{"weight": w, "density": d, "gamma": g} for w, d, g in zip(weights, densities, gammas)]
    out = run(name, [base, *donors], 0, [{}] + per)
    deltas = [np_breadcrumbs(as_np(d - base), den, g)
              for d, den, g in zip(donors, densities, gammas)]
    expected = np_task_vectors(as_np(base), deltas, weights,
                               consensus=name.endswith("ties"), normalize=False)
    np.testing.assert_allclose(as_np(out), expected, rtol=1e-6, atol=1e-6)


def test_model_stock_matches_formula(models) -> None:
    base, donors = models
    out = run("model_stock", [base, *donors], 0, [{}] * 4)
    expected = np_model_stock(as_np(base), [as_np(d) for d in donors])
    np.testing.assert_allclose(as_np(out), expected, rtol=1e-5, atol=1e-6)


def test_model_stock_filter_wise_uses_row_cosines(models) -> None:
    base, donors = models
    out = run("model_stock", [base, *donors], 0, [{}] * 4, {"filter_wise": True})
    for r in range(SHAPE[0]):
        expected = np_model_stock(as_np(base[r]), [as_np(d[r]) for d in donors])
        np.testing.assert_allclose(as_np(out[r]), expected, rtol=1e-5, atol=1e-6)


def test_passthrough_returns_the_tensor_or_scales_it(models) -> None:
    base, _ = models
    assert run("passthrough", [base], None, [{}]) is base
    np.testing.assert_allclose(as_np(run("passthrough", [base], None, [{"scale": 0.5}])),
                               0.5 * as_np(base))


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_keep_about_density_of_each_task_vector(name: str) -> None:
    n, p = 20_000, 0.4
    base = torch.zeros(n)
    donor = torch.randn(n, generator=torch.Generator().manual_seed(1)) + 10  # all positive
    per = [{}, {"weight": 1.0, "density": p}]
    out = run(name, [base, donor], 0, per, {"rescale": False},
              generator=torch.Generator().manual_seed(5))
    kept = int(torch.count_nonzero(out))
    assert abs(kept - n * p) <= 5 * math.sqrt(n * p * (1 - p))
    survivors = out != 0
    assert torch.equal(out[survivors], donor[survivors])


# ---------------------------------------------------------------- precomputed deltas --------


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della"])
def test_resident_deltas_give_the_same_result_and_stay_untouched(models, name: str) -> None:
    base, donors = models
    entries = [donors[0], base, donors[1], donors[2]]
    per = [{"weight": 0.7, "density": 0.5}, {}, {"weight": 0.4, "density": 0.6},
           {"weight": 0.2, "density": 0.4}]
    deltas = [None if i == 1 else e - base for i, e in enumerate(entries)]
    snapshot = [None if d is None else d.clone() for d in deltas]
    inputs = [e.clone() for e in entries]
    a = run(name, entries, 1, per, generator=torch.Generator().manual_seed(3))
    b = run(name, entries, 1, per, generator=torch.Generator().manual_seed(3), deltas=deltas)
    assert torch.equal(a, b)
    assert all(d is None or torch.equal(d, s) for d, s in zip(deltas, snapshot))
    assert all(torch.equal(e, i) for e, i in zip(entries, inputs))


def test_only_base_returns_base(models) -> None:
    base, _ = models
    assert run("ties", [base], 0, [{}]) is base


# ---------------------------------------------------------------- errors ---------------------


def test_linear_zero_weight_sum_is_a_config_error(models) -> None:
    base, donors = models
    with pytest.raises(ConfigError, match="sum to 0"):
        run("linear", [base, donors[0]], None, [{"weight": 1.0}, {"weight": -1.0}])


def test_missing_required_parameter_names_it(models) -> None:
    base, donors = models
    with pytest.raises(ConfigError, match="'weight'.*model 1"):
        run("ties", [base, donors[0]], 0, [{}, {"density": 0.5}])
    with pytest.raises(ConfigError, match="'t'"):
        run("slerp", [base, donors[0]], 0, [{}, {}])


def test_wrong_input_counts_are_config_errors(models) -> None:
    base, donors = models
    with pytest.raises(ConfigError, match="exactly two"):
        run("slerp", [base, *donors[:2]], 0, [{}] * 3, {"t": 0.5})
    with pytest.raises(ConfigError, match="exactly one"):
        run("passthrough", [base, donors[0]], None, [{}, {}])
    with pytest.raises(ConfigError, match="at least two"):
        run("model_stock", [base, donors[0]], 0, [{}, {}])
    with pytest.raises(ConfigError, match="base"):
        run("ties", donors, None, [{"weight": 1.0}] * 3)


def test_integer_tensors_are_model_errors() -> None:
    ints = torch.arange(6).reshape(2, 3)
    with pytest.raises(ModelError, match="floating"):
        run("linear", [ints, ints], None, [{"weight": 1.0}] * 2)
    with pytest.raises(ModelError, match="floating"):
        run("slerp", [ints, ints], 0, [{}, {}], {"t": 0.5})
    with pytest.raises(ModelError, match="floating"):
        run("ties", [ints, ints + 1], 0, [{}, {"weight": 0.5}])
    assert run("passthrough", [ints], None, [{}]) is ints


# ---------------------------------------------------------------- parity with mergekit ------


def mergekit_merge(name: str, entries, base_index, params, dtype=None) -> torch.Tensor:
    registry = pytest.importorskip("mergekit.merge_methods.registry")
    from mergekit.merge_methods.base import TensorGroup

    group = TensorGroup.from_tensors(list(entries), base_index=base_index)
    return registry.get(name)([group], parameters=params, dtype=dtype)[0]


FAMILY_PARAMS = {
    "task_arithmetic": {},
    "ties": {},
    "breadcrumbs": {"gamma": [0.05, 0.02, 0.1]},
    "breadcrumbs_ties": {"gamma": [0.05, 0.02, 0.1]},
    "dare_ties": {},
    "dare_linear": {},
    "della": {"epsilon": [0.1, 0.05, 0.2]},
    "della_linear": {"epsilon": [0.1, 0.05, 0.2]},
}


@pytest.mark.parametrize("name", sorted(FAMILY_PARAMS))
@pytest.mark.parametrize("shared", [{}, {"normalize": True, "lambda": 1.3, "rescale": True}])
def test_task_vector_family_matches_mergekit(models, name: str, shared: dict) -> None:
    """Deterministic methods to 1e-6; random ones at density 1 (their masks are random)."""
    base, donors = models
    entries = [donors[0], base, donors[1], donors[2]]
    weights, densities = [0.7, 0.4, -0.3], [0.3, 0.6, 0.5]
    if get_method(name).stochastic:
        densities = [1.0, 1.0, 1.0]
    extra = FAMILY_PARAMS[name]
    torch.manual_seed(21)
    theirs = mergekit_merge(name, entries, 1,
                            {"weight": weights, "density": densities, **extra, **shared})
    per = []
    for j in range(3):
        per.append({"weight": weights[j], "density": densities[j],
                    **{k: v[j] for k, v in extra.items()}})
    per.insert(1, {})
    ours = run(name, entries, 1, per, shared, generator=torch.Generator().manual_seed(21))
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["ties", "task_arithmetic", "linear", "slerp", "model_stock"])
def test_low_precision_computes_and_returns_like_mergekit(models, name: str, dtype) -> None:
    base, donors = models
    if name == "slerp":
        entries, params, per, shared = [base, donors[0]], {"t": 0.3}, [{}, {}], {"t": 0.3}
    elif name == "linear":
        entries, params = [base, donors[0], donors[1]], {"weight": [0.3, 0.3, 0.5]}
        per, shared = [{"weight": 0.3}, {"weight": 0.3}, {"weight": 0.5}], {}
    elif name == "model_stock":
        entries, params, per, shared = [base, *donors], {}, [{}] * 4, {}
    else:
        entries, params = [base, *donors], {"weight": [0.3, 0.6, 0.1], "density": [0.4] * 3}
        per = [{}] + [{"weight": w, "density": 0.4} for w in (0.3, 0.6, 0.1)]
        shared = {}
    low = [e.to(dtype) for e in entries]
    theirs = mergekit_merge(name, low, 0, params)
    ours = run(name, low, 0, per, shared)
    assert ours.dtype == theirs.dtype == dtype
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_mixed_dtypes_promote_like_mergekit(models) -> None:
    base, donors = models
    entries = [base.to(torch.bfloat16), donors[0], donors[1].half()]
    per = [{}, {"weight": 0.5}, {"weight": 0.5}]
    theirs = mergekit_merge("task_arithmetic", entries, 0, {"weight": [0.5, 0.5]})
    ours = run("task_arithmetic", entries, 0, per)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_other_methods_match_mergekit(models, filter_wise: bool) -> None:
    base, donors = models
    theirs = mergekit_merge("model_stock", [base, *donors], 0, {"filter_wise": filter_wise})
    ours = run("model_stock", [base, *donors], 0, [{}] * 4, {"filter_wise": filter_wise})
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    theirs = mergekit_merge("slerp", [donors[1], base], 1, {"t": 0.35})
    ours = run("slerp", [donors[1], base], 1, [{}, {}], {"t": 0.35})
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    theirs = mergekit_merge("linear", [base, *donors], None, {"weight": [0.1, 0.2, 0.3, 0.4]})
    ours = run("linear", [base, *donors], None, [{"weight": w} for w in (0.1, 0.2, 0.3, 0.4)])
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    theirs = mergekit_merge("passthrough", [base], None, {"scale": [2.5]})
    torch.testing.assert_close(run("passthrough", [base], None, [{"scale": 2.5}]), theirs)


@pytest.mark.parametrize("name", ["dare_linear", "della_linear"])
def test_random_methods_match_mergekit_in_distribution(name: str) -> None:
    """Different RNG streams: the fraction of changed entries and the L1 of the delta agree."""
    n, p = 20_000, 0.35
    base = torch.zeros(n)
    donor = torch.randn(n, generator=torch.Generator().manual_seed(2))
    extra = {"epsilon": [0.1]} if name.startswith("della") else {}
    torch.manual_seed(1234)
    theirs = mergekit_merge(name, [base, donor], 0, {"weight": [1.0], "density": [p], **extra})
    per = [{}, {"weight": 1.0, "density": p, **{k: v[0] for k, v in extra.items()}}]
    ours = run(name, [base, donor], 0, per, generator=torch.Generator().manual_seed(77))
    bound = 5 * math.sqrt(n * p * (1 - p))
    for out in (ours, theirs):
        assert abs(int(torch.count_nonzero(out)) - n * p) <= bound
        # rescale defaults to true: the L1 norm of the task vector is preserved
        assert out.abs().sum().item() == pytest.approx(donor.abs().sum().item(), rel=1e-5)
    assert not torch.equal(ours, theirs)
