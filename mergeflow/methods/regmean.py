"""RegMean: per linear layer, the weight minimising Σ_t ‖X_t W_tᵀ − X_t Wᵀ‖² given the Gram matrices of its inputs.

``W = (Σ_t W_t G̃_t)(Σ_t G̃_t)⁻¹``, solved in float64 as ``(Σ_t G̃_t) Wᵀ = Σ_t G̃_t W_tᵀ`` (a ridge of
``1e-6 · mean(diag)`` is added if the system is singular, docs/methods.md D-27). The Grams come from the ``regmean`` importance
estimator as the per-model entry-level parameter ``gram`` (``[in, in]`` for a weight stored ``[out, in]``, as
nn.Linear does; ``[1, in, in]`` for one stored ``[in, out]``, as GPT-2's Conv1D does); tensors without one (biases,
norms, embeddings, a tied LM head) are averaged. Without any Gram the method refuses to run: it is data-aware and has no data-free meaning.
"""

from __future__ import annotations

import torch

from mergeflow.coefficients import CoefficientsError
from mergeflow.errors import RecipeError
from mergeflow.methods.base import KernelInput, MergeMethod, register

RIDGE = 1e-6


def regmean_kernel(x: KernelInput) -> torch.Tensor:
    grams = x.params.get("gram")
    if grams is None:
        raise RecipeError("merge_method regmean needs the Gram matrices of the experts' linear layers: add "
                          "`importance: {estimator: regmean}` (with each model's `task`), or pass the coefficients "
                          "of a regmean estimator run")
    if any(g is None for g in grams) or x.models[0].dim() != 2:
        return _average(x.models)
    # a Gram [in, in] goes with a weight [out, in] (nn.Linear); a Gram [1, in, in] with a weight [in, out] (Conv1D)
    transposed = isinstance(grams[0], torch.Tensor) and grams[0].dim() == 3
    mats = [m.to(torch.float64) if transposed else m.to(torch.float64).T for m in x.models]  # [in, out] each
    in_features = mats[0].shape[0]
    g64 = []
    for i, g in enumerate(grams):
        expected = (1, in_features, in_features) if transposed else (in_features, in_features)
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != expected:
            shape = tuple(g.shape) if isinstance(g, torch.Tensor) else g
            raise CoefficientsError(f"regmean: the Gram of model {i} for {x.name} is {shape}, expected {expected} "
                                    f"for a weight of shape {tuple(x.models[0].shape)}")
        g64.append(g.reshape(in_features, in_features).to(device=mats[0].device, dtype=torch.float64))
    total = torch.stack(g64).sum(0)
    rhs = sum(g @ m for g, m in zip(g64, mats))  # Σ_t G̃_t W_tᵀ  [in, out]
    solved = solve_gram(total, rhs)
    if solved is None:  # every Gram is zero: no data reached this layer
        return _average(x.models)
    return (solved if transposed else solved.T).to(x.models[0].dtype)


def solve_gram(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor | None:
    """``gram⁻¹ rhs`` in float64; on a singular (or non-finite) solution retry with a ``1e-6·mean(diag)`` ridge.
    None when ``gram`` is zero."""
    try:
        out = torch.linalg.solve(gram, rhs)
        if torch.isfinite(out).all():
            return out
    except torch.linalg.LinAlgError:
        pass
    ridge = RIDGE * float(gram.diagonal().mean())
    if not ridge > 0:
        return None
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * eye, rhs)


def _average(models: list[torch.Tensor]) -> torch.Tensor:
    acc = torch.zeros_like(models[0])
    for m in models:
        acc.add_(m)
    return acc.div_(len(models))


REGMEAN = register(MergeMethod(
    name="regmean",
    kernel=regmean_kernel,
    params=(),
    requires_estimator="regmean",
    summary="linear layers: W = (Σ W_t G̃_t)(Σ G̃_t)⁻¹ from the Gram matrices of their inputs (importance "
            "estimator regmean); other tensors averaged",
    paper="Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023 (arXiv:2212.09849)",
    needs_base=False,
    min_models=1,
    partition_params=("gram",),
))
