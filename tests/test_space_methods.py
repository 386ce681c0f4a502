"""Every registered method is searchable from a space file: its ranges come from the registry,
the method itself is a categorical coordinate, and each decoded candidate is a config that
``evomerge merge`` runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from evomerge.cli import main
from evomerge.merge.registry import get_method
from evomerge.merge.run import merge_from_config
from evomerge.space import SearchSpace
from evomerge.space_config import load_space_config

from .merge.tiny_models import write_tiny_llama
from .test_space_config import minimal_config

NUM_LAYERS = 4
# nuslerp merges exactly two donors, nearswap and arcee_fusion exactly one: two space files
TWO_DONORS = ["ties", "sce", "nuslerp", "multislerp", "karcher", "ram", "ramplus_tl"]
ONE_DONOR = ["nearswap", "arcee_fusion", "slerp"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("space_method_models")
    base = write_tiny_llama(root / "base", seed=0)
    return {
        "base": str(base),
        "arith": str(write_tiny_llama(root / "arith", seed=1, base=base)),
        "reverse": str(write_tiny_llama(root / "reverse", seed=2, base=base)),
    }


def space_file(tmp_path: Path, folders: dict[str, str], methods: list[str], donors: list[str],
               parameters: dict | None = None) -> Path:
    models = {"base": folders["base"], "donors": [{"model": folders[d], "name": d} for d in donors]}
    merge = {"method": methods, "layer_groups": 2, "parameters": parameters or {}}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(minimal_config(models=models, merge=merge), sort_keys=False))
    return path


def test_new_methods_take_their_ranges_from_the_registry(tmp_path, folders) -> None:
    path = space_file(tmp_path, folders, TWO_DONORS, ["arith", "reverse"], {"max_iter": 5})
    space = SearchSpace.from_config(load_space_config(path), NUM_LAYERS)
    coords = {c.name: c for c in space.coordinates}
    assert coords["method"].choices == tuple(TWO_DONORS)
    select = get_method("sce").param("select_topk").search_range
    assert (coords["g0/*/select_topk"].low, coords["g0/*/select_topk"].high) == select
    assert (coords["g1/*/r"].low, coords["g1/*/r"].high) == get_method("ramplus_tl").param("r").search_range
    assert "g0/*/arith/weight" in coords and "g1/*/reverse/weight" in coords  # nuslerp, multislerp, ties
    assert not any(name.endswith(("/max_iter", "/epsilon", "/eps", "/tol")) for name in coords)


@pytest.mark.parametrize("methods, donors", [(TWO_DONORS, ["arith", "reverse"]), (ONE_DONOR, ["arith"])])
def test_each_listed_method_decodes_to_a_config_that_merges(tmp_path, folders, methods, donors) -> None:
    path = space_file(tmp_path, folders, methods, donors, {"max_iter": 5} if "karcher" in methods else None)
    space = SearchSpace.from_config(load_space_config(path), NUM_LAYERS)
    for method in methods:
        recipe = space.decode({**space.default_values(), "method": method})
        assert recipe.merge.merge_method == method
        if method == "karcher":
            assert recipe.merge.parameters["max_iter"] == 5  # pinned in the space file
        merge_from_config(recipe.merge, tmp_path / method)
        assert (tmp_path / method / "config.json").is_file()


def test_evomerge_merge_runs_a_decoded_sce_recipe(tmp_path, folders) -> None:
    """Once through the command line's entry point, as a user exports and merges a candidate."""
    path = space_file(tmp_path, folders, ["ties", "sce"], ["arith", "reverse"])
    space = SearchSpace.from_config(load_space_config(path), NUM_LAYERS)
    values = {**space.default_values(), "method": "sce", "g0/*/select_topk": 0.3}
    recipe = space.decode(values)
    config = tmp_path / "sce.yaml"
    config.write_text(recipe.merge.to_yaml())
    assert yaml.safe_load(config.read_text())["merge_method"] == "sce"
    done = CliRunner().invoke(main, ["merge", str(config), str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    assert any((tmp_path / "out").glob("*.safetensors"))


def test_a_method_with_the_wrong_donor_count_is_refused_with_the_field(tmp_path, folders) -> None:
    from evomerge.errors import ConfigError

    path = space_file(tmp_path, folders, ["ties", "nuslerp"], ["arith"])
    with pytest.raises(ConfigError, match=r"merge\.method\[1\]: merge method 'nuslerp' takes exactly 2 models besides"):
        load_space_config(path)
