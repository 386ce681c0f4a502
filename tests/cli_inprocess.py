"""``evomerge ARGS`` through the real entry point, in the test's own process.

A CLI subprocess spends 3-4 CPU-seconds importing torch, transformers, datasets and lm-eval
before it does anything; on the suite's two cores a test that runs the command line ten times
pays more for that than for its search. Where the process boundary itself is not what a test is
about (a kill -9, a signal, a process holding a lease, a fresh interpreter's stderr), the test
runs the command here: ``evomerge.cli.main`` with click's parsing, the error handler and
``sys.exit``, in the given working folder, with stdout and stderr captured, exactly as the shell
would run it except that the imports are already done.

What a command changes in the process for its own run is put back afterwards, so the next test
sees the process as it was: the working folder, the environment (``quiet_libraries`` sets
switches in it), the loggers it quiets and the SIGINT/SIGTERM handlers a search installs (the
next search's ``interrupts.install`` resets their state).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path


def run_cli(*args: str, cwd: Path | str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``evomerge ARGS`` in this process from ``cwd``, with ``env`` added to the environment
    for its duration; returns what a subprocess run would (``returncode``, ``stdout``, ``stderr``).
    An exception that escapes the command is reported as Python reports an uncaught one: its
    traceback on stderr and exit status 1."""
    from evomerge import interrupts
    from evomerge.cli import main
    from evomerge.quiet import LOGGERS

    out, err = io.StringIO(), io.StringIO()
    code: object = 0
    saved_env = dict(os.environ)
    saved_cwd = os.getcwd()
    saved_handlers = {signum: signal.getsignal(signum) for signum in interrupts.SIGNALS}
    saved_levels = {name: logging.getLogger(name).level for name in LOGGERS}
    os.environ.update(env or {})
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main.main(list(args), prog_name="evomerge", standalone_mode=True)
            except SystemExit as exit_:
                code = exit_.code
            except BaseException:  # noqa: BLE001  (what Python prints for an uncaught exception, then exit 1)
                traceback.print_exc(file=sys.stderr)
                code = 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for signum, handler in saved_handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
    returncode = 0 if code is None else code if isinstance(code, int) else 1
    return subprocess.CompletedProcess(["evomerge", *args], returncode, out.getvalue(), err.getvalue())
