"""TSV-Merge, Iso-C, Iso-CTS and WUDI against independent float64 numpy implementations written from the papers'
equations: polar factors from eigendecompositions (A(AᵀA)^-½), Iso-C's spectrum mean as the nuclear norm over r,
WUDI's gradient term by term per task with Adam written out; and the engine's promise that expert order does not
change a single bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mergeflow.methods import KernelInput, get_method
from mergeflow.methods.spectral import iso_cts_split
from tests.tiny_models import ALL_FAMILIES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _inputs(k: int, shape: tuple[int, ...], seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    experts = [base + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(k)]
    return base.to(dtype), [e.to(dtype) for e in experts]


def _run(method: str, base, experts, **shared) -> torch.Tensor:
    m = get_method(method)
    sh = {p.name: p.default for p in m.shared_params}
    sh.update(shared)
    return m.kernel(KernelInput("t", base, experts, {}, sh, dtype=base.dtype if base.dtype == torch.float64
                                else torch.float32))


def _deltas(base, experts) -> list[np.ndarray]:
    return [e.double().numpy() - base.double().numpy() for e in experts]


def _inv_sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, q = np.linalg.eigh(a)
    return (q / np.sqrt(w)) @ q.T


def polar_ref(a: np.ndarray) -> np.ndarray:
    """The orthogonal polar factor by eigendecomposition: A(AᵀA)^-½ (tall) or (AAᵀ)^-½A (wide)."""
    if a.shape[0] >= a.shape[1]:
        return a @ _inv_sqrt_psd(a.T @ a)
    return _inv_sqrt_psd(a @ a.T) @ a


def tsv_ref(deltas: list[np.ndarray], lam: float) -> np.ndarray:
    if deltas[0].ndim != 2:
        return lam * np.mean(deltas, axis=0)
    k = len(deltas)
    s = max(1, min(deltas[0].shape) // k)  # the documented rank share: ⌊r/K⌋, at least one triplet
    us, ss, vs = [], [], []
    for d in deltas:
        u, sv, vt = np.linalg.svd(d, full_matrices=False)
        us.append(u[:, :s])
        ss.append(sv[:s])
        vs.append(vt[:s].T)
    u_cat, s_cat, v_cat = np.concatenate(us, 1), np.concatenate(ss), np.concatenate(vs, 1)
    return lam * polar_ref(u_cat) @ np.diag(s_cat) @ polar_ref(v_cat).T


def iso_c_ref(deltas: list[np.ndarray], lam: float) -> np.ndarray:
    if deltas[0].ndim != 2:
        return lam * np.mean(deltas, axis=0)
    total = np.sum(deltas, axis=0)
    sigma_bar = np.linalg.norm(total, "nuc") / min(total.shape)
    return lam * sigma_bar * polar_ref(total)


def iso_cts_ref(deltas: list[np.ndarray], lam: float, fraction: float) -> np.ndarray:
    if deltas[0].ndim != 2:
        return lam * np.mean(deltas, axis=0)
    k = len(deltas)
    r = min(deltas[0].shape)
    common = int(r * fraction)
    per = round((r - common) / k)  # Python rounds half to even, as FusionBench's sizes do
    if per * k > r:
        per = r // k  # the documented cut where FusionBench would slice with a negative index
    common = r - per * k
    u, s, vt = np.linalg.svd(np.sum(deltas, axis=0), full_matrices=False)
    # common space first here (the kernel puts it last): the polar factor must not care
    us, ss, vs = [u[:, :common]], [s[:common]], [vt[:common].T]
    for d in deltas:
        uc = u[:, :common]
        ut, st, vtt = np.linalg.svd(d - uc @ uc.T @ d, full_matrices=False)
        us.append(ut[:, :per])
        ss.append(st[:per])
        vs.append(vtt[:per].T)
    u_all, s_all, v_all = np.concatenate(us, 1), np.concatenate(ss), np.concatenate(vs, 1)
    return lam * s_all.mean() * polar_ref(u_all) @ polar_ref(v_all).T


def wudi_loss(tau: np.ndarray, deltas: list[np.ndarray]) -> float:
    return sum(np.sum(((tau - d) @ d.T) ** 2) / np.sum(d ** 2) for d in deltas)


def wudi_ref(deltas: list[np.ndarray], iterations: int, lr: float) -> np.ndarray:
    """The paper's objective, its gradient task by task, and Adam (Kingma & Ba, with torch's ε placement)."""
    if deltas[0].ndim != 2:
        return np.mean(deltas, axis=0)
    tau = np.sum(deltas, axis=0)
    m, v = np.zeros_like(tau), np.zeros_like(tau)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(1, iterations + 1):
        grad = sum(2 * ((tau - d) @ d.T) @ d / np.sum(d ** 2) for d in deltas)
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad ** 2
        tau = tau - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return tau


# shapes: tall, wide, square, a 2-row tensor with K·(rank share) = 3 > 2 rows, a single row, a vector, a conv kernel
SHAPES = [(6, 5), (7, 10), (8, 8), (2, 16), (1, 9), (11,), (3, 2, 2)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 3])
def test_tsv_matches_the_paper(shape, k) -> None:
    base, experts = _inputs(k, shape)
    out = _run("tsv", base, experts, **{"lambda": 0.7})
    np.testing.assert_allclose(out.numpy() - base.numpy(), tsv_ref(_deltas(base, experts), 0.7), atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 3])
def test_iso_c_matches_the_paper(shape, k) -> None:
    base, experts = _inputs(k, shape, seed=1)
    out = _run("iso_c", base, experts, **{"lambda": 1.3})
    np.testing.assert_allclose(out.numpy() - base.numpy(), iso_c_ref(_deltas(base, experts), 1.3), atol=1e-10)


@pytest.mark.parametrize("shape,k,fraction", [((12, 9), 3, 0.5), ((9, 12), 2, 0.8), ((16, 16), 3, 0.8),
                                              ((10, 7), 1, 0.8), ((2, 16), 3, 0.8), ((5,), 3, 0.8)])
def test_iso_cts_matches_the_paper(shape, k, fraction) -> None:
    base, experts = _inputs(k, shape, seed=2)
    out = _run("iso_cts", base, experts, **{"lambda": 0.9, "common_space_fraction": fraction})
    np.testing.assert_allclose(out.numpy() - base.numpy(), iso_cts_ref(_deltas(base, experts), 0.9, fraction),
                               atol=1e-10)


def test_iso_cts_split_follows_fusionbench_sizes() -> None:
    # (r, K, f) -> (common, per task): k = ⌊r·f⌋, s = round((r − k)/K) half to even, k = r − K·s
    assert iso_cts_split((16, 40), 3, 0.8) == (13, 1)
    assert iso_cts_split((10, 10), 2, 0.5) == (6, 2)  # round(2.5) = 2
    assert iso_cts_split((4, 4), 2, 0.8) == (4, 0)  # round(0.5) = 0: Iso-C
    assert iso_cts_split((2, 16), 3, 0.8) == (2, 0)
    assert iso_cts_split((2, 16), 3, 0.1) == (2, 0)  # round(2/3)·3 = 3 > 2 directions: per-task share cut to 0
    assert iso_cts_split((7, 9), 1, 0.8) == (5, 2)


def test_k1_special_cases() -> None:
    """One expert: TSV returns its task vector, Iso-CTS equals Iso-C."""
    base, experts = _inputs(1, (9, 6), seed=3)
    np.testing.assert_allclose(_run("tsv", base, experts, **{"lambda": 0.5}).numpy(),
                               (base + 0.5 * (experts[0] - base)).numpy(), atol=1e-12)
    np.testing.assert_allclose(_run("iso_cts", base, experts).numpy(), _run("iso_c", base, experts).numpy(),
                               atol=1e-12)


@pytest.mark.parametrize("shape", [(6, 5), (5, 8), (2, 16), (7,)])
@pytest.mark.parametrize("k", [1, 3])
def test_wudi_matches_the_paper(shape, k) -> None:
    base, experts = _inputs(k, shape, seed=4)
    out = _run("wudi", base, experts, iterations=40, lr=1e-3)
    np.testing.assert_allclose(out.numpy() - base.numpy(), wudi_ref(_deltas(base, experts), 40, 1e-3), atol=1e-10)


def test_wudi_lowers_the_interference_towards_its_minimum() -> None:
    base, experts = _inputs(3, (12, 8), seed=5)
    deltas = _deltas(base, experts)
    start = wudi_loss(np.sum(deltas, axis=0), deltas)
    default = _run("wudi", base, experts).numpy() - base.numpy()  # 300 steps of 1e-5: a small move, downhill
    assert wudi_loss(default, deltas) < start
    # the quadratic's minimiser solves τ H = C (H = Σ G_t/‖Δ_t‖², C = Σ Δ_t G_t/‖Δ_t‖²); Adam gets close
    h = sum(d.T @ d / np.sum(d ** 2) for d in deltas)
    c = sum(d @ d.T @ d / np.sum(d ** 2) for d in deltas)
    best = wudi_loss(np.linalg.solve(h.T, c.T).T, deltas)
    long = _run("wudi", base, experts, iterations=3000, lr=1e-3).numpy() - base.numpy()
    assert wudi_loss(long, deltas) - best < 1e-3 * (start - best)


def test_wudi_zero_task_vector_has_no_term() -> None:
    base, experts = _inputs(2, (6, 4), seed=6)
    out = _run("wudi", base, [*experts, base.clone()], iterations=30, lr=1e-3)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.numpy() - base.numpy(), wudi_ref(_deltas(base, experts), 30, 1e-3), atol=1e-10)
    assert torch.equal(_run("wudi", base, [base.clone()], iterations=5), base)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "wudi"])
def test_exclude_sends_a_matrix_to_the_mean(method) -> None:
    base, experts = _inputs(3, (6, 5), seed=7)
    out = _run(method, base, experts, exclude=True)
    np.testing.assert_allclose(out.numpy() - base.numpy(), np.mean(_deltas(base, experts), axis=0), atol=1e-12)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "wudi"])
def test_float32_and_bfloat16_inputs_and_kernel_level_order(method) -> None:
    """fp32 arithmetic agrees with the float64 reference to fp32 precision; bf16 inputs are upcast (no half SVD);
    permuting the experts changes the kernel's fp32 result only by rounding (the engine's canonical order makes the
    model bit-identical, tested below)."""
    base64, experts64 = _inputs(4, (24, 16), seed=8)
    ref = _run(method, base64, experts64).numpy()
    base, experts = base64.float(), [e.float() for e in experts64]
    out = _run(method, base, experts)
    assert out.dtype == torch.float32
    scale = np.abs(ref - base64.numpy()).max()
    np.testing.assert_allclose(out.double().numpy(), ref, atol=5e-5 * scale)
    permuted = _run(method, base, [experts[i] for i in (2, 0, 3, 1)])
    np.testing.assert_allclose(permuted.double().numpy(), out.double().numpy(), atol=5e-5 * scale)
    half = _run(method, base.bfloat16(), [e.bfloat16() for e in experts])
    assert half.dtype == torch.float32 and torch.isfinite(half).all()


def test_engine_merges_are_bit_identical_in_any_expert_order(families) -> None:
    from mergeflow.engine import merge_state_dict
    from mergeflow.recipe import parse_recipe

    base, experts = families("llama")

    def run(method: str, order: list[int], **params) -> dict[str, torch.Tensor]:
        return merge_state_dict(parse_recipe({
            "merge_method": method, "base_model": str(base), "parameters": params,
            "models": [{"model": str(experts[i])} for i in order]}), threads=1)

    for method, params in (("tsv", {}), ("iso_cts", {"lambda": 0.5}), ("wudi", {"iterations": 20})):
        a, b = run(method, [0, 1, 2], **params), run(method, [2, 0, 1], **params)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[n], b[n]) for n in a), method
    # the embedding and head are 2-D: merged spectrally unless excluded by a filter
    plain = run("iso_c", [0, 1, 2])
    excluded = run("iso_c", [0, 1, 2], exclude=[{"filter": "embed_tokens", "value": True}, {"value": False}])
    from safetensors.torch import load_file
    b = load_file(base / "model.safetensors")
    es = [load_file(e / "model.safetensors") for e in experts]
    name = "model.embed_tokens.weight"
    mean = b[name] + sum(e[name] - b[name] for e in es) / 3
    assert torch.allclose(excluded[name], mean, atol=1e-6) and not torch.allclose(plain[name], mean, atol=1e-3)
    other = next(n for n in b if b[n].dim() == 2 and n != name)
    assert torch.equal(plain[other], excluded[other])


def test_wudi_solves_conv1d_weights_in_the_linear_orientation(families) -> None:
    """GPT-2's Conv1D stores a weight [in, out]: WUDI's objective is not symmetric in the two sides, so the kernel
    solves the transposed problem and stores the result back, giving the transpose of the nn.Linear solution; the
    engine tells the kernel which tensors are stored that way."""
    base, experts = _inputs(3, (24, 40), seed=5, dtype=torch.float32)  # [out, in]
    m = get_method("wudi")

    def kernel(b, es, conv1d, iterations=50):
        shared = {p.name: p.default for p in m.shared_params} | {"iterations": iterations, "lr": 1e-3}
        return m.kernel(KernelInput("t", b, es, {}, shared, conv1d=conv1d))

    linear = kernel(base, experts, False)
    stored = kernel(base.T.contiguous(), [e.T.contiguous() for e in experts], True)
    torch.testing.assert_close(stored, linear.T, atol=1e-6, rtol=0)
    as_if_linear = kernel(base.T.contiguous(), [e.T.contiguous() for e in experts], False)
    assert not torch.allclose(as_if_linear, linear.T, atol=1e-4)

    from mergeflow.engine import merge_state_dict
    from mergeflow.recipe import parse_recipe

    gbase, gexperts = families("gpt2")
    recipe = {"merge_method": "wudi", "base_model": str(gbase), "parameters": {"iterations": 30, "lr": 1e-3},
              "models": [{"model": str(e)} for e in gexperts]}
    merged = merge_state_dict(parse_recipe(recipe), threads=1)
    from safetensors.torch import load_file

    b = load_file(gbase / "model.safetensors")
    es = [load_file(e / "model.safetensors") for e in gexperts]
    name = next(n for n in b if n.endswith("attn.c_attn.weight"))
    want = kernel(b[name].float(), [e[name].float() for e in es], True, iterations=30)
    torch.testing.assert_close(merged[name].float(), want, atol=1e-5, rtol=0)  # the engine's order: rounding only
    as_if_linear = kernel(b[name].float(), [e[name].float() for e in es], False, iterations=30)
    assert not torch.allclose(merged[name].float(), as_if_linear, atol=1e-3)


def test_workspace_of_a_7b_embedding_is_several_times_the_tensor() -> None:
    """A 7B's 32000×4096 embedding: the SVD workspace is several times the tensor, whatever K, and it is the
    largest of the model's matrices; methods without a workspace need none and vectors never do."""
    shapes = [(32000, 4096), (4096, 4096), (11008, 4096), (4096,)]
    tensor = 32000 * 4096 * 4
    for method in ("tsv", "iso_c", "iso_cts", "wudi"):
        need = {shape: get_method(method).workspace_elements(shape, 4) * 4 for shape in shapes}
        assert max(need, key=need.get) == (32000, 4096)
        assert 2 * tensor < need[32000, 4096] < 8 * tensor, (method, need)
        assert need[(4096,)] == 0
    assert all(get_method("ties").workspace_elements(shape, 4) == 0 for shape in shapes)


def test_check_prints_the_svd_workspace(families, tmp_path) -> None:
    from click.testing import CliRunner

    from mergeflow.cli import main

    base, experts = families("llama")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: tsv\nbase_model: {base}\nmodels:\n" + "".join(f"  - model: {e}\n" for e in experts))
    done = CliRunner().invoke(main, ["check", str(recipe)])
    assert done.exit_code == 0, done.output
    assert "of which SVD/optimizer workspace ≈" in done.output and "compatible" in done.output
    as_json = CliRunner().invoke(main, ["check", str(recipe), "--json"])
    est = json.loads(as_json.output)["estimate"]
    assert 0 < est["workspace_bytes"] < est["peak_bytes"]
    assert est["workspace_rows"] * est["workspace_cols"] == est["largest_tensor_numel"]
    recipe.write_text(recipe.read_text().replace("tsv", "task_arithmetic"))
    assert "workspace" not in CliRunner().invoke(main, ["check", str(recipe)]).output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "wudi"])
def test_cuda_agrees_with_cpu(method) -> None:
    """``--device cuda``: cuSOLVER's SVDs and the GPU Adam steps give the CPU result to fp32 rounding."""
    base, experts = _inputs(3, (64, 48), seed=9, dtype=torch.float32)
    cpu = _run(method, base, experts)
    gpu = _run(method, base.cuda(), [e.cuda() for e in experts])
    assert gpu.is_cuda
    scale = (cpu - base).abs().max()
    torch.testing.assert_close(gpu.cpu(), cpu, atol=float(5e-5 * scale), rtol=0)


CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # GPT-2, stored [in, out]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_family_merges_with_every_spectral_method(families, tmp_path, family: str) -> None:
    """Issue 12's "works on every family": ``mergeflow merge`` with each method on each family the engine supports
    (fused attention, Conv1D, tied heads, routed experts stored per expert), every tensor of the output equal to the
    float64 reference of the method's paper applied to that tensor, and the output a model transformers loads and
    runs. Two experts: K = 2 shares each tensor's rank between them (odd ranks leave one direction out in TSV)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tests.cli_helpers import cli

    base, experts = families(family)
    experts = experts[:2]

    def tensors(folder) -> dict[str, torch.Tensor]:
        return {n: t for f in sorted(folder.glob("*.safetensors")) for n, t in load_file(f).items()}

    b, es = tensors(base), [tensors(e) for e in experts]
    refs = {"tsv": lambda d, n: tsv_ref(d, 1.0), "iso_c": lambda d, n: iso_c_ref(d, 1.0),
            "iso_cts": lambda d, n: iso_cts_ref(d, 1.0, 0.8),
            "wudi": lambda d, n: (wudi_ref([x.T for x in d], 300, 1e-5).T if n.endswith(CONV1D) and family == "gpt2"
                                  else wudi_ref(d, 300, 1e-5))}
    for method, ref in refs.items():
        recipe = tmp_path / f"{method}.json"
        recipe.write_text(json.dumps({"merge_method": method, "base_model": str(base),
                                      "models": [{"model": str(e)} for e in experts]}))
        out = tmp_path / method
        result = cli("merge", str(recipe), str(out), "--no-progress")
        assert result.exit_code == 0, (method, result.output, result.stderr, result.exception)
        merged = tensors(out)
        assert {n: t.shape for n, t in merged.items()} == {n: t.shape for n, t in b.items()}, method
        for name, tensor in merged.items():
            deltas = [e[name].double().numpy() - b[name].double().numpy() for e in es]
            update = ref(deltas, name)
            want = torch.from_numpy(b[name].double().numpy() + update)
            # fp32 arithmetic and LAPACK against float64: Iso-CTS's subspace split is the most sensitive (see
            # mergeflow.methods.spectral); a wrong treatment of a tensor is off by the update's own size
            scale = max(float(np.abs(update).max()), 1e-6)
            torch.testing.assert_close(tensor.double(), want, rtol=0, atol=2e-4 * scale,
                                       msg=lambda m, n=name, k=method: f"{k} {n}: {m}")
        model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[5, 17, 33, 8]])).logits
        assert torch.isfinite(logits).all(), method
