"""Model references made portable when a run is created, so a run folder and its exports work
from any folder.

A space file names models as a person types them: ``toy_world/base``, ``../models/arith``,
``~/ckpt/x``, ``org/name``, ``base+adapter`` (a LoRA adapter, as in mergekit). Relative paths
are resolved against the **current folder**, as mergekit resolves them and as evomerge always
has: the example spaces in ``search_spaces/`` name ``toy_world/base`` from the repository root,
where ``scripts/demo.sh`` runs them, not from ``search_spaces/``. Kept as typed, they would tie
the run to that folder: ``evomerge resume`` or ``evomerge merge exported.yaml`` run anywhere else
would look for the models somewhere else, or on the Hub.

So :func:`resolve_config` rewrites every model reference (``models.base``, each donor, each part
of ``base+adapter``) and every ``evaluation.include_path`` folder once, before anything else
reads them:

- a local folder becomes its absolute path (symlinks kept: a symlinked models folder stays the
  name the user chose);
- a Hub id is pinned to the commit the local Hugging Face cache resolves it to (offline: the
  Hub itself is never asked here), or kept as written (with its ``@revision`` if given);
- a reference that can only be a path (it starts with ``/``, ``./``, ``../`` or ``~``, or is not
  of the Hub's ``org/name`` form) and names no folder is refused, naming the field, the path as
  written, the folder it was resolved against, and the fix, instead of becoming a Hub error.

What the user wrote is kept beside the resolved references, in the config's ``as_written``
(which is not part of the run's identity), so exports and messages can say both. The run's
identity is then the resolved references: resuming from another folder is the same run, and the
same space file run from another folder, where ``toy_world/base`` is another model, is not. Runs
created before this module existed recorded the hash of the references as written;
:func:`earlier_hash` computes that one, so they still resume (from the folder they ran in).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .merge.references import HUB_ID_RE, split_reference
from .space_config.base import _dotted

#: keys of a mergekit config whose values are model references
_MODEL_KEYS = ("model", "base_model", "tokenizer_source")
#: names in those places that are not folders: tokenizer_source's modes, a route's stage-1 merge
_NOT_FOLDERS = frozenset({"base", "union", "merged"})
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")


def looks_local(text: str) -> bool:
    """Whether a reference can only be a local path: it says so (``/``, ``./``, ``../``, ``~``),
    or it is not of the Hub's ``org/name[@revision]`` form (``models/org/name``, ``C:\\x``)."""
    return text in (".", "..") or text.startswith(_PATH_PREFIXES) or not HUB_ID_RE.match(text)


def resolve_reference(written: str, *, field: str, source: str, against: Path | None = None) -> str:
    """One model reference made portable (see the module's docstring); ``base+adapter`` part by part."""
    base, adapter = split_reference(written)
    parts = [_resolve_part(p, field=field, source=source, against=against) for p in (base, adapter) if p is not None]
    return "+".join(parts)


def _resolve_part(text: str, *, field: str, source: str, against: Path | None) -> str:
    folder = _folder(against)
    local = _absolute(text, folder)
    if local.exists():
        return str(local)
    elsewhere = _found_elsewhere(text, source)
    if looks_local(text) or elsewhere is not None:
        hint = (f"it exists from {elsewhere[0]} ({elsewhere[1]}): run evomerge from there, or write that absolute "
                "path" if elsewhere is not None else
                "check the path: run evomerge from the folder it is relative to, or give an absolute path")
        raise ConfigError(
            f"model folder not found: {text!r} (resolved against {folder}: {local}; relative paths start from the "
            f"folder evomerge is run in, not the space file's); {hint}", where=f"{source}: {field}")
    return pinned(text)


def _found_elsewhere(text: str, source: str) -> tuple[Path, Path] | None:
    """(folder, path) where a relative reference that is missing from here names a folder from the
    one place the user may have meant it from: the space file's folder, or, for a run's stored
    config (a run created before references were resolved), the folder holding ``runs/``, where
    the search most likely ran. None when it is nowhere: then a Hub-like id is a Hub id."""
    space_file = Path(source)
    if Path(text).expanduser().is_absolute() or not space_file.is_file():
        return None
    from .store import HASH_FILE

    start = space_file.parent.absolute()
    if (start / HASH_FILE).is_file():  # runs/<name>/space.yaml
        start = start.parent.parent
    if start.resolve() == Path.cwd().resolve():
        return None
    candidate = _absolute(text, start)
    return (start, candidate) if candidate.exists() else None


def _folder(against: Path | None) -> Path:
    """The folder relative references start from: ``against`` when given, else the current folder."""
    return Path(against) if against is not None else Path.cwd()


def _absolute(text: str, folder: Path) -> Path:
    path = Path(text).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else folder / path))  # no symlink resolution


def pinned(hub_id: str, *, cache_dir: str | Path | None = None) -> str:
    """``org/name[@revision]`` as ``org/name@<commit>`` when the local Hugging Face cache knows
    which commit that revision is; else as given. Reads the cache only: no network."""
    repo, _, revision = hub_id.partition("@")
    if _COMMIT_RE.match(revision):
        return hub_id
    commit = cached_commit(repo, revision or "main", cache_dir=cache_dir)
    return f"{repo}@{commit}" if commit else hub_id


def cached_commit(repo: str, revision: str, *, cache_dir: str | Path | None = None) -> str | None:
    """The commit the local Hugging Face cache holds for ``repo`` at ``revision``, or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, "config.json", cache_dir=cache_dir, revision=revision)
    except Exception:  # noqa: BLE001  (a malformed id or cache: not known, the Hub decides later)
        return None
    if not isinstance(found, str):
        return None
    commit = Path(found).parent.name  # <cache>/models--org--name/snapshots/<commit>/config.json
    return commit if _COMMIT_RE.match(commit) else None


# ------------------------------------------------------------------------------------------------
# A space config
# ------------------------------------------------------------------------------------------------


def _reference_fields(data: Mapping[str, Any]) -> list[tuple[tuple[str | int, ...], str, bool]]:
    """(location in the config's data, value, whether it is a model) for every path the config holds."""
    out: list[tuple[tuple[str | int, ...], str, bool]] = [(("models", "base"), data["models"]["base"], True)]
    out += [(("models", "donors", i, "model"), d["model"], True) for i, d in enumerate(data["models"]["donors"])]
    out += [(("evaluation", "include_path", i), p, False)
            for i, p in enumerate(data.get("evaluation", {}).get("include_path", ()))]
    return out


def resolve_config(config: Any, *, against: Path | None = None) -> Any:
    """The config with every model reference and task folder resolved (see the module's
    docstring), what the user wrote kept in ``as_written``. Resolving a resolved config changes
    nothing, so a run folder's stored config resolves to itself."""
    from .space_config import parse_space_config

    data = config.to_data()
    written = dict(data.get("as_written", {}))
    renamed: dict[str, str] = {}
    for location, value, is_model in _reference_fields(data):
        field = _dotted(location)
        if is_model:
            resolved = resolve_reference(value, field=field, source=config.source, against=against)
        else:
            resolved = _resolve_folder(value, field=field, source=config.source, against=against)
        if resolved != value:
            _set(data, location, resolved)
            written.setdefault(field, value)
            renamed[value] = resolved
    if not renamed:
        return config
    _refuse_two_spellings(data, written, config.source)
    _rename_stage_one(data, renamed)
    data["as_written"] = written
    return parse_space_config(data, source=config.source)


def _refuse_two_spellings(data: dict[str, Any], written: Mapping[str, str], source: str) -> None:
    """Two spellings of one folder (``toy_world/arith`` and ``./toy_world/arith/``) are one model,
    refused as :func:`evomerge.preflight.check_distinct_models` words it (which also sees through
    symlinks, once the folders are open)."""
    seen = {data["models"]["base"]: "models.base"}
    for i, donor in enumerate(data["models"]["donors"]):
        field = f"models.donors[{i}].model"
        other = seen.get(donor["model"])
        if other is not None:
            what = "the base; donors are the fine-tunes of it" if other == "models.base" else \
                f"the same folder as {other}; list each donor once"
            raise ConfigError(f"{written.get(field, donor['model'])!r} ({donor['model']}) is {what}",
                              where=f"{source}: {field}")
        seen[donor["model"]] = f"models.donors[{i}]"


def _set(data: dict[str, Any], location: tuple[str | int, ...], value: str) -> None:
    *parents, last = location
    node: Any = data
    for p in parents:
        node = node[p]
    node[last] = value


def _rename_stage_one(data: dict[str, Any], mapping: Mapping[str, str]) -> None:
    """A stored two-stage config holds its stage-1 merge inline: it names the same models."""
    route = data.get("route") or {}
    if isinstance(route.get("merged"), Mapping):
        route["merged"] = portable_merge_data(route["merged"], mapping, lenient=False)


def _resolve_folder(text: str, *, field: str, source: str, against: Path | None) -> str:
    folder = _folder(against)
    local = _absolute(text, folder)
    if not local.is_dir():
        raise ConfigError(f"task folder {text!r} does not exist; point it at a folder of lm-eval task YAMLs (resolved "
                          f"against {folder}: {local}; relative paths start from the folder evomerge is run in)",
                          where=f"{source}: {field}")
    return str(local)


def earlier_hash(config: Any) -> str:
    """The run hash evomerge recorded before references were resolved: that of the references as
    the user wrote them. A run folder whose hash is this one is the same run, created earlier."""
    from .space_config import parse_space_config

    written = config.as_written or {}
    if not written:
        return config.config_hash()
    data = config.to_data()
    restored: dict[str, str] = {}
    for location, value, _ in _reference_fields(data):
        field = _dotted(location)
        if field in written:
            _set(data, location, written[field])
            restored[value] = written[field]
    _rename_stage_one(data, restored)
    data.pop("as_written", None)
    return parse_space_config(data, source=config.source).config_hash()


def reference_map(config: Any) -> dict[str, str]:
    """Each reference as written (and as resolved) -> as resolved: what renames a merge made
    from the references as written (a stage-1 run of an earlier version, a mergekit YAML)."""
    data = config.to_data()
    written = config.as_written or {}
    out: dict[str, str] = {}
    for location, value, is_model in _reference_fields(data):
        if not is_model:
            continue
        out[value] = value
        field = _dotted(location)
        if field in written:
            out[written[field]] = value
            for a, b in zip(_parts(written[field]), _parts(value)):
                out.setdefault(a, b)
    return out


def _parts(reference: str) -> list[str]:
    base, adapter = split_reference(reference)
    return [base] if adapter is None else [base, adapter]


# ------------------------------------------------------------------------------------------------
# A mergekit config (a recipe, a stage-1 merge, an export)
# ------------------------------------------------------------------------------------------------


def portable_merge_data(data: Any, mapping: Mapping[str, str], *, lenient: bool = True,
                        against: Path | None = None) -> Any:
    """A mergekit config's data with each model reference renamed by ``mapping``; with ``lenient``,
    one not in it is made absolute when it names an existing local folder (relative to
    ``against``, default the current folder), else left as it is: a recipe recorded before
    references were resolved exports as a file that works from any folder when its models can be
    found from here."""
    if isinstance(data, Mapping):
        return {k: (_portable(v, mapping, lenient, against) if k in _MODEL_KEYS and isinstance(v, str)
                    else portable_merge_data(v, mapping, lenient=lenient, against=against)) for k, v in data.items()}
    if isinstance(data, list):
        return [portable_merge_data(v, mapping, lenient=lenient, against=against) for v in data]
    return data


def _portable(reference: str, mapping: Mapping[str, str], lenient: bool, against: Path | None) -> str:
    if reference in mapping:
        return mapping[reference]
    if not lenient or reference in _NOT_FOLDERS:
        return reference
    folder = _folder(against)
    try:
        parts = _parts(reference)
    except Exception:  # noqa: BLE001  (not a reference: ``tokenizer_source: union``)
        return reference
    out = []
    for part in parts:
        local = _absolute(part, folder)
        out.append(mapping.get(part) or (str(local) if local.is_dir() and not Path(part).is_absolute() else part))
    return "+".join(out)


def resolve_merge(merge: Any, config: Any) -> Any:
    """A stage-1 merge (``route.merged``) naming the models as the config names them: a merge that
    names them as the space file wrote them (a run or a mergekit YAML from before references were
    resolved) is renamed to the resolved references, so the workers find them by name."""
    from .merge.config import parse_merge_config

    data = portable_merge_data(merge.model_dump(mode="json", exclude_none=True), reference_map(config), lenient=False)
    return parse_merge_config(data, source="route.merged")


def portable_recipe(recipe: Any, run_config: Any | None) -> Any:
    """A recorded recipe whose model references work from any folder (see :func:`portable_merge_data`)."""
    from .recipe import Recipe

    mapping = reference_map(run_config) if run_config is not None else {}
    return Recipe.from_data(portable_merge_data(recipe.to_data(), mapping))
