"""A run is portable: a search started in one folder with relative model paths is resumed,
exported and merged from other folders, through the command line as a user runs it; and a run
folder from before references were resolved (relative paths in its stored config, the hash of
them) still resumes where it ran, and says where to run it from anywhere else."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.cli_inprocess import run_cli

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def evomerge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The command line's entry point run from ``cwd``, in this process (``tests/cli_inprocess.py``:
    what is tested is which folder a command runs from, not a fresh interpreter)."""
    return run_cli(*args, cwd=cwd, env={"HF_HUB_OFFLINE": "1"})  # the Hub is a boundary: nothing here may reach it


def _project(toy_world, tmp_path: Path) -> Path:
    """``project/`` holding the models and the tasks under relative names, and a space file naming them so."""
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    (project / "models" / "base").symlink_to(toy_world.base)
    for name, folder in toy_world.specialists.items():
        (project / "models" / name).symlink_to(folder)
    (project / "tasks").symlink_to(ROOT / "eval_tasks")
    space = {
        "name": "portable",
        "models": {"base": "models/base", "donors": [f"models/{n}" for n in sorted(toy_world.specialists)]},
        "merge": {"method": "linear", "layer_groups": 1, "parameters": {"weight": {"range": [0.2, 1.0]}}},
        "objectives": [{"task": f"toy_{n}", "metric": "acc", "direction": "maximize"}
                       for n in sorted(toy_world.specialists)],
        "evaluation": {"items": 4, "batch_size": 4, "include_path": ["tasks"]},
        "search": {"driver": "tpe", "budget": 2, "seed": 0},
        "workers": {"count": 1, "cpus_per_worker": 1, "pool": "inprocess"},
    }
    (project / "space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    return project


def _trials(run: Path) -> list:
    from evomerge.store import RunStore

    store = RunStore.open(run)
    try:
        return store.trials()
    finally:
        store.close()


def _raise_budget(run: Path, budget: int) -> None:
    """What a user does to continue a finished run: the budget is outside the run's identity."""
    data = yaml.safe_load((run / "space.yaml").read_text())
    data["search"]["budget"] = budget
    (run / "space.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def test_a_run_resumes_exports_and_merges_from_any_folder(toy_world, tmp_path):
    project = _project(toy_world, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    searched = evomerge("search", "space.yaml", cwd=project)
    assert searched.returncode == 0, searched.stderr[-3000:]
    run = project / "runs" / "portable"

    stored = yaml.safe_load((run / "space.yaml").read_text())
    assert stored["models"]["base"] == str(project / "models" / "base")
    assert [d["model"] for d in stored["models"]["donors"]] == [
        str(project / "models" / n) for n in sorted(toy_world.specialists)]
    assert stored["evaluation"]["include_path"] == [str(project / "tasks")]
    assert stored["as_written"]["models.base"] == "models/base"  # what the user wrote, beside it
    identity = (run / "config_hash").read_text()

    # resume from another folder: the same run (same identity), one more trial
    _raise_budget(run, 3)
    resumed = evomerge("resume", str(run), cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [t.state for t in _trials(run)] == ["complete"] * 3
    assert (run / "config_hash").read_text() == identity

    # export from a third folder; the file names the models by where they are, and says how they were written
    exported = evomerge("export", str(run), "--pareto", "-o", "front", cwd=elsewhere)
    assert exported.returncode == 0, exported.stderr
    files = sorted((elsewhere / "front").iterdir())
    assert files
    text = files[0].read_text()
    assert "# the space file's models.base: models/base" in text
    merge = yaml.safe_load(text)
    assert {m["model"] for m in merge["models"]} >= {str(project / "models" / n) for n in toy_world.specialists}
    assert all(Path(m["model"]).is_absolute() and Path(m["model"]).is_dir() for m in merge["models"])

    # merge the exported file from yet another folder
    third = tmp_path / "third"
    third.mkdir()
    merged = evomerge("merge", str(files[0]), "out", cwd=third)
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert (third / "out" / "config.json").is_file() and list((third / "out").glob("*.safetensors"))

    # the space file itself, run from the other folder, names other (missing) models: one clear line
    refused = evomerge("search", str(project / "space.yaml"), cwd=elsewhere)
    assert refused.returncode == 2
    message = refused.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message and "Hub" not in message
    assert "models.base" in message and "'models/base'" in message and str(elsewhere) in message
    assert f"it exists from {project}" in message


def test_a_run_from_before_resolution_still_resumes(toy_world, tmp_path):
    from evomerge.space_config import load_space_config

    project = _project(toy_world, tmp_path)
    run = project / "runs" / "portable"
    searched = evomerge("search", "space.yaml", cwd=project)
    assert searched.returncode == 0, searched.stderr[-3000:]
    before = _trials(run)

    # make it a run folder as the previous version wrote it: the references as written, and their hash
    written = load_space_config(project / "space.yaml")
    (run / "space.yaml").write_text(written.to_yaml())
    (run / "config_hash").write_text(written.config_hash() + "\n")

    # from another folder its relative paths name nothing: refused, saying where to run it from
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _raise_budget(run, 3)
    refused = evomerge("resume", str(run), cwd=elsewhere)
    assert refused.returncode == 2, refused.stderr[-3000:]
    message = refused.stderr.strip()
    assert len(message.splitlines()) == 1 and "models.base" in message and f"it exists from {project}" in message
    assert len(_trials(run)) == len(before)

    # from the folder it ran in it resumes: the same run, its trials kept, one more added
    resumed = evomerge("resume", "runs/portable", cwd=project)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = _trials(run)
    assert len(after) == 3 and [t.objectives for t in after[:2]] == [t.objectives for t in before]
    # and it is now a portable run: resolved references, their hash; resumable from anywhere
    stored = yaml.safe_load((run / "space.yaml").read_text())
    assert stored["models"]["base"] == str(project / "models" / "base")
    _raise_budget(run, 4)
    again = evomerge("resume", str(run), cwd=elsewhere)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(_trials(run)) == 4
