"""mergekit YAML, parsed and validated.

These models accept what mergekit's ``MergeConfiguration`` accepts for the features evomerge
supports (``models:`` and ``slices:`` forms, parameters as scalars, gradients or filter lists,
``dtype``/``out_dtype``, ``tokenizer_source``) and refuse the rest by name, so that a config is
never silently read differently from mergekit. Unknown keys are errors with a close match: a
misspelled ``densty`` must not quietly fall back to a default.

A model may be named ``base+adapter``: the base with a PEFT LoRA adapter merged in, read exactly
as mergekit's ``ModelReference`` reads it (see :mod:`evomerge.merge.lora`).

``random_seed`` is an evomerge extension that mergekit ignores (mergekit takes ``--random-seed``
on its command line instead); it seeds the random sparsifiers (DARE, DELLA).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError, EvomergeError, close_matches

Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Conditional(_Strict):
    """One ``{filter, value}`` entry: applies when ``filter`` is a substring of the tensor name."""

    value: ScalarOrGradient
    filter: str | None = None


ParameterSetting = Union[ScalarOrGradient, Conditional, list[Conditional]]
Parameters = dict[str, ParameterSetting]


def _check_reference(value: str) -> str:
    """A model reference is a folder or Hub id, or ``base+adapter`` (a LoRA adapter, as in mergekit)."""
    from .references import split_reference

    try:
        split_reference(value)
    except EvomergeError as err:
        raise ValueError(str(err)) from None
    return value


ModelReference = Annotated[str, AfterValidator(_check_reference)]


class InputModel(_Strict):
    model: ModelReference
    parameters: Parameters | None = None


class InputSlice(_Strict):
    model: ModelReference
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, end = value
        if start < 0 or end <= start:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(value)}")
        return value


class OutputSlice(_Strict):
    sources: list[InputSlice] = Field(min_length=1)
    base_model: ModelReference | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _equal_lengths(self) -> OutputSlice:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(
                "all sources of a slice must span the same number of layers; got layer_ranges "
                + ", ".join(str(list(s.layer_range)) for s in self.sources)
            )
        return self

    @property
    def num_layers(self) -> int:
        first = self.sources[0].layer_range
        return first[1] - first[0]


DTYPES = ("float32", "float16", "bfloat16", "float64")


class MergeConfig(_Strict):
    """A mergekit merge configuration. Exactly one of ``models`` and ``slices`` is set."""

    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    base_model: ModelReference | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    random_seed: int | None = None

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from .registry import get_method  # the registry imports this module

        try:
            get_method(value)
        except ConfigError as err:
            raise ValueError(str(err)) from None
        return value

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in DTYPES:
            raise ValueError(f"unknown dtype {value!r}; use one of {', '.join(DTYPES)}")
        return value

    @model_validator(mode="after")
    def _one_form(self) -> MergeConfig:
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of 'models:' or 'slices:' (a non-empty list)")
        return self

    def referenced_models(self) -> list[str]:
        """Every model the config names, base first, each once, in order of appearance."""
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for m in self.models or []:
            seen[m.model] = None
        for s in self.slices or []:
            if s.base_model:
                seen[s.base_model] = None
            for src in s.sources:
                seen[src.model] = None
        return list(seen)

    def to_yaml(self) -> str:
        """The config as mergekit YAML (no evomerge-only defaults written)."""
        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


_UNSUPPORTED = {
    "modules": "evomerge merges single-module models; use 'models:' or 'slices:'",
    "tokenizer": "the 'tokenizer:' block (token surgery) is not supported; use 'tokenizer_source:'",
}


def _format_location(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after[_ordered(), tuple[int, int]]",):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _explain(err: ValidationError, source: str) -> ConfigError:
    lines = []
    for e in err.errors():
        # pydantic reports each member of a Union separately; keep the first per location
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p in ("list", "Conditional"))))
        where = _format_location(loc)
        if e["type"] == "extra_forbidden":
            field = str(loc[-1]) if loc else "?"
            known = _known_fields_at(loc[:-1])
            lines.append(f"{where}: unknown field.{close_matches(field, known)} Known fields here: {', '.join(known)}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {msg}")
    unique = list(dict.fromkeys(lines))
    return ConfigError("invalid merge config:\n  " + "\n  ".join(unique[:8]), where=source)


def _known_fields_at(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = MergeConfig
    names = [p for p in loc if isinstance(p, str)]
    table: dict[str, type[BaseModel]] = {"models": InputModel, "slices": OutputSlice, "sources": InputSlice}
    for name in names:
        model = table.get(name, model)
    return list(model.model_fields)


def parse_merge_config(data: Any, *, source: str = "merge config") -> MergeConfig:
    """Validate a mergekit config given as a mapping (e.g. from ``yaml.safe_load``)."""
    if not isinstance(data, Mapping):
        raise ConfigError("expected a mapping with at least 'merge_method' and 'models' or 'slices'", where=source)
    for key, why in _UNSUPPORTED.items():
        if key in data:
            raise ConfigError(f"'{key}': {why}", where=source)
    try:
        return MergeConfig.model_validate(dict(data))
    except ValidationError as err:
        raise _explain(err, source) from None


def load_merge_config(path: Path) -> MergeConfig:
    """Read and validate a mergekit YAML file; every problem names the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such config file: {path}")
    from ..strict_yaml import load  # duplicate keys refused, with both lines

    from ..preflight import check_merge_config_ranges

    data = load(path.read_text(encoding="utf-8"), source=str(path))
    config = parse_merge_config(data, source=str(path))
    check_merge_config_ranges(config, source=str(path))  # density in [0, 1]...
    return config
