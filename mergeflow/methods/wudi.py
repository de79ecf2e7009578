"""WUDI-Merging ("Whoever started the interference should end it"): per linear layer, the merged update that least
disturbs each task along its own task vector, found by Adam, without data.

The paper shows that a linear layer's inputs on task t lie close to the span of the rows of its task vector Δ_t
(stored [out, in], as nn.Linear), so the interference the merged update τ causes on task t is measured through Δ_t
itself, and τ minimises

    L(τ) = Σ_t ‖(τ − Δ_t) Δ_tᵀ‖_F² / ‖Δ_t‖_F²

from τ₀ = Σ_t Δ_t (task arithmetic with λ = 1), by ``iterations`` Adam steps of learning rate ``lr``. θ = θ_b + τ (no
scaling coefficient: the paper's point is that it needs none). Other tensors take the mean of the task vectors.

How it is computed, and the choices where the paper and FusionBench (``WUDI/wudi.py``, the reference) differ or are
silent:

- **Closed-form gradient, torch's Adam.** L is quadratic, ∇L = 2 Σ_t (τ − Δ_t) G_t / ‖Δ_t‖² with G_t = Δ_tᵀ Δ_t, so
  ∇L = 2 ((τ − τ₀) H + g₀) with H = Σ_t G_t/‖Δ_t‖² (in × in) and g₀ = Σ_t (τ₀ − Δ_t) G_t/‖Δ_t‖² computed once:
  each step is one [out, in] × [in, in] product whatever K, instead of FusionBench's K products through autograd
  (and no [out, out] temporaries, which for a 32000-row embedding would be 4 GB each). Written around τ₀ rather
  than as τH − C, the gradient is exactly zero where the task-by-task form is (K = 1, where τ₀ = Δ is optimal):
  Adam normalises the gradient, so rounding noise would otherwise move every entry by up to ``lr`` a step. The update is ``torch.optim.Adam`` (β = 0.9,
  0.999, ε = 1e-8, no weight decay) given that gradient: the same iterates as FusionBench's up to rounding.
- **Defaults.** ``iterations`` 300 and ``lr`` 1e-5, the paper's (and FusionBench's function default; its shipped
  config says 400). Measured on one CPU core with the zoo's medium shapes (vocab 345, hidden 128, intermediate 512,
  4 layers, K = 3): 0.04–0.38 s per tensor, 3.3 s for every 2-D tensor of the model (TSV 0.35 s, Iso-CTS 0.41 s,
  Iso-C 0.09 s on the same tensors). On a 7B model the cost is 300 × 2·out·in² flops per linear layer (1–3·10¹⁴
  for a 7B MLP matrix): a GPU job (``--device cuda``).
- **Which tensors.** Every 2-D tensor, embeddings and LM head included, as FusionBench (``exclude`` per tensor
  sends one to the mean). A weight that GPT-2's Conv1D stores [in, out] is solved transposed (the engine says so in
  ``KernelInput.conv1d``), so the interference is measured on its inputs' side as for nn.Linear; FusionBench,
  written for nn.Linear models, would measure it on the outputs'. The embeddings ([vocab, hidden], an index lookup
  rather than a product) are taken as stored, as FusionBench does.
- **Variants seen elsewhere.** Some published copies of the authors' ViT script weight each task by 1/‖Δ_t‖ (not
  squared), restrict WUDI to the blocks' attention and MLP matrices and sweep a scaling coefficient afterwards; we
  follow FusionBench (squared norm, every 2-D tensor, no coefficient), which matches the paper's objective.
- **A zero task vector** on a tensor (an expert that did not train it) has no interference term (FusionBench would
  divide by zero and write NaN); if every task vector is zero the update is zero.
- **Determinism.** The steps are plain tensor ops from a fixed start: same inputs, same device → same bits. See
  :mod:`mergeflow.methods.spectral` for dtype, device and the order of the experts.
"""

from __future__ import annotations

from functools import partial

import torch

from mergeflow.methods import spectral
from mergeflow.methods.base import KernelInput, MergeMethod, ParamSpec, register


def wudi_kernel(x: KernelInput) -> torch.Tensor:
    deltas = spectral.task_vectors(x)
    if not spectral.is_matrix(x) or deltas[0].numel() == 0:
        return spectral.finish(x, spectral.mean(deltas))
    if not x.conv1d:
        return spectral.finish(x, _wudi_update(x, deltas))
    # stored [in, out] (GPT-2's Conv1D): solve in nn.Linear's [out, in], so the interference is measured on the
    # layer's inputs as the paper does, and store the result back (one transposed copy alive at a time)
    for i in range(len(deltas)):
        deltas[i] = deltas[i].T.contiguous()
    return spectral.finish(x, _wudi_update(x, deltas).T.contiguous())


def _wudi_update(x: KernelInput, deltas: list[torch.Tensor]) -> torch.Tensor:
    """τ for [out, in] task vectors; empties ``deltas`` (the caller's list) once they are no longer needed."""
    start = spectral.total(deltas)
    n = start.shape[1]
    h = start.new_zeros(n, n)
    g0 = torch.zeros_like(start)
    for delta in deltas:
        norm2 = float(delta.square().sum())
        if norm2 == 0.0:
            continue
        gram = delta.T @ delta
        h.add_(gram, alpha=1.0 / norm2)
        g0.add_((start - delta) @ gram, alpha=1.0 / norm2)
        del gram
    del delta
    deltas.clear()
    tau = start
    iterations = int(x.shared.get("iterations", 300))
    if iterations > 0:
        param = torch.nn.Parameter(start.clone())  # the gradient is set in closed form, not traced
        opt = torch.optim.Adam([param], lr=float(x.shared.get("lr", 1e-5)), foreach=False)
        for _ in range(iterations):
            # ∇L/2 = (τ − τ₀)H + Σ_t (τ₀ − Δ_t)G_t/‖Δ_t‖²: an exact zero where the task-by-task form has one (K = 1)
            param.grad = torch.addmm(g0, param.detach() - start, h).mul_(2.0)
            opt.step()
        tau = param.detach()
    return tau


WUDI = register(MergeMethod(
    name="wudi",
    kernel=wudi_kernel,
    params=(
        ParamSpec("iterations", int, 300, low=0, help="Adam steps per 2-D tensor"),
        ParamSpec("lr", float, 1e-5, low=0.0, low_open=True, help="Adam learning rate"),
        spectral.EXCLUDE,
    ),
    summary="2-D tensors: τ minimising Σ_t ‖(τ − Δ_t)Δ_tᵀ‖²/‖Δ_t‖² by Adam from Σ_t Δ_t (data-free); other "
            "tensors: mean task vector; θ_b + τ",
    paper="Cheng et al., Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via Task "
          "Vectors, ICML 2025 (arXiv:2503.08099)",
    min_models=1,
    workspace_elements=partial(spectral.workspace_elements, "wudi"),
    kernel_bytes=partial(spectral.kernel_bytes, "wudi"),
    compute_bound=True,
))
