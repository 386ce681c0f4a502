"""Sparsifiers: exact counts, the right entries, mergekit parity, and random keep rates.

References here are written plainly (Python sorts over (magnitude, index) pairs), not with the
module's selection helpers. Random checks use 5-sigma binomial bounds: a correct implementation
fails one of them with probability below 1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.errors import ConfigError
from evomerge.merge import sparsify as S

FIVE_SIGMA = 5.0


def distinct_tensor(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32):
    """Entries with distinct magnitudes k/64 (exact in bfloat16 and float16), random signs."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    mags = (torch.randperm(n, generator=g) + 1).float() / 64
    signs = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    return (mags * signs).reshape(shape).to(dtype)


def plain_top_k(values: list[float], k: int) -> set[int]:
    """Indices of the k largest |values|, by a plain sort (values assumed distinct)."""
    order = sorted(range(len(values)), key=lambda i: abs(values[i]), reverse=True)
    return set(order[:k])


# ---------------------------------------------------------------- magnitude -----------------


@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.77, 0.999])
def test_magnitude_keeps_the_k_largest(density: float) -> None:
    x = distinct_tensor((9, 13), seed=1)
    flat = x.reshape(-1).tolist()
    k = max(1, int(density * len(flat)))
    out = S.sparsify(x, "magnitude", density).reshape(-1).tolist()
    kept = {i for i, v in enumerate(out) if v != 0}
    assert kept == plain_top_k(flat, k)
    assert all(out[i] == flat[i] for i in kept)


def test_magnitude_with_ties_keeps_exactly_k_and_respects_the_threshold() -> None:
    x = torch.tensor([3.0, -1.0, 2.0, -2.0, 2.0, 1.0, -2.0, 0.5])
    out = S.sparsify(x, "magnitude", 0.5)  # k = 4: the 3 and three of the four 2s
    kept = out != 0
    assert int(kept.sum()) == 4
    assert out[0] == 3.0
    assert x.abs()[kept].min() >= x.abs()[~kept].max()


def test_magnitude_edge_densities() -> None:
    x = distinct_tensor((4, 5), seed=2)
    assert S.sparsify(x, "magnitude", 1.0) is x
    assert torch.count_nonzero(S.sparsify(x, "magnitude", 0.0)) == 0
    # Positive density keeps at least one entry, even when int(density * numel) == 0.
    tiny = S.sparsify(x, "magnitude", 0.01)
    assert torch.count_nonzero(tiny) == 1
    assert tiny.abs().max() == x.abs().max()


def test_magnitude_rescale_preserves_l1() -> None:
    x = distinct_tensor((6, 7), seed=3)
    out = S.sparsify(x, "magnitude", 0.3, rescale=True)
    assert torch.count_nonzero(out) == int(0.3 * 42)
    assert out.abs().sum().item() == pytest.approx(x.abs().sum().item(), rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3000),
    k_fraction=st.floats(0, 1),
    levels=st.sampled_from([2, 7, 1000, 0]),  # 0: continuous values; else integer levels (ties)
    layout=st.sampled_from(["random", "ascending", "descending", "blocks"]),
    seed=st.integers(0, 2**31 - 1),
    margin=st.sampled_from([0.0, 0.3, 4.0]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.float64, torch.bfloat16]),
)
def test_sampled_selection_equals_kthvalue(n, k_fraction, levels, layout, seed, margin, dtype) -> None:
    """The sample-bracketed selection is exact, for any layout, any number of ties and every
    float dtype (numpy selects for the dtypes it holds, torch's kthvalue for bfloat16)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(n, generator=g) if levels == 0 else torch.randint(0, levels, (n,), generator=g)
    v = v.to(dtype)
    if layout == "ascending":
        v = v.sort().values
    elif layout == "descending":
        v = v.sort(descending=True).values
    elif layout == "blocks":  # strided samples see one value per block only
        v = v.reshape(-1, 1).expand(-1, 7).reshape(-1)[:n].contiguous()
    k = max(1, min(n, round(k_fraction * n)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(S, "SAMPLE_SELECT_MIN", 16)
        patch.setattr(S, "SAMPLE_SIZE", 64)
        patch.setattr(S, "SAMPLE_MARGIN", margin)  # narrow brackets miss often: both paths run
        assert torch.equal(S.kth_largest(v, k), torch.kthvalue(v, n - k + 1).values)
        mask = S.top_k_mask(v, k)
    assert int(mask.sum()) == k
    if k < n:
        assert v[mask].min() >= v[~mask].max()


# ---------------------------------------------------------------- breadcrumbs ---------------


def plain_breadcrumbs(values: list[float], density: float, gamma: float) -> set[int]:
    """Indices mergekit keeps: drop int(gamma*n) largest, keep int(density*n) just below them."""
    n = len(values)
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    ascending = sorted(range(n), key=lambda i: abs(values[i]))
    return set(ascending[n_bot : n_bot + target])


@pytest.mark.parametrize(
    ("density", "gamma"),
    [(0.5, 0.05), (0.3, 0.1), (0.9, 0.2), (0.5, 0.0), (0.1, 0.001), (0.01, 0.05)],
)
def test_breadcrumbs_keeps_the_band_below_the_outliers(density: float, gamma: float) -> None:
    x = distinct_tensor((10, 12), seed=4)
    flat = x.reshape(-1).tolist()
    out = S.sparsify(x, "magnitude_outliers", density, gamma=gamma).reshape(-1).tolist()
    kept = {i for i, v in enumerate(out) if v != 0}
    assert kept == plain_breadcrumbs(flat, density, gamma)


def test_breadcrumbs_with_no_outliers_to_drop_keeps_the_top_entries() -> None:
    # int(gamma * numel) == 0: mergekit 0.1.5 keeps the top density fraction (older versions
    # zeroed the delta, as mergekit-semantics.md describes).
    x = torch.tensor([0.1, -0.5, 0.3, 0.2])
    out = S.sparsify(x, "magnitude_outliers", 0.5, gamma=0.01)
    assert torch.equal(out, x * torch.tensor([0.0, 1.0, 1.0, 0.0]))
    mk = pytest.importorskip("mergekit.sparsify")
    assert torch.equal(mk.magnitude_outliers(x, 0.5, gamma=0.01), out)


def test_breadcrumbs_with_ties_keeps_exactly_target() -> None:
    x = torch.tensor([1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 4.0])
    out = S.sparsify(x, "magnitude_outliers", 0.5, gamma=0.2)
    kept = out != 0
    assert int(kept.sum()) == 5  # two largest dropped, three smallest dropped
    # Kept magnitudes lie between the dropped small ones and the dropped large ones.
    assert sorted(x[kept].tolist()) == [2.0, 2.0, 3.0, 3.0, 4.0]


# ---------------------------------------------------------------- parity with mergekit -------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("rescale", [False, True])
def test_deterministic_sparsifiers_match_mergekit(dtype: torch.dtype, rescale: bool) -> None:
    mk = pytest.importorskip("mergekit.sparsify")
    norm = mk.RescaleNorm.l1 if rescale else None
    x = distinct_tensor((12, 20), seed=5, dtype=dtype)
    for density in (0.05, 0.4, 0.9):
        ours = S.sparsify(x, "magnitude", density, rescale=rescale)
        theirs = mk.magnitude(x, density, norm)
        assert ours.dtype == theirs.dtype == dtype
        assert torch.equal(ours, theirs)
        ours = S.sparsify(x, "magnitude_outliers", density, rescale=rescale, gamma=0.05)
        theirs = mk.magnitude_outliers(x, density, norm, gamma=0.05)
        assert ours.dtype == theirs.dtype == dtype
        assert torch.equal(ours, theirs)


def rounded_task_vector(n: int, seed: int, stored: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """donor - base of a weight stored in ``stored`` and fine-tuned a little, computed in ``dtype``:
    differences of coarsely rounded numbers, whose magnitudes tie in large groups."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    donor = base + torch.randn(n, generator=g) * 0.0005
    return donor.to(stored).to(dtype) - base.to(stored).to(dtype)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, sampled", [(200, False), (3000, False), (3000, True)])
def test_tied_magnitudes_keep_the_entries_mergekit_keeps(stored, dtype, n, sampled, monkeypatch) -> None:
    """Where magnitudes tie at the threshold, the same tied entries survive as in mergekit,
    bit for bit (its unstable sort decides; see the sparsify module). 200 entries: torch sorts
    with a sorting network; 3000: with quicksort; ``sampled``: the selection that brackets the
    threshold with a sample runs (as for tensors above ``SAMPLE_SELECT_MIN``)."""
    mk = pytest.importorskip("mergekit.sparsify")
    if sampled:
        monkeypatch.setattr(S, "SAMPLE_SELECT_MIN", 16)
        monkeypatch.setattr(S, "SAMPLE_SIZE", 64)
    x = rounded_task_vector(n, seed=n, stored=stored, dtype=dtype).reshape(-1, 100)
    threshold_ties = 0
    for density in (0.1, 0.5, 0.83):
        for rescale in (False, True):
            norm = mk.RescaleNorm.l1 if rescale else None
            ours = S.sparsify(x, "magnitude", density, rescale=rescale)
            assert torch.equal(ours, mk.magnitude(x, density, norm)), (density, rescale)
            ours = S.sparsify(x, "magnitude_outliers", density, rescale=rescale, gamma=0.03)
            assert torch.equal(ours, mk.magnitude_outliers(x, density, norm, gamma=0.03)), (density, rescale)
        kept = S.sparsify(x, "magnitude", density) != 0
        threshold_ties += int((x.abs() == x.abs()[kept].min()).logical_and(~kept).any())
    assert threshold_ties > 0  # the case under test: tied entries on both sides of the threshold


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_random_sparsifiers_keep_mergekit_dtypes_and_rescale(dtype: torch.dtype) -> None:
    mk = pytest.importorskip("mergekit.sparsify")
    x = torch.randn(16, 24, generator=torch.Generator().manual_seed(6)).to(dtype)
    g = torch.Generator().manual_seed(11)
    for ours, theirs in (
        (S.sparsify(x, "random", 0.4, rescale=True, generator=g),
         mk.bernoulli(x, 0.4, mk.RescaleNorm.l1)),
        (S.sparsify(x, "della_magprune", 0.5, rescale=True, epsilon=0.2, generator=g),
         mk.della_magprune(x, 0.5, 0.2, mk.RescaleNorm.l1)),
    ):
        assert ours.dtype == theirs.dtype == dtype
        # Same L1 as the input (to the rounding of the work dtype), both ways.
        for out in (ours, theirs):
            assert out.float().abs().sum().item() == pytest.approx(
                x.float().abs().sum().item(), rel=1e-2 if dtype != torch.float32 else 1e-5)


def test_della_matches_mergekit_keep_rate_per_rank() -> None:
    """mergekit's global-RNG masks and ours keep each magnitude rank equally often."""
    mk = pytest.importorskip("mergekit.sparsify")
    rows, cols, d, eps = 3000, 4, 0.4, 0.3
    g = torch.Generator().manual_seed(13)
    mags = torch.stack([torch.randperm(cols, generator=g) + 1 for _ in range(rows)]).float()
    torch.manual_seed(14)
    theirs = mk.della_magprune(mags, d, eps)
    ours = S.sparsify(mags, "della_magprune", d, epsilon=eps, generator=g)
    for rank in range(cols):
        at_rank = mags == rank + 1
        p = d - eps + 2 * eps * rank / (cols - 1)
        sigma = math.sqrt(rows * p * (1 - p))
        a = int(torch.count_nonzero(ours[at_rank]))
        b = int(torch.count_nonzero(theirs[at_rank]))
        # Two independent binomials: their difference has standard deviation sqrt(2) sigma.
        assert abs(a - b) <= FIVE_SIGMA * math.sqrt(2) * sigma, rank


def test_dare_matches_mergekit_in_distribution() -> None:
    """Across global-RNG draws, mergekit's kept fraction and L1 rescale agree with ours."""
    mk = pytest.importorskip("mergekit.sparsify")
    n, p = 40_000, 0.3
    x = torch.randn(n, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(123)
    theirs = mk.bernoulli(x, p, mk.RescaleNorm.l1)
    ours = S.sparsify(x, "random", p, rescale=True, generator=torch.Generator().manual_seed(99))
    bound = FIVE_SIGMA * math.sqrt(n * p * (1 - p))
    for out in (ours, theirs):
        assert abs(int(torch.count_nonzero(out)) - n * p) <= bound
        assert out.abs().sum().item() == pytest.approx(x.abs().sum().item(), rel=1e-5)
    assert not torch.equal(ours, theirs)  # different streams, same law


# ---------------------------------------------------------------- DARE -----------------------


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dare_keep_rate_is_binomial(p: float) -> None:
    n = 20_000
    x = torch.randn(n, generator=torch.Generator().manual_seed(8)) + 10  # no zero entries
    out = S.sparsify(x, "random", p, generator=torch.Generator().manual_seed(1))
    kept = int(torch.count_nonzero(out))
    assert abs(kept - n * p) <= FIVE_SIGMA * math.sqrt(n * p * (1 - p))
    survivors = out != 0
    assert torch.equal(out[survivors], x[survivors])  # no rescale unless asked


def test_dare_rescale_and_reproducibility() -> None:
    x = torch.randn(50, 40, generator=torch.Generator().manual_seed(9))
    a = S.sparsify(x, "random", 0.3, rescale=True, generator=torch.Generator().manual_seed(2))
    b = S.sparsify(x, "random", 0.3, rescale=True, generator=torch.Generator().manual_seed(2))
    c = S.sparsify(x, "random", 0.3, rescale=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, c)
    kept = a != 0
    scale = x.abs().sum() / x[kept].abs().sum()
    torch.testing.assert_close(a[kept], x[kept] * scale)


def test_dare_rejects_negative_density() -> None:
    with pytest.raises(ConfigError, match="density"):
        S.sparsify(torch.ones(4), "random", -0.1)


# ---------------------------------------------------------------- DELLA ----------------------


def test_della_keep_probability_rises_with_rank() -> None:
    rows, cols, d, eps = 4000, 5, 0.5, 0.3
    # Every row holds magnitudes 1..5 in a random order, so column rank is known per entry.
    g = torch.Generator().manual_seed(10)
    mags = torch.stack([torch.randperm(cols, generator=g) + 1 for _ in range(rows)]).float()
    out = S.sparsify(mags, "della_magprune", d, epsilon=eps, generator=g)
    for rank in range(cols):
        p = d - eps + 2 * eps * rank / (cols - 1)
        kept = int(torch.count_nonzero(out[mags == rank + 1]))
        assert abs(kept - rows * p) <= FIVE_SIGMA * math.sqrt(rows * p * (1 - p)), rank


def test_della_rejects_what_mergekit_crashes_on() -> None:
    with pytest.raises(ConfigError, match="epsilon"):
        S.sparsify(torch.randn(3, 4), "della_magprune", 0.9, epsilon=0.15)
    with pytest.raises(ConfigError, match="one entry"):
        S.sparsify(torch.randn(6, 1), "della_magprune", 0.5, epsilon=0.1)
    mk = pytest.importorskip("mergekit.sparsify")
    for args in ((torch.randn(3, 4), 0.9, 0.15), (torch.randn(6, 1), 0.5, 0.1)):
        with pytest.raises((ValueError, RuntimeError)):
            mk.della_magprune(*args)


def test_della_edge_densities() -> None:
    x = torch.randn(3, 4)
    assert S.sparsify(x, "della_magprune", 1.0, epsilon=0.1) is x
    assert torch.count_nonzero(S.sparsify(x, "della_magprune", 0.0, epsilon=0.1)) == 0


# ---------------------------------------------------------------- apply_mask -----------------


def test_apply_mask_in_place_measures_the_norm_before_masking() -> None:
    x = torch.tensor([4.0, -1.0, 2.0, 1.0])
    mask = torch.tensor([True, False, True, False])
    work = x.clone()
    out = S.apply_mask(work, mask, rescale=True, out=work)
    assert out is work
    expected_scale = 8.0 / 6.0
    torch.testing.assert_close(out, torch.tensor([4.0, 0.0, 2.0, 0.0]) * expected_scale)
