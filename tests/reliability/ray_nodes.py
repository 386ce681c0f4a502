"""Ray nodes started for a test with ``ray start --block``, so every process a node runs is a
descendant of one process we started: stopping a node kills exactly those, never another
engineer's cluster on the same machine (``ray stop`` would stop every cluster here)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayNode:
    """One ``ray start --block`` process and everything it runs (raylet, agents, workers)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        # every port a node opens is given, so two nodes on one host never collide
        ports = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port"]
        command = ["ray", "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
                   f"--object-store-memory={100 * 2**20}", *(f"{p}={free_port()}" for p in ports), *args]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def processes(self) -> list[psutil.Process]:
        try:
            return [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def pids(self) -> set[int]:
        return {p.pid for p in self.processes()}

    def wait_started(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {self.log.read_text()[-2000:]}")
            if "Ray runtime started" in self.log.read_text():
                return
            time.sleep(0.5)
        raise TimeoutError(f"ray start did not finish: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL the node's processes, children first (a lost machine gives no notice)."""
        for p in reversed(self.processes()):
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)


def node_env(pythonpath: str) -> dict[str, str]:
    """Workers import this checkout; node failures are noticed in seconds; no auth token (the
    nodes are local and a token left in ~/.ray by another tool would lock the second node out)."""
    return dict(os.environ, PYTHONPATH=pythonpath, RAY_AUTH_MODE="disabled", RAY_health_check_period_ms="1000",
                RAY_health_check_failure_threshold="3", RAY_DEDUP_LOGS="0")
