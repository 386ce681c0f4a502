"""Loads a toy task's JSONL next to this file (lm-eval ``custom_dataset``).

Resolving the path here, not in the YAML, keeps the tasks independent of the working directory;
building the dataset in memory keeps lm-eval off the network and out of the datasets cache.
"""

import json
from pathlib import Path


def load(data_file: str, **_metadata):
    """A ``DatasetDict`` with one ``test`` split read from ``data_file`` (relative to this folder)."""
    import datasets

    path = Path(__file__).resolve().parent / data_file
    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
