"""Check that an installation can do what the README documents, using only what it installed.

Run by ``.ci/run`` inside a virtual environment created from nothing but the project's own files,
so that a dependency which some machine happens to have (grpcio for ``ray start --head``, say)
but the project does not declare fails CI on every machine, not only on a new one. Checks:

- ``import evomerge`` and the optional pieces its documented uses import (Ray's client server);
- ``evomerge --help`` and each subcommand's ``--help`` run;
- ``ray start --head`` on a loopback port starts a node and the node stops again (the README's
  "existing Ray cluster" section, and the two-node tests, start nodes this way).

The Ray node is started with ``--block`` in its own session and stopped by signalling that
session, never with ``ray stop``, which would stop every Ray cluster on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUBCOMMANDS = ("merge", "validate", "search", "resume", "show", "plot", "export", "toy")
START_TIMEOUT_S = 120


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports: every socket stays bound until all are chosen (binding port 0
    again after closing may return the same port, and Ray refuses one port for two components)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _run(args: list[str]) -> None:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"check_install: `{' '.join(args)}` failed ({done.returncode}):\n{done.stderr[-2000:]}")


def check_imports() -> None:
    import evomerge  # noqa: F401
    import grpc  # noqa: F401  (ray[client]: `ray start --head` opens the Ray Client server)
    import matplotlib  # noqa: F401  (the plot extra: `evomerge plot` draws PNGs with it)
    import plotly  # noqa: F401  (the plot extra: and its HTML pages with plotly)
    import ray  # noqa: F401


def check_cli() -> None:
    exe = shutil.which("evomerge")
    if exe is None:
        raise SystemExit("check_install: no `evomerge` command on PATH after the install")
    _run([exe, "--help"])
    for sub in SUBCOMMANDS:
        _run([exe, sub, "--help"])


def check_ray_head() -> None:
    ray = shutil.which("ray")
    if ray is None:
        raise SystemExit("check_install: no `ray` command on PATH after the install")
    ports = ["--port", "--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port",
             "--ray-client-server-port"]
    with tempfile.TemporaryDirectory(prefix="check-ray-") as tmp:
        log = Path(tmp) / "ray.log"
        command = [ray, "start", "--head", "--block", "--disable-usage-stats", "--include-dashboard=false",
                   "--node-ip-address=127.0.0.1", "--num-cpus=1", f"--object-store-memory={80 * 2**20}",
                   *(f"{p}={n}" for p, n in zip(ports, _free_ports(len(ports)), strict=True))]
        with open(log, "w") as out:
            node = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while "Ray runtime started" not in log.read_text():
                if node.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"check_install: `ray start --head` did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        finally:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGTERM)
                try:
                    node.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(node.pid, signal.SIGKILL)
                    node.wait()
    if node.returncode is None:
        raise SystemExit("check_install: the Ray head node did not stop")


def main() -> None:
    check_imports()
    check_cli()
    check_ray_head()
    print(f"check_install: ok ({sys.prefix})")


if __name__ == "__main__":
    main()
