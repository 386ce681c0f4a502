"""Bad LoRA inputs through the real command line: each refused with the field or file and the fix.

As in ``tests/reliability/test_bad_inputs.py``: exit status 2, one message on stderr naming what
is wrong and how to fix it, no traceback, and nothing written (no output folder, no staging
folder, no run folder). The cases are built first and run in one fresh process by the
reliability corpus's batch runner (the real ``evomerge.cli`` entry point, one call per case).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file, save_file

from ..reliability.conftest import ROOT, cli_env, fingerprint, good_space, write_yaml
from .lora_adapters import edit_config, write_adapter
from .tiny_models import write_tiny_llama

pytest.importorskip("peft")


@dataclass
class Ctx:
    dir: Path
    models: dict[str, Path]
    world: Any

    def adapter(self, name: str = "adapter", base: Path | None = None, **kwargs: Any) -> Path:
        return write_adapter(self.dir / name, base or self.models["base"], **kwargs)

    def merge(self, model: str) -> list[str]:
        """``evomerge merge`` of a task_arithmetic config with ``model`` as a donor."""
        config = {"merge_method": "task_arithmetic", "base_model": str(self.models["base"]),
                  "models": [{"model": model, "parameters": {"weight": 0.5}},
                             {"model": str(self.models["a"]), "parameters": {"weight": 0.5}}]}
        path = self.dir / "merge.yaml"
        path.write_text(yaml.safe_dump(config))
        return ["merge", str(path), str(self.dir / "out")]

    def with_base(self, adapter: Path) -> str:
        return f"{self.models['base']}+{adapter}"


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Ctx], list[str]]
    expect: tuple[str, ...]


def _rewrite_weights(adapter: Path, change: Callable[[dict], dict]) -> Path:
    file = adapter / "adapter_model.safetensors"
    save_file(change(load_file(file)), str(file))
    return adapter


def _cut_rank(tensors: dict) -> dict:
    key = next(k for k in sorted(tensors) if k.endswith("q_proj.lora_A.weight"))
    return {**tensors, key: tensors[key][:-1].contiguous()}


def _rename_module(tensors: dict) -> dict:
    return {k.replace("layers.0.mlp.down_proj", "layers.0.mlp.down_projx"): v for k, v in tensors.items()}


def _other_name(ctx: Ctx) -> list[str]:
    other = write_tiny_llama(ctx.dir / "other-model", seed=0)  # the same weights under another name
    return ctx.merge(f"{other}+{ctx.adapter()}")


def _other_shapes(ctx: Ctx) -> list[str]:
    wide = write_tiny_llama(ctx.dir / "wide" / "base", seed=0, hidden_size=48, intermediate_size=96)
    return ["merge", *ctx.merge(f"{wide}+{ctx.adapter()}")[1:]]


def _space_donor(ctx: Ctx) -> list[str]:
    adapter = ctx.adapter()  # made for the tiny Llama (also a folder named base), given to the toy world's base
    space = good_space(ctx.world, **{"models.donors": [f"{ctx.world.base}+{adapter}",
                                                       str(ctx.world.specialists["reverse"])]})
    return ["search", str(write_yaml(ctx.dir / "space.yaml", space)), "--runs-dir", str(ctx.dir / "runs")]


CASES = [
    Case("base-name", _other_name,
         ("adapter_config.json: base_model_name_or_path is", "give that base before the '+'")),
    Case("base-shapes", _other_shapes,
         ("adapter_model.safetensors: model.layers.0.mlp.down_proj: lora_B [32, 4] x lora_A [4, 64] gives a [32, 64] "
          "update, but the base's model.layers.0.mlp.down_proj.weight is [48, 96]", "made for another model")),
    Case("rank-a-b", lambda c: c.merge(c.with_base(_rewrite_weights(c.adapter(), _cut_rank))),
         ("adapter_model.safetensors: model.layers.0.self_attn.q_proj: lora_A has rank 3 but lora_B has rank 4",
          "save it again")),
    Case("rank-config", lambda c: c.merge(c.with_base(edit_config(c.adapter(), r=8))),
         ("adapter_config.json: r (with rank_pattern) is 8", "set r/rank_pattern to the rank")),
    Case("pickled-adapter", lambda c: c.merge(c.with_base(c.adapter(safe=False))),
         ("the adapter's weights are pickled (adapter_model.bin)", "safe_serialization=True")),
    Case("unknown-target-module", lambda c: c.merge(c.with_base(edit_config(c.adapter(), target_modules=["q_proj", "qkv_proj"]))),
         ("adapter_config.json: target_modules names 'qkv_proj', which is no module of the base",)),
    Case("factor-for-missing-module", lambda c: c.merge(c.with_base(_rewrite_weights(c.adapter(), _rename_module))),
         ("adapts module 'model.layers.0.mlp.down_projx', which the base", "made for another model")),
    Case("dora", lambda c: c.merge(c.with_base(edit_config(c.adapter(), use_dora=True))),
         ("adapter_config.json: use_dora is set", "merge_and_unload")),
    Case("two-adapters", lambda c: c.merge(f"{c.with_base(c.adapter())}+{c.adapter('second')}"),
         ("merge.yaml: invalid merge config", "models[0].model: model reference", "(base+adapter)")),
    Case("adapter-without-base", lambda c: c.merge(str(c.adapter())),
         ("is a LoRA adapter, not a model", "BASE+")),
    Case("space-donor-other-base", _space_donor,
         ("space.yaml: models.donors[0]", "update, but the base's model.layers.0.mlp.down_proj.weight is [128, 256]",
          "made for another model")),
]


@pytest.fixture(scope="module")
def outcomes(tiny_models, toy_world, tmp_path_factory) -> dict[str, tuple[Ctx, Any, Any]]:
    prepared = []
    for case in CASES:
        ctx = Ctx(tmp_path_factory.mktemp(case.id), tiny_models, toy_world)
        args = case.setup(ctx)
        prepared.append((case, ctx, args, fingerprint(ctx.dir)))
    batch = tmp_path_factory.mktemp("batch")
    (batch / "cases.json").write_text(json.dumps([{"id": c.id, "args": a, "cwd": str(x.dir)} for c, x, a, _ in prepared]))
    done = subprocess.run([sys.executable, "-m", "tests.reliability.cli_batch", str(batch / "cases.json"),
                           str(batch / "results.json")], check=False, cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((batch / "results.json").read_text())
    return {case.id: (ctx, before, SimpleNamespace(**results[case.id])) for case, ctx, _, before in prepared}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_lora_input_is_refused_cleanly(case: Case, outcomes) -> None:
    ctx, before, result = outcomes[case.id]
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert result.stderr.lstrip().startswith("error: "), result.stderr
    for text in case.expect:
        assert text in result.stderr, f"{text!r} not in {result.stderr!r}"
    assert fingerprint(ctx.dir) == before, "a refused command wrote or changed files"
