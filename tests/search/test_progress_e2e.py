"""What a person sees of a real search, through the command line: redirected to a file (a line per
start-up stage and per trial, no terminal codes, no third-party progress bars, tables that fit 80
columns) and in an 80-column terminal (a live line that never wraps, whose best trial is one
real trial with its own scores). The searches run on the in-process pool with the toy world."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import yaml

from evomerge.export import scalar_score
from tests.reliability.helpers import read_run
from tests.reliability.helpers import space as toy_space

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BUDGET = 6
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
#: What third-party libraries print when left alone: transformers' and tqdm's bars, datasets'
#: split generation, lm-eval's and Ray's log lines.
CHATTER = re.compile(r"Writing model shards|Generating \w+ split|it/s\]|%\|| INFO |WARNING|lm_eval|Started a local Ray")
STAGES = ("space file checked: ", "models opened: base ", "tasks loaded: toy_arith ", "run folder ",
          "in-process pool: ", "worker 1 of 2 ready", "worker 2 of 2 ready")


def _space(toy_world, tmp_path: Path) -> Path:
    data = toy_space(toy_world, budget=BUDGET, items=8)
    data["name"] = "progress"
    data["workers"] = {"count": 2, "cpus_per_worker": 1, "pool": "inprocess"}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["HF_DATASETS_CACHE"] = str(tmp_path / "datasets")  # a first run: datasets generates its splits
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_a_redirected_search_logs_each_stage_and_each_trial_in_plain_lines(toy_world, tmp_path):
    space = _space(toy_world, tmp_path)
    log = tmp_path / "log"
    with log.open("w") as out:  # `evomerge search space.yaml > log 2>&1`
        done = subprocess.run([sys.executable, "-m", "evomerge.cli", "search", str(space), "--runs-dir", "runs"],
                              stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=_env(tmp_path), timeout=900, check=False)
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    assert "\r" not in text and "\x1b" not in text, "terminal codes in a log"
    assert not CHATTER.search(text), CHATTER.search(text)
    lines = text.splitlines()

    # one line per start-up stage, in order, each after the time since the command started
    at = [next(i for i, line in enumerate(lines) if re.match(r"\d+:\d\d " + re.escape(stage), line)) for stage in STAGES]
    assert at == sorted(at)

    # one line per trial, whose scores are those of the trial log
    records, _ = read_run(tmp_path / "runs" / "progress")
    by_number = {r.number: r for r in records}
    trial_lines = [m for line in lines if (m := re.match(r"\d+:\d\d trial (\d+) (complete|failed): (.*)", line))]
    assert sorted(int(m[1]) for m in trial_lines) == sorted(by_number) and len(trial_lines) == BUDGET
    for m in trial_lines:
        r = by_number[int(m[1])]
        assert m[2] == r.state
        if r.state == "complete":
            shown = dict(pair.split("=") for pair in m[3].split(" (")[0].split())
            assert shown == {k.removeprefix("task:"): f"{v:.4g}" for k, v in r.objectives.items()}
    # the last trial marked "best so far" is the best trial of the run (as export --best picks it)
    marked = [int(m[1]) for m in trial_lines if m[3].endswith("best so far)")]
    complete = [r for r in records if r.state == "complete"]
    assert marked[-1] == max(complete, key=lambda r: scalar_score(r, {k: v for k, v in _directions(space).items()})).number

    # the tables fit 80 columns though the width is unknown
    table_rows = [line for line in lines if line[:1] in "┏┃┡│└"]
    assert table_rows and max(len(row) for row in table_rows) <= 80

    # `evomerge resume` says the same way that there is nothing left to do
    with log.open("w") as out:
        again = subprocess.run([sys.executable, "-m", "evomerge.cli", "resume", "runs/progress"], stdout=out,
                               stderr=subprocess.STDOUT, cwd=tmp_path, env=_env(tmp_path), timeout=900, check=False)
    text = log.read_text()
    assert again.returncode == 0, text[-3000:]
    assert "\r" not in text and "\x1b" not in text and not CHATTER.search(text)
    assert re.search(rf"^\d+:\d\d run folder \S+: {BUDGET} of {BUDGET} trials done before", text, flags=re.MULTILINE), text


def _directions(space: Path) -> dict[str, str]:
    from evomerge.space_config import load_space_config

    return {o.key: o.direction for o in load_space_config(space).objectives}


def _run_in_terminal(args: list[str], *, cwd: Path, env: dict[str, str], columns: int) -> tuple[int, str]:
    """Run a command with a pseudo-terminal of ``columns`` columns as stdin, stdout and stderr."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env={**env, "TERM": "xterm"},
                            close_fds=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the other end closed: the command ended
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", errors="replace")


def test_in_an_80_column_terminal_the_live_line_fits_and_shows_one_real_best_trial(toy_world, tmp_path):
    space = _space(toy_world, tmp_path)
    code, screen = _run_in_terminal([sys.executable, "-m", "evomerge.cli", "search", str(space), "--runs-dir", "runs"],
                                    cwd=tmp_path, env=_env(tmp_path), columns=80)
    assert code == 0, screen[-3000:]
    assert not CHATTER.search(screen), CHATTER.search(screen)
    assert "\x1b[?25l" not in screen  # the cursor is never hidden
    # every redraw of the live line, and every line above it, fits: nothing wraps
    rows = [ESCAPES.sub("", row) for row in re.split(r"\r\n|\r|\n", screen)]
    progress_rows = [row for row in rows if re.match(r"\d+:\d\d ", row)]
    assert progress_rows and max(len(row) for row in progress_rows) <= 79, max(progress_rows, key=len)
    # the clock counts from the command's start: it is drawn before the first stage is done
    first_stage = next(i for i, row in enumerate(rows) if "space file checked" in row)
    assert any(re.match(r"\d+:\d\d loading libraries \.\.\.", row) for row in rows[:first_stage])

    # the live line left on screen at the end shows the best trial as ONE trial of the log
    final = next(row for row in reversed(progress_rows) if f"{BUDGET}/{BUDGET} trials" in row)
    best = re.search(r"best #(\d+) (\S+)", final)
    assert best, final
    records, _ = read_run(tmp_path / "runs" / "progress")
    directions = _directions(space)
    chosen = max((r for r in records if r.state == "complete"), key=lambda r: scalar_score(r, directions))
    assert int(best[1]) == chosen.number
    shown = re.findall(r"=(\S+)", final[best.start():].split("  ")[0]) or best[2].split("/")
    assert shown == [f"{chosen.objectives[k]:.3g}" for k in directions]
