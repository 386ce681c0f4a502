"""The registry: names, lookup errors, and declarations held equal to mergekit's own."""

from __future__ import annotations

import inspect

import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.merge.registry import METHODS, MergeInputs, MergeMethod, Param, get_method, method_names

EXPECTED = {
    "linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "model_stock", "passthrough",
    "nuslerp", "multislerp", "karcher", "sce", "ram", "ramplus_tl", "nearswap", "arcee_fusion",
}


def test_every_method_is_registered_once_by_name() -> None:
    assert set(method_names()) == EXPECTED == set(METHODS)
    assert method_names() == sorted(method_names())
    for name in EXPECTED:
        assert get_method(name).name == name


def test_unknown_method_suggests_close_names() -> None:
    with pytest.raises(ConfigError) as err:
        get_method("tie")
    assert "'tie'" in str(err.value) and "Did you mean" in str(err.value)
    assert "'ties'" in str(err.value)
    with pytest.raises(ConfigError, match="'dare_ties'"):
        get_method("dare-ties")
    with pytest.raises(ConfigError) as err:
        get_method("zzzz")
    assert "Did you mean" not in str(err.value)


def test_unknown_parameter_suggests_close_names() -> None:
    with pytest.raises(ConfigError, match="'density'"):
        get_method("ties").param("densty")
    assert get_method("ties").param("density").default == 1.0


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_method_declares_its_params_coherently(name: str) -> None:
    method = get_method(name)
    assert isinstance(method, MergeMethod)
    # arcee_fusion is the one method mergekit declares without parameters
    assert method.params or name == "arcee_fusion", f"{name} declares no parameters"
    assert len({p.name for p in method.params}) == len(method.params)
    for p in method.params:
        assert isinstance(p, Param)
        assert p.kind in (float, bool, int)
        assert p.required == (p.default is None and p.name != "scale")
        assert not p.includes_base or p.per_model
        if p.kind is bool:
            assert p.search_range is None and isinstance(p.default, bool)
        if p.search_range is not None:
            lo, hi = p.search_range
            assert lo < hi
            if not p.required and p.default is not None:
                assert lo <= p.default <= hi
    assert method.min_models >= 1
    assert method.max_models is None or method.max_models >= method.min_models
    # one uniform shape: every method is a function of one MergeInputs
    signature = inspect.signature(method.merge)
    assert list(signature.parameters) == ["inputs"]
    fields = list(inspect.signature(MergeInputs).parameters)
    assert fields[:4] == ["entries", "base_index", "per_input", "shared"]
    assert {"generator", "deltas", "tensor_name"} <= set(fields)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_declarations_match_mergekit(name: str) -> None:
    registry = pytest.importorskip("mergekit.merge_methods.registry")
    from mergekit.merge_methods.base import MISSING, BasePolicy, ParameterScope

    spec = registry.get(name).spec
    theirs = {p.name: p for p in spec.parameters}
    ours = {p.name: p for p in get_method(name).params}
    assert set(ours) == set(theirs)
    for pname, p in ours.items():
        q = theirs[pname]
        assert p.per_model == (q.scope != ParameterScope.SHARED), pname
        assert p.includes_base == (q.scope == ParameterScope.INPUT), pname
        assert p.required == (q.default is MISSING), pname
        if not p.required:
            assert p.default == q.default, pname
    method = get_method(name)
    assert method.needs_base == (spec.contract.base == BasePolicy.REQUIRED)
    assert method.base_rule.value == spec.contract.base.value
    assert method.min_models == spec.contract.min_inputs
    assert method.max_models == spec.contract.max_inputs
    assert method.min_donors == spec.contract.min_non_base
    assert method.max_donors == spec.contract.max_non_base


def test_the_registry_holds_every_mergekit_method() -> None:
    registry = pytest.importorskip("mergekit.merge_methods.registry")
    assert {m.spec.name for m in registry.registered_methods()} == set(METHODS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_number_declares_the_range_it_is_valid_in(name: str) -> None:
    """``valid_range`` bounds every numeric parameter (flags have none), contains the default
    and the search range, and ``in_valid_range`` applies it."""
    for p in get_method(name).params:
        if p.kind is bool:
            assert p.valid_range is None and p.in_valid_range(True)
            continue
        assert p.valid_range is not None, f"{name}.{p.name} declares no valid range"
        low, high = p.valid_range
        assert low < high
        if p.default is not None:
            assert low <= p.default <= high and p.in_valid_range(p.default)
        if p.search_range is not None:
            assert low <= p.search_range[0] and p.search_range[1] <= high
        if low > float("-inf"):
            assert not p.in_valid_range(low - 1e-3)
        if high < float("inf"):
            assert not p.in_valid_range(high + 1e-3)


def test_fractions_are_valid_in_the_unit_interval() -> None:
    for method, param in [("ties", "density"), ("dare_linear", "density"), ("breadcrumbs", "gamma"),
                          ("sce", "select_topk"), ("slerp", "t")]:
        p = get_method(method).param(param)
        assert p.valid_range == (0.0, 1.0), (method, param)
        assert p.in_valid_range(0.0) and p.in_valid_range(1.0) and not p.in_valid_range(1.5)
    assert get_method("ties").param("weight").in_valid_range(-2.0)  # negative weights subtract
    assert not get_method("nearswap").param("t").in_valid_range(-0.1)


def test_only_dare_and_della_are_stochastic() -> None:
    stochastic = {m.name for m in METHODS.values() if m.stochastic}
    assert stochastic == {"dare_ties", "dare_linear", "della", "della_linear"}


def test_searchable_parameters_cover_the_usual_knobs() -> None:
    ranged = {(m.name, p.name) for m in METHODS.values() for p in m.params if p.search_range}
    assert ("linear", "weight") in ranged and ("slerp", "t") in ranged
    assert ("ties", "density") in ranged and ("della", "epsilon") in ranged
    assert ("breadcrumbs", "gamma") in ranged and ("ties", "lambda") in ranged
    assert ("nuslerp", "weight") in ranged and ("multislerp", "weight") in ranged
    assert ("sce", "select_topk") in ranged and ("nearswap", "t") in ranged
    assert ("ramplus_tl", "r") in ranged and ("ramplus_tl", "alpha") in ranged
    # density does nothing in task_arithmetic, so a search should not spend a coordinate on it
    assert ("task_arithmetic", "density") not in ranged


def test_check_inputs_counts_models_including_base() -> None:
    get_method("slerp").check_inputs(2, has_base=True)
    with pytest.raises(ConfigError, match="exactly 2"):
        get_method("slerp").check_inputs(3, has_base=True)
    with pytest.raises(ConfigError, match="needs a base_model"):
        get_method("ties").check_inputs(3, has_base=False)
    with pytest.raises(ConfigError, match="at least 3"):
        get_method("model_stock").check_inputs(2, has_base=True)
    get_method("linear").check_inputs(5, has_base=False)
    # nuslerp counts the models besides the base: two, with or without a base
    get_method("nuslerp").check_inputs(2, has_base=False)
    get_method("nuslerp").check_inputs(3, has_base=True)
    with pytest.raises(ConfigError, match="exactly 2 models besides the base"):
        get_method("nuslerp").check_inputs(4, has_base=True)
    with pytest.raises(ConfigError, match="exactly 2 models besides the base"):
        get_method("nuslerp").check_inputs(2, has_base=True)
    with pytest.raises(ConfigError, match="exactly 2 models"):
        get_method("nearswap").check_inputs(3, has_base=True)
    get_method("karcher").check_inputs(4, has_base=True)


def test_declared_defaults_are_what_merge_uses() -> None:
    """Leaving a parameter out equals passing its declared default."""
    base = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    donor = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    for name in ("ties", "breadcrumbs", "della_linear", "task_arithmetic"):
        method = get_method(name)
        per = {"weight": 0.6, "density": 0.5}
        full_per = {p.name: per.get(p.name, p.default) for p in method.per_model_params}
        full_shared = {p.name: p.default for p in method.shared_params}
        a = method.merge(MergeInputs([base, donor], 0, [{}, per], {},
                                     generator=torch.Generator().manual_seed(4)))
        b = method.merge(MergeInputs([base, donor], 0, [{}, full_per], full_shared,
                                     generator=torch.Generator().manual_seed(4)))
        assert torch.equal(a, b), name


def test_per_input_must_match_entries() -> None:
    x = torch.ones(3)
    with pytest.raises(ValueError, match="per-input"):
        get_method("linear").merge(MergeInputs([x, x], None, [{"weight": 1.0}], {}))
    with pytest.raises(ConfigError, match="one value per tensor"):
        get_method("slerp").merge(MergeInputs([x, x], 0, [{}, {}], {}))
