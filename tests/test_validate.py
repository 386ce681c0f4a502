"""``evomerge validate``: the search's checks and one real scoring of the base, through the real
command line, writing nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.space import SearchSpace
from evomerge.space_config import load_space_config
from tests.cli_inprocess import run_cli

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _toy_space(toy_world, folder: Path, **changes) -> Path:
    """The README's space file with the toy world's absolute paths and the project's task folder."""
    data = yaml.safe_load((ROOT / "search_spaces" / "toy_ties.yaml").read_text())
    data["models"] = {"base": str(toy_world.base),
                      "donors": [str(toy_world.specialists[n]) for n in ("arith", "reverse")]}
    data["evaluation"]["include_path"] = [str(ROOT / "eval_tasks")]
    for section, values in changes.items():
        data[section] = values
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _tree(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def _validate(space: Path, cwd: Path) -> subprocess.CompletedProcess:
    """A process of its own: that a fresh interpreter prints nothing on stderr is tested."""
    return subprocess.run([sys.executable, "-m", "evomerge.cli", "validate", str(space)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def test_a_good_space_passes_scores_the_base_and_writes_nothing(toy_world, tmp_path):
    space = _toy_space(toy_world, tmp_path)
    before = _tree(tmp_path)
    done = _validate(space, tmp_path)
    assert done.returncode == 0, done.stderr
    assert _tree(tmp_path) == before  # no runs/, no run folder, nothing touched
    assert done.stderr == ""  # no progress bars or subprocess noise from lm-eval
    out = done.stdout
    config = load_space_config(space)
    coordinates = SearchSpace.from_config(config, 4).names
    assert f"search space: {len(coordinates)} coordinates ({coordinates[0]}," in out
    assert f"models.base: {toy_world.base} (4 layers, " in out
    assert f"models.donors[1]: {toy_world.specialists['reverse']} (4 layers, " in out
    assert f"driver: cma, budget {config.search.budget} trials, population 8" in out
    assert "hand-set trials first (4, within the budget): base alone, arith alone, reverse alone, task arithmetic" in out
    assert "'ties, registry defaults, weight 1' skipped: normalize is pinned to False" in out
    assert "workers: 2 on a local Ray cluster, 1 CPU and 0 GPU each" in out
    tasks_total = {t: sum(1 for _ in open(ROOT / "eval_tasks" / f"{t}.jsonl")) for t in ("toy_arith", "toy_reverse")}
    for task, total in tasks_total.items():
        assert f"{task}: a trial scores {min(config.evaluation.items, total)} of its {total} items" in out
    scores = dict(line.strip().split(" = ") for line in out.splitlines() if "(base, 1 item)" in line)
    assert sorted(scores) == ["task:toy_arith/acc", "task:toy_reverse/acc"]
    assert all(float(v.split()[0]) in (0.0, 1.0) for v in scores.values())  # one item: right or wrong
    assert out.rstrip().endswith("nothing was written")


def test_a_bad_space_exits_2_naming_the_field_and_writes_nothing(toy_world, tmp_path):
    space = _toy_space(toy_world, tmp_path, objectives=[
        {"task": "toy_arith", "metric": "accuracy", "direction": "maximize"},
        {"task": "toy_reverse", "metric": "acc", "direction": "maximize"},
    ])
    before = _tree(tmp_path)
    done = run_cli("validate", str(space), cwd=tmp_path)  # the entry point in this process: a refusal needs no fresh one
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0].startswith(f"error: {space}: objectives[0].metric: task 'toy_arith' has no metric 'accuracy'")
    assert _tree(tmp_path) == before


def test_a_run_name_taken_by_another_config_is_refused_and_the_same_config_resumes(toy_world, tmp_path):
    """The run-folder check a search makes, in process (the command line is tested above)."""
    from evomerge.errors import ConfigError
    from evomerge.store import RunStore
    from evomerge.validate import check

    space = _toy_space(toy_world, tmp_path)
    config = load_space_config(space)
    runs = tmp_path / "runs"
    other = yaml.safe_load(space.read_text())
    other["search"]["seed"] = 1
    other_file = tmp_path / "other" / "space.yaml"
    other_file.parent.mkdir()
    other_file.write_text(yaml.safe_dump(other))
    taken = load_space_config(other_file)
    RunStore.create(runs, config.name, taken.to_yaml(), taken.config_hash(),
                    directions={o.key: o.direction for o in taken.objectives}).close()
    before = _tree(runs)
    with pytest.raises(ConfigError, match=r"already exists with a different config \(search\.seed: 1 -> 0\)"):
        check(space, runs_dir=runs)
    assert _tree(runs) == before

    bigger = yaml.safe_load(space.read_text())
    bigger["search"]["budget"] *= 2  # not part of a run's identity: the same run, continued
    space.write_text(yaml.safe_dump(bigger))
    same = tmp_path / "same"
    RunStore.create(same, config.name, config.to_yaml(), config.config_hash(),
                    directions={o.key: o.direction for o in config.objectives}).close()
    assert check(space, runs_dir=same).run_state == f"{same / config.name} holds this config: the search resumes it"
