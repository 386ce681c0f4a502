"""Failpoints: named places where a test can make evomerge fail on purpose. A testing aid.

Crash safety is only as good as the moments it was tested at, and a test that kills a process
"after a while" hits whichever moment the machine's load picks. A failpoint (as in TiKV's fail-rs
or FoundationDB's simulation) names the moment instead: the code calls ``hit("search.before_tell")``
and the environment says what happens there::

    EVOMERGE_FAILPOINTS="search.before_tell=kill@3;worker.after_merge=nan@5;worker.evaluate=count"

Each entry is ``name=action[@when]``; entries are separated by ``;`` and a name may have several.
``when`` is ``N`` (the N-th hit of that name), ``N,M`` (either), ``N-`` (the N-th and every later
one) or absent (every hit). Actions:

- ``kill``: SIGKILL this process, at once (no handlers, no ``finally``, no flushing);
- ``oom``: really try an impossible allocation (``torch.empty(2**50)``), raising the allocator's
  own out-of-memory error;
- ``sleep(S)``: sleep S seconds (a stuck evaluation, for timeouts);
- ``raise``: raise :class:`FailpointError`;
- ``nan`` / ``inf``: returned to the call site, which poisons what it holds (a merged tensor);
- ``count``: nothing; the hit is only counted and logged.

Hits are counted per process, unless ``EVOMERGE_FAILPOINTS_DIR`` names a folder: then every
process (the search, its Ray workers, and the searches that resume it) shares one counter per
name, kept in that folder under a file lock, so ``kill@3`` fires once in a whole test however
often the search is restarted, and ``hits.log`` there lists every hit (name, pid, context).

Unset, :func:`hit` is one dictionary lookup on an empty dict: nothing to pay in production.
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

ENV = "EVOMERGE_FAILPOINTS"
DIR_ENV = "EVOMERGE_FAILPOINTS_DIR"
ACTIONS = ("kill", "oom", "sleep", "raise", "nan", "inf", "count")
_ENTRY = re.compile(r"^(?P<name>[\w.\-]+)=(?P<action>[a-z]+)(?:\((?P<arg>[^)]*)\))?(?:@(?P<when>[\d,\-]+))?$")


class FailpointError(RuntimeError):
    """Raised by the ``raise`` action."""


@dataclass(frozen=True)
class _Rule:
    action: str
    arg: str | None
    hits: frozenset[int] | None  # None: every hit
    from_hit: int | None  # "N-": this hit and every later one

    def fires(self, n: int) -> bool:
        if self.from_hit is not None:
            return n >= self.from_hit
        return self.hits is None or n in self.hits


def parse(spec: str) -> dict[str, list[_Rule]]:
    """Parse an ``EVOMERGE_FAILPOINTS`` value; a malformed entry is an error, not a silent no-op."""
    rules: dict[str, list[_Rule]] = {}
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        m = _ENTRY.match(entry)
        if not m or m["action"] not in ACTIONS:
            raise ValueError(f"{ENV}: bad entry {entry!r}; expected name=action[@N], action one of {ACTIONS}")
        when = m["when"]
        hits: frozenset[int] | None = None
        from_hit = None
        if when:
            if when.endswith("-"):
                from_hit = int(when[:-1])
            else:
                hits = frozenset(int(w) for w in when.split(","))
        rules.setdefault(m["name"], []).append(_Rule(m["action"], m["arg"], hits, from_hit))
    return rules


_RULES: dict[str, list[_Rule]] = parse(os.environ.get(ENV, ""))
_COUNTS: dict[str, int] = {}


def configure(spec: str) -> None:
    """Replace the rules (and restart this process's counters): for a test that runs evomerge in
    its own process, where the environment was read at import."""
    global _RULES
    _RULES = parse(spec)
    _COUNTS.clear()


def active() -> bool:
    return bool(_RULES)


def hit(name: str, context: str = "") -> str | None:
    """Pass failpoint ``name``; returns ``"nan"``/``"inf"`` when the call site must poison, else None."""
    rules = _RULES.get(name)
    if not rules:
        return None
    n = _count(name, context)
    for rule in rules:
        if not rule.fires(n):
            continue
        if rule.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)  # SIGKILL is delivered asynchronously; never run past this point
        elif rule.action == "oom":
            import torch

            torch.empty(1 << 50, dtype=torch.uint8)  # 1 PiB: the allocator refuses
        elif rule.action == "sleep":
            time.sleep(float(rule.arg or 3600))
        elif rule.action == "raise":
            raise FailpointError(f"failpoint {name} (hit {n})")
        elif rule.action in ("nan", "inf"):
            return rule.action
    return None


def _count(name: str, context: str) -> int:
    folder = os.environ.get(DIR_ENV)
    if not folder:
        _COUNTS[name] = _COUNTS.get(name, 0) + 1
        return _COUNTS[name]
    import fcntl

    path = Path(folder)
    with open(path / "counts.lock", "a+", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        counter = path / f"{name}.count"
        n = int(counter.read_text() or 0) + 1 if counter.exists() else 1
        counter.write_text(str(n))
        with open(path / "hits.log", "a", encoding="utf-8") as log:
            log.write(f"{name}\t{n}\t{os.getpid()}\t{context}\n")
    return n


def read_hits(folder: Path) -> list[tuple[str, int, int, str]]:
    """The hits logged in ``folder``: (name, count, pid, context), in order (for tests)."""
    log = Path(folder) / "hits.log"
    if not log.exists():
        return []
    out = []
    for line in log.read_text(encoding="utf-8").splitlines():
        name, n, pid, context = line.split("\t", 3)
        out.append((name, int(n), int(pid), context))
    return out
