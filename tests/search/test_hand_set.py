"""Hand-set trials first: real searches on the toy world (in-process pool, real lm-eval scoring,
real pycma and Optuna), checking that the obvious merges run first, labelled, decoded to exactly
the recipes a person would write, that the search's best is never below them, and that a resume
never runs them twice."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import yaml

from evomerge import failpoints
from evomerge.hand_set import HAND_SET_ATTR
from evomerge.search import run_search
from evomerge.space_config import parse_space_config
from tests.reliability.helpers import read_run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
HAND_SET_LABELS = [
    "hand-set: base alone",
    "hand-set: arith alone",
    "hand-set: reverse alone",
    "hand-set: task arithmetic, weight 1",
    "hand-set: ties, registry defaults, weight 1",
]


def space_data(toy_world, *, driver: str, budget: int, **search) -> dict:
    """Task arithmetic or TIES, one value per donor (as the demo space searches the method)."""
    donors = [str(p) for _, p in sorted(toy_world.specialists.items())]
    return {
        "name": f"hand_{driver}",
        "models": {"base": str(toy_world.base), "donors": donors},
        "merge": {"method": ["task_arithmetic", "ties"], "parameters": {
            "weight": {"range": [0.0, 1.2]}, "density": {"range": [0.2, 1.0]}, "lambda": {"range": [0.5, 1.5]}}},
        "objectives": [{"task": f"toy_{n}", "metric": "acc", "direction": "maximize"} for n in sorted(toy_world.specialists)],
        "evaluation": {"items": 8, "batch_size": 8, "include_path": [str(ROOT / "eval_tasks")]},
        "search": {"driver": driver, "budget": budget, "seed": 0, **({"population": 4} if driver == "cma" else {}), **search},
        "workers": {"count": 2, "cpus_per_worker": 1, "pool": "inprocess"},
    }


def config(data: dict, tmp_path: Path):
    return parse_space_config(data, source=str(tmp_path / "space.yaml"))


def mean_score(record) -> float:
    return sum(record.objectives.values()) / len(record.objectives)


def merged_tensors(merge_config) -> dict[str, torch.Tensor]:
    from evomerge.merge.inmemory import ResidentModels

    resident = ResidentModels(merge_config.referenced_models(), merge_config.base_model)
    live = {k: v.clone() for k, v in resident.tensors[merge_config.base_model].items()}
    resident.merge_into(resident.plan(merge_config), live)
    return live


@pytest.mark.parametrize("driver", ["cma", "tpe"])
def test_hand_set_trials_come_first_labelled_and_the_search_ends_no_lower(toy_world, tmp_path, driver):
    from evomerge.report import show
    from evomerge.store import RunStore

    budget = len(HAND_SET_LABELS) + 8
    notices: list[str] = []
    run = run_search(config(space_data(toy_world, driver=driver, budget=budget), tmp_path), runs_dir=tmp_path / "runs",
                     on_notice=notices.append)
    records, _ = read_run(run)
    assert len(records) == budget and all(r.state == "complete" for r in records)
    first = records[: len(HAND_SET_LABELS)]
    assert [r.attrs.get(HAND_SET_ATTR) for r in first] == HAND_SET_LABELS
    assert not any(HAND_SET_ATTR in r.attrs for r in records[len(HAND_SET_LABELS):])
    if driver == "cma":  # the CMA stream starts after the hand-set trials, at generation 0
        assert [r.attrs["generation"] for r in records[len(HAND_SET_LABELS):]] == [0] * 4 + [1] * 4
    # the run's best on its own items is at least the best hand-set trial's
    assert max(map(mean_score, records)) >= max(map(mean_score, first))

    # the progress log names each hand-set trial by its label
    from evomerge.loop import Progress
    from evomerge.reporter import trial_line

    line = trial_line(Progress(budget=budget, finished_before=0), first[3], new_best=False)
    assert line.startswith(f"trial {first[3].number} (hand-set: task arithmetic, weight 1) complete: "), line

    # `show` says which trials are hand-set, by label
    store = RunStore.open(run)
    try:
        from rich.console import Console

        text = io.StringIO()
        show(store, console=Console(file=text, width=250))
    finally:
        store.close()
    out = text.getvalue()
    assert f"Hand-set trials ({len(HAND_SET_LABELS)})" in out
    for label in HAND_SET_LABELS:
        assert label in out


def test_hand_set_recipes_are_the_recipes_a_person_writes(toy_world, tmp_path):
    """Each hand-set trial merges to what its hand-written config merges to, and the exported
    mergekit YAML of the task-arithmetic one means that config (the same merged tensors)."""
    import subprocess
    import sys

    from evomerge.merge.config import parse_merge_config
    from evomerge.recipe import Recipe

    data = space_data(toy_world, driver="cma", budget=len(HAND_SET_LABELS))
    run = run_search(config(data, tmp_path), runs_dir=tmp_path / "runs")
    records, _ = read_run(run)
    by_label = {r.attrs[HAND_SET_ATTR]: r for r in records}
    base, donors = data["models"]["base"], data["models"]["donors"]
    arith, reverse = donors  # sorted names: arith, reverse

    def task_arithmetic(weights: list[float]) -> dict:
        return {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
                "parameters": {"lambda": 1.0},
                "models": [{"model": d, "parameters": {"weight": w}} for d, w in zip(donors, weights)]}

    written = {
        "hand-set: task arithmetic, weight 1": task_arithmetic([1.0, 1.0]),
        "hand-set: ties, registry defaults, weight 1": {
            "merge_method": "ties", "base_model": base, "dtype": "float32",
            "models": [{"model": d, "parameters": {"weight": 1.0}} for d in donors]},
    }
    for label, by_hand in written.items():
        got = merged_tensors(Recipe.from_json(by_label[label].recipe_json).merge)
        want = merged_tensors(parse_merge_config(by_hand, source=label))
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), (label, name)
    # "alone" is each input model, tensor for tensor (base + 1 * (donor - base), up to rounding)
    from safetensors.torch import load_file

    for label, folder in [("hand-set: base alone", base), ("hand-set: arith alone", arith),
                          ("hand-set: reverse alone", reverse)]:
        got = merged_tensors(Recipe.from_json(by_label[label].recipe_json).merge)
        original = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            original.update(load_file(f))
        for name, tensor in original.items():
            torch.testing.assert_close(got[name], tensor.to(got[name].dtype), rtol=0, atol=1e-6)

    # the export of the task-arithmetic trial is a mergekit config that merges to the hand-written one
    number = by_label["hand-set: task arithmetic, weight 1"].number
    out = tmp_path / "ta.yaml"
    done = subprocess.run([sys.executable, "-m", "evomerge.cli", "export", str(run), "--trial", str(number), "-o", str(out)],
                          check=False, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    exported = parse_merge_config(yaml.safe_load(out.read_text()), source=str(out))
    assert exported.merge_method == "task_arithmetic"
    got, want = merged_tensors(exported), merged_tensors(parse_merge_config(written["hand-set: task arithmetic, weight 1"],
                                                                            source="by hand"))
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("driver", ["cma", "tpe"])
def test_a_resume_after_an_interruption_in_the_hand_set_trials_runs_none_twice(toy_world, tmp_path, driver,
                                                                              set_failpoints):
    """The search stops while the third hand-set trial is out; the resume re-runs the interrupted
    ones under their labels and never the finished ones, then the driver carries on; CMA's stream
    is the one an uninterrupted run proposes."""
    from evomerge.failpoints import FailpointError

    budget = len(HAND_SET_LABELS) + 4
    data = space_data(toy_world, driver=driver, budget=budget)
    set_failpoints("search.after_dispatch=raise@3")
    with pytest.raises(FailpointError):
        run_search(config(data, tmp_path), runs_dir=tmp_path / "runs")
    failpoints.configure("")
    run = tmp_path / "runs" / data["name"]
    before, _ = read_run(run)
    assert 0 < sum(r.finished for r in before) < len(HAND_SET_LABELS)
    assert any(r.interrupted for r in before)
    run_search(config(data, tmp_path), runs_dir=tmp_path / "runs")
    records, _ = read_run(run)
    finished = [r for r in records if r.finished]
    assert len(finished) == budget
    labels = [r.attrs[HAND_SET_ATTR] for r in finished if HAND_SET_ATTR in r.attrs]
    assert sorted(labels) == sorted(HAND_SET_LABELS)  # each once
    for r in records:
        if r.interrupted:
            again = [t for t in records if t.attrs.get("rerun_of") == r.number]
            assert len(again) == 1 and again[0].attrs[HAND_SET_ATTR] == r.attrs[HAND_SET_ATTR]
            assert again[0].params == r.params

    # a further resume with a larger budget runs no hand-set trial again
    data["search"]["budget"] = budget + 2
    run_search(config(data, tmp_path), runs_dir=tmp_path / "runs")
    after, _ = read_run(run)
    assert sum(HAND_SET_ATTR in r.attrs and r.finished for r in after) == len(HAND_SET_LABELS)

    if driver == "cma":  # the same CMA candidates as a run never interrupted
        data["name"] = "uninterrupted"
        ref = run_search(config(data, tmp_path), runs_dir=tmp_path / "runs")
        ref_records, _ = read_run(ref)

        def members(rs):
            return {(r.attrs["generation"], r.attrs["member"]): r.attrs["unit_x"] for r in rs
                    if r.finished and "member" in r.attrs}

        assert members(after) == members(ref_records)


def test_hand_set_false_runs_none_and_a_space_that_cannot_express_one_says_why(toy_world, tmp_path):
    data = space_data(toy_world, driver="random", budget=2, hand_set=False)
    records, _ = read_run(run_search(config(data, tmp_path), runs_dir=tmp_path / "runs"))
    assert len(records) == 2 and not any(HAND_SET_ATTR in r.attrs for r in records)

    from evomerge.hand_set import hand_set_points
    from evomerge.space import SearchSpace

    ties_only = space_data(toy_world, driver="random", budget=2)
    ties_only["merge"] = {"method": "ties", "parameters": {"weight": {"range": [0.0, 0.8]}}}
    points, notices = hand_set_points(SearchSpace(config(ties_only, tmp_path), 4))
    # task arithmetic is not in the space; weight 1 lies outside [0, 0.8]: nothing is clipped
    assert points == []
    assert any("task_arithmetic is not among the space's methods" in n for n in notices), notices
    assert any("weight 1 lies outside the range [0, 0.8]" in n for n in notices), notices
    ties_only["merge"] = {"method": "ties", "parameters": {"normalize": False}}
    points, notices = hand_set_points(SearchSpace(config(ties_only, tmp_path), 4))
    assert points == [] and any("normalize is pinned to False, not True" in n for n in notices), notices


def test_a_search_killed_in_its_hand_set_trials_resumes_to_the_uninterrupted_run(toy_world, tmp_path):
    """SIGKILL of the search process (no handler runs) while a hand-set trial is out, or with the
    last hand-set result in hand and not recorded (CMA not yet built): the resume runs each label
    once and CMA proposes the candidates of a run never killed, with the same scores. (Both kill
    points in one test: they share the uninterrupted run, made here in the test's process.)"""
    import subprocess
    import sys

    from tests.cli_inprocess import run_cli
    from tests.reliability.helpers import env_with

    budget = len(HAND_SET_LABELS) + 8
    data = space_data(toy_world, driver="cma", budget=budget)
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(data, sort_keys=False))

    def cli(*args: str, failpoints: str | None = None) -> int:
        done = subprocess.run([sys.executable, "-m", "evomerge.cli", *args], check=False, capture_output=True, text=True,
                              cwd=tmp_path, timeout=600, env=env_with(failpoints))
        return done.returncode

    def members(rs):
        return {(r.attrs["generation"], r.attrs["member"]): (r.attrs["unit_x"], r.objectives) for r in rs
                if r.finished and "member" in r.attrs}

    ref, _ = read_run(run_search(config(data, tmp_path), runs_dir=tmp_path / "reference"))
    assert len(members(ref)) == budget - len(HAND_SET_LABELS)
    for k, kill_at in enumerate(["search.after_dispatch=kill@3", "search.before_tell=kill@4"]):
        runs = tmp_path / f"killed{k}"
        assert cli("search", str(space_file), "--runs-dir", str(runs), failpoints=kill_at) == -9, kill_at
        run = runs / data["name"]
        # the resume is not killed: the same entry point in this process (tests/cli_inprocess.py)
        resumed = run_cli("resume", str(run), cwd=tmp_path, env={"EVOMERGE_PARETO_INTERVAL_S": "0"})
        assert resumed.returncode == 0, (kill_at, resumed.stderr[-3000:])
        records, _ = read_run(run)
        assert any(r.interrupted for r in records), kill_at
        finished = [r for r in records if r.finished]
        assert len(finished) == budget, kill_at
        assert sorted(r.attrs[HAND_SET_ATTR] for r in finished if HAND_SET_ATTR in r.attrs) == sorted(HAND_SET_LABELS)
        assert members(finished) == members(ref), kill_at
