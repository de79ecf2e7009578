"""Consensus merging with TALL masks: keep only the entries that matter to at least k tasks."""

from __future__ import annotations

import torch

from mergeflow.methods.base import LAMBDA, WEIGHT, KernelInput, MergeMethod, ParamSpec, as_weight, register


def consensus_kernel(x: KernelInput) -> torch.Tensor:
    assert x.base is not None
    base = x.base
    deltas = [(m - base).mul_(as_weight(w, base)) for m, w in zip(x.models, x.params["weight"])]
    mtl = torch.stack(deltas).sum(dim=0)  # the multi-task vector τ_MTL (task arithmetic sum)
    votes = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
    for delta, lam_t in zip(deltas, x.params["tall_lambda"]):
        # TALL mask of task t: entries where its own vector dominates the rest of the multi-task vector
        votes += (delta.abs() >= as_weight(lam_t, base) * (mtl - delta).abs()).to(torch.int32)
    keep = votes >= int(x.shared.get("k", 2))
    return base + float(x.shared.get("lambda", 1.0)) * (mtl * keep)


CONSENSUS = register(MergeMethod(
    name="consensus",
    kernel=consensus_kernel,
    params=(
        WEIGHT,
        LAMBDA,
        ParamSpec("tall_lambda", float, 0.4, per_model=True, low=0.0,
                  help="TALL mask threshold λ_t: keep |Δ_t| >= λ_t·|τ_MTL − Δ_t|"),
        ParamSpec("k", int, 2, low=1, help="minimum number of tasks whose TALL mask keeps an entry"),
    ),
    summary="task arithmetic restricted to the entries that at least k tasks' TALL masks keep",
    paper="Wang et al., Localizing Task Information for Improved Model Merging and Compression, ICML 2024 "
          "(arXiv:2405.07813)",
    min_models=2,
))
