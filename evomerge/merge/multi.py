"""Multi-stage merge files, in the format ``mergekit-multi`` reads.

A multi-stage file is several YAML documents, each a merge config plus an optional ``name:``.
Named documents are intermediate stages; the one unnamed document is the final output. A document
uses an earlier stage by giving its name as a model reference (``model: merged``), which is how a
layer route over a parameter merge is exported: stage ``merged`` is, say, a TIES merge, and the
final document is a passthrough route over ``merged`` and the donors.

``evomerge merge multi.yaml OUT`` merges each named stage, in dependency order, into a folder of
the intermediate directory (mergekit-multi's layout: ``<dir>/<name>``), with every reference to a
stage replaced by that folder, then the final stage into OUT. Each stage is an ordinary
``evomerge merge``, so each is assembled in a hidden folder and renamed into place when complete.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, EvomergeError, close_matches
from .config import MergeConfig, parse_merge_config

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# tokenizer_source keywords: mergekit-multi replaces every string equal to a stage name, so a
# stage with one of these names would turn ``tokenizer_source: base`` into that stage
_RESERVED_NAMES = ("base", "union")


@dataclass(frozen=True)
class Stage:
    """One document of a multi-stage file: ``name`` None is the final output."""

    name: str | None
    config: MergeConfig


def documents(text: str, *, source: str) -> list[Any]:
    """The YAML documents of ``text``, empty ones (a stray ``---``) dropped."""
    from ..strict_yaml import load_all  # duplicate keys refused, with both lines

    docs = load_all(text, source=source)
    return [d for d in docs if d is not None]


def is_multi_stage(path: Path) -> bool:
    """True when the file holds more than one YAML document (a ``mergekit-multi`` file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such config file: {path}")
    return len(documents(path.read_text(encoding="utf-8"), source=str(path))) > 1


def _references(config: MergeConfig) -> list[tuple[str, str]]:
    """(field path, model reference) for every field of ``config`` that names a model."""
    out: list[tuple[str, str]] = []
    if config.base_model:
        out.append(("base_model", config.base_model))
    for i, m in enumerate(config.models or []):
        out.append((f"models[{i}].model", m.model))
    for i, s in enumerate(config.slices or []):
        if s.base_model:
            out.append((f"slices[{i}].base_model", s.base_model))
        for j, src in enumerate(s.sources):
            out.append((f"slices[{i}].sources[{j}].model", src.model))
    if config.tokenizer_source and config.tokenizer_source not in ("base", "union"):
        out.append(("tokenizer_source", config.tokenizer_source))
    return out


def stage_dependencies(stage: Stage, names: Sequence[str]) -> list[str]:
    """The stages ``stage`` uses, in order of first mention."""
    return list(dict.fromkeys(ref for _, ref in _references(stage.config) if ref in names))


def _where(source: str, index: int, name: str | None) -> str:
    return f"{source}: document {index + 1}" + (f" (name: {name})" if name else " (final)")


def parse_stages(text: str, *, source: str = "merge config", check_references: bool = True) -> list[Stage]:
    """Read a multi-stage file, strictly; the stages come back in dependency order, final last.

    Refused, naming the document (1-based) and field: a document that is not a valid merge config,
    a bad or duplicate ``name``, no or several unnamed documents, stages that use each other in a
    cycle, and (with ``check_references``) a reference that is neither a stage nor an existing
    folder nor a Hub id, such as a misspelt stage name.
    """
    docs = documents(text, source=source)
    if not docs:
        raise ConfigError("no merge config in the file", where=source)
    stages: list[Stage] = []
    where: dict[str | None, str] = {}
    for index, doc in enumerate(docs):
        here = _where(source, index, None)
        if not isinstance(doc, Mapping):
            raise ConfigError("expected a merge config (a mapping)", where=here)
        data = dict(doc)
        name = data.pop("name", None)
        if name is not None:
            here = _where(source, index, str(name))
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise ConfigError(
                    f"name: {name!r} is not a stage name; use letters, digits, '_', '-' or '.' (it becomes a folder name)",
                    where=here,
                )
            if name in _RESERVED_NAMES:
                raise ConfigError(f"name: {name!r} is a tokenizer_source keyword; choose another stage name", where=here)
        if name in where:
            if name is None:
                raise ConfigError(f"a second unnamed document; only the final stage is unnamed (the first is {where[None]})",
                                  where=here)
            raise ConfigError(f"name: {name!r} is already the name of {where[name]}", where=here)
        where[name] = here
        stages.append(Stage(name, parse_merge_config(data, source=here)))
    if None not in where:
        raise ConfigError("no final stage: exactly one document must have no 'name:'", where=source)

    names = [s.name for s in stages if s.name is not None]
    if check_references:
        for index, stage in enumerate(stages):
            for field, ref in _references(stage.config):
                if ref in names or "/" in ref or Path(ref).expanduser().exists():
                    continue
                raise ConfigError(
                    f"{field}: {ref!r} is neither a stage of this file (stages: {', '.join(names) or 'none'}) nor a model "
                    f"folder.{close_matches(ref, names)}",
                    where=_where(source, index, stage.name),
                )
    return _dependency_order(stages, where)


def _dependency_order(stages: list[Stage], where: Mapping[str | None, str]) -> list[Stage]:
    by_name = {s.name: s for s in stages}
    names = [s.name for s in stages if s.name is not None]
    ordered: list[Stage] = []
    done: set[str | None] = set()

    def visit(stage: Stage, path: list[str | None]) -> None:
        if stage.name in done:
            return
        if stage.name in path:
            cycle = " -> ".join(str(n) for n in [*path[path.index(stage.name):], stage.name])
            raise ConfigError(f"stages use each other in a cycle: {cycle}", where=where[stage.name])
        for dep in stage_dependencies(stage, names):
            visit(by_name[dep], [*path, stage.name])
        done.add(stage.name)
        ordered.append(stage)

    for stage in stages:
        if stage.name is not None:
            visit(stage, [])
    visit(by_name[None], [])
    return ordered


def load_stages(path: Path) -> list[Stage]:
    """Read and validate a multi-stage file; every problem names the file, document and field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such config file: {path}")
    from ..preflight import check_merge_config_ranges

    stages = parse_stages(path.read_text(encoding="utf-8"), source=str(path))
    for i, stage in enumerate(stages):
        check_merge_config_ranges(stage.config, source=f"{path} (document {i + 1})")
    return stages


def stages_to_yaml(stages: Sequence[Stage]) -> str:
    """The stages as one multi-document YAML file that ``mergekit-multi`` and evomerge read."""
    docs = []
    for stage in stages:
        data = stage.config.model_dump(mode="json", exclude_none=True)
        if stage.name is not None:
            data = {"name": stage.name, **data}
        docs.append(yaml.safe_dump(data, sort_keys=False, default_flow_style=None))
    return "---\n".join(docs)


def substitute(config: MergeConfig, paths: Mapping[str, str]) -> MergeConfig:
    """``config`` with every model reference found in ``paths`` replaced by its path."""

    def swap(ref: Any) -> Any:
        return paths.get(ref, ref) if isinstance(ref, str) else ref

    data = config.model_dump(mode="python", exclude_none=True)
    if "base_model" in data:
        data["base_model"] = swap(data["base_model"])
    if data.get("tokenizer_source") not in (None, *_RESERVED_NAMES):
        data["tokenizer_source"] = swap(data["tokenizer_source"])
    for m in data.get("models", []):
        m["model"] = swap(m["model"])
    for s in data.get("slices", []):
        if "base_model" in s:
            s["base_model"] = swap(s["base_model"])
        for src in s["sources"]:
            src["model"] = swap(src["model"])
    return parse_merge_config(data, source="substituted stage")


def merge_stages(
    stages: Sequence[Stage],
    out: Path,
    *,
    intermediate_dir: Path | None = None,
    overwrite: bool = False,
    random_seed: int | None = None,
    **merge_options: Any,
) -> Path:
    """Merge every stage, the final one into ``out``; nothing is left at ``out`` on failure.

    Named stages go to ``intermediate_dir/<name>`` when given (kept afterwards, and re-merged on
    every run rather than reused, since a folder left by another file would silently be stale),
    else to a hidden sibling of ``out`` that is removed when done. ``merge_options`` are those of
    :func:`evomerge.merge.run.merge_config`; ``random_seed`` applies to every stage.
    """
    from .run import merge_config

    from ..preflight import check_out_spares_inputs

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EvomergeError(f"output {out} is a file; give a folder for the merged model")
    if out.exists() and not overwrite:
        raise EvomergeError(f"output folder {out} already exists; choose another or pass --overwrite")
    names = {s.name for s in stages}
    check_out_spares_inputs(out, {ref: Path(ref) for s in stages for ref in s.config.referenced_models()
                                  if ref not in names and Path(ref).exists()})
    ordered = _dependency_order(list(stages), {s.name: f"stage {s.name or '(final)'}" for s in stages})
    keep = intermediate_dir is not None
    work = Path(intermediate_dir) if keep else out.parent / f".{out.name}.stages"
    if not keep and work.exists():
        shutil.rmtree(work)  # left by an interrupted run
    paths = {s.name: str(work / s.name) for s in ordered if s.name is not None}
    recipe = stages_to_yaml(stages)
    try:
        if paths:
            work.mkdir(parents=True, exist_ok=True)
        for stage in ordered:
            config = substitute(stage.config, paths)
            if random_seed is not None:
                config = config.model_copy(update={"random_seed": random_seed})
            if stage.name is None:
                merge_config(config, out, overwrite=overwrite, recipe_yaml=recipe, **merge_options)
            else:
                merge_config(config, work / stage.name, overwrite=True, **merge_options)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return out
