"""How a model is named in a merge config or a space file, read without loading anything.

Kept apart from the modules that read weights (and so import torch) because the commands that
only read a run back (``show``, ``export``) resolve model references too, and importing torch
costs them more than the rest of their work.
"""

from __future__ import annotations

import re

from ..errors import ModelError

#: ``owner/name`` or ``owner/name@revision``: what a Hub model id looks like
HUB_ID_RE = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")


def split_reference(reference: str) -> tuple[str, str | None]:
    """``base+adapter`` -> (``base``, ``adapter``); a plain model -> (``model``, None).

    As mergekit's ``ModelReference`` parses it: the text is split at every ``+``, and more than
    one ``+`` is an error.
    """
    parts = reference.split("+")
    if len(parts) == 1:
        return reference, None
    if len(parts) == 2 and all(p.strip() for p in parts):
        return parts[0], parts[1]
    raise ModelError(
        f"model reference {reference!r} cannot be read: write a model folder, or a base folder and one LoRA "
        "adapter folder joined by '+' (base+adapter), as in mergekit"
    )
