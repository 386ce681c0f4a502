"""A Hugging Face model folder as the merge engine sees it: a config and named tensors.

Weights are read from safetensors only. Pickled ``.bin`` checkpoints are refused unless the user
opts in, and even then they are read with ``torch.load(weights_only=True)``, which restores
tensors but runs no code from the file.

A reference ``base+adapter`` (mergekit's form) is the base folder with a PEFT LoRA adapter merged
in: its config, names, shapes and dtypes are the base's, and :meth:`ModelFolder.read` returns the
merged tensors (see :mod:`evomerge.merge.lora`), so every consumer of a folder takes adapters
without knowing about them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
else:
    from evomerge.lazy_torch import torch  # imported on first use: see evomerge.lazy_torch

from ..errors import ModelError
from .lora import LoraAdapter
from .references import HUB_ID_RE, split_reference
from .safetensors_io import BufferPool, TensorInfo, code_of, read_header, read_tensor

# "<prefix>.<index>.<rest>" where prefix is the decoder's layer container, e.g. "model.layers".
_LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|block|layer))\.(?P<index>\d+)\.(?P<rest>.+)$")
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_TIED_ALIASES = {"lm_head.weight": "model.embed_tokens.weight"}


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """``model.layers.3.mlp.up_proj.weight`` -> (``model.layers``, 3, ``mlp.up_proj.weight``)."""
    m = _LAYER_RE.match(name)
    if m is None:
        return None
    return m["prefix"], int(m["index"]), m["rest"]


def resolve_model_path(reference: str) -> Path:
    """A local folder as given, or a Hub id (``org/name[@revision]``) fetched with huggingface_hub."""
    path = Path(reference).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"model {reference!r} is a file; give the model's folder")
        return path
    if not HUB_ID_RE.match(reference) or reference.startswith((".", "/")):
        raise ModelError(f"model folder not found: {reference!r}; check the path (relative paths start from {Path.cwd()})")
    repo, _, revision = reference.partition("@")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo, revision=revision or None, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
        )
    except Exception as err:  # offline, unknown repo, gated: all user-fixable
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ModelError(
            f"model {reference!r} is neither a local folder (there is no {Path.cwd() / path}; relative paths start "
            f"from the folder evomerge is run in) nor a model the Hugging Face Hub could give "
            f"({type(err).__name__}: {reason[:200]}); give the folder's path from here or an absolute one, or check the "
            "Hub id and your network"
        ) from None
    return Path(local)


@dataclass
class ModelFolder:
    """One input model: its config and a lazy index of its tensors (with its LoRA adapter, if any)."""

    reference: str
    allow_pickle: bool = False
    path: Path = field(init=False)
    #: the adapter of a ``base+adapter`` reference (``path`` is then the base's folder)
    adapter: LoraAdapter | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        base_reference, adapter_reference = split_reference(self.reference)
        self.path = resolve_model_path(base_reference)
        if not (self.path / "config.json").is_file():
            if (self.path / "adapter_config.json").is_file():
                raise ModelError(
                    f"{self.path}: is a LoRA adapter, not a model; name it after its base model, as mergekit does: "
                    f"BASE+{base_reference}"
                )
            raise ModelError(f"{self.path}: no config.json; is this a Hugging Face model folder?")
        if adapter_reference is not None:
            self.adapter = LoraAdapter(adapter_reference, self, base_reference=base_reference)

    @cached_property
    def config(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "config.json").read_text())
        except ValueError as err:
            raise ModelError(f"{self.path / 'config.json'}: not valid JSON ({err})") from None

    @cached_property
    def num_layers(self) -> int:
        cfg = self.config.get("text_config", self.config)
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(cfg.get(key), int):
                return cfg[key]
        raise ModelError(f"{self.path / 'config.json'}: no num_hidden_layers; evomerge cannot tell how many layers it has")

    @cached_property
    def _index(self) -> dict[str, TensorInfo]:
        index_file = self.path / "model.safetensors.index.json"
        files: list[Path]
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (ValueError, KeyError):
                raise ModelError(f"{index_file}: not a valid safetensors index (no weight_map)") from None
            files = sorted({self.path / f for f in weight_map.values()})
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise ModelError(f"{index_file} lists {missing[0].name}, which is missing; re-download the model")
        else:
            files = sorted(self.path.glob("*.safetensors"))
        if not files:
            return {}
        out: dict[str, TensorInfo] = {}
        for f in files:
            out.update(read_header(f))
        return out

    @cached_property
    def _pickled(self) -> dict[str, torch.Tensor]:
        bins = sorted(self.path.glob("pytorch_model*.bin")) or sorted(self.path.glob("*.bin"))
        if not bins:
            return {}
        if not self.allow_pickle:
            raise ModelError(
                f"{self.path}: weights are pickled .bin files ({bins[0].name}); evomerge reads safetensors only. "
                "Convert them to safetensors, or pass --allow-pickle to load tensors only (no code is run)"
            )
        tensors: dict[str, torch.Tensor] = {}
        for b in bins:
            try:
                tensors.update(_load_tensors_only(b))
            except Exception as err:
                # torch's own message suggests weights_only=False; evomerge never does that
                detail = next((line.strip() for line in str(err).splitlines() if "WeightsUnpickler error" in line),
                              str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
                raise ModelError(
                    f"{b}: cannot be read as a tensors-only checkpoint and was refused ({detail}); convert it to "
                    "safetensors with a tool you trust"
                ) from None
        return tensors

    @cached_property
    def tensor_names(self) -> list[str]:
        names = list(self._index) or list(self._pickled)
        if not names:
            raise ModelError(f"{self.path}: no weights found (no *.safetensors files)")
        return names

    def _resolve(self, name: str) -> str | None:
        if name in self._index or name in self._pickled:
            return name
        alias = _TIED_ALIASES.get(name)
        if alias and (alias in self._index or alias in self._pickled):
            return alias
        return None

    def has(self, name: str) -> bool:
        self.tensor_names  # noqa: B018  (raises a clear error for a folder without weights)
        return self._resolve(name) is not None

    def shape(self, name: str) -> tuple[int, ...]:
        real = self._require(name)
        if real in self._index:
            return self._index[real].shape
        return tuple(self._pickled[real].shape)

    def dtype(self, name: str) -> torch.dtype:
        real = self._require(name)
        if real in self._index:
            return self._index[real].dtype
        return self._pickled[real].dtype

    def dtype_code(self, name: str) -> str:
        """:meth:`dtype` as a safetensors code, read from the header without importing torch."""
        real = self._require(name)
        if real in self._index:
            return self._index[real].code
        return code_of(self._pickled[real].dtype)

    def tensor_info(self, name: str) -> TensorInfo | None:
        """Where ``name`` lives in its safetensors file, as stored, without any adapter (None for a
        pickled checkpoint's tensor)."""
        return self._index.get(self._require(name))

    def stored(self, name: str) -> TensorInfo | None:
        """Where tensor ``name``, as this reference means it, lies in a safetensors file: lets a
        merge that copies it unchanged copy its bytes file to file. None for pickled weights, and
        for a tensor an adapter changes (its stored bytes are not the tensor this reference means)."""
        if self.adapter is not None and self.adapter.changes(self._require(name)):
            return None
        return self.tensor_info(name)

    def read(self, name: str, pool: BufferPool | None = None) -> torch.Tensor:
        """Tensor ``name`` in memory of its own (its buffer from ``pool`` when given), with the
        adapter merged in for a ``base+adapter`` reference."""
        tensor = self.read_base(name, pool)
        if self.adapter is not None:
            real = self._require(name)
            if self.adapter.changes(real):
                tensor = self.adapter.apply(real, tensor)
        return tensor

    def read_base(self, name: str, pool: BufferPool | None = None) -> torch.Tensor:
        """Tensor ``name`` as the folder stores it (without any adapter)."""
        real = self._require(name)
        if real in self._index:
            return read_tensor(self._index[real], pool)
        return self._pickled[real].clone()

    def resolve(self, name: str) -> str:
        """The stored tensor ``name`` refers to (``lm_head.weight`` may be the tied embeddings)."""
        return self._require(name)

    def _require(self, name: str) -> str:
        self.tensor_names  # noqa: B018
        real = self._resolve(name)
        if real is None:
            raise ModelError(f"{self.path}: has no tensor {name!r}; are all models of the same architecture?")
        return real


def _load_tensors_only(path: Path) -> dict[str, torch.Tensor]:
    """A pickled checkpoint's tensors; ``weights_only`` refuses anything else, running no code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # the legacy format cannot be mapped
