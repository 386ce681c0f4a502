"""From a merge config to one task per output tensor, as mergekit plans it.

The plan is the contract between the config and both executors (the streaming one that writes a
folder, and the in-memory one that search workers use): each task names its input tensors in
merge order, where the base sits among them, and the parameters already resolved for this
tensor. Nothing here reads tensor data; it reads configs and safetensors headers, and refuses a
merge that cannot work (unknown parameters, layer ranges past the end, mismatched shapes) before
any output exists.

mergekit's order and lookup rules are followed exactly: a ``models:`` config is one slice over
all layers with the base appended when it is not listed; embeddings take their parameters from
the first slice and the final norm and head from the last, both at ``t = 0``; within a slice of
``n`` layers layer ``i`` sits at ``t = i / (n - 1)`` (``t = 1`` when ``n == 1``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
else:
    from evomerge.lazy_torch import torch  # imported on first use: see evomerge.lazy_torch

from ..errors import ConfigError, ModelError, close_matches
from .config import InputSlice, MergeConfig, OutputSlice, Parameters
from .model_folder import ModelFolder, split_layer_name
from .params import resolve
from .registry import MergeMethod, get_method
from .safetensors_io import dtype_of, promote_codes

_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
_PRE_MARKERS = ("embed", "wte", "wpe")
_VOCAB_MARKERS = ("embed_tokens", "lm_head", "wte")


def code_from_name(name: str | None) -> str | None:
    """The safetensors dtype code of a config's dtype name (``bfloat16`` -> ``BF16``)."""
    return None if name is None else _CODES[name]


@dataclass(frozen=True)
class TensorTask:
    """Everything needed to compute one output tensor."""

    name: str
    sources: tuple[tuple[str, str], ...]  # (model reference, input tensor name), in merge order
    base_index: int | None
    per_input: tuple[Mapping[str, Any], ...]
    shared: Mapping[str, Any]
    shape: tuple[int, ...]
    load_code: str | None  # cast inputs to this dtype on load (config ``dtype``), as a safetensors code
    out_code: str  # dtype written, as a safetensors code

    @property
    def load_dtype(self) -> torch.dtype | None:
        return None if self.load_code is None else dtype_of(self.load_code)

    @property
    def out_dtype(self) -> torch.dtype:
        return dtype_of(self.out_code)

    def seed(self, random_seed: int) -> int:
        """A per-tensor seed, so random methods give the same result in any execution order."""
        digest = hashlib.blake2b(f"{random_seed}:{self.name}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class MergePlan:
    method: MergeMethod
    tasks: tuple[TensorTask, ...]
    reference_model: str  # whose config and tokenizer shape the output
    num_layers: int  # layers in the output
    layer_sources: tuple[tuple[str, int], ...]  # per output layer: (model, source layer index) of its first source
    random_seed: int


def _check_parameter_names(config: MergeConfig, method: MergeMethod) -> None:
    known = [p.name for p in method.params]
    scopes: list[tuple[str, Parameters | None]] = [("parameters", config.parameters)]
    for i, m in enumerate(config.models or []):
        scopes.append((f"models[{i}].parameters", m.parameters))
    for i, s in enumerate(config.slices or []):
        scopes.append((f"slices[{i}].parameters", s.parameters))
        for j, src in enumerate(s.sources):
            scopes.append((f"slices[{i}].sources[{j}].parameters", src.parameters))
    for where, scope in scopes:
        for name in scope or {}:
            if name not in known:
                takes = ", ".join(known) if known else "no parameters"
                raise ConfigError(
                    f"merge method '{method.name}' takes no parameter '{name}'.{close_matches(name, known)} "
                    f"It takes: {takes}",
                    where=where,
                )


def _normalized_slices(config: MergeConfig, models: Mapping[str, ModelFolder]) -> list[OutputSlice]:
    if config.slices:
        for i, s in enumerate(config.slices):
            for j, src in enumerate(s.sources):
                n = models[src.model].num_layers
                if src.layer_range[1] > n:
                    raise ConfigError(
                        f"layer_range {list(src.layer_range)} goes past the end of {src.model!r}, which has {n} layers",
                        where=f"slices[{i}].sources[{j}].layer_range",
                    )
        return list(config.slices)
    assert config.models
    sources = [
        InputSlice(model=m.model, layer_range=(0, models[m.model].num_layers), parameters=m.parameters)
        for m in config.models
    ]
    if config.base_model and all(m.model != config.base_model for m in config.models):
        sources.append(InputSlice(model=config.base_model, layer_range=(0, models[config.base_model].num_layers)))
    lengths = {s.layer_range[1] for s in sources}
    if len(lengths) > 1:
        counts = ", ".join(f"{s.model!r}: {s.layer_range[1]}" for s in sources)
        raise ModelError(
            f"models have different numbers of layers ({counts}); merge fine-tunes of one base model "
            "(in a mergekit YAML, 'slices:' can say which layers to merge)"
        )
    return [OutputSlice(sources=sources)]


def _layout(reference: ModelFolder) -> tuple[list[str], str, list[str], list[str]]:
    """Split the reference model's tensors into (pre, layer prefix, per-layer names, post)."""
    pre: list[str] = []
    post: list[str] = []
    per_layer: dict[int, list[str]] = {}
    prefix = ""
    for name in reference.tensor_names:
        parts = split_layer_name(name)
        if parts is not None:
            prefix, index, rest = parts
            per_layer.setdefault(index, []).append(rest)
        elif any(marker in name for marker in _PRE_MARKERS):
            pre.append(name)
        else:
            post.append(name)
    if not per_layer:
        raise ModelError(f"{reference.path}: no decoder layers found among its tensors; evomerge merges decoder-only models")
    layer_rests = per_layer[min(per_layer)]
    return pre, prefix, layer_rests, post


def _base_index(sources: Sequence[InputSlice], base: str | None, method: MergeMethod, where: str) -> int | None:
    index = next((i for i, s in enumerate(sources) if base is not None and s.model == base), None)
    if method.needs_base and index is None:
        if base is None:
            raise ConfigError(f"merge method '{method.name}' needs a base_model; set 'base_model:'", where=where)
        raise ConfigError(f"base_model {base!r} is not among this slice's sources; add it as a source", where=where)
    try:
        method.check_inputs(len(sources), has_base=index is not None)
    except ConfigError as err:
        raise ConfigError(str(err), where=where) from None
    return index


def _resolve_params(
    method: MergeMethod,
    slice_def: OutputSlice,
    config: MergeConfig,
    *,
    out_name: str,
    in_names: Sequence[str],
    base_index: int | None,
    t: float,
) -> tuple[tuple[Mapping[str, Any], ...], Mapping[str, Any]]:
    shared_scopes = (slice_def.parameters, config.parameters)
    shared = {
        p.name: resolve(p.name, kind=p.kind, default=p.default, required=p.required, scopes=shared_scopes,
                        tensor_name=out_name, t=t, where=out_name)
        for p in method.params
        if not p.per_model
    }
    per_input = []
    for i, (src, in_name) in enumerate(zip(slice_def.sources, in_names)):
        scopes = (src.parameters, slice_def.parameters, config.parameters)
        per_input.append({
            p.name: resolve(p.name, kind=p.kind, default=p.default, required=p.required, scopes=scopes,
                            tensor_name=in_name, t=t, where=f"{src.model!r} tensor {in_name}")
            for p in method.params
            if p.per_model and (i != base_index or p.includes_base)
        })
    return tuple(per_input), shared


def _check_shapes(name: str, sources: Sequence[tuple[str, str]], models: Mapping[str, ModelFolder]) -> tuple[int, ...]:
    shapes = {(m, n): models[m].shape(n) for m, n in sources}
    distinct = set(shapes.values())
    if len(distinct) > 1:
        listing = ", ".join(f"{m!r}: {list(s)}" for (m, _), s in shapes.items())
        if any(marker in name for marker in _VOCAB_MARKERS):
            raise ModelError(
                f"the models have different vocabularies ({name}: {listing}); evomerge merges models that share "
                "the base's tokenizer and vocabulary size"
            )
        raise ModelError(f"tensor shapes differ for {name} ({listing}); the models are not fine-tunes of one base")
    return next(iter(distinct))


def _check_architectures(models: Mapping[str, ModelFolder]) -> None:
    kinds = {ref: (m.config.get("model_type"), m.config.get("hidden_size")) for ref, m in models.items()}
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"{ref!r}: {k[0]} (hidden_size {k[1]})" for ref, k in kinds.items())
        raise ModelError(f"the models have different architectures ({listing}); merge fine-tunes of one base model")


def plan_merge(config: MergeConfig, models: Mapping[str, ModelFolder]) -> MergePlan:
    """Plan every output tensor of ``config`` over the opened ``models`` (keyed by reference)."""
    method = get_method(config.merge_method)
    _check_parameter_names(config, method)
    _check_architectures(models)
    slices = _normalized_slices(config, models)
    reference_name = config.base_model or config.referenced_models()[0]
    reference = models[reference_name]
    pre, prefix, layer_rests, post = _layout(reference)
    load_code = code_from_name(config.dtype)
    out_code_cfg = code_from_name(config.out_dtype)

    tasks: list[TensorTask] = []

    def add(out_name: str, slice_def: OutputSlice, in_names: list[str], t: float, where: str) -> None:
        base = slice_def.base_model or config.base_model
        base_index = _base_index(slice_def.sources, base, method, where)
        sources = tuple((s.model, n) for s, n in zip(slice_def.sources, in_names))
        shape = _check_shapes(out_name, sources, models)
        per_input, shared = _resolve_params(
            method, slice_def, config, out_name=out_name, in_names=in_names, base_index=base_index, t=t
        )
        if out_code_cfg is not None:
            out_code = out_code_cfg
        elif load_code is not None:
            out_code = method.result_code(load_code)
        else:
            out_code = models[sources[0][0]].dtype_code(sources[0][1])
            for m, n in sources[1:]:
                out_code = promote_codes(out_code, models[m].dtype_code(n))
            out_code = method.result_code(out_code)
        tasks.append(TensorTask(out_name, sources, base_index, per_input, shared, shape, load_code, out_code))

    for name in pre:
        add(name, slices[0], [name] * len(slices[0].sources), 0.0, "slices[0]")
    out_layer = 0
    layer_sources: list[tuple[str, int]] = []
    for si, slice_def in enumerate(slices):
        n = slice_def.num_layers
        for offset in range(n):
            t = offset / (n - 1) if n > 1 else 1.0
            for rest in layer_rests:
                in_names = [f"{prefix}.{s.layer_range[0] + offset}.{rest}" for s in slice_def.sources]
                add(f"{prefix}.{out_layer}.{rest}", slice_def, in_names, t, f"slices[{si}]")
            first = slice_def.sources[0]
            layer_sources.append((first.model, first.layer_range[0] + offset))
            out_layer += 1
    for name in post:
        add(name, slices[-1], [name] * len(slices[-1].sources), 0.0, f"slices[{len(slices) - 1}]")

    seed = config.random_seed if config.random_seed is not None else 0
    return MergePlan(method, tuple(tasks), reference_name, out_layer, tuple(layer_sources), seed)
