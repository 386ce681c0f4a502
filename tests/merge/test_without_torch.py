"""The numpy path of ``evomerge merge`` (evomerge.merge.without_torch) against the torch path.

Both run on the same real safetensors models, stored in float32 and in bfloat16 (where task
vectors tie and every rounding shows), and must write the same bytes; which merges take the numpy
path, and that planning them imports no torch, is checked too. Parity of both with mergekit is
test_mergekit_parity's job.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.merge import without_torch
from evomerge.merge.config import parse_merge_config
from evomerge.merge.plan import plan_merge
from evomerge.merge.run import merge_from_config, open_models

from .tiny_models import cast_model_folder, write_tiny_llama


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """A base and three donors whose embeddings (2049 x 32) span two chunks of the numpy path
    with a ragged end, stored in float32 and bfloat16."""
    root = tmp_path_factory.mktemp("wide")
    base = write_tiny_llama(root / "f32" / "base", seed=0, vocab_size=2049, num_hidden_layers=2)
    f32 = {"base": base, **{k: write_tiny_llama(root / "f32" / k, seed=s, base=base, vocab_size=2049,
                                                num_hidden_layers=2) for k, s in (("a", 1), ("b", 2), ("c", 3))}}
    bf16 = {k: cast_model_folder(p, root / "bf16" / k, torch.bfloat16) for k, p in f32.items()}
    return {"float32": f32, "bfloat16": bf16}


def _configs(m: dict[str, Path], dtype: str) -> dict[str, dict]:
    base, a, b, c = (str(m[k]) for k in ("base", "a", "b", "c"))
    return {
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "dtype": dtype,
                            "models": [{"model": a, "parameters": {"weight": 0.7}},
                                       {"model": b, "parameters": {"weight": [0.3, -0.45]}},
                                       {"model": c, "parameters": {"weight": 1.3}}]},
        "task_arithmetic_two_donors_out_float32": {"merge_method": "task_arithmetic", "base_model": base, "dtype": dtype,
                                                   "out_dtype": "float32",
                                                   "models": [{"model": a, "parameters": {"weight": 0.7}},
                                                              {"model": b, "parameters": {"weight": -0.35}}]},
        "task_arithmetic_one_donor": {"merge_method": "task_arithmetic", "base_model": base, "dtype": dtype,
                                      "models": [{"model": a, "parameters": {"weight": 0.3}}]},
        "linear": {"merge_method": "linear", "dtype": dtype,
                   "models": [{"model": a, "parameters": {"weight": 0.3}}, {"model": b, "parameters": {"weight": 0.9}}]},
        "linear_three_unnormalized": {"merge_method": "linear", "dtype": dtype, "parameters": {"normalize": False},
                                      "models": [{"model": a, "parameters": {"weight": [0.7, -0.2]}},
                                                 {"model": b, "parameters": {"weight": 0.45}},
                                                 {"model": c, "parameters": {"weight": 1 / 3}}]},
        "passthrough": {"merge_method": "passthrough", "dtype": dtype,
                        "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]},
                                   {"sources": [{"model": b, "layer_range": [1, 2]}]}]},
    }


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
@pytest.mark.parametrize("threads", [1, 3])
def test_numpy_path_writes_the_torch_paths_bytes(wide_models, stored, threads, tmp_path, monkeypatch):
    """On one thread, and on three that share the embeddings' two chunks (batches of one chunk,
    the second 32 entries long, so that one thread finds no chunk left)."""
    monkeypatch.setattr(without_torch, "worker_count", lambda: threads)
    monkeypatch.setattr(without_torch._Kernel, "BATCH", 1)
    for merge_dtype in ("float32", "bfloat16"):
        for name, config in _configs(wide_models[stored], merge_dtype).items():
            parsed = parse_merge_config(config)
            models = open_models(parsed)
            plan = plan_merge(parsed, models)
            assert without_torch.supports(plan, models), name
            fast = merge_from_config(parsed, tmp_path / f"{name}_{merge_dtype}_{threads}")
            monkeypatch.setenv("EVOMERGE_MERGE_WITH_TORCH", "1")
            slow = merge_from_config(parsed, tmp_path / f"{name}_{merge_dtype}_torch")
            monkeypatch.delenv("EVOMERGE_MERGE_WITH_TORCH")
            got, want = _tensors(fast), _tensors(slow)
            assert list(got) == list(want)
            for key in want:
                assert got[key].dtype == want[key].dtype, (name, key)
                assert torch.equal(got[key].view(torch.uint8), want[key].view(torch.uint8)), (name, merge_dtype, key)


def test_only_merges_it_reproduces_take_the_numpy_path(wide_models):
    m = wide_models["bfloat16"]
    configs = _configs(m, "bfloat16")
    refused = {
        "normalize": {**configs["task_arithmetic"], "parameters": {"normalize": True}},
        "lambda": {**configs["task_arithmetic"], "parameters": {"lambda": 0.9}},
        "scale": {"merge_method": "passthrough", "models": [{"model": str(m["a"]), "parameters": {"scale": 0.5}}]},
        "linear_three_normalized": {**configs["linear_three_unnormalized"], "parameters": {"normalize": True}},
        "float16": {**configs["task_arithmetic"], "dtype": "float16"},
    }
    for name, config in refused.items():
        parsed = parse_merge_config(config)
        models = open_models(parsed)
        assert not without_torch.supports(plan_merge(parsed, models), models), name


def test_planning_and_a_numpy_merge_import_no_torch(wide_models, tmp_path):
    """The point of the numpy path: ``evomerge merge`` of such a config never imports torch."""
    import yaml

    config = tmp_path / "ta.yaml"
    config.write_text(yaml.safe_dump(_configs(wide_models["bfloat16"], "bfloat16")["task_arithmetic"]))
    code = (
        "import sys\n"
        "from evomerge.cli import main\n"
        f"try:\n    main([{'merge'!r}, {str(config)!r}, {str(tmp_path / 'out')!r}])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("stored, merge_dtype", [("float32", "bfloat16"), ("bfloat16", "bfloat16"), ("float32", "float32")])
def test_a_non_finite_input_is_refused_as_the_torch_path_refuses_it(wide_models, stored, merge_dtype, tmp_path,
                                                                     monkeypatch):
    from safetensors.torch import save_file

    from evomerge.errors import ModelError

    from .tiny_models import cast_model_folder as copy_folder

    broken = copy_folder(wide_models[stored]["a"], tmp_path / "broken", getattr(torch, stored))
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["model.embed_tokens.weight"][2048, 5] = float("nan")
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    messages = []
    for with_torch in ("", "1"):
        monkeypatch.setenv("EVOMERGE_MERGE_WITH_TORCH", with_torch)
        for name, config in _configs({**wide_models[stored], "a": broken}, merge_dtype).items():
            if name == "passthrough":
                continue  # passthrough of layers 0-1 of ``a`` copies the embeddings verbatim or casts them
            out = tmp_path / f"out_{name}_{with_torch}"
            with pytest.raises(ModelError) as err:
                merge_from_config(parse_merge_config(config), out)
            assert not out.exists()
            messages.append((name, str(err.value)))
    half = len(messages) // 2
    assert messages[:half] == messages[half:]
    assert all("model.embed_tokens.weight gave NaN" in m for _, m in messages)
