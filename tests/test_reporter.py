"""What a person sees while a search runs (evomerge.reporter): the live line fitted to a
terminal's width by dropping whole fields in the stated order, the best trial shown as one trial,
and plain log lines with no terminal codes. The end-to-end runs (a real search, redirected and in
a terminal) are in tests/search/test_progress_e2e.py."""

from __future__ import annotations

import io
import re

import pytest

from evomerge.export import scalar_score
from evomerge.loop import Progress
from evomerge.reporter import (
    DROP_ORDER,
    SEPARATOR,
    LogReporter,
    TerminalReporter,
    clock,
    fit_line,
    live_fields,
    per_minute,
    score,
    short_labels,
    trial_line,
)
from evomerge.store.trial_log import TrialRecord

DIRECTIONS = {"task:toy_arith/acc": "maximize", "task:toy_reverse/acc": "maximize", "l2_from_base": "minimize"}
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def record(number: int, arith: float, reverse: float, l2: float, state: str = "complete") -> TrialRecord:
    objectives = {"task:toy_arith/acc": arith, "task:toy_reverse/acc": reverse, "l2_from_base": l2}
    return TrialRecord(number=number, state=state, params={}, objectives=objectives if state == "complete" else None,
                       recipe_json=None, error=None if state == "complete" else "merge produced NaN weights",
                       timings={"wall_s": 1.25}, constraints={}, attrs={"cost": {"forward_passes": 128}})


def progress_after(records: list[TrialRecord]) -> Progress:
    p = Progress(budget=1000, finished_before=400, directions=DIRECTIONS, started_at=0.0, front_size=17,
                 forward_passes=123_456_789)
    p.finished = len(records)
    p.failed = sum(r.state != "complete" for r in records)
    p.note_best(records)
    return p


RECORDS = [record(3, 0.984375, 0.125, 4.25), record(17, 0.5, 0.96875, 3.5), record(29, 0.875, 0.9375, 3.75),
           record(30, 0, 0, 0, state="failed")]


def test_the_best_is_one_trial_with_all_its_scores_together():
    """Not each objective's best from different trials (arith 0.984 from #3, reverse 0.969 from #17),
    which reads as one model doing both: the one trial `export --best` picks, with its own scores."""
    p = progress_after(RECORDS)
    expected = max(RECORDS[:3], key=lambda r: scalar_score(r, DIRECTIONS))
    assert p.best is expected
    best = live_fields(p, 0.0, short_labels(list(DIRECTIONS)))["best"]
    named, short = best
    assert named == f"best #{expected.number} toy_arith=0.875 toy_reverse=0.938 l2=3.75"
    assert short == f"best #{expected.number} 0.875/0.938/3.75"


def test_short_labels_keep_the_metric_only_where_a_task_has_several():
    assert short_labels(["task:a/acc", "task:b/acc", "l2_from_base"]) == {"task:a/acc": "a", "task:b/acc": "b",
                                                                          "l2_from_base": "l2"}
    assert short_labels(["task:a/acc", "task:a/f1"]) == {"task:a/acc": "a/acc", "task:a/f1": "a/f1"}


def _fields() -> dict:
    return live_fields(progress_after(RECORDS), 3723.0, short_labels(list(DIRECTIONS)))


def _pieces(line: str) -> list[str]:
    elapsed, _, rest = line.partition(" ")
    return [elapsed, *filter(None, rest.split(SEPARATOR))]


@pytest.mark.parametrize("width", [40, 60, 80, 120])
def test_the_live_line_fits_and_every_field_it_shows_is_whole(width):
    fields = _fields()
    line = fit_line(fields, width)
    assert 0 < len(line) <= width
    forms = {f for v in fields.values() for f in ((v,) if isinstance(v, str) else v) if f}
    for piece in _pieces(line):
        assert piece in forms, f"{piece!r} is not a whole field of {fields}"
    assert _pieces(line)[0] == "1:02:03"  # the elapsed time is never dropped


def test_fields_are_dropped_in_the_stated_order_as_the_terminal_narrows():
    """Narrowing the terminal one column at a time shows exactly these lines, in this order: the
    rate goes first, then the ETA, the forward passes, the best trial's names (its scores stay),
    the front, the best trial, the failed count, the trial count; the elapsed time stays."""
    f = _fields()
    best_named, best_short = f["best"]
    expected = [
        [f["elapsed"], f["trials"], f["failed"], best_named, f["front"], f["passes"], f["eta"], f["rate"]],
        [f["elapsed"], f["trials"], f["failed"], best_named, f["front"], f["passes"], f["eta"]],
        [f["elapsed"], f["trials"], f["failed"], best_named, f["front"], f["passes"]],
        [f["elapsed"], f["trials"], f["failed"], best_named, f["front"]],
        [f["elapsed"], f["trials"], f["failed"], best_short, f["front"]],
        [f["elapsed"], f["trials"], f["failed"], best_short],
        [f["elapsed"], f["trials"], f["failed"]],
        [f["elapsed"], f["trials"]],
        [f["elapsed"]],
    ]
    assert DROP_ORDER[:8] == ("rate", "eta", "passes", "best", "front", "best", "failed", "trials")
    seen: list[list[str]] = []
    for width in range(200, 0, -1):
        line = fit_line(f, width)
        assert len(line) <= width
        pieces = _pieces(line) if line else []
        if pieces and (not seen or seen[-1] != pieces):
            seen.append(pieces)
    assert seen == expected
    assert fit_line(f, len(f["elapsed"]) - 1) == ""  # not even the elapsed time fits: nothing, not a cut number


def test_the_log_reporter_writes_one_plain_line_per_event():
    out = io.StringIO()
    report = LogReporter(out, started=0.0)
    report.begin("opening the models")
    report.done("models opened: base 2.7 MB")
    report.line("memory plan (CPU workers):\n  inputs: memory-mapped")
    p = progress_after([])
    for r in RECORDS:
        p.finished += 1
        p.failed += r.state != "complete"
        p.note_best([r])
        report.trial(p, r)
    report.close()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 3 + len(RECORDS)
    assert re.fullmatch(r"\d+:\d\d:\d\d models opened: base 2\.7 MB \(\d+\.\d s\)", lines[0])
    trial_lines = lines[3:]
    for r, line in zip(RECORDS, trial_lines):
        assert f" trial {r.number} {r.state}" in line
    assert "toy_arith/acc=0.9844 toy_reverse/acc=0.125 l2_from_base=4.25" in trial_lines[0]
    assert "merge produced NaN weights" in trial_lines[3]
    best_so_far, flags = None, []
    for r in RECORDS:  # a trial is marked when it beats every earlier one on export --best's score
        better = r.state == "complete" and (best_so_far is None or scalar_score(r, DIRECTIONS) > best_so_far)
        best_so_far = scalar_score(r, DIRECTIONS) if better else best_so_far
        flags.append(better)
    assert [line.endswith("best so far)") for line in trial_lines] == flags


def test_the_terminal_reporter_redraws_within_the_width_and_leaves_the_last_line(monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    out = io.StringIO()
    report = TerminalReporter(out, started=0.0, tick_s=3600)
    try:
        report.begin("opening the models")
        report.done("models opened: base 2.7 MB, arith 2.7 MB, reverse 2.7 MB; 14 coordinates to search")
        p = progress_after([])
        for r in RECORDS:
            p.finished += 1
            p.note_best([r])
            report.trial(p, r)
    finally:
        report.close()
    text = out.getvalue()
    rows = [ESCAPES.sub("", row) for row in re.split(r"[\r\n]", text)]
    assert all(len(row) <= 39 for row in rows), [row for row in rows if len(row) > 39]
    last = text.rstrip("\n").rsplit("\n", 1)[-1].rsplit("\r", 1)[-1]
    assert ESCAPES.sub("", last).split(" ", 1)[1].startswith(f"{400 + len(RECORDS)}/1000 trials")


def test_a_failed_trial_line_gives_its_reason():
    p = progress_after(RECORDS)
    line = trial_line(p, RECORDS[3], new_best=False)
    assert line.startswith("trial 30 failed: merge produced NaN weights (1.2 s, 404/1000 trials")


def test_numbers_on_the_live_line_are_short_and_never_in_exponent_form():
    assert [clock(s) for s in (7, 723, 3723)] == ["0:07", "12:03", "1:02:03"]
    assert [score(v) for v in (0.984375, 1.0, 0.0, 1503.2, 4.369)] == ["0.984", "1", "0", "1503", "4.37"]
    assert [per_minute(r) for r in (0.6, 2.4, 1 / 240)] == ["36/min", "144/min", "0.25/min"]


@pytest.mark.parametrize("width", [40, 60, 80])
def test_show_tables_fold_their_headers_and_never_cut_a_number(width):
    from rich.console import Console

    from evomerge.report import trials_table

    complete = [r for r in RECORDS if r.state == "complete"]
    out = io.StringIO()
    Console(file=out, width=width).print(trials_table("front", complete, DIRECTIONS), crop=False)
    cells = [cell.strip() for row in out.getvalue().splitlines() if row.startswith("│") for cell in row.split("│")[1:-1]]
    for r in complete:
        for value in r.objectives.values():
            assert f"{value:.4g}" in cells
    if width >= 80:
        assert max(len(row) for row in out.getvalue().splitlines()) <= width
