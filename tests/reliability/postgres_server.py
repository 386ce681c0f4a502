"""A real PostgreSQL server for the tests: ``initdb`` into a temp folder, ``pg_ctl start`` on a free
loopback port, stopped at the end of the session.

The server comes from Debian's ``postgresql`` package (``scripts/install.sh`` installs it).
PostgreSQL refuses to run as root, so as root the folder is handed to the ``postgres`` user the
package creates and the server runs as that user (``runuser``). Authentication is ``trust`` on
127.0.0.1 only: the server lives as long as the test session and listens on no other address.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.ports import free_port

USER = "evomerge"  # the server's superuser (initdb -U)
DATABASE = "evo"


def bin_dir() -> Path | None:
    """The newest installed PostgreSQL's binaries (Debian keeps them out of PATH), or None."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    if versions:
        return versions[-1].parent
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None



def _as_server_user(args: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return args
    return ["runuser", "-u", "postgres", "--", *args]


@contextmanager
def running_server() -> Iterator[str]:
    """Start a server; yield the SQLAlchemy URL of an empty database on it; stop it afterwards."""
    bindir = bin_dir()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL is not installed; run scripts/install.sh (as root) or apt-get install postgresql")
    folder = Path(tempfile.mkdtemp(prefix="evomerge-pg-"))
    data, port = folder / "data", free_port()
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
    run = lambda *a: subprocess.run(_as_server_user([str(bindir / a[0]), *a[1:]]), check=True,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    try:
        run("initdb", "-D", str(data), "-U", USER, "-A", "trust", "--no-sync", "-E", "UTF8")
        run("pg_ctl", "-D", str(data), "-l", str(folder / "server.log"), "-w", "-t", "60", "start", "-o",
            f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200")
        try:
            run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", USER, DATABASE)
            yield f"postgresql://{USER}@127.0.0.1:{port}/{DATABASE}"
        finally:
            subprocess.run(_as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                           check=False, capture_output=True, timeout=60)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
