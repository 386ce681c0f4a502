"""The checks before a run: everything a user can get wrong, found before the run folder exists.

:func:`prepare` opens the models (every header read, same architecture, shapes and vocabulary,
layer groups that divide the layers, route pools of one shape), plans the initial candidate,
indexes the tasks and checks every objective's metric, and draws the evaluation items. It
writes nothing; what it computed is kept in :class:`Prepared`, so nothing is computed twice.
A new check belongs here, as one more step of :func:`prepare` raising a :class:`ConfigError`
that names the space-file field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .space_config import SpaceConfig

if TYPE_CHECKING:
    from .reporter import Reporter


@dataclass
class Prepared:
    """What the checks before a run produce, so nothing is computed twice."""

    config: SpaceConfig
    space: Any  # SearchSpace
    num_layers: int
    samples: dict[str, list[int]] | None
    memory: Any = None  # MemoryPlan: where each worker stores the models (printed by search and validate)
    rungs: Any = None  # RungLadder: the items of each rung per task, with evaluation.rungs (evomerge.rungs)


def prepare(config: SpaceConfig, *, report: Reporter | None = None) -> Prepared:
    """Check a space against its models and tasks; nothing is written.

    One step per concern, in the order a user would fix them; each raises a :class:`ConfigError`
    naming the space file's field. Add a check as one more step. ``report`` (a
    :class:`~evomerge.reporter.Reporter`) is told the stages as they happen.
    """
    from . import preflight
    from .reporter import SilentReporter
    from .space import SearchSpace

    report = report or SilentReporter()
    report.begin("checking the space file")
    preflight.check_seeds(config)
    preflight.check_parameter_ranges(config)
    preflight.check_lm_eval_args(config)
    report.done(f"space file checked: {config.source}: run {config.name}, {config.search.driver} driver, "
                f"{config.search.budget} trials")
    report.begin("opening the models")
    fields, folders = _open_models(config)
    preflight.check_distinct_models(config, folders)
    base = folders[config.models.base]
    config.validate_against_models(base.num_layers, base.tensor_names)
    space = SearchSpace.from_config(config, base.num_layers)
    _check_initial_candidate(space, fields, folders)
    if config.route is not None:
        _check_route_models(config, folders)
    report.done(f"models opened: {_sizes(config, folders)}; {len(space.names)} coordinates to search")
    report.begin("loading the tasks with lm-eval")
    _check_constraints(config)
    scorer = _scorer(config)
    _check_metrics(config, scorer)
    preflight.check_num_fewshot(config, scorer)
    samples = _draw_items(config, scorer)
    rungs = _rung_ladder(config, scorer, samples)
    report.done("tasks loaded: " + ", ".join(f"{t} {len(samples[t]) if samples and t in samples else scorer.num_docs(t)} "
                                             f"of {scorer.num_docs(t)} items" for t in config.task_names())
                + (f"; rungs: {rungs.describe()}" if rungs is not None else ""))
    preflight.warn_unrelated_donors(config, folders)
    return Prepared(config, space, base.num_layers, samples, memory_plan(config, folders), rungs)


def _rung_ladder(config: SpaceConfig, scorer: Any, samples: dict[str, list[int]] | None) -> Any:
    """The items of each rung per task (``evaluation.rungs``), once every metric is known to combine."""
    from .rungs import RungLadder, check_mean_metrics

    if config.evaluation.rungs is None:
        return None
    if not scorer.scores_per_item(config.evaluation.lm_eval_args):
        raise ConfigError("rungs score items one by one on evomerge's own evaluation path, which these lm_eval_args "
                          "or task groups leave; remove evaluation.rungs, or the option or group",
                          where=f"{config.source}: evaluation.rungs")
    check_mean_metrics(config, scorer)
    # lm-eval numbers a task's documents by their position among those scored (``samples=`` keeps
    # dataset order): the rungs climb those positions
    items = {t: list(range(len((samples or {}).get(t) or range(scorer.num_docs(t))))) for t in config.task_names()}
    return RungLadder.build(config.evaluation.rungs, items)


def _sizes(config: SpaceConfig, folders: dict[str, Any]) -> str:
    """Each model's short name and size on disk, from its headers: "base 2.7 MB, arith 2.7 MB"."""
    from .memory_plan import format_bytes, size_from_folder

    names = {config.models.base: "base", **{d.model: d.name for d in config.models.donors}}
    return ", ".join(f"{names.get(ref, ref)} {format_bytes(size_from_folder(folder).stored_bytes)}"
                     for ref, folder in folders.items())


def memory_plan(config: SpaceConfig, folders: dict[str, Any]) -> Any:
    """The workers' memory plan from the models' headers; a plan that cannot fit is refused here,
    before the run folder exists (see :mod:`evomerge.memory_plan`)."""
    import torch

    from .memory_plan import detect_devices, plan_memory, size_from_folder

    w = config.workers
    refs = list(folders)
    plan = plan_memory([size_from_folder(folders[r]) for r in refs], base=refs.index(config.models.base),
                       workers=w.count, merge_dtype=getattr(torch, config.dtype),
                       devices=detect_devices(w.gpus_per_worker, device_memory=w.device_memory, host_memory=w.host_memory))
    if not plan.fits:
        raise ConfigError(f"the models do not fit: {plan.problem}; {plan.fix}", where=f"{config.source}: workers")
    return plan


def storage_settings(plan: Any) -> dict[str, Any]:
    """The worker's storage from its memory plan: inputs resident on a GPU that holds them all,
    else memory-mapped (on CPU shared through the page cache; to a GPU streamed per tensor)."""
    resident = plan.device.kind == "cuda" and plan.placement == "device"
    return dict(storage="resident" if resident else "mapped", task_vectors=plan.task_vectors == "resident",
                gpus=max(1, int(plan.device.gpus_per_worker)), keep_free_bytes=plan.merge_work_bytes)


def _open_models(config: SpaceConfig) -> tuple[Any, dict[str, Any]]:
    """Every model folder opened, its headers read and its weights loadable (the base's tokenizer too)."""
    from .model_checks import check_loadable, check_tokenizer, model_fields

    fields = model_fields(config)  # a model error names the space file and the models.* field too
    folders = {ref: fields.open(ref) for ref in fields.references}
    for ref, folder in folders.items():
        with fields.naming(ref):
            folder.num_layers, folder.tensor_names  # noqa: B018  (reads every header: names a truncated file)
            check_loadable(folder, trust_remote_code=config.trust_remote_code)
            if ref == config.models.base:
                check_tokenizer(folder, trust_remote_code=config.trust_remote_code)
    return fields, folders


def _check_initial_candidate(space: Any, fields: Any, folders: dict[str, Any]) -> None:
    """Plan the initial candidate: refuses incompatible models (architecture, shapes, vocabulary)."""
    from .merge.plan import plan_merge

    with fields.naming():
        initial = space.decode(space.from_unit(space.initial_unit()))
        if initial.merge is not None:
            plan_merge(initial.merge, folders)


def _check_metrics(config: SpaceConfig, scorer: Any) -> None:
    """Every objective's and constraint's metric is one its task reports."""
    from .errors import close_matches

    known_metrics = scorer.metrics()
    for i, obj in enumerate([*config.objectives, *config.constraints]):
        if obj.task is None:
            continue
        metrics = known_metrics.get(obj.task, ())
        if obj.metric not in metrics:
            kind = "objectives" if i < len(config.objectives) else "constraints"
            index = i if i < len(config.objectives) else i - len(config.objectives)
            raise ConfigError(
                f"task {obj.task!r} has no metric {obj.metric!r}.{close_matches(obj.metric, metrics)} "
                f"Its metrics: {', '.join(metrics)}",
                where=f"{config.source}: {kind}[{index}].metric",
            )


def _draw_items(config: SpaceConfig, scorer: Any) -> dict[str, list[int]] | None:
    """The evaluation items of each task, drawn once: every trial is scored on the same ones."""
    samples: dict[str, list[int]] = {}
    for task in config.task_names():
        indices = config.evaluation.item_indices(task, scorer.num_docs(task))
        if indices is not None:
            samples[task] = indices
    return samples or None


def _check_route_models(config: SpaceConfig, folders: dict[str, Any]) -> None:
    """A route stacks layers of every pool model into one model: they must agree in kind, width
    and depth (the slots assume one layer count), and ``scale`` needs the output projections it
    multiplies."""
    from .merge.routing import RESIDUAL_OUTPUTS, supports_scale
    from .space_config import BASE_NAME, MERGED_NAME

    route = config.route
    assert route is not None
    refs = {BASE_NAME: config.models.base, **{d.name: d.model for d in config.models.donors}}
    base = folders[config.models.base]
    want = (base.config.get("model_type"), base.config.get("hidden_size"), base.num_layers)
    for i, entry in enumerate(route.pool):
        folder = folders[refs.get(entry, config.models.base)]  # merged: a merge of these models
        got = (folder.config.get("model_type"), folder.config.get("hidden_size"), folder.num_layers)
        if got != want and entry != MERGED_NAME:
            raise ConfigError(
                f"{refs[entry]!r} is a {got[0]} with hidden size {got[1]} and {got[2]} layers, the base a {want[0]} "
                f"with hidden size {want[1]} and {want[2]} layers; a route stacks layers of models of one shape",
                where=f"{config.source}: route.pool[{i}]",
            )
    if route.scale is not None and not supports_scale(base.tensor_names):
        raise ConfigError(
            f"this architecture has no {' / '.join(RESIDUAL_OUTPUTS)} tensors for a layer scale to multiply; remove it",
            where=f"{config.source}: route.scale",
        )


def _scorer(config: SpaceConfig) -> Any:
    """lm-eval's task index for the config's tasks; a bad folder or task names its field."""
    from .evaluate import LmEvalScorer, UnknownTaskError

    for i, folder in enumerate(config.evaluation.include_path):
        if not Path(folder).is_dir():
            raise ConfigError(f"task folder {folder} does not exist; point it at a folder of lm-eval task YAMLs",
                              where=f"{config.source}: evaluation.include_path[{i}]")
    try:
        return LmEvalScorer(config.task_names(), **_scorer_paths(config))
    except UnknownTaskError as err:
        named = [*config.objectives, *config.constraints]
        i = next(i for i, m in enumerate(named) if m.task == err.task)
        kind, index = ("objectives", i) if i < len(config.objectives) else ("constraints", i - len(config.objectives))
        raise ConfigError(str(err), where=f"{config.source}: {kind}[{index}].task") from None


def _scorer_paths(config: SpaceConfig) -> dict[str, Any]:
    paths = config.evaluation.include_path
    return {"include_path": [Path(p) for p in paths]} if paths else {}


def _check_constraints(config: SpaceConfig) -> None:
    for i, c in enumerate(config.constraints):
        if c.min is not None:
            raise ConfigError(
                "lower bounds (min:) on constraints are not supported yet; use max:, or make it an objective",
                where=f"{config.source}: constraints[{i}].min",
            )


def eval_settings(config: SpaceConfig, samples: dict[str, list[int]] | None) -> Any:
    """What a candidate is scored with (:class:`~evomerge.worker.EvalSettings`): the one builder,
    for the workers and for ``evomerge validate``'s scoring of the base."""
    from .worker import EvalSettings

    ev = config.evaluation
    paths = [str(Path(p).resolve()) for p in ev.include_path]
    return EvalSettings(
        tasks=tuple(config.task_names()),
        include_path=tuple(paths) or None,
        samples=samples,
        batch_size=ev.batch_size,  # an int, or lm-eval's "auto"
        num_fewshot=ev.num_fewshot,
        extra_args=dict(ev.lm_eval_args),
    )


def worker_spec(prepared: Prepared) -> Any:
    """How each worker builds itself for this run: its resident models and what it scores."""
    from .worker import WorkerSpec

    cfg = prepared.config
    return WorkerSpec(
        base=cfg.models.base,
        donors=tuple(d.model for d in cfg.models.donors),
        evaluation=eval_settings(cfg, prepared.samples),
        dtype=cfg.dtype,
        trust_remote_code=cfg.trust_remote_code,
        **storage_settings(prepared.memory),
    )


def resolve_merged(config: Any) -> Any:
    """A two-stage space with ``route.merged`` naming a run folder or a mergekit YAML, with that
    merge written inline, so the new run's space file and identity hold the merge itself (the
    stage-1 run may go on, or move, without changing what this run searched over).

    A run folder stands for its best trial, chosen as ``evomerge export --best`` chooses.
    """
    from .export import choose
    from .merge.config import load_merge_config
    from .model_refs import resolve_merge
    from .recipe import Recipe
    from .store import RunStore

    route = config.route
    if route is None or not isinstance(route.merged, str):
        return config
    where = f"{config.source}: route.merged"
    path = Path(route.merged)
    if (path / "space.yaml").is_file():
        store = RunStore.open(path)
        try:
            record = choose(store, trial=None, best=True, pareto=False)[0]
        finally:
            store.close()
        recipe = Recipe.from_json(record.recipe_json, source=f"{path} trial {record.number}")
        if recipe.route is not None or recipe.merge is None:
            raise ConfigError(f"the best trial of {path} is itself routed; route over a run of parameter merges",
                              where=where)
        merge = recipe.merge
    elif path.is_file():
        merge = load_merge_config(path)
    else:
        raise ConfigError(f"{path} is neither a run folder (runs/<name>) nor a mergekit YAML file", where=where)
    merge = resolve_merge(merge, config)  # names the models as the (resolved) config does
    known = {config.models.base, *(d.model for d in config.models.donors)}
    strangers = [m for m in merge.referenced_models() if m not in known]
    if strangers:
        raise ConfigError(f"the merge uses {', '.join(map(repr, strangers))}, which models: does not list; the workers "
                          "hold only the base and the donors", where=where)
    dtypes = {d for d in (merge.dtype, merge.out_dtype) if d is not None}
    if dtypes - {config.dtype}:
        # the worker holds the merge in the route's dtype; a stage written in another one would be
        # rounded differently on disk than in memory, and the export would not be what was scored
        raise ConfigError(f"the merge is computed or written in {', '.join(sorted(dtypes))}, the route in "
                          f"{config.dtype}; set route.dtype: {next(iter(dtypes))} (or the merge's dtype to match)",
                          where=where)
    data = merge.model_dump(mode="json", exclude_none=True)
    resolved = config.model_copy(update={"route": route.model_copy(update={"merged": data})})
    resolved._source = config.source
    return resolved
