"""Reading a space file into a frozen :class:`~evomerge.space_config.schema.SpaceConfig`, or a
run folder's own copy of it (to resume the run).

YAML is read by :mod:`evomerge.strict_yaml` (``yaml.safe_load`` that refuses a key written
twice); any mistake is one :class:`~evomerge.errors.ConfigError` (see
:mod:`~evomerge.space_config.messages`), raised before any run folder exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import ConfigError, EvomergeError
from .messages import _explain
from .schema import SpaceConfig


def _tupled(data: Any) -> Any:
    """YAML lists as tuples (strict validation wants tuples for the frozen fields)."""
    if isinstance(data, list):
        return tuple(_tupled(x) for x in data)
    if isinstance(data, dict):
        return {k: _tupled(v) for k, v in data.items()}
    return data


def plain_data(data: Any) -> Any:
    """Undo the loader's lists-to-tuples (see :func:`_tupled`) for data handed to other parsers."""
    if isinstance(data, Mapping):
        return {k: plain_data(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [plain_data(v) for v in data]
    return data


def parse_space_config(data: Any, *, source: str = "space config", default_name: str | None = None) -> SpaceConfig:
    """Validate a space config given as plain data (e.g. from ``yaml.safe_load``)."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"expected a mapping with models:, merge:, objectives: and search:, got {type(data).__name__}", where=source
        )
    data = dict(data)
    if "name" not in data and default_name is not None:
        data["name"] = default_name
    try:
        config = SpaceConfig.model_validate(_tupled(data))
    except ValidationError as err:
        raise _explain(err, source) from None
    except ConfigError as err:  # raised by code that validators call
        raise ConfigError(str(err), where=source) from None
    config._source = source
    return config


def load_space_config(path: str | Path) -> SpaceConfig:
    """Read and validate a space file; the run name defaults to the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such space file: {path}")
    from ..strict_yaml import load  # duplicate keys refused, with both lines

    try:
        data = load(path.read_text(encoding="utf-8"), source=str(path))
    except UnicodeDecodeError as err:
        raise ConfigError(f"not UTF-8 text: {err}", where=str(path)) from None
    return parse_space_config(data, source=str(path), default_name=path.stem)


def resume_config(run_dir: Path) -> SpaceConfig:
    """The frozen space config a run folder was created with."""
    from ..strict_yaml import load

    run_dir = Path(run_dir)
    space_file = run_dir / "space.yaml"
    if not space_file.is_file():
        raise EvomergeError(f"{run_dir} is not an evomerge run folder (no space.yaml)")
    data = load(space_file.read_text(encoding="utf-8"), source=str(space_file))
    if isinstance(data, dict):
        # a run is its folder (run.json names its study): a renamed folder resumes in place,
        # never as a fresh run under the name it had
        data["name"] = run_dir.resolve().name
    return parse_space_config(data, source=str(space_file), default_name=run_dir.name)
