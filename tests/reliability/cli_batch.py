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

import json
import subprocess
import sys
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
    from tests.cli_inprocess import run_cli

    done = run_cli(*args, cwd=cwd)
    return {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


def main() -> None:
    cases_file, results_file = sys.argv[1:3]
    with open(cases_file, encoding="utf-8") as f:
        cases = json.load(f)
    results = {c["id"]: run_one(c["args"], c["cwd"]) for c in cases}
    with open(results_file, "w", encoding="utf-8") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
