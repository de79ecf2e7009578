"""The sort-free selections of mergekit's trims (mergeflow.methods.sort_select) against torch's own CPU sort and
mergekit's functions, on adversarial inputs: tensors full of equal magnitudes (constant, two or a few values, bf16
task vectors, presorted runs, organ pipes), sizes around std::sort's 16-element insertion threshold and larger, top-k
and middle slices in both directions; and the compat kernel's threaded path against its sequential one and mergekit.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mergeflow.methods import sort_select
from mergeflow.methods import task_arithmetic as ta
from mergeflow.methods.base import KernelInput

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TIES = ta.Composition("magnitude", "sum", True, True, "none", False)
BREADCRUMBS = ta.Composition("outliers", None, False, False, "none", False)

SIZES = [2, 15, 16, 17, 18, 31, 32, 33, 48, 100, 255, 256, 257, 1000, 4097, 30011]
KINDS = ["constant", "two_values", "few_values", "bf16_delta", "ascending_runs", "descending_runs", "organ_pipe",
         "distinct"]


def adversarial(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + n)
    if kind == "constant":
        return torch.full((n,), 0.25)
    if kind == "two_values":
        return torch.randint(0, 2, (n,), generator=g).float()
    if kind == "few_values":
        return torch.randint(0, 5, (n,), generator=g).float().mul_(1e-3)
    if kind == "bf16_delta":  # |expert − base| of a bf16 checkpoint: a few hundred distinct magnitudes
        base = (0.02 * torch.randn(n, generator=g)).bfloat16()
        expert = (base.float() + 1e-3 * torch.randn(n, generator=g)).bfloat16()
        return (expert - base).abs().float()
    if kind == "ascending_runs":
        return torch.randint(0, 7, (n,), generator=g).sort().values.float()
    if kind == "descending_runs":
        return torch.randint(0, 7, (n,), generator=g).sort(descending=True).values.float()
    if kind == "organ_pipe":
        half = torch.arange((n + 1) // 2) // 3
        return torch.cat([half, half.flip(0)])[:n].float()
    return torch.randn(n, generator=g).abs()


def torch_slice(w: torch.Tensor, start: int, stop: int, descending: bool) -> torch.Tensor:
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[torch.sort(w.reshape(-1), descending=descending).indices[start:stop]] = True
    return mask.reshape(w.shape)


def slices(n: int) -> list[tuple[int, int]]:
    return sorted({(0, n // 2), (0, max(1, int(0.3 * n))), (0, 1), (0, n - 1), (n // 10, n // 10 + int(0.8 * n)),
                   (1, n)})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("descending", [True, False])
def test_slices_match_torch_sort(kind: str, descending: bool) -> None:
    for n in SIZES:
        w = adversarial(kind, n)
        for start, stop in slices(n):
            got = sort_select.sort_slice_mask(w, start, stop, descending=descending)
            assert torch.equal(got, torch_slice(w, start, stop, descending)), (n, start, stop)
            assert int(got.sum()) == stop - start


def test_large_bf16_task_vector_with_many_ties() -> None:
    """A 2-D bf16 task vector of ~600k entries (a few hundred distinct |Δ|, tens of thousands equal at the cut),
    top half as the TIES trim takes it, and the thresholds of density 0.1 and 0.9."""
    w = adversarial("bf16_delta", 768 * 800, seed=3).reshape(768, 800)
    for density in (0.1, 0.5, 0.9):
        k = int(density * w.numel())
        kth = torch.sort(w.reshape(-1), descending=True).values[k - 1]
        assert int((w == kth).sum()) > 1000  # the cut falls inside a large group of equal values
        assert torch.equal(sort_select.topk_mask(w, k), torch_slice(w, 0, k, True))


def test_overwrite_gives_the_same_mask() -> None:
    w = adversarial("bf16_delta", 50_000)
    expected = torch_slice(w, 0, 20_000, True)
    assert torch.equal(sort_select.topk_mask(w.clone(), 20_000, overwrite=True), expected)
    kept = w.clone()
    sort_select.topk_mask(kept, 20_000)
    assert torch.equal(kept, w), "without overwrite the input is left as it was"


def test_nan_and_other_dtypes_fall_back_to_the_sort() -> None:
    w = adversarial("few_values", 500)
    w[[3, 100, 250]] = float("nan")
    assert torch.equal(sort_select.topk_mask(w, 200), torch_slice(w, 0, 200, True))
    # float64 is sorted as float32 (mergekit's w.float() on the CPU); bf16 as float32 too (replayed on its bits)
    w64 = adversarial("distinct", 500).double().mul_(1 + 1e-12)
    assert torch.equal(sort_select.topk_mask(w64, 200), torch_slice(w64.float(), 0, 200, True))
    w16 = adversarial("bf16_delta", 5000).bfloat16()
    assert torch.equal(sort_select.topk_mask(w16, 2000), torch_slice(w16.float(), 0, 2000, True))
    signed = -adversarial("bf16_delta", 5000).bfloat16()  # negative 16-bit keys do not order like their bits: sort
    assert torch.equal(sort_select.topk_mask(signed, 2000), torch_slice(signed.float(), 0, 2000, True))
    zeros = torch.zeros(100, dtype=torch.bfloat16)
    zeros[::3] = -0.0  # equal to +0.0 for the sort, but 0x8000 as a pattern
    assert torch.equal(sort_select.topk_mask(zeros, 40), torch_slice(zeros.float(), 0, 40, True))


def test_depth_limit_falls_back_to_the_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where std::sort would switch to heapsort the replay stops and sorts the original values (put back from the
    partially partitioned copy)."""
    monkeypatch.setattr(sort_select, "_lg", lambda n: 1)  # depth limit 2: reached on the third partition
    w = adversarial("bf16_delta", 20_000)
    assert torch.equal(sort_select.topk_mask(w.clone(), 9_000), torch_slice(w, 0, 9_000, True))
    assert sort_select.topk_mask(w.clone(), 9_000, overwrite=True) is None  # the scratch copy is permuted: sort
    x = KernelInput("t", None, [w], {"density": [0.45], "weight": [1.0]}, {}, compat=True)
    assert torch.equal(ta._sparsify_compat(w, x, 0, TIES, False), w * torch_slice(w, 0, 9_000, True))


def test_organ_pipe_reaches_the_heapsort_depth() -> None:
    """An organ pipe of 4097 values makes std::sort spend its depth limit (24 partitions) on the range holding
    position 1229: the replay sees it and sorts."""
    w = adversarial("organ_pipe", 4097)
    assert torch.equal(sort_select.topk_mask(w, 1229), torch_slice(w, 0, 1229, True))
    assert sort_select.topk_mask(w.clone(), 1229, overwrite=True) is None


# --- against mergekit's own functions --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["bf16_delta", "few_values", "constant", "organ_pipe"])
def test_magnitude_and_outliers_match_mergekit(dtype: torch.dtype, kind: str) -> None:
    mergekit_sparsify = pytest.importorskip("mergekit.sparsify")
    for n in (17, 33, 257, 4097, 65_537):
        delta = adversarial(kind, n).to(dtype)
        delta[::3] = -delta[::3]  # signs do not change |Δ|
        for density in (0.05, 0.5, 0.9):
            for rescale in (False, True):
                norm = mergekit_sparsify.RescaleNorm.l1 if rescale else None
                x = KernelInput("t", None, [delta], {"density": [density], "weight": [1.0], "gamma": [0.02]}, {},
                                compat=True)
                ours = ta._sparsify_compat(delta, x, 0, TIES, rescale)
                assert torch.equal(ours, mergekit_sparsify.magnitude(delta, density, norm)), (n, density, rescale)
                ours = ta._sparsify_compat(delta, x, 0, BREADCRUMBS, rescale)
                theirs = mergekit_sparsify.magnitude_outliers(delta, density, norm, gamma=0.02)
                assert torch.equal(ours, theirs), (n, density, rescale)


def _experts(dtype: torch.dtype, shape: tuple[int, ...], k: int = 3) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    base = (0.02 * torch.randn(shape, generator=g)).to(dtype)
    return base, [(base.float() + 1e-3 * torch.randn(shape, generator=g)).to(dtype) for _ in range(k)]


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "task_arithmetic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_threaded_compat_kernel_matches_mergekit(monkeypatch: pytest.MonkeyPatch, method: str,
                                                 dtype: torch.dtype) -> None:
    """The threaded path (experts sparsified concurrently, the combination by blocks of rows) on tensors of many
    equal magnitudes: bit-identical to mergekit's merge_tensors."""
    mergekit_methods = pytest.importorskip("mergekit.merge_methods")
    monkeypatch.setattr(ta, "PARALLEL_MIN_NUMEL", 0)
    monkeypatch.setattr(ta, "_cpu_workers", lambda: 2)
    comp = {"ties": TIES, "breadcrumbs_ties": ta.Composition("outliers", "sum", False, False, "none", False),
            "task_arithmetic": ta.Composition(None, None, False, False, "none", False)}[method]
    weights, densities = [0.6, -0.3, 0.5], [0.4, 0.7, 0.5]
    ids = ["base", "a", "b", "c"]
    for shape in [(96, 70), (1000,), (7, 5, 30)]:
        base, models = _experts(dtype, shape)
        params: dict[str, Any] = {"weight": dict(zip(ids[1:], weights)), "lambda": 1.2}
        if method != "task_arithmetic":
            params["density"] = dict(zip(ids[1:], densities))
        for normalize in (True, False):
            theirs = mergekit_methods.merge_tensors([base, *models], method, base_index=0, ids=ids,
                                                    parameters={**params, "normalize": normalize})
            x = KernelInput("t", base, models, {"weight": weights, "density": densities, "gamma": [0.01] * 3},
                            {"lambda": 1.2, "normalize": normalize}, compat=True)
            assert ta._may_parallelize(base)
            assert torch.equal(ta.compat_kernel(x, comp), theirs), (shape, normalize)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_threaded_dare_draws_each_expert_from_its_own_generator(monkeypatch: pytest.MonkeyPatch,
                                                               dtype: torch.dtype) -> None:
    """Concurrent only with one generator per expert (the engine's): the same result as one expert after another;
    a shared generator (mergekit's global stream) keeps the experts in order."""
    comp = ta.Composition("bernoulli", "sum", True, False, "inverse", True)
    base, models = _experts(dtype, (64, 50))
    params = {"weight": [0.6, -0.3, 0.5], "density": [0.4, 0.7, 0.5]}

    def run(generators: list[torch.Generator]) -> torch.Tensor:
        return ta.compat_kernel(KernelInput("t", base, models, params, {}, generators=generators, compat=True), comp)

    sequential = run([torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    shared = torch.Generator().manual_seed(9)
    shared_sequential = run([shared] * 3)
    monkeypatch.setattr(ta, "PARALLEL_MIN_NUMEL", 0)
    monkeypatch.setattr(ta, "_cpu_workers", lambda: 2)
    assert torch.equal(run([torch.Generator().manual_seed(s) for s in (1, 2, 3)]), sequential)
    shared = torch.Generator().manual_seed(9)
    x = KernelInput("t", base, models, params, {}, generators=[shared] * 3, compat=True)
    assert not ta._independent_draws(x, comp)
    assert torch.equal(ta.compat_kernel(x, comp), shared_sequential)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_dare_mask_draws_like_torch_bernoulli(dtype: torch.dtype) -> None:
    """The compat DARE mask (torch.rand < p) is torch.bernoulli's (mergekit's) mask, leaving the stream at the same
    place, for sizes from 1 to ~10^5 and densities that do not round exactly to the work dtype."""
    comp = ta.Composition("bernoulli", None, False, False, "inverse", True)
    for n in (1, 7, 1000, 100_003):
        delta = (1e-3 * torch.randn(n, generator=torch.Generator().manual_seed(n))).to(dtype)
        work = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        for density in (0.05, 0.3, 0.77):
            gen = torch.Generator().manual_seed(n + 1)
            x = KernelInput("t", None, [delta], {"density": [density], "weight": [1.0]}, {}, generators=[gen],
                            compat=True)
            ours = ta._sparsify_compat(delta, x, 0, comp, False)
            ref_gen = torch.Generator().manual_seed(n + 1)
            mask = torch.bernoulli(torch.full_like(delta, density, dtype=work), generator=ref_gen)
            assert torch.equal(ours, (delta.to(work) * mask).to(dtype)), (n, density)
            assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=ref_gen))
