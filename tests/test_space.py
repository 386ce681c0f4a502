"""The search space: names, encodings, and decoding into configs the merge planner accepts."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evomerge.errors import ConfigError
from evomerge.merge.model_folder import ModelFolder
from evomerge.merge.plan import plan_merge
from evomerge.space import Coordinate, SearchSpace
from evomerge.space_config import SpaceConfig, load_space_config, parse_space_config

from .merge.tiny_models import write_tiny_llama
from .test_space_config import REPO, _plausible_configs, minimal_config

NUM_LAYERS = 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny 4-layer base and two fine-tunes of it, as real Hugging Face folders."""
    root = tmp_path_factory.mktemp("space_models")
    base = write_tiny_llama(root / "base", seed=0)
    return {
        "base": str(base),
        "arith": str(write_tiny_llama(root / "arith", seed=1, base=base)),
        "reverse": str(write_tiny_llama(root / "reverse", seed=2, base=base)),
    }


@pytest.fixture(scope="module")
def opened(folders: dict[str, str]) -> dict[str, ModelFolder]:
    return {ref: ModelFolder(ref) for ref in folders.values()}


def config_for(
    folders: dict[str, str], merge: dict[str, Any], donors: tuple[str, ...] = ("arith", "reverse")
) -> SpaceConfig:
    models = {"base": folders["base"], "donors": [{"model": folders[d], "name": d} for d in donors]}
    return parse_space_config(minimal_config(models=models, merge=merge))


def values_for(space: SearchSpace) -> st.SearchStrategy[dict[str, float | str]]:
    """Valid named values: each float in its range, each choice among its choices."""
    return st.fixed_dictionaries(
        {
            c.name: st.sampled_from(c.choices)
            if c.choices is not None
            else st.floats(c.low, c.high, allow_nan=False)  # type: ignore[arg-type]
            for c in space.coordinates
        }
    )


TOY = load_space_config(REPO / "search_spaces" / "toy_ties.yaml")
TOY_SPACE = SearchSpace.from_config(TOY, NUM_LAYERS)
MIXED = parse_space_config(
    minimal_config(
        merge={
            "method": ["linear", "ties", "dare_ties", "task_arithmetic"],
            "layer_groups": 2,
            "filters": ["mlp"],
            "parameters": {"lambda": {"range": [0.01, 2.0], "log": True, "layer_groups": 1, "filters": []}},
        }
    )
)
MIXED_SPACE = SearchSpace.from_config(MIXED, NUM_LAYERS)


# -- names --------------------------------------------------------------------------------------


def test_toy_coordinates_are_named_by_group_filter_donor_and_parameter() -> None:
    names = TOY_SPACE.names
    # the method, weights per group x filter x donor, one density per donor, one lambda
    assert len(names) == 1 + 2 * 3 * 2 + 2 + 1
    assert names[0] == "method" and TOY_SPACE.coordinate("method").choices == ("task_arithmetic", "ties")
    assert "g0/self_attn/arith/weight" in names and "g1/*/reverse/weight" in names
    assert "g0/*/arith/density" in names and "g1/*/arith/density" not in names
    assert [n for n in names if n.endswith("/lambda")] == ["g0/*/lambda"]  # shared, one for the whole model
    assert len(set(names)) == len(names)


def test_categorical_method_and_shared_and_base_coordinates() -> None:
    methods = ("linear", "ties", "dare_ties", "task_arithmetic")
    assert MIXED_SPACE.coordinates[0] == Coordinate("method", choices=methods)
    names = MIXED_SPACE.names
    assert "g0/*/lambda" in names and "g1/*/lambda" not in names  # shared: no donor part
    assert "g1/mlp/base/weight" in names  # linear weighs the base too
    assert "g0/mlp/base/density" not in names
    assert MIXED_SPACE.unit_names()[:4] == [f"method={m}" for m in methods]
    assert MIXED_SPACE.unit_dimension == len(names) + 3


def test_layer_groups_that_do_not_divide_are_refused_with_the_field() -> None:
    with pytest.raises(ConfigError, match=r"merge\.layer_groups: 2 layer groups do not divide the models' 5 layers"):
        SearchSpace.from_config(TOY, 5)


def test_defaults_are_range_centres_or_init() -> None:
    defaults = TOY_SPACE.default_values()
    assert defaults["g0/mlp/arith/weight"] == pytest.approx(0.6)  # centre of the toy file's [0, 1.2]
    assert defaults["g0/*/arith/density"] == pytest.approx(0.6)
    assert MIXED_SPACE.default_values()["g0/*/lambda"] == pytest.approx(math.sqrt(0.01 * 2.0))
    merge = {"method": "ties", "parameters": {"density": {"init": 0.9}}}
    space = SearchSpace.from_config(parse_space_config(minimal_config(merge=merge)), 4)
    assert space.default_values()["g0/*/arith/density"] == 0.9
    unit = MIXED_SPACE.initial_unit()
    assert unit[:4] == [0.5] * 4 and len(unit) == MIXED_SPACE.unit_dimension


# -- encodings ----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_unit_round_trip(data: st.DataObject) -> None:
    for space in (TOY_SPACE, MIXED_SPACE):
        values = data.draw(values_for(space))
        back = space.from_unit(space.to_unit(values))
        assert back.keys() == values.keys()
        for name, v in values.items():
            if isinstance(v, str):
                assert back[name] == v
            else:
                assert back[name] == pytest.approx(v, rel=1e-9, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_from_unit_clips_and_stays_in_bounds(data: st.DataObject) -> None:
    space = MIXED_SPACE
    n = space.unit_dimension
    x = data.draw(st.lists(st.floats(-5, 5, allow_nan=False), min_size=n, max_size=n))
    values = space.from_unit(x)
    for c in space.coordinates:
        v = values[c.name]
        if c.choices is not None:
            assert v in c.choices
        else:
            assert c.low <= v <= c.high  # type: ignore[operator]
    unit = space.to_unit(values)
    assert all(0.0 <= u <= 1.0 for u in unit)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.data())
def test_every_valid_config_decodes_every_point(data: st.DataObject) -> None:
    try:
        config = parse_space_config(data.draw(_plausible_configs()))
    except ConfigError:
        return
    space = SearchSpace.from_config(config, 12)  # 12 layers: any of 1..4 groups divides them
    x = data.draw(st.lists(st.floats(0, 1), min_size=space.unit_dimension, max_size=space.unit_dimension))
    recipe = space.decode(space.from_unit(x))
    assert recipe.merge.merge_method in config.merge.method
    assert set(recipe.params) <= set(space.names)


def test_unit_vector_mistakes_are_errors() -> None:
    with pytest.raises(ValueError, match="expected a vector of"):
        TOY_SPACE.from_unit([0.5])
    with pytest.raises(ValueError, match="NaN"):
        TOY_SPACE.from_unit([math.nan] * TOY_SPACE.unit_dimension)
    with pytest.raises(ValueError, match="values lack coordinates"):
        TOY_SPACE.to_unit({})


def test_argmax_picks_the_method_and_ties_go_to_the_first() -> None:
    x = MIXED_SPACE.initial_unit()
    assert MIXED_SPACE.from_unit(x)["method"] == "linear"
    x[2] = 0.9
    assert MIXED_SPACE.from_unit(x)["method"] == "dare_ties"


def test_optuna_distributions_match_the_coordinates() -> None:
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    dists = MIXED_SPACE.optuna_distributions()
    assert list(dists) == MIXED_SPACE.names
    assert dists["method"] == CategoricalDistribution(("linear", "ties", "dare_ties", "task_arithmetic"))
    assert dists["g0/*/lambda"] == FloatDistribution(0.01, 2.0, log=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask(dists)
    assert MIXED_SPACE.decode(trial.params).merge.merge_method == trial.params["method"]


# -- decoding -----------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_decode_repairs_by_clipping(data: st.DataObject) -> None:
    values = data.draw(st.fixed_dictionaries({n: st.sampled_from(c.choices) if c.choices else st.floats(-3, 3, allow_nan=False)
                                              for n, c in ((c.name, c) for c in TOY_SPACE.coordinates)}))
    recipe = TOY_SPACE.decode(values)
    for name, v in recipe.params.items():
        c = TOY_SPACE.coordinate(name)
        if c.choices is None:
            assert v == min(c.high, max(c.low, values[name]))  # type: ignore[type-var]


def test_decode_refuses_unknown_or_missing_coordinates() -> None:
    values = TOY_SPACE.default_values()
    with pytest.raises(ValueError, match="unknown coordinates"):
        TOY_SPACE.decode({**values, "g9/*/x/weight": 0.1})
    values.pop("g0/mlp/arith/weight")
    with pytest.raises(ValueError, match="lack coordinates"):
        TOY_SPACE.decode(values)
    with pytest.raises(ValueError, match="not one of"):
        MIXED_SPACE.decode({**MIXED_SPACE.default_values(), "method": "slerp"})


def test_decoded_config_is_complete_and_explicit() -> None:
    recipe = TOY_SPACE.decode({**TOY_SPACE.default_values(), "method": "ties"})
    merge = recipe.merge
    assert merge.merge_method == "ties" and merge.base_model == "toy_world/base"
    assert [m.model for m in merge.models] == ["toy_world/base", "toy_world/arith", "toy_world/reverse"]
    assert merge.parameters == {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0}  # normalize pinned in the file
    assert merge.dtype == "float32" and merge.random_seed is None  # ties draws no random numbers
    weight = merge.models[1].parameters["weight"]
    assert [c.filter for c in weight] == ["self_attn", "mlp", None]  # catch-all last
    assert all(len(c.value) == NUM_LAYERS for c in weight)
    assert merge.models[1].parameters["density"] == pytest.approx(0.6)


def test_unused_coordinates_of_a_searched_method_shape_nothing() -> None:
    values = MIXED_SPACE.default_values()
    a = MIXED_SPACE.decode({**values, "method": "task_arithmetic"})
    inert = {"g0/mlp/arith/density": 0.99, "g1/*/base/weight": 0.01}
    b = MIXED_SPACE.decode({**values, "method": "task_arithmetic", **inert})
    assert a == b
    assert not any("density" in n or "/base/" in n for n in a.params)
    assert a.merge.models[1].parameters["density"] == 1.0  # task_arithmetic's default, written out
    dare = MIXED_SPACE.decode({**values, "method": "dare_ties"})
    assert dare.merge.random_seed == 0  # stochastic: the seed is pinned for every trial
    linear = MIXED_SPACE.decode({**values, "method": "linear"})
    assert "weight" in linear.merge.models[0].parameters and "lambda" not in (linear.merge.parameters or {})


def _expected(space: SearchSpace, values: dict[str, Any], who: str | None, param: str, tensor: str) -> float:
    """The coordinate value ``tensor`` should get: its layer's group, its first matching filter."""
    resolved = space.params[param]
    first_filter = next((f for f in resolved.filters if f in tensor), "*")
    layer = int(tensor.split(".")[2]) if tensor.startswith("model.layers.") else 0  # others plan at t = 0
    group = layer // (NUM_LAYERS // resolved.layer_groups)
    return values[f"g{group}/{first_filter}/{who + '/' if who else ''}{param}"]


ALL_FOUR = {
    "method": ["ties", "dare_ties", "linear", "task_arithmetic"],
    "layer_groups": 2,
    "filters": ["self_attn", "mlp"],
    "parameters": {"lambda": {"layer_groups": 4, "filters": ["mlp"]}},
}


@pytest.mark.parametrize("method", ALL_FOUR["method"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_planner_accepts_decoded_configs_and_resolves_the_coordinate_values(
    folders: dict[str, str], opened: dict[str, ModelFolder], method: str, data: st.DataObject
) -> None:
    space = SearchSpace.from_config(config_for(folders, ALL_FOUR), NUM_LAYERS)
    values = {**data.draw(values_for(space)), "method": method}
    plan = plan_merge(space.decode(values).merge, opened)
    assert plan.num_layers == NUM_LAYERS and plan.method.name == method
    for task in plan.tasks:
        assert task.base_index == 0

        def expect(who: str | None, param: str, name: str = task.name) -> Any:
            return pytest.approx(_expected(space, values, who, param, name), abs=1e-12)

        if method == "linear":
            assert task.per_input[0]["weight"] == expect("base", "weight")
        for i, donor in enumerate(["arith", "reverse"], start=1):
            assert task.per_input[i]["weight"] == expect(donor, "weight")
            if method in ("ties", "dare_ties"):
                assert task.per_input[i]["density"] == expect(donor, "density")
        if method != "linear":
            assert task.shared["lambda"] == expect(None, "lambda")


def test_slerp_decodes_a_shared_t_per_group(folders: dict[str, str], opened: dict[str, ModelFolder]) -> None:
    config = config_for(folders, {"method": "slerp", "layer_groups": 4}, donors=("arith",))
    space = SearchSpace.from_config(config, NUM_LAYERS)
    assert space.names == [f"g{g}/*/t" for g in range(4)]
    values = {f"g{g}/*/t": g / 4 for g in range(4)}
    plan = plan_merge(space.decode(values).merge, opened)
    for task in plan.tasks:
        if task.name.startswith("model.layers."):
            assert task.shared["t"] == pytest.approx(int(task.name.split(".")[2]) / 4)
        else:
            assert task.shared["t"] == 0.0  # embeddings and head take the first value, as in mergekit
