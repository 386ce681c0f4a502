from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from evomerge.errors import ModelError
from evomerge.merge.safetensors_io import PlannedTensor, ShardedWriter, assign_shards, read_header, read_tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8])
def test_reader_matches_reference_library(tmp_path, dtype):
    tensors = {
        "a": (torch.randn(7, 5) * 10).to(dtype),
        "b.c": (torch.randn(3) * 10).to(dtype),
        "scalar": torch.tensor(3).to(dtype),
    }
    save_file(tensors, str(tmp_path / "x.safetensors"))
    header = read_header(tmp_path / "x.safetensors")
    assert set(header) == set(tensors)
    for name, expected in tensors.items():
        got = read_tensor(header[name])
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got, expected)


def test_writer_output_is_read_by_reference_library(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(13, i + 1, generator=gen).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(9)}
    planned = [PlannedTensor(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    writer = ShardedWriter(tmp_path, planned, max_shard_bytes=200)
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert len(set(index["weight_map"].values())) == len(writer.shards) > 1
    for name, filename in index["weight_map"].items():
        with safe_open(str(tmp_path / filename), framework="pt") as f:
            assert torch.equal(f.get_tensor(name), tensors[name])


def test_shards_respect_the_bound_and_keep_order():
    planned = [PlannedTensor(f"t{i}", torch.float32, (10,)) for i in range(10)]  # 40 bytes each
    shards = assign_shards(planned, 100)
    assert [len(s) for s in shards] == [2, 2, 2, 2, 2]
    assert [t.name for s in shards for t in s] == [t.name for t in planned]
    assert [len(s) for s in assign_shards(planned, 10)] == [1] * 10  # oversize tensors get their own shard


def test_writer_refuses_out_of_plan_tensor(tmp_path):
    writer = ShardedWriter(tmp_path, [PlannedTensor("a", torch.float32, (2,))], max_shard_bytes=1000)
    with pytest.raises(RuntimeError):
        writer.write("a", torch.zeros(3))


def test_truncated_file_is_a_clear_error(tmp_path):
    save_file({"w": torch.randn(100, 100)}, str(tmp_path / "m.safetensors"))
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated"):
        read_header(tmp_path / "m.safetensors")
    (tmp_path / "m.safetensors").write_bytes(b"\x01\x00")
    with pytest.raises(ModelError, match="not a safetensors file"):
        read_header(tmp_path / "m.safetensors")


def test_writer_copies_stored_tensors_byte_for_byte(tmp_path):
    """A tensor copied file to file (passthrough) lands where the header says, between written ones."""
    tensors = {"a": torch.randn(64, 33).bfloat16(), "b": torch.randn(5, 7), "c": torch.arange(11)}
    save_file(tensors, str(tmp_path / "in.safetensors"))
    header = read_header(tmp_path / "in.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    planned = [PlannedTensor("x", torch.float32, (5, 7)), PlannedTensor("y", torch.bfloat16, (64, 33)),
               PlannedTensor("z", torch.int64, (11,))]
    writer = ShardedWriter(out, planned, max_shard_bytes=1 << 20)
    writer.write("x", tensors["b"] * 2)
    writer.copy("y", header["a"])
    writer.copy("z", header["c"])
    writer.close()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("x"), tensors["b"] * 2)
        assert torch.equal(f.get_tensor("y"), tensors["a"])
        assert torch.equal(f.get_tensor("z"), tensors["c"])
    with pytest.raises(RuntimeError):  # a copy that does not fit the plan is a caller's bug
        ShardedWriter(out, planned, max_shard_bytes=1 << 20).copy("x", header["a"])


def test_reserved_places_are_filled_in_any_order_and_a_hole_is_caught(tmp_path):
    """A reserved tensor is written in parts by pwrite (the numpy path's threads, in any order),
    between tensors written and copied; a reserved place left unfilled fails close()."""
    import os

    tensors = {"a": torch.randn(64, 33), "b": torch.randn(5, 7).bfloat16()}
    save_file(tensors, str(tmp_path / "in.safetensors"))
    header = read_header(tmp_path / "in.safetensors")
    planned = [PlannedTensor("x", "F32", (64, 33)), PlannedTensor("y", torch.bfloat16, (5, 7)),
               PlannedTensor("z", "F32", (3,))]
    out = tmp_path / "out"
    out.mkdir()
    writer = ShardedWriter(out, planned, max_shard_bytes=1 << 20)
    fd, offset = writer.reserve("x", "F32", (64, 33))
    raw = tensors["a"].numpy().tobytes()
    half = len(raw) // 2
    os.pwrite(fd, raw[half:], offset + half)  # the second half first
    os.pwrite(fd, raw[:half], offset)
    writer.copy("y", header["b"])
    writer.write("z", torch.ones(3))
    writer.close()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("x"), tensors["a"])
        assert torch.equal(f.get_tensor("y"), tensors["b"])
        assert torch.equal(f.get_tensor("z"), torch.ones(3))

    hole = tmp_path / "hole"
    hole.mkdir()
    writer = ShardedWriter(hole, planned[:1], max_shard_bytes=1 << 20)
    fd, offset = writer.reserve("x", "F32", (64, 33))
    os.pwrite(fd, raw[:half], offset)  # the end never written
    with pytest.raises(RuntimeError, match="unwritten"):
        writer.close()
