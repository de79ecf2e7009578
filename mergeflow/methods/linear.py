"""Weight averaging (model soup): θ = Σ w_t θ_t / Σ w_t over full weights; no base needed."""

from __future__ import annotations

import torch

from mergeflow.methods.base import KernelInput, MergeMethod, ParamSpec, as_weight, register


def linear_kernel(x: KernelInput) -> torch.Tensor:
    normalize = x.shared.get("normalize", True)
    if x.compat:
        return _linear_compat(x.models, [float(w) for w in x.params["weight"]], normalize)
    acc = torch.zeros_like(x.models[0])
    wsum: torch.Tensor | float = 0.0
    for model, w in zip(x.models, x.params["weight"]):
        w = as_weight(w, model)
        acc.add_(model * w)
        wsum = wsum + w
    if normalize:
        acc.div_(wsum)  # zero-sum weights are refused when the recipe is validated
    return acc


def _linear_compat(models: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """mergekit 0.1.5: accumulate in fp32 (fp64 for fp64 inputs) with addcmul_, divide by the weight sum, cast once."""
    first = models[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    w = torch.tensor(weights, dtype=dtype)
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, coefficient in zip(models, w.unbind(0)):
        result.addcmul_(tensor, coefficient)
    if normalize:
        result.div_(w.sum())
    return result.to(first.dtype)


LINEAR = register(MergeMethod(
    name="linear",
    kernel=linear_kernel,
    params=(
        ParamSpec("weight", float, 1.0, per_model=True, help="weight of this model (uniform by default)"),
        ParamSpec("normalize", bool, True, help="divide by the sum of the weights"),
    ),
    summary="weighted average of full weights (uniform: model soup)",
    paper="Wortsman et al., Model soups, ICML 2022 (arXiv:2203.05482)",
    needs_base=False,
    min_models=1,
    mergekit_name="linear",
    normalizes_by_weight_sum=True,
    partition_params=("weight",),  # per-entry weights: Fisher merging is a weighted average with F_t as weights
), aliases=("weight_average",))
