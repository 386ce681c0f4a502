"""Keeps other libraries' progress bars and chatter out of evomerge's output.

transformers ("Writing model shards", "Loading weights"), datasets ("Generating train split"),
huggingface_hub, lm-eval and tqdm each draw progress bars or log at INFO of their own accord;
in a search they would scroll through the live line, and in a log they bury the lines a person
reads. evomerge says what it is doing itself (:mod:`evomerge.reporter`).

:func:`quiet_libraries` is the first thing a command that loads models or tasks does: most of
these switches are read from the environment when the library is imported, and the commands
import them inside their bodies. What a library still writes with its bars forced on (lm-eval
passes ``disable=`` itself) is captured where it is called (the in-process pool, ``validate``,
the toy build). Warnings and errors still get through.
"""

from __future__ import annotations

import logging
import os

#: Environment switches, set unless the user set them: tqdm's default for every bar, the Hugging
#: Face libraries' own bars and log levels. Ray workers get the same (see the Ray pool).
ENVIRONMENT = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
#: Loggers that talk at INFO or WARNING about what evomerge already says (a dataset cached, a
#: task indexed, a live model handed to lm-eval).
LOGGERS = ("lm_eval", "lm-eval", "datasets", "transformers", "huggingface_hub", "accelerate", "filelock", "fsspec")


def quiet_libraries() -> None:
    """Switch off third-party progress bars and chatter for this process and its children."""
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
