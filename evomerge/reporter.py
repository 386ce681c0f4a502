"""What a person sees while a search starts and runs: its start-up stages, notices, each trial.

The search reports events, never text positions: a start-up stage begins or is done (the space
file checked, the models opened with their sizes, Ray started or the in-process pool, each worker
ready), a line of information (the memory plan), a notice (a worker lost, a retry), a trial
finished. :class:`Reporter` is what it calls; there are two, chosen by where stdout goes
(:func:`make_reporter`):

- :class:`TerminalReporter` (stdout is a terminal): each stage, notice and line as it happens,
  and below them one live line redrawn in place (``\\r``, then erase to the end of the line) once
  a second, never wider than the terminal. While a stage runs the live line says which one; once
  trials finish it shows the run. The cursor stays visible.
- :class:`LogReporter` (a file, a pipe, CI): one plain line per stage, notice and finished trial
  (its number, state, scores), and nothing else: no carriage return, no escape code.

Every line starts with the time since the command started (``m:ss``; ``h:mm:ss`` past an hour).
Everything goes to stdout; stderr keeps the error that ends a command (one line, the first thing
there) and warnings.

The live line's fields, left to right: elapsed time, trials done of the budget, failed trials,
the best trial (ONE trial: its number and all its scores, the one ``evomerge export --best``
would pick), the size of the Pareto front, the forward passes spent, the ETA, the trial rate.
When the terminal is too narrow, whole fields are dropped in :data:`DROP_ORDER` (the rate first,
the trial count last; the elapsed time never); a number is never cut.
"""

from __future__ import annotations

import os
import re
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, Protocol

from .hand_set import HAND_SET_ATTR

#: The live line's fields, left to right.
FIELDS = ("elapsed", "stage", "trials", "failed", "best", "front", "passes", "eta", "rate")
#: What goes first when the line does not fit: each step drops the field named, or, for one
#: given in two forms (``best``: with its objectives' names, then its scores alone), moves it to
#: its shorter form. ``elapsed`` is never dropped.
DROP_ORDER = ("rate", "eta", "passes", "best", "front", "best", "failed", "trials", "stage")
SEPARATOR = "  "
TICK_S = 1.0  # how often a terminal's live line is redrawn (the clock moves while a trial runs)
PLAIN_WIDTH = 80  # the width of tables and lines where the output's width is unknown


class Reporter(Protocol):
    """What the search tells a person, whatever shows it."""

    def begin(self, doing: str) -> None:
        """A start-up stage begins ("opening the models"): a terminal shows it at once."""
        ...

    def done(self, what: str) -> None:
        """The stage begun last is done: one line saying what it found, and how long it took."""
        ...

    def line(self, text: str) -> None:
        """A line of information (the memory plan, a worker ready); may hold several lines."""
        ...

    def notice(self, message: str) -> None:
        """Something a person must know about: a worker lost or replaced, a retry, why it stopped."""
        ...

    def trial(self, progress: Any, record: Any) -> None:
        """A trial finished (``record``: its :class:`~evomerge.store.TrialRecord`); ``progress``:
        the run's :class:`~evomerge.loop.Progress` after it."""
        ...

    def close(self) -> None:
        """The command is done with progress (it ends, or prints its tables next)."""
        ...


# ---- formatting: pure functions, the same for both reporters ---------------------------------


def clock(seconds: float) -> str:
    """Elapsed time as a clock: ``0:07``, ``12:03``, ``1:02:03``."""
    s = max(0, int(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def duration(seconds: float) -> str:
    """How long a stage took: ``0.4 s``, ``12 s``, ``3 min 5 s``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{int(seconds) // 60} min {int(seconds) % 60} s"


def count(n: float) -> str:
    """12345 -> '12.3k': a count that stays short on a live line."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= limit:
            return f"{n / limit:.3g}{suffix}"
    return f"{n:g}"


def score(value: float) -> str:
    """Three significant digits, without an exponent below a million (an L2 distance of 1503)."""
    return f"{value:.0f}" if 1e3 <= abs(value) < 1e6 else f"{value:.3g}"


def per_minute(rate_per_s: float) -> str:
    """Trials a minute: ``36/min``, ``0.25/min``, ``140/min``."""
    n = rate_per_s * 60
    return f"{n:.0f}/min" if n >= 10 else f"{n:.2g}/min"


def short_labels(names: list[str]) -> dict[str, str]:
    """Objective names as the live line shows them: the task alone (``toy_arith``) where the run
    scores one metric of it, ``task/metric`` where it scores several, ``l2`` for ``l2_from_base``."""
    from .evaluate import objective_task

    tasks = [objective_task(n) for n in names]
    labels = {}
    for name, task in zip(names, tasks):
        if name == "l2_from_base":
            labels[name] = "l2"
        elif task is not None:
            labels[name] = task if tasks.count(task) == 1 else name.removeprefix("task:")
        else:
            labels[name] = name
    return labels


def best_text(record: Any, labels: Mapping[str, str]) -> tuple[str, str]:
    """The best trial as one trial: its number and every objective's score, together; in two
    forms, named (``best #12 arith=0.61 reverse=0.97``) and short (``best #12 0.61/0.97``, the
    objectives in the order of the tables' columns)."""
    values = [(labels[k], score(record.objectives[k])) for k in labels if k in (record.objectives or {})]
    named = " ".join(f"{label}={value}" for label, value in values)
    return f"best #{record.number} {named}".rstrip(), f"best #{record.number} {'/'.join(v for _, v in values)}".rstrip()


def live_fields(progress: Any, elapsed_s: float, labels: Mapping[str, str]) -> dict[str, str | tuple[str, ...]]:
    """The live line's fields for ``progress`` (empty where there is nothing to say yet); a
    field in several forms is a tuple, longest first."""
    done = progress.finished_before + progress.finished
    eta = progress.eta_s()
    rate = progress.rate()
    return {
        "elapsed": clock(elapsed_s),
        "trials": f"{done}/{progress.budget} trials",
        "failed": f"{progress.failed} failed" if progress.failed else "",
        "best": best_text(progress.best, labels) if progress.best is not None else "",
        "front": f"front {progress.front_size}" if progress.front_size else "",
        "passes": f"{count(progress.forward_passes)} passes" if progress.forward_passes else "",
        "eta": f"ETA {clock(eta)}" if eta is not None and done < progress.budget else "",
        "rate": per_minute(rate) if rate > 0 else "",
    }


def fit_line(fields: Mapping[str, str | tuple[str, ...]], width: int) -> str:
    """The fields in :data:`FIELDS` order (the elapsed time, then the others two spaces apart),
    dropping whole fields (or shortening them) in :data:`DROP_ORDER` until the line fits
    ``width`` columns; empty when not even the elapsed time fits."""
    forms = {name: [f for f in ((v,) if isinstance(v, str) else v) if f]
             for name in FIELDS if (v := fields.get(name))}
    forms = {name: f for name, f in forms.items() if f}

    def joined() -> str:
        rest = SEPARATOR.join(f[0] for k, f in forms.items() if k != "elapsed")
        return " ".join(part for part in (forms["elapsed"][0] if "elapsed" in forms else "", rest) if part)

    for name in DROP_ORDER:
        if len(joined()) <= width:
            break
        if name in forms:
            forms[name].pop(0)
            if not forms[name]:
                del forms[name]
    line = joined()
    return line if len(line) <= width else ""


def stamped(text: str, elapsed_s: float, width: int | None = None) -> str:
    """``text`` after the elapsed time, its further lines indented under the first; wrapped at
    spaces to ``width`` when given (a terminal), so that no number is split across two rows."""
    stamp = clock(elapsed_s) + " "
    pad = " " * len(stamp)
    out = []
    for i, line in enumerate(text.splitlines() or [""]):
        lead = stamp if i == 0 else pad
        if width is None or len(lead) + len(line) <= width:
            out.append(lead + line)
            continue
        indent = " " * (len(line) - len(line.lstrip()))
        glued = _NUMBER_AND_UNIT.sub("\\1\0\\2", line.strip())  # "2.7 MB" stays on one row
        out += [row.replace("\0", " ") for row in textwrap.wrap(
            glued, width=width, initial_indent=lead + indent, subsequent_indent=pad + indent + "  ",
            break_long_words=False, break_on_hyphens=False)]
    return "\n".join(out) + "\n"


_NUMBER_AND_UNIT = re.compile(r"(\d) (s|min|B|kB|MB|GB|TB)\b")


def trial_line(progress: Any, record: Any, *, new_best: bool) -> str:
    """A finished trial in one plain line: number, state, every score (or the reason), progress."""
    done = progress.finished_before + progress.finished
    label = (getattr(record, "attrs", None) or {}).get(HAND_SET_ATTR)
    name = f"trial {record.number} ({label})" if label else f"trial {record.number}"
    if record.state == "complete":
        scores = " ".join(f"{k.removeprefix('task:')}={v:.4g}" for k, v in (record.objectives or {}).items())
        what = f"{name} complete: {scores}"
    else:
        reason = (record.error or "no reason recorded").strip().splitlines()[0][:200]
        what = f"{name} {record.state}: {reason}"
    wall = (record.timings or {}).get("wall_s")
    took = f"{duration(wall)}, " if wall is not None else ""
    return f"{what} ({took}{done}/{progress.budget} trials{', best so far' if new_best else ''})"


def output_width(stream: IO[str]) -> int:
    """The terminal's width for a terminal; else ``COLUMNS`` when set, else :data:`PLAIN_WIDTH`."""
    try:
        if stream.isatty():
            return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        pass
    try:
        return max(20, int(os.environ["COLUMNS"]))
    except (KeyError, ValueError):
        return PLAIN_WIDTH


# ---- the reporters ---------------------------------------------------------------------------


class _Clock:
    """Elapsed time since the command started, and the stage begun last."""

    def __init__(self, started: float | None) -> None:
        self.started = time.monotonic() if started is None else started
        self.stage: str | None = None
        self.stage_started = 0.0
        self.best_number: int | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def begin(self, doing: str) -> None:
        self.stage, self.stage_started = doing, time.monotonic()

    def end(self) -> str:
        took = f" ({duration(time.monotonic() - self.stage_started)})" if self.stage is not None else ""
        self.stage = None
        return took

    def new_best(self, progress: Any) -> bool:
        number = progress.best.number if progress.best is not None else None
        changed = number is not None and number != self.best_number
        self.best_number = number
        return changed


class LogReporter:
    """One plain line per stage, notice and finished trial (see the module docstring)."""

    def __init__(self, stream: IO[str] | None = None, *, started: float | None = None) -> None:
        self.stream = stream or sys.stdout
        self.clock = _Clock(started)

    def _write(self, text: str) -> None:
        self.stream.write(stamped(text, self.clock.elapsed()))
        self.stream.flush()

    def begin(self, doing: str) -> None:
        self.clock.begin(doing)

    def done(self, what: str) -> None:
        self._write(what + self.clock.end())

    def line(self, text: str) -> None:
        self._write(text)

    def notice(self, message: str) -> None:
        self._write(message)

    def trial(self, progress: Any, record: Any) -> None:
        self._write(trial_line(progress, record, new_best=self.clock.new_best(progress)))

    def close(self) -> None:
        self.stream.flush()


class TerminalReporter:
    """Stage and notice lines, and one live line redrawn in place below them (module docstring).

    A background thread redraws the live line once a second, so the clock moves while a stage or
    a trial runs in the main thread. Writes from anywhere else to ``sys.stderr`` (a warning) go
    through :class:`_ClearingStream`, which erases the live line first, so they never land in
    the middle of it.
    """

    def __init__(self, stream: IO[str] | None = None, *, started: float | None = None, tick_s: float = TICK_S) -> None:
        self.stream = stream or sys.stdout
        self.clock = _Clock(started)
        self.lock = threading.RLock()
        self.progress: Any = None
        self.labels: dict[str, str] = {}
        self.drawn = False  # whether the live line is on the screen now
        self.first_trial_said = False
        self._stop = threading.Event()
        self._stderr = sys.stderr
        sys.stderr = _ClearingStream(self._stderr, self)
        self._ticker = threading.Thread(target=self._tick, args=(tick_s,), name="evomerge-live-line", daemon=True)
        self._ticker.start()
        self._draw()

    # -- drawing -------------------------------------------------------------------------------

    def live_text(self) -> str:
        """The live line as it would be drawn now, fitted to the terminal."""
        width = output_width(self.stream) - 1  # the last column would wrap on some terminals
        elapsed = self.clock.elapsed()
        if self.progress is not None:
            fields = live_fields(self.progress, elapsed, self.labels)
        else:
            fields = {"elapsed": clock(elapsed)}
        if self.clock.stage is not None:
            fields["stage"] = f"{self.clock.stage} ..."
        return fit_line(fields, width)

    def _draw(self) -> None:
        with self.lock:
            self.stream.write("\r" + self.live_text() + "\x1b[K")
            self.stream.flush()
            self.drawn = True

    def erase(self) -> None:
        with self.lock:
            if self.drawn:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self.drawn = False

    def _print(self, text: str) -> None:
        with self.lock:
            self.erase()
            self.stream.write(stamped(text, self.clock.elapsed(), output_width(self.stream) - 1))
            self._draw()

    def _tick(self, tick_s: float) -> None:
        while not self._stop.wait(tick_s):
            self._draw()

    # -- the protocol --------------------------------------------------------------------------

    def begin(self, doing: str) -> None:
        with self.lock:
            self.clock.begin(doing)
            self._draw()

    def done(self, what: str) -> None:
        with self.lock:
            self._print(what + self.clock.end())

    def line(self, text: str) -> None:
        self._print(text)

    def notice(self, message: str) -> None:
        self._print(message)

    def trial(self, progress: Any, record: Any) -> None:
        with self.lock:
            self.progress = progress
            if not self.labels:
                self.labels = short_labels(list(progress.directions))
            new_best = self.clock.new_best(progress)
            if not self.first_trial_said:
                self.first_trial_said = True
                self._print("first " + trial_line(progress, record, new_best=new_best))
            else:
                self._draw()

    def close(self) -> None:
        """Stop redrawing; leave the last live line on the screen as a line of its own."""
        self._stop.set()
        self._ticker.join()
        with self.lock:
            if self.progress is not None:
                self.clock.stage = None
                self._draw()
                self.stream.write("\n")
                self.drawn = False
            else:
                self.erase()
            self.stream.flush()
        if isinstance(sys.stderr, _ClearingStream):
            sys.stderr = self._stderr


class _ClearingStream:
    """``sys.stderr`` while the live line is drawn: erases it before anything else is written."""

    def __init__(self, stream: IO[str], reporter: TerminalReporter) -> None:
        self._stream = stream
        self._reporter = reporter

    def write(self, text: str) -> int:
        with self._reporter.lock:
            self._reporter.erase()
            return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class CallbackReporter:
    """For code that runs a search as a library (tests, notebooks): notices, lines and trials
    handed to callbacks, stages kept quiet. Without ``on_notice``, notices go to stderr and lines
    nowhere."""

    def __init__(self, on_progress: Callable[[Any, Any], None] | None = None,
                 on_notice: Callable[[str], None] | None = None) -> None:
        self.on_progress = on_progress
        self.on_line = on_notice or (lambda _text: None)
        self.on_notice = on_notice or (lambda message: print(message, file=sys.stderr, flush=True))

    def begin(self, doing: str) -> None:
        pass

    def done(self, what: str) -> None:
        pass

    def line(self, text: str) -> None:
        self.on_line(text)

    def notice(self, message: str) -> None:
        self.on_notice(message)

    def trial(self, progress: Any, record: Any) -> None:
        if self.on_progress is not None:
            self.on_progress(progress, record)

    def close(self) -> None:
        pass


class SilentReporter(CallbackReporter):
    """Says nothing at all (``evomerge validate`` prints its own summary)."""

    def __init__(self) -> None:
        super().__init__(on_notice=lambda _message: None)


def make_reporter(*, started: float | None = None, stream: IO[str] | None = None) -> Reporter:
    """The terminal reporter when ``stream`` (stdout) is a terminal that can redraw a line, else
    the log reporter. ``started``: the command's start on :func:`time.monotonic`'s clock."""
    stream = stream or sys.stdout
    try:
        tty = stream.isatty() and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):
        tty = False
    return TerminalReporter(stream, started=started) if tty else LogReporter(stream, started=started)
