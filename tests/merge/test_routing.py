"""Layer routing: the exported passthrough config and the in-memory routed model are one model.

The key test builds one route three ways (in memory from resident tensors, ``evomerge merge`` of
the exported config, mergekit on the same YAML) and holds their logits equal. The others check
what that rests on: the config round trip, no weight copied, a KV cache slot per position.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.errors import ConfigError, ModelError
from evomerge.merge.config import parse_merge_config
from evomerge.merge.inmemory import ResidentModels
from evomerge.merge.routing import (
    RoutedLayer,
    build_routed_model,
    layer_list_path,
    module_over_tensors,
    route_from_config,
    route_to_config,
    supports_scale,
)

from .test_merge_command import load_folder, run_merge
from .tiny_models import write_tiny_llama

# float32 logits of the in-memory model against a merged folder: the only difference is scaling
# a projection's output (hook) instead of its weight (mergekit), a rounding-level difference
LOGITS_ATOL = 1e-5


# -- the exported form ---------------------------------------------------------------------------

routes = st.lists(
    st.builds(
        RoutedLayer,
        model=st.sampled_from(["a", "b", "merged", "org/model"]),
        layer=st.integers(0, 7),
        scale=st.one_of(st.just(1.0), st.sampled_from([0.0, 0.5, 0.8, 1.2]), st.floats(-4, 4, allow_nan=False)),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(routes)
def test_route_round_trips_through_config_and_yaml(route):
    config = route_to_config(route, dtype="float32")
    assert route_from_config(config) == route
    reread = parse_merge_config(yaml.safe_load(config.to_yaml()))
    assert route_from_config(reread) == route
    # slices are maximal: no two neighbours could have been one slice
    spans = [(s.sources[0].model, *s.sources[0].layer_range, route_from_config(
        config.model_copy(update={"slices": [s]}))[0].scale) for s in config.slices]
    for (m0, _, end0, s0), (m1, start1, _, s1) in itertools.pairwise(spans):
        assert not (m0 == m1 and end0 == start1 and s0 == s1)


def test_route_config_joins_runs_and_scales_only_residual_outputs():
    route = [RoutedLayer("a", 0), RoutedLayer("a", 1), RoutedLayer("a", 1), RoutedLayer("a", 2, 0.5),
             RoutedLayer("a", 3, 0.5), RoutedLayer("b", 4)]
    config = route_to_config(route, dtype="bfloat16")
    assert config.merge_method == "passthrough" and config.dtype == "bfloat16"
    assert [(s.sources[0].model, s.sources[0].layer_range) for s in config.slices] == [
        ("a", (0, 2)), ("a", (1, 2)), ("a", (2, 4)), ("b", (4, 5))]
    scale = yaml.safe_load(config.to_yaml())["slices"][2]["sources"][0]["parameters"]["scale"]
    assert scale == [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": 0.5}, {"value": 1.0}]
    assert all(s.sources[0].parameters is None for i, s in enumerate(config.slices) if i != 2)


def _passthrough(**slice_overrides) -> dict:
    source = {"model": "a", "layer_range": [0, 2], **slice_overrides.pop("source", {})}
    return {"merge_method": "passthrough", "slices": [{"sources": [source], **slice_overrides}]}


_SCALE = [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": 0.5}, {"value": 1.0}]


@pytest.mark.parametrize("data, where", [
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}]}, "merge_method"),
    ({"merge_method": "passthrough", "models": [{"model": "a"}]}, "models"),
    ({**_passthrough(), "base_model": "a"}, "base_model"),
    ({**_passthrough(), "parameters": {"scale": 0.5}}, "parameters"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]},
                                                             {"model": "b", "layer_range": [0, 2]}]}]}, "slices[0].sources"),
    (_passthrough(source={"parameters": {"scale": 0.5}}), "slices[0].sources[0].parameters.scale"),
    (_passthrough(source={"parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}),
     "slices[0].sources[0].parameters.scale"),
    (_passthrough(source={"parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": 0.7},
                                                   {"value": 1.0}]}}), "slices[0].sources[0].parameters.scale"),
    (_passthrough(source={"parameters": {"scale": [{"filter": "o_proj", "value": [0.5, 1.0]}, {"filter": "down_proj", "value": 0.5},
                                                   {"value": 1.0}]}}), "slices[0].sources[0].parameters.scale"),
    (_passthrough(source={"parameters": {"weight": 0.5}}), "slices[0].sources[0].parameters.weight"),
    (_passthrough(parameters={"scale": _SCALE}, source={"parameters": {"scale": _SCALE}}), "slices[0].parameters.scale"),
])
def test_route_from_config_refuses_what_route_to_config_does_not_write(data, where):
    with pytest.raises(ConfigError) as err:
        route_from_config(parse_merge_config(data))
    assert err.value.where == where


def test_scale_on_the_slice_reads_as_on_the_source():
    assert route_from_config(parse_merge_config(_passthrough(parameters={"scale": _SCALE}))) == [
        RoutedLayer("a", 0, 0.5), RoutedLayer("a", 1, 0.5)]


def test_supports_scale_only_where_the_filters_name_output_projections(toy_world):
    from evomerge.merge.model_folder import ModelFolder

    assert supports_scale(ModelFolder(str(toy_world.base)).tensor_names)
    gpt2 = [f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_proj.weight")]
    assert not supports_scale(gpt2)
    fused_experts = ["model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.experts.down_proj"]
    assert not supports_scale(fused_experts)
    assert not supports_scale(["model.embed_tokens.weight"])


# -- the in-memory form --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(toy_world):
    """The toy models resident as a search worker holds them, and a module over each."""
    refs = {"base": str(toy_world.base), **{k: str(v) for k, v in toy_world.specialists.items()}}
    resident = ResidentModels(list(refs.values()), refs["base"])
    modules = {ref: module_over_tensors(ref, resident.tensors[ref]) for ref in refs.values()}
    return refs, resident, modules


def example_route(refs: dict[str, str]) -> list[RoutedLayer]:
    """Six layers from three models: one layer repeated, some scaled, head from a specialist."""
    base, arith, reverse = refs["base"], refs["arith"], refs["reverse"]
    return [RoutedLayer(base, 0), RoutedLayer(arith, 1), RoutedLayer(arith, 1, 0.8), RoutedLayer(reverse, 2),
            RoutedLayer(arith, 3), RoutedLayer(reverse, 3, 1.2)]


def token_batch() -> torch.Tensor:
    ids = torch.randint(3, 48, (4, 14), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1  # BOS
    return ids


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_module_over_tensors_shares_storage_and_equals_from_pretrained(world):
    from transformers import AutoModelForCausalLM

    refs, resident, modules = world
    ref = refs["arith"]
    model = modules[ref]
    for name, param in model.named_parameters():
        assert param.data_ptr() == resident.tensors[ref][name].data_ptr(), name
    loaded = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32)
    for (name, ours), (_, theirs) in zip(model.named_buffers(), loaded.named_buffers()):
        assert torch.equal(ours, theirs), name  # rotary frequencies recomputed as transformers does
    ids = token_batch()
    assert torch.equal(logits(model, ids), logits(loaded, ids))


def test_routed_model_copies_no_weight_and_leaves_its_sources_alone(world):
    refs, resident, modules = world
    route = example_route(refs)
    routed = build_routed_model(route, modules)
    prefix = layer_list_path(routed)
    assert prefix == "model.layers" and len(routed.model.layers) == len(route) == routed.config.num_hidden_layers
    checked = 0
    for name, param in routed.named_parameters(remove_duplicate=False):
        if name.startswith(prefix + "."):
            position, rest = name[len(prefix) + 1:].split(".", 1)
            step = route[int(position)]
            source = resident.tensors[step.model][f"{prefix}.{step.layer}.{rest}"]
        else:  # embeddings from the first model, final norm and head from the last (mergekit's slices)
            source = resident.tensors[route[0].model if "embed" in name else route[-1].model][name]
        assert param.data_ptr() == source.data_ptr(), name
        checked += 1
    assert checked == len(resident.tensors[refs["base"]]) + 2 * 9  # 4 source layers -> 6, 9 tensors a layer
    # the routed model's clones carry their own positions and hooks; the sources keep theirs
    assert [layer.self_attn.layer_idx for layer in routed.model.layers] == list(range(6))
    for module in modules.values():
        assert module.config.num_hidden_layers == 4 and len(module.model.layers) == 4
        assert [layer.self_attn.layer_idx for layer in module.model.layers] == [0, 1, 2, 3]
        assert not any(m._forward_hooks for m in module.modules())


def test_routed_logits_equal_evomerge_merge_and_mergekit(world, tmp_path):
    """The exported config, merged by evomerge and by mergekit, is the model the worker built."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run
    from mergekit.options import MergeOptions
    from transformers import AutoModelForCausalLM

    refs, _, modules = world
    route = example_route(refs)
    config = route_to_config(route, dtype="float32")
    result = run_merge(config.to_yaml(), tmp_path / "evo")
    assert result.returncode == 0, result.stderr
    mergekit_run(MergeConfiguration.model_validate(yaml.safe_load(config.to_yaml())), str(tmp_path / "mk"),
                 MergeOptions(copy_tokenizer=False, quiet=True))

    # the filtered scale resolves alike in both engines: every tensor is equal, bit for bit
    ours_tensors, theirs_tensors = load_folder(tmp_path / "evo"), load_folder(tmp_path / "mk")
    assert set(ours_tensors) == set(theirs_tensors) and len(ours_tensors) == 3 + 6 * 9
    assert all(torch.equal(ours_tensors[k], theirs_tensors[k]) for k in theirs_tensors)

    ids = token_batch()
    in_memory = logits(build_routed_model(route, modules), ids)
    ours = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "evo", dtype=torch.float32), ids)
    theirs = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "mk", dtype=torch.float32), ids)
    assert torch.equal(ours, theirs)
    assert (in_memory - ours).abs().max().item() <= LOGITS_ATOL
    # and the route matters: the scales alone move the logits far beyond that tolerance
    unscaled = [RoutedLayer(s.model, s.layer) for s in route]
    assert (logits(build_routed_model(unscaled, modules), ids) - ours).abs().max().item() > 100 * LOGITS_ATOL


def _cached_step_error(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """|logits of the last token computed from the KV cache - computed without it|."""
    with torch.no_grad():
        past = model(ids[:, :-1], use_cache=True).past_key_values
        step = model(ids[:, -1:], past_key_values=past, use_cache=True).logits[:, -1]
        full = model(ids, use_cache=False).logits[:, -1]
    return (step - full).abs().max().item()


def test_generate_with_cache_equals_without_when_a_layer_repeats(world):
    from transformers import AutoTokenizer

    refs, _, modules = world
    routed = build_routed_model(example_route(refs), modules)
    tokenizer = AutoTokenizer.from_pretrained(refs["base"])
    ids = tokenizer(["neg:3719=", "rev:abcd="], return_tensors="pt").input_ids

    def generate(use_cache: bool) -> torch.Tensor:
        with torch.no_grad():
            return routed.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=use_cache,
                                   pad_token_id=tokenizer.pad_token_id)

    cached = generate(True)
    assert cached.shape == (2, ids.shape[1] + 8)
    assert torch.equal(cached, generate(False))
    assert _cached_step_error(routed, token_batch()) <= LOGITS_ATOL
    # Negative check: with each layer keeping its source's layer_idx (what stacking the source
    # layer objects themselves gives), the repeated layer 1 writes its keys twice into one cache
    # slot and the reused layer 3 shares a slot with another model's layer 3: the cache is wrong.
    for layer, step in zip(routed.model.layers, example_route(refs)):
        layer.self_attn.layer_idx = step.layer
    assert _cached_step_error(routed, token_batch()) > 1e-2


def test_tied_heads_follow_the_first_models_embeddings(tmp_path):
    """A tied model has no lm_head tensor: the exported merge ties the head to the first slice's
    embeddings, and so must the in-memory model."""
    from transformers import AutoModelForCausalLM

    base = write_tiny_llama(tmp_path / "base", seed=0, tie_word_embeddings=True)
    donor = write_tiny_llama(tmp_path / "donor", seed=1, base=base, scale=0.5, tie_word_embeddings=True)
    resident = ResidentModels([str(base), str(donor)], str(base))
    modules = {ref: module_over_tensors(ref, resident.tensors[ref]) for ref in (str(base), str(donor))}
    route = [RoutedLayer(str(base), 0), RoutedLayer(str(donor), 1, 0.5), RoutedLayer(str(donor), 1)]
    routed = build_routed_model(route, modules)
    assert routed.lm_head.weight is routed.model.embed_tokens.weight is modules[str(base)].model.embed_tokens.weight
    assert run_merge(route_to_config(route, dtype="float32").to_yaml(), tmp_path / "evo").returncode == 0
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "evo", dtype=torch.float32)
    assert (logits(routed, ids) - logits(merged, ids)).abs().max().item() <= LOGITS_ATOL


def test_per_layer_config_lists_follow_the_route(tmp_path):
    """A Qwen2 with sliding-window layers: each routed layer keeps its source's attention type,
    in memory and in the merged folder's config, and the cache works across both kinds.

    (mergekit 0.1.5 cannot write this merge with transformers 5: it keeps the source's 4
    ``layer_types`` for 6 layers, which the config refuses on save.)"""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, use_sliding_window=True, sliding_window=3,
                         max_window_layers=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen")
    ref = str(tmp_path / "qwen")
    resident = ResidentModels([ref], ref)
    route = [RoutedLayer(ref, 2), RoutedLayer(ref, 0), RoutedLayer(ref, 2, 0.7), RoutedLayer(ref, 3), RoutedLayer(ref, 1)]
    routed = build_routed_model(route, {ref: module_over_tensors(ref, resident.tensors[ref])})
    kinds = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    assert routed.config.layer_types == kinds
    assert run_merge(route_to_config(route, dtype="float32").to_yaml(), tmp_path / "evo").returncode == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "evo", dtype=torch.float32)
    assert merged.config.layer_types == kinds
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))  # longer than the window
    assert (logits(routed, ids) - logits(merged, ids)).abs().max().item() <= LOGITS_ATOL
    assert _cached_step_error(routed, ids) <= LOGITS_ATOL


def test_build_routed_model_refuses_what_it_cannot_build(world):
    from transformers import AutoConfig, AutoModelForCausalLM

    refs, _, modules = world
    with pytest.raises(ModelError, match=r"route\[1\]: no module for model 'elsewhere'"):
        build_routed_model([RoutedLayer(refs["base"], 0), RoutedLayer("elsewhere", 0)], modules)
    with pytest.raises(ModelError, match=r"route\[0\]: layer 4 of .* which has 4 layers"):
        build_routed_model([RoutedLayer(refs["base"], 4)], modules)
    with pytest.raises(ConfigError, match="at least one layer"):
        build_routed_model([], modules)
    with torch.device("meta"):
        hollow = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(refs["base"]))
    with pytest.raises(ModelError, match="meta device"):
        build_routed_model([RoutedLayer("hollow", 0)], {"hollow": hollow})


def test_module_over_tensors_refuses_missing_and_foreign_tensors(world):
    refs, resident, _ = world
    tensors = dict(resident.tensors[refs["base"]])
    missing = {k: v for k, v in tensors.items() if k != "model.norm.weight"}
    with pytest.raises(ModelError, match=r"meta device\): model\.norm\.weight"):
        module_over_tensors(refs["base"], missing)
    with pytest.raises(ModelError, match="does not have: model.extra.weight"):
        module_over_tensors(refs["base"], {**tensors, "model.extra.weight": torch.zeros(2)})


@pytest.mark.slow
def test_lm_eval_scores_a_routed_model_as_the_model_it_routes(world):
    """The worker's path: lm-eval's HFLM over a live routed model. A specialist's identity route
    scores exactly as the specialist does, and scoring leaves the source modules unchanged."""
    from transformers import AutoTokenizer

    from evomerge.evaluate import LmEvalScorer

    refs, _, modules = world
    tokenizer = AutoTokenizer.from_pretrained(refs["base"])
    scorer = LmEvalScorer(["toy_arith", "toy_reverse"], limit=20)
    identity = build_routed_model([RoutedLayer(refs["arith"], i) for i in range(4)], modules)
    expected = scorer.score(modules[refs["arith"]], tokenizer)
    assert expected["task:toy_arith/acc"] == 1.0  # the specialist solves its skill
    assert scorer.score(identity, tokenizer) == expected
    scorer.score(build_routed_model(example_route(refs), modules), tokenizer)
    assert all(m.config.num_hidden_layers == 4 and len(m.model.layers) == 4 for m in modules.values())
