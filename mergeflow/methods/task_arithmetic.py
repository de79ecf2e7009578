"""The task-arithmetic family: TA, TIES, DARE, magnitude pruning, Breadcrumbs, DELLA.

All are one composition (mergekit's "generalized task arithmetic"): per model, sparsify the task vector
Δ_t = θ_t − θ_b, scale it by its weight, optionally elect a sign per entry and keep the agreeing entries, combine,
scale by λ and add to the base. Paper mode follows the original papers (global TIES trim, 1/p DARE rescale, disjoint
mean over the agreeing count); ``compat`` mode reproduces mergekit 0.1.x operation by operation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergeflow.methods import ops
from mergeflow.methods.base import (
    LAMBDA,
    WEIGHT,
    KernelInput,
    MergeMethod,
    ParamSpec,
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


def _sparsify_paper(delta: torch.Tensor, x: KernelInput, i: int, comp: Composition) -> torch.Tensor:
    density = x.params["density"][i]
    kind = comp.sparsify
    if kind == "magnitude":
        scope = x.shared.get("trim_scope", "tensor")
        if scope == "global":
            assert x.thresholds is not None, "global trim needs the task-vector thresholds"
            keep = delta.abs() >= x.thresholds[i]
        else:
            if isinstance(density, torch.Tensor):
                raise ValueError("magnitude trimming takes one density per model and tensor")
            if density >= 1:
                return delta
            keep = ops.magnitude_mask(delta, density, scope)
        return ops.rescale_kept(delta, keep, density, x.shared.get("rescale_mode") or "none")
    if kind == "bernoulli":
        if not isinstance(density, torch.Tensor) and density >= 1:
            return delta
        gen = x.generators[i] if x.generators else None
        keep = ops.bernoulli_keep(delta.shape, as_weight(density, delta), gen, delta.device)
        return ops.rescale_kept(delta, keep, as_weight(density, delta), x.shared.get("rescale_mode") or comp.rescale)
    if kind == "outliers":
        if density >= 1:
            return delta
        keep = ops.outlier_keep(delta, density, x.params["gamma"][i])
        return ops.rescale_kept(delta, keep, density, x.shared.get("rescale_mode") or "none")
    if kind == "della":
        if density >= 1:
            return delta
        eps = x.params["epsilon"][i]
        probs = ops.della_keep_prob(delta, density, eps)
        gen = x.generators[i] if x.generators else None
        keep = torch.rand(delta.shape, generator=gen, device=delta.device) < probs
        return ops.rescale_kept(delta, keep, probs, x.shared.get("rescale_mode") or comp.rescale)
    raise AssertionError(kind)


def paper_kernel(x: KernelInput, comp: Composition) -> torch.Tensor:
    assert x.base is not None
    base = x.base
    lam = float(x.shared.get("lambda", 1.0))
    normalize = x.shared.get("normalize")
    normalize = comp.normalize if normalize is None else normalize
    if comp.consensus is None:
        # accumulate in place: memory stays at (base + one delta + accumulator), whatever K is
        acc = torch.zeros_like(base)
        wsum: torch.Tensor | float = 0.0
        for i, model in enumerate(x.models):
            delta = model - base
            if comp.sparsify:
                delta = _sparsify_paper(delta, x, i, comp)
            w = as_weight(x.params["weight"][i], base)
            acc.add_(delta.mul_(w))
            wsum = wsum + w
        if normalize:
            acc = _divide_by_weight_sum(acc, wsum)
    else:
        stacked = torch.empty((len(x.models), *base.shape), dtype=base.dtype, device=base.device)
        weights = []
        for i, model in enumerate(x.models):
            delta = torch.sub(model, base, out=stacked[i])
            if comp.sparsify:
                stacked[i] = _sparsify_paper(delta, x, i, comp)
            w = as_weight(x.params["weight"][i], base)
            stacked[i].mul_(w)
            weights.append(w)
        sign = ops.elect_sign(stacked, x.shared.get("election", "sum"))
        agree = ops.agreement(stacked, sign)
        acc = ops.disjoint_merge(stacked, agree, "count" if normalize else "none")
    if lam != 1.0:
        acc.mul_(lam)
    return acc.add_(base)


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
        mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
        w = delta.abs().reshape(-1)
        if w.device.type == "cpu":
            w = w.float()
        mask[torch.argsort(w, descending=True)[:k]] = 1
        return _masked(delta, mask.reshape_as(delta), norm)
    if kind == "bernoulli":
        work = _work_dtype(delta)
        mask = torch.bernoulli(torch.full_like(delta, density, dtype=work), generator=gen)
        return _masked(delta.to(work), mask, norm).to(delta.dtype)
    if kind == "outliers":
        n = delta.numel()
        target = int(density * n)
        n_top = int(x.params["gamma"][i] * n)
        n_bot = max(0, n - target - n_top)
        w = delta.abs().reshape(-1)
        if w.device.type == "cpu":
            w = w.float()
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


def compat_kernel(x: KernelInput, comp: Composition) -> torch.Tensor:
    assert x.base is not None
    base = x.base
    normalize = x.shared.get("normalize")
    normalize = comp.normalize_compat if normalize is None else normalize
    rescale = x.shared.get("rescale")
    rescale = comp.rescale_compat if rescale is None else rescale
    deltas = base.new_empty((len(x.models), *base.shape))
    for i, model in enumerate(x.models):
        delta = model - base
        if comp.sparsify:
            delta = _sparsify_compat(delta, x, i, comp, rescale)
        deltas[i] = delta
    weights = torch.tensor([float(w) for w in x.params["weight"]], dtype=deltas.dtype, device=deltas.device)
    while deltas.dim() > weights.dim():
        weights.unsqueeze_(-1)
    deltas.mul_(weights)
    if comp.consensus:
        mask_dtype = torch.int8 if x.shared.get("int8_mask") else base.dtype
        sign = deltas.sign().to(mask_dtype)
        majority = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
        mask = sign == majority
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    lam = float(x.shared.get("lambda", 1.0))
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(base.dtype)


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
        normalizes_by_weight_sum=comp.consensus is None,
        compat_guards_zero_weight_sum=True,
        needs_global_threshold=(lambda shared: shared.get("trim_scope") == "global") if global_trim else
        (lambda shared: False),
    ))


TA = "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv:2212.04089)"
TIES = "Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv:2306.01708)"
DARE = "Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv:2311.03099)"
BREADCRUMBS = "Davari & Belilovsky, Model Breadcrumbs (arXiv:2312.06795)"
DELLA = "Deep et al., DELLA-Merging (arXiv:2406.11617)"

TRIM_SCOPE = ParamSpec("trim_scope", str, "global", default_compat="tensor",
                       help="where the top-density entries are chosen: over the whole task vector (paper), per "
                            "tensor (mergekit) or per row", choices=("global", "tensor", "row"))

_define("task_arithmetic", Composition(None, None, False, False, "none", False), (),
        "θ_b + λ·Σ w_t·Δ_t", TA)
_define("ties", Composition("magnitude", "sum", True, True, "none", False),
        (ParamSpec("density", float, 0.2, default_compat=1.0, per_model=True, low=0.0, high=1.0, low_open=True,
                   help="fraction of each task vector kept by magnitude (paper k = 0.2; mergekit default 1.0)"),
         TRIM_SCOPE),
        "trim to the top-density |Δ|, elect a sign per entry, disjoint mean of the agreeing entries", TIES,
        global_trim=True)
_define("dare_linear", Composition("bernoulli", None, False, False, "inverse", True), (density_param(0.5),),
        "drop entries at random with probability 1−density, rescale, then task arithmetic", DARE, random=True)
_define("dare_ties", Composition("bernoulli", "sum", True, False, "inverse", True), (density_param(0.5),),
        "DARE drop and rescale, then TIES sign election and disjoint merge", DARE, random=True)
_define("magnitude_prune", Composition("magnitude", None, False, False, "none", False),
        (density_param(0.5, "fraction of each tensor's task vector kept by magnitude (no rescale)"),),
        "keep the largest-|Δ| entries of each tensor (no rescale), then task arithmetic", DARE + " (MP baseline)")
_define("breadcrumbs", Composition("outliers", None, False, False, "none", False),
        (density_param(0.9), GAMMA),
        "drop the largest outliers and the smallest entries of each tensor, then task arithmetic", BREADCRUMBS)
_define("breadcrumbs_ties", Composition("outliers", "sum", False, False, "none", False),
        (density_param(0.9), GAMMA),
        "Breadcrumbs sparsification with TIES sign election", BREADCRUMBS)
_define("della", Composition("della", "sum", True, True, "inverse", True), (density_param(0.7), EPSILON),
        "magnitude-rank sampling (MagPrune), sign election, disjoint mean", DELLA, random=True)
_define("della_linear", Composition("della", None, False, False, "inverse", True), (density_param(0.7), EPSILON),
        "MagPrune then task arithmetic", DELLA, random=True)
