"""The task-arithmetic family: TA, TIES, DARE, magnitude pruning, Breadcrumbs, DELLA.

All are one composition (mergekit's "generalized task arithmetic"): per model, sparsify the task vector
Δ_t = θ_t − θ_b, scale it by its weight, optionally elect a sign per entry and keep the agreeing entries, combine,
scale by λ and add to the base. Paper mode follows the original papers (global TIES trim, 1/p DARE rescale, disjoint
mean over the agreeing count); ``compat`` mode reproduces mergekit 0.1.x operation by operation.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import torch

from mergeflow.methods import ops, sort_select
from mergeflow.methods.base import (
    LAMBDA,
    WEIGHT,
    KernelInput,
    MergeMethod,
    ParamSpec,
    ParamValue,
    as_weight,
    density_param,
    register,
)


@dataclass(frozen=True)
class Composition:
    sparsify: str | None  # None | "magnitude" | "bernoulli" | "outliers" | "della"
    consensus: str | None  # None | "sum" (sign election on the weighted sum)
    normalize: bool  # paper-mode default
    normalize_compat: bool  # mergekit default
    rescale: str  # paper-mode rescale of kept entries: "none" | "inverse"
    rescale_compat: bool  # mergekit's `rescale` default (L1-norm matching when true)


# Paper mode streams each tensor in blocks of rows: every step after the per-tensor statistics (trim thresholds) is
# elementwise or per row, so blocks keep the temporaries small (they are reused from the heap instead of being
# page-faulted in afresh for every tensor, which dominates the cost of big fp32 temporaries on CPU) and peak memory
# stays at the inputs plus a few blocks. The block size is a constant, so random draws do not depend on the machine.
CHUNK_ELEMENTS = 1 << 21


def _row_view(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)


def _blocks(shape: torch.Size, whole: bool) -> list[tuple[int, int]]:
    rows = shape[0] if len(shape) >= 2 else 1
    cols = max(1, (int(torch.Size(shape).numel()) // rows) if rows else 1)
    step = rows if whole or len(shape) < 2 else max(1, CHUNK_ELEMENTS // cols)
    return [(r, min(rows, r + step)) for r in range(0, rows, step)] or [(0, 0)]


def _param_block(value: ParamValue, shape: torch.Size, r0: int, r1: int) -> ParamValue:
    """The rows r0:r1 of a per-partition parameter tensor broadcastable to ``shape`` (as a row view)."""
    if not isinstance(value, torch.Tensor):
        return value
    return _row_view(value.expand(shape))[r0:r1]


def _tensor_thresholds(x: KernelInput, comp: Composition, base_rows: torch.Tensor, rows: list[torch.Tensor],
                       dtype: torch.dtype, blocks: list[tuple[int, int]]) -> list[float | None]:
    """Per-model |Δ| trim thresholds for this tensor (None: keep everything)."""
    scope = x.shared.get("trim_scope", "tensor")
    if comp.sparsify != "magnitude":
        return [None] * len(rows)
    if scope == "global":
        assert x.thresholds is not None, "global trim needs the task-vector thresholds"
        return list(x.thresholds)
    if scope == "row":
        return [None] * len(rows)
    out: list[float | None] = []
    for i, model in enumerate(rows):
        density = x.params["density"][i]
        if isinstance(density, torch.Tensor):
            raise ValueError("magnitude trimming takes one density per model and tensor")
        rank = ops.trim_rank(base_rows.numel(), density)
        if rank <= 0:
            out.append(None)
            continue
        if base_rows.numel() < (1 << 20):
            out.append(ops.kth_smallest((model.to(dtype) - base_rows.to(dtype)).abs_(), rank))
            continue
        sel = ops.KthSmallest(rank)
        for r0, r1 in blocks:
            sel.add_first((model[r0:r1].to(dtype) - base_rows[r0:r1].to(dtype)).abs_())
        sel.finish_first()
        for r0, r1 in blocks:
            sel.add_second((model[r0:r1].to(dtype) - base_rows[r0:r1].to(dtype)).abs_())
        out.append(sel.value())
    return out


def _sparsify_block(delta: torch.Tensor, x: KernelInput, i: int, comp: Composition, threshold: float | None,
                    shape: torch.Size, r0: int, r1: int) -> torch.Tensor:
    """Sparsify (and rescale) one block of rows of model i's task vector, in place where possible."""
    density = _param_block(x.params["density"][i], shape, r0, r1)
    mode = x.shared.get("rescale_mode") or comp.rescale
    kind = comp.sparsify
    if kind == "magnitude":
        mode = x.shared.get("rescale_mode") or "none"
        if x.shared.get("trim_scope", "tensor") == "row":
            if density >= 1:
                return delta
            keep = ops.magnitude_mask(delta, density, "row")
        elif threshold is None:
            return delta
        else:
            keep = delta.abs() >= threshold
        return ops.rescale_kept(delta, keep, density, mode)
    if kind == "bernoulli":
        if not isinstance(density, torch.Tensor) and density >= 1:
            return delta
        gen = x.generators[i] if x.generators else None
        keep = ops.bernoulli_keep(delta.shape, as_weight(density, delta), gen, delta.device)
        return ops.rescale_kept(delta, keep, as_weight(density, delta), mode)
    if kind == "outliers":  # whole tensor in one block
        if density >= 1:
            return delta
        keep = ops.outlier_keep(delta, density, x.params["gamma"][i])
        return ops.rescale_kept(delta, keep, density, x.shared.get("rescale_mode") or "none")
    if kind == "della":
        if density >= 1:
            return delta
        probs = ops.della_keep_prob(delta, density, x.params["epsilon"][i])
        gen = x.generators[i] if x.generators else None
        keep = torch.rand(delta.shape, generator=gen, device=delta.device) < probs
        return ops.rescale_kept(delta, keep, probs, mode)
    raise AssertionError(kind)


def paper_kernel(x: KernelInput, comp: Composition) -> torch.Tensor:
    assert x.base is not None
    dtype = x.dtype
    shape = x.base.shape
    base_rows = _row_view(x.base)
    rows = [_row_view(m) for m in x.models]
    # whole-tensor statistics (outlier sorts, norm-matching rescale) need the tensor in one block
    whole = comp.sparsify == "outliers" or (x.shared.get("rescale_mode") or "") in ("l1", "l2", "linf")
    blocks = _blocks(shape, whole)
    thresholds = _tensor_thresholds(x, comp, base_rows, rows, dtype, blocks)
    lam = float(x.shared.get("lambda", 1.0))
    normalize = x.shared.get("normalize")
    normalize = comp.normalize if normalize is None else normalize
    out = torch.empty(base_rows.shape, dtype=x.out_dtype or dtype, device=x.base.device)
    k = len(rows)
    # the experts' deltas of a block are prepared concurrently (each random sparsifier draws from its own
    # generator, block after block, so every stream is consumed in the same order); they are combined in order
    parallel = _may_parallelize(x.base) and comp.sparsify is not None and _independent_draws(x, comp)
    for r0, r1 in blocks:
        b = base_rows[r0:r1].to(dtype)
        weights = [as_weight(_param_block(x.params["weight"][i], shape, r0, r1), b) for i in range(k)]
        stacked = torch.empty((k if comp.consensus or parallel else 1, *b.shape), dtype=dtype, device=b.device)

        def prepare(i: int, r0: int = r0, r1: int = r1, b: torch.Tensor = b, stacked: torch.Tensor = stacked) -> None:
            # never in place on the inputs (an fp32 input block is a view of the caller's tensor)
            slot = stacked[i if stacked.shape[0] > 1 else 0]
            delta = torch.sub(rows[i][r0:r1], b, out=slot)
            if comp.sparsify:
                delta = _sparsify_block(delta, x, i, comp, thresholds[i], shape, r0, r1)
                if delta.data_ptr() != slot.data_ptr():
                    slot.copy_(delta)

        if comp.consensus is None:
            acc = torch.zeros_like(b)
            if parallel:
                _parallel_map(prepare, k, True)
            for i in range(k):
                if not parallel:
                    prepare(i)
                acc.add_(stacked[i if parallel else 0].mul_(weights[i]))
            if normalize:
                acc = _divide_by_weight_sum(acc, sum(weights))
        else:
            _parallel_map(prepare, k, parallel)
            # elect on the unweighted trimmed deltas, weight in the disjoint mean (D-15, PEFT's ties): a weight
            # (Sens's c, MI-TA's, a user's) scales an expert's contribution but does not buy it the sign vote
            acc = ops.elect_and_merge(stacked, x.shared.get("election", "sum"), "count" if normalize else "none",
                                      weights=weights)
        if lam != 1.0:
            acc.mul_(lam)
        out[r0:r1] = acc.add_(b)
    return out.reshape(shape)


def _divide_by_weight_sum(acc: torch.Tensor, wsum: torch.Tensor | float) -> torch.Tensor:
    if isinstance(wsum, torch.Tensor):
        wsum = torch.where(wsum.abs() < 1e-8, torch.ones_like(wsum), wsum)
        return acc / wsum
    if abs(wsum) < 1e-8:
        return acc  # same guard as mergekit; recipes with zero-sum weights are refused up front
    return acc / wsum


# --- mergekit 0.1.x, operation by operation (mergekit/merge_methods/generalized_task_arithmetic.py, sparsify.py) ---

def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.device.type != "cpu" or t.dtype == torch.bfloat16 else torch.float32


def _magnitude_slice(delta: torch.Tensor, start: int, stop: int, descending: bool) -> torch.Tensor:
    """Which entries mergekit's ``torch.sort(|Δ|.float())`` puts at positions [start, stop), without the sort
    (bf16/fp16 |Δ| are replayed on their bit patterns, which order like the float32 values)."""
    keep = sort_select.sort_slice_mask(delta.abs().reshape(-1), start, stop, descending=descending, overwrite=True)
    if keep is None:  # the replay gave up after permuting its scratch copy
        keep = sort_select.sorted_slice_mask(delta.abs().reshape(-1), start, stop, descending)
    return keep


def _sparsify_compat(delta: torch.Tensor, x: KernelInput, i: int, comp: Composition, rescale: bool) -> torch.Tensor:
    density = float(x.params["density"][i])
    norm = "l1" if rescale else "none"
    gen = x.generators[i] if x.generators else None
    kind = comp.sparsify
    if density >= 1:
        return delta
    if kind == "magnitude":
        if delta.numel() == 0:
            return delta
        k = max(1, int(density * delta.numel()))
        if delta.device.type == "cpu":
            # argsort(|Δ|, descending)[:k] without the sort, equal magnitudes kept exactly as the sort keeps them
            keep = _magnitude_slice(delta, 0, k, descending=True)
            return _masked(delta, keep.reshape_as(delta), norm)
        w = delta.abs().reshape(-1)
        mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
        mask[torch.argsort(w, descending=True)[:k]] = 1
        return _masked(delta, mask.reshape_as(delta), norm)
    if kind == "bernoulli":
        work = _work_dtype(delta)
        if delta.device.type == "cpu":
            # torch.bernoulli(p) on the CPU draws one float uniform per entry (24 random bits of one 32-bit draw)
            # and keeps u < p, p rounded to the work dtype: torch.rand draws the same uniforms from the same stream,
            # without the full tensor of p and the per-entry distribution object
            keep = torch.rand(delta.shape, generator=gen, dtype=torch.float32) < float(torch.tensor(density, dtype=work))
            return _masked(delta.to(work), keep, norm).to(delta.dtype)
        mask = torch.bernoulli(torch.full_like(delta, density, dtype=work), generator=gen)
        return _masked(delta.to(work), mask, norm).to(delta.dtype)
    if kind == "outliers":
        n = delta.numel()
        target = int(density * n)
        n_top = int(x.params["gamma"][i] * n)
        n_bot = max(0, n - target - n_top)
        if delta.device.type == "cpu":
            keep = _magnitude_slice(delta, n_bot, n_bot + target, descending=False)
            return _masked(delta, keep.reshape_as(delta), norm)
        w = delta.abs().reshape(-1)
        idx = torch.sort(w, descending=False).indices
        mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
        mask[idx[n_bot:n_bot + target]] = 1
        return _masked(delta, mask.reshape_as(delta), norm)
    if kind == "della":
        eps = float(x.params["epsilon"][i])
        work = _work_dtype(delta)
        shape = delta.shape
        t = delta.unsqueeze(0) if delta.dim() < 2 else delta
        ranks = torch.argsort(t.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
        lo = ranks.min(dim=1, keepdim=True).values
        hi = ranks.max(dim=1, keepdim=True).values
        rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
        probs = (density - eps) + rank_norm * 2 * eps
        mask = torch.bernoulli(probs, generator=gen).to(work)
        return _masked(t.to(work), mask, norm).to(delta.dtype).reshape(shape)
    raise AssertionError(kind)


def _masked(t: torch.Tensor, mask: torch.Tensor, norm: str) -> torch.Tensor:
    masked = t * mask
    return masked if norm == "none" else ops.norm_rescale(t, masked, norm)


# The compat kernel runs the per-expert sparsification (one task per expert) and the combination (one task per block
# of rows) on a small thread pool when torch computes on one CPU thread (the engine's default on a 2-core machine): the
# work is torch and NumPy kernels, which release the GIL. Every task runs mergekit's operations on its own slice, so
# the result is the same bit for bit; whole-tensor reductions (the L1 rescale) stay whole. Paper mode prepares the
# experts' deltas of a block the same way.
PARALLEL_MIN_NUMEL = 1 << 18
COMPAT_BLOCK_ELEMENTS = 1 << 18
PARALLEL_SPARSIFY_MAX_NUMEL = 1 << 24
_RANDOM_SPARSIFIERS = ("bernoulli", "della")
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    """In a forked child the pool's threads do not exist: start a new pool there when one is needed."""
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _cpu_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _parallel_map(fn: Callable[[int], None], n: int, parallel: bool) -> None:
    global _pool
    if not parallel or n < 2:
        for i in range(n):
            fn(i)
        return
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_cpu_workers(), thread_name_prefix="mergeflow-compute")
    for future in [_pool.submit(fn, i) for i in range(n)]:
        future.result()


def _may_parallelize(base: torch.Tensor) -> bool:
    """Threads of our own only where torch itself computes on one thread (else its own threads use the cores)."""
    return (base.device.type == "cpu" and base.numel() >= PARALLEL_MIN_NUMEL and _cpu_workers() > 1
            and torch.get_num_threads() == 1)


def _independent_draws(x: KernelInput, comp: Composition) -> bool:
    """Whether the experts can be sparsified concurrently: the random sparsifiers need one generator each (a shared
    generator, or the global RNG, is consumed expert by expert, in order)."""
    if comp.sparsify not in _RANDOM_SPARSIFIERS:
        return True
    gens = x.generators or []
    return len(gens) == len(x.models) and len({id(g) for g in gens}) == len(gens)


def _combine_compat(deltas: torch.Tensor, weights: torch.Tensor, base: torch.Tensor, out: torch.Tensor,
                    comp: Composition, normalize: bool, lam: float, int8_mask: bool) -> None:
    """mergekit's weighting, sign consensus, sum, normalisation and λ for a block of rows (elementwise, and sums
    over the experts only), into ``out``; consumes ``deltas``."""
    deltas.mul_(weights)
    divisor = None
    if comp.consensus:
        mask_dtype = torch.int8 if int8_mask else base.dtype
        sign = deltas.sign().to(mask_dtype)
        majority = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
        mask = sign == majority
        del sign, majority
        mixed = deltas.mul_(mask).sum(dim=0)  # deltas * mask, in place: deltas is not needed after this
        if normalize:
            divisor = (weights * mask).sum(dim=0)
            divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        if normalize:
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
    if divisor is not None:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    torch.add(base, mixed, out=out)  # base + mixed, both in the base's dtype


def compat_kernel(x: KernelInput, comp: Composition) -> torch.Tensor:
    assert x.base is not None
    base = x.base
    normalize = x.shared.get("normalize")
    normalize = comp.normalize_compat if normalize is None else normalize
    rescale = x.shared.get("rescale")
    rescale = comp.rescale_compat if rescale is None else rescale
    parallel = _may_parallelize(base)
    k = len(x.models)
    deltas: torch.Tensor | None = None
    if comp.sparsify:
        # the sparsifiers look at whole tensors (top-k, L1 norms): one expert per task
        deltas = base.new_empty((k, *base.shape))

        def sparsify(i: int) -> None:
            assert deltas is not None
            deltas[i] = _sparsify_compat(x.models[i] - base, x, i, comp, rescale)

        # each task holds its own sparsifier temporaries: the largest tensors go one expert at a time
        _parallel_map(sparsify, k, parallel and _independent_draws(x, comp)
                      and base.numel() <= PARALLEL_SPARSIFY_MAX_NUMEL)
    weights = torch.tensor([float(w) for w in x.params["weight"]], dtype=base.dtype, device=base.device)
    while base.dim() + 1 > weights.dim():
        weights.unsqueeze_(-1)
    lam = float(x.shared.get("lambda", 1.0))
    int8_mask = bool(x.shared.get("int8_mask"))
    out = torch.empty_like(base)
    if base.dim() == 0:
        blocks = [(0, 1)]
        rows = lambda t: t  # noqa: E731
    else:
        # the rest is elementwise and sums over the experts only: in blocks of rows small enough to stay in cache
        n_rows = base.shape[0]
        step = max(1, COMPAT_BLOCK_ELEMENTS // max(1, base[0].numel()))
        blocks = [(r, min(n_rows, r + step)) for r in range(0, n_rows, step)]
        rows = None

    def combine(j: int) -> None:
        r0, r1 = blocks[j]
        view = rows or (lambda t, d=0: t.narrow(d, r0, r1 - r0))
        b = view(base)
        if deltas is None:
            d = base.new_empty((k, *b.shape))
            for i, model in enumerate(x.models):
                torch.sub(view(model), b, out=d[i])  # model - base, in the base's dtype
        else:
            d = deltas if base.dim() == 0 else deltas.narrow(1, r0, r1 - r0)
        _combine_compat(d, weights, b, view(out), comp, normalize, lam, int8_mask)

    _parallel_map(combine, len(blocks), parallel)
    return out


def _make(comp: Composition):
    def kernel(x: KernelInput) -> torch.Tensor:
        return compat_kernel(x, comp) if x.compat else paper_kernel(x, comp)

    return kernel


NORMALIZE_HELP = ("divide the merged vector by the agreeing count (paper) or weight sum (mergekit_compat) — or, "
                  "without sign election, by the weight sum")
RESCALE = ParamSpec("rescale", bool, False, help="mergekit: rescale kept entries to the L1 norm of the full delta "
                    "(mergekit_compat only; paper mode uses rescale_mode)")
RESCALE_MODE = ParamSpec("rescale_mode", str, "", help="paper mode: rescale of kept entries; '' = the method's own "
                         "(inverse keep probability for DARE/DELLA, none otherwise)",
                         choices=("", "none", "inverse", "l1", "l2", "linf"))
ELECTION = ParamSpec("election", str, "sum", help="sign election: 'sum' (TIES mass) or 'count' (majority of signs)",
                     choices=("sum", "count"))
INT8_MASK = ParamSpec("int8_mask", bool, False, help="mergekit: store the agreement mask as int8 (memory only)")
GAMMA = ParamSpec("gamma", float, 0.01, per_model=True, help="fraction of largest-|Δ| outliers removed",
                  low=0.0, high=1.0)
EPSILON = ParamSpec("epsilon", float, 0.15, per_model=True, help="half-width of DELLA's keep-probability window",
                    low=0.0, high=1.0, low_open=True, high_open=True)


def _normalize(paper: bool, compat: bool) -> ParamSpec:
    return ParamSpec("normalize", bool, paper, default_compat=compat if compat != paper else None, help=NORMALIZE_HELP)


def _rescale_flag(default: bool) -> ParamSpec:
    return ParamSpec("rescale", bool, default, help=RESCALE.help)


def kernel_bytes(comp: Composition, shape: tuple[int, ...], k: int, compat: bool, item: int, out_item: int) -> int:
    """What :func:`paper_kernel` / :func:`compat_kernel` allocate for one tensor (``MergeMethod.kernel_bytes``).

    Paper mode: the output in its dtype, and blocks of about ``CHUNK_ELEMENTS`` (the whole tensor for outlier
    trims) holding the base block, the experts' deltas (one, or K for sign election and parallel sparsifiers), the
    sum, and the sparsifier's mask and scratch. Compat mode: the output in the stored dtype (converted if the output
    dtype differs) and, for the sparsifying methods, the K sparsified deltas kept whole plus, per expert being
    sparsified (two at once below ``PARALLEL_SPARSIFY_MAX_NUMEL`` entries), its delta, a scratch |Δ| or uniform
    draws, the mask and the masked copy; the other compat methods work in blocks of ``COMPAT_BLOCK_ELEMENTS``."""
    numel = math.prod(shape)
    if not compat:
        block = numel if comp.sparsify == "outliers" else min(numel, CHUNK_ELEMENTS)
        deltas = k if (comp.consensus or comp.sparsify) else 1
        scratch = 3 if comp.sparsify else 0
        return numel * out_item + block * item * (deltas + 2 + scratch)
    out = numel * item + (numel * out_item if out_item != item else 0)
    if not comp.sparsify:
        return out + min(numel, COMPAT_BLOCK_ELEMENTS) * item * (k + 3)
    per_expert = numel * (3 * item + 1)
    if comp.sparsify in _RANDOM_SPARSIFIERS:
        per_expert += numel * 4  # one float32 uniform per entry
    at_once = min(k, 2) if numel <= PARALLEL_SPARSIFY_MAX_NUMEL else 1
    return out + k * numel * item + at_once * per_expert


def _define(name: str, comp: Composition, extra: tuple[ParamSpec, ...], summary: str, paper: str,
            *, random: bool = False, global_trim: bool = False) -> MergeMethod:
    params = [WEIGHT, LAMBDA, _normalize(comp.normalize, comp.normalize_compat)]
    if comp.sparsify:
        params += [_rescale_flag(comp.rescale_compat), RESCALE_MODE]
    if comp.consensus:
        params += [ELECTION, INT8_MASK]
    params += list(extra)
    return register(MergeMethod(
        name=name,
        kernel=_make(comp),
        params=tuple(params),
        summary=summary,
        paper=paper,
        random=random,
        mergekit_name=name,
        streams_raw_inputs=True,
        normalizes_by_weight_sum=comp.consensus is None,
        compat_guards_zero_weight_sum=True,
        needs_global_threshold=(lambda shared: shared.get("trim_scope") == "global") if global_trim else
        (lambda shared: False),
        # DARE's Bernoulli drop takes a drop ratio per entry (APL); the trims and samplers rank within a tensor
        partition_params=("weight", "density") if comp.sparsify == "bernoulli" else ("weight",),
        kernel_bytes=partial(kernel_bytes, comp),
    ))


TA_PAPER = "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv:2212.04089)"
TIES_PAPER = "Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv:2306.01708)"
DARE_PAPER = "Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv:2311.03099)"
BREADCRUMBS_PAPER = "Davari & Belilovsky, Model Breadcrumbs (arXiv:2312.06795)"
DELLA_PAPER = "Deep et al., DELLA-Merging (arXiv:2406.11617)"

TRIM_SCOPE = ParamSpec("trim_scope", str, "global", default_compat="tensor",
                       help="where the top-density entries are chosen: over the whole task vector (paper), per "
                            "tensor (mergekit) or per row", choices=("global", "tensor", "row"))

TASK_ARITHMETIC = _define(
    "task_arithmetic", Composition(None, None, False, False, "none", False), (),
    "θ_b + λ·Σ w_t·Δ_t", TA_PAPER)
TIES = _define(
    "ties", Composition("magnitude", "sum", True, True, "none", False),
    (ParamSpec("density", float, 0.2, default_compat=1.0, per_model=True, low=0.0, high=1.0, low_open=True,
               help="fraction of each task vector kept by magnitude (paper k = 0.2; mergekit default 1.0)"),
     TRIM_SCOPE),
    "trim to the top-density |Δ|, elect a sign per entry, disjoint mean of the agreeing entries", TIES_PAPER,
    global_trim=True)
DARE_LINEAR = _define(
    "dare_linear", Composition("bernoulli", None, False, False, "inverse", True), (density_param(0.5),),
    "drop entries at random with probability 1−density, rescale, then task arithmetic", DARE_PAPER, random=True)
DARE_TIES = _define(
    "dare_ties", Composition("bernoulli", "sum", True, False, "inverse", True), (density_param(0.5),),
    "DARE drop and rescale, then TIES sign election and disjoint merge", DARE_PAPER, random=True)
MAGNITUDE_PRUNE = _define(
    "magnitude_prune", Composition("magnitude", None, False, False, "none", False),
    (density_param(0.5, "fraction of each tensor's task vector kept by magnitude (no rescale)"),),
    "keep the largest-|Δ| entries of each tensor (no rescale), then task arithmetic", DARE_PAPER + " (MP baseline)")
BREADCRUMBS = _define(
    "breadcrumbs", Composition("outliers", None, False, False, "none", False), (density_param(0.9), GAMMA),
    "drop the largest outliers and the smallest entries of each tensor, then task arithmetic", BREADCRUMBS_PAPER)
BREADCRUMBS_TIES = _define(
    "breadcrumbs_ties", Composition("outliers", "sum", False, False, "none", False), (density_param(0.9), GAMMA),
    "Breadcrumbs sparsification with TIES sign election", BREADCRUMBS_PAPER)
DELLA = _define(
    "della", Composition("della", "sum", True, True, "inverse", True), (density_param(0.7), EPSILON),
    "magnitude-rank sampling (MagPrune), sign election, disjoint mean", DELLA_PAPER, random=True)
DELLA_LINEAR = _define(
    "della_linear", Composition("della", None, False, False, "inverse", True), (density_param(0.7), EPSILON),
    "MagPrune then task arithmetic", DELLA_PAPER, random=True)
