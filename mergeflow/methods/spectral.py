"""What the SVD-based merges (``tsv``, ``iso_c``, ``iso_cts``) and ``wudi`` share: task vectors in the working dtype,
which tensors are treated as matrices, the polar factor, and how much memory their per-tensor linear algebra needs.

Conventions, as in FusionBench (the reference implementation of all four):

- **Which tensors.** Every 2-D tensor (embeddings, LM head and 1×n / n×1 tensors included) gets the method's matrix
  treatment; every other tensor (biases, norms, conv kernels) takes the mean of the task vectors. The shared parameter
  ``exclude`` (false by default) sends a 2-D tensor to the mean too: set it per tensor with a filter, e.g.
  ``exclude: [{filter: embed_tokens, value: true}, {value: false}]`` (FusionBench's ``exclude_keys``).
- **dtype.** The arithmetic is float32 (float64 when the inputs are float64); bf16/fp16 inputs, including in
  ``mergekit_compat`` mode where the engine would otherwise hand over the stored dtype, are upcast first, since LAPACK
  and cuSOLVER have no half-precision SVD. There is no mergekit equivalent, so compat mode changes nothing else.
- **Device.** Everything runs where the engine put the tensors: ``--device cuda`` (or ``auto`` on a GPU machine) runs
  the SVDs with cuSOLVER and WUDI's Adam steps on the GPU.
- **Order of the experts.** The merged update is a symmetric function of the experts in exact arithmetic (the polar
  factor commutes with permuting columns, ``svd`` sign flips cancel in ``u σ vᵀ``, sums commute), but floating-point
  sums and LAPACK are not: in fp32 the kernels alone are order-independent only to rounding (measured: up to 2e-5
  of the update's largest entry for Iso-CTS on a 512×128 tensor, ≤ 3e-6 for the others), the same order as the
  gap between fp32 and fp64 arithmetic. The engine hands experts to every kernel in a canonical order (by content
  hash) in paper mode, so the merged *model* is bit-identical whatever order the recipe lists them in (in
  ``mergekit_compat`` mode it keeps the recipe's order, as mergekit does; these methods gain nothing from it).
"""

from __future__ import annotations

import math

import torch

from mergeflow.methods.base import KernelInput, ParamSpec

EXCLUDE = ParamSpec("exclude", bool, False,
                    help="true: this 2-D tensor takes the mean of the task vectors instead (FusionBench's "
                         "exclude_keys); set it per tensor with filters")


def work_dtype(x: KernelInput) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def task_vectors(x: KernelInput) -> list[torch.Tensor]:
    """Δ_t = θ_t − θ_b in the working dtype (new tensors: the inputs may be memory-mapped, so never modified)."""
    assert x.base is not None
    dtype = work_dtype(x)
    base = x.base.to(dtype)
    return [m.to(dtype) - base for m in x.models]


def is_matrix(x: KernelInput) -> bool:
    assert x.base is not None
    return x.base.dim() == 2 and not x.shared.get("exclude", False)


def mean(deltas: list[torch.Tensor]) -> torch.Tensor:
    acc = torch.zeros_like(deltas[0])
    for d in deltas:
        acc.add_(d)
    return acc.div_(len(deltas))


def total(deltas: list[torch.Tensor]) -> torch.Tensor:
    acc = torch.zeros_like(deltas[0])
    for d in deltas:
        acc.add_(d)
    return acc


def svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD ``a = U diag(S) Vᵀ`` (``torch.linalg.svd(a, full_matrices=False)``), computed on the tall
    orientation: LAPACK's gesdd on a wide matrix takes the LQ route, measured 2.1–2.6× slower on this CPU build than
    the same matrix transposed (1536×4096 fp32: 5.6 s vs 2.7 s on one core), and a model's down projections are
    wide. The factors are those of ``aᵀ`` swapped, so equal to the direct ones up to rounding and the sign of each
    singular pair, which every product the kernels form cancels."""
    if a.shape[-2] >= a.shape[-1]:
        return torch.linalg.svd(a, full_matrices=False)
    u, s, vh = torch.linalg.svd(a.mT, full_matrices=False)
    return vh.mT, s, u.mT


def polar(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``U Vᵀ`` of ``a = U Σ Vᵀ``: the matrix with orthonormal columns (rows, when ``a``
    is wide) nearest to ``a`` in Frobenius norm (the Procrustes solution TSV and Iso-CTS orthogonalize with)."""
    u, _, vh = svd(a)
    return u @ vh


def finish(x: KernelInput, update: torch.Tensor) -> torch.Tensor:
    """θ_b + λ·update, in place on ``update`` (which the kernel owns: no m×n temporaries), in the compute dtype."""
    assert x.base is not None
    lam = float(x.shared.get("lambda", 1.0))
    if lam != 1.0:
        update.mul_(lam)
    return update.add_(x.base.to(update.dtype)).to(x.dtype)


# ---------------------------------------------------------------------------------------------- memory estimate

def workspace_elements(method: str, shape: tuple[int, ...], k: int) -> int:
    """Elements of working memory one tensor needs beyond what the engine's estimate counts already (the raw and
    compute copies of the K + 1 inputs and a K-way buffer, which the task vectors take), for the methods of this
    family (0 for a tensor they only average, and for other methods).

    An SVD of an m×n matrix (r = min(m, n)) holds a copy of its input (LAPACK overwrites it), U (m·r), Vᵀ (r·n) and
    LAPACK's divide-and-conquer work: ``svd(m, n)`` = m·n + m·r + r·n + 4r² + max(m, n)·r elements at its peak
    (measured on CPU with torch's gesdd: 86–106 MB for 8000×1000 and 2000×2000 fp32 matrices, where this gives 111
    and 122 MB; not measured on a GPU). Beyond its task vectors, each method holds:

    - ``tsv``: the concatenated U and Vᵀ (m·Ks + Ks·n, Ks ≈ r) while one task's SVD runs, then their polar factors
      (an SVD each), and the m×n product;
    - ``iso_c``: the summed update, its SVD and the m×n product;
    - ``iso_cts``: the sum's U and Vᵀ and the combined U and Vᵀ (2·(m·r + r·n)) while one projected task vector
      (m·n) and its SVD are alive;
    - ``wudi``: the start τ₀ and the merged update, Adam's two moments, the gradient and two temporaries (6·m·n),
      the closed-form gradient's constant term (m·n) and its n×n Gram sum (n²).
    """
    if len(shape) != 2 or method not in ("tsv", "iso_c", "iso_cts", "wudi"):
        return 0
    m, n = shape
    r = min(m, n)

    def svd(rows: int, cols: int) -> int:
        rr = min(rows, cols)
        return rows * cols + rows * rr + rr * cols + 4 * rr * rr + max(rows, cols) * rr

    if method == "tsv":
        ks = k * max(1, r // k)
        return m * ks + ks * n + max(svd(m, n), svd(m, ks) + svd(ks, n)) + m * n
    if method == "iso_c":
        return 2 * m * n + svd(m, n)
    if method == "iso_cts":
        return 2 * (m * r + r * n) + m * n + svd(m, n)
    return 7 * m * n + n * n  # wudi


def rank_share(shape: tuple[int, int], k: int) -> int:
    """TSV's singular triplets per task: ⌊min(m, n)/K⌋ as in FusionBench, but at least 1 (FusionBench keeps none
    when min(m, n) < K, i.e. leaves such a tensor at the base)."""
    return max(1, min(shape) // k)


def iso_cts_split(shape: tuple[int, int], k: int, common_space_fraction: float) -> tuple[int, int]:
    """Iso-CTS's (common directions, directions per task) for an m×n tensor, as FusionBench sizes them: the common
    space takes ⌊r·f⌋ of the r = min(m, n) directions, the rest is rounded (Python's half-to-even ``round``) to a
    multiple of K and split evenly, and the common space takes what is left. When rounding up would ask for more
    than r directions (small r, small f) the per-task share is cut to ⌊r/K⌋ (FusionBench would slice with a
    negative index there)."""
    r = min(shape)
    common = int(r * common_space_fraction)
    per_task = round((r - common) / k)
    if per_task * k > r:
        per_task = r // k
    return r - per_task * k, per_task


def kernel_bytes(method: str, shape: tuple[int, ...], k: int, compat: bool, item: int, out_item: int) -> int:
    """What the kernels of this family allocate for one tensor (``MergeMethod.kernel_bytes``), in the working dtype
    (float32; float64 for float64 inputs): the K task vectors, alive beside the workspace (:func:`workspace_elements`)
    in ``tsv``, ``iso_cts`` and ``wudi``, whose loops read them, and freed before the SVD of their sum in ``iso_c``;
    the base's working copy where the engine hands over the stored dtype (compat mode); and the merged tensor in
    the output dtype when that differs from the working one. Tensors that are only averaged: the task vectors and
    their mean."""
    numel = math.prod(shape)
    work = 8 if item == 8 else 4
    workspace = workspace_elements(method, shape, k)
    if workspace == 0:
        elements = (k + 1) * numel
    elif method == "iso_c":
        elements = max((k + 1) * numel, workspace)
    else:
        elements = k * numel + workspace
    base_copy = numel * work if compat and item != work else 0
    out = numel * out_item if out_item != work else 0
    return elements * work + base_copy + out
