"""`evomerge merge` as a user runs it: real folders in, a loadable model out, clear refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from ..reliability.cli_batch import run_batch
from ..reliability.conftest import cli_env


def run_merge(config: dict | str, out: Path, *extra: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    cfg_path = out.parent / f"{out.name}.yaml"
    cfg_path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "evomerge.cli", "merge", str(cfg_path), str(out), *extra],
        capture_output=True, text=True, cwd=cwd,
    )


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_merged_folder_loads_with_transformers_and_is_sharded(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = {
        "merge_method": "ties",
        "base_model": str(tiny_models["base"]),
        "models": [
            {"model": str(tiny_models["a"]), "parameters": {"weight": 0.7, "density": 0.5}},
            {"model": str(tiny_models["b"]), "parameters": {"weight": [0.2, 1.0], "density": 0.8}},
        ],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    out = tmp_path / "merged"
    result = run_merge(cfg, out, "--shard-size", "20KB")
    assert result.returncode == 0, result.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    merged = load_folder(out)
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    for name, p in model.named_parameters():
        assert torch.equal(p.detach().to(torch.bfloat16), merged[name]), name
    assert not list(tmp_path.glob(".*partial*"))


def test_slices_stack_layers_and_set_the_layer_count(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    a, b = str(tiny_models["a"]), str(tiny_models["b"])
    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 3]}]},
            {"sources": [{"model": b, "layer_range": [1, 4]}], "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}},
        ],
    }
    out = tmp_path / "stacked"
    assert run_merge(cfg, out).returncode == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 6
    merged, src_a, src_b = load_folder(out), load_folder(Path(a)), load_folder(Path(b))
    assert torch.equal(merged["model.layers.2.mlp.up_proj.weight"], src_a["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(merged["model.layers.3.mlp.up_proj.weight"], src_b["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(merged["model.layers.5.self_attn.o_proj.weight"], src_b["model.layers.3.self_attn.o_proj.weight"] * 0.5)
    # embeddings from the first slice's model, the head from the last slice's
    assert torch.equal(merged["model.embed_tokens.weight"], src_a["model.embed_tokens.weight"])
    assert torch.equal(merged["lm_head.weight"], src_b["lm_head.weight"])


def test_random_methods_are_reproducible_for_a_seed(tiny_models, tmp_path):
    cfg = {
        "merge_method": "dare_ties",
        "base_model": str(tiny_models["base"]),
        "models": [{"model": str(tiny_models["a"]), "parameters": {"weight": 1.0, "density": 0.5}}],
    }
    outs = []
    for i, seed in enumerate(["1", "1", "2"]):
        out = tmp_path / f"dare{i}"
        assert run_merge(cfg, out, "--random-seed", seed).returncode == 0
        outs.append(load_folder(out))
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(outs[0][name], outs[1][name])
    assert not torch.equal(outs[0][name], outs[2][name])


# --- refusals: exit 2, one clear line, no traceback, no output folder -----------------------

def _variant(tmp_path: Path, tiny_models, **changes) -> Path:
    """A model folder like ``a`` with some tensors or config entries changed."""
    folder = tmp_path / "variant"
    tensors = load_folder(tiny_models["a"])
    config = json.loads((tiny_models["a"] / "config.json").read_text())
    if "vocab" in changes:
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = torch.cat([tensors[name], tensors[name][:3]])
        config["vocab_size"] += 3
    if "shape" in changes:
        tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:, :-2].contiguous()
    if "arch" in changes:
        config["model_type"] = "gpt_neox"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _ties(base, *donors, **params) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(d), "parameters": {"weight": 0.5, "density": 0.5, **params}} for d in donors],
    }


REFUSALS = [
    ("unknown_method", "unknown merge method 'tie'.*Did you mean 'ties'"),
    ("missing_folder", "model folder not found: '.*does-not-exist'"),
    ("unknown_param", "takes no parameter 'densty'.*Did you mean 'density'"),
    ("vocab", "different vocabularies"),
    ("shape", "tensor shapes differ for model.layers.1.mlp.up_proj.weight"),
    ("arch", "different architectures"),
    ("pickle", "pickled .bin.*--allow-pickle"),
    ("layer_range", "layer_range \\[0, 9\\] goes past the end"),
    ("yaml", "not valid YAML"),
    ("no_weights", "no weights found"),
    ("truncated", "truncated"),
]


def _refused_config(case: str, tiny_models, tmp_path: Path) -> dict | str:
    """The merge config of one refusal case, with the inputs it needs built in ``tmp_path``."""
    base, a = tiny_models["base"], tiny_models["a"]
    cfg: dict | str = _ties(base, a, tiny_models["b"])
    if case == "unknown_method":
        cfg["merge_method"] = "tie"
    elif case == "missing_folder":
        cfg = _ties(base, tmp_path / "does-not-exist")
    elif case == "unknown_param":
        cfg["models"][0]["parameters"]["densty"] = 0.3
    elif case in ("vocab", "shape", "arch"):
        cfg = _ties(base, a, _variant(tmp_path, tiny_models, **{case: True}))
    elif case == "pickle":
        folder = tmp_path / "pickled"
        folder.mkdir()
        (folder / "config.json").write_bytes((a / "config.json").read_bytes())
        torch.save(load_folder(a), folder / "pytorch_model.bin")
        cfg = _ties(base, folder)
    elif case == "layer_range":
        cfg = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(a), "layer_range": [0, 9]}]}]}
    elif case == "yaml":
        cfg = "merge_method: ties\nmodels: [unclosed\n"
    elif case == "no_weights":
        folder = tmp_path / "empty"
        folder.mkdir()
        (folder / "config.json").write_bytes((a / "config.json").read_bytes())
        cfg = _ties(base, folder)
    elif case == "truncated":
        folder = tmp_path / "cut"
        folder.mkdir()
        (folder / "config.json").write_bytes((a / "config.json").read_bytes())
        data = (a / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) - 1000])
        cfg = _ties(base, folder)
    return cfg


@pytest.fixture(scope="module")
def refusals(tiny_models, tmp_path_factory) -> dict[str, tuple[Path, Any]]:
    """Every refusal case set up in a folder of its own, then all run as ``evomerge merge CONFIG OUT``
    in one fresh process (``tests/reliability/cli_batch.py``: the real entry point, only the imports
    shared; ``test_bad_inputs`` checks that a case prints the same there as in a process of its own)."""
    cases = []
    for case, _ in REFUSALS:
        folder = tmp_path_factory.mktemp(case)
        cfg = _refused_config(case, tiny_models, folder)
        cfg_path = folder / "out.yaml"
        cfg_path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
        cases.append((case, ["merge", str(cfg_path), str(folder / "out")], folder))
    results = run_batch(cases, tmp_path_factory.mktemp("batch"), cli_env())
    return {case: (folder, results[case]) for case, _, folder in cases}


@pytest.mark.parametrize("case, expected", REFUSALS)
def test_bad_input_is_refused_clearly(case, expected, refusals):
    folder, result = refusals[case]
    out = folder / "out"
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert __import__("re").search(expected, result.stderr, flags=__import__("re").S), result.stderr
    assert not out.exists()
    assert not list(folder.glob(".out*"))


def test_pickled_weights_load_when_opted_in_without_running_code(tiny_models, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny_models["a"] / "config.json").read_bytes())
    torch.save(load_folder(tiny_models["a"]), folder / "pytorch_model.bin")
    out = tmp_path / "out"
    result = run_merge(_ties(tiny_models["base"], folder), out, "--allow-pickle")
    assert result.returncode == 0, result.stderr
    assert out.is_dir()


def test_existing_output_is_not_overwritten_without_asking(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_merge(_ties(tiny_models["base"], tiny_models["a"]), out)
    assert result.returncode == 2 and "already exists" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_passthrough_copies_stored_bytes_only_when_unchanged(tiny_models_by_dtype):
    """Plain passthrough outputs are copied file to file; a scale or a dtype change computes them."""
    from evomerge.merge.config import parse_merge_config
    from evomerge.merge.plan import plan_merge
    from evomerge.merge.run import open_models, verbatim_source

    a = str(tiny_models_by_dtype["bfloat16"]["a"])
    slices = [{"sources": [{"model": a, "layer_range": [0, 2]}]}]

    def copied(**extra):
        config = parse_merge_config({"merge_method": "passthrough", "slices": slices, **extra})
        models = open_models(config)
        plan = plan_merge(config, models)
        return [verbatim_source(plan, task, models) is not None for task in plan.tasks]

    assert all(copied()) and all(copied(dtype="bfloat16"))
    assert not any(copied(dtype="float32"))
    assert not any(copied(dtype="bfloat16", out_dtype="float16"))
    assert not any(copied(parameters={"scale": 1.0}))
