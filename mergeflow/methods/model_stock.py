"""Model Stock: interpolate between the experts' average and the base by the angle between their task vectors."""

from __future__ import annotations

import torch

from mergeflow.methods.base import KernelInput, MergeMethod, ParamSpec, register


def model_stock_kernel(x: KernelInput) -> torch.Tensor:
    assert x.base is not None
    filter_wise = x.shared.get("filter_wise", False)
    shape = x.base.shape
    if filter_wise:
        w0 = x.base.unsqueeze(0) if x.base.dim() == 1 else x.base
        ws = [m.unsqueeze(0) if m.dim() == 1 else m for m in x.models]
    else:
        w0 = x.base.reshape(-1)
        ws = [m.reshape(-1) for m in x.models]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norm = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norm.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * cos
    # at cos = -1/(N-1) there is no finite estimate: keep the base there (as mergekit does)
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(denom), denom))
    clip = x.shared.get("clip_t", False)
    if clip:
        t = t.clamp(0.0, 1.0)
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)


MODEL_STOCK = register(MergeMethod(
    name="model_stock",
    kernel=model_stock_kernel,
    params=(
        ParamSpec("filter_wise", bool, False, help="one interpolation ratio per row instead of per tensor"),
        ParamSpec("clip_t", bool, False, help="clip the interpolation ratio to [0, 1] (negative cosines)"),
    ),
    summary="t = N·cosθ / (1 + (N−1)·cosθ); θ = t·mean(θ_i) + (1−t)·θ_b per tensor",
    paper="Jang, Yun & Han, Model Stock, ECCV 2024 (arXiv:2403.19522)",
    min_models=2,
    mergekit_name="model_stock",
))
