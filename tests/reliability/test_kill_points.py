"""SIGKILL at named moments of a real search (failpoints), and at a random one, with a resume
after each: nothing recorded twice, nothing lost, nothing half-written, and the seeded CMA-ES run
proposes exactly the candidates, and finds exactly the best, of the same run left alone."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml

from evomerge import failpoints

from .helpers import env_with, read_run, reap_session, start, write_space
from .helpers import space as toy_space

pytestmark = pytest.mark.slow

BUDGET = 16  # 4 generations of 4
# Each fires once in the whole test: the counters live in one folder shared by every process.
KILL_POINTS = {
    "search.after_dispatch": 3,  # two candidates out on workers, a third just sent
    "search.before_tell": 4,  # a result arrived and is not yet recorded
    "store.before_replace.pareto.json": 12,  # in pareto.json's atomic write: temp file written, not renamed
}
# ("search.after_tell=kill@8", a trial recorded with its generation still open, passes too; it is left
# out because every kill costs a restart of the search and its workers.)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _by_member(records) -> dict[tuple[int, int], object]:
    out: dict[tuple[int, int], object] = {}
    for r in records:
        if r.state == "complete":
            key = (r.attrs["generation"], r.attrs["member"])
            assert key not in out, f"generation/member {key} completed twice: trials {out[key].number} and {r.number}"
            out[key] = r
    return out


def _best(records, config):
    from evomerge.objectives import ObjectiveSpec, scalarize

    objectives = [ObjectiveSpec(o.key, o.direction, o.weight) for o in config.objectives]
    complete = [r for r in records if r.state == "complete"]
    return max(complete, key=lambda r: (scalarize(r.objectives, objectives), -r.number))


def _check_folder(run: Path) -> None:
    """Every file parses; no temp file or half-built folder is left; pareto.json agrees with the log."""
    leftovers = [p.name for p in run.iterdir() if p.name.startswith(".")]
    leftovers += [p.name for p in run.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers
    yaml.safe_load((run / "space.yaml").read_text())
    json.loads((run / "run.json").read_text())
    assert len((run / "config_hash").read_text().strip()) >= 16
    records, pareto = read_run(run)
    assert pareto["counts"]["complete"] == sum(r.state == "complete" for r in records)
    assert {f["number"] for f in pareto["front"]} <= {r.number for r in records if r.state == "complete"}


def test_sigkill_at_every_moment_then_resume_matches_an_uninterrupted_run(toy_world, tmp_path, ray_cluster):
    from evomerge.space_config import load_space_config

    data = toy_space(toy_world, budget=BUDGET)
    ref_dir, kill_dir, counters = tmp_path / "reference", tmp_path / "killed", tmp_path / "failpoints"
    for d in (ref_dir, kill_dir, counters):
        d.mkdir()
    ref_cfg, kill_cfg = write_space(ref_dir, data), write_space(kill_dir, data)
    config = load_space_config(kill_cfg)

    # the uninterrupted run, alongside, in its own process (no failpoints, no Ray: the same evaluator)
    reference = start(["search", str(ref_cfg), "--runs-dir", str(ref_dir / "runs"), "--pool", "inprocess"], cwd=ref_dir,
                      env=env_with(), log=ref_dir / "log.txt")

    spec = ";".join(f"{name}=kill@{n}" for name, n in KILL_POINTS.items()) + ";worker.evaluate=count"
    env = env_with(spec, counters, RAY_AUTH_MODE="disabled")
    run = kill_dir / "runs" / "faults"
    # every launch joins the session's Ray cluster: a killed search's actors die with it (Ray ends
    # the job of a dead driver) and the resume starts its own
    joined = ["--ray-address", ray_cluster]
    args = ["search", str(kill_cfg), "--runs-dir", str(kill_dir / "runs"), *joined]
    exits: list[int] = []
    fired: list[str] = []
    lingered: list[list[str]] = []
    timer_s = round(random.uniform(2.0, 20.0), 1)  # one kill at a wall-clock moment no failpoint names
    try:
        for launch in range(len(KILL_POINTS) + 3):
            all_fired = all((counters / f"{n}.count").exists() and int((counters / f"{n}.count").read_text()) >= k
                            for n, k in KILL_POINTS.items())
            timed = all_fired and "timer" not in fired
            proc = start(args if launch == 0 else ["resume", str(run), *joined], cwd=kill_dir, env=env,
                         log=kill_dir / f"log{launch}.txt")
            try:
                rc = proc.wait(timeout=timer_s if timed else 600)
            except subprocess.TimeoutExpired:  # the timer ran out first: kill -9 the search process alone
                proc.send_signal(signal.SIGKILL)
                rc = proc.wait()
                fired.append("timer")
            else:
                if rc == -9:
                    name = [h for h in failpoints.read_hits(counters) if h[0] in KILL_POINTS][-1][0]
                    fired.append(name)
                    if name == "store.before_replace.pareto.json":  # the kill left the temp file, not a torn file
                        assert list(run.glob(".pareto.json.*.tmp"))
            lingered.append(reap_session(proc.pid, grace_s=2.0))
            exits.append(rc)
            if (run / "pareto.json").exists():
                json.loads((run / "pareto.json").read_text())  # old or new, never torn, right after the kill
            if rc == 0:
                break
        assert reference.wait(timeout=600) == 0, (ref_dir / "log.txt").read_text()[-3000:]
    finally:
        for p in (reference,):
            if p.poll() is None:
                p.kill()
        reap_session(reference.pid, grace_s=0)
    print(f"exits {exits}; kills {fired}; timer {timer_s}s; left behind after each kill: {lingered}")

    assert exits[-1] == 0, (kill_dir / f"log{len(exits) - 1}.txt").read_text()[-3000:]
    assert set(KILL_POINTS) <= set(fired), (fired, exits)
    assert exits.count(-9) >= len(KILL_POINTS)

    ref_records, _ = read_run(ref_dir / "runs" / "faults")
    records, pareto = read_run(run)
    _check_folder(run)
    # every trial recorded once: complete, or interrupted and asked again
    assert len({r.number for r in records}) == len(records)
    assert all(r.state == "complete" or r.interrupted for r in records), [(r.number, r.state) for r in records]
    assert sum(r.state == "complete" for r in records) == BUDGET == pareto["counts"]["complete"]
    ref, got = _by_member(ref_records), _by_member(records)
    assert sorted(got) == sorted(ref) == [(g, m) for g in range(BUDGET // 4) for m in range(4)]
    for key in ref:  # the same candidates, in the same generations, with the same scores
        assert got[key].attrs["unit_x"] == ref[key].attrs["unit_x"], key
        assert got[key].params == ref[key].params, key
        assert got[key].objectives == ref[key].objectives, key
    for r in records:  # an interrupted trial was re-run as the same member with the same vector
        if r.interrupted:
            again = got[(r.attrs["generation"], r.attrs["member"])]
            assert r.attrs["unit_x"] == again.attrs["unit_x"] and again.number > r.number
    best, ref_best = _best(records, config), _best(ref_records, config)
    assert (best.attrs["generation"], best.attrs["member"]) == (ref_best.attrs["generation"], ref_best.attrs["member"])
    assert best.objectives == ref_best.objectives

    # no completed trial was evaluated again: a recipe is evaluated once, plus once per interrupted try
    evaluations = Counter(ctx for name, _, _, ctx in failpoints.read_hits(counters) if name == "worker.evaluate")
    interrupted = Counter(_digest(r.recipe_json) for r in records if r.interrupted and r.recipe_json)
    for r in got.values():
        d = _digest(r.recipe_json)
        assert 1 <= evaluations[d] <= 1 + interrupted[d], (r.number, evaluations[d], interrupted[d])
