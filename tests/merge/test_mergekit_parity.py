"""Parity with mergekit itself: the same config through mergekit and through evomerge.

Deterministic methods must agree bit for bit, for inputs stored in float32, bfloat16 and float16
and merge dtypes float32 and bfloat16: bfloat16 and float16 checkpoints are what users merge, and
their task vectors tie at TIES and breadcrumbs thresholds, where which tied entries survive must
follow mergekit. (Bit for bit on the same torch build and CPU: mergekit's tie order is its
unstable sort's, which differs between CPU instruction sets.) The random sparsifiers cannot agree
bit for bit (mergekit draws from the global torch RNG in its own order), so for them the test compares
distributions: the kept fraction of each task vector, the rescale of kept entries, and the mean
and variance of the merged deltas, with bounds stated next to each check.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.merge.run import merge_from_config

from .test_merge_command import load_folder

pytest.importorskip("mergekit")


def mergekit_merge(config: dict, out: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """mergekit's own merge, in-process through its Python entry point (no 10 s CLI start-up)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(config), str(out), MergeOptions(random_seed=seed, copy_tokenizer=False, quiet=True))
    return load_folder(out)


def evomerge_merge(config: dict, out: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    merge_from_config({**config, "random_seed": seed}, out)
    return load_folder(out)


def _models(m):
    return str(m["base"]), str(m["a"]), str(m["b"]), str(m["c"])


def deterministic_configs(models) -> dict[str, dict]:
    base, a, b, c = _models(models)

    def donors(*params_list):
        return [{"model": m, "parameters": p} for m, p in zip((a, b, c), params_list)]

    mixed = [{"filter": "self_attn", "value": [0.9, 0.1]}, {"filter": "mlp", "value": 0.4}, {"value": [0.2, 0.5, 0.7]}]
    return {
        "linear": {"merge_method": "linear", "models": donors({"weight": 0.5}, {"weight": [0.1, 0.9]}, {"weight": mixed})},
        "linear_unnormalized": {"merge_method": "linear", "models": donors({"weight": 0.5}, {"weight": 0.3}), "parameters": {"normalize": False}},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base,
                            "models": donors({"weight": 0.8}, {"weight": mixed}, {"weight": -0.3}), "parameters": {"lambda": 0.9}},
        "ties": {"merge_method": "ties", "base_model": base,
                 "models": donors({"weight": 0.7, "density": 0.5}, {"weight": [0.2, 1.0], "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.8}]},
                                  {"weight": 0.4, "density": 1.0})},
        "ties_unnormalized": {"merge_method": "ties", "base_model": base, "parameters": {"normalize": False, "lambda": 1.3},
                              "models": donors({"weight": 1.0, "density": 0.4}, {"weight": 1.0, "density": 0.6})},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": base, "parameters": {"gamma": 0.05},
                        "models": donors({"weight": 0.6, "density": 0.7}, {"weight": 0.5, "density": 0.9})},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": base, "parameters": {"gamma": 0.02},
                             "models": donors({"weight": 0.6, "density": 0.7}, {"weight": 0.5, "density": 0.8})},
        "slerp": {"merge_method": "slerp", "base_model": base, "parameters": {"t": [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.3}]},
                  "slices": [{"sources": [{"model": base, "layer_range": [0, 4]}, {"model": a, "layer_range": [0, 4]}]}]},
        "model_stock": {"merge_method": "model_stock", "base_model": base, "models": donors({}, {}, {})},
        "passthrough": {"merge_method": "passthrough",
                        "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]},
                                   {"sources": [{"model": b, "layer_range": [1, 4]}], "parameters": {"scale": [{"filter": "down_proj", "value": 0.7}, {"value": 1.0}]}},
                                   {"sources": [{"model": c, "layer_range": [3, 4]}]}]},
        # dare and della with their random part off (density 1): plain task vectors, rescale on
        "dare_ties_dense": {"merge_method": "dare_ties", "base_model": base,
                            "models": donors({"weight": 0.6, "density": 1.0}, {"weight": [0.3, 0.9], "density": 1.0})},
        "della_dense": {"merge_method": "della", "base_model": base, "parameters": {"epsilon": 0.1},
                        "models": donors({"weight": 0.6, "density": 1.0}, {"weight": 0.4, "density": 1.0}, {"weight": 0.5, "density": 1.0})},
        "ties_slices": {"merge_method": "ties", "base_model": base,
                        "slices": [{"sources": [{"model": base, "layer_range": [0, 2]}, {"model": a, "layer_range": [0, 2], "parameters": {"weight": 0.9, "density": 0.5}},
                                                {"model": b, "layer_range": [2, 4], "parameters": {"weight": 0.4, "density": 0.7}}]},
                                   {"sources": [{"model": base, "layer_range": [2, 4]}, {"model": c, "layer_range": [2, 4], "parameters": {"weight": [0.3, 0.8], "density": 0.6}}]}]},
        "bfloat16": {"merge_method": "task_arithmetic", "base_model": base, "dtype": "bfloat16",
                     "models": donors({"weight": 0.7}, {"weight": 0.5})},
        "bfloat16_linear": {"merge_method": "linear", "dtype": "bfloat16", "models": donors({"weight": 0.7}, {"weight": 0.5})},
        "out_dtype": {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32", "out_dtype": "float16",
                      "models": donors({"weight": 0.7}, {"weight": 0.5})},
        "ties_out_dtype": {"merge_method": "ties", "base_model": base, "dtype": "float32", "out_dtype": "bfloat16",
                           "models": donors({"weight": 0.7, "density": 0.4}, {"weight": 0.5, "density": 0.6})},
    }


#: Configs that set their own dtypes; the others are run at each merge dtype below.
OWN_DTYPES = ("bfloat16", "bfloat16_linear", "out_dtype", "ties_out_dtype")


def parity_cases() -> list[tuple[str, str, str | None]]:
    """(stored dtype, config name, merge dtype or None for the config's own): every config on
    models stored in each dtype, at merge dtypes float32 and bfloat16 (float32-stored models
    also without a dtype, which is float32 again)."""
    names = list(deterministic_configs({"base": "", "a": "", "b": "", "c": ""}))
    cases = []
    for stored in ("float32", "bfloat16", "float16"):
        for name in names:
            if name in OWN_DTYPES:
                cases.append((stored, name, None))
                continue
            for dtype in ("float32", "bfloat16"):
                cases.append((stored, name, None if stored == dtype == "float32" else dtype))
    return cases


@pytest.mark.parametrize(
    "stored, name, dtype", parity_cases(), ids=[f"{s}-{n}-{d or 'own'}" for s, n, d in parity_cases()]
)
def test_deterministic_methods_match_mergekit_bit_for_bit(stored, name, dtype, tiny_models_by_dtype, tmp_path):
    config = dict(deterministic_configs(tiny_models_by_dtype[stored])[name])
    if dtype is not None:
        config["dtype"] = dtype
    ours = evomerge_merge(config, tmp_path / "evo")
    theirs = mergekit_merge(config, tmp_path / "mk")
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert ours[key].shape == theirs[key].shape, key
        if not torch.equal(ours[key], theirs[key]):
            differ = ours[key] != theirs[key]
            diff = (ours[key].double() - theirs[key].double()).abs().max().item()
            pytest.fail(f"{key}: {int(differ.sum())} of {differ.numel()} entries differ, max |diff| {diff:.3g}")


def test_mergekit_yaml_command_agrees(tiny_models_by_dtype, tmp_path):
    """Once through the real `mergekit-yaml` command line, as a user would run it, on bfloat16
    checkpoints (tied magnitudes at the TIES thresholds)."""
    exe = shutil.which("mergekit-yaml")
    if exe is None:
        pytest.skip("mergekit-yaml not on PATH")
    config = deterministic_configs(tiny_models_by_dtype["bfloat16"])["ties"]
    cfg = tmp_path / "ties.yaml"
    cfg.write_text(yaml.safe_dump(config))
    subprocess.run([exe, str(cfg), str(tmp_path / "mk")], check=True, capture_output=True)
    subprocess.run(["evomerge", "merge", str(cfg), str(tmp_path / "evo")], check=True, capture_output=True)
    ours, theirs = load_folder(tmp_path / "evo"), load_folder(tmp_path / "mk")
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def _delta_stats(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor], donor: dict[str, torch.Tensor]):
    """Per the matrices of the layers: kept fraction of the task vector, mean rescale of kept
    entries, and the mean and variance of the merged delta."""
    kept = total = 0
    ratios, deltas = [], []
    for name, m in merged.items():
        if m.ndim != 2 or "layers" not in name:
            continue
        d_merged = (m - base[name]).flatten().double()
        d_donor = (donor[name] - base[name]).flatten().double()
        mask = d_merged != 0
        kept += int(mask.sum())
        total += mask.numel()
        ratios.append((d_merged[mask] / d_donor[mask]).mean().item())
        deltas.append(d_merged)
    all_d = torch.cat(deltas)
    return kept / total, sum(ratios) / len(ratios), all_d.mean().item(), all_d.var().item(), total


@pytest.mark.parametrize("method, density", [("dare_linear", 0.3), ("dare_ties", 0.6), ("della_linear", 0.5), ("della", 0.4)])
def test_random_methods_match_mergekit_in_distribution(method, density, tiny_models, tmp_path):
    base, a, _, _ = _models(tiny_models)
    config = {"merge_method": method, "base_model": base, "models": [{"model": a, "parameters": {"weight": 1.0, "density": density}}]}
    if method.startswith("della"):
        config["parameters"] = {"epsilon": 0.1}
    ours = _delta_stats(evomerge_merge(config, tmp_path / "evo", seed=1), load_folder(Path(base)), load_folder(Path(a)))
    theirs = _delta_stats(mergekit_merge(config, tmp_path / "mk", seed=1), load_folder(Path(base)), load_folder(Path(a)))
    kept_o, ratio_o, mean_o, var_o, n = ours
    kept_t, ratio_t, mean_t, var_t, _ = theirs
    # kept fraction: each is Binomial(n, ~density)/n; two independent draws differ by < 6 sigma
    sigma = math.sqrt(2 * density * (1 - density) / n)
    assert abs(kept_o - density) < 6 * sigma + 0.02 and abs(kept_o - kept_t) < 6 * sigma + 0.02
    # rescale of kept entries: both preserve the L1 norm, so both ratios sit near 1/kept fraction
    assert ratio_o == pytest.approx(ratio_t, rel=0.1)
    assert ratio_o == pytest.approx(1 / kept_o, rel=0.25)
    # the merged deltas: same variance within 10%, means both near zero relative to their spread
    assert var_o == pytest.approx(var_t, rel=0.1)
    assert abs(mean_o - mean_t) < 6 * math.sqrt((var_o + var_t) / n)


def toy_configs(world) -> dict[str, dict]:
    """Configs over the toy world's trained models (real task vectors, a real tokenizer)."""
    base = str(world.base)
    a, b = (str(p) for _, p in sorted(world.specialists.items()))
    donors = lambda **p: [{"model": a, "parameters": dict(p)}, {"model": b, "parameters": dict(p)}]  # noqa: E731
    return {
        "linear": {"merge_method": "linear", "models": donors(weight=0.5)},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "models": donors(weight=[1.0, 0.6])},
        "ties": {"merge_method": "ties", "base_model": base, "models": donors(weight=0.8, density=0.5)},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": base, "models": donors(weight=0.8, density=0.7)},
        "slerp": {"merge_method": "slerp", "base_model": base, "parameters": {"t": 0.4},
                  "slices": [{"sources": [{"model": base, "layer_range": [0, 4]}, {"model": a, "layer_range": [0, 4]}]}]},
        "model_stock": {"merge_method": "model_stock", "base_model": base, "models": donors()},
        "passthrough": {"merge_method": "passthrough", "slices": [{"sources": [{"model": a, "layer_range": [0, 3]}]},
                                                                  {"sources": [{"model": b, "layer_range": [2, 4]}]}]},
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "breadcrumbs_ties", "slerp", "model_stock", "passthrough"])
def test_toy_world_merges_match_mergekit(name, toy_world, tmp_path):
    config = toy_configs(toy_world)[name]
    ours = evomerge_merge(config, tmp_path / "evo")
    theirs = mergekit_merge(config, tmp_path / "mk")
    assert set(ours) == set(theirs)
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
    assert worst <= 1e-6, f"max |diff| {worst:.3g}"


@pytest.mark.parametrize("stored", ["bfloat16", "float16"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties", "task_arithmetic", "dare_ties", "della", "model_stock"])
def test_search_workers_merge_what_evomerge_merge_writes(stored, dtype, name, tiny_models_by_dtype, tmp_path):
    """The in-memory path of a search worker (inputs resident in the merge dtype, task vectors
    precomputed) gives the bits `evomerge merge` writes for the same recipe, on checkpoints
    stored in 16 bits: an exported recipe reproduces what the search evaluated."""
    from evomerge.merge.config import parse_merge_config
    from evomerge.merge.inmemory import ResidentModels

    models = tiny_models_by_dtype[stored]
    base, a, b, c = _models(models)
    configs = deterministic_configs(models)
    config = configs.get(name) or {
        "merge_method": name, "base_model": base,
        "models": [{"model": a, "parameters": {"weight": 0.7, "density": 0.5}},
                   {"model": b, "parameters": {"weight": [0.2, 0.9], "density": 0.6}}],
    }
    config = {**config, "dtype": dtype, "random_seed": 3}
    if name == "della":
        config["parameters"] = {"epsilon": 0.1}
    written = evomerge_merge(config, tmp_path / "evo", seed=3)
    resident = ResidentModels([base, a, b, c], base, dtype=getattr(torch, dtype))
    evaluated = {k: torch.zeros_like(v) for k, v in resident.tensors[base].items()}
    resident.merge_into(resident.plan(parse_merge_config(config)), evaluated)
    assert set(evaluated) == set(written)
    for key, tensor in written.items():
        assert torch.equal(evaluated[key], tensor), key
