"""Route searches end to end on the toy world: search, export, merge from disk, score again.

The chain that must hold: what a worker evaluated in memory for a routed candidate (layers of
the resident models and of the candidate's own parameter merge, shared, not copied) is what the
exported file makes when merged from disk, by evomerge and by mergekit-multi, and re-scoring that
folder gives the trial's recorded scores. Plus the two-stage form and the refusals that need
opened models.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from tests.search.test_search_e2e import ROOT, assert_rescores_as, evomerge, search_tasks, write

pytestmark = pytest.mark.slow


def route_space(toy_world, *, budget: int, name: str = "joint", merged: str | None = None) -> dict:
    donors = [str(p) for p in toy_world.specialists.values()]
    data = {
        "name": name,
        "models": {"base": str(toy_world.base), "donors": donors},
        "route": {"pool": ["merged", "arith"], "repeats": 1, "depth": [3, 5], "scale": {"range": [0.8, 1.2]}},
        "objectives": [{"task": t, "metric": "acc", "direction": "maximize"} for t in search_tasks(toy_world)],
        "evaluation": {"items": 16, "batch_size": 16, "include_path": [str(ROOT / "eval_tasks")]},
        "search": {"driver": "cma", "budget": budget, "seed": 0, "population": 4},
        "workers": {"count": 2, "cpus_per_worker": 1, "pool": "inprocess"},
    }
    if merged is None:
        data["merge"] = {"method": "task_arithmetic", "parameters": {"weight": {"range": [0.5, 1.2]}}}
    else:
        data["route"]["merged"] = merged
        data["route"]["dtype"] = "float32"
    return data


def trials(run: Path) -> list:
    from evomerge.store import RunStore

    store = RunStore.open(run)
    try:
        return store.trials()
    finally:
        store.close()


def logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


def test_joint_route_search_exports_what_it_evaluated(toy_world, tmp_path):
    from evomerge.recipe import MERGED_STAGE, Recipe

    cfg = write(tmp_path, route_space(toy_world, budget=8))
    result = evomerge("search", str(cfg), "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "joint"
    records = trials(run)
    assert [r.state for r in records] == ["complete"] * 8
    recipes = [Recipe.from_json(r.recipe_json) for r in records]
    assert all(r.merge is not None and r.route is not None for r in recipes)
    assert all("l2_from_base" not in r.objectives for r in records)  # not defined for routed models
    depths = {sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in r.route.slices) for r in recipes}
    assert depths <= {3, 4, 5}

    # export the best: a two-stage file, the merge named 'merged' and the route over it
    out = tmp_path / "best.yaml"
    exported = evomerge("export", str(run), "--best", "-o", str(out), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    docs = list(yaml.safe_load_all(out.read_text()))
    assert [d.get("name") for d in docs] == [MERGED_STAGE, None]
    number = int(out.read_text().split("trial ")[1].split()[0])
    best = next(r for r in records if r.number == number)

    # merged from disk by evomerge, and by mergekit's own multi-stage command
    merged = evomerge("merge", str(out), str(tmp_path / "evo"), cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr[-3000:]
    mk = shutil.which("mergekit-multi")
    assert mk, "mergekit-multi is installed with the test extra"
    subprocess.run([mk, str(out), "--intermediate-dir", str(tmp_path / "mk_stages"), "--out-path", str(tmp_path / "mk")],
                   check=True, capture_output=True, cwd=tmp_path)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    torch.testing.assert_close(logits(tmp_path / "evo", ids), logits(tmp_path / "mk", ids), atol=1e-5, rtol=0)

    # re-scoring the folder gives the trial's scores: the worker evaluated exactly this model
    assert_rescores_as(tmp_path / "evo", cfg, best)

    # two stages: a route over a merge found before, fixed. A run of routed trials is not one...
    cfg2 = write(tmp_path, route_space(toy_world, budget=4, name="stage2", merged=str(run)), "stage2.yaml")
    result = evomerge("search", str(cfg2), "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 2 and "route.merged" in result.stderr and "itself routed" in result.stderr
    assert not (tmp_path / "runs" / "stage2").exists()
    # ... but its merge stage, as a mergekit YAML file, is; the run keeps the merge inline
    stage1 = tmp_path / "stage1.yaml"
    stage1.write_text(yaml.safe_dump({k: v for k, v in docs[0].items() if k != "name"}))
    cfg2 = write(tmp_path, route_space(toy_world, budget=4, name="stage2", merged=str(stage1)), "stage2.yaml")
    result = evomerge("search", str(cfg2), "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    stage2 = trials(tmp_path / "runs" / "stage2")
    assert len(stage2) == 4 and all(r.state == "complete" for r in stage2)
    best_merge = Recipe.from_json(best.recipe_json).merge
    assert all(Recipe.from_json(r.recipe_json).merge == best_merge for r in stage2)
    frozen = yaml.safe_load((tmp_path / "runs" / "stage2" / "space.yaml").read_text())
    assert frozen["route"]["merged"]["merge_method"] == "task_arithmetic"


def test_route_over_models_of_another_width_is_refused_naming_the_pool_entry(toy_world, tmp_path):
    from tests.merge.tiny_models import write_tiny_llama

    wide = write_tiny_llama(tmp_path / "wide", seed=3, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                            vocab_size=toy_world_vocab(toy_world))
    data = route_space(toy_world, budget=2, name="wide")
    del data["merge"]
    data["models"]["donors"] = [str(toy_world.specialists["arith"]), str(wide)]
    data["route"] = {"pool": ["arith", "wide"], "depth": [2, 4], "dtype": "float32"}
    cfg = write(tmp_path, data)
    result = evomerge("search", str(cfg), "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "route.pool[1]" in result.stderr and "hidden size" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def toy_world_vocab(toy_world) -> int:
    import json

    return json.loads((Path(toy_world.base) / "config.json").read_text())["vocab_size"]
