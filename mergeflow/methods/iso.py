"""Isotropic merging: flatten the spectrum of the merged update, in the common subspace (Iso-C) or in the common plus
task-specific subspaces (Iso-CTS).

- ``iso_c``: for a 2-D tensor, Δ = Σ_t Δ_t = U Σ Vᵀ and the update is σ̄·U Vᵀ with σ̄ the mean of all min(m, n)
  singular values of Δ.
- ``iso_cts``: the top k directions of Δ (U_c, Σ_c, V_c; k from ``common_space_fraction``) are the common space;
  each task's vector with the common left space projected out, (I − U_c U_cᵀ)Δ_t, gives its own top s directions
  (s equal for every task, k + K·s = min(m, n)); the collected U's and V's are orthogonalized (polar factor, the
  nearest orthonormal matrix) and every singular value is replaced by the mean of the collected ones.

Other tensors take the mean of the task vectors; θ = θ_b + λ·update on every tensor (FusionBench's ``scaling_factor``
multiplies the whole merged task vector).

Choices where the paper and FusionBench (``iso_utils.iso_c`` / ``iso_cts``, the reference) differ or are silent:

- **λ.** The paper picks α per setting on held-out validation data; FusionBench's configs default
  ``scaling_factor: 1.0`` and so do we. The isotropic spectrum has the scale of the *summed* update's mean singular
  value, so λ is worth tuning (a sweep over ``lambda`` in a recipe), as the paper does.
- **Iso-CTS sizes.** As FusionBench: k = ⌊r·f⌋, then s = round((r − k)/K) (Python's half-to-even rounding) and
  k = r − K·s. So a small r or a large K can leave s = 0 (Iso-CTS is then Iso-C). Where rounding up would need
  more than r directions FusionBench slices with a negative index; we cut s to ⌊r/K⌋ (see
  :func:`mergeflow.methods.spectral.iso_cts_split`).
- **K = 1.** Iso-C is σ̄·U Vᵀ of the one task vector; Iso-CTS equals Iso-C then (its task-specific directions are
  the task vector's remaining singular directions).
- **Common space orientation.** Projected on the left (output) side, as FusionBench and the paper, in the tensor's
  stored orientation.

See :mod:`mergeflow.methods.spectral` for dtype, device, ``exclude`` and the order of the experts.
"""

from __future__ import annotations

from functools import partial

import torch

from mergeflow.methods import spectral
from mergeflow.methods.base import LAMBDA, KernelInput, MergeMethod, ParamSpec, register

ISO_PAPER = ("Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, "
             "ICML 2025 (arXiv:2502.04959)")


def iso_c_kernel(x: KernelInput) -> torch.Tensor:
    deltas = spectral.task_vectors(x)
    if not spectral.is_matrix(x) or deltas[0].numel() == 0:
        return spectral.finish(x, spectral.mean(deltas))
    summed = spectral.total(deltas)
    del deltas
    u, s, vh = spectral.svd(summed)
    del summed
    return spectral.finish(x, u.mul_(s.mean()) @ vh)


def iso_cts_kernel(x: KernelInput) -> torch.Tensor:
    deltas = spectral.task_vectors(x)
    if not spectral.is_matrix(x) or deltas[0].numel() == 0:
        return spectral.finish(x, spectral.mean(deltas))
    m, n = deltas[0].shape
    k = len(deltas)
    common, per_task = spectral.iso_cts_split((m, n), k, float(x.shared.get("common_space_fraction", 0.8)))
    u, s, vh = spectral.svd(spectral.total(deltas))
    r = s.shape[0]
    u_all = u.new_empty(m, r)
    s_all = s.new_empty(r)
    v_all = vh.new_empty(r, n)
    u_c = u[:, :common]
    for i, delta in enumerate(deltas):
        if per_task == 0:
            break
        ui, si, vhi = spectral.svd(delta - u_c @ (u_c.T @ delta))
        cols = slice(i * per_task, (i + 1) * per_task)
        u_all[:, cols] = ui[:, :per_task]
        s_all[cols] = si[:per_task]
        v_all[cols] = vhi[:per_task]
        del ui, si, vhi
    del deltas
    u_all[:, k * per_task:] = u_c
    s_all[k * per_task:] = s[:common]
    v_all[k * per_task:] = vh[:common]
    del u, s, vh, u_c
    u_orth = spectral.polar(u_all).mul_(s_all.mean())
    del u_all
    return spectral.finish(x, u_orth @ spectral.polar(v_all))


ISO_C = register(MergeMethod(
    name="iso_c",
    kernel=iso_c_kernel,
    params=(LAMBDA, spectral.EXCLUDE),
    summary="2-D tensors: SVD of the summed task vectors with every singular value replaced by their mean "
            "(σ̄·UVᵀ); other tensors: mean task vector; θ_b + λ·update",
    paper=ISO_PAPER,
    min_models=1,
    workspace_elements=partial(spectral.workspace_elements, "iso_c"),
    kernel_bytes=partial(spectral.kernel_bytes, "iso_c"),
    compute_bound=True,
))

ISO_CTS = register(MergeMethod(
    name="iso_cts",
    kernel=iso_cts_kernel,
    params=(
        LAMBDA,
        ParamSpec("common_space_fraction", float, 0.8, low=0.0, high=1.0,
                  help="share of the min(m, n) directions taken from the summed update (the rest: equal "
                       "task-specific shares)"),
        spectral.EXCLUDE,
    ),
    summary="2-D tensors: top directions of the summed task vectors plus each task's top directions outside them, "
            "orthogonalized, with isotropic singular values; other tensors: mean task vector; θ_b + λ·update",
    paper=ISO_PAPER,
    min_models=1,
    workspace_elements=partial(spectral.workspace_elements, "iso_cts"),
    kernel_bytes=partial(spectral.kernel_bytes, "iso_cts"),
    compute_bound=True,
))
