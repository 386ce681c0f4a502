"""``evomerge merge``: stream a planned merge from input shards to an output model folder.

Memory stays near the tensors in flight: each task's inputs are read, merged and written before
the next task's are released, and the next task's inputs are read on a background thread while
the current one is computed (file reads release the GIL). The output is assembled in a hidden
sibling folder and renamed into place only when complete, so a failed or interrupted merge leaves
no partial output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
else:
    from evomerge.lazy_torch import torch  # imported on first use: see evomerge.lazy_torch

from ..errors import ConfigError, EvomergeError, ModelError
from . import without_torch
from .config import MergeConfig, load_merge_config, parse_merge_config
from .model_folder import TOKENIZER_FILES, ModelFolder
from .plan import MergePlan, TensorTask, plan_merge
from .registry import MergeInputs
from .safetensors_io import BufferPool, PlannedTensor, ShardedWriter, TensorInfo
from .scratch import reused_scratch

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000, 1024 -> 1024."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"shard size {text!r} is not a size; write e.g. 500MB or 2GB")
    number, unit = float(m[1]), (m[2] or "B").upper()
    scale = {"B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9,
             "KI": 2**10, "KIB": 2**10, "MI": 2**20, "MIB": 2**20, "GI": 2**30, "GIB": 2**30}[unit]
    return max(1, int(number * scale))


def _release_large_frees() -> None:
    """Make glibc return freed tensor buffers to the OS at once.

    glibc raises its mmap threshold after large blocks are freed, so later tensor-sized buffers
    come from the heap and stay resident after they are freed: a streaming merge would then
    look (and be, for other processes) as large as its worst fragmentation. Fixing the threshold
    at 1 MiB keeps every tensor buffer in its own mapping, unmapped when freed. No-op elsewhere.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _pipeline_threads() -> int:
    """Intra-op threads for torch while the reader and writer threads share the machine.

    torch's OpenMP workers spin at every parallel region's barrier; when a reader or writer
    thread holds one of the cores, each region waits for a descheduled worker. On 2 cores that
    tripled a linear merge's CPU time (2.5 s user against 0.2 s with one thread). So leave two
    cores to the I/O threads. An explicit OMP_NUM_THREADS is the user's choice and is kept.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - 2))


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads, restoring the caller's setting."""
    before = torch.get_num_threads()
    if count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def open_models(config: MergeConfig, *, allow_pickle: bool = False) -> dict[str, ModelFolder]:
    """Open every model the config names (config and headers only; no tensor data yet)."""
    return {ref: ModelFolder(ref, allow_pickle=allow_pickle) for ref in config.referenced_models()}


def compute_task(
    plan: MergePlan,
    task: TensorTask,
    inputs: list[torch.Tensor],
    deltas: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Merge one output tensor from its loaded inputs, as the method and dtypes say.

    ``deltas`` are the task vectors (input minus base) when the caller keeps them resident, as
    search workers do; the task-vector methods then skip recomputing them.
    """
    if task.load_dtype is not None:
        inputs = [x.to(task.load_dtype) if x.is_floating_point() else x for x in inputs]
    generator = None
    if plan.method.stochastic:
        generator = torch.Generator(device=inputs[0].device).manual_seed(task.seed(plan.random_seed))
    result = plan.method.merge(
        MergeInputs(inputs, task.base_index, task.per_input, task.shared, generator, deltas, task.name)
    )
    if not all_finite(result):
        raise ModelError(f"merging {task.name} gave NaN or infinite values; check the weights and parameters")
    return result.to(task.out_dtype)


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no entry is NaN or infinite (integer tensors always are finite).

    One sum in the tensor's own dtype is the cheap test: a NaN or inf anywhere makes it
    non-finite. A non-finite sum can also be an overflow of finite entries (or a float16 sum
    past 65504), so only then the exact elementwise test decides. Summing in float64 instead
    costs a conversion per entry and was the largest single cost of a linear merge.
    """
    if not tensor.is_floating_point():
        return True
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def verbatim_source(plan: MergePlan, task: TensorTask, models: Mapping[str, ModelFolder]) -> TensorInfo | None:
    """The stored input whose bytes are this task's output unchanged, or None.

    That is a passthrough without ``scale`` whose input keeps its stored dtype through the load
    and output casts, from a safetensors file: mergekit writes the same bytes, so the writer
    copies them file to file instead of reading, checking and writing a tensor.
    """
    if plan.method.name != "passthrough" or len(task.sources) != 1 or task.per_input[0].get("scale") is not None:
        return None
    ref, name = task.sources[0]
    info = models[ref].stored(name)
    if info is None or info.code != task.out_code or task.load_code not in (None, info.code):
        return None
    return info


def _stream(
    plan: MergePlan, models: Mapping[str, ModelFolder], buffers: BufferPool | None = None
) -> Iterator[tuple[TensorTask, torch.Tensor | TensorInfo]]:
    """Yield (task, merged tensor) in plan order, reading the next task's inputs meanwhile
    (into buffers from ``buffers``, to which the merged inputs return). A task whose output is an
    input's stored bytes unchanged yields that input's place instead (:func:`verbatim_source`)."""
    if buffers is None:
        buffers = BufferPool()
    verbatim = [verbatim_source(plan, task, models) for task in plan.tasks]

    def load(i: int) -> list[torch.Tensor] | None:
        if verbatim[i] is not None:
            return None
        return [models[m].read(n, buffers) for m, n in plan.tasks[i].sources]

    tasks = plan.tasks
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="evomerge-read") as pool:
        pending = pool.submit(load, 0) if tasks else None
        for i, task in enumerate(tasks):
            assert pending is not None
            inputs = pending.result()
            pending = pool.submit(load, i + 1) if i + 1 < len(tasks) else None
            if inputs is None:
                yield task, verbatim[i]
                continue
            result = compute_task(plan, task, inputs)
            _recycle(buffers, inputs, result)
            del inputs
            yield task, result
            del result


def _recycle(buffers: BufferPool, inputs: list[torch.Tensor], result: torch.Tensor) -> None:
    """Give the inputs' buffers back for the next reads, except one the result still uses
    (passthrough returns its input itself)."""
    kept = result.untyped_storage().data_ptr()
    for x in inputs:
        if x.untyped_storage().data_ptr() != kept:
            buffers.give(x)


def _write_all(
    writer: ShardedWriter, merged: Iterator[tuple[TensorTask, torch.Tensor | TensorInfo]], buffers: BufferPool | None = None
) -> None:
    """Write each merged tensor on a background thread while the next one is computed.

    File writes release the GIL, so writing tensor i overlaps computing tensor i + 1 (about a
    third of a plain merge's time is writing). At most one write is in flight, so memory holds
    one extra output tensor at most; a failed write is raised here, before the next one starts.
    A written tensor's buffer goes to ``buffers`` for the next reads (``merged`` must hold no
    other reference to it, as :func:`_stream` does not).
    """

    def write(name: str, tensor: torch.Tensor | TensorInfo) -> None:
        if isinstance(tensor, TensorInfo):
            writer.copy(name, tensor)
            return
        writer.write(name, tensor)
        if buffers is not None:
            buffers.give(tensor)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="evomerge-write") as pool:
        pending = None
        try:
            for task, tensor in merged:
                if pending is not None:
                    pending.result()
                pending = pool.submit(write, task.name, tensor)
                del tensor
            if pending is not None:
                pending.result()
        finally:
            if pending is not None:
                pending.cancel()
                wait([pending])


def output_config(plan: MergePlan, config: MergeConfig, models: Mapping[str, ModelFolder]) -> dict[str, Any]:
    """The reference model's config with the output's layer count and dtype."""
    out = json.loads(json.dumps(models[plan.reference_model].config))
    target = out.get("text_config", out)
    key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers") if k in target), "num_hidden_layers")
    target[key] = plan.num_layers
    layer_types = target.get("layer_types")
    if isinstance(layer_types, list):
        # per-layer attributes follow the layer each output layer came from
        target["layer_types"] = [
            models[m].config.get("text_config", models[m].config).get("layer_types", layer_types)[i]
            for m, i in plan.layer_sources
        ]
    dtype = config.out_dtype or config.dtype
    if dtype:
        out["torch_dtype"] = dtype
        if "dtype" in out:
            out["dtype"] = dtype
    return out


def _tokenizer_folder(config: MergeConfig, plan: MergePlan, models: Mapping[str, ModelFolder]) -> Path:
    source = config.tokenizer_source
    if source in (None, "base"):
        return models[config.base_model or plan.reference_model].path
    if source == "union":
        files = {ref: (m.path / "tokenizer.json") for ref, m in models.items()}
        contents = {ref: (f.read_bytes() if f.is_file() else None) for ref, f in files.items()}
        if len(set(contents.values())) > 1:
            raise ConfigError(
                "tokenizer_source: union is supported only when every model has the same tokenizer; "
                "use 'base' or name one model",
                where="tokenizer_source",
            )
        return models[plan.reference_model].path
    if source not in models:
        return ModelFolder(source).path
    return models[source].path


def _copy_tokenizer(source: Path, dest: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)


def merge_config(
    config: MergeConfig,
    out: Path,
    *,
    shard_size: str | int = "2GB",
    allow_pickle: bool = False,
    overwrite: bool = False,
    recipe_yaml: str | None = None,
) -> Path:
    """Merge as ``config`` says into the folder ``out``; nothing is left at ``out`` on failure.

    The output's ``mergekit_config.yml`` is ``recipe_yaml`` when given (a multi-stage file writes
    all its stages there, since the final stage alone names intermediates that may be gone), else
    ``config`` itself.
    """
    from ..preflight import check_out_spares_inputs

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EvomergeError(f"output {out} is a file; give a folder for the merged model")
    if out.exists() and not overwrite:
        raise EvomergeError(f"output folder {out} already exists; choose another or pass --overwrite")
    max_shard = parse_size(shard_size)
    _release_large_frees()
    models = open_models(config, allow_pickle=allow_pickle)
    check_out_spares_inputs(out, {ref: m.path for ref, m in models.items()})  # --overwrite never replaces an input
    plan = plan_merge(config, models)
    tokenizer_from = _tokenizer_folder(config, plan, models)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        planned = [PlannedTensor(t.name, t.out_code, t.shape) for t in plan.tasks]
        writer = ShardedWriter(staging, planned, max_shard_bytes=max_shard)
        try:
            if without_torch.supports(plan, models) and not os.environ.get("EVOMERGE_MERGE_WITH_TORCH"):
                without_torch.write_all(plan, models, writer)  # torch is never imported: see the module
            else:
                with _torch_threads(_pipeline_threads()), reused_scratch():
                    buffers = BufferPool(max_per_size=max((len(t.sources) for t in plan.tasks), default=1))
                    _write_all(writer, _stream(plan, models, buffers), buffers)
            writer.close()
        finally:
            writer.abort()
        (staging / "config.json").write_text(json.dumps(output_config(plan, config, models), indent=2) + "\n")
        _copy_tokenizer(tokenizer_from, staging)
        (staging / "mergekit_config.yml").write_text(recipe_yaml if recipe_yaml is not None else config.to_yaml())
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def merge_from_config(config: Mapping[str, Any] | MergeConfig, out: Path, **kwargs: Any) -> Path:
    """Merge from a config given as a mapping (as from ``yaml.safe_load``) or a parsed config."""
    parsed = config if isinstance(config, MergeConfig) else parse_merge_config(config)
    return merge_config(parsed, out, **kwargs)


def merge_from_file(path: Path, out: Path, **kwargs: Any) -> Path:
    """``evomerge merge CONFIG OUT``."""
    return merge_config(load_merge_config(path), out, **kwargs)
