from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evomerge.errors import ConfigError
from evomerge.merge.config import parse_merge_config
from evomerge.merge.params import evaluate_setting, resolve


def _gradient_by_hand(values: list[float], t: float) -> float:
    # mergekit's rule written out: position s on the list, linear between its neighbours
    s = t * (len(values) - 1)
    lo = math.floor(s)
    hi = min(len(values) - 1, lo + 1)
    return values[lo] + (values[hi] - values[lo]) * (s - lo)


@given(st.lists(st.floats(-10, 10), min_size=1, max_size=9), st.integers(0, 30), st.integers(1, 31))
def test_gradient_interpolates_like_mergekit(values, i, n):
    i = min(i, n - 1)
    t = i / (n - 1) if n > 1 else 1.0
    got = evaluate_setting(values, tensor_name="x", t=t, kind=float, name="weight")
    assert got == pytest.approx(_gradient_by_hand(values, t), abs=1e-9)


def test_gradient_with_one_value_per_layer_gives_each_layer_its_value():
    values = [0.1, 0.7, 0.3, 0.9, 0.5]
    n = len(values)
    got = [evaluate_setting(values, tensor_name="x", t=i / (n - 1), kind=float, name="w") for i in range(n)]
    assert got == pytest.approx(values)


def _settings(raw):
    """Run a raw parameters mapping through the config parser, as a file would be."""
    cfg = parse_merge_config({"merge_method": "linear", "models": [{"model": "m", "parameters": raw}]})
    return cfg.models[0].parameters


def test_first_matching_filter_wins_and_unmatched_falls_through():
    params = _settings({"weight": [{"filter": "self_attn", "value": 0.2}, {"filter": "mlp", "value": [0.0, 1.0]}]})
    assert evaluate_setting(params["weight"], tensor_name="model.layers.0.self_attn.q_proj.weight", t=0.5, kind=float, name="weight") == 0.2
    assert evaluate_setting(params["weight"], tensor_name="model.layers.0.mlp.up_proj.weight", t=0.25, kind=float, name="weight") == pytest.approx(0.25)
    assert evaluate_setting(params["weight"], tensor_name="model.norm.weight", t=0, kind=float, name="weight") is None
    catch_all = _settings({"weight": [{"filter": "mlp", "value": 1.0}, {"value": 0.5}]})
    assert evaluate_setting(catch_all["weight"], tensor_name="lm_head.weight", t=0, kind=float, name="weight") == 0.5


def test_scopes_are_searched_most_specific_first():
    model_scope = _settings({"weight": [{"filter": "mlp", "value": 0.9}]})
    top = _settings({"weight": 0.3})
    kw = dict(kind=float, default=None, required=True, t=0.0, where="x")
    assert resolve("weight", scopes=[model_scope, None, top], tensor_name="a.mlp.b", **kw) == 0.9
    assert resolve("weight", scopes=[model_scope, None, top], tensor_name="a.attn.b", **kw) == 0.3
    with pytest.raises(ConfigError, match="missing required parameter 'weight'"):
        resolve("weight", scopes=[model_scope, None], tensor_name="a.attn.b", **kw)
    assert resolve("density", scopes=[model_scope], tensor_name="a", kind=float, default=1.0, required=False, t=0, where="x") == 1.0


def test_bool_parameters_are_validated():
    assert evaluate_setting("true", tensor_name="x", t=0, kind=bool, name="normalize") is True
    with pytest.raises(ConfigError, match="normalize"):
        evaluate_setting(0.5, tensor_name="x", t=0, kind=bool, name="normalize")
    with pytest.raises(ConfigError, match="takes a number"):
        evaluate_setting("abc", tensor_name="x", t=0, kind=float, name="weight")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"merge_method": "ties", "models": [{"model": "a"}], "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]}, "exactly one of"),
        ({"merge_method": "ties"}, "exactly one of"),
        ({"merge_methd": "ties", "models": [{"model": "a"}]}, "Did you mean 'merge_method'"),
        ({"merge_method": "ties", "models": [{"model": "a", "paramters": {}}]}, "models\\[0\\].paramters: unknown field"),
        ({"merge_method": "ties", "models": [{"model": "a"}], "dtype": "fp8"}, "unknown dtype 'fp8'"),
        ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [3, 1]}]}]}, "layer_range"),
        ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 3]}]}]}, "same number of layers"),
        ({"merge_method": "linear", "modules": {}}, "'modules'"),
        (["not", "a", "mapping"], "expected a mapping"),
    ],
)
def test_bad_configs_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_merge_config(data, source="cfg.yaml")


def test_config_round_trips_through_yaml():
    import yaml

    data = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": [0.1, 0.5], "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.7}]}}],
        "parameters": {"normalize": True},
        "dtype": "float32",
    }
    cfg = parse_merge_config(data)
    assert parse_merge_config(yaml.safe_load(cfg.to_yaml())) == cfg
