"""The one registry of merge methods: names, parameters, input rules, and per-tensor merge.

Each entry declares its parameters the way mergekit 0.1.5 does (same names, defaults and scopes),
so configs parse to what mergekit would read, search spaces can be derived from the declarations
(``Param.search_range``), out-of-range values can be refused from them (``Param.valid_range``),
and an exported recipe means what the search evaluated.

Every method is one function of one inputs type, as mergekit 0.1.5's ``@merge_method`` gives every
method one shape: ``MergeMethod.merge(MergeInputs) -> Tensor``. ``MergeInputs`` carries the input
tensors of one output tensor in config order, where the base sits among them, the per-model and
per-tensor parameters resolved for this tensor, and optionally a generator (stochastic methods)
and precomputed task vectors (search workers keep them resident). ``merge`` does what every
method needs before its kernel runs, once: it aligns the inputs to their promoted dtype (as
mergekit does), checks that a base is present where the method needs one, and fills in declared
defaults (a missing required parameter raises ConfigError naming it). The kernel then reads
complete, aligned inputs and does only its own arithmetic.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
else:
    from evomerge.lazy_torch import torch  # imported on first use: see evomerge.lazy_torch

from evomerge.errors import ConfigError, close_matches
from evomerge.merge.methods import (
    arcee_fusion_merge,
    linear_merge,
    model_stock_merge,
    nearswap_merge,
    passthrough_merge,
    slerp_merge,
)
from evomerge.merge.safetensors_io import FLOAT_CODES, promote_codes
from evomerge.merge.sparsify import Sparsifier
from evomerge.merge.spherical import karcher_merge, multislerp_merge, nuslerp_merge
from evomerge.merge.task_vector_variants import ram_merge, ramplus_tl_merge, sce_merge
from evomerge.merge.task_vectors import task_vector_merge

#: Any finite value (weights, lambda, scale): the method is defined for all of them.
ANY = (-math.inf, math.inf)
#: Nonnegative values (thresholds, tolerances, iteration counts).
NONNEGATIVE = (0.0, math.inf)
#: Fractions and interpolation positions.
UNIT = (0.0, 1.0)


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method, as mergekit declares it.

    ``per_model`` parameters are resolved for each input model (mergekit's INPUT and NON_BASE
    scopes); ``includes_base`` marks those the base entry receives too (INPUT). The others are one
    value per output tensor (SHARED). ``search_range`` is the interval a search explores by
    default, None for parameters not worth searching (flags, no-ops, numerical tolerances).
    ``valid_range`` is the closed interval (infinite ends allowed) of values the method is
    defined for; None only for flags, where any true/false is valid. mergekit itself declares
    plain floats and accepts anything, computing NaN or nonsense out of range; these bounds let
    evomerge refuse such values up front. A constraint between parameters (DELLA's density +/-
    epsilon within (0, 1)) is checked where both are known, at merge time.
    """

    name: str
    kind: type
    default: Any
    per_model: bool
    includes_base: bool = False
    required: bool = False
    search_range: tuple[float, float] | None = None
    valid_range: tuple[float, float] | None = None
    doc: str = ""

    def in_valid_range(self, value: float) -> bool:
        """Whether ``value`` lies in ``valid_range`` (always True for flags)."""
        if self.valid_range is None:
            return True
        low, high = self.valid_range
        return low <= value <= high


class BaseRule(str, enum.Enum):
    """What a method does with the base model (mergekit's BasePolicy)."""

    REQUIRED = "required"  # needs a base among its inputs (task vectors, slerp, model_stock)
    OPTIONAL = "optional"  # works on offsets from the base when there is one (nuslerp, multislerp)
    IGNORED = "ignored"  # the base, if listed, is merged like any other input (linear, karcher)


@dataclass(frozen=True)
class MergeInputs:
    """Everything one output tensor's merge reads: the one argument of every method.

    ``entries`` are the input tensors in config order, the base among them at ``base_index``
    (None when there is none); ``per_input[i]`` holds the per-model parameters of ``entries[i]``
    (for the base only those with ``includes_base``); ``shared`` the per-tensor ones.
    ``deltas[i]`` is ``entries[i] - base`` precomputed (None at the base), which the task-vector
    methods use instead of recomputing; ``generator`` drives the stochastic methods.
    ``tensor_name`` is the output tensor's name, for messages.
    """

    entries: Sequence[torch.Tensor]
    base_index: int | None
    per_input: Sequence[Mapping[str, Any]]
    shared: Mapping[str, Any] = field(default_factory=dict)
    generator: torch.Generator | None = None
    deltas: Sequence[torch.Tensor | None] | None = None
    tensor_name: str = ""

    @property
    def base(self) -> torch.Tensor:
        """The base entry; only methods that require a base call this (``merge`` checked it)."""
        assert self.base_index is not None
        return self.entries[self.base_index]

    @property
    def donor_indices(self) -> list[int]:
        """Indices of the entries that are not the base, in config order."""
        return [i for i in range(len(self.entries)) if i != self.base_index]

    @property
    def donors(self) -> list[torch.Tensor]:
        return [self.entries[i] for i in self.donor_indices]

    def donor_values(self, name: str) -> list[Any]:
        """Parameter ``name`` of each donor, in config order."""
        return [self.per_input[i][name] for i in self.donor_indices]

    def donor_deltas(self) -> list[torch.Tensor] | None:
        """The donors' precomputed task vectors, or None when the caller gave none."""
        if self.deltas is None:
            return None
        out = []
        for i in self.donor_indices:
            delta = self.deltas[i]
            if delta is None:
                raise ValueError(f"deltas[{i}] is None but entry {i} is not the base")
            out.append(delta)
        return out


#: A method's own arithmetic, given complete and aligned inputs.
Kernel = Callable[[MergeInputs], "torch.Tensor"]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: its declared parameters, its input rules, and its per-tensor merge.

    ``min_models`` and ``max_models`` count every entry of one output tensor, the base included
    (mergekit's min_inputs/max_inputs); ``min_donors`` and ``max_donors`` count the entries that
    are not the base (mergekit's min_non_base/max_non_base; None: no bound). ``stochastic``
    methods draw from the generator, so a recipe's result depends on a seed. ``widens_to_float32``
    methods return at least float32 whatever their inputs (a float32 mask or boost enters their
    arithmetic); mergekit writes a result in its own dtype when no ``out_dtype`` is set, so the
    planner must know (:meth:`result_dtype`).
    """

    name: str
    params: tuple[Param, ...]
    base_rule: BaseRule
    min_models: int
    max_models: int | None
    stochastic: bool
    kernel: Kernel
    min_donors: int | None = None
    max_donors: int | None = None
    widens_to_float32: bool = False
    doc: str = ""

    @property
    def needs_base(self) -> bool:
        return self.base_rule is BaseRule.REQUIRED

    def result_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        """The dtype of this method's result for inputs aligned to ``input_dtype``."""
        if self.widens_to_float32 and input_dtype.is_floating_point:
            return torch.promote_types(input_dtype, torch.float32)
        return input_dtype

    def result_code(self, input_code: str) -> str:
        """:meth:`result_dtype` on safetensors dtype codes (without torch, for float codes)."""
        if self.widens_to_float32 and input_code in FLOAT_CODES:
            return promote_codes(input_code, "F32")
        return input_code

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
        _check_count(self.name, "models (base included)", count, self.min_models, self.max_models)
        if self.min_donors is not None or self.max_donors is not None:
            donors = count - int(has_base and self.base_rule is not BaseRule.IGNORED)
            _check_count(self.name, "models besides the base", donors, self.min_donors or 0,
                         self.max_donors)

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        """Merge one output tensor: align, check the base, fill defaults, run the kernel."""
        return self.kernel(self.complete(inputs))

    def complete(self, inputs: MergeInputs) -> MergeInputs:
        """``inputs`` with entries aligned to their promoted dtype and every parameter resolved.

        For a method that ignores the base, ``base_index`` becomes None: its base is an input
        like the others.
        """
        entries = _aligned(inputs.entries, inputs.per_input)
        base_index = inputs.base_index
        if self.base_rule is BaseRule.IGNORED:
            base_index = None
        elif base_index is not None and not 0 <= base_index < len(entries):
            raise ConfigError(f"merge method {self.name!r}: base index {base_index} is not "
                              f"among its {len(entries)} inputs.")
        if self.base_rule is BaseRule.REQUIRED and base_index is None:
            raise ConfigError(f"merge method {self.name!r} needs the base among its inputs.")
        shared = {p.name: self._value(p, inputs.shared, "(one value per tensor)")
                  for p in self.params if not p.per_model}
        per_input = []
        for i, values in enumerate(inputs.per_input):
            is_base = i == base_index
            where = f"for model {i}" + (" (the base)" if is_base else "")
            per_input.append({p.name: self._value(p, values, where) for p in self.params
                              if p.per_model and (p.includes_base or not is_base)})
        return replace(inputs, entries=entries, base_index=base_index, per_input=per_input,
                       shared=shared)

    def _value(self, p: Param, values: Mapping[str, Any], where: str) -> Any:
        if p.name in values:
            return values[p.name]
        if p.required:
            raise ConfigError(f"merge method {self.name!r} needs parameter {p.name!r} {where}.")
        return p.default


def _check_count(method: str, what: str, count: int, low: int, high: int | None) -> None:
    if count >= low and (high is None or count <= high):
        return
    if high is None:
        wanted = f"at least {low}"
    elif high == low:
        wanted = f"exactly {low}"
    else:
        wanted = f"between {low} and {high}"
    raise ConfigError(f"merge method {method!r} takes {wanted} {what}; got {count}.")


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


# ------------------------------------------------------------------------------------------------
# The kernels: each reads complete, aligned MergeInputs.
# ------------------------------------------------------------------------------------------------


def _linear(x: MergeInputs) -> torch.Tensor:
    # mergekit's linear ignores which input is the base: every entry is weighted alike.
    weights = [values["weight"] for values in x.per_input]
    return linear_merge(x.entries, weights, normalize=bool(x.shared["normalize"]))


def _slerp(x: MergeInputs) -> torch.Tensor:
    if len(x.entries) != 2:
        raise ConfigError(
            f"slerp merges exactly two models, the base and one other; got {len(x.entries)}."
        )
    (other,) = x.donors
    return slerp_merge(x.base, other, float(x.shared["t"]))


def _model_stock(x: MergeInputs) -> torch.Tensor:
    return model_stock_merge(x.base, x.donors, filter_wise=bool(x.shared["filter_wise"]))


def _passthrough(x: MergeInputs) -> torch.Tensor:
    if len(x.entries) != 1:
        raise ConfigError(f"passthrough takes exactly one model per tensor; got {len(x.entries)}.")
    scale = x.per_input[0]["scale"]
    return passthrough_merge(x.entries[0], None if scale is None else float(scale))


def _task_vectors(sparsifier: Sparsifier | None, consensus: bool) -> Kernel:
    """The kernel of one task-vector method: the family differs only in these two switches."""

    def kernel(x: MergeInputs) -> torch.Tensor:
        donors = x.donor_indices
        return task_vector_merge(
            x.base,
            x.donors,
            [float(w) for w in x.donor_values("weight")],
            sparsifier=sparsifier,
            consensus=consensus,
            normalize=bool(x.shared["normalize"]),
            rescale=bool(x.shared["rescale"]),
            lambda_=float(x.shared["lambda"]),
            densities=[float(d) for d in x.donor_values("density")],
            gammas=[float(x.per_input[i].get("gamma", 0.0)) for i in donors],
            epsilons=[float(x.per_input[i].get("epsilon", 0.0)) for i in donors],
            deltas=x.donor_deltas(),
            generator=x.generator,
        )

    return kernel


def _nuslerp(x: MergeInputs) -> torch.Tensor:
    base = None if x.base_index is None else x.base
    return nuslerp_merge(x.donors, [float(w) for w in x.donor_values("weight")], base=base,
                         row_wise=bool(x.shared["nuslerp_row_wise"]),
                         flatten=bool(x.shared["nuslerp_flatten"]))


def _multislerp(x: MergeInputs) -> torch.Tensor:
    base = None if x.base_index is None else x.base
    return multislerp_merge(x.donors, [float(w) for w in x.donor_values("weight")], base=base,
                            normalize_weights=bool(x.shared["normalize_weights"]),
                            eps=float(x.shared["eps"]), tensor_name=x.tensor_name)


def _karcher(x: MergeInputs) -> torch.Tensor:
    return karcher_merge(x.entries, max_iter=int(x.shared["max_iter"]), tol=float(x.shared["tol"]))


def _sce(x: MergeInputs) -> torch.Tensor:
    return sce_merge(x.base, x.donors, select_topk=float(x.shared["select_topk"]),
                     int8_mask=bool(x.shared["int8_mask"]), deltas=x.donor_deltas())


def _ram(x: MergeInputs) -> torch.Tensor:
    return ram_merge(x.base, x.donors, epsilon=float(x.shared["epsilon"]), deltas=x.donor_deltas())


def _ramplus_tl(x: MergeInputs) -> torch.Tensor:
    return ramplus_tl_merge(x.base, x.donors, r=float(x.shared["r"]), alpha=float(x.shared["alpha"]),
                            epsilon=float(x.shared["epsilon"]), deltas=x.donor_deltas())


def _nearswap(x: MergeInputs) -> torch.Tensor:
    (other,) = x.donors
    return nearswap_merge(x.base, other, float(x.shared["t"]))


def _arcee_fusion(x: MergeInputs) -> torch.Tensor:
    (other,) = x.donors
    return arcee_fusion_merge(x.base, other)


# ------------------------------------------------------------------------------------------------
# Parameter declarations.
# ------------------------------------------------------------------------------------------------


def _weight(includes_base: bool) -> Param:
    return Param(
        "weight",
        float,
        None,
        per_model=True,
        includes_base=includes_base,
        required=True,
        search_range=UNIT,
        valid_range=ANY,
        doc="How much of this model goes into the merge (negative values subtract it).",
    )


def _flag(name: str, default: bool, doc: str) -> Param:
    return Param(name, bool, default, per_model=False, doc=doc)


_INT8_MASK = _flag("int8_mask", False,
                   "mergekit's memory option for the sign mask; it does not change the result.")


def _task_vector_params(
    *, normalize: bool, rescale: bool, sparsifier: Sparsifier | None
) -> tuple[Param, ...]:
    params = [
        _INT8_MASK,
        _flag("normalize", normalize, "Divide the mixed task vector by the sum of (agreeing) weights."),
        _flag("rescale", rescale, "Rescale sparsified task vectors to keep their L1 norm (no effect "
              "without sparsification)."),
        Param("lambda", float, 1.0, per_model=False, search_range=(0.5, 1.5), valid_range=ANY,
              doc="Scale of the mixed task vector before it is added to the base."),
        _weight(includes_base=False),
        Param("density", float, 1.0, per_model=True,
              search_range=None if sparsifier is None else (0.1, 1.0), valid_range=UNIT,
              doc="Fraction of each task vector kept."
              + (" Accepted and ignored here, as in mergekit." if sparsifier is None else "")),
    ]
    if sparsifier is Sparsifier.MAGNITUDE_OUTLIERS:
        params.append(
            Param("gamma", float, 0.01, per_model=True, search_range=(0.0, 0.1), valid_range=UNIT,
                  doc="Fraction of largest-magnitude entries dropped as outliers.")
        )
    if sparsifier is Sparsifier.DELLA_MAGPRUNE:
        params.append(
            Param("epsilon", float, 0.15, per_model=True, search_range=(0.0, 0.2),
                  valid_range=(0.0, 0.5),
                  doc="Half-width of the keep probabilities around density; density +/- epsilon "
                  "must lie within (0, 1).")
        )
    return tuple(params)


# ------------------------------------------------------------------------------------------------
# The methods.
# ------------------------------------------------------------------------------------------------


def _build() -> dict[str, MergeMethod]:
    methods: list[MergeMethod] = [
        MergeMethod(
            "linear",
            (_weight(includes_base=True), _flag("normalize", True, "Divide by the sum of weights.")),
            BaseRule.IGNORED, min_models=1, max_models=None, stochastic=False, kernel=_linear,
            doc="Weighted average of the models (the base, if any, is one of them).",
        ),
        MergeMethod(
            "slerp",
            (Param("t", float, None, per_model=False, required=True, search_range=UNIT,
                   valid_range=UNIT, doc="Interpolation position: 0 is the base, 1 the other model."),),
            BaseRule.REQUIRED, min_models=2, max_models=2, stochastic=False, kernel=_slerp,
            doc="Spherical interpolation between the base and one other model.",
        ),
    ]

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
        methods.append(
            MergeMethod(
                name,
                _task_vector_params(normalize=normalize, rescale=rescale, sparsifier=sparsifier),
                BaseRule.REQUIRED, min_models=1, max_models=None,
                stochastic=sparsifier in (Sparsifier.RANDOM, Sparsifier.DELLA_MAGPRUNE),
                kernel=_task_vectors(sparsifier, consensus),
                doc="Task vectors from the base, sparsified by "
                + (sparsifier.value if sparsifier else "nothing")
                + (", merged with sign consensus." if consensus else ", summed."),
            )
        )

    methods += [
        MergeMethod(
            "model_stock",
            (_flag("filter_wise", False,
                   "Compute the interpolation ratio per row instead of per tensor."),),
            BaseRule.REQUIRED, min_models=3, max_models=None, stochastic=False, kernel=_model_stock,
            doc="Moves from the base toward the donors' mean as far as they agree.",
        ),
        MergeMethod(
            "passthrough",
            (Param("scale", float, None, per_model=True, includes_base=True, valid_range=ANY,
                   doc="Multiply the tensor by this; unset leaves it unchanged."),),
            BaseRule.IGNORED, min_models=1, max_models=1, stochastic=False, kernel=_passthrough,
            doc="Copies one model's tensor (optionally scaled); used for layer stacking.",
        ),
        MergeMethod(
            "nuslerp",
            (_weight(includes_base=False),
             _flag("nuslerp_row_wise", False, "Interpolate each column vector (along the first "
                   "axis) separately; only when nuslerp_flatten is false."),
             _flag("nuslerp_flatten", True, "Interpolate the whole tensor as one vector; false "
                   "interpolates row (or, with nuslerp_row_wise, column) vectors separately.")),
            BaseRule.OPTIONAL, min_models=1, max_models=None, min_donors=2, max_donors=2,
            stochastic=False, kernel=_nuslerp,
            doc="Spherical interpolation of two models at t = w1 / (w0 + w1), of their task "
            "vectors when there is a base.",
        ),
        MergeMethod(
            "multislerp",
            (_weight(includes_base=False),
             _flag("normalize_weights", True, "Divide the weights by their sum."),
             Param("eps", float, 1e-8, per_model=False, valid_range=NONNEGATIVE,
                   doc="Added to norms before dividing by them.")),
            BaseRule.OPTIONAL, min_models=1, max_models=None, min_donors=1,
            stochastic=False, kernel=_multislerp,
            doc="Weighted spherical mean of any number of models (of their task vectors when "
            "there is a base), through the tangent space at their normalised weighted mean.",
        ),
        MergeMethod(
            "karcher",
            (Param("max_iter", int, 10, per_model=False, valid_range=NONNEGATIVE,
                   doc="Most iterations of the Riemannian mean."),
             Param("tol", float, 1e-5, per_model=False, valid_range=NONNEGATIVE,
                   doc="Stop when the tangent step is shorter than this; inputs with smaller "
                   "norms are left out of the direction.")),
            BaseRule.IGNORED, min_models=1, max_models=None, stochastic=False, kernel=_karcher,
            doc="Equal-weight Karcher (Riemannian) mean of the models' directions on the unit "
            "sphere, scaled by their mean norm; the base, if listed, is one of the inputs.",
        ),
        MergeMethod(
            "sce",
            (_INT8_MASK,
             Param("select_topk", float, 1.0, per_model=False, search_range=(0.1, 1.0),
                   valid_range=UNIT,
                   doc="Fraction of entries kept: those whose task vectors vary most across "
                   "the donors.")),
            BaseRule.REQUIRED, min_models=1, max_models=None, stochastic=False, kernel=_sce,
            doc="Select (entries of high variance across donors), Calculate (weights from each "
            "task vector's mean square), Erase (minority signs), then a weighted mean.",
        ),
        MergeMethod(
            "ram",
            (Param("epsilon", float, 1e-5, per_model=False, valid_range=NONNEGATIVE,
                   doc="A task-vector entry counts as changed when its magnitude exceeds this."),),
            BaseRule.REQUIRED, min_models=1, max_models=None, stochastic=False, kernel=_ram,
            doc="Reinforced Agent Merging: entries changed by one donor keep its change; "
            "entries changed by several get the mean of their changes.",
        ),
        MergeMethod(
            "ramplus_tl",
            (Param("r", float, 0.1, per_model=False, search_range=UNIT, valid_range=NONNEGATIVE,
                   doc="Strength of the boost of a donor's unique entries."),
             Param("alpha", float, 0.2, per_model=False, search_range=UNIT,
                   valid_range=NONNEGATIVE,
                   doc="Cap on the shared-to-unique ratio that sets the boost."),
             Param("epsilon", float, 1e-5, per_model=False, valid_range=NONNEGATIVE,
                   doc="A task-vector entry counts as changed when its magnitude exceeds this.")),
            BaseRule.REQUIRED, min_models=1, max_models=None, stochastic=False, kernel=_ramplus_tl,
            widens_to_float32=True,
            doc="RAM with each donor's unique entries scaled by 1 + r * min(alpha, shared / "
            "unique count), per tensor.",
        ),
        MergeMethod(
            "nearswap",
            (Param("t", float, None, per_model=False, required=True, search_range=(0.0, 0.01),
                   valid_range=NONNEGATIVE,
                   doc="Distance scale: an entry within t of the base takes the other model's "
                   "value, farther ones move toward it by t / |difference|."),),
            BaseRule.REQUIRED, min_models=2, max_models=2, stochastic=False, kernel=_nearswap,
            doc="Takes the other model's values where they are near the base's.",
        ),
        MergeMethod(
            "arcee_fusion",
            (),
            BaseRule.REQUIRED, min_models=2, max_models=2, stochastic=False, kernel=_arcee_fusion,
            widens_to_float32=True,
            doc="Keeps the other model's changes whose importance (|change| times the rows' "
            "softmax KL divergence) is an upper outlier (above median + 1.5 IQR).",
        ),
    ]
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
