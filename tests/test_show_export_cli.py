"""``evomerge show`` and ``evomerge export`` as a person reads and uses them, on a real run folder."""

from __future__ import annotations

import yaml
from click.testing import CliRunner

from evomerge.cli import main
from evomerge.store import RunStore
from tests.runs_without_models import make_toy_run


def _front(run) -> list[int]:
    store = RunStore.open(run)
    try:
        return sorted(r.number for r in store.pareto())
    finally:
        store.close()


def test_pareto_export_to_one_file_name_is_refused_with_the_fix(tmp_path, monkeypatch):
    run, _ = make_toy_run(tmp_path / "runs", trials=16)
    front = _front(run)
    assert len(front) >= 2
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["export", str(run), "--pareto", "-o", "a.yaml"])
    assert result.exit_code == 2
    message = result.output.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert f"{len(front)} recipes" in message and "give a folder (-o a/)" in message and "--trial N" in message
    assert not (tmp_path / "a.yaml").exists() and not (run / "exports").exists()  # nothing written

    # a folder takes the whole front; one recipe goes to the file named
    result = CliRunner().invoke(main, ["export", str(run), "--pareto", "-o", "front"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "front").iterdir()) == [f"trial_{n:05d}.yaml" for n in front]
    result = CliRunner().invoke(main, ["export", str(run), "--trial", str(front[0]), "-o", "a.yaml"])
    assert result.exit_code == 0, result.output
    from evomerge.store import RunStore

    store = RunStore.open(run)
    method = next(t for t in store.trials() if t.number == front[0]).params["method"]  # the demo space searches it
    store.close()
    assert yaml.safe_load((tmp_path / "a.yaml").read_text())["merge_method"] == method


def test_show_says_counts_plainly(tmp_path):
    run, _ = make_toy_run(tmp_path / "runs", trials=9, fail_trial=5)
    result = CliRunner().invoke(main, ["show", str(run)])
    assert result.exit_code == 0, result.output
    first = " ".join(result.output.split("Pareto front")[0].split())  # rich wraps at the terminal width
    assert first.endswith("8 trials complete, 1 failed (reasons below)")
    assert " 0 " not in first and "interrupted" not in first and "running" not in first
    assert "a candidate fault, for the test" in result.output
