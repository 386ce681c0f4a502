"""Storage apart from math: memory-mapped inputs (read inline or one tensor ahead on a thread), and
task vectors formed on the fly, merge bit for bit as the resident path does, for every family of
methods and for float32 and bfloat16 files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from evomerge.merge.config import parse_merge_config
from evomerge.merge.inmemory import ResidentModels

from .tiny_models import write_state_dict_model, write_tiny_llama

# wide enough that the CPU merge's row chunks are used (a tensor larger than one chunk)
SHAPE = dict(hidden_size=128, intermediate_size=640, num_attention_heads=4, num_key_value_heads=2)

TIES = {"merge_method": "ties", "parameters": {"weight": 0.7, "density": 0.5}}
DARE = {"merge_method": "dare_ties", "parameters": {"weight": 0.6, "density": 0.4}, "random_seed": 3}
ARITHMETIC = {"merge_method": "task_arithmetic", "parameters": {"weight": 0.5}}
LINEAR = {"merge_method": "linear", "parameters": {"weight": 0.5}}
SLERP = {"merge_method": "slerp", "parameters": {"t": 0.3}}
# (method, stored dtype, merge dtype): the machine is shared, so each case earns its place
CASES = [(TIES, "float32", torch.float32), (TIES, "bfloat16", torch.bfloat16), (DARE, "float32", torch.float32),
         (ARITHMETIC, "bfloat16", torch.float32), (ARITHMETIC, "bfloat16", torch.bfloat16),
         (LINEAR, "bfloat16", torch.float32), (SLERP, "float32", torch.float32)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("storage")
    base = write_tiny_llama(root / "base", seed=0, **SHAPE)
    donors = [write_tiny_llama(root / f"d{i}", seed=i + 1, base=base, **SHAPE) for i in range(2)]
    out = {"float32": (base, donors)}
    halves = []
    for folder in (base, *donors):
        tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(folder / "model.safetensors")).items()}
        config = json.loads((folder / "config.json").read_text())
        halves.append(write_state_dict_model(root / f"{folder.name}_bf16", tensors, {**config, "dtype": "bfloat16"}))
    out["bfloat16"] = (halves[0], halves[1:])
    return out


def _merge(base, donors, method, **storage) -> dict[str, torch.Tensor]:
    data = {"merge_method": method["merge_method"], "base_model": str(base), "dtype": storage.pop("dtype_name"),
            "models": [{"model": str(d), "parameters": dict(method["parameters"])} for d in donors]}
    if method["merge_method"] == "slerp":
        data["models"] = [{"model": str(base)}, {"model": str(donors[0])}]
        data["parameters"] = method["parameters"]
        data["models"][0]["parameters"] = {}
        data["models"][1]["parameters"] = {}
    if method["merge_method"] == "linear":
        data["models"].insert(0, {"model": str(base), "parameters": {"weight": 0.2}})
    if "random_seed" in method:
        data["random_seed"] = method["random_seed"]
    config = parse_merge_config(data)
    read_ahead = storage.pop("read_ahead", None)
    resident = ResidentModels([str(base), *map(str, donors)], str(base), **storage)
    resident.read_ahead = read_ahead  # None: these small tensors are read inline; 1: one ahead, on a thread
    target = {k: torch.zeros_like(resident._for_math(v)) for k, v in resident.tensors[str(base)].items()}
    outcome = resident.merge_into(resident.plan(config), target)
    target["l2"] = torch.tensor(outcome.l2_from_base, dtype=torch.float64)
    return target


@pytest.mark.parametrize("method,files,merge_dtype", CASES,
                         ids=[f"{m['merge_method']}-{f}-{str(d)[6:]}" for m, f, d in CASES])
def test_mapped_storage_and_task_vectors_on_the_fly_merge_bit_for_bit(models, method, files, merge_dtype):
    base, donors = models[files]
    name = str(merge_dtype).removeprefix("torch.")
    reference = _merge(base, donors, method, dtype=merge_dtype, dtype_name=name)  # today's resident path
    for storage, task_vectors, read_ahead in (("mapped", True, None), ("mapped", False, None), ("mapped", False, 1),
                                              ("resident", False, None)):
        got = _merge(base, donors, method, dtype=merge_dtype, dtype_name=name, storage=storage,
                     task_vectors=task_vectors, read_ahead=read_ahead)
        assert got.keys() == reference.keys()
        for key, want in reference.items():
            assert got[key].dtype == want.dtype and torch.equal(got[key], want), (storage, task_vectors, read_ahead, key)
    assert any(not torch.equal(reference[k], load_file(str(base / "model.safetensors"))[k].to(merge_dtype))
               for k in reference if k != "l2")  # the merge changed something


def test_mapped_inputs_are_views_of_the_files_not_copies(models):
    base, donors = models["float32"]
    mapped = ResidentModels([str(base), *map(str, donors)], str(base), storage="mapped", task_vectors=False)
    owned = ResidentModels([str(base)], str(base))
    name = "model.layers.0.mlp.up_proj.weight"
    view = mapped.tensors[str(base)][name]
    assert mapped._get(str(base), name).data_ptr() == view.data_ptr()  # float32 files merged in float32: no copy
    assert torch.equal(view, owned.tensors[str(base)][name])
    assert mapped.deltas == {}
    # bfloat16 files merged in float32: converted per tensor, the map itself untouched
    half_base, half_donors = models["bfloat16"]
    half = ResidentModels([str(half_base)], str(half_base), storage="mapped", dtype=torch.float32)
    assert half.tensors[str(half_base)][name].dtype == torch.bfloat16
    assert half._get(str(half_base), name).dtype == torch.float32


def test_read_ahead_gives_tasks_in_order_with_at_most_one_loaded_ahead():
    """The streamed path's read-ahead: the caller's order, ``1 + READ_AHEAD`` tasks' inputs in
    flight at most (what the memory plan counts), a load's error raised at its task, and a loop
    left early stops the loader."""
    import threading
    import time

    from evomerge.merge.prefetch import READ_AHEAD, ReadAhead

    loaded_at: dict[int, int] = {}
    consumed: list[int] = []

    def load(i: int) -> int:
        loaded_at[i] = len(consumed)  # how many tasks the caller had finished when this one was read
        return i * i

    reader = ReadAhead(list(range(12)), load)
    for i, value in reader:
        time.sleep(0.002)  # a merge: the loader gets ahead if it can
        assert value == i * i
        consumed.append(i)
    assert consumed == list(range(12))
    assert reader.max_in_flight == 1 + READ_AHEAD
    assert all(loaded_at[i] >= i - READ_AHEAD for i in range(12))  # never further ahead than allowed

    def failing(i: int) -> int:
        if i == 3:
            raise ValueError("bad tensor")
        return i

    seen = []
    with pytest.raises(ValueError, match="bad tensor"):
        for i, _ in ReadAhead(list(range(6)), failing):
            seen.append(i)
    assert seen == [0, 1, 2]

    before = threading.active_count()
    for i, _ in ReadAhead(list(range(100)), load):
        if i == 2:
            break
    assert threading.active_count() == before  # the loader thread was joined


def test_conversion_buffers_reused_across_tensors_and_candidates_merge_bit_for_bit(models):
    """bfloat16 files merged in float32 on the mapped path: inputs converted into buffers that
    take turns between the tensor merged and the one read ahead, and serve the next candidate
    too; each candidate equals a fresh resident worker's merge."""
    base, donors = models["bfloat16"]
    mapped = ResidentModels([str(base), *map(str, donors)], str(base), storage="mapped", task_vectors=False)
    mapped.read_ahead = 1
    for method in (TIES, ARITHMETIC):
        config = parse_merge_config({"merge_method": method["merge_method"], "base_model": str(base),
                                     "dtype": "float32", "models": [{"model": str(d), "parameters": method["parameters"]}
                                                                    for d in donors]})
        resident = ResidentModels([str(base), *map(str, donors)], str(base), task_vectors=False)
        want = {k: torch.zeros_like(v) for k, v in resident.tensors[str(base)].items()}
        got = {k: torch.zeros_like(v) for k, v in want.items()}
        expected = resident.merge_into(resident.plan(config), want)
        outcome = mapped.merge_into(mapped.plan(config), got)
        assert outcome.l2_from_base == expected.l2_from_base
        assert all(torch.equal(got[k], want[k]) for k in want), method["merge_method"]
    assert len(mapped._conversions) == 2 * 3  # two slots (merged, read ahead) x three inputs, kept
