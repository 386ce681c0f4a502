"""The read-buffer pool: reuse by exact size, a cap on idle bytes, and no reuse of a buffer that
the merged result still uses."""

from __future__ import annotations

import torch

from evomerge.merge.run import _recycle
from evomerge.merge.safetensors_io import BufferPool


def test_a_given_buffer_is_taken_again_for_the_same_size_only():
    pool = BufferPool()
    t = pool.take(4096).view(torch.float32)
    ptr = t.untyped_storage().data_ptr()
    pool.give(t)
    assert pool.take(1024).untyped_storage().data_ptr() != ptr
    again = pool.take(4096)
    assert again.untyped_storage().data_ptr() == ptr and again.numel() == 4096 and again.dtype == torch.uint8
    assert pool.take(4096).untyped_storage().data_ptr() != ptr  # taken: no longer idle


def test_idle_bytes_stay_under_the_cap_oldest_dropped_first():
    pool = BufferPool(max_idle_bytes=10_000)
    first, second, third = (pool.take(4000) for _ in range(3))
    ptrs = [b.untyped_storage().data_ptr() for b in (first, second, third)]
    for b in (first, second, third):
        pool.give(b)
    assert pool._bytes == 8000
    got = {pool.take(4000).untyped_storage().data_ptr() for _ in range(2)}
    assert got == set(ptrs[1:])


def test_the_result_s_own_buffer_is_not_recycled():
    pool = BufferPool()
    a, b = torch.ones(100), torch.zeros(100)
    _recycle(pool, [a, b], a.reshape(10, 10))  # passthrough returns its input
    assert pool.take(400).untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert pool.take(400).untyped_storage().data_ptr() != a.untyped_storage().data_ptr()


def test_no_more_buffers_of_one_size_wait_than_one_task_reads():
    pool = BufferPool(max_per_size=2)
    for b in [pool.take(64) for _ in range(3)]:
        pool.give(b)
    assert len(pool._idle[64]) == 2 and pool._bytes == 128
