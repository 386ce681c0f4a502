"""The space file schema: every bad input is a ConfigError naming the file, the field and a fix."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evomerge.errors import ConfigError
from evomerge.space_config import SpaceConfig, load_space_config, parse_space_config
from evomerge.space_config.identity import differences

REPO = Path(__file__).resolve().parents[1]


def minimal_config(**sections: Any) -> dict[str, Any]:
    """A small valid space file as data; keyword arguments replace whole sections."""
    data: dict[str, Any] = {
        "name": "t",
        "models": {"base": "m/base", "donors": ["m/arith", "m/reverse"]},
        "merge": {"method": "ties", "layer_groups": 2, "filters": ["self_attn", "mlp"]},
        "objectives": [
            {"task": "toy_arith", "metric": "acc", "direction": "maximize"},
            {"task": "toy_reverse", "metric": "acc", "direction": "maximize"},
        ],
        "search": {"driver": "cma", "budget": 10},
    }
    data.update(sections)
    return data


def write(tmp_path: Path, data: Any, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def error_of(tmp_path: Path, data: Any) -> str:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_space_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert info.value.exit_code == 2
    return message


def with_(path: str, value: Any, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """``minimal_config()`` with the dotted ``path`` set (``None`` value deletes the key)."""
    data = copy.deepcopy(data or minimal_config())
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    if value is None:
        del node[int(last) if isinstance(node, list) else last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


# -- the examples ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_loads(path: Path) -> None:
    config = load_space_config(path)
    assert config.name == (yaml.safe_load(path.read_text()).get("name") or path.stem)
    assert config.parameters() or config.route is not None  # something is searched
    assert parse_space_config(yaml.safe_load(config.to_yaml())) == config


def test_toy_example_is_what_the_readme_promises() -> None:
    config = load_space_config(REPO / "search_spaces" / "toy_ties.yaml")
    assert config.models.base == "toy_world/base"
    assert [d.name for d in config.models.donors] == ["arith", "reverse"]
    assert config.merge.method == ("task_arithmetic", "ties")
    assert config.merge.layer_groups == 2 and config.merge.filters == ("self_attn", "mlp")
    assert config.search.driver == "cma" and 80 <= config.search.budget <= 120
    assert config.workers.count == 2
    assert config.measurement_keys() == ["task:toy_arith/acc", "task:toy_reverse/acc"]


# -- bad input: one test per kind of mistake --------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "expected"),  # expected: a regex the message must contain
    [
        # misspelled fields, with a close match
        ("merge.methd", "ties", r"merge\.methd: unknown field\. Did you mean 'method'\?"),
        ("serch", {"driver": "cma"}, r"serch: unknown field\. Did you mean 'search'\?"),
        ("search.budjet", 5, r"search\.budjet: unknown field\. Did you mean 'budget'\?"),
        ("merge.parameters.weight", {"rang": [0, 1]}, r"merge\.parameters\.weight\.rang: unknown field\. Did you mean 'range'"),
        ("objectives.0.directon", "maximize", r"objectives\[0\]\.directon: unknown field\. Did you mean 'direction'"),
        # misspelled parameter: checked against the registry
        ("merge.parameters.densty", {"range": [0.1, 1]}, r"merge\.parameters\.densty: no chosen method takes 'densty'.*Did you mean 'density'"),
        # wrong types
        ("search.budget", "many", r"search\.budget: expected a whole number, got 'many'"),
        ("search.budget", 2.5, r"search\.budget: expected a whole number"),
        ("merge.layer_groups", True, r"merge\.layer_groups: expected a whole number"),
        ("merge.parameters.lambda", "1.0", r"merge\.parameters\.lambda: expected a number or true/false \(to pin it\) or a mapping"),
        ("merge.method", 3, r"merge\.method: expected a method name or a list of them"),
        ("merge.parameters.normalize", 1.0, r"merge\.parameters\.normalize: 'normalize' takes true or false, got 1\.0"),
        ("merge.parameters.lambda", True, r"merge\.parameters\.lambda: 'lambda' takes a number, got True"),
        ("models.donors", "m/arith", r"models\.donors: expected a list"),
        ("workers.count", 0, r"workers\.count: Input should be greater than or equal to 1"),
        ("workers.timeout_s", 0, r"workers\.timeout_s: Input should be greater than 0"),
        # ranges
        ("merge.parameters.density", {"range": [0.9, 0.2]}, r"merge\.parameters\.density\.range: low 0\.9 is above high 0\.2; write \[low, high\]"),
        ("merge.parameters.density", {"range": [0.5, 0.5]}, r"merge\.parameters\.density\.range: the range \[0\.5, 0\.5\] is empty; to pin"),
        ("merge.parameters.density", {"range": [0.1]}, r"merge\.parameters\.density\.range"),
        ("merge.parameters.density", {"range": [0.1, 0.5], "init": 0.9}, r"merge\.parameters\.density\.init: init 0\.9 lies outside"),
        ("merge.parameters.weight", {"range": [0.0, 1.0], "log": True}, r"merge\.parameters\.weight\.range: log: true needs a range above 0"),
        ("merge.parameters.density", {"range": [0.1, float("inf")]}, r"merge\.parameters\.density\.range: high must be a finite number"),
        # methods
        ("merge.method", "tie", r"merge\.method: unknown merge method 'tie'.*Did you mean 'ties'"),
        ("merge.method", ["ties", "dare_tie"], r"merge\.method\[1\]: unknown merge method 'dare_tie'.*'dare_ties'"),
        ("merge.method", "passthrough", r"merge\.method: passthrough copies one model per layer"),
        ("merge.method", ["ties", "ties"], r"merge\.method: a method is listed twice"),
        ("merge.method", "slerp", r"merge\.method: merge method 'slerp' takes exactly 2 models.*2 donor"),
        ("merge.dtype", "fp16", r"merge\.dtype: unknown dtype 'fp16'"),
        # filters
        ("merge.filters", ["*"], r"merge\.filters\[0\]: .*catch-all '\*' is always added"),
        ("merge.filters", ["mlp", "mlp"], r"merge\.filters: filters listed twice: mlp"),
        ("merge.filters", ["a/b"], r"merge\.filters\[0\]: filter 'a/b' contains '/'"),
        # objectives and constraints
        ("objectives.0.direction", None, r"objectives\[0\]\.direction: missing; write direction: maximize or direction: minimize"),
        ("objectives.0.direction", "maximise", r"objectives\[0\]\.direction: unknown direction 'maximise'.*'maximize'"),
        ("objectives.0.metric", None, r"objectives\[0\]\.metric: task 'toy_arith' needs a metric:"),
        ("objectives.1", {"measure": "l2", "direction": "minimize"}, r"objectives\[1\]\.measure: unknown measure 'l2'; evomerge computes l2_from_base"),
        ("objectives.1", {"task": "toy_arith", "metric": "acc", "direction": "maximize"}, r"objectives\[1\]: task:toy_arith/acc is already objectives\[0\]"),
        ("objectives", [], r"objectives: List should have at least 1 item|objectives: Tuple should have at least 1 item"),
        ("constraints", [{"measure": "l2_from_base"}], r"constraints\[0\]: constraint on l2_from_base has no bound; write max:"),
        ("constraints", [{"measure": "l2_from_base", "min": 2, "max": 1}], r"constraints\[0\]\.min: min 2\.0 is above max 1\.0"),
        # evaluation
        ("evaluation.lm_eval_args", {"limit": 5}, r"evaluation\.lm_eval_args\.limit: evomerge sets 'limit' itself: use evaluation\.items"),
        ("evaluation.tasks", {"toy_arth": {"items": 5}}, r"evaluation\.tasks\.toy_arth: no objective or constraint uses task 'toy_arth'.*'toy_arith'"),
        ("evaluation.items", 0, r"evaluation\.items: items must be at least 1"),
        ("evaluation.batch_size", "big", r"evaluation\.batch_size: expected a whole number or auto"),
        # search and workers
        ("search.driver", "cmaes", r"search\.driver: unknown driver 'cmaes'.*Did you mean 'cma'"),
        ("search.driver", "TPE", r"search\.driver: unknown driver 'TPE'"),
        ("search.sigma0", 0, r"search\.sigma0: Input should be greater than 0"),
        ("search.population", 1, r"search\.population: Input should be greater than or equal to 2"),
        ("search.budget", None, r"search\.budget: missing; this field is required"),
        ("storage", "runs.db", r"storage: 'runs\.db' is not a database URL"),
        # reserved sections
        ("route", [{"model": "m/base", "layers": [0, 2]}], r"route: expected a mapping"),
        ("name", "my run", r"name: run name 'my run' may hold only"),
    ],
)
def test_bad_input_names_field_and_fix(tmp_path: Path, path: str, value: Any, expected: str) -> None:
    data = with_(path, value)
    assert re.search(expected, error_of(tmp_path, data)), error_of(tmp_path, data)


def test_population_only_for_drivers_that_have_one(tmp_path: Path) -> None:
    data = with_("search", {"driver": "tpe", "budget": 10, "population": 8})
    assert "search.population: driver 'tpe' has no population" in error_of(tmp_path, data)
    data = with_("search", {"driver": "cma", "budget": 10, "population": 2, "lookahead": 1})
    assert "search.lookahead: a lookahead needs a population of at least 3" in error_of(tmp_path, data)
    data = with_("search", {"driver": "nsga2", "budget": 10, "population": 8, "sigma0": 0.3})
    assert "search.sigma0: driver 'nsga2' has no step size" in error_of(tmp_path, data)


def test_lookahead_only_for_cma_and_not_in_the_identity_unless_given(tmp_path: Path) -> None:
    data = with_("search", {"driver": "tpe", "budget": 10, "lookahead": 4})
    assert "search.lookahead: driver 'tpe' has no generations to look ahead of" in error_of(tmp_path, data)
    data = with_("search", {"driver": "cma", "budget": 10, "lookahead": -1})
    assert "search.lookahead" in error_of(tmp_path, data)
    plain = parse_space_config(minimal_config())
    assert plain.search.lookahead is None and "lookahead" not in plain.canonical_json()  # runs made before keep their hash
    given = parse_space_config(minimal_config(search={"driver": "cma", "budget": 5, "lookahead": 0}))
    assert given.config_hash() != plain.config_hash()


def test_cma_update_only_for_cma_one_of_two_and_without_a_lookahead(tmp_path: Path) -> None:
    data = with_("search", {"driver": "tpe", "budget": 10, "cma_update": "window"})
    assert "search.cma_update: driver 'tpe' has no CMA-ES update" in error_of(tmp_path, data)
    data = with_("search", {"driver": "cma", "budget": 10, "cma_update": "windows"})
    assert "search.cma_update: cma_update must be one of generations, window" in error_of(tmp_path, data)
    data = with_("search", {"driver": "cma", "budget": 10, "cma_update": "window", "lookahead": 4})
    assert "search.lookahead: cma_update: window samples every candidate when it is asked for" in error_of(tmp_path, data)
    plain = parse_space_config(minimal_config())
    assert "cma_update" not in plain.canonical_json()  # runs made before keep their hash
    window = parse_space_config(minimal_config(search={"driver": "cma", "budget": 5, "cma_update": "window"}))
    assert window.config_hash() != plain.config_hash()


def test_cma_step_size_is_written_out() -> None:
    assert parse_space_config(minimal_config()).search.sigma0 == 0.25
    tpe = parse_space_config(minimal_config(search={"driver": "tpe", "budget": 5}))
    assert tpe.search.sigma0 is None and tpe.search.population is None


def test_searched_parameter_no_chosen_method_takes_names_the_methods(tmp_path: Path) -> None:
    data = with_("models.donors", ["m/arith"])
    data = with_("merge", {"method": "slerp", "parameters": {"weight": {"range": [0, 1]}}}, data)
    message = error_of(tmp_path, data)
    assert "merge.parameters.weight: no chosen method takes 'weight' (slerp takes t)" in message


def test_parameter_a_method_ignores_cannot_be_searched(tmp_path: Path) -> None:
    data = with_("merge", {"method": "task_arithmetic", "parameters": {"density": {"range": [0.1, 1]}}})
    message = error_of(tmp_path, data)
    assert "merge.parameters.density: 'density' is not used by the merge for task_arithmetic" in message
    data = with_("merge", {"method": "ties", "parameters": {"normalize": {}}})
    assert "merge.parameters.normalize: 'normalize' is a flag for ties" in error_of(tmp_path, data)


def test_pinned_parameter_takes_no_search_options(tmp_path: Path) -> None:
    data = with_("merge.parameters", {"lambda": {"value": 1.0, "layer_groups": 2}})
    assert "merge.parameters.lambda.layer_groups: 'layer_groups' applies to searched parameters" in error_of(tmp_path, data)


def test_donors_must_be_distinct_and_named_apart(tmp_path: Path) -> None:
    data = with_("models.donors", ["a/x", "b/x"])
    assert "models.donors[1].name: two donors are named 'x'" in error_of(tmp_path, data)
    data = with_("models.donors", ["a/x", {"model": "b/x", "name": "x2"}])
    assert [d.name for d in load_space_config(write(tmp_path, data)).models.donors] == ["x", "x2"]
    data = with_("models.donors", [{"model": "m/base", "name": "b"}])
    assert "models.donors[0].model: 'm/base' is the base" in error_of(tmp_path, data)
    data = with_("models.donors", ["m/a", "m/a"])
    assert "models.donors[1].model: 'm/a' is listed twice" in error_of(tmp_path, data)
    data = with_("models.donors", [{"model": "x/y", "name": "base"}])
    assert "models.donors[0].name: the name 'base' is reserved" in error_of(tmp_path, data)


def test_several_errors_are_all_reported(tmp_path: Path) -> None:
    data = with_("search.driver", "cmaes", with_("workers.cont", 2))
    message = error_of(tmp_path, data)
    assert "search.driver" in message and "workers.cont" in message


def test_file_level_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such space file"):
        load_space_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_space_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: expected a mapping"):
        load_space_config(bad)
    bad.write_text("!!python/object:os.system {}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):  # safe_load refuses object tags
        load_space_config(bad)


# -- layer groups and filters, checked once the models are open -------------------------------------


def test_layer_groups_must_divide_the_layer_count(tmp_path: Path) -> None:
    config = load_space_config(write(tmp_path, minimal_config()))
    config.validate_against_models(4)
    with pytest.raises(ConfigError) as info:
        config.validate_against_models(5)
    assert str(info.value).startswith(f"{tmp_path / 'space.yaml'}: merge.layer_groups: 2 layer groups do not divide")
    assert "use one of 1, 5" in str(info.value)
    data = with_("merge.parameters", {"weight": {"layer_groups": 3}})
    config = load_space_config(write(tmp_path, data))
    with pytest.raises(ConfigError, match=r"merge\.parameters\.weight\.layer_groups: 3 layer groups"):
        config.validate_against_models(4)
    with pytest.raises(ConfigError, match=r"merge\.layer_groups: 2 layer groups do not divide the models' 1 layers"):
        load_space_config(write(tmp_path, minimal_config())).validate_against_models(1)


def test_filters_must_match_some_tensor(tmp_path: Path) -> None:
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
    config = load_space_config(write(tmp_path, minimal_config()))
    config.validate_against_models(2, names)
    config = load_space_config(write(tmp_path, with_("merge.filters", ["self_atn"])))
    with pytest.raises(ConfigError, match=r"merge\.filters\[0\]: filter 'self_atn' matches no tensor.*'self_attn'"):
        config.validate_against_models(2, names)


# -- what the registry decides by default -----------------------------------------------------------


def test_default_policy_for_ties_searches_registry_ranges_and_keeps_flags_at_defaults() -> None:
    config = parse_space_config(minimal_config())
    by_name = {p.name: p for p in config.parameters()}
    assert {n for n, p in by_name.items() if p.mode == "search"} == {"weight", "density", "lambda"}
    assert by_name["weight"].range == (0.0, 1.0) and by_name["weight"].per_model
    assert by_name["density"].range == (0.1, 1.0)
    assert {n for n, p in by_name.items() if p.mode == "default"} == {"normalize", "rescale", "int8_mask"}


def test_pinned_and_overridden_parameters() -> None:
    merge = {
        "method": ["task_arithmetic", "ties"],
        "layer_groups": 2,
        "filters": ["mlp"],
        "parameters": {"lambda": 1, "density": {"range": [0.3, 0.9], "layer_groups": 1, "filters": []}},
    }
    by_name = {p.name: p for p in parse_space_config(minimal_config(merge=merge)).parameters()}
    assert by_name["lambda"].mode == "fixed" and by_name["lambda"].value == 1.0
    density = by_name["density"]
    assert density.searched_by == ("ties",) and density.taken_by == ("task_arithmetic", "ties")
    assert (density.range, density.layer_groups, density.filters) == ((0.3, 0.9), 1, ())
    assert (by_name["weight"].layer_groups, by_name["weight"].filters) == (2, ("mlp",))


# -- identity of a run --------------------------------------------------------------------------


def test_name_defaults_to_the_file_stem(tmp_path: Path) -> None:
    data = with_("name", None)
    assert load_space_config(write(tmp_path, data, "night_run.yaml")).name == "night_run"


def test_normalised_yaml_loads_back_equal(tmp_path: Path) -> None:
    config = load_space_config(REPO / "search_spaces" / "toy_ties.yaml")
    again = load_space_config(write(tmp_path, yaml.safe_load(config.to_yaml())))
    assert again == config
    assert again.config_hash() == config.config_hash()


def test_hash_ignores_layout_and_resume_settings_but_not_the_search() -> None:
    data = minimal_config()
    config = parse_space_config(data)
    reordered = parse_space_config(dict(reversed(list(copy.deepcopy(data).items()))))
    assert reordered.config_hash() == config.config_hash()
    spelled_out = with_("merge.parameters", {"weight": {"range": [0, 1]}}, data)
    spelled_out["models"]["donors"] = [{"model": "m/arith", "name": "arith"}, "m/reverse"]
    assert parse_space_config(spelled_out).config_hash() == config.config_hash()
    resumed = with_("workers", {"count": 8, "gpus_per_worker": 1, "timeout_s": 30}, with_("search.budget", 500, data))
    resumed = with_("name", "other", with_("storage", "postgresql://db/x", resumed))
    assert parse_space_config(resumed).config_hash() == config.config_hash()
    assert config.diff(parse_space_config(resumed)) == []
    changed = parse_space_config(with_("search.seed", 1, with_("merge.parameters", {"density": {"range": [0.2, 1]}}, data)))
    assert changed.config_hash() != config.config_hash()
    assert config.diff(changed) == ["merge.parameters.density.range: [0.1, 1.0] -> [0.2, 1.0]", "search.seed: 0 -> 1"]
    assert "workers.count: 1 -> 8" in config.diff(parse_space_config(resumed), identity_only=False)


def test_the_config_diff_names_nested_paths_and_items_of_section_lists() -> None:
    old = {"a": 1, "b": {"c": [1, 2], "d": "x"}, "gone": 1, "objectives": [{"task": "t", "weight": 1.0}]}
    new = {"a": 1, "b": {"c": [1, 3], "d": "x"}, "new": 2, "objectives": [{"task": "t", "weight": 2.0}]}
    assert differences(old, new) == ["b.c: [1, 2] -> [1, 3]", "gone: 1 -> (absent)",
                                      "objectives[0].weight: 1.0 -> 2.0", "new: (absent) -> 2"]
    grown = {**new, "objectives": [*new["objectives"], {"task": "u"}]}  # another length: the list as a whole
    assert differences(new, grown) == [f"objectives: {json.dumps(new['objectives'])} -> {json.dumps(grown['objectives'])}"]


def test_config_is_frozen() -> None:
    config = parse_space_config(minimal_config())
    with pytest.raises(Exception):
        config.search.budget = 3  # type: ignore[misc]


# -- evaluation items -------------------------------------------------------------------------------


def test_item_indices_are_fixed_per_task_and_seed() -> None:
    data = with_("evaluation", {"items": 20, "seed": 3, "tasks": {"toy_reverse": {"items": [5, 1, 2]}}})
    evaluation = parse_space_config(data).evaluation
    first = evaluation.item_indices("toy_arith", 200)
    assert first == evaluation.item_indices("toy_arith", 200)
    assert first is not None and len(set(first)) == 20 and all(0 <= i < 200 for i in first) and first == sorted(first)
    assert evaluation.item_indices("toy_reverse", 200) == [1, 2, 5]
    with pytest.raises(ConfigError, match=r"evaluation\.items: asks for 20 items but task 'toy_arith' has 10"):
        evaluation.item_indices("toy_arith", 10)
    with pytest.raises(ConfigError, match=r"evaluation\.tasks\.toy_reverse\.items: item indices \[5\]"):
        evaluation.item_indices("toy_reverse", 4)
    assert parse_space_config(minimal_config()).evaluation.item_indices("toy_arith", 200) is None


# -- the loader never fails any other way ----------------------------------------------------------

_FIELD_NAMES = [
    "name", "models", "base", "donors", "model", "merge", "method", "layer_groups", "filters", "parameters",
    "weight", "density", "lambda", "t", "normalize", "range", "value", "log", "init", "dtype", "random_seed",
    "objectives", "task", "metric", "measure", "direction", "constraints", "max", "min", "evaluation", "items",
    "tasks", "lm_eval_args", "batch_size", "search", "driver", "budget", "population", "sigma0", "seed",
    "workers", "count", "storage", "route", "trust_remote_code", "gpus_per_worker",
]
_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 50), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["ties", "cma", "maximize", "acc", "toy_arith", "m/x", "", "*", "auto", "l2_from_base"]),
    st.text(max_size=5),
)
_values = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(_FIELD_NAMES) | st.integers(0, 2), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def _mutated_configs(draw: st.DrawFn) -> Any:
    data = minimal_config()
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from(list(data)))
        if draw(st.booleans()) and isinstance(data[section], dict) and data[section]:
            key = draw(st.sampled_from(list(data[section]) + _FIELD_NAMES))
            data[section] = {**data[section], key: draw(_values)}
        else:
            data[section] = draw(_values)
    return data


_param_specs = st.one_of(
    st.floats(-2, 2, allow_nan=False),
    st.booleans(),
    st.fixed_dictionaries(
        {},
        optional={
            "range": st.tuples(st.floats(-1, 2, allow_nan=False), st.floats(-1, 2, allow_nan=False)).map(list),
            "log": st.booleans(),
            "init": st.floats(-1, 2, allow_nan=False),
            "layer_groups": st.integers(0, 4),
            "filters": st.lists(st.sampled_from(["mlp", "self_attn", "q_proj", "*"]), max_size=3),
        },
    ),
)


@st.composite
def _plausible_configs(draw: st.DrawFn) -> Any:
    """Configs built from real names, so that the deeper checks (registry, drivers) are reached."""
    from evomerge.merge.registry import method_names

    data = minimal_config()
    data["models"]["donors"] = [f"m/d{i}" for i in range(draw(st.integers(1, 3)))]
    data["merge"] = {
        "method": draw(st.lists(st.sampled_from(method_names()), min_size=1, max_size=3, unique=True)),
        "layer_groups": draw(st.integers(1, 4)),
        "parameters": draw(
            st.dictionaries(st.sampled_from(["weight", "density", "lambda", "t", "epsilon", "gamma", "normalize"]),
                            _param_specs, max_size=3)
        ),
    }
    driver = draw(st.sampled_from(["cma", "tpe", "nsga2", "gp", "random"]))
    data["search"] = {"driver": driver, "budget": 5, **draw(st.fixed_dictionaries({}, optional={
        "population": st.integers(1, 9), "sigma0": st.floats(0, 1.5, allow_nan=False)}))}
    if draw(st.booleans()):
        data["constraints"] = [draw(st.fixed_dictionaries(
            {"measure": st.just("l2_from_base")}, optional={"max": st.floats(0, 9), "min": st.floats(0, 9)}))]
    return data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_mutated_configs(), _values, _plausible_configs()))
def test_loader_accepts_or_raises_config_error(data: Any) -> None:
    try:
        config = parse_space_config(data, source="fuzz.yaml")
    except ConfigError as err:
        assert str(err).startswith("fuzz.yaml: ")
        return
    assert isinstance(config, SpaceConfig)
    config.config_hash()
    assert parse_space_config(yaml.safe_load(config.to_yaml())) == config


@pytest.mark.parametrize("workers, field, says", [
    ({"pool": "inproces"}, r"workers\.pool", r"unknown worker pool 'inproces'.*Did you mean 'inprocess'"),
    ({"pool": "inprocess", "ray_address": "head:6379"}, r"workers\.ray_address", "the in-process pool runs no Ray"),
])
def test_worker_pool_is_checked(tmp_path: Path, workers: dict, field: str, says: str) -> None:
    with pytest.raises(ConfigError, match=rf"{field}: .*{says}"):
        load_space_config(write(tmp_path, minimal_config(workers=workers)))
