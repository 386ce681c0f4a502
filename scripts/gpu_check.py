"""Every check of issue 11 that needs CUDA, in one run on a GPU machine (a benchmark, not a test).

    python scripts/gpu_check.py [--layers 8] [--hidden 1024]

1. the memory plan's device bytes for one worker against ``torch.cuda.max_memory_allocated``
   while the worker is built and merges a candidate (mapped inputs streamed per tensor, and
   resident inputs);
2. one candidate's merge seconds on the device (after a warm-up), beside the CPU's;
3. a GPU merge equals the CPU merge bit for bit in float32 (task_arithmetic and ties);
4. the real worker (:class:`CandidateEvaluator`) on the GPU evaluates a merged toy-world candidate
   with lm-eval, and scores as the same worker on CPU does;
5. with 2 GPUs or more, the live model spread over two GPUs by the device map merges as one GPU does;
6. the default merge dtype on a GPU: a space without ``merge.dtype`` over bfloat16 models resolves
   to bfloat16 on this machine (float32 on CPU), and the worker's live model and merge use it;
7. the streamed path's overlap: mapped inputs copied from pinned memory on a side stream, one
   tensor ahead, merge bit for bit as resident inputs on the GPU, timed with and without the
   read-ahead.

Prints one line per check and a JSON summary last; exit 1 when a bit-equality check fails.

Models are random-weight Llamas written to a temporary folder; the toy world (``toy_world/``) is
used for the evaluation. Exits 2 with one line where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _write(folder: Path, seed: int, base: Path | None, layers: int, hidden: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    if base is not None:
        from safetensors.torch import load_file

        ref = {}
        for f in base.glob("*.safetensors"):
            ref.update(load_file(str(f)))
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(ref[name] + 0.02 * torch.randn_like(ref[name]) * ref[name].abs().mean())
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


def _config(method: str, base: Path, donors: list[Path], dtype: str, weight: float = 0.4):
    from evomerge.merge.config import parse_merge_config

    params = {"weight": weight} | ({"density": 0.5} if method == "ties" else {})
    return parse_merge_config({"merge_method": method, "base_model": str(base), "dtype": dtype,
                               "models": [{"model": str(d), "parameters": dict(params)} for d in donors]})


def _merge(base, donors, method, *, device, dtype, storage, task_vectors=False, read_ahead=None):
    from evomerge.merge.inmemory import ResidentModels

    resident = ResidentModels([str(base), *map(str, donors)], str(base), device=device, dtype=dtype,
                              storage=storage, task_vectors=task_vectors)
    if read_ahead is not None:
        resident.read_ahead = read_ahead
    live = {k: resident._for_math(v).clone() for k, v in resident.tensors[str(base)].items()}
    plan = resident.plan(_config(method, base, donors, str(dtype).removeprefix("torch.")))
    if device != "cpu":  # CUDA's first merge pays for kernels and allocator growth; a CPU merge is timed as is
        resident.merge_into(plan, live)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    resident.merge_into(plan, live)
    if device == "cuda":
        torch.cuda.synchronize()
    return live, time.perf_counter() - start


def check_plan_and_speed(base, donors) -> None:
    from evomerge.memory_plan import detect_devices, plan_memory, size_from_folder
    from evomerge.merge.model_folder import ModelFolder

    sizes = [size_from_folder(ModelFolder(str(p))) for p in (base, *donors)]
    for storage, cap in (("resident", None), ("mapped", "tight")):
        free = torch.cuda.mem_get_info()[0]
        budget = free if cap is None else sizes[0].stored_bytes * 2 + (2 << 30)
        plan = plan_memory(sizes, base=0, workers=1, devices=detect_devices(1, device_memory=budget))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()
        live, seconds = _merge(base, donors, "ties", device="cuda", dtype=torch.bfloat16, storage=storage,
                               task_vectors=plan.task_vectors == "resident")
        used = torch.cuda.max_memory_allocated() - start_bytes
        weights = plan.device_bytes_per_worker - plan.reserve_bytes
        print(f"[plan] {storage}: plan says {plan.placement}, task vectors {plan.task_vectors}; weights and merge "
              f"{weights / 1e9:.2f} GB planned, {used / 1e9:.2f} GB peak allocated "
              f"({'within' if used <= weights else 'OVER'} the plan)")
        print(f"[speed] ties, {len(donors)} donors, bfloat16, {storage}: {seconds:.3f} s per candidate on the GPU")
        del live
    _, cpu_seconds = _merge(base, donors, "ties", device="cpu", dtype=torch.bfloat16, storage="mapped")
    print(f"[speed] the same merge on CPU: {cpu_seconds:.3f} s")


def check_bit_equality(base, donors) -> bool:
    ok = True
    for method in ("task_arithmetic", "ties"):
        gpu, _ = _merge(base, donors, method, device="cuda", dtype=torch.float32, storage="mapped")
        cpu, _ = _merge(base, donors, method, device="cpu", dtype=torch.float32, storage="mapped")
        differing = [k for k in cpu if not torch.equal(cpu[k], gpu[k].cpu())]
        ok &= not differing
        print(f"[equal] {method} float32, GPU vs CPU: {len(cpu) - len(differing)}/{len(cpu)} tensors bit-equal"
              + (f"; differ: {', '.join(differing[:3])}" if differing else ""))
    return ok


def check_default_dtype(base, donors) -> bool:
    """A space file without merge.dtype, resolved as ``evomerge search`` resolves it on this machine."""
    from evomerge.merge_dtype import default_merge_dtype, math_device
    from evomerge.memory_plan import model_size

    stored = model_size(str(base)).dtype
    device = math_device(1)
    chosen = default_merge_dtype(device, stored)
    live, seconds = _merge(base, donors, "ties", device=device, dtype=chosen, storage="mapped")
    dtypes = {t.dtype for t in live.values()}
    ok = device == "cuda" and chosen == stored == torch.bfloat16 and dtypes == {torch.bfloat16}
    print(f"[dtype] models stored in {stored}, math device {device}: merged in {chosen} (CPU default: "
          f"{default_merge_dtype('cpu', stored)}); live model {sorted(map(str, dtypes))}, {seconds:.3f} s per candidate: "
          f"{'as designed' if ok else 'NOT as designed'}")
    return ok


def check_overlap(base, donors) -> bool:
    """Mapped inputs streamed with read-ahead (pinned memory, side stream) against resident inputs."""
    ok = True
    for dtype in (torch.bfloat16, torch.float32):
        resident, t_resident = _merge(base, donors, "ties", device="cuda", dtype=dtype, storage="resident")
        streamed, t_streamed = _merge(base, donors, "ties", device="cuda", dtype=dtype, storage="mapped")
        _, t_serial = _merge(base, donors, "ties", device="cuda", dtype=dtype, storage="mapped", read_ahead=0)
        same = all(torch.equal(resident[k], streamed[k]) for k in resident)
        ok &= same
        print(f"[overlap] ties {str(dtype)[6:]}: streamed with read-ahead {t_streamed:.3f} s, without {t_serial:.3f} s, "
              f"resident inputs {t_resident:.3f} s per candidate; streamed equals resident bit for bit: {same}")
    return ok


def check_evaluation() -> None:
    from evomerge.recipe import Recipe
    from evomerge.toy.build import load_toy_world
    from evomerge.worker import CandidateEvaluator, EvalSettings, WorkerSpec

    world = load_toy_world(ROOT / "toy_world", seed=0)
    if world is None:
        print("[eval] skipped: no toy_world/ (build it with `evomerge toy build`)")
        return
    donors = tuple(str(p) for p in world.specialists.values())
    config = _config("ties", Path(world.base), [Path(d) for d in donors], "float32", weight=0.5)
    recipe = Recipe(merge=config).to_json()
    settings = EvalSettings(tasks=("toy_arith", "toy_reverse"), include_path=(str(world.include_path),), limit=32)
    results = {}
    for device in ("cuda", "cpu"):
        import evomerge.worker as worker

        worker._device = lambda d=device: d  # noqa: E731  (the worker picks CUDA when present)
        evaluator = CandidateEvaluator(WorkerSpec(str(world.base), donors, settings, storage="mapped"))
        results[device] = evaluator.evaluate(recipe)
        print(f"[eval] {device}: {results[device].objectives or results[device].error} "
              f"(merge {results[device].merge_s:.2f} s, eval {results[device].eval_s:.2f} s)")


def check_two_gpus(base, donors) -> None:
    if torch.cuda.device_count() < 2:
        print("[multi-gpu] skipped: one GPU")
        return
    from evomerge.device_map import spread_over_gpus
    from evomerge.merge.inmemory import ResidentModels, state_view

    model = spread_over_gpus(base, torch.bfloat16, 2)
    devices = {p.device for p in model.parameters()}
    resident = ResidentModels([str(base), *map(str, donors)], str(base), device="cuda:0", dtype=torch.bfloat16,
                              storage="mapped", task_vectors=False)
    resident.merge_into(resident.plan(_config("ties", base, donors, "bfloat16")), state_view(model))
    one, _ = _merge(base, donors, "ties", device="cuda", dtype=torch.bfloat16, storage="mapped")
    view = state_view(model)
    same = all(torch.equal(view[k].cpu(), one[k].cpu()) for k in one)
    print(f"[multi-gpu] live model over {sorted(map(str, devices))}: merge equals one GPU's: {same}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)  # about 160M parameters: its CPU merges fit the 8 minutes
    parser.add_argument("--hidden", type=int, default=1024)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run this script on a machine with a GPU", file=sys.stderr)
        return 2
    started = time.perf_counter()
    print(f"GPU: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, "
          f"{torch.cuda.mem_get_info()[0] / 1e9:.1f} GB free")
    with tempfile.TemporaryDirectory() as tmp:
        base = _write(Path(tmp) / "base", 0, None, args.layers, args.hidden)
        donors = [_write(Path(tmp) / f"d{i}", i + 1, base, args.layers, args.hidden) for i in range(2)]
        check_plan_and_speed(base, donors)
        equal = check_bit_equality(base, donors)
        overlap_equal = check_overlap(base, donors)
        dtype_ok = check_default_dtype(base, donors)
        check_two_gpus(base, donors)
    check_evaluation()
    print(json.dumps({"bit_equal_float32": equal, "streamed_equals_resident": overlap_equal,
                      "bfloat16_default": dtype_ok, "seconds": round(time.perf_counter() - started)}))
    return 0 if equal and overlap_equal and dtype_ok else 1


if __name__ == "__main__":
    sys.exit(main())
