"""optuna-dashboard on a run folder's trial log, read through its JSON API as the web page reads it:
the run's study, every trial, the objective names and the coordinate names as evomerge names
them, and each trial's recipe."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from evomerge.store import RunStore
from tests.ports import free_port
from tests.runs_without_models import make_toy_run

START_TIMEOUT_S = 120



def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def dashboard(tmp_path):
    """``optuna-dashboard sqlite:///runs/toy_ties/trials.db`` on a loopback port; yields (run, base URL)."""
    exe = shutil.which("optuna-dashboard") or str(Path(sys.executable).with_name("optuna-dashboard"))
    run, _config = make_toy_run(tmp_path / "runs", trials=12)
    port = free_port()
    log = open(tmp_path / "dashboard.log", "wb")
    proc = subprocess.Popen([exe, f"sqlite:///{run / 'trials.db'}", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                _get(f"{base}/api/studies")
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, (tmp_path / "dashboard.log").read_text()
                assert time.monotonic() < deadline, "optuna-dashboard did not answer"
                time.sleep(0.5)
        yield run, base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_dashboard_shows_the_run_as_evomerge_names_it(dashboard):
    run, base = dashboard
    store = RunStore.open(run)
    try:
        records = store.trials()
        directions = store.directions
        study_name = store.study_name
    finally:
        store.close()

    studies = _get(f"{base}/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == [study_name] == [run.name]
    assert studies[0]["directions"] == list(directions.values())

    detail = _get(f"{base}/api/studies/{studies[0]['study_id']}?after=0")
    assert detail["objective_names"] == list(directions)  # axes read task:toy_arith/acc, not "Objective 0"
    shown = {t["number"]: t for t in detail["trials"]}
    assert sorted(shown) == [r.number for r in records]  # every trial, failed ones included
    for r in records:
        trial = shown[r.number]
        assert trial["state"].lower() == {"complete": "complete", "failed": "fail"}[r.state]
        assert {p["name"]: p["param_external_value"] for p in trial["params"]} == {
            k: str(v) for k, v in r.params.items()
        }
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        assert json.loads(attrs["recipe"]) == json.loads(r.recipe_json)  # the mergekit config, readable
        if r.state == "complete":
            assert json.loads(attrs["objectives"]) == r.objectives
        else:
            assert attrs["error"] == r.error
    assert {p["name"] for p in detail["union_search_space"]} == set(records[0].params)
