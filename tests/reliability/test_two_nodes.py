"""A search across a two-node Ray cluster that loses a node partway and finishes on the other.

Both nodes run on this machine (their own ports, one temp dir that other engineers' ``ray.init``
never looks in). The search joins with ``--ray-address``; workers SPREAD over both nodes. Once
node 2 has finished a trial and has another out, all its processes are killed; the candidate it
held is retried on a fresh worker, which fits on the head (it has a CPU for every worker). The run
must end with every trial complete exactly once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, cli_env, good_space, write_yaml
from .ray_nodes import RayNode, node_env

pytestmark = pytest.mark.slow

BUDGET = 10


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The two-node cluster, started once for this module's tests. The test that loses node 2
    runs last; the refusal test passes on either cluster (with node 2 gone the head alone still
    has 2 CPUs: 2 workers of 2 still need more, and no node has 3)."""
    temp = Path(f"/tmp/evm2n{os.getpid()}")  # short: Ray's socket paths must fit in 107 bytes
    logs = tmp_path_factory.mktemp("two_nodes")
    env = node_env(str(ROOT))
    head = RayNode(["--include-dashboard=false", "--num-cpus=2", f"--temp-dir={temp}"], env, logs / "head.log",
                   head=True)
    nodes = [head]
    try:
        head.wait_started()
        second = RayNode([f"--address={head.address}", "--num-cpus=1", '--resources={"node2": 1}'], env,
                         logs / "node2.log")
        nodes.append(second)
        second.wait_started()
        yield head.address, head, second
    finally:
        for node in reversed(nodes):
            node.kill()
        shutil.rmtree(temp, ignore_errors=True)


def _trials(run: Path) -> list:
    from evomerge.store import RunStore

    if not (run / "trials.db").exists():
        return []
    store = RunStore.open(run)
    try:
        return store.trials()
    finally:
        store.close()


def _pid(record) -> int:
    return int(str(record.attrs["worker"]).split(":")[1])


def _own_cluster_address(space: Path, env: dict[str, str], cwd: Path) -> str:
    script = ("import sys, ray; from evomerge.pool.ray_pool import RayPool; "
              "from evomerge.space_config import load_space_config; "
              "RayPool(None, load_space_config(sys.argv[1]).workers).connect(); "
              "print('gcs', ray.get_runtime_context().gcs_address)")
    done = subprocess.run([sys.executable, "-c", script, str(space)], check=False, capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split("gcs ", 1)[1].split()[0]


def test_without_an_address_a_search_starts_its_own_cluster(ray_cluster, toy_world, tmp_path):
    """Even with RAY_ADDRESS pointing at a running cluster (as a user's shell may have it), a space
    file without ray_address gets a private cluster: ray.init(address='local')."""
    address = ray_cluster
    space = write_yaml(tmp_path / "space.yaml", good_space(toy_world))
    own = _own_cluster_address(space, cli_env(RAY_ADDRESS=address, RAY_AUTH_MODE="disabled"), tmp_path)
    assert own.rsplit(":", 1)[1] != address.rsplit(":", 1)[1]


def test_workers_the_cluster_cannot_place_are_refused_before_the_run_exists(cluster, toy_world, tmp_path):
    """The cluster has 3 CPUs (2 on the head, 1 on node 2): 2 workers of 2 CPUs would leave one
    pending for ever, and a worker of 3 CPUs fits on no node."""
    address, _, _ = cluster
    env = cli_env(RAY_AUTH_MODE="disabled")
    for workers, expect in (({"count": 2, "cpus_per_worker": 2}, "workers.count: 2 workers of 2 CPUs need 4; the cluster at"),
                            ({"count": 1, "cpus_per_worker": 3}, "workers.cpus_per_worker: each worker asks for 3 CPUs; "
                                                                 "no node of the cluster at")):
        space = write_yaml(tmp_path / "space.yaml", good_space(toy_world, workers=workers))
        done = subprocess.run([sys.executable, "-m", "evomerge.cli", "search", str(space), "--runs-dir", str(tmp_path / "runs"),
                               "--ray-address", address], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and expect in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert not (tmp_path / "runs").exists()


def test_search_survives_losing_a_node(cluster, toy_world, tmp_path):
    address, _, second = cluster
    space = write_yaml(tmp_path / "space.yaml", good_space(toy_world, name="twonode", **{
        "search.budget": BUDGET, "search.population": 4, "workers.count": 2}))
    run = tmp_path / "runs" / "twonode"
    # each candidate takes a second or more, so the test sees node 2 finish one while others are out
    env = cli_env(RAY_AUTH_MODE="disabled", EVOMERGE_FAILPOINTS="worker.after_merge=sleep(1)")
    search = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "search", str(space), "--runs-dir",
                               str(tmp_path / "runs"), "--ray-address", address], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = time.time()
    try:
        node2_pids: set[int] = set()
        before: dict[int, dict] = {}
        while time.time() - started < 400 and search.poll() is None:
            time.sleep(0.5)
            node2_pids |= second.pids()
            records = _trials(run)
            done = [r for r in records if r.state == "complete"]
            on_node2 = [r for r in done if _pid(r) in node2_pids]
            if on_node2 and len(records) > len(done):  # node 2 worked, and trials are out
                before = {r.number: dict(r.objectives) for r in done}
                second.kill()
                break
        assert before, "the search never placed a finished trial on node 2 (workers did not spread)"
        output, _ = search.communicate(timeout=400)
    finally:
        if search.poll() is None:
            search.kill()
    assert search.returncode == 0, output[-3000:]
    records = _trials(run)
    complete = [r for r in records if r.state == "complete"]
    assert len(complete) == BUDGET and len(records) == BUDGET, [(r.number, r.state, r.error) for r in records]
    assert sorted(r.number for r in records) == list(range(BUDGET))  # each once; none lost, none repeated
    for number, objectives in before.items():  # finished before the loss: kept as they were
        assert next(r for r in records if r.number == number).objectives == objectives
    workers = {str(r.attrs["worker"]).rsplit(":node=", 1)[-1] for r in complete}
    assert len(workers) == 2, workers  # two Ray nodes did the work
    after = [r for r in complete if r.number not in before]
    assert after and all(_pid(r) not in node2_pids for r in after)  # the rest ran on the head
    # every file was renamed into place: no temp file left behind, nothing but the run's own files
    assert {p.name for p in run.iterdir()} <= {"space.yaml", "config_hash", "run.json", "trials.db", "trials.db-wal",
                                                "trials.db-shm", "pareto.json", "writer.lock"}
    assert not list(run.parent.glob(".*"))
    print(f"two-node search: {len(before)} trials before the loss, {len(after)} after; "
          f"retried: {[r.number for r in complete if r.attrs.get('attempts', 1) > 1]}; {time.time() - started:.0f} s")
