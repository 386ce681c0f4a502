"""Layer routing (frankenmerges): a model stacked from decoder layers of several models.

A *route* lists the output model's decoder layers, each a layer of some model (the same layer may
appear several times, so the output may be deeper than any input), optionally scaled. It has two
forms that must mean the same model:

- the exported one, a mergekit ``passthrough`` config in ``slices:`` form
  (:func:`route_to_config`, and its strict inverse :func:`route_from_config`: search workers
  parse the exported config back, so what they evaluate is exactly what is exported);
- the in-memory one, :func:`build_routed_model`, which a search worker builds in milliseconds from
  modules it already holds, sharing every weight (no copy): decoder layers are shallow clones
  that hold the very same Parameter objects, each with its own position as ``layer_idx``.

Where the in-memory model takes its non-layer weights from follows mergekit's passthrough:
embeddings from the first slice's model, the final norm and ``lm_head`` from the last slice's.
``scale`` multiplies the residual-branch outputs (``o_proj``, ``down_proj``); mergekit scales
those weights, the in-memory model scales their outputs with a forward hook on the clone, which
is the same function (a linear map scaled by s is s times the map, bias included) without
touching the shared weights.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from .config import Conditional, MergeConfig, Parameters, parse_merge_config
from .model_folder import split_layer_name

# the merge plan's split of non-layer tensors: "pre" from the first slice, the rest from the last
from .plan import _PRE_MARKERS

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from .inmemory import ResidentModels

# The residual-branch output projections that ``scale`` multiplies (Llama, Mistral, Qwen naming).
RESIDUAL_OUTPUTS = ("o_proj", "down_proj")

# Per-layer lists in a config that follow the layer each output layer came from (as the exported
# config's do, see ``evomerge.merge.run.output_config``).
PER_LAYER_CONFIG_KEYS = ("layer_types",)


@dataclass(frozen=True)
class RoutedLayer:
    """One output decoder layer: layer ``layer`` of ``model``, its residual outputs times ``scale``.

    ``model`` is a model reference as a merge config names it: a folder, a Hub id, or the name of
    an earlier stage of a multi-stage file (e.g. ``merged``).
    """

    model: str
    layer: int
    scale: float = 1.0


# --------------------------------------------------------------------------------------------
# The exported form: a passthrough config


def supports_scale(tensor_names: Iterable[str]) -> bool:
    """True when ``scale`` can be applied to a model with these tensor names.

    That needs every decoder layer to have a weight of each module named in
    :data:`RESIDUAL_OUTPUTS`, and every layer tensor whose name contains one of those strings
    (what mergekit's substring filter scales) to be a ``weight`` or ``bias`` of such a module, so
    that scaling the matched tensors is the same as scaling those modules' outputs.
    """
    found: dict[int, set[str]] = {}
    for name in tensor_names:
        parts = split_layer_name(name)
        if parts is None:
            continue
        _, index, rest = parts
        have = found.setdefault(index, set())
        components = rest.split(".")
        for proj in RESIDUAL_OUTPUTS:
            if proj not in rest:
                continue
            if len(components) < 2 or components[-2] != proj or components[-1] not in ("weight", "bias"):
                return False
            if components[-1] == "weight":
                have.add(proj)
    return bool(found) and all(have == set(RESIDUAL_OUTPUTS) for have in found.values())


def _scale_setting(scale: float) -> list[dict[str, Any]]:
    return [{"filter": proj, "value": float(scale)} for proj in RESIDUAL_OUTPUTS] + [{"value": 1.0}]


def _check_route(route: Sequence[RoutedLayer]) -> None:
    if not route:
        raise ConfigError("a route needs at least one layer")
    for i, step in enumerate(route):
        if not isinstance(step, RoutedLayer):
            raise ConfigError(f"expected a RoutedLayer, got {type(step).__name__}", where=f"route[{i}]")
        if not isinstance(step.layer, int) or isinstance(step.layer, bool) or step.layer < 0:
            raise ConfigError(f"layer must be an index >= 0, got {step.layer!r}", where=f"route[{i}]")
        if isinstance(step.scale, bool) or not isinstance(step.scale, (int, float)) or not math.isfinite(step.scale):
            raise ConfigError(f"scale must be a finite number, got {step.scale!r}", where=f"route[{i}]")


def _runs(route: Sequence[RoutedLayer]) -> list[list[RoutedLayer]]:
    """Consecutive layers of one model with contiguous indices and equal scale, grouped."""
    runs: list[list[RoutedLayer]] = []
    for step in route:
        if runs:
            prev = runs[-1][-1]
            if step.model == prev.model and step.layer == prev.layer + 1 and step.scale == prev.scale:
                runs[-1].append(step)
                continue
        runs.append([step])
    return runs


def route_to_config(route: Sequence[RoutedLayer], *, dtype: str) -> MergeConfig:
    """The route as a mergekit ``passthrough`` config, one source per slice.

    Runs of layers that mergekit can copy as one slice are joined; a scale other than 1 becomes
    ``scale: [{filter: o_proj, value: s}, {filter: down_proj, value: s}, {value: 1.0}]`` on the
    slice's source, so only the residual outputs are scaled (mergekit and evomerge resolve it the
    same way: the first entry whose filter is a substring of the tensor name wins).
    """
    _check_route(route)
    slices = []
    for run in _runs(route):
        first = run[0]
        source: dict[str, Any] = {"model": first.model, "layer_range": [first.layer, first.layer + len(run)]}
        if first.scale != 1:
            source["parameters"] = {"scale": _scale_setting(first.scale)}
        slices.append({"sources": [source]})
    return parse_merge_config({"merge_method": "passthrough", "slices": slices, "dtype": dtype}, source="route")


def _read_scale(params: Parameters | None, where: str) -> float | None:
    """The route scale in ``params``, None when absent; anything but the exported form is refused."""
    if not params:
        return None
    others = [k for k in params if k != "scale"]
    if others:
        raise ConfigError(f"a route takes no parameter other than 'scale', got {others[0]!r}", where=f"{where}.{others[0]}")
    if "scale" not in params:
        return None
    form = "[{filter: o_proj, value: s}, {filter: down_proj, value: s}, {value: 1.0}]"
    setting = params["scale"]
    entries = setting if isinstance(setting, list) else [setting]
    ok = len(entries) == len(RESIDUAL_OUTPUTS) + 1 and all(isinstance(e, Conditional) for e in entries)
    if ok:
        filtered = {e.filter: e.value for e in entries[:-1]}
        last = entries[-1]
        values = list(filtered.values())
        ok = (
            set(filtered) == set(RESIDUAL_OUTPUTS)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
            and len(set(values)) == 1
            and last.filter is None
            and isinstance(last.value, (int, float)) and not isinstance(last.value, bool) and last.value == 1
        )
    if not ok:
        raise ConfigError(
            f"a route's scale must be written as {form} (one number s for the residual outputs); got {setting!r}",
            where=f"{where}.scale",
        )
    return float(values[0])


def route_from_config(config: MergeConfig) -> list[RoutedLayer]:
    """The route a config describes; the strict inverse of :func:`route_to_config`.

    Anything that :func:`route_to_config` does not write (another method, ``models:`` form, a
    base model, several sources in a slice, other parameters or another form of ``scale``) is
    refused, naming the field, so a worker never evaluates something other than what is exported.
    """
    if config.merge_method != "passthrough":
        raise ConfigError(f"a route is a 'passthrough' merge, not {config.merge_method!r}", where="merge_method")
    if not config.slices:
        raise ConfigError("a route is written in 'slices:' form, one source per slice", where="models")
    if config.base_model is not None:
        raise ConfigError("a route has no base model (it would choose the output's config)", where="base_model")
    if config.parameters:
        raise ConfigError("a route sets parameters per slice source, not at the top level", where="parameters")
    route: list[RoutedLayer] = []
    for i, slice_def in enumerate(config.slices):
        where = f"slices[{i}]"
        if len(slice_def.sources) != 1:
            raise ConfigError(f"a route's slice has one source, got {len(slice_def.sources)}", where=f"{where}.sources")
        if slice_def.base_model is not None:
            raise ConfigError("a route's slice has no base model", where=f"{where}.base_model")
        source = slice_def.sources[0]
        on_slice = _read_scale(slice_def.parameters, f"{where}.parameters")
        on_source = _read_scale(source.parameters, f"{where}.sources[0].parameters")
        if on_slice is not None and on_source is not None:
            raise ConfigError("scale is given on both the slice and its source; keep one", where=f"{where}.parameters.scale")
        scale = on_source if on_source is not None else on_slice if on_slice is not None else 1.0
        start, end = source.layer_range
        route.extend(RoutedLayer(source.model, layer, scale) for layer in range(start, end))
    return route


# --------------------------------------------------------------------------------------------
# The in-memory form: modules that share resident tensors


def module_over_tensors(
    config: PretrainedConfig | str | Path, tensors: Mapping[str, torch.Tensor], *, trust_remote_code: bool = False
) -> nn.Module:
    """A Hugging Face CausalLM whose parameters *are* ``tensors`` (no copy is made).

    The model is built on the meta device (no weight is allocated or initialised) and then given
    the tensors with ``load_state_dict(assign=True)``, so each parameter shares storage with its
    tensor (e.g. ``ResidentModels.tensors[ref]``; a write to one is a write to the other). Buffers
    that checkpoints do not hold (the rotary embedding's ``inv_freq``) are computed the way
    transformers' own loading does. Heads tied to the embeddings are tied again.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, (str, Path)):
        config = AutoConfig.from_pretrained(config, trust_remote_code=trust_remote_code)
    config = copy.deepcopy(config)  # from_config writes the dtype into the config
    floats = [t for t in tensors.values() if t.is_floating_point()]
    if not floats:
        raise ModelError("no floating-point tensors to build a model over")
    dtype, device = floats[0].dtype, floats[0].device
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    result = model.load_state_dict(dict(tensors), strict=False, assign=True)
    if result.unexpected_keys:
        names = ", ".join(result.unexpected_keys[:3])
        raise ModelError(f"tensors the {type(model).__name__} built from this config does not have: {names}")
    model.tie_weights()
    _materialize_buffers(model, device)
    _refuse_meta(model, "a model over resident tensors")
    model.requires_grad_(False)
    model.eval()
    return model


def resident_module(resident: ResidentModels, reference: str, *, trust_remote_code: bool = False) -> nn.Module:
    """A CausalLM over a worker's resident tensors for ``reference`` (no copy), for routing."""
    return module_over_tensors(resident.folders[reference].path, resident.model_tensors(reference),
                               trust_remote_code=trust_remote_code)


def _materialize_buffers(model: nn.Module, device: torch.device) -> None:
    """Compute the buffers left on the meta device, as transformers' loading does.

    They are allocated as NaN and filled by the model's own ``_init_weights``, which knows how to
    recompute the rotary embeddings' frequencies; a buffer it does not fill stays NaN and is
    refused, rather than left as garbage.
    """
    init = getattr(model, "_init_weights", None)
    for module_name, module in model.named_modules():
        meta = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        if not meta:
            continue
        for name in meta:
            old = module._buffers[name]
            if not old.is_floating_point() or init is None:
                raise ModelError(f"buffer {module_name}.{name} is not in the checkpoint and cannot be recomputed")
            module._buffers[name] = torch.full(old.shape, float("nan"), dtype=old.dtype, device=device)
        init(module)
        for name in meta:
            if not bool(torch.isfinite(module._buffers[name]).all()):
                raise ModelError(f"buffer {module_name}.{name} is not in the checkpoint and cannot be recomputed")


def _refuse_meta(model: nn.Module, what: str) -> None:
    left = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    left += [n for n, b in model.named_buffers(remove_duplicate=False) if b.is_meta]
    if left:
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        raise ModelError(f"{what} has tensors without data (on the meta device): {', '.join(left[:3])}{more}")


def _clone(module: nn.Module, keep: frozenset[int] = frozenset()) -> nn.Module:
    """A new module object tree over the same Parameter and buffer objects.

    Every container in the module's ``__dict__`` (parameters, buffers, submodules, hooks) is a
    fresh copy, so replacing a parameter, a submodule or adding a hook on the clone leaves the
    original untouched; the tensors themselves are shared. Submodules whose ``id`` is in ``keep``
    are referenced, not cloned (the caller replaces them).
    """
    clone = module.__class__.__new__(module.__class__)
    clone.__dict__.update(
        {key: value.copy() if isinstance(value, (dict, set, list)) else value for key, value in module.__dict__.items()}
    )
    for name, child in module._modules.items():
        if child is not None and id(child) not in keep:
            clone._modules[name] = _clone(child, keep)
    return clone


def layer_list_path(module: nn.Module) -> str:
    """Where a model keeps its decoder layers, e.g. ``model.layers``: the prefix its tensor names use."""
    prefixes = {parts[0] for name, _ in module.named_parameters() if (parts := split_layer_name(name))}
    if len(prefixes) != 1:
        found = ", ".join(sorted(prefixes)) or "none"
        raise ModelError(f"{type(module).__name__}: expected one list of decoder layers, found {found}")
    path = prefixes.pop()
    if not isinstance(module.get_submodule(path), nn.ModuleList):
        raise ModelError(f"{type(module).__name__}: {path} is not a ModuleList of decoder layers")
    return path


class _Scale:
    """A forward hook that multiplies a module's output by a constant."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output * self.scale

    def __repr__(self) -> str:
        return f"_Scale({self.scale})"


def _routed_layer(layer: nn.Module, position: int, scale: float, where: str) -> nn.Module:
    clone = _clone(layer)
    # the KV cache is indexed by layer_idx: a layer used twice needs two slots
    for sub in clone.modules():
        if "layer_idx" in sub.__dict__:
            sub.layer_idx = position
    if scale != 1:
        outputs = {name: sub for name, sub in clone.named_modules() if name.rsplit(".", 1)[-1] in RESIDUAL_OUTPUTS}
        covered = {f"{name}.{p}" for name, sub in outputs.items() for p, _ in sub.named_parameters()}
        matched = {n for n, _ in clone.named_parameters() if any(proj in n for proj in RESIDUAL_OUTPUTS)}
        if {name.rsplit(".", 1)[-1] for name in outputs} != set(RESIDUAL_OUTPUTS) or not matched <= covered:
            raise ModelError(
                f"{where}: scale needs modules named {' and '.join(RESIDUAL_OUTPUTS)} in the decoder layer "
                f"({type(layer).__name__} has {', '.join(sorted(outputs)) or 'neither'}); this architecture cannot be scaled"
            )
        for sub in outputs.values():
            sub.register_forward_hook(_Scale(float(scale)))
    return clone


def _routed_config(config: PretrainedConfig, route: Sequence[RoutedLayer], modules: Mapping[str, nn.Module]) -> PretrainedConfig:
    routed = copy.deepcopy(config)
    text = routed.get_text_config()
    text.num_hidden_layers = len(route)
    for key in PER_LAYER_CONFIG_KEYS:
        if isinstance(getattr(text, key, None), list):
            setattr(text, key, [getattr(modules[s.model].config.get_text_config(), key)[s.layer] for s in route])
    return routed


def _check_compatible(route: Sequence[RoutedLayer], modules: Mapping[str, nn.Module]) -> None:
    for i, step in enumerate(route):
        if step.model not in modules:
            known = ", ".join(repr(k) for k in modules) or "none"
            raise ModelError(f"route[{i}]: no module for model {step.model!r} (given: {known})")
    used = {step.model: modules[step.model] for step in route}
    kinds = {ref: (type(m).__name__, getattr(m.config.get_text_config(), "hidden_size", None)) for ref, m in used.items()}
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"{ref!r}: {k[0]} (hidden_size {k[1]})" for ref, k in kinds.items())
        raise ModelError(f"a route's models must share one architecture; got {listing}")
    devices = {ref: next(m.parameters()).device for ref, m in used.items()}
    if len(set(devices.values())) > 1:
        raise ModelError("a route's models must be on one device; got " + ", ".join(f"{r!r}: {d}" for r, d in devices.items()))


def build_routed_model(route: Sequence[RoutedLayer], modules: Mapping[str, nn.Module]) -> nn.Module:
    """The routed CausalLM, built from ``modules`` (model reference -> CausalLM) without copying a weight.

    Embeddings, the rotary embedding and everything else that is not a decoder layer come from
    ``route[0].model``'s module, except the tensors mergekit takes from the last slice (the final
    norm and an untied ``lm_head``), which come from ``route[-1].model``'s: that is what the
    exported passthrough config produces. The result's config is a copy with ``num_hidden_layers``
    (and per-layer lists such as ``layer_types``) routed; ``generate()`` and the KV cache work
    even when a layer appears twice. The modules themselves are left unchanged.
    """
    _check_route(route)
    _check_compatible(route, modules)
    first, last = modules[route[0].model], modules[route[-1].model]
    path = layer_list_path(first)
    layer_lists = {ref: modules[ref].get_submodule(path) for ref in {s.model for s in route}}  # one architecture
    for i, step in enumerate(route):
        count = len(layer_lists[step.model])
        if step.layer >= count:
            raise ModelError(f"route[{i}]: layer {step.layer} of {step.model!r}, which has {count} layers")

    routed = _clone(first, keep=frozenset({id(layer_lists[route[0].model])}))
    # the tensors mergekit takes from the last slice: every non-layer tensor that is not an
    # embedding (a tied head is no tensor of its own, so it stays tied to the first model's embeddings)
    for name, tensor in _checkpoint_tensors(last):
        if split_layer_name(name) is None and not any(marker in name for marker in _PRE_MARKERS):
            owner, _, leaf = name.rpartition(".")
            target = routed.get_submodule(owner)
            if leaf in target._parameters:
                target._parameters[leaf] = tensor
            else:
                target._buffers[leaf] = tensor
    layers = nn.ModuleList(
        _routed_layer(layer_lists[step.model][step.layer], position, step.scale, f"route[{position}]")
        for position, step in enumerate(route)
    )
    parent_path, _, leaf = path.rpartition(".")
    routed.get_submodule(parent_path)._modules[leaf] = layers

    config = _routed_config(first.config, route, modules)
    for sub in routed.modules():
        if sub.__dict__.get("config") is first.config:
            sub.config = config
    if getattr(first, "generation_config", None) is not None:
        routed.generation_config = copy.deepcopy(first.generation_config)  # callers may edit it per run
    _refuse_meta(routed, "the routed model")
    return routed


def _checkpoint_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The parameters (each once: a tied head is not listed) and persistent buffers, by name."""
    out: list[tuple[str, torch.Tensor]] = list(module.named_parameters())
    for name, buffer in module.named_buffers():
        owner, _, leaf = name.rpartition(".")
        if leaf not in module.get_submodule(owner)._non_persistent_buffers_set:
            out.append((name, buffer))
    return out
