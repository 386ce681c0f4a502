"""The space-file loader under generated input: it accepts, or raises ConfigError, nothing else.

tests/test_space_config.py throws random sections and plausible method/parameter mixes at it;
these go further: start from the shipped example files and mutate them where they are deepest
(drop a key, misspell it, give it a value of another type, add a stray key, at any path), and
feed raw text (broken YAML, YAML tags that would construct Python objects) through the file
loader. An accepted config must survive its own round trip, because that is what a run folder
stores and a resume reads back.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evomerge.errors import ConfigError
from evomerge.space_config import SpaceConfig, load_space_config, parse_space_config

from .conftest import ROOT

EXAMPLES = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "search_spaces").glob("*.yaml"))]

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.sampled_from(["ties", "dare_ties", "slerp", "cma", "tpe", "auto", "maximize", "acc",
                                          "l2_from_base", "postgresql://u:p@h/d", "mlp", "*", "0.5", "yes"]),
)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside ``node`` (dict keys and list indices)."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _parent(data: Any, path: tuple) -> Any:
    for part in path[:-1]:
        data = data[part]
    return data


@st.composite
def mutated_examples(draw: st.DrawFn) -> Any:
    data = copy.deepcopy(draw(st.sampled_from(EXAMPLES)))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = _parent(data, path), path[-1]
        action = draw(st.sampled_from(["drop", "misspell", "retype", "stray", "wrap"]))
        if action == "drop":
            del parent[key]
        elif action == "misspell" and isinstance(key, str) and key:
            i = draw(st.integers(0, len(key) - 1))
            typo = draw(st.sampled_from([key[:i] + key[i + 1:], key[:i] + key[i] + key[i:], key.upper(), key + "s"]))
            parent[typo] = parent.pop(key)
        elif action == "retype":
            parent[key] = draw(_values)
        elif action == "stray" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=6))] = draw(_values)
        elif action == "wrap":
            parent[key] = draw(st.sampled_from([[parent[key]], {"value": parent[key]}, str(parent[key])]))
    return data


def _check(data: Any) -> None:
    try:
        config = parse_space_config(data, source="fuzz.yaml", default_name="fuzz")
    except ConfigError as err:
        assert str(err).startswith("fuzz.yaml"), str(err)
        return
    assert isinstance(config, SpaceConfig)
    config.config_hash()
    assert parse_space_config(yaml.safe_load(config.to_yaml())) == config


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_examples())
def test_mutated_examples_are_accepted_or_config_errors(data: Any) -> None:
    _check(data)


_yaml_fragments = st.sampled_from([
    "models:", "  base: a/b", "  donors: [a/c, a/d]", "merge: {method: ties}", "search: {driver: cma, budget: 3}",
    "objectives: [{measure: l2_from_base, direction: minimize}]", "!!python/object/apply:os.system ['true']",
    "name: !!python/name:os.system", "&a [*a]", "? [1]\n: x", "key: 'unterminated", "\t- tab", "{", "%YAML 1.1",
    "--- \n...", "x: !!binary aGk=", "y: 2001-12-14", "z: 0x1F", "- list",
])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.lists(_yaml_fragments, max_size=8).map("\n".join), st.text(max_size=60)))
def test_any_file_text_is_accepted_or_a_config_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "space.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_space_config(path)
        except ConfigError as err:
            assert str(err).startswith(str(path)), str(err)
