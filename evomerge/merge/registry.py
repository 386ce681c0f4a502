"""The one registry of merge methods: names, parameters, input rules, and per-tensor merge.

Each entry declares its parameters the way mergekit 0.1.5 does (same names, defaults and scopes),
so configs parse to what mergekit would read, search spaces can be derived from the declarations
(``Param.search_range``), and an exported recipe means what the search evaluated.

Every method's ``merge`` has one call contract::

    merge(entries, base_index, per_input, shared, *, generator=None, deltas=None) -> Tensor

``entries`` are the input tensors of one output tensor in config order, the base among them at
``base_index`` (None when the config has none); ``per_input[i]`` holds the resolved per-model
parameters of ``entries[i]`` (for the base only those with ``includes_base``); ``shared`` the
per-tensor parameters. Missing optional parameters take their declared defaults; a missing
required one raises ConfigError. ``deltas`` are optional precomputed task vectors
(``entries[i] - base``, None at the base) that the task-vector family uses instead of recomputing;
``generator`` drives the stochastic methods (parity with mergekit there is statistical: mergekit
uses the global torch RNG). Entries are first aligned to their promoted dtype, as mergekit does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from evomerge.errors import ConfigError, close_matches
from evomerge.merge.methods import linear_merge, model_stock_merge, passthrough_merge, slerp_merge
from evomerge.merge.sparsify import Sparsifier
from evomerge.merge.task_vectors import task_vector_merge


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method, as mergekit declares it.

    ``per_model`` parameters are resolved for each input model (mergekit's INPUT and NON_BASE
    scopes); ``includes_base`` marks those the base entry receives too (INPUT). The others are one
    value per output tensor (SHARED). ``search_range`` is the interval a search explores by
    default, None for parameters not worth searching (flags, no-ops).
    """

    name: str
    kind: type
    default: Any
    per_model: bool
    includes_base: bool = False
    required: bool = False
    search_range: tuple[float, float] | None = None
    doc: str = ""


class MergeFn(Protocol):
    def __call__(
        self,
        entries: Sequence[torch.Tensor],
        base_index: int | None,
        per_input: Sequence[Mapping[str, Any]],
        shared: Mapping[str, Any],
        *,
        generator: torch.Generator | None = None,
        deltas: Sequence[torch.Tensor | None] | None = None,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: its declared parameters, its input rules, and its per-tensor merge.

    ``min_models`` and ``max_models`` count every entry of one output tensor, the base included.
    ``stochastic`` methods draw from the generator, so a recipe's result depends on a seed.
    """

    name: str
    params: tuple[Param, ...]
    needs_base: bool
    min_models: int
    max_models: int | None
    stochastic: bool
    merge: MergeFn
    doc: str = ""

    def param(self, name: str) -> Param:
        """The declared parameter ``name``; ConfigError (with close matches) when undeclared."""
        for p in self.params:
            if p.name == name:
                return p
        names = [p.name for p in self.params]
        raise ConfigError(
            f"merge method {self.name!r} has no parameter {name!r}; it takes "
            f"{', '.join(names) or 'none'}.{close_matches(name, names)}"
        )

    @property
    def per_model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)

    @property
    def shared_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)

    def check_inputs(self, count: int, has_base: bool) -> None:
        """ConfigError unless ``count`` entries (base included) and the base fit this method."""
        if self.needs_base and not has_base:
            raise ConfigError(f"merge method {self.name!r} needs a base_model.")
        if count < self.min_models or (self.max_models is not None and count > self.max_models):
            if self.max_models is None:
                wanted = f"at least {self.min_models}"
            elif self.max_models == self.min_models:
                wanted = f"exactly {self.min_models}"
            else:
                wanted = f"between {self.min_models} and {self.max_models}"
            raise ConfigError(
                f"merge method {self.name!r} takes {wanted} models (base included); got {count}."
            )


# ------------------------------------------------------------------------------------------------
# Resolving the uniform call into kernel arguments.
# ------------------------------------------------------------------------------------------------


def _aligned(
    entries: Sequence[torch.Tensor], per_input: Sequence[Mapping[str, Any]]
) -> list[torch.Tensor]:
    """Entries cast to their promoted dtype (mergekit's align_dtype); no copy when already equal."""
    if not entries or len(per_input) != len(entries):
        raise ValueError(
            f"merge got {len(entries)} entries and {len(per_input)} per-input parameter sets; "
            "they must be equal and nonzero"
        )
    dtype = entries[0].dtype
    for e in entries[1:]:
        dtype = torch.promote_types(dtype, e.dtype)
    return [e if e.dtype == dtype else e.to(dtype) for e in entries]


def _value(method: str, p: Param, values: Mapping[str, Any], where: str) -> Any:
    if p.name in values:
        return values[p.name]
    if p.required:
        raise ConfigError(f"merge method {method!r} needs parameter {p.name!r} {where}.")
    return p.default


def _shared(method: str, params: Sequence[Param], shared: Mapping[str, Any]) -> dict[str, Any]:
    return {p.name: _value(method, p, shared, "(one value per tensor)")
            for p in params if not p.per_model}


def _per_model(
    method: str, params: Sequence[Param], values: Mapping[str, Any], index: int, base: bool
) -> dict[str, Any]:
    where = f"for model {index}" + (" (the base)" if base else "")
    return {
        p.name: _value(method, p, values, where)
        for p in params
        if p.per_model and (p.includes_base or not base)
    }


def _base_index(method: str, base_index: int | None, count: int) -> int:
    if base_index is None or not 0 <= base_index < count:
        raise ConfigError(f"merge method {method!r} needs the base among its inputs.")
    return base_index


# ------------------------------------------------------------------------------------------------
# Parameter declarations.
# ------------------------------------------------------------------------------------------------

_UNIT = (0.0, 1.0)

#: Where a parameter is defined at all, whatever a search explores (``search_range``): fractions
#: of a task vector. A pinned value, searched range or merge-config value outside is refused
#: before any merge runs. Parameters not listed take any finite number (a weight may be
#: negative, lambda any scale). One table for every method until ``Param`` carries its own.
VALID_RANGES: dict[str, tuple[float, float]] = {"density": _UNIT, "gamma": _UNIT, "epsilon": _UNIT}


def valid_range(name: str) -> tuple[float, float] | None:
    """The interval where parameter ``name`` is defined, or None when any finite value is."""
    return VALID_RANGES.get(name)


def _weight(includes_base: bool) -> Param:
    return Param(
        "weight",
        float,
        None,
        per_model=True,
        includes_base=includes_base,
        required=True,
        search_range=_UNIT,
        doc="How much of this model goes into the merge.",
    )


def _task_vector_params(
    *, normalize: bool, rescale: bool, sparsifier: Sparsifier | None
) -> tuple[Param, ...]:
    params = [
        Param(
            "int8_mask",
            bool,
            False,
            per_model=False,
            doc="mergekit's memory option for the sign mask; it does not change the result.",
        ),
        Param(
            "normalize",
            bool,
            normalize,
            per_model=False,
            doc="Divide the mixed task vector by the sum of (agreeing) weights.",
        ),
        Param(
            "rescale",
            bool,
            rescale,
            per_model=False,
            doc="Rescale sparsified task vectors to keep their L1 norm (no effect without "
            "sparsification).",
        ),
        Param(
            "lambda",
            float,
            1.0,
            per_model=False,
            search_range=(0.5, 1.5),
            doc="Scale of the mixed task vector before it is added to the base.",
        ),
        _weight(includes_base=False),
        Param(
            "density",
            float,
            1.0,
            per_model=True,
            search_range=None if sparsifier is None else (0.1, 1.0),
            doc="Fraction of each task vector kept."
            + (" Accepted and ignored here, as in mergekit." if sparsifier is None else ""),
        ),
    ]
    if sparsifier is Sparsifier.MAGNITUDE_OUTLIERS:
        params.append(
            Param(
                "gamma",
                float,
                0.01,
                per_model=True,
                search_range=(0.0, 0.1),
                doc="Fraction of largest-magnitude entries dropped as outliers.",
            )
        )
    if sparsifier is Sparsifier.DELLA_MAGPRUNE:
        params.append(
            Param(
                "epsilon",
                float,
                0.15,
                per_model=True,
                search_range=(0.0, 0.2),
                doc="Half-width of the keep probabilities around density; density +/- epsilon "
                "must lie within (0, 1).",
            )
        )
    return tuple(params)


# ------------------------------------------------------------------------------------------------
# Uniform-contract adapters.
# ------------------------------------------------------------------------------------------------


def _linear(
    params: tuple[Param, ...],
    entries: Sequence[torch.Tensor],
    base_index: int | None,
    per_input: Sequence[Mapping[str, Any]],
    shared: Mapping[str, Any],
    *,
    generator: torch.Generator | None = None,
    deltas: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    # mergekit's linear ignores which input is the base: every entry is weighted alike.
    s = _shared("linear", params, shared)
    weights = [_per_model("linear", params, v, i, False)["weight"] for i, v in enumerate(per_input)]
    return linear_merge(_aligned(entries, per_input), weights, normalize=bool(s["normalize"]))


def _slerp(
    params: tuple[Param, ...],
    entries: Sequence[torch.Tensor],
    base_index: int | None,
    per_input: Sequence[Mapping[str, Any]],
    shared: Mapping[str, Any],
    *,
    generator: torch.Generator | None = None,
    deltas: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    b = _base_index("slerp", base_index, len(entries))
    if len(entries) != 2:
        raise ConfigError(
            f"slerp merges exactly two models, the base and one other; got {len(entries)}."
        )
    s = _shared("slerp", params, shared)
    aligned = _aligned(entries, per_input)
    return slerp_merge(aligned[b], aligned[1 - b], float(s["t"]))


def _model_stock(
    params: tuple[Param, ...],
    entries: Sequence[torch.Tensor],
    base_index: int | None,
    per_input: Sequence[Mapping[str, Any]],
    shared: Mapping[str, Any],
    *,
    generator: torch.Generator | None = None,
    deltas: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    b = _base_index("model_stock", base_index, len(entries))
    s = _shared("model_stock", params, shared)
    aligned = _aligned(entries, per_input)
    donors = [e for i, e in enumerate(aligned) if i != b]
    return model_stock_merge(aligned[b], donors, filter_wise=bool(s["filter_wise"]))


def _passthrough(
    params: tuple[Param, ...],
    entries: Sequence[torch.Tensor],
    base_index: int | None,
    per_input: Sequence[Mapping[str, Any]],
    shared: Mapping[str, Any],
    *,
    generator: torch.Generator | None = None,
    deltas: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    if len(entries) != 1:
        raise ConfigError(f"passthrough takes exactly one model per tensor; got {len(entries)}.")
    (entry,) = _aligned(entries, per_input)
    scale = _per_model("passthrough", params, per_input[0], 0, False)["scale"]
    return passthrough_merge(entry, None if scale is None else float(scale))


def _task_vectors(
    name: str,
    sparsifier: Sparsifier | None,
    consensus: bool,
    params: tuple[Param, ...],
    entries: Sequence[torch.Tensor],
    base_index: int | None,
    per_input: Sequence[Mapping[str, Any]],
    shared: Mapping[str, Any],
    *,
    generator: torch.Generator | None = None,
    deltas: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    b = _base_index(name, base_index, len(entries))
    s = _shared(name, params, shared)
    aligned = _aligned(entries, per_input)
    donor_ids = [i for i in range(len(entries)) if i != b]
    resolved = [_per_model(name, params, per_input[i], i, False) for i in donor_ids]
    donor_deltas = None
    if deltas is not None:
        donor_deltas = []
        for i in donor_ids:
            if deltas[i] is None:
                raise ValueError(f"deltas[{i}] is None but entry {i} is not the base")
            donor_deltas.append(deltas[i])
    return task_vector_merge(
        aligned[b],
        [aligned[i] for i in donor_ids],
        [float(r["weight"]) for r in resolved],
        sparsifier=sparsifier,
        consensus=consensus,
        normalize=bool(s["normalize"]),
        rescale=bool(s["rescale"]),
        lambda_=float(s["lambda"]),
        densities=[float(r["density"]) for r in resolved],
        gammas=[float(r.get("gamma", 0.0)) for r in resolved],
        epsilons=[float(r.get("epsilon", 0.0)) for r in resolved],
        deltas=donor_deltas,
        generator=generator,
    )


def _bind(fn: Callable[..., torch.Tensor], *args: Any) -> MergeFn:
    """``fn`` with its method's declarations bound in front, leaving the uniform contract."""
    return functools.partial(fn, *args)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# The methods.
# ------------------------------------------------------------------------------------------------


def _build() -> dict[str, MergeMethod]:
    methods: list[MergeMethod] = []

    p = (
        _weight(includes_base=True),
        Param("normalize", bool, True, per_model=False, doc="Divide by the sum of weights."),
    )
    methods.append(
        MergeMethod("linear", p, needs_base=False, min_models=1, max_models=None,
                    stochastic=False, merge=_bind(_linear, p),
                    doc="Weighted average of the models (the base, if any, is one of them).")
    )

    p = (
        Param("t", float, None, per_model=False, required=True, search_range=_UNIT,
              doc="Interpolation position: 0 is the base, 1 the other model."),
    )
    methods.append(
        MergeMethod("slerp", p, needs_base=True, min_models=2, max_models=2,
                    stochastic=False, merge=_bind(_slerp, p),
                    doc="Spherical interpolation between the base and one other model.")
    )

    family = [
        # name, sparsifier, sign consensus, default normalize, default rescale
        ("task_arithmetic", None, False, False, False),
        ("ties", Sparsifier.MAGNITUDE, True, True, False),
        ("dare_ties", Sparsifier.RANDOM, True, False, True),
        ("dare_linear", Sparsifier.RANDOM, False, False, True),
        ("breadcrumbs", Sparsifier.MAGNITUDE_OUTLIERS, False, False, False),
        ("breadcrumbs_ties", Sparsifier.MAGNITUDE_OUTLIERS, True, False, False),
        ("della", Sparsifier.DELLA_MAGPRUNE, True, True, True),
        ("della_linear", Sparsifier.DELLA_MAGPRUNE, False, False, True),
    ]
    for name, sparsifier, consensus, normalize, rescale in family:
        p = _task_vector_params(normalize=normalize, rescale=rescale, sparsifier=sparsifier)
        methods.append(
            MergeMethod(
                name, p, needs_base=True, min_models=1, max_models=None,
                stochastic=sparsifier in (Sparsifier.RANDOM, Sparsifier.DELLA_MAGPRUNE),
                merge=_bind(_task_vectors, name, sparsifier, consensus, p),
                doc="Task vectors from the base, sparsified by "
                + (sparsifier.value if sparsifier else "nothing")
                + (", merged with sign consensus." if consensus else ", summed."),
            )
        )

    p = (
        Param("filter_wise", bool, False, per_model=False,
              doc="Compute the interpolation ratio per row instead of per tensor."),
    )
    methods.append(
        MergeMethod("model_stock", p, needs_base=True, min_models=3, max_models=None,
                    stochastic=False, merge=_bind(_model_stock, p),
                    doc="Moves from the base toward the donors' mean as far as they agree.")
    )

    p = (
        Param("scale", float, None, per_model=True, includes_base=True,
              doc="Multiply the tensor by this; unset leaves it unchanged."),
    )
    methods.append(
        MergeMethod("passthrough", p, needs_base=False, min_models=1, max_models=1,
                    stochastic=False, merge=_bind(_passthrough, p),
                    doc="Copies one model's tensor (optionally scaled); used for layer stacking.")
    )
    return {m.name: m for m in methods}


#: Every merge method evomerge computes, by mergekit's name.
METHODS: dict[str, MergeMethod] = _build()


def get_method(name: str) -> MergeMethod:
    """The method called ``name``; ConfigError naming it, with close matches, when unknown."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown merge method {name!r}; evomerge supports {', '.join(method_names())}."
            + close_matches(str(name), METHODS)
        ) from None


def method_names() -> list[str]:
    """All method names, sorted."""
    return sorted(METHODS)
