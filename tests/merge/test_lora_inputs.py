"""LoRA adapters as merge inputs (``base+adapter``), checked against PEFT and mergekit 0.1.5.

The adapters are real PEFT adapters made in the test on tiny Llamas. PEFT's own
``merge_and_unload()`` is the independent computation of what ``base+adapter`` means; mergekit's
``model+lora`` merge (which calls it) is the reference an exported config must reproduce. A
search worker keeps an adapter donor's factors only, and its in-memory merge must equal
``evomerge merge`` of the exported recipe bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.merge.inmemory import ResidentModels
from evomerge.merge.run import merge_from_config, merge_from_file
from evomerge.recipe import Recipe

from .lora_adapters import peft_merged, write_adapter
from .test_merge_command import load_folder

pytest.importorskip("peft")


def _resave(src: Path, dest: Path, dtype: torch.dtype) -> Path:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src, dtype=dtype).save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def lora(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Bases stored in float32 and bfloat16, a full donor of each, and adapters of several kinds."""
    root = tmp_path_factory.mktemp("lora")
    base16 = _resave(tiny_models["base"], root / "base", torch.bfloat16)  # named "base" like its float32 twin
    return {
        "base32": tiny_models["base"],
        "donor32": tiny_models["a"],
        "base16": base16,
        "donor16": _resave(tiny_models["a"], root / "a16", torch.bfloat16),
        # rank and alpha per module by PEFT's patterns
        "patterns32": write_adapter(root / "patterns32", tiny_models["base"], seed=1,
                                    rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3}),
        "rslora16": write_adapter(root / "rslora16", base16, seed=2, r=8, alpha=4, use_rslora=True,
                                  targets=("q_proj", "k_proj", "o_proj", "gate_proj", "up_proj")),
        # an embedding adapter (saved with the full embeddings) and a fully trained head
        "embed32": write_adapter(root / "embed32", tiny_models["base"], seed=3, targets=("q_proj", "embed_tokens"),
                                 modules_to_save=["lm_head"]),
        "embed16": write_adapter(root / "embed16", base16, seed=4, targets=("v_proj", "embed_tokens"),
                                 modules_to_save=["lm_head"]),
    }


@pytest.mark.parametrize("base, adapter", [("base32", "patterns32"), ("base16", "rslora16"), ("base32", "embed32"),
                                           ("base16", "embed16")])
def test_adapter_merge_equals_peft_merge_and_unload(lora, tmp_path, base, adapter):
    reference = f"{lora[base]}+{lora[adapter]}"
    ours = load_folder(merge_from_config({"merge_method": "passthrough", "models": [{"model": reference}]},
                                         tmp_path / "out"))
    theirs = peft_merged(lora[base], lora[adapter])
    stored = load_folder(lora[base])
    assert set(ours) == set(stored)
    changed = 0
    for name, tensor in ours.items():
        assert tensor.dtype == stored[name].dtype, name
        assert torch.equal(tensor, theirs[name]), name
        changed += not torch.equal(tensor, stored[name])
    assert changed >= 5  # the adapter really changed the weights (4 layers and more)


def _mergekit(config: dict, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(copy_tokenizer=False, quiet=True, lora_merge_cache=str(out.parent / "lora_cache")))
    return load_folder(out)


def test_adapter_input_equals_mergekit_model_plus_lora(lora, tmp_path):
    pytest.importorskip("mergekit")
    config = {"merge_method": "passthrough", "models": [{"model": f"{lora['base16']}+{lora['embed16']}"}]}
    ours = load_folder(merge_from_config(config, tmp_path / "ours"))
    theirs = _mergekit(config, tmp_path / "mergekit" / "out")
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def _recipe(base: Path, donors: list[tuple[str, dict]], method: str, dtype: str, **extra) -> Recipe:
    from evomerge.merge.config import parse_merge_config

    merge = parse_merge_config({
        "merge_method": method, "base_model": str(base), "dtype": dtype,
        "models": [{"model": ref, "parameters": params} for ref, params in donors], **extra,
    })
    return Recipe(merge=merge, params={})


def _in_memory(recipe: Recipe, references: list[str], base: str, dtype: torch.dtype) -> tuple[dict, ResidentModels]:
    resident = ResidentModels(references, base, dtype=dtype)
    plan = resident.plan(recipe.merge)
    target = {t.name: torch.zeros(t.shape, dtype=dtype) for t in plan.tasks}
    resident.merge_into(plan, target)
    return target, resident


def _factor_bytes(adapter: Path) -> int:
    """The factors' size, read independently of evomerge."""
    return sum(t.numel() * t.element_size() for k, t in load_file(adapter / "adapter_model.safetensors").items()
               if ".lora_" in k)


WORKER_CASES = [
    # (base, full donor, adapter, method, worker dtype): the worker's dtype wider than, equal to and
    # narrower than the stored one (then the base's stored values are read for the adapted tensors)
    ("base16", "donor16", "rslora16", "ties", "float32"),
    ("base16", "donor16", "rslora16", "task_arithmetic", "bfloat16"),
    ("base32", "donor32", "patterns32", "linear", "bfloat16"),
    ("base32", "donor32", "embed32", "dare_ties", "float32"),
]


@pytest.mark.parametrize("base, donor, adapter, method, dtype", WORKER_CASES,
                         ids=[f"{c[3]}-{c[0]}-{c[4]}" for c in WORKER_CASES])
def test_worker_merge_with_an_adapter_donor_equals_evomerge_merge_of_the_export(lora, tmp_path, base, donor, adapter,
                                                                               method, dtype):
    base_ref, full_ref, adapter_ref = str(lora[base]), str(lora[donor]), f"{lora[base]}+{lora[adapter]}"
    params = {"weight": 0.6} if method == "linear" else {"weight": 0.8, "density": 0.6}
    if method == "task_arithmetic":
        params = {"weight": 0.8}
    donors = [(adapter_ref, params), (full_ref, {**params, "weight": 0.5})]
    if method == "linear":
        donors.append((base_ref, {"weight": 0.3}))
    recipe = _recipe(lora[base], donors, method, dtype, random_seed=5)
    merged, resident = _in_memory(recipe, [base_ref, full_ref, adapter_ref], base_ref, getattr(torch, dtype))

    # low-rank: the adapter donor holds its factors (and any full tensor saved with it, here the
    # trained head), never a full model (on these 32-wide matrices rank 8 saves nothing; the
    # saving at real sizes is what scripts/lora_resident_bytes.py prints)
    saved_full = {k: t for k, t in load_file(lora[adapter] / "adapter_model.safetensors").items() if ".lora_" not in k}
    assert adapter_ref not in resident.tensors
    replacements = sum(t.numel() * t.element_size() for t in resident.adapters[adapter_ref].replacements.values())
    assert resident.resident_bytes(adapter_ref) == _factor_bytes(lora[adapter]) + replacements
    assert bool(saved_full) == (replacements > 0)

    exported = tmp_path / "recipe.yaml"
    exported.write_text(recipe.to_yaml())
    assert adapter_ref in yaml.safe_load(exported.read_text())["models"][0]["model"]
    written = load_folder(merge_from_file(exported, tmp_path / "out"))
    assert set(written) == set(merged)
    for name, tensor in merged.items():
        assert torch.equal(tensor, written[name]), name


def test_exported_recipe_with_an_adapter_donor_reproduces_with_mergekit(lora, tmp_path):
    """mergekit reads the exported ``base+adapter`` reference and gives the weights the worker evaluated."""
    pytest.importorskip("mergekit")
    base_ref, adapter_ref = str(lora["base32"]), f"{lora['base32']}+{lora['patterns32']}"
    recipe = _recipe(lora["base32"], [(adapter_ref, {"weight": 0.9}), (str(lora["donor32"]), {"weight": 0.4})],
                     "task_arithmetic", "float32")
    merged, _ = _in_memory(recipe, [base_ref, str(lora["donor32"]), adapter_ref], base_ref, torch.float32)
    theirs = _mergekit(yaml.safe_load(recipe.to_yaml()), tmp_path / "mergekit" / "out")
    assert set(theirs) == set(merged)
    for name, tensor in merged.items():
        assert torch.equal(tensor, theirs[name]), name


def test_space_file_takes_an_adapter_donor(toy_world, tmp_path):
    """A space file's donor ``base+adapter`` is decoded into recipes that name it, and the worker's
    merge of such a recipe equals ``evomerge merge`` of the export."""
    from evomerge.search import prepare
    from evomerge.space import SearchSpace
    from evomerge.space_config import load_space_config

    from ..reliability.conftest import good_space, write_yaml

    adapter = write_adapter(tmp_path / "arith_lora", toy_world.base, seed=7)
    donor = f"{toy_world.base}+{adapter}"
    space_file = write_yaml(tmp_path / "space.yaml", good_space(
        toy_world, **{"models.donors": [donor, str(toy_world.specialists["reverse"])]}))
    config = load_space_config(space_file)
    assert config.models.donors[0].name == "arith_lora"
    plan = prepare(config).memory  # the checks a search runs before its run folder exists
    recipe = SearchSpace.from_config(config, 4).decode(
        {**SearchSpace.from_config(config, 4).default_values()})
    assert donor in [m.model for m in recipe.merge.models]
    references = [str(toy_world.base), donor, str(toy_world.specialists["reverse"])]
    merged, resident = _in_memory(recipe, references, str(toy_world.base), torch.float32)
    assert resident.resident_bytes(donor) == _factor_bytes(adapter)
    _check_plan_counts_the_adapter_low_rank(plan, resident, references, donor, _factor_bytes(adapter))
    exported = tmp_path / "recipe.yaml"
    exported.write_text(recipe.to_yaml())
    written = load_folder(merge_from_file(exported, tmp_path / "out"))
    for name, tensor in merged.items():
        assert torch.equal(tensor, written[name]), name


def _check_plan_counts_the_adapter_low_rank(plan, resident, references, donor, factor_bytes):
    """The memory plan counts an adapter donor by its factors and one tensor's forming, not as a
    model: against the same plan with the adapter donor counted as a full model, and against
    what the worker holds for it."""
    import dataclasses

    from evomerge.memory_plan import plan_memory, size_from_folder

    sizes = [size_from_folder(resident.folders[r]) for r in references]
    adapter_size = sizes[1]
    assert adapter_size.low_rank_bytes == factor_bytes  # read from the headers, as the test reads the file
    as_model = [*sizes[:1], dataclasses.replace(adapter_size, low_rank_bytes=None), *sizes[2:]]
    low, full = (plan_memory(s, base=0, workers=1, merge_dtype=torch.float32, devices=plan.device)
                 for s in (sizes, as_model))
    assert (low.device_bytes_per_worker, low.shared_host_bytes) == (plan.device_bytes_per_worker, plan.shared_host_bytes)
    model = adapter_size.bytes_in(torch.float32)
    assert full.shared_host_bytes - low.shared_host_bytes == model  # no model's pages for it
    # what the worker owns for it: the factors (measured), plus its tensors formed per merge (one
    # being merged and one read ahead, and a float32 delta): a few tensors, not a model
    without = plan_memory([sizes[0], sizes[2]], base=0, workers=1, merge_dtype=torch.float32, devices=plan.device)
    extra = low.device_bytes_per_worker - without.device_bytes_per_worker
    largest = max(s.largest() for s in sizes) * 4
    assert resident.resident_bytes(donor) <= extra - 2 * largest  # the worker holds no more than its share
    assert factor_bytes + 2 * largest <= extra <= factor_bytes + 5 * largest


def test_a_route_over_an_adapter_donor_sees_its_merged_tensors(lora, tmp_path):
    """Layer routes build modules over a resident model's tensors: an adapter donor's are formed
    in full on first use, equal to the folder ``evomerge merge`` writes for it."""
    from evomerge.merge.routing import resident_module

    base_ref, adapter_ref = str(lora["base16"]), f"{lora['base16']}+{lora['embed16']}"
    resident = ResidentModels([base_ref, adapter_ref], base_ref, dtype=torch.bfloat16)
    module = resident_module(resident, adapter_ref)
    written = load_folder(merge_from_config({"merge_method": "passthrough", "models": [{"model": adapter_ref}]},
                                            tmp_path / "out"))
    state = module.state_dict()
    for name, tensor in written.items():
        assert torch.equal(state[name], tensor), name
