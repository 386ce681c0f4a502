"""Multi-stage files (mergekit-multi's format): a route over a parameter merge.

Stage ``merged`` is a task-arithmetic merge of the toy base and both specialists; the final
stage routes layers of ``merged`` and of the specialists. ``evomerge merge`` of the file must give
the model that the real ``mergekit-multi`` command gives, and the model a search worker builds in
memory (stage 1 merged into a resident model, then routed).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
import yaml

from evomerge.errors import ConfigError
from evomerge.merge.inmemory import ResidentModels, state_view
from evomerge.merge.multi import Stage, merge_stages, parse_stages, stages_to_yaml
from evomerge.merge.routing import (
    RoutedLayer,
    build_routed_model,
    module_over_tensors,
    resident_module,
    route_from_config,
    route_to_config,
)

from ..reliability.cli_batch import run_batch
from ..reliability.conftest import cli_env
from .test_merge_command import load_folder, run_merge
from .test_routing import LOGITS_ATOL, logits, token_batch


def stage_file(world) -> tuple[str, dict[str, str]]:
    refs = {"base": str(world.base), **{k: str(v) for k, v in world.specialists.items()}}
    first = {"name": "merged", "merge_method": "task_arithmetic", "base_model": refs["base"], "dtype": "float32",
             "models": [{"model": refs["arith"], "parameters": {"weight": 1.0}},
                        {"model": refs["reverse"], "parameters": {"weight": [0.6, 1.0]}}]}
    route = [RoutedLayer("merged", 0), RoutedLayer("merged", 1), RoutedLayer(refs["arith"], 1, 0.9),
             RoutedLayer("merged", 2), RoutedLayer("merged", 3, 1.1), RoutedLayer(refs["reverse"], 3)]
    final = route_to_config(route, dtype="float32")
    text = yaml.safe_dump(first, sort_keys=False) + "---\n" + final.to_yaml()
    return text, refs


@pytest.mark.slow
def test_multi_stage_merge_equals_mergekit_multi(toy_world, tmp_path):
    exe = shutil.which("mergekit-multi")
    if exe is None:
        pytest.skip("mergekit-multi not on PATH")
    text, _ = stage_file(toy_world)
    config = tmp_path / "multi.yaml"
    config.write_text(text)
    subprocess.run([exe, str(config), "--intermediate-dir", str(tmp_path / "mk_stages"), "--out-path", str(tmp_path / "mk")],
                   check=True, capture_output=True)
    result = run_merge(text, tmp_path / "evo")
    assert result.returncode == 0, result.stderr

    ours, theirs = load_folder(tmp_path / "evo"), load_folder(tmp_path / "mk")
    assert set(ours) == set(theirs) and len(ours) == 3 + 6 * 9
    assert max((ours[k] - theirs[k]).abs().max().item() for k in theirs) <= 1e-6
    from transformers import AutoModelForCausalLM

    ids = token_batch()
    ours_logits = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "evo", dtype=torch.float32), ids)
    theirs_logits = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "mk", dtype=torch.float32), ids)
    assert (ours_logits - theirs_logits).abs().max().item() <= LOGITS_ATOL
    # the default intermediate folder was a hidden sibling, and is gone; the output keeps the recipe
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evo", "evo.yaml", "mk", "mk_stages", "multi.yaml"]
    assert parse_stages((tmp_path / "evo" / "mergekit_config.yml").read_text()) == parse_stages(text)


def test_multi_stage_merge_equals_the_in_memory_route(toy_world, tmp_path):
    """What a worker evaluates: stage 1 merged into a resident model, then routed with ``merged``
    standing for that model."""
    from transformers import AutoModelForCausalLM

    text, refs = stage_file(toy_world)
    stages = parse_stages(text)
    assert [s.name for s in stages] == ["merged", None]
    resident = ResidentModels(list(refs.values()), refs["base"])
    merged = module_over_tensors(refs["base"], {k: v.clone() for k, v in resident.tensors[refs["base"]].items()})
    resident.merge_into(resident.plan(stages[0].config), state_view(merged))
    modules = {"merged": merged, **{ref: resident_module(resident, ref) for ref in refs.values()}}
    routed = build_routed_model(route_from_config(stages[1].config), modules)

    assert run_merge(text, tmp_path / "evo").returncode == 0
    ids = token_batch()
    on_disk = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "evo", dtype=torch.float32), ids)
    assert (logits(routed, ids) - on_disk).abs().max().item() <= LOGITS_ATOL


def test_intermediate_dir_keeps_each_stage(toy_world, tmp_path):
    text, _ = stage_file(toy_world)
    stages = parse_stages(text)
    result = run_merge(text, tmp_path / "out", "--intermediate-dir", str(tmp_path / "stages"))
    assert result.returncode == 0, result.stderr
    kept = load_folder(tmp_path / "stages" / "merged")
    direct = run_merge(stages[0].config.to_yaml(), tmp_path / "direct")
    assert direct.returncode == 0, direct.stderr
    assert all(torch.equal(kept[k], v) for k, v in load_folder(tmp_path / "direct").items())
    # running again re-merges the stages rather than trusting what is there
    (tmp_path / "stages" / "merged" / "model.safetensors").write_bytes(b"stale")
    merge_stages(stages, tmp_path / "out", intermediate_dir=tmp_path / "stages", overwrite=True)
    assert set(load_folder(tmp_path / "stages" / "merged")) == set(kept)


def test_stages_round_trip_through_yaml():
    stages = parse_stages(
        "name: one\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}, {model: b, parameters: {weight: 1}}]\n"
        "---\nmerge_method: passthrough\nslices: [{sources: [{model: two, layer_range: [0, 2]}]}]\n---\n"
        "name: two\nmerge_method: slerp\nbase_model: one\nparameters: {t: 0.5}\n"
        "slices: [{sources: [{model: one, layer_range: [0, 2]}, {model: c, layer_range: [0, 2]}]}]\n",
        check_references=False,
    )
    assert [s.name for s in stages] == ["one", "two", None]  # dependencies first, final last
    assert parse_stages(stages_to_yaml(stages), check_references=False) == stages
    assert isinstance(stages[0], Stage)


_LINEAR = "merge_method: linear\nmodels: [{model: %s, parameters: {weight: 1}}]\n"


BAD_FILES = [
    ("name: m\n" + _LINEAR % "{base}" + "---\nname: m\n" + _LINEAR % "{base}" + "---\n" + _LINEAR % "m",
     r"document 2 \(name: m\): name: 'm' is already the name of .*document 1"),
    ("name: m\n" + _LINEAR % "{base}" + "---\n" + _LINEAR % "m" + "---\n" + _LINEAR % "m",
     r"document 3 \(final\): a second unnamed document"),
    ("name: merged\n" + _LINEAR % "{base}" + "---\n" + _LINEAR % "mergd",
     r"document 2 \(final\): models\[0\]\.model: 'mergd' is neither a stage .* Did you mean 'merged'\?"),
    ("name: a\n" + _LINEAR % "b" + "---\nname: b\n" + _LINEAR % "a" + "---\n" + _LINEAR % "a",
     r"document 1 \(name: a\): stages use each other in a cycle: a -> b -> a"),
    ("name: m\n" + _LINEAR % "{base}" + "---\nname: n\n" + _LINEAR % "m",
     r"no final stage: exactly one document must have no 'name:'"),
    ("name: ../up\n" + _LINEAR % "{base}" + "---\n" + _LINEAR % "{base}",
     r"document 1 \(name: \.\./up\): name: '\.\./up' is not a stage name"),
    ("name: base\n" + _LINEAR % "{base}" + "---\n" + _LINEAR % "base",
     r"document 1 \(name: base\): name: 'base' is a tokenizer_source keyword"),
    ("name: m\nmerge_method: linear\nmodel: [{model: x}]\n---\n" + _LINEAR % "m",
     r"(?s)document 1 \(name: m\): invalid merge config:.*model: unknown field"),
]


@pytest.fixture(scope="module")
def refused_files(toy_world, tmp_path_factory) -> dict[str, tuple]:
    """Each bad file (by its text) run as ``evomerge merge FILE OUT`` from a folder of its own, all
    in one fresh process (``tests/reliability/cli_batch.py``: the real entry point, imports shared)."""
    cases = []
    for i, (text, _) in enumerate(BAD_FILES):
        folder = tmp_path_factory.mktemp(f"bad_multi{i}")
        (folder / "out.yaml").write_text(text.replace("{base}", str(toy_world.base)))
        cases.append((text, ["merge", str(folder / "out.yaml"), str(folder / "out")], folder))
    results = run_batch(cases, tmp_path_factory.mktemp("batch"), cli_env())
    return {text: (folder, results[text]) for text, _, folder in cases}


@pytest.mark.parametrize("text, message", BAD_FILES)
def test_bad_multi_stage_files_name_the_document(text, message, toy_world, refused_files):
    folder, result = refused_files[text]
    text = text.replace("{base}", str(toy_world.base))
    with pytest.raises(ConfigError, match=message):
        parse_stages(text, source="multi.yaml")
    # the command line says the same in one line with exit status 2, and writes nothing
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["out.yaml"]
