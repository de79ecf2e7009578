"""Spherical interpolation: SLERP between the base and one model, and NuSLERP between two models or task vectors."""

from __future__ import annotations

import torch

from mergeflow.methods.base import KernelInput, MergeMethod, ParamSpec, register


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8
          ) -> torch.Tensor:
    """SLERP of two flattened tensors; nearly colinear pairs fall back to linear interpolation."""
    a, b = v0.reshape(-1).double(), v1.reshape(-1).double()
    na, nb = a.norm(), b.norm()
    dot = ((a / (na if na > eps else 1.0)) * (b / (nb if nb > eps else 1.0))).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        out = (1 - t) * a + t * b
    else:
        theta = torch.acos(dot)
        s = torch.sin(theta)
        out = torch.sin((1 - t) * theta) / s * a + torch.sin(t * theta) / s * b
    return out.to(v0.dtype).reshape(v0.shape)


def slerp_kernel(x: KernelInput) -> torch.Tensor:
    assert x.base is not None
    return slerp(float(x.shared["t"]), x.base, x.models[0])


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool, eps: float = 1e-8
            ) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp_kernel(x: KernelInput) -> torch.Tensor:
    w0, w1 = (float(w) for w in x.params["weight"])
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    row_wise = x.shared.get("nuslerp_row_wise", False)
    flatten = x.shared.get("nuslerp_flatten", True)
    a, b = x.models
    if x.base is not None:
        return x.base + nuslerp(t, a - x.base, b - x.base, row_wise=row_wise, flatten=flatten)
    return nuslerp(t, a, b, row_wise=row_wise, flatten=flatten)


SLERP = register(MergeMethod(
    name="slerp",
    kernel=slerp_kernel,
    params=(ParamSpec("t", float, None, help="interpolation factor: 0 = base, 1 = the other model", low=0.0,
                      high=1.0),),
    summary="spherical interpolation between the base (t=0) and one model (t=1), per tensor",
    paper="Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985",
    min_models=1,
    max_models=1,
    mergekit_name="slerp",
))

NUSLERP = register(MergeMethod(
    name="nuslerp",
    kernel=nuslerp_kernel,
    params=(
        ParamSpec("weight", float, 1.0, per_model=True, help="relative weight; t = w2 / (w1 + w2)"),
        ParamSpec("nuslerp_row_wise", bool, False, help="interpolate each row separately"),
        ParamSpec("nuslerp_flatten", bool, True, help="interpolate the flattened tensor"),
    ),
    summary="SLERP of two models, or of their task vectors when a base is given",
    paper="mergekit NuSLERP (Goddard et al., arXiv:2403.13257)",
    needs_base=False,
    min_models=2,
    max_models=2,
    mergekit_name="nuslerp",
))
