"""The chunked CPU task-vector merge equals the whole-tensor one bit for bit.

The whole-tensor path follows mergekit's op order and is what the parity tests pin to mergekit;
the chunked path is what runs on CPU for tensors larger than a chunk. Both are run here on
tensors spanning several chunks (with a ragged last chunk), for every method of the family,
with and without resident deltas, float32 and bfloat16, two and three donors.
"""

from __future__ import annotations

import pytest
import torch

from evomerge.merge import task_vectors as tv
from evomerge.merge.registry import METHODS
from evomerge.merge.sparsify import Sparsifier

FAMILY = [
    # sparsifier, consensus, normalize, rescale
    (None, False, False, False),  # task_arithmetic
    (Sparsifier.MAGNITUDE, True, True, False),  # ties
    (Sparsifier.MAGNITUDE, True, True, True),  # ties with rescale
    (Sparsifier.RANDOM, True, False, True),  # dare_ties
    (Sparsifier.RANDOM, False, False, True),  # dare_linear
    (Sparsifier.MAGNITUDE_OUTLIERS, False, False, False),  # breadcrumbs
    (Sparsifier.MAGNITUDE_OUTLIERS, True, False, True),  # breadcrumbs_ties with rescale
    (Sparsifier.DELLA_MAGPRUNE, True, True, True),  # della
    (Sparsifier.DELLA_MAGPRUNE, False, False, True),  # della_linear
]


def _inputs(count: int, dtype: torch.dtype, shape=(97, 2 * tv.CHUNK // 97 + 301)):
    gen = torch.Generator().manual_seed(count)
    base = torch.randn(shape, generator=gen).to(dtype)
    donors = [(base.float() + 0.1 * torch.randn(shape, generator=gen)).to(dtype) for _ in range(count)]
    return base, donors


def _both(base, donors, deltas=None, **kw):
    results = []
    for fn in (tv._merge_whole, tv._merge_in_chunks):
        gen = torch.Generator().manual_seed(7)
        results.append(fn(base, donors, deltas=deltas, generator=gen, **kw))
    return results


@pytest.mark.parametrize("sparsifier, consensus, normalize, rescale", FAMILY)
@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_equals_whole(sparsifier, consensus, normalize, rescale, count, dtype):
    base, donors = _inputs(count, dtype)
    assert base.numel() > 2 * tv.CHUNK and base.numel() % tv.CHUNK
    kw = dict(
        weights=[0.7, -0.4, 1.1][:count], sparsifier=sparsifier, consensus=consensus, normalize=normalize,
        rescale=rescale, lambda_=0.9, densities=[0.5, 0.3, 0.8][:count], gammas=[0.01] * count,
        epsilons=[0.1] * count,
    )
    whole, chunked = _both(base, donors, **kw)
    assert whole.dtype == chunked.dtype == dtype and whole.shape == chunked.shape
    assert torch.equal(whole.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       chunked.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


@pytest.mark.parametrize("sparsifier, consensus, normalize, rescale", FAMILY[:4])
def test_chunked_equals_whole_with_resident_deltas(sparsifier, consensus, normalize, rescale):
    base, donors = _inputs(2, torch.float32)
    deltas = [d - base for d in donors]
    kw = dict(weights=[0.6, 0.5], sparsifier=sparsifier, consensus=consensus, normalize=normalize,
              rescale=rescale, lambda_=1.0, densities=[0.4, 0.6], gammas=None, epsilons=None)
    whole, chunked = _both(base, [], deltas=deltas, **kw)
    assert torch.equal(whole, chunked)


def test_cpu_merges_of_large_tensors_take_the_chunked_path(monkeypatch):
    base, donors = _inputs(2, torch.float32)
    calls = []
    monkeypatch.setattr(tv, "_merge_whole", lambda *a, **k: calls.append("whole"))
    tv.task_vector_merge(base, donors, [0.5, 0.5], sparsifier=Sparsifier.MAGNITUDE, consensus=True,
                         densities=[0.5, 0.5])
    assert calls == []
    assert "ties" in METHODS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 9])
def test_row_sums_equal_torch_sum_bit_for_bit(dtype, count):
    """The row-by-row sum the chunks use is torch.sum over dim 0 exactly: same accumulation dtype,
    same order, one rounding (values spread over many magnitudes, so the order would show)."""
    gen = torch.Generator().manual_seed(count)
    terms = (torch.randn(count, 5000, generator=gen) * torch.logspace(-3, 3, 5000)).to(dtype)
    expected = torch.sum(terms, dim=0)
    ours = tv.sum_rows(terms, torch.empty_like(expected))
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalize", [True, False])
def test_chunked_linear_equals_whole(dtype, normalize, monkeypatch):
    """linear's CPU chunks give the whole-tensor result bit for bit (ragged last chunk included)."""
    from evomerge.merge import methods

    gen = torch.Generator().manual_seed(5)
    tensors = [(torch.randn(97, 1500, generator=gen) * torch.logspace(-2, 2, 1500)).to(dtype) for _ in range(3)]
    chunked = methods.linear_merge(tensors, [0.3, -0.7, 1.1], normalize=normalize)
    assert tensors[0].numel() > 2 * methods.LINEAR_CHUNK
    monkeypatch.setattr(methods, "LINEAR_CHUNK", 1 << 40)
    assert torch.equal(chunked, methods.linear_merge(tensors, [0.3, -0.7, 1.1], normalize=normalize))
