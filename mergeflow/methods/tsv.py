"""TSV-Merge (Task Singular Vectors): keep each task's top singular triplets, decorrelate them across tasks.

For a 2-D tensor of shape m×n (r = min(m, n)) and K task vectors Δ_t = U_t Σ_t V_tᵀ, each task keeps its top
s = ⌊r/K⌋ triplets; the kept U's are concatenated side by side (U = [U_1,s … U_K,s], m × Ks), the V's likewise
(V, n × Ks) and the singular values into Σ (Ks). Both are replaced by their orthogonal polar factor (the nearest
matrix with orthonormal columns, ``U_⊥ = P Qᵀ`` from ``U = P S Qᵀ``), and the merged update is ``U_⊥ Σ V_⊥ᵀ``. Other
tensors take the mean of the task vectors; θ = θ_b + λ·update on every tensor (FusionBench's ``alpha``).

Choices where the paper and FusionBench (``compute_and_sum_svd_mem_reduction``, the reference) differ or are silent:

- **Rank share.** s = max(1, ⌊r/K⌋). FusionBench's ⌊r/K⌋ is 0 when r < K (a [2, hidden] head merged from 3
  experts), which silently leaves the tensor at the base; we keep each task's top triplet instead. Then Ks > r and
  the concatenated U (or V) has more columns than rows: its polar factor has orthonormal *rows* (a partial
  isometry), the Procrustes solution still, and the update is U_⊥ Σ V_⊥ᵀ as before. When Ks ≤ r, this is exactly
  FusionBench: its zero-padded [m, r] layout and our compact [m, Ks] one have the same polar factor on the kept
  columns, and the padding meets zero singular values.
- **K = 1.** s = r, the concatenation is the task's own (already orthonormal) U and V, so the update is the task
  vector itself: θ = θ_b + λ·Δ.
- **λ.** Default 1.0, the value of FusionBench's TSV config (``alpha: 1``).
- **Weights.** None (FusionBench's per-model ``alpha`` list is a pre-scaling of the task vectors, which TSV's
  singular values then carry; not exposed until a recipe needs it).
- **Exactness.** Full SVDs (``torch.linalg.svd``), no randomized low-rank approximations: deterministic on one
  machine and device. See :mod:`mergeflow.methods.spectral` for dtype, device, ``exclude`` and expert order.
"""

from __future__ import annotations

from functools import partial

import torch

from mergeflow.methods import spectral
from mergeflow.methods.base import LAMBDA, KernelInput, MergeMethod, register


def tsv_kernel(x: KernelInput) -> torch.Tensor:
    deltas = spectral.task_vectors(x)
    if not spectral.is_matrix(x):
        return spectral.finish(x, spectral.mean(deltas))
    m, n = deltas[0].shape
    if m == 0 or n == 0:
        return spectral.finish(x, spectral.mean(deltas))
    k = len(deltas)
    kept = spectral.rank_share((m, n), k)
    u_cat = deltas[0].new_empty(m, k * kept)
    v_cat = deltas[0].new_empty(k * kept, n)
    s_cat = deltas[0].new_empty(k * kept)
    for i, delta in enumerate(deltas):
        u, sv, vh = spectral.svd(delta)
        cols = slice(i * kept, (i + 1) * kept)
        u_cat[:, cols] = u[:, :kept]
        s_cat[cols] = sv[:kept]
        v_cat[cols] = vh[:kept]
        del u, sv, vh
    del deltas
    u_orth = spectral.polar(u_cat).mul_(s_cat)
    del u_cat
    return spectral.finish(x, u_orth @ spectral.polar(v_cat))


TSV = register(MergeMethod(
    name="tsv",
    kernel=tsv_kernel,
    params=(LAMBDA, spectral.EXCLUDE),
    summary="2-D tensors: each task keeps its top ⌊r/K⌋ (≥ 1) singular triplets, the concatenated U and V are "
            "orthogonalized (polar factor) and the update is U⊥ΣV⊥ᵀ; other tensors: mean task vector; θ_b + λ·update",
    paper="Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025 "
          "(arXiv:2412.00081)",
    min_models=1,
    workspace_elements=partial(spectral.workspace_elements, "tsv"),
    kernel_bytes=partial(spectral.kernel_bytes, "tsv"),
    compute_bound=True,
))
