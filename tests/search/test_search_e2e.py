"""A real search on the toy world, end to end: workers, lm-eval scores, the run store, resume,
show and export, driven through the command line as a user runs it (its entry point, in the test's
process: see ``tests/cli_inprocess.py``). The workers are the
in-process pool's (the same evaluator a Ray actor runs; Ray itself is tested in
``tests/reliability``: a killed worker, a killed search, a lost node, signals)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from tests.cli_inprocess import run_cli

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def search_tasks(toy_world) -> list[str]:
    return [f"toy_{name}" for name in sorted(toy_world.specialists)]


def space(toy_world, *, budget: int, driver: str = "cma", **overrides) -> dict:
    base = toy_world.base
    donors = [str(p) for name, p in sorted(toy_world.specialists.items())]
    data = {
        "name": "e2e",
        "models": {"base": str(base), "donors": donors},
        "merge": {
            "method": "ties",
            "layer_groups": 1,
            "filters": ["mlp"],
            "parameters": {"weight": {"range": [0.2, 1.2]}, "density": {"range": [0.3, 1.0]}, "lambda": 1.0},
        },
        "objectives": [{"task": t, "metric": "acc", "direction": "maximize"} for t in search_tasks(toy_world)]
        + [{"measure": "l2_from_base", "direction": "minimize"}],
        "evaluation": {"items": 24, "batch_size": 24, "include_path": [str(ROOT / "eval_tasks")]},
        # hand_set off: these tests count trials from 0 (hand-set trials: tests/search/test_hand_set.py)
        "search": {"driver": driver, "budget": budget, "seed": 0, "hand_set": False,
                   **({"population": 4} if driver == "cma" else {})},
        "workers": {"count": 2, "cpus_per_worker": 1, "pool": "inprocess"},
    }
    for key, value in overrides.items():
        data[key] = value
    return data


def evomerge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The command line's entry point in this process (``tests/cli_inprocess.py``): a user's
    commands, without a fresh interpreter's imports for each."""
    return run_cli(*args, cwd=cwd)


def assert_rescores_as(folder: Path, space_file: Path, trial) -> None:
    """Scoring a merged folder from disk on the space's items gives the trial's recorded scores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate import LmEvalScorer
    from evomerge.space_config import load_space_config

    config = load_space_config(space_file)
    scorer = LmEvalScorer(config.task_names(), include_path=[ROOT / "eval_tasks"])
    samples = {t: config.evaluation.item_indices(t, scorer.num_docs(t)) for t in config.task_names()}
    scorer = LmEvalScorer(config.task_names(), include_path=[ROOT / "eval_tasks"], samples=samples,
                          batch_size=config.evaluation.batch_size)
    scores = scorer.score(AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder))
    assert scores
    for key, value in scores.items():
        assert value == pytest.approx(trial.objectives[key], abs=1e-9), key


def write(tmp_path: Path, data: dict, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_search_records_resumes_and_exports(toy_world, tmp_path):
    from evomerge.store import RunStore

    cfg = write(tmp_path, space(toy_world, budget=6))
    first = evomerge("search", str(cfg), "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "e2e"
    for name in ("space.yaml", "config_hash", "trials.db", "pareto.json"):
        assert (run / name).is_file(), name
    store = RunStore.open(run)
    records = store.trials()
    store.close()
    assert [r.state for r in records] == ["complete"] * 6
    keys = {f"task:{t}/acc" for t in search_tasks(toy_world)} | {"l2_from_base"}
    for r in records:
        assert set(r.objectives) == keys
        assert all(0.0 <= r.objectives[k] <= 1.0 for k in keys - {"l2_from_base"})
        assert r.objectives["l2_from_base"] > 0
        assert r.recipe_json and r.timings["eval_s"] > 0
    front = json.loads((run / "pareto.json").read_text())["front"]
    assert front and {f["number"] for f in front} <= {r.number for r in records}
    assert "Pareto front" in first.stdout

    # the same command again: nothing left to do, nothing evaluated twice
    again = evomerge("search", str(cfg), "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    store = RunStore.open(run)
    assert len(store.trials()) == 6
    store.close()

    # a bigger budget is the same run, continued: 2 more trials, the first 6 untouched
    cfg = write(tmp_path, space(toy_world, budget=8))
    more = evomerge("resume", str(run), cwd=tmp_path)
    assert more.returncode == 0
    more = evomerge("search", str(cfg), "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    store = RunStore.open(run)
    after = store.trials()
    store.close()
    assert len(after) == 8 and [r.objectives for r in after[:6]] == [r.objectives for r in records]

    # export the best, merge it from disk with both tools, and score it again
    out = tmp_path / "best.yaml"
    exported = evomerge("export", str(run), "--best", "-o", str(out), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    best_number = int(out.read_text().split("trial ")[1].split()[0])
    best = next(r for r in after if r.number == best_number)
    assert evomerge("merge", str(out), str(tmp_path / "evo_merged"), cwd=tmp_path).returncode == 0

    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(out.read_text())), str(tmp_path / "mk_merged"),
              MergeOptions(copy_tokenizer=True, quiet=True))

    # what the trial evaluated: the worker's in-memory path on the stored recipe
    from evomerge.merge.inmemory import ResidentModels
    from evomerge.recipe import Recipe
    from tests.merge.test_merge_command import load_folder

    recipe = Recipe.from_json(best.recipe_json)
    resident = ResidentModels(recipe.merge.referenced_models(), recipe.merge.base_model)
    evaluated = {k: v.clone() for k, v in resident.tensors[recipe.merge.base_model].items()}
    resident.merge_into(resident.plan(recipe.merge), evaluated)
    for folder in ("evo_merged", "mk_merged"):
        merged = load_folder(tmp_path / folder)
        for name, tensor in evaluated.items():
            assert torch.allclose(merged[name], tensor, atol=1e-6, rtol=0), (folder, name)

    assert_rescores_as(tmp_path / "evo_merged", cfg, best)

    shown = evomerge("show", str(run), cwd=tmp_path)
    assert shown.returncode == 0 and "Pareto front" in shown.stdout
