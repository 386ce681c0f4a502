"""User-facing errors.

Anything the user can fix (a bad config, a missing folder, incompatible models) is raised as an
:class:`EvomergeError`. The CLI prints its message without a traceback and exits with status 2.
Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


class EvomergeError(Exception):
    """An error the user can fix; the message says what is wrong and how to fix it."""

    exit_code = 2


class ConfigError(EvomergeError):
    """A config file is invalid. ``where`` names the file and the field path inside it."""

    def __init__(self, message: str, *, where: str | None = None) -> None:
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class ModelError(EvomergeError):
    """A model folder is missing, unreadable, unsafe or incompatible with the others."""


def disk_full(err: BaseException) -> str | None:
    """The reason, when ``err`` (or its cause) is a write that found the disk full; else None.

    SQLite says ``database or disk is full``, or ``disk I/O error`` when it cannot even grow its
    journal (through SQLAlchemy or not); the OS says ENOSPC (or EDQUOT, over quota).
    """
    import errno

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"{err.strerror}: {err.filename}" if err.filename else str(err.strerror)
        for text in ("database or disk is full", "disk I/O error"):
            if text in str(err):
                return text
        err = getattr(err, "orig", None) or err.__cause__ or err.__context__  # type: ignore[assignment]
    return None


def close_matches(word: str, choices: Iterable[str]) -> str:
    """A ' Did you mean ...?' suffix for an unknown name, or '' when nothing is close."""
    found = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.5)
    if not found:
        return ""
    return " Did you mean " + " or ".join(repr(f) for f in found) + "?"


def known_name(value: str, known: Sequence[str], what: str, fix: str | None = None) -> str:
    """``value`` when it is one of ``known``; else a ValueError (pydantic turns it into the field's
    message) saying ``unknown <what> <value>``, the fix (by default the names to use) and the
    closest names, so every "one of these names" field answers a typo the same way."""
    if value not in known:
        fix = fix or f"use one of {', '.join(known)}"
        raise ValueError(f"unknown {what} {value!r}; {fix}.{close_matches(value, known)}")
    return value
