"""PEFT LoRA adapters as merge inputs: mergekit's ``model+lora`` references.

mergekit 0.1.5 reads ``base+adapter`` by loading the base with transformers in its stored dtype,
loading the adapter with PEFT and calling ``merge_and_unload()``; the merged weights are what its
merge then reads. PEFT's merge, per adapted module, is

    W' = W + transpose(B @ A) * scale      (in place on W, so rounded once to W's dtype; for
                                            embeddings the delta is rounded to W's dtype first)

with A and B in float32 (PEFT up-casts float16/bfloat16 adapter weights on load; float64 bases
keep float64), ``scale = alpha / r`` or ``alpha / sqrt(r)`` with ``use_rslora``, ``r`` and
``alpha`` taken from ``rank_pattern``/``alpha_pattern`` by PEFT's own suffix match, and the
transpose for embeddings (``lora_embedding_A/B``) and for GPT-2's ``Conv1D`` layers (PEFT forces
``fan_in_fan_out`` to match the layer type, whatever the config says). Full tensors saved with
the adapter (``modules_to_save``, embeddings saved with ``save_embedding_layers``, trained
biases) replace the base's before the delta is added, as PEFT's loading does.

This module reproduces that per tensor, with no model built: :meth:`LoraAdapter.apply` turns a
base tensor into the merged one. Search workers keep only the factors (a fraction of a full
model) and form each delta when a candidate is merged. What PEFT can do that this cannot
(DoRA, bias on the B factor, other variants) is refused by its config field, with the fix:
merge the adapter with PEFT and give the merged folder.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
else:
    from evomerge.lazy_torch import torch  # imported on first use: see evomerge.lazy_torch

from ..errors import ModelError
from .safetensors_io import TensorInfo, read_header, read_tensor

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_FACTOR_RE = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")
_EMBEDDING_FACTOR_RE = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)$")
#: model types whose projections are transformers' ``Conv1D`` (weights stored as (in, out)), for
#: which PEFT always merges ``(B @ A).T``
_CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
#: adapter_config fields naming PEFT features whose merge is not ``W + B·A·scale``
_UNSUPPORTED_FEATURES = {
    "use_dora": "DoRA rescales each merged column by a learned magnitude",
    "lora_bias": "a bias on the B factor changes the layer's bias",
    "use_qalora": "QA-LoRA pools the input before A",
    "use_bdlora": "BD-LoRA factors are block-diagonal",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "arrow_config": "Arrow routes between several adapters",
    "kasa_config": "KaSA adds a singular-value term",
    "monteclora_config": "MonteCLoRA samples its factors",
    "velora_config": "VeLoRA changes the adapter's forward pass",
    "layer_replication": "layer replication changes the model's layers",
    "trainable_token_indices": "trainable tokens store sparse embedding rows",
    "target_parameters": "LoRA on bare parameters (MoE experts) has no module weight to add to",
    "megatron_config": "Megatron-parallel layers are sharded",
}
#: ``init_lora_weights`` values that change the base's weights when the adapter is created: an
#: adapter saved from them (without PEFT's conversion) does not apply to the original base
_BASE_CHANGING_INITS = ("pissa", "olora", "corda")


class BaseTensors(Protocol):
    """What an adapter is checked against: the base model's folder (``ModelFolder``)."""

    path: Path

    @property
    def config(self) -> dict[str, Any]: ...

    @property
    def tensor_names(self) -> list[str]: ...

    def has(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class LoraFactors:
    """One adapted tensor's factors, where they are stored, and how they combine."""

    a: TensorInfo  # (r, in); for embeddings (r, num_embeddings)
    b: TensorInfo  # (out, r); for embeddings (embedding_dim, r)
    scale: float
    transpose: bool  # embeddings and Conv1D: the delta is (B @ A).T
    embedding: bool  # PEFT rounds an embedding's delta to the weight's dtype before adding it


def lora_delta(a: torch.Tensor, b: torch.Tensor, factors: LoraFactors, dtype: torch.dtype) -> torch.Tensor:
    """``transpose(B @ A) * scale`` in ``dtype``, with PEFT's op order (so float32 agrees bit for bit)."""
    product = b.to(dtype) @ a.to(dtype)
    if factors.transpose:
        product = product.T
    return product * factors.scale


def compute_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype PEFT merges in: float32, or float64 for a float64 base."""
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def add_delta(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``weight + delta`` rounded once to the weight's dtype, as PEFT's in-place ``W += delta``.

    ``delta`` (a fresh tensor) takes the sum in place: one widened copy of the weight fewer, and
    the same value, since a sum of two floats rounds the same in either order.
    """
    if delta.dtype == weight.dtype:
        return weight + delta
    return delta.add_(weight).to(weight.dtype)


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern key that matches the end of the module name."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return pattern[key]
    return default


class LoraAdapter:
    """A PEFT LoRA adapter folder, validated against the base it is applied to."""

    def __init__(self, reference: str, base: BaseTensors, *, base_reference: str) -> None:
        from .model_folder import resolve_model_path

        self.reference = reference
        self.base_reference = base_reference  # as the user named the base, for messages
        self.path = resolve_model_path(reference)
        self.config = self._read_config()
        self._check_features()
        self._check_base_name(base)
        self.factors, self.replacements = self._index(base)

    # -- reading and validating ------------------------------------------------------------

    def _read_config(self) -> dict[str, Any]:
        path = self.path / ADAPTER_CONFIG
        if not path.is_file():
            raise ModelError(
                f"{self.path}: no {ADAPTER_CONFIG}; the part after '+' in a model reference must be a PEFT "
                "LoRA adapter folder (adapter_config.json and adapter_model.safetensors)"
            )
        try:
            config = json.loads(path.read_text())
        except ValueError as err:
            raise ModelError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(config, dict):
            raise ModelError(f"{path}: expected a JSON object")
        if config.get("peft_type", "LORA") != "LORA":
            raise ModelError(
                f"{path}: peft_type is {config.get('peft_type')!r}; evomerge applies LoRA adapters only. Merge this "
                "adapter with PEFT (merge_and_unload) and give the merged model folder"
            )
        return config

    def _check_features(self) -> None:
        where = self.path / ADAPTER_CONFIG
        for key, why in _UNSUPPORTED_FEATURES.items():
            if self.config.get(key):
                raise ModelError(
                    f"{where}: {key} is set; evomerge does not apply such adapters ({why}). Merge it with PEFT "
                    "(merge_and_unload) and give the merged model folder instead"
                )
        init = self.config.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            raise ModelError(
                f"{where}: init_lora_weights is {init!r}, which changed the base's weights when the adapter was "
                "made; save the adapter with PEFT's path_initial_model_for_weight_conversion (a plain LoRA), or "
                "give the merged model folder"
            )

    def _check_base_name(self, base: BaseTensors) -> None:
        """Refuse an adapter whose recorded base is, by name, another model.

        Names are compared loosely (the same folder, or the same last path component, or the
        name the base's own config records), since a local copy of a Hub model keeps the Hub
        name as its folder name more often than not; shapes are checked exactly later.
        """
        recorded = self.config.get("base_model_name_or_path")
        if not recorded or not isinstance(recorded, str):
            return
        given = self.base_reference

        def stem(text: str) -> str:
            return text.split("@", 1)[0].rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()

        candidates = {stem(given), stem(str(base.path))}
        own_name = base.config.get("_name_or_path")
        if isinstance(own_name, str) and own_name:
            candidates.add(stem(own_name))
        same_folder = Path(recorded).expanduser().is_dir() and Path(recorded).expanduser().resolve() == base.path.resolve()
        if same_folder or stem(recorded) in candidates:
            return
        raise ModelError(
            f"{self.path / ADAPTER_CONFIG}: base_model_name_or_path is {recorded!r}, but the adapter is applied to "
            f"{given!r}; give that base before the '+' (base+adapter), or, if {given!r} is a copy of it under "
            f"another name, set base_model_name_or_path to {given!r} in adapter_config.json"
        )

    def _weights(self) -> dict[str, TensorInfo]:
        file = self.path / ADAPTER_WEIGHTS
        if not file.is_file():
            pickled = sorted(self.path.glob("adapter_model*.bin")) or sorted(self.path.glob("*.bin"))
            if pickled:
                raise ModelError(
                    f"{self.path}: the adapter's weights are pickled ({pickled[0].name}); evomerge reads safetensors "
                    "only. Convert them: load the adapter with PEFT and save_pretrained(..., safe_serialization=True)"
                )
            raise ModelError(f"{self.path}: no {ADAPTER_WEIGHTS}; is this a PEFT adapter folder?")
        return read_header(file)

    def _index(self, base: BaseTensors) -> tuple[dict[str, LoraFactors], dict[str, TensorInfo]]:
        """Map every saved tensor to the base tensor it changes, checking names, ranks and shapes."""
        weights = self._weights()
        file = self.path / ADAPTER_WEIGHTS
        pairs: dict[str, dict[str, TensorInfo]] = {}
        embedding_modules: set[str] = set()
        replacements: dict[str, TensorInfo] = {}
        for key, info in weights.items():
            name = key.removeprefix(_PEFT_PREFIX)
            match = _FACTOR_RE.match(name) or _EMBEDDING_FACTOR_RE.match(name)
            if match is not None:
                kind = match["kind"].removeprefix("lora_").removeprefix("embedding_")
                pairs.setdefault(match["module"], {})[kind] = info
                if match["kind"].startswith("lora_embedding"):
                    embedding_modules.add(match["module"])
                continue
            if ".lora_" in name:
                raise ModelError(f"{file}: tensor {key!r} is not a LoRA factor evomerge knows (lora_A/lora_B)")
            target = name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")
            if not base.has(target):
                raise ModelError(
                    f"{file}: saves a full tensor for {target!r}, which the base {self.base_reference!r} does not have; "
                    "the adapter was made for another model"
                )
            if tuple(info.shape) != tuple(base.shape(target)):
                raise ModelError(
                    f"{file}: {key!r} has shape {list(info.shape)} but the base's {target} is "
                    f"{list(base.shape(target))}; the adapter was made for another model"
                )
            replacements[target] = info

        modules = sorted(pairs)
        self._check_target_modules(base, modules)
        transposed_layers = base.config.get("model_type") in _CONV1D_MODEL_TYPES
        factors: dict[str, LoraFactors] = {}
        for module in modules:
            found = pairs[module]
            missing = {"A", "B"} - set(found)
            if missing:
                raise ModelError(
                    f"{file}: {module} has a lora_{'/'.join(sorted(set(found)))} factor but no lora_{missing.pop()}; "
                    "the adapter file is incomplete, save it again"
                )
            target = f"{module}.weight"
            if not base.has(target):
                raise ModelError(
                    f"{file}: adapts module {module!r}, which the base {self.base_reference!r} does not have (no tensor "
                    f"{target}); the adapter was made for another model, or its target_modules name modules this "
                    "architecture lacks"
                )
            factors[target] = self._factors(module, found["A"], found["B"], tuple(base.shape(target)),
                                             embedding=module in embedding_modules,
                                             transposed_layer=transposed_layers)
        return factors, replacements

    def _check_target_modules(self, base: BaseTensors, adapted: list[str]) -> None:
        """Each listed ``target_modules`` entry must name a module of the base, as PEFT requires."""
        listed = self.config.get("target_modules")
        if not isinstance(listed, list):
            return  # a regex string or "all-linear": the saved factors say what it matched
        module_names = {n.rsplit(".", 1)[0] for n in base.tensor_names if "." in n}
        for entry in listed:
            if not any(m == entry or m.endswith(f".{entry}") for m in module_names):
                raise ModelError(
                    f"{self.path / ADAPTER_CONFIG}: target_modules names {entry!r}, which is no module of the base "
                    f"{self.base_reference!r}; the adapter was made for another architecture (adapted here: "
                    f"{', '.join(sorted({m.rsplit('.', 1)[-1] for m in adapted})[:8]) or 'nothing'})"
                )

    def _factors(
        self, module: str, a: TensorInfo, b: TensorInfo, target_shape: tuple[int, ...], *,
        embedding: bool, transposed_layer: bool,
    ) -> LoraFactors:
        file = self.path / ADAPTER_WEIGHTS
        where = self.path / ADAPTER_CONFIG
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise ModelError(f"{file}: {module}'s factors are not matrices (A {list(a.shape)}, B {list(b.shape)})")
        r = int(_pattern_value(self.config.get("rank_pattern") or {}, module, self.config.get("r", 8)))
        alpha = float(_pattern_value(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", 8)))
        if a.shape[0] != b.shape[1]:
            raise ModelError(
                f"{file}: {module}: lora_A has rank {a.shape[0]} but lora_B has rank {b.shape[1]}; the adapter file "
                "is inconsistent, save it again"
            )
        if a.shape[0] != r:
            raise ModelError(
                f"{where}: r (with rank_pattern) is {r} for {module}, but its saved factors have rank {a.shape[0]}; "
                "set r/rank_pattern to the rank the adapter was trained with"
            )
        transpose = embedding or transposed_layer
        delta_shape = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
        if delta_shape != target_shape:
            raise ModelError(
                f"{file}: {module}: lora_B {list(b.shape)} x lora_A {list(a.shape)} gives a {list(delta_shape)} "
                f"update, but the base's {module}.weight is {list(target_shape)}; the adapter was made for another "
                "model"
            )
        if r <= 0:
            raise ModelError(f"{where}: r must be positive, got {r}")
        scale = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r
        return LoraFactors(a=a, b=b, scale=scale, transpose=transpose, embedding=embedding)

    # -- applying ------------------------------------------------------------------------------

    def changes(self, name: str) -> bool:
        return name in self.factors or name in self.replacements

    def read_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.factors[name]
        return read_tensor(f.a), read_tensor(f.b)

    def read_replacement(self, name: str) -> torch.Tensor:
        return read_tensor(self.replacements[name])

    def apply(
        self,
        name: str,
        weight: torch.Tensor,
        *,
        factors: tuple[torch.Tensor, torch.Tensor] | None = None,
        replacement: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The merged tensor ``name`` from the base's ``weight`` (in the base's stored dtype).

        ``factors`` and ``replacement`` are the adapter's tensors when the caller keeps them
        resident (search workers); otherwise they are read from the adapter file.
        """
        if name in self.replacements:
            source = replacement if replacement is not None else self.read_replacement(name)
            weight = source.to(device=weight.device, dtype=weight.dtype)
        if name in self.factors:
            a, b = factors if factors is not None else self.read_factors(name)
            spec = self.factors[name]
            delta = lora_delta(a.to(weight.device), b.to(weight.device), spec, compute_dtype(weight.dtype))
            weight = add_delta(weight, delta.to(weight.dtype) if spec.embedding else delta)
        return weight
