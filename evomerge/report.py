"""What a person sees: the live progress line during a search, and ``evomerge show``."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .export import scalar_score


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


class LiveDisplay:
    """A progress bar with trials done of budget, best value per objective, throughput and ETA."""

    def __init__(self, console: Console | None = None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        # bound to the stream now: the in-process pool silences sys.stderr while it evaluates
        self.console = console or Console(file=sys.stderr)
        self.progress = Progress(
            TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[eta]}"), TextColumn("{task.fields[best]}"),
            console=self.console, transient=False,
        )
        self.task: Any = None

    def __enter__(self) -> LiveDisplay:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def notice(self, message: str) -> None:
        """A line above the progress bar: workers started or lost, a fault, why the search stopped."""
        self.console.print(Text(message, style="yellow"))

    def __call__(self, state: Any, record: Any) -> None:
        done = state.finished_before + state.finished
        if self.task is None:
            self.task = self.progress.add_task("search", total=state.budget, rate="", eta="", best="")
        eta = state.eta_s()
        best = "  ".join(f"{k.removeprefix('task:')}={v:.3g}" for k, v in state.best.items())
        failed = f"  failed={state.failed}" if state.failed else ""
        passes = f"  fwd={_count(state.forward_passes)}" if state.forward_passes else ""
        self.progress.update(
            self.task, completed=done,
            rate=f"{state.rate() * 60:.1f}/min", eta=f"ETA {eta:.0f}s" if eta is not None else "ETA -",
            best=best + failed + passes,
        )


def _count(n: int) -> str:
    """12345 -> '12.3k': a count that stays short on a live line."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= limit:
            return f"{n / limit:.3g}{suffix}"
    return str(n)


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
    table = Table(title=title)
    table.add_column("trial", justify="right")
    for name, direction in directions.items():
        table.add_column(f"{name.removeprefix('task:')} {'↑' if direction == 'maximize' else '↓'}", justify="right")
    table.add_column("fwd passes", justify="right")
    table.add_column("merge s", justify="right")
    table.add_column("eval s", justify="right")
    for r in records:
        row = [str(r.number)] + [_fmt((r.objectives or {}).get(n)) for n in directions]
        row += [str(r.forward_passes) if r.cost else "-", _fmt(r.timings.get("merge_s")), _fmt(r.timings.get("eval_s"))]
        table.add_row(*row)
    return table


def show(store: Any, *, top: int = 5, console: Console | None = None) -> None:
    """Print the run's counts, its Pareto front, its best trials, and every failure with its reason."""
    console = console or Console()
    records = store.trials()
    counts = store.counts()
    console.print(f"[bold]{store.path}[/]: {counts_sentence(counts)}")
    spent = store.spent()
    if spent.scored_trials:
        tokens = f" and {spent.generated_tokens} generated tokens" if spent.generated_tokens else ""
        console.print(f"scoring cost {spent.forward_passes} forward passes{tokens} over {spent.scored_trials} scored trials "
                      f"({spent.forward_passes / spent.scored_trials:.0f} a trial)")
    directions = store.directions
    front = sorted(store.pareto(records), key=lambda r: r.number)
    console.print(trials_table(f"Pareto front ({len(front)} trials)", front, directions))
    complete = [r for r in records if r.state == "complete"]
    best = sorted(complete, key=lambda r: scalar_score(r, directions), reverse=True)[:top]
    console.print(trials_table(f"Best {len(best)} by the sum of objectives (maximize +, minimize -)", best, directions))
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
