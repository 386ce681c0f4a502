"""Recipes travel as JSON and come back equal; a broken recipe is a ConfigError, not a crash."""

from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.errors import ConfigError
from evomerge.merge.config import parse_merge_config
from evomerge.recipe import Recipe
from evomerge.space import SearchSpace

from .test_space import MIXED_SPACE, TOY_SPACE, values_for


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_json_round_trip(data: st.DataObject) -> None:
    space: SearchSpace = data.draw(st.sampled_from([TOY_SPACE, MIXED_SPACE]))
    recipe = space.decode(data.draw(values_for(space)))
    text = recipe.to_json()
    back = Recipe.from_json(text)
    assert back == recipe
    assert back.to_json() == text


def test_recipe_is_immutable() -> None:
    recipe = TOY_SPACE.decode(TOY_SPACE.default_values())
    with pytest.raises(TypeError):
        recipe.params["g0/mlp/arith/weight"] = 0.0  # type: ignore[index]
    with pytest.raises(AttributeError):
        recipe.merge = recipe.merge  # type: ignore[misc]


def test_exported_yaml_is_the_same_merge() -> None:
    recipe = MIXED_SPACE.decode({**MIXED_SPACE.default_values(), "method": "dare_ties"})
    assert parse_merge_config(yaml.safe_load(recipe.to_yaml())) == recipe.merge


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{", "not valid JSON"),
        ("[]", "with 'merge' and 'params'"),
        ('{"merge": {}, "params": {}, "extra": 1}', "with 'merge' and 'params'"),
        ('{"merge": {"merge_method": "ties"}, "params": {}}', r"recipe: merge: invalid merge config"),
        ('{"merge": {"merge_method": "ties", "models": [{"model": "a"}]}, "params": {"x": [1]}}', "'params' must map"),
    ],
)
def test_bad_recipe_json_is_a_config_error(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Recipe.from_json(text)


def test_nan_never_reaches_json() -> None:
    recipe = TOY_SPACE.decode(TOY_SPACE.default_values())
    bad = Recipe(merge=recipe.merge, params={"x": float("nan")})
    with pytest.raises(ValueError):
        bad.to_json()
    assert json.loads(recipe.to_json())["params"] == dict(recipe.params)
