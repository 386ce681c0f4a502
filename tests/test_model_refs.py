"""Model references resolved when a run is created (evomerge/model_refs.py): local folders made
absolute with what the user wrote kept beside them, Hub ids pinned from the local Hugging Face
cache (never the Hub), and a missing path refused with the field, the path, the folder and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evomerge import model_refs
from evomerge.errors import ConfigError
from evomerge.space_config import load_space_config, parse_space_config

SHA = "0123456789abcdef0123456789abcdef01234567"
OTHER_SHA = "fedcba9876543210fedcba9876543210fedcba98"


def _space(base: str, donors: list[str], **extra) -> dict:
    return {
        "name": "refs",
        "models": {"base": base, "donors": donors},
        "merge": {"method": "linear", "parameters": {"weight": {"range": [0.0, 1.0]}}},
        "objectives": [{"measure": "l2_from_base", "direction": "minimize"}],
        "search": {"driver": "cma", "budget": 4},
        **extra,
    }


def _project(tmp_path: Path) -> Path:
    """A project folder with model folders and a task folder, and a space file naming them relatively."""
    project = tmp_path / "project"
    for name in ("base", "arith", "reverse", "lora"):
        (project / "models" / name).mkdir(parents=True)
    (project / "tasks").mkdir()
    data = _space("models/base", ["models/arith", "./models/reverse"], evaluation={"include_path": ["tasks"]})
    (project / "space.yaml").write_text(yaml.safe_dump(data))
    return project


def test_local_folders_become_absolute_and_what_was_written_is_kept(tmp_path, monkeypatch):
    project = _project(tmp_path)
    monkeypatch.chdir(project)
    written = load_space_config("space.yaml")
    config = model_refs.resolve_config(written)

    assert config.models.base == str(project / "models" / "base")
    assert [d.model for d in config.models.donors] == [str(project / "models" / n) for n in ("arith", "reverse")]
    assert [d.name for d in config.models.donors] == ["arith", "reverse"]  # names come from what was written
    assert config.evaluation.include_path == (str(project / "tasks"),)
    assert config.as_written == {"models.base": "models/base", "models.donors[0].model": "models/arith",
                                 "models.donors[1].model": "./models/reverse", "evaluation.include_path[0]": "tasks"}
    # the stored form loads back to the same config, and resolving it again changes nothing
    stored = parse_space_config(yaml.safe_load(config.to_yaml()), source="stored")
    assert stored == config
    assert model_refs.resolve_config(stored) == config
    # the identity is the resolved models; a run of an earlier version recorded the hash as written
    assert config.config_hash() != written.config_hash()
    assert model_refs.earlier_hash(config) == written.config_hash()
    assert model_refs.earlier_hash(stored) == written.config_hash()


def test_the_same_space_from_another_folder_is_another_run(tmp_path, monkeypatch):
    project = _project(tmp_path)
    copy = tmp_path / "copy"
    (copy / "models").mkdir(parents=True)
    for name in ("base", "arith", "reverse"):
        (copy / "models" / name).mkdir()
    (copy / "tasks").mkdir()
    monkeypatch.chdir(project)
    here = model_refs.resolve_config(load_space_config("space.yaml"))
    monkeypatch.chdir(copy)
    there = model_refs.resolve_config(load_space_config(project / "space.yaml"))
    assert here.config_hash() != there.config_hash()  # other models: resuming one as the other is refused
    assert "models.base" in " ".join(here.diff(there))


def test_a_lora_reference_is_resolved_part_by_part(tmp_path, monkeypatch):
    project = _project(tmp_path)
    monkeypatch.chdir(project)
    resolved = model_refs.resolve_reference("models/base+models/lora", field="models.donors[0].model", source="s")
    assert resolved == f"{project / 'models' / 'base'}+{project / 'models' / 'lora'}"


@pytest.mark.parametrize("written", ["./models/nothing", "../elsewhere/model", "~/no-such-model-folder-xyz",
                                     "models/deep/nothing"])
def test_a_missing_path_names_the_field_the_path_the_folder_and_the_fix(tmp_path, monkeypatch, written):
    project = _project(tmp_path)
    monkeypatch.chdir(project)
    config = parse_space_config(_space("models/base", [written]), source="space.yaml")
    with pytest.raises(ConfigError) as err:
        model_refs.resolve_config(config)
    message = str(err.value)
    assert message.startswith("space.yaml: models.donors[0].model: ")
    assert repr(written) in message and str(project) in message
    assert "absolute path" in message and "Hub" not in message


def test_a_hub_like_path_that_exists_beside_the_space_file_is_refused_with_where_it_is(tmp_path, monkeypatch):
    project = _project(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ConfigError) as err:
        model_refs.resolve_config(load_space_config(project / "space.yaml"))
    message = str(err.value)
    assert "models.base" in message and "'models/base'" in message and str(elsewhere) in message
    assert f"it exists from {project}" in message


def _hub_cache(cache: Path, repo: str, refs: dict[str, str]) -> None:
    """A Hugging Face cache as huggingface_hub lays it out (refs/<revision> naming a snapshot)."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    for revision, commit in refs.items():
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / revision).write_text(commit)
        (folder / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        (folder / "snapshots" / commit / "config.json").write_text("{}")


def test_hub_ids_are_pinned_to_the_commit_the_local_cache_holds(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    _hub_cache(cache, "org/base-model", {"main": SHA, "v2": OTHER_SHA})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the Hub is a boundary: nothing here may reach it
    monkeypatch.chdir(tmp_path)

    assert model_refs.pinned("org/base-model") == f"org/base-model@{SHA}"
    assert model_refs.pinned("org/base-model@v2") == f"org/base-model@{OTHER_SHA}"
    assert model_refs.pinned(f"org/base-model@{OTHER_SHA}") == f"org/base-model@{OTHER_SHA}"
    assert model_refs.pinned("org/base-model@v9") == "org/base-model@v9"  # unknown here: as given
    assert model_refs.pinned("org/not-cached") == "org/not-cached"

    config = model_refs.resolve_config(parse_space_config(_space("org/base-model", ["org/not-cached"]), source="s"))
    assert config.models.base == f"org/base-model@{SHA}"
    assert config.models.donors[0].model == "org/not-cached"
    assert config.as_written == {"models.base": "org/base-model"}


def test_a_stage_one_merge_written_with_the_references_as_written_names_the_resolved_models(tmp_path, monkeypatch):
    from evomerge.merge.config import parse_merge_config

    project = _project(tmp_path)
    monkeypatch.chdir(project)
    config = model_refs.resolve_config(load_space_config("space.yaml"))
    merge = parse_merge_config({"merge_method": "linear", "models": [
        {"model": "models/arith", "parameters": {"weight": 0.5}},
        {"model": "./models/reverse", "parameters": {"weight": 0.5}}], "dtype": "float32"})
    renamed = model_refs.resolve_merge(merge, config)
    assert renamed.referenced_models() == [d.model for d in config.models.donors]


def test_a_recorded_recipe_exports_with_references_that_work_from_any_folder(tmp_path, monkeypatch):
    from evomerge.merge.config import parse_merge_config
    from evomerge.recipe import Recipe

    project = _project(tmp_path)
    monkeypatch.chdir(project)
    config = model_refs.resolve_config(load_space_config("space.yaml"))
    merge = parse_merge_config({"merge_method": "ties", "base_model": "models/base", "models": [
        {"model": "models/arith", "parameters": {"weight": 0.5, "density": 0.5}}], "tokenizer_source": "base"})
    recipe = model_refs.portable_recipe(Recipe(merge=merge, params={"w": 0.5}), config)
    assert recipe.merge.base_model == config.models.base
    assert recipe.merge.models[0].model == config.models.donors[0].model
    assert recipe.merge.tokenizer_source == "base"  # a mode, not a folder
    assert recipe.params == {"w": 0.5}
