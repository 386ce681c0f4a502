"""torch, imported on its first use rather than when a module that uses it is imported.

``evomerge merge`` plans a merge from configs and safetensors headers alone, and the merges that
a byte copy or :mod:`evomerge.merge.without_torch` computes never need torch at all. Importing
torch costs about 1.4 s of CPU, most of a light merge of a 100M-parameter model, so the modules
on that path bind ``torch`` to :data:`torch` here instead of importing it (type checkers see the
real module). The first attribute read through the proxy imports torch and rebinds ``torch`` in
every evomerge module that holds the proxy to the module itself: reads through the proxy cost
about 100 times a module attribute read (a failed lookup, then ``__getattr__``), too much for
the per-chunk loops of the merge kernels.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any


class _LazyTorch:
    """Stands in for the ``torch`` module until an attribute of it is read."""

    def __getattr__(self, name: str) -> Any:
        module = importlib.import_module("torch")
        for module_name, user in list(sys.modules.items()):
            if module_name.startswith("evomerge") and vars(user).get("torch") is self:
                user.torch = module  # type: ignore[attr-defined]
        return getattr(module, name)


torch: Any = _LazyTorch()


def torch_imported() -> bool:
    """Whether torch has been imported in this process (by anyone)."""
    return "torch" in sys.modules
