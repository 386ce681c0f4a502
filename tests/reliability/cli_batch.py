"""Run many ``evomerge`` command lines in one fresh Python process, as the shell would run each.

Each case goes through the real entry point (``evomerge.cli.main``: click parsing, the error
handler, ``sys.exit``) with its own working folder and captured stdout/stderr; an exception that
escapes is recorded as the traceback Python would print. Only the imports are shared, which turns
minutes of start-up (torch, transformers, lm-eval per process) into seconds for a large corpus.
``test_bad_inputs`` checks that a few cases give the same output here as in their own process.

Usage: python -m tests.reliability.cli_batch CASES.json RESULTS.json, where CASES.json is a list
of {"id", "args", "cwd"} and RESULTS.json gets {id: {"returncode", "stdout", "stderr"}}; or, from a
test, :func:`run_batch`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace


def run_batch(cases: list[tuple[str, list[str], Path]], folder: Path, env: dict[str, str]) -> dict[str, SimpleNamespace]:
    """Run ``(id, args, cwd)`` cases in one fresh process (files in ``folder``); returns, by id,
    what each printed and its exit status (``returncode``, ``stdout``, ``stderr``)."""
    (folder / "cases.json").write_text(json.dumps([{"id": i, "args": a, "cwd": str(c)} for i, a, c in cases]))
    done = subprocess.run([sys.executable, "-m", "tests.reliability.cli_batch", str(folder / "cases.json"),
                           str(folder / "results.json")], check=False, cwd=Path(__file__).resolve().parents[2], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((folder / "results.json").read_text())
    return {i: SimpleNamespace(**results[i]) for i, _, _ in cases}


def run_one(args: list[str], cwd: str) -> dict[str, object]:
    from evomerge.cli import main

    out, err = io.StringIO(), io.StringIO()
    code: object = 0
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main.main(args, prog_name="evomerge", standalone_mode=True)
            except SystemExit as exit_:
                code = exit_.code
            except BaseException:  # noqa: BLE001  (what Python prints for an uncaught exception, then exit 1)
                traceback.print_exc(file=sys.stderr)
                code = 1
    finally:
        os.chdir(old)
    return {"returncode": 0 if code is None else code if isinstance(code, int) else 1,
            "stdout": out.getvalue(), "stderr": err.getvalue()}


def main() -> None:
    cases_file, results_file = sys.argv[1:3]
    with open(cases_file, encoding="utf-8") as f:
        cases = json.load(f)
    results = {c["id"]: run_one(c["args"], c["cwd"]) for c in cases}
    with open(results_file, "w", encoding="utf-8") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
