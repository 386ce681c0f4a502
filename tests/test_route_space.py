"""The route section of a space file, the random-key encoding, and routed recipes.

What could go wrong and is checked here: a bad route refused with the field named; a point of
the cube decoding to a route outside the depth bounds, out of slot order, or with a scale off
its range; the starting point not being the starting route; a routed recipe not surviving the
trial log or exporting as something mergekit-multi cannot read.
"""

from __future__ import annotations

import copy
import random

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.errors import ConfigError
from evomerge.recipe import MERGED_STAGE, Recipe
from evomerge.space import SearchSpace
from evomerge.space_config import parse_space_config

LAYERS = 4


def route_space(**route) -> dict:
    data = {
        "name": "r",
        "models": {"base": "m/base", "donors": ["m/arith", "m/reverse"]},
        "route": {"pool": ["arith", "reverse"], "repeats": 2, "depth": [3, 6], **route},
        "objectives": [{"task": "toy_arith", "metric": "acc", "direction": "maximize"}],
        "search": {"driver": "cma", "budget": 8},
    }
    return data


def joint_space(**route) -> dict:
    data = route_space(pool=["merged", "arith"], repeats=1, depth=[4, 6], **route)
    data["merge"] = {"method": "task_arithmetic", "parameters": {"weight": {"range": [0, 1]}}}
    return data


def build(data: dict) -> SearchSpace:
    cfg = parse_space_config(copy.deepcopy(data), source="s.yaml")
    return SearchSpace(cfg, LAYERS)


def refused(data: dict, *, layers: int | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        cfg = parse_space_config(copy.deepcopy(data), source="s.yaml")
        if layers is not None:
            SearchSpace(cfg, layers)
    return str(info.value)


@pytest.mark.parametrize(
    ("change", "where", "hint"),
    [
        (dict(pool=["arith", "revrese"]), "route.pool[1]", "reverse"),
        (dict(pool=["arith", "arith"]), "route.pool[1]", "listed twice"),
        (dict(pool=["merged", "arith"]), "route.pool", "merge:"),
        (dict(depth=[5, 2]), "route.depth", "write [min, max]"),
        (dict(depth=[0, 2]), "route.depth", "at least 1"),
        (dict(scale=3.0), "route.scale", "at most 2"),
        (dict(scale=-0.5), "route.scale", "above 0"),
        (dict(scale={"range": [0.5, 2.5]}), "route.scale.range", "(0, 2]"),
        (dict(scale={"range": [1.5, 0.5]}), "route.scale.range", "write [low, high]"),
        (dict(scale={"range": [0.5, 1.5], "init": 1.8}), "route.scale.init", "outside range"),
        (dict(init=[["arith", 0], ["base", 1], ["arith", 2]]), "route.init[1]", "not in route.pool"),
        (dict(init=[["arith", l] for l in range(4)] * 2), "route.init", "outside route.depth"),
        (dict(repeats=0), "route.repeats", ""),
        (dict(dtype="float8"), "route.dtype", "float32"),
        (dict(shape=[1]), "route.shape", "Known fields here"),
    ],
)
def test_bad_route_is_refused_naming_the_field(change, where, hint):
    message = refused(route_space(**change))
    assert f"s.yaml: {where}" in message and hint in message


def test_checks_that_need_the_layer_count_name_the_field():
    assert "route.depth" in refused(route_space(depth=[3, 17]), layers=LAYERS)  # 2 x 4 x 2 = 16 slots
    assert "route.init[0]" in refused(route_space(init=[["arith", 4], ["arith", 1], ["arith", 2]]), layers=LAYERS)
    # the same layer three times needs three repeats
    message = refused(route_space(init=[["arith", 1]] * 3), layers=LAYERS)
    assert "route.init[2]" in message and "route.repeats" in message


def test_whole_space_mistakes_are_refused():
    no_merge_no_route = route_space()
    del no_merge_no_route["route"]
    assert "merge" in refused(no_merge_no_route)
    unused = route_space()
    unused["merge"] = {"method": "task_arithmetic"}
    assert "never uses the parameter merge" in refused(unused)
    both = joint_space(merged="runs/x")
    assert "route.merged" in refused(both)
    l2 = route_space()
    l2["objectives"].append({"measure": "l2_from_base", "direction": "minimize"})
    assert "objectives[1]" in refused(l2) and "routed model" in refused(l2)
    clash = joint_space(dtype="bfloat16")
    assert "route.dtype" in refused(clash)


def test_layout_is_layer_major_and_coordinates_are_named():
    space = build(route_space(scale={"range": [0.5, 1.5]}))
    keys = [n for n in space.names if n.startswith("route/r") and not n.endswith("/scale")]
    assert keys[:4] == ["route/r0/l0/arith", "route/r0/l0/reverse", "route/r0/l1/arith", "route/r0/l1/reverse"]
    assert len(keys) == 16 and keys[-1] == "route/r1/l3/reverse"
    assert "route/depth" in space.names
    assert sum(n.endswith("/scale") for n in space.names) == 16


def test_the_starting_point_is_the_starting_route():
    init = [["arith", 0], ["reverse", 1], ["reverse", 1], ["arith", 3]]
    space = build(route_space(init=init))
    recipe = space.decode(space.from_unit(space.initial_unit()))
    from evomerge.merge.routing import route_from_config

    layers = route_from_config(recipe.route)
    assert [(l.model, l.layer) for l in layers] == [("m/arith", 0), ("m/reverse", 1), ("m/reverse", 1), ("m/arith", 3)]
    # no init: the first pool model's layers in order
    space = build(route_space())
    layers = route_from_config(space.decode(space.from_unit(space.initial_unit())).route)
    assert [(l.model, l.layer) for l in layers] == [("m/arith", i) for i in range(4)]


def test_decode_takes_the_largest_keys_in_slot_order():
    space = build(route_space(scale={"range": [0.5, 1.5]}))
    values = {n: 0.0 for n in space.names}
    values["route/depth"] = 3.4  # rounds to 3
    values["route/r1/l0/arith"] = 0.9
    values["route/r0/l2/reverse"] = 0.7
    values["route/r0/l3/arith"] = 0.8
    values["route/r0/l1/arith"] = 0.6  # the 4th largest: left out
    for n in space.names:
        if n.endswith("/scale"):
            values[n] = 1.0
    values["route/r0/l3/arith/scale"] = 1.25
    from evomerge.merge.routing import route_from_config

    layers = route_from_config(space.decode(values).route)
    assert [(l.model, l.layer, l.scale) for l in layers] == [
        ("m/reverse", 2, 1.0), ("m/arith", 3, 1.25), ("m/arith", 0, 1.0)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-0.5, 1.5, allow_nan=False), min_size=1 + 16 + 16, max_size=1 + 16 + 16))
def test_every_point_of_the_cube_is_a_valid_route(x):
    from evomerge.merge.routing import route_from_config

    space = build(route_space(scale={"range": [0.5, 1.5]}))
    layers = route_from_config(space.decode(space.from_unit(x)).route)
    assert 3 <= len(layers) <= 6
    assert all(0.5 <= l.scale <= 1.5 and 0 <= l.layer < LAYERS for l in layers)
    assert {l.model for l in layers} <= {"m/arith", "m/reverse"}


def test_joint_recipe_names_the_merge_stage_and_round_trips():
    space = build(joint_space())
    rng = random.Random(0)
    recipe = space.decode(space.from_unit([rng.random() for _ in range(space.unit_dimension)]))
    assert recipe.merge is not None and recipe.route is not None
    assert MERGED_STAGE in recipe.route.referenced_models() or all(
        m != MERGED_STAGE for m in recipe.route.referenced_models())
    again = Recipe.from_json(recipe.to_json())
    assert again == recipe and again.to_json() == recipe.to_json()
    docs = list(yaml.safe_load_all(recipe.to_yaml()))
    assert [d.get("name") for d in docs] == [MERGED_STAGE, None]
    assert docs[0]["merge_method"] == "task_arithmetic" and docs[1]["merge_method"] == "passthrough"
    # the merge's coordinates and the route's are both in the recipe's params
    assert any(k.startswith("route/") for k in recipe.params) and any(k.endswith("/weight") for k in recipe.params)


def test_route_only_recipe_exports_one_passthrough_config():
    space = build(route_space())
    recipe = space.decode(space.from_unit(space.initial_unit()))
    assert recipe.merge is None
    docs = list(yaml.safe_load_all(recipe.to_yaml()))
    assert len(docs) == 1 and docs[0]["merge_method"] == "passthrough" and "name" not in docs[0]


def test_optuna_sees_the_same_coordinates():
    space = build(joint_space())
    dists = space.optuna_distributions()
    assert set(dists) == set(space.names)
    assert dists["route/depth"].low == 4 and dists["route/depth"].high == 6


def test_route_merged_from_a_run_folder_is_its_best_trial_written_inline(tmp_path):
    """Two stages: route.merged names a run of parameter merges; the route run gets the best
    trial's merge (as `export --best` picks it) copied into its own config, not the path."""
    from optuna.distributions import FloatDistribution

    from evomerge.prepare import resolve_merged
    from evomerge.store import RunStore

    stage1 = build(joint_space())  # its merge part decodes parameter merges over m/base, m/arith
    store = RunStore.create(tmp_path, "stage1", "x: 1\n", "0" * 64, directions={"task:toy_arith/acc": "maximize"})
    merges = {}
    for number, (weight, score) in enumerate([(0.2, 0.1), (0.9, 0.8), (0.5, 0.4)]):
        values = {n: 0.5 for n in stage1.names} | {"g0/*/arith/weight": weight}
        merge = stage1.decode(values).merge
        recipe = Recipe(merge=merge, params={})
        t = store.start_trial({"w": weight}, {"w": FloatDistribution(0, 1)}, {"recipe": recipe.to_json()})
        store.complete_trial(t, {"task:toy_arith/acc": score})
        merges[number] = merge
    store.close()

    data = route_space(pool=["merged", "arith"], merged=str(tmp_path / "stage1"))
    config = resolve_merged(parse_space_config(data, source="s.yaml"))
    assert isinstance(config.route.merged, dict)
    space = SearchSpace(config, LAYERS)
    assert space.decode(space.from_unit(space.initial_unit())).merge == merges[1]
    # what is written to the run folder loads back to the same config
    assert parse_space_config(yaml.safe_load(config.to_yaml()), source="again") == config

    # a merge over models the space does not list cannot be held by the workers
    other = route_space(pool=["merged", "arith"], merged=str(tmp_path / "stage1"))
    other["models"]["base"] = "m/other"
    with pytest.raises(ConfigError, match="route.merged"):
        resolve_merged(parse_space_config(other, source="s.yaml"))
    with pytest.raises(ConfigError, match="neither a run folder"):
        resolve_merged(parse_space_config(route_space(pool=["merged"], merged=str(tmp_path / "nope")), source="s.yaml"))
