"""Merge identities that must hold for any inputs, checked with Hypothesis on tiny tensors."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.merge import sparsify as S
from evomerge.merge.registry import MergeInputs, get_method

FAST = settings(max_examples=40, deadline=None)

shapes = st.sampled_from([(1,), (7,), (3, 5), (4, 4), (2, 3, 4)])
seeds = st.integers(0, 2**31 - 1)
unit = st.floats(0.05, 1.0)


def rand(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def merge(name, entries, base_index, per_input, shared=None, **kw) -> torch.Tensor:
    return get_method(name).merge(MergeInputs(entries, base_index, per_input, shared or {}, **kw))


@FAST
@given(shape=shapes, seed=seeds, n_others=st.integers(0, 3))
def test_linear_weight_one_on_one_donor_returns_it(shape, seed, n_others) -> None:
    entries = [rand(shape, seed + i) for i in range(n_others + 1)]
    per = [{"weight": 1.0}] + [{"weight": 0.0}] * n_others
    assert torch.equal(merge("linear", entries, None, per), entries[0])


@FAST
@given(shape=shapes, seed=seeds, weights=st.lists(unit, min_size=2, max_size=4))
def test_linear_is_order_free(shape, seed, weights) -> None:
    entries = [rand(shape, seed + i) for i in range(len(weights))]
    per = [{"weight": w} for w in weights]
    forward = merge("linear", entries, None, per)
    backward = merge("linear", entries[::-1], None, per[::-1])
    torch.testing.assert_close(forward, backward, rtol=1e-6, atol=1e-6)


@FAST
@given(shape=shapes, seed=seeds, method=st.sampled_from(["task_arithmetic", "dare_linear"]))
def test_task_vector_weight_one_returns_the_donor(shape, seed, method) -> None:
    base, donor = rand(shape, seed), rand(shape, seed + 1)
    out = merge(method, [base, donor], 0, [{}, {"weight": 1.0}])
    # (donor - base) + base is the donor up to one rounding.
    torch.testing.assert_close(out, donor, rtol=1e-6, atol=1e-6)


@FAST
@given(shape=shapes, seed=seeds, normalize=st.booleans(),
       # k/16: exact in float32, so the reference and the merge see the same weights
       weights=st.lists(st.integers(-16, 16).map(lambda k: k / 16), min_size=1, max_size=3))
def test_ties_at_density_one_is_sign_consensus_task_arithmetic(shape, seed, weights, normalize):
    base = rand(shape, seed)
    donors = [rand(shape, seed + 1 + i) for i in range(len(weights))]
    per = [{}] + [{"weight": w, "density": 1.0} for w in weights]
    out = merge("ties", [base, *donors], 0, per, {"normalize": normalize})
    # Independent form: elect a sign per entry from the weighted sum, average the agreeing ones.
    b = base.double().numpy()
    weighted = [w * (d.double().numpy() - b) for w, d in zip(weights, donors)]
    elected = np.where(sum(weighted) >= 0, 1.0, -1.0)
    agree = [np.sign(wd) == elected for wd in weighted]
    mixed = sum(np.where(a, wd, 0.0) for a, wd in zip(agree, weighted))
    divisor = sum(np.where(a, w, 0.0) for a, w in zip(agree, weights))
    divisor = np.where(divisor == 0, 1.0, divisor)
    expected = b + (mixed / divisor if normalize else mixed)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=1e-5)


@FAST
@given(shape=shapes, seed=seeds, lam=st.floats(0.0, 2.0))
def test_lambda_scales_the_mixed_task_vector(shape, seed, lam) -> None:
    base, donor = rand(shape, seed), rand(shape, seed + 1)
    per = [{}, {"weight": 0.7}]
    plain = merge("task_arithmetic", [base, donor], 0, per)
    scaled = merge("task_arithmetic", [base, donor], 0, per, {"lambda": lam})
    torch.testing.assert_close(scaled - base, lam * (plain - base), rtol=1e-5, atol=1e-5)


@FAST
@given(shape=shapes, seed=seeds, base_first=st.booleans())
def test_slerp_ends_are_its_inputs(shape, seed, base_first) -> None:
    base, other = rand(shape, seed), rand(shape, seed + 1)
    entries, b = ([base, other], 0) if base_first else ([other, base], 1)
    assert torch.equal(merge("slerp", entries, b, [{}, {}], {"t": 0.0}), base)
    torch.testing.assert_close(merge("slerp", entries, b, [{}, {}], {"t": 1.0}), other,
                               rtol=1e-6, atol=1e-6)


@FAST
@given(shape=shapes, seed=seeds, t=st.floats(0, 1))
def test_slerp_of_a_tensor_with_itself_is_itself(shape, seed, t) -> None:
    x = rand(shape, seed)
    torch.testing.assert_close(merge("slerp", [x, x.clone()], 0, [{}, {}], {"t": t}), x)


@FAST
@given(shape=shapes, seed=seeds, n=st.integers(2, 4))
def test_model_stock_of_identical_donors_is_that_donor(shape, seed, n) -> None:
    base, donor = rand(shape, seed), rand(shape, seed + 1)
    out = merge("model_stock", [base] + [donor.clone() for _ in range(n)], 0, [{}] * (n + 1))
    # All offsets agree (cosine 1), so t = 1 and the result is the donors' mean.
    torch.testing.assert_close(out, donor, rtol=1e-5, atol=1e-5)


@FAST
@given(n=st.integers(1, 300), seed=seeds, density=st.floats(0.0, 1.0), levels=st.integers(1, 6))
def test_magnitude_keeps_exactly_k_even_with_ties(n, seed, density, levels) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(-levels, levels + 1, (n,), generator=g).float())  # many ties, zeros too
    out = S.sparsify(x, "magnitude", density)
    if density >= 1:
        assert out is x
        return
    k = 0 if density <= 0 else max(1, int(density * n))
    kept = torch.zeros(n, dtype=torch.bool)
    kept[S.magnitude_mask(x, density)] = True
    assert int(kept.sum()) == k
    if 0 < k < n:
        assert x.abs()[kept].min() >= x.abs()[~kept].max()
    assert torch.equal(out[kept], x[kept]) and torch.count_nonzero(out[~kept]) == 0


@FAST
@given(n=st.integers(1, 300), seed=seeds, density=st.floats(0.0, 0.99), gamma=st.floats(0, 0.5),
       levels=st.integers(1, 6))
def test_breadcrumbs_keeps_exactly_target_between_the_cuts(n, seed, density, gamma, levels):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-levels, levels + 1, (n,), generator=g).float()
    mask = S.magnitude_outliers_mask(x, density, gamma)
    target, top = int(density * n), int(gamma * n)
    assert int(mask.sum()) == target
    dropped_low = max(0, n - target - top)
    mags = sorted(x.abs().tolist())
    if target:
        kept = sorted(x.abs()[mask].tolist())
        # The kept multiset is exactly the sorted band, whatever the ties.
        assert kept == mags[dropped_low : dropped_low + target]


@settings(max_examples=15, deadline=None)
@given(seed=seeds, p=st.floats(0.05, 0.95))
def test_dare_keep_rate_within_five_sigma(seed, p) -> None:
    n = 4000
    x = torch.ones(n)
    kept = int(torch.count_nonzero(
        S.sparsify(x, "random", p, generator=torch.Generator().manual_seed(seed))))
    # 5 sigma of Binomial(n, p): P(fail) < 6e-7 per example.
    assert abs(kept - n * p) <= 5 * math.sqrt(n * p * (1 - p))
