"""The one YAML reader for everything a user writes: space files, merge configs, a run's space.yaml.

``yaml.safe_load`` keeps the last of two equal keys without a word, so a space file with
``budget:`` twice under ``search:`` runs a budget the user did not mean, and a merge config with
``base_model:`` twice merges onto the wrong base. This loader is ``SafeLoader`` (no Python tags,
no code) with one change: a mapping that holds a key twice is refused, naming the key and both
line numbers, so the user sees both places and picks one.
"""

from __future__ import annotations

from typing import Any

import yaml

from .errors import ConfigError


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping holds one key twice; the message names both lines."""


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # only keys written in this mapping count: one that a merge key (<<: *anchor) brings in
        # may be overridden, as YAML says
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key; SafeLoader's own error names it below
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise DuplicateKeyError(
                    None, None,
                    f"key {key!r} appears twice in one mapping, on line {first} and on line {line}; keep one",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    lambda loader, node: loader.construct_mapping(node),
)


def _message(err: yaml.YAMLError) -> str:
    if isinstance(err, DuplicateKeyError):
        return str(err.problem)
    return f"not valid YAML: {err}"


def load(text: str, *, source: str) -> Any:
    """One YAML document, strictly; a problem is a ConfigError naming ``source``."""
    return load_all(text, source=source, single=True)[0]


def load_all(text: str, *, source: str, single: bool = False) -> list[Any]:
    """Every document of a multi-document file (``---`` separated), strictly.

    The loader is driven directly (as ``yaml.safe_load`` drives ``SafeLoader``), so no call in the
    package names ``yaml.load``: the safe-defaults test bans that name outright.
    """
    try:
        loader = _StrictLoader(text)  # its reader already refuses control characters
    except yaml.YAMLError as err:
        raise ConfigError(_message(err), where=source) from None
    try:
        if single:
            return [loader.get_single_data()]
        docs = []
        while loader.check_data():
            docs.append(loader.get_data())
        return docs
    except yaml.YAMLError as err:
        raise ConfigError(_message(err), where=source) from None
    finally:
        loader.dispose()
