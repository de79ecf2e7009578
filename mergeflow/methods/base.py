"""What a merge method is: a pure per-tensor kernel plus a declarative parameter spec, in one registry.

A kernel sees one output tensor at a time: the base tensor, the stacked expert tensors, the per-expert parameters
resolved for this tensor (a float, or a tensor broadcastable to the tensor's shape when coefficients come per
partition from a data-aware estimator) and the shared parameters. It returns the merged tensor in the compute dtype.
Adding a method is one module that defines a kernel and calls ``register(MergeMethod(...))`` (keeping the result
as a module constant), plus one line in :data:`BUILTIN_METHODS` naming that constant (``"name": "module:CONSTANT"``):
the registry imports the module the first time the method is asked for, so listing or checking one method never
imports every kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mergeflow.errors import RecipeError
from mergeflow.registry import Registry

ParamValue = float | torch.Tensor


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a method. ``per_model`` parameters take one value per non-base model."""

    name: str
    type: type
    default: Any = None
    per_model: bool = False
    default_compat: Any = None  # a different default in mergekit_compat mode (None: same as ``default``)
    help: str = ""
    choices: tuple[Any, ...] | None = None
    # validation bounds, inclusive unless the *_open flag says otherwise
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    @property
    def required(self) -> bool:
        return self.default is None

    def default_for(self, compat: bool) -> Any:
        return self.default_compat if compat and self.default_compat is not None else self.default

    def check(self, value: Any, where: str) -> Any:
        """Coerce and validate one scalar value; raise RecipeError naming ``where``."""
        if self.type is bool:
            if not isinstance(value, bool):
                raise RecipeError(f"{where}: expected true/false, got {value!r}")
            return value
        if self.type is str:
            if not isinstance(value, str):
                raise RecipeError(f"{where}: expected a string, got {value!r}")
            if self.choices and value not in self.choices:
                raise RecipeError(f"{where}: must be one of {', '.join(map(str, self.choices))}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            try:
                value = float(value)  # YAML may give "1e-3" as a string
            except (TypeError, ValueError):
                raise RecipeError(f"{where}: expected a number, got {value!r}") from None
        value = self.type(value)
        if value != value:  # NaN
            raise RecipeError(f"{where}: NaN is not a valid value")
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise RecipeError(f"{where}: must be in {self.range_text()}, got {value}")
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise RecipeError(f"{where}: must be in {self.range_text()}, got {value}")
        return value

    def range_text(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"


@dataclass
class KernelInput:
    """Everything a kernel needs for one output tensor. ``base`` and ``models`` are read-only: they may share
    memory with the memory-mapped checkpoint files, so kernels never modify them in place."""

    name: str
    base: torch.Tensor | None
    models: list[torch.Tensor]  # the non-base models in recipe order, compute dtype
    params: dict[str, list[ParamValue]]  # per-model parameters, aligned with ``models``
    shared: dict[str, Any]  # shared parameters resolved for this tensor
    generators: list[torch.Generator] | None = None  # one per model, seeded by (seed, tensor, model id)
    thresholds: list[float] | None = None  # global |delta| trim thresholds per model (global TIES)
    compat: bool = False  # reproduce mergekit 0.1.x semantics
    dtype: torch.dtype = torch.float32  # compute dtype; raw inputs (streams_raw_inputs) are converted block by block
    out_dtype: torch.dtype | None = None  # a kernel may return this dtype directly (else the engine casts)
    conv1d: bool = False  # a 2-D weight stored [in, out] (GPT-2's Conv1D) rather than nn.Linear's [out, in]

    def deltas(self) -> list[torch.Tensor]:
        assert self.base is not None
        return [m - self.base for m in self.models]


Kernel = Callable[[KernelInput], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    kernel: Kernel
    params: tuple[ParamSpec, ...]
    summary: str
    paper: str
    needs_base: bool = True
    random: bool = False
    min_models: int = 1
    max_models: int | None = None
    mergekit_name: str | None = None  # the mergekit method with the same semantics in compat mode
    # paper mode gets the inputs in their stored dtype and converts them block by block (no full fp32 copies)
    streams_raw_inputs: bool = False
    # with normalize on, the merged vector is divided by the sum of the weights (so they must not sum to zero)
    normalizes_by_weight_sum: bool = False
    # mergekit replaces a zero weight sum by 1 (a plain weighted sum) for this method, so compat mode accepts it
    compat_guards_zero_weight_sum: bool = False
    # methods that trim by a global magnitude threshold ask the engine for per-model thresholds at this density param
    needs_global_threshold: Callable[[dict[str, Any]], bool] = field(default=lambda shared: False)
    # per-model parameters the kernel accepts per partition or per entry (a tensor broadcastable to the tensor),
    # i.e. the ones a data-aware Coefficients artifact may set
    partition_params: tuple[str, ...] = ()
    # the estimator whose coefficients the method cannot run without (RegMean's Gram matrices), or None
    requires_estimator: str | None = None
    # elements of working memory one tensor of this shape needs with K experts beyond the engine's streaming estimate
    # (SVD factors, optimiser state); the engine adds the largest over the tensors to its peak-memory estimate
    workspace_elements: Callable[[tuple[int, ...], int], int] = field(default=lambda shape, k: 0)
    # bytes allocated at the peak of one tensor's merge beyond the inputs the engine hands the kernel, up to the
    # merged tensor in the output dtype: ``(shape, k, compat, item, out_item)``, ``item`` the bytes of an element
    # in the dtype the kernel computes in (the stored dtype in compat mode), ``out_item`` in the output's. The
    # default assumes a K-way stacked buffer, a working copy, the result and its conversion to the output dtype;
    # methods that know better say so (the engine's memory estimate, ``mergeflow check``)
    kernel_bytes: Callable[[tuple[int, ...], int, bool, int, int], int] = field(
        default=lambda shape, k, compat, item, out_item: (k + 2) * math.prod(shape) * item
        + (math.prod(shape) * out_item if out_item != item else 0))
    # the per-tensor arithmetic (an SVD, optimiser steps) takes many times longer than reading and writing the
    # tensor: the engine gives torch every core instead of keeping one for the reader and writer threads
    compute_bound: bool = False

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def per_model_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.per_model)

    @property
    def shared_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if not p.per_model)


def _unknown_method(name: str, known: list[str]) -> RecipeError:
    return RecipeError(f"merge_method: unknown method {name!r}; known methods: {', '.join(known)}")


# The built-in methods: name -> "module:attribute", imported on first use. Adding a method is one module that
# defines its kernel and calls ``register(MergeMethod(...))``, plus its line here.
BUILTIN_METHODS: dict[str, str] = {
    "linear": "mergeflow.methods.linear:LINEAR",
    "weight_average": "mergeflow.methods.linear:LINEAR",
    "model_stock": "mergeflow.methods.model_stock:MODEL_STOCK",
    "regmean": "mergeflow.methods.regmean:REGMEAN",
    "slerp": "mergeflow.methods.slerp:SLERP",
    "nuslerp": "mergeflow.methods.slerp:NUSLERP",
    "consensus": "mergeflow.methods.tall:CONSENSUS",
    "task_arithmetic": "mergeflow.methods.task_arithmetic:TASK_ARITHMETIC",
    "ties": "mergeflow.methods.task_arithmetic:TIES",
    "dare_linear": "mergeflow.methods.task_arithmetic:DARE_LINEAR",
    "dare_ties": "mergeflow.methods.task_arithmetic:DARE_TIES",
    "magnitude_prune": "mergeflow.methods.task_arithmetic:MAGNITUDE_PRUNE",
    "breadcrumbs": "mergeflow.methods.task_arithmetic:BREADCRUMBS",
    "breadcrumbs_ties": "mergeflow.methods.task_arithmetic:BREADCRUMBS_TIES",
    "della": "mergeflow.methods.task_arithmetic:DELLA",
    "della_linear": "mergeflow.methods.task_arithmetic:DELLA_LINEAR",
    "tsv": "mergeflow.methods.tsv:TSV",
    "iso_c": "mergeflow.methods.iso:ISO_C",
    "iso_cts": "mergeflow.methods.iso:ISO_CTS",
    "wudi": "mergeflow.methods.wudi:WUDI",
}

METHODS: Registry[MergeMethod] = Registry("merge method", BUILTIN_METHODS, unknown=_unknown_method)


def register(method: MergeMethod, aliases: Sequence[str] = ()) -> MergeMethod:
    """Register ``method`` under its name (and ``aliases``); returns it, so a module can keep it as a constant."""
    return METHODS.register(method.name, method, aliases=tuple(aliases))


def get_method(name: str) -> MergeMethod:
    return METHODS.lookup(name)


def all_methods() -> list[MergeMethod]:
    """Every method once (aliases folded), sorted by name."""
    return sorted(METHODS.unique(), key=lambda m: m.name)


# Parameter specs shared by several methods
WEIGHT = ParamSpec("weight", float, 1.0, per_model=True, help="scale of this model's task vector")
LAMBDA = ParamSpec("lambda", float, 1.0, help="scale of the merged task vector (θ = θ_b + λ·τ)")


def density_param(default: float, what: str = "fraction of each task vector's entries kept") -> ParamSpec:
    return ParamSpec("density", float, default, per_model=True, help=what, low=0.0, high=1.0, low_open=True)


def as_weight(value: ParamValue, like: torch.Tensor) -> torch.Tensor | float:
    """A per-model parameter as something that broadcasts against ``like``."""
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=like.dtype)
    return float(value)
