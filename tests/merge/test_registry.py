"""The registry: names, lookup errors, and declarations held equal to mergekit's own."""

from __future__ import annotations

import inspect

import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.merge.registry import METHODS, MergeMethod, Param, get_method, method_names

EXPECTED = {
    "linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "model_stock", "passthrough",
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
    assert method.params, f"{name} declares no parameters"
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
    signature = inspect.signature(method.merge)
    assert list(signature.parameters)[:4] == ["entries", "base_index", "per_input", "shared"]
    assert {"generator", "deltas"} <= set(signature.parameters)


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
    assert method.min_models == spec.contract.min_inputs
    assert method.max_models == spec.contract.max_inputs


def test_only_dare_and_della_are_stochastic() -> None:
    stochastic = {m.name for m in METHODS.values() if m.stochastic}
    assert stochastic == {"dare_ties", "dare_linear", "della", "della_linear"}


def test_searchable_parameters_cover_the_usual_knobs() -> None:
    ranged = {(m.name, p.name) for m in METHODS.values() for p in m.params if p.search_range}
    assert ("linear", "weight") in ranged and ("slerp", "t") in ranged
    assert ("ties", "density") in ranged and ("della", "epsilon") in ranged
    assert ("breadcrumbs", "gamma") in ranged and ("ties", "lambda") in ranged
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


def test_declared_defaults_are_what_merge_uses() -> None:
    """Leaving a parameter out equals passing its declared default."""
    base = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    donor = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    for name in ("ties", "breadcrumbs", "della_linear", "task_arithmetic"):
        method = get_method(name)
        per = {"weight": 0.6, "density": 0.5}
        full_per = {p.name: per.get(p.name, p.default) for p in method.per_model_params}
        full_shared = {p.name: p.default for p in method.shared_params}
        a = method.merge([base, donor], 0, [{}, per], {},
                         generator=torch.Generator().manual_seed(4))
        b = method.merge([base, donor], 0, [{}, full_per], full_shared,
                         generator=torch.Generator().manual_seed(4))
        assert torch.equal(a, b), name


def test_per_input_must_match_entries() -> None:
    x = torch.ones(3)
    with pytest.raises(ValueError, match="per-input"):
        get_method("linear").merge([x, x], None, [{"weight": 1.0}], {})
    with pytest.raises(ConfigError, match="one value per tensor"):
        get_method("slerp").merge([x, x], 0, [{}, {}], {})
