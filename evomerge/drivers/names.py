"""The drivers a space file may name in ``search.driver``: one list, for the config and for
:func:`evomerge.drivers.make_driver`.

A module of its own, so that the config checks a name without importing any driver, nor the run
store the drivers are built on.
"""

from __future__ import annotations

DRIVER_NAMES: tuple[str, ...] = ("cma", "tpe", "nsga2", "gp", "random")
