"""Golden values for the merge kernels, computed independently of them (by formula, in float64 numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergeflow.methods import KernelInput, get_method, ops


def _inputs(k: int = 3, shape: tuple[int, ...] = (6, 5), seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    experts = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(k)]
    return base, experts


def _run(method: str, base, experts, per_model=None, shared=None, **kw) -> torch.Tensor:
    m = get_method(method)
    params = {p.name: [p.default] * len(experts) for p in m.per_model_params}
    params.update(per_model or {})
    sh = {p.name: p.default for p in m.shared_params}
    sh.update(shared or {})
    return m.kernel(KernelInput("t", base, experts, params, sh, **kw))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def official_ties(base: np.ndarray, experts: list[np.ndarray], density: float, lam: float) -> np.ndarray:
    """The official TIES algorithm (prateeky2806/ties-merging) on one flattened tensor, written from the paper."""
    tvs = np.stack([(e - base).reshape(-1) for e in experts])
    n = tvs.shape[1]
    kth = n - int(n * density)
    trimmed = np.zeros_like(tvs)
    for i, tv in enumerate(tvs):
        thr = np.sort(np.abs(tv))[kth - 1]
        trimmed[i] = np.where(np.abs(tv) >= thr, tv, 0.0)
    sign = np.sign(trimmed.sum(0))
    sign[sign == 0] = 1.0
    agree = (np.sign(trimmed) == sign) & (trimmed != 0)
    merged = (trimmed * agree).sum(0) / np.maximum(agree.sum(0), 1)
    return base + lam * merged.reshape(base.shape)


def test_task_arithmetic_formula() -> None:
    base, experts = _inputs()
    w = [0.5, -0.25, 1.0]
    out = _run("task_arithmetic", base, experts, {"weight": w}, {"lambda": 0.7})
    expected = _np(base) + 0.7 * sum(wi * (_np(e) - _np(base)) for wi, e in zip(w, experts))
    np.testing.assert_allclose(_np(out), expected, rtol=0, atol=1e-6)


def test_ties_per_tensor_matches_official_algorithm() -> None:
    base, experts = _inputs(shape=(40, 25))
    out = _run("ties", base, experts, {"density": [0.3] * 3}, {"trim_scope": "tensor", "lambda": 1.2})
    np.testing.assert_allclose(_np(out), official_ties(_np(base), [_np(e) for e in experts], 0.3, 1.2), atol=1e-6)


def test_ties_weights_scale_the_disjoint_mean_but_do_not_vote() -> None:
    """Paper mode (D-15, PEFT's ties): the sign is elected on the unweighted trimmed deltas and each expert's weight
    multiplies its share of the disjoint mean (count of agreeing experts below). Voting on weighted deltas
    (mergekit's order) would let a large weight (Sens's c) overturn the majority."""
    base = torch.zeros(2)
    experts = [torch.tensor([1.0, 0.3]), torch.tensor([-0.8, 0.5])]
    out = _run("ties", base, experts, {"density": [1.0, 1.0], "weight": [0.2, 2.0]}, {"trim_scope": "tensor"})
    # entry 0: the vote 1.0 - 0.8 > 0 elects +, only expert 0 agrees: 0.2·1.0 / 1 (weighted vote: -1.6)
    # entry 1: both agree on +: (0.2·0.3 + 2.0·0.5) / 2
    torch.testing.assert_close(out, torch.tensor([0.2, (0.06 + 1.0) / 2]))
    base, experts = _inputs(shape=(30, 20), seed=3)
    w = [0.3, 1.7, 0.9]
    out = _run("ties", base, experts, {"density": [0.4] * 3, "weight": w}, {"trim_scope": "tensor"})
    tvs = [(_np(e) - _np(base)).reshape(-1) for e in experts]
    trimmed = np.stack([np.where(np.abs(tv) >= np.sort(np.abs(tv))[len(tv) - int(len(tv) * 0.4) - 1], tv, 0.0)
                        for tv in tvs])
    sign = np.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = (np.sign(trimmed) == sign) & (trimmed != 0)
    merged = (trimmed * agree * np.array(w)[:, None]).sum(0) / np.maximum(agree.sum(0), 1)
    np.testing.assert_allclose(_np(out), _np(base) + merged.reshape(base.shape), atol=1e-6)


def test_ties_global_threshold_is_used() -> None:
    base, experts = _inputs(k=2)
    thr = [0.05, 0.12]
    out = _run("ties", base, experts, {"density": [0.5, 0.5]}, {"trim_scope": "global"}, thresholds=thr)
    d = [(_np(e) - _np(base)) for e in experts]
    trimmed = np.stack([np.where(np.abs(di) >= t, di, 0) for di, t in zip(d, thr)])
    sign = np.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(trimmed) == sign
    merged = (trimmed * agree).sum(0) / np.maximum(agree.sum(0), 1)
    np.testing.assert_allclose(_np(out), _np(base) + merged, atol=1e-6)


def test_magnitude_prune_keeps_top_fraction_without_rescale() -> None:
    base, experts = _inputs(k=1, shape=(10, 10))
    out = _run("magnitude_prune", base, experts, {"density": [0.3]})
    d = _np(experts[0]) - _np(base)
    thr = np.sort(np.abs(d).reshape(-1))[100 - 30 - 1]
    np.testing.assert_allclose(_np(out), _np(base) + np.where(np.abs(d) >= thr, d, 0), atol=1e-6)
    assert ((_np(out) - _np(base)) != 0).sum() == 31  # official rule: >= the (n − ⌊d·n⌋)-th smallest


def test_dare_linear_inverse_rescale_with_injected_generator() -> None:
    base, experts = _inputs(k=2, shape=(50, 40))
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    out = _run("dare_linear", base, experts, {"density": [0.4, 0.4], "weight": [1.0, 0.5]}, {},
               generators=gens)
    expected = _np(base).copy()
    for e, w, seed in zip(experts, [1.0, 0.5], [1, 2]):
        keep = (torch.rand(base.shape, generator=torch.Generator().manual_seed(seed)) < 0.4).numpy()
        expected += w * np.where(keep, (_np(e) - _np(base)) / 0.4, 0.0)
    np.testing.assert_allclose(_np(out), expected, atol=1e-5)


def test_dare_statistics() -> None:
    base = torch.zeros(200_000)
    experts = [torch.ones(200_000)]
    out = _run("dare_linear", base, experts, {"density": [0.25]}, {}, generators=[torch.Generator().manual_seed(0)])
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.25) < 0.005
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 4.0))
    assert abs(out.mean().item() - 1.0) < 0.02  # unbiased in expectation


def test_dare_per_partition_density_tensor() -> None:
    """APL passes a per-row drop ratio: rows with density 1 are untouched, density-0.5 rows are rescaled by 2."""
    base = torch.zeros(4, 10_000)
    experts = [torch.ones(4, 10_000)]
    density = torch.tensor([[1.0], [0.5], [0.5], [1.0]])
    out = _run("dare_linear", base, experts, {"density": [density]}, {},
               generators=[torch.Generator().manual_seed(0)])
    assert torch.equal(out[0], torch.ones(10_000)) and torch.equal(out[3], torch.ones(10_000))
    assert set(out[1].unique().tolist()) == {0.0, 2.0}
    assert abs((out[1] != 0).float().mean().item() - 0.5) < 0.03


def test_dare_ties_elects_on_rescaled_deltas() -> None:
    base = torch.zeros(3)
    experts = [torch.tensor([1.0, -1.0, 2.0]), torch.tensor([-3.0, -1.0, 1.0])]
    out = _run("dare_ties", base, experts, {"density": [1.0, 1.0]}, {})
    # density 1 keeps everything; sign election by sum: (+,-,+); disjoint mean over agreeing entries
    assert torch.allclose(out, torch.tensor([-3.0, -1.0, 1.5]))


def test_breadcrumbs_drops_outliers_and_smallest() -> None:
    base = torch.zeros(10)
    delta = torch.arange(1.0, 11.0)
    out = _run("breadcrumbs", base, [delta], {"density": [0.5], "gamma": [0.2]})
    # n=10: keep 5, drop the 2 largest (9, 10) and the 3 smallest (1, 2, 3)
    assert torch.equal(out, torch.tensor([0, 0, 0, 4, 5, 6, 7, 8, 0, 0.0]))


def test_della_keep_probabilities_are_linear_in_rank() -> None:
    delta = torch.tensor([[0.1, -0.4, 0.3, 0.2, -0.5]])
    probs = ops.della_keep_prob(delta, density=0.6, epsilon=0.2)
    # ranks by |Δ|: 0.1→0, 0.2→1, 0.3→2, 0.4→3, 0.5→4 → p = 0.4 + 0.4·rank/4
    assert torch.allclose(probs, torch.tensor([[0.4, 0.7, 0.6, 0.5, 0.8]]))


def test_della_is_unbiased_and_elects() -> None:
    base = torch.zeros(1, 100_000)
    delta = torch.rand(1, 100_000, generator=torch.Generator().manual_seed(3)) + 0.5
    out = _run("della_linear", base, [delta], {"density": [0.5], "epsilon": [0.2]}, {},
               generators=[torch.Generator().manual_seed(0)])
    assert abs(out.sum().item() / delta.sum().item() - 1.0) < 0.01
    assert abs((out != 0).float().mean().item() - 0.5) < 0.01


def test_linear_weighted_average() -> None:
    _, experts = _inputs()
    out = _run("linear", None, experts, {"weight": [1.0, 2.0, 1.0]})
    expected = (_np(experts[0]) + 2 * _np(experts[1]) + _np(experts[2])) / 4
    np.testing.assert_allclose(_np(out), expected, atol=1e-6)


def test_model_stock_two_experts_formula() -> None:
    base, experts = _inputs(k=2, shape=(30,))
    out = _run("model_stock", base, experts)
    d0, d1 = (_np(e) - _np(base) for e in experts)
    cos = d0 @ d1 / (np.linalg.norm(d0) * np.linalg.norm(d1))
    t = 2 * cos / (1 + cos)
    expected = t * (_np(experts[0]) + _np(experts[1])) / 2 + (1 - t) * _np(base)
    np.testing.assert_allclose(_np(out), expected, atol=1e-6)


def test_slerp_quarter_circle() -> None:
    base = torch.tensor([1.0, 0.0])
    other = torch.tensor([0.0, 1.0])
    for t in (0.0, 0.25, 0.5, 1.0):
        out = _run("slerp", base, [other], shared={"t": t})
        assert torch.allclose(out, torch.tensor([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)]), atol=1e-6)


def test_nuslerp_task_vectors_with_base() -> None:
    base = torch.tensor([1.0, 1.0])
    a, b = base + torch.tensor([2.0, 0.0]), base + torch.tensor([0.0, 2.0])
    out = _run("nuslerp", base, [a, b], {"weight": [1.0, 1.0]})
    assert torch.allclose(out, base + torch.tensor([math.sqrt(2), math.sqrt(2)]), atol=1e-6)


def test_consensus_tall_masks() -> None:
    base = torch.zeros(4)
    d1 = torch.tensor([1.0, 1.0, 0.0, 0.1])
    d2 = torch.tensor([1.0, 0.0, 1.0, 0.1])
    d3 = torch.tensor([1.0, 0.0, 0.0, 0.1])
    out = _run("consensus", base, [d1, d2, d3], {"tall_lambda": [0.4] * 3}, {"k": 2})
    # τ = (3, 1, 1, 0.3). Entry 0: |1| >= 0.4·2 for all three tasks → kept. Entry 1: only task 1 (1 >= 0) keeps it,
    # tasks 2, 3 have 0 >= 0.4 → no → 1 vote → dropped. Entry 3: 0.1 >= 0.4·0.2 → 3 votes → kept.
    assert torch.allclose(out, torch.tensor([3.0, 0.0, 0.0, 0.3]))


@pytest.mark.parametrize("n", [1000, 3_000_000])
def test_kth_smallest_exact(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    values = (torch.randn(n, generator=g) * 0.01).bfloat16().float().abs()  # bf16 → many exact ties
    values[:100] = 0.0
    for k in (1, 2, n // 3, n // 2, n - 1, n):
        assert ops.kth_smallest(values, k) == torch.kthvalue(values, k).values.item()


def test_streaming_kth_over_chunks_equals_concatenation() -> None:
    g = torch.Generator().manual_seed(7)
    chunks = [torch.randn(s, generator=g).abs() for s in (10, 5000, 300, 1)]
    allv = torch.cat(chunks)
    for k in (1, 77, allv.numel() // 2, allv.numel()):
        sel = ops.KthSmallest(k)
        for c in chunks:
            sel.add_first(c)
        sel.finish_first()
        for c in chunks:
            sel.add_second(c)
        assert sel.value() == torch.kthvalue(allv, k).values.item()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune",
                                    "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "consensus",
                                    "model_stock", "linear", "nuslerp"])
@pytest.mark.parametrize("compat", [False, True])
def test_kernels_never_modify_their_inputs(method: str, compat: bool) -> None:
    base, experts = _inputs(k=2, shape=(64, 48))
    before = [base.clone(), *(e.clone() for e in experts)]
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    _run(method, base, experts, shared={"trim_scope": "tensor"} if method == "ties" else None, generators=gens,
         compat=compat)
    assert all(torch.equal(a, b) for a, b in zip(before, [base, *experts]))


def test_sign_election_by_count_differs_from_mass() -> None:
    base = torch.zeros(2)
    experts = [torch.tensor([5.0, 1.0]), torch.tensor([-1.0, -1.0]), torch.tensor([-1.0, 2.0])]
    params = {"density": [1.0] * 3}
    mass = _run("dare_ties", base, experts, params, {"election": "sum"})
    count = _run("dare_ties", base, experts, params, {"election": "count"})
    # entry 0: sum = +3 → only 5 agrees → 5; two of three signs are negative → mean(-1, -1) = -1
    # entry 1: sum = +2, and two positive signs → mean(1, 2) = 1.5 in both
    assert torch.equal(mass, torch.tensor([5.0, 1.5])) and torch.equal(count, torch.tensor([-1.0, 1.5]))
