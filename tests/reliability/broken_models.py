"""Broken model folders, built in a temp folder from a toy-world model (never written in place).

Each builder takes a good folder and returns a new folder with one thing wrong, as users meet it:
a fine-tune of another architecture, size or vocabulary; weights missing, cut short or pickled;
a config that needs code shipped with the model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MARKER_MODULE = "evotoy_remote"


def copy_model(good: Path, dest: Path) -> Path:
    """A copy of ``good`` at ``dest`` (the toy world itself is shared and read-only to tests)."""
    shutil.copytree(good, dest)
    return dest


def _rewrite(folder: Path, tensors: dict[str, torch.Tensor], **config_changes: object) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def other_vocabulary(good: Path, dest: Path) -> Path:
    """Same architecture, 8 more tokens: embeddings and head have other shapes."""
    folder = copy_model(good, dest)
    sd = load_file(str(folder / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[name] = torch.cat([sd[name], torch.zeros(8, sd[name].shape[1])])
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"] + 8
    return _rewrite(folder, sd, vocab_size=vocab)


def other_hidden_size(good: Path, dest: Path) -> Path:
    """A Llama of the same layer count and vocabulary but half the hidden size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((good / "config.json").read_text())
    small = LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"] // 2, intermediate_size=cfg["intermediate_size"] // 2,
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=cfg["max_position_embeddings"], tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(small).save_pretrained(dest)
    return dest


def other_layer_count(good: Path, dest: Path) -> Path:
    """The same model with its last layer cut off."""
    folder = copy_model(good, dest)
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    sd = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if f".layers.{layers - 1}." not in k}
    return _rewrite(folder, sd, num_hidden_layers=layers - 1)


def other_architecture(good: Path, dest: Path) -> Path:
    """A tiny GPT-2 with the same layer count and vocabulary: other tensor names altogether."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = json.loads((good / "config.json").read_text())
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=cfg["vocab_size"], n_positions=64, n_embd=64, n_layer=cfg["num_hidden_layers"],
                               n_head=2)).save_pretrained(dest)
    return dest


def no_weights(good: Path, dest: Path) -> Path:
    """config.json and tokenizer, but no weights file at all."""
    folder = copy_model(good, dest)
    (folder / "model.safetensors").unlink()
    return folder


def no_tokenizer(good: Path, dest: Path) -> Path:
    """Weights and config, but none of the tokenizer files."""
    folder = copy_model(good, dest)
    for f in folder.glob("tokenizer*"):
        f.unlink()
    return folder


def no_config(good: Path, dest: Path) -> Path:
    folder = copy_model(good, dest)
    (folder / "config.json").unlink()
    return folder


def bad_config_json(good: Path, dest: Path) -> Path:
    folder = copy_model(good, dest)
    (folder / "config.json").write_text('{"model_type": "llama", ')
    return folder


def truncated_data(good: Path, dest: Path) -> Path:
    """A download cut short: the header is whole, the tensor data ends early."""
    folder = copy_model(good, dest)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return folder


def truncated_header(good: Path, dest: Path) -> Path:
    """A download cut short inside the JSON header."""
    folder = copy_model(good, dest)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    return folder


def missing_shard(good: Path, dest: Path) -> Path:
    """A sharded checkpoint whose index names a shard that is not there."""
    folder = copy_model(good, dest)
    sd = load_file(str(folder / "model.safetensors"))
    names = sorted(sd)
    half = len(names) // 2
    save_file({k: sd[k] for k in names[:half]}, str(folder / "model-00001-of-00002.safetensors"))
    (folder / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: ("model-00001-of-00002.safetensors" if i < half else
                                                   "model-00002-of-00002.safetensors") for i, k in enumerate(names)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


class _Payload:
    """Unpickling this creates ``path``: proof that a pickle was loaded, without running a shell."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickled_weights(good: Path, dest: Path, marker: Path) -> Path:
    """Weights only as ``pytorch_model.bin``, a pickle that creates ``marker`` if ever loaded."""
    folder = no_weights(good, dest)
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, folder / "pytorch_model.bin")  # as HF saves .bin
    return folder


REMOTE_CODE = '''
from pathlib import Path
Path({marker!r}).write_text("remote code ran")
from transformers import LlamaConfig, LlamaForCausalLM

class RemoteConfig(LlamaConfig):
    model_type = "{model_type}"

class RemoteModel(LlamaForCausalLM):
    config_class = RemoteConfig
'''


def remote_code(good: Path, dest: Path, marker: Path, *, model_type: str = MARKER_MODULE) -> Path:
    """A model whose config.json points at code in the folder (``auto_map``); importing that code
    creates ``marker``. With ``model_type: llama`` transformers can build it without the code."""
    folder = copy_model(good, dest)
    (folder / f"{MARKER_MODULE}.py").write_text(REMOTE_CODE.format(marker=str(marker), model_type=model_type))
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": f"{MARKER_MODULE}.RemoteConfig",
                          "AutoModelForCausalLM": f"{MARKER_MODULE}.RemoteModel"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
