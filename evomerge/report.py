"""``evomerge show``: a run's counts, Pareto front, best trials and failures, as tables.

The progress of a running search is :mod:`evomerge.reporter`'s."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .export import scalar_score
from .hand_set import HAND_SET_ATTR
from .rungs import BEATEN_ATTR, RUNG_ATTR, RUNG_OF_ATTR, STOPPED_ATTR, full_fidelity


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def tables_console() -> Console:
    """Where ``show`` prints: stdout, as wide as the terminal, or :data:`~evomerge.reporter.PLAIN_WIDTH`
    columns (``COLUMNS`` when set) when stdout is a file or a pipe, whatever terminal the command
    was started from (rich would take the width of a terminal on stdin or stderr, and a log read
    in another window would show tables cut mid-border)."""
    from .reporter import output_width

    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else output_width(sys.stdout))


def counts_sentence(counts: Any) -> str:
    """The trial counts in plain words, leaving out the kinds there are none of."""
    parts = [f"{counts.complete} trial{'s' if counts.complete != 1 else ''} complete"]
    if counts.failed:
        parts.append(f"{counts.failed} failed (reasons below)")
    if counts.running:
        parts.append(f"{counts.running} running now")
    if counts.waiting:
        parts.append(f"{counts.waiting} waiting")
    if counts.interrupted:
        parts.append(f"{counts.interrupted} stopped by an interruption and run again as new trials")
    return ", ".join(parts)


def trials_table(title: str, records: Sequence[Any], directions: Mapping[str, str]) -> Table:
    """One row per trial. A column is never narrower than its widest number, so a narrow terminal
    folds the headers, never a number."""
    labelled = any(HAND_SET_ATTR in r.attrs for r in records)  # a "recipe" column only where it says something
    rungs = any(RUNG_OF_ATTR in r.attrs for r in records)  # multi-fidelity: the rung each trial reached
    rows = []
    for r in records:
        row = [str(r.number)] + [_fmt((r.objectives or {}).get(n)) for n in directions]
        if rungs:
            row.append(_rung(r))
        row += [str(r.forward_passes) if r.cost else "-", _fmt(r.timings.get("merge_s")), _fmt(r.timings.get("eval_s"))]
        if labelled:
            row.append(str(r.attrs.get(HAND_SET_ATTR, "searched")))
        rows.append(row)
    headers = ["trial", *(f"{name.removeprefix('task:')} {'↑' if direction == 'maximize' else '↓'}"
                          for name, direction in directions.items()), *(["rung"] if rungs else []),
               "fwd passes", "merge s", "eval s"]
    if labelled:
        headers.append("recipe")
    table = Table(title=title)
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if header == "recipe" else "right", overflow="fold",
                         min_width=max((len(row[i]) for row in rows), default=1))
    for row in rows:
        table.add_row(*row)
    return table


def rungs_sentence(records: Sequence[Any]) -> str:
    """How far a multi-fidelity run's complete trials climbed: "rungs: 9 trials scored on every
    item (rung 3 of 3); stopped lower: 20 at rung 1, 6 at rung 2 (4 clearly below a front trial)"
    ('' for a run without rungs)."""
    complete = [r for r in records if r.state == "complete" and RUNG_OF_ATTR in r.attrs]
    if not complete:
        return ""
    of = complete[0].attrs[RUNG_OF_ATTR]
    stopped: dict[int, int] = {}
    for r in complete:
        if STOPPED_ATTR in r.attrs:
            stopped[r.attrs[STOPPED_ATTR] + 1] = stopped.get(r.attrs[STOPPED_ATTR] + 1, 0) + 1
    whole = len(complete) - sum(stopped.values())
    listed = ", ".join(f"{n} at rung {k}" for k, n in sorted(stopped.items())) or "none"
    beaten = sum(1 for r in complete if BEATEN_ATTR in r.attrs)
    below = f" ({beaten} clearly below a front trial)" if beaten else ""
    return f"rungs: {whole} trials scored on every item (rung {of} of {of}); stopped lower: {listed}{below}"


def _rung(record: Any) -> str:
    """"2 of 3" for a trial scored on every item, "1 of 3 (stopped)" for one stopped lower, "2 of 3
    (stopped: below #12)" for one stopped because front trial 12 clearly beat it on its rung's items."""
    of = record.attrs.get(RUNG_OF_ATTR)
    if of is None:
        return "-"
    if STOPPED_ATTR in record.attrs:
        why = f": below #{record.attrs[BEATEN_ATTR]}" if BEATEN_ATTR in record.attrs else ""
        return f"{record.attrs[STOPPED_ATTR] + 1} of {of} (stopped{why})"
    return f"{record.attrs.get(RUNG_ATTR, 0) + 1} of {of}"


def show(store: Any, *, top: int = 5, console: Console | None = None) -> None:
    """Print the run's counts, its Pareto front, its best trials, and every failure with its reason."""
    console = console or tables_console()
    records = store.trials()
    counts = store.counts()
    console.print(f"[bold]{store.path}[/]: {counts_sentence(counts)}")
    spent = store.spent()
    if spent.scored_trials:
        tokens = f" and {spent.generated_tokens} generated tokens" if spent.generated_tokens else ""
        console.print(f"scoring cost {spent.forward_passes} forward passes{tokens} over {spent.scored_trials} scored trials "
                      f"({spent.forward_passes / spent.scored_trials:.0f} a trial)")
    rung_line = rungs_sentence(records)
    if rung_line:
        console.print(rung_line)
    directions = store.directions
    front = sorted(store.pareto(records), key=lambda r: r.number)
    stopped = sum(1 for r in records if r.state == "complete" and not full_fidelity(r))
    of_whole = f" of the trials scored on every item ({stopped} stopped at a lower rung are left out)" if stopped else ""
    # crop=False: a table wider than a tiny terminal wraps there, never cropped mid-number
    console.print(trials_table(f"Pareto front ({len(front)} trials){of_whole}", front, directions), crop=False)
    complete = [r for r in records if r.state == "complete" and full_fidelity(r)]
    best = sorted(complete, key=lambda r: scalar_score(r, directions), reverse=True)[:top]
    title = f"Best {len(best)} by the sum of objectives (maximize +, minimize -){of_whole}"
    console.print(trials_table(title, best, directions), crop=False)
    hand_set = [r for r in records if HAND_SET_ATTR in r.attrs and r.finished]
    if hand_set:
        console.print(trials_table(f"Hand-set trials ({len(hand_set)}): the merges a person would try first",
                                   hand_set, directions), crop=False)
    failed = [r for r in records if r.state == "failed" and not r.interrupted]
    if failed:
        table = Table(title=f"Failed trials ({len(failed)})")
        table.add_column("trial", justify="right")
        table.add_column("reason")
        for r in failed:
            # Text, not a str: reasons quote exceptions ("[enforce fail at ...]"), which rich would
            # otherwise read as markup and drop
            table.add_row(str(r.number), Text(r.error or "?"))
        console.print(table)
