"""Ray nodes started for a test with ``ray start --block``, so every process a node runs is a
descendant of one process we started: stopping a node kills exactly those, never another
engineer's cluster on the same machine (``ray stop`` would stop every cluster here)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from tests.ports import free_ports


PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")
HEAD_PORT_FLAGS = ("--port", "--ray-client-server-port")
START_ATTEMPTS = 3


class RayNode:
    """One ``ray start --block`` process and everything it runs (raylet, agents, workers)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, head: bool = False) -> None:
        self.args, self.env, self.log, self.head = args, env, log, head
        self.address = ""
        self._start()

    def _start(self) -> None:
        # every port a node opens is given, all distinct, so two nodes on one host never collide
        flags = (*PORT_FLAGS, *(HEAD_PORT_FLAGS if self.head else ()))
        ports = dict(zip(flags, free_ports(len(flags)), strict=True))
        if self.head:
            self.address = f"127.0.0.1:{ports['--port']}"
        command = ["ray", "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
                   f"--object-store-memory={100 * 2**20}", *(f"{f}={p}" for f, p in ports.items()),
                   *(["--head"] if self.head else []), *self.args]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def processes(self) -> list[psutil.Process]:
        try:
            return [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def pids(self) -> set[int]:
        return {p.pid for p in self.processes()}

    def wait_started(self, timeout: float = 180) -> None:
        """Wait for the node; start it again on fresh ports when another process took one of its
        ports between choosing and binding (a race no choice of ports can rule out)."""
        deadline, attempts = time.time() + timeout, 1
        while time.time() < deadline:
            if self.proc.poll() is not None:
                text = self.log.read_text()
                if attempts < START_ATTEMPTS and _port_taken(text):
                    attempts += 1
                    self._start()
                    continue
                raise RuntimeError(f"ray start exited: {text[-2000:]}")
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


def _port_taken(log: str) -> bool:
    return "is used by other components" in log or "already in use" in log.lower()


def node_env(pythonpath: str) -> dict[str, str]:
    """Workers import this checkout; node failures are noticed in seconds; no auth token (the
    nodes are local and a token left in ~/.ray by another tool would lock the second node out)."""
    return dict(os.environ, PYTHONPATH=pythonpath, RAY_AUTH_MODE="disabled", RAY_health_check_period_ms="1000",
                RAY_health_check_failure_threshold="3", RAY_DEDUP_LOGS="0")
