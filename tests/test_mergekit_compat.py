"""Golden values from the mergekit package itself (the ``mergekit==0.1.5`` test dependency).

Whole merges: for every deterministic mergekit method, mergekit's ``run_merge`` writes a model from a config and our
``merge_state_dict`` merges the same config with ``mergekit_compat: true``; every tensor both have must match
(``torch.equal`` where we replicate mergekit's operations in the same dtype and order, a tight ``allclose`` where the
arithmetic is done at another precision). The configs use unequal and negative weights, ``normalize``, ``lambda``,
tensor-name filters and layer gradients, so parameter resolution (mergekit's ``t``) is checked too.

Random methods: mergekit draws from the global torch RNG, we from one generator per (tensor, expert), so whole
models cannot match. At kernel level they must: a generator seeded like the global RNG produces the same stream, and
handing the *same* generator to every expert replays mergekit's expert-by-expert consumption. Whole random merges are
checked statistically (kept fraction ≈ density, L1 rescale preserves ‖Δ‖₁).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("mergekit")

from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods import merge_tensors
from mergekit.options import MergeOptions as MergekitOptions
from mergekit.sparsify import RescaleNorm, bernoulli, della_magprune, magnitude, magnitude_outliers
from transformers import LlamaConfig, LlamaForCausalLM

from mergeflow.engine import merge_state_dict
from mergeflow.methods.base import KernelInput
from mergeflow.methods.task_arithmetic import Composition, _sparsify_compat, compat_kernel
from mergeflow.recipe import parse_recipe

try:  # run as `python -m pytest` from the repository root, or with tests/ on sys.path
    from tests.tiny_models import FAMILIES, VOCAB, make_expert, make_family, make_tokenizer
except ImportError:  # pragma: no cover
    from tiny_models import FAMILIES, VOCAB, make_expert, make_family, make_tokenizer  # type: ignore[no-redef]

Family = tuple[str, list[str]]  # (base folder, expert folders)

# the sparsify / consensus / defaults of mergekit's generalized task arithmetic methods (generalized_task_arithmetic.py)
COMPOSITIONS = {
    "task_arithmetic": Composition(None, None, False, False, "none", False),
    "ties": Composition("magnitude", "sum", True, True, "none", False),
    "dare_linear": Composition("bernoulli", None, False, False, "inverse", True),
    "dare_ties": Composition("bernoulli", "sum", True, False, "inverse", True),
    "breadcrumbs": Composition("outliers", None, False, False, "none", False),
    "breadcrumbs_ties": Composition("outliers", "sum", False, False, "none", False),
    "della": Composition("della", "sum", True, True, "inverse", True),
    "della_linear": Composition("della", None, False, False, "inverse", True),
}


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: tiny real families, built once per module
# ---------------------------------------------------------------------------------------------------------------


class Zoo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[tuple[str, str], Family] = {}

    def get(self, family: str, dtype: torch.dtype = torch.float32) -> Family:
        key = (family, str(dtype).removeprefix("torch."))
        if key not in self._built:
            base, experts = make_family(family, self.root / "_".join(key), n_experts=3, dtype=dtype)
            self._built[key] = (str(base), [str(e) for e in experts])
        return self._built[key]

    def same_as_base(self, family: str, copy: int = 0) -> str:
        """An 'expert' whose weights equal the base's (a zero task vector); ``copy`` picks another folder, since
        mergekit refuses the same model twice."""
        base, _ = self.get(family)
        path = Path(base).parent / f"same_as_base{copy}"
        if not path.exists():
            shutil.copytree(base, path)
        return str(path)

    def deep_llama(self) -> Family:
        """A 5-block llama, so that layer gradients are interpolated at t = 0, 1/4, 1/2, 3/4, 1."""
        key = ("deep_llama", "float32")
        if key not in self._built:
            root = self.root / "deep_llama"
            config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=5,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
            torch.manual_seed(1)
            base = root / "base"
            LlamaForCausalLM(config).save_pretrained(base)
            make_tokenizer().save_pretrained(base)
            experts = [make_expert(base, root / f"expert{i}", seed=200 + i) for i in range(2)]
            self._built[key] = (str(base), [str(e) for e in experts])
        return self._built[key]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("mergekit_compat"))


# ---------------------------------------------------------------------------------------------------------------
# Running both sides
# ---------------------------------------------------------------------------------------------------------------


def run_mergekit(config: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    if out.exists():
        shutil.rmtree(out)
    options = MergekitOptions(write_model_card=False, copy_tokenizer=False, random_seed=0, quiet=True,
                              device="cpu")
    run_merge(MergeConfiguration.model_validate(config), str(out), options)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        state.update(load_file(shard))
    assert state, f"mergekit wrote no tensors to {out}"
    return state


def run_ours(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    return merge_state_dict(parse_recipe({**config, "mergekit_compat": True}))


def ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of representable numbers at |t| in t's own floating dtype (bf16: 8 significant bits)."""
    mantissa = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24, torch.float64: 53}[t.dtype]
    a = t.double().abs().clamp_min(torch.finfo(t.dtype).tiny)
    return torch.pow(2.0, torch.floor(torch.log2(a)) - (mantissa - 1))


def compare(config: dict[str, Any], out: Path, *, exact: bool, atol: float = 0.0, rtol: float = 0.0,
            max_ulps: float | None = None) -> float:
    """Merge with both; every tensor mergekit wrote must be ours too (same dtype, shape, values). Max |diff|.

    ``exact``: bit-identical; else within ``max_ulps`` units in the last place of the larger value, or allclose.
    """
    theirs = run_mergekit(config, out)
    ours = run_ours(config)
    # tied models: mergekit may or may not write the tied head; compare the tensors both have, and insist that
    # anything only mergekit has is a tied duplicate
    only_theirs = set(theirs) - set(ours)
    assert all("lm_head" in n for n in only_theirs), f"tensors mergekit writes that we do not: {sorted(only_theirs)}"
    common = sorted(set(theirs) & set(ours))
    assert len(common) >= 10, common
    worst = 0.0
    for name in common:
        a, b = theirs[name], ours[name]
        assert a.dtype == b.dtype, f"{name}: mergekit {a.dtype}, ours {b.dtype}"
        assert a.shape == b.shape, f"{name}: mergekit {tuple(a.shape)}, ours {tuple(b.shape)}"
        diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        worst = max(worst, diff)
        if exact:
            assert torch.equal(a, b), f"{name}: not bit-identical to mergekit (max |diff| {diff:.3g})"
        elif max_ulps is not None:
            ulps = float(((a.double() - b.double()).abs() / torch.maximum(ulp(a), ulp(b))).max())
            assert ulps <= max_ulps, f"{name}: {ulps:.1f} ulps apart (max |diff| {diff:.3g}), allowed {max_ulps}"
        else:
            assert torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol), \
                f"{name}: max |diff| {diff:.3g} exceeds atol={atol:g}, rtol={rtol:g}"
    return worst


def _models(paths: list[str], params: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    params = params or [{} for _ in paths]
    return [{"model": p, **({"parameters": q} if q else {})} for p, q in zip(paths, params)]


# ---------------------------------------------------------------------------------------------------------------
# Deterministic methods, whole models, four families
# ---------------------------------------------------------------------------------------------------------------

Case = Callable[[str, list[str]], dict[str, Any]]

# generalized task arithmetic: replicated operation by operation → bit-identical
GTA_CASES: dict[str, Case] = {
    "task_arithmetic_negative_weight_lambda": lambda b, e: {
        "merge_method": "task_arithmetic", "base_model": b,
        "models": _models(e, [{"weight": 0.7}, {"weight": -0.3}, {"weight": 0.5}]),
        "parameters": {"lambda": 0.8}},
    "task_arithmetic_normalize": lambda b, e: {
        "merge_method": "task_arithmetic", "base_model": b,
        "models": _models(e, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.9}]),
        "parameters": {"normalize": True}},
    "ties_density_0.5": lambda b, e: {
        "merge_method": "ties", "base_model": b,
        "models": _models([b, *e], [{}, {"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.5},
                                    {"weight": 0.8, "density": 0.5}])},
    "ties_default_density": lambda b, e: {
        "merge_method": "ties", "base_model": b,
        "models": _models(e[:2], [{"weight": 1.0}, {"weight": 0.5}])},
    "ties_filters_gradient": lambda b, e: {
        "merge_method": "ties", "base_model": b,
        "models": _models(e, [{"weight": [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}],
                               "density": [0.3, 0.9]},
                              {"weight": 0.5, "density": [{"filter": "mlp", "value": 0.2}, {"value": [0.9, 0.4]}]},
                              {"weight": [0.2, 1.0]}]),
        "parameters": {"normalize": False, "lambda": 1.3, "density": 0.6}},
    "ties_int8_mask": lambda b, e: {
        "merge_method": "ties", "base_model": b,
        "models": _models(e, [{"weight": 0.6}, {"weight": 0.4}, {"weight": 0.3}]),
        "parameters": {"density": 0.4, "int8_mask": True}},
    "breadcrumbs": lambda b, e: {
        "merge_method": "breadcrumbs", "base_model": b,
        "models": _models(e, [{"weight": 0.6}, {"weight": 0.4}, {"weight": 0.7}]),
        "parameters": {"density": 0.8, "gamma": 0.05}},
    "breadcrumbs_ties": lambda b, e: {
        "merge_method": "breadcrumbs_ties", "base_model": b,
        "models": _models(e, [{"weight": 0.6, "gamma": 0.02}, {"weight": 0.4, "density": 0.5}, {"weight": 0.7}]),
        "parameters": {"density": 0.7, "gamma": 0.01, "normalize": True, "lambda": 0.9}},
    "dare_linear_density_1": lambda b, e: {  # density 1 draws nothing: deterministic, equals task arithmetic
        "merge_method": "dare_linear", "base_model": b,
        "models": _models(e, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}]),
        "parameters": {"density": 1.0}},
}

# the rest: same formulas, another precision or op order in places → allclose
OTHER_CASES: dict[str, Case] = {
    "linear_normalize": lambda b, e: {
        "merge_method": "linear", "models": _models(e, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}])},
    "linear_no_normalize": lambda b, e: {
        "merge_method": "linear", "models": _models(e, [{"weight": 0.6}, {"weight": 0.2}, {"weight": 0.4}]),
        "parameters": {"normalize": False}},
    "model_stock": lambda b, e: {"merge_method": "model_stock", "base_model": b, "models": _models(e)},
    "slerp_0.3": lambda b, e: {
        "merge_method": "slerp", "base_model": b, "models": _models([b, e[0]]), "parameters": {"t": 0.3}},
    "slerp_gradient": lambda b, e: {
        "merge_method": "slerp", "base_model": b, "models": _models([b, e[1]]), "parameters": {"t": [0, 0.5, 1]}},
    "slerp_filters": lambda b, e: {  # mergekit README's example
        "merge_method": "slerp", "base_model": b, "models": _models([b, e[1]]),
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}},
    "nuslerp_base": lambda b, e: {
        "merge_method": "nuslerp", "base_model": b, "models": _models(e[:2], [{"weight": 0.3}, {"weight": 0.7}])},
    "nuslerp_no_base": lambda b, e: {
        "merge_method": "nuslerp", "models": _models(e[1:], [{"weight": 0.4}, {"weight": 0.6}])},
    "nuslerp_row_wise": lambda b, e: {
        "merge_method": "nuslerp", "base_model": b, "models": _models(e[:2], [{"weight": 1.0}, {"weight": 2.0}]),
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
}

# fp32: slerp is computed in float64 by us and in float32 by mergekit 0.1.5, linear accumulates with add(mul) instead
# of addcmul_: observed max |diff| 1.2e-7 (one fp32 ulp at 1.0) for both; model_stock and nuslerp are bit-identical
FP32_TOL = {"atol": 5e-7, "rtol": 1e-6}

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", sorted(GTA_CASES))
def test_task_arithmetic_family_bit_identical(zoo: Zoo, tmp_path: Path, family: str, case: str) -> None:
    base, experts = zoo.get(family)
    compare(GTA_CASES[case](base, experts), tmp_path / "mk", exact=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", sorted(OTHER_CASES))
def test_other_methods_match(zoo: Zoo, tmp_path: Path, family: str, case: str) -> None:
    base, experts = zoo.get(family)
    compare(OTHER_CASES[case](base, experts), tmp_path / "mk", exact=False, **FP32_TOL)


# --- bf16 checkpoints: mergekit computes the GTA family in the checkpoint dtype; so must we ---

@pytest.mark.parametrize("case", sorted(GTA_CASES))
def test_bf16_task_arithmetic_family_bit_identical(zoo: Zoo, tmp_path: Path, case: str) -> None:
    base, experts = zoo.get("llama", torch.bfloat16)
    compare(GTA_CASES[case](base, experts), tmp_path / "mk", exact=True)


@pytest.mark.parametrize("case", sorted(c for c in OTHER_CASES if not c.startswith("linear")))
def test_bf16_other_methods_bit_identical(zoo: Zoo, tmp_path: Path, case: str) -> None:
    """slerp (fp32/fp64 inside, one rounding), model_stock and nuslerp (bf16 ops in mergekit's order)."""
    base, experts = zoo.get("llama", torch.bfloat16)
    compare(OTHER_CASES[case](base, experts), tmp_path / "mk", exact=True)


@pytest.mark.parametrize("case", sorted(c for c in OTHER_CASES if c.startswith("linear")))
def test_bf16_linear_bit_identical(zoo: Zoo, tmp_path: Path, case: str) -> None:
    base, experts = zoo.get("llama", torch.bfloat16)
    compare(OTHER_CASES[case](base, experts), tmp_path / "mk", exact=True)


@pytest.mark.parametrize(("family_dtype", "dtype", "out_dtype"), [
    (torch.bfloat16, "float32", "bfloat16"),  # bf16 checkpoints merged in fp32, written as bf16
    (torch.float32, "bfloat16", None),  # fp32 checkpoints merged (and written) in bf16
    (torch.float32, "float32", "float16"),
])
@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "breadcrumbs_ties"])
def test_dtype_and_out_dtype(zoo: Zoo, tmp_path: Path, family_dtype: torch.dtype, dtype: str,
                             out_dtype: str | None, method: str) -> None:
    base, experts = zoo.get("llama", family_dtype)
    config = {"merge_method": method, "base_model": base, "dtype": dtype,
              "models": _models(experts, [{"weight": 0.6}, {"weight": -0.2}, {"weight": 0.5}]),
              "parameters": {"lambda": 1.1} | ({} if method == "task_arithmetic" else {"density": 0.6})}
    if out_dtype:
        config["out_dtype"] = out_dtype
    compare(config, tmp_path / "mk", exact=True)


# --- layer gradients interpolated at t = 0, 1/4, 1/2, 3/4, 1 (5 blocks) ---

GRADIENT_CASES: dict[str, tuple[Case, bool]] = {
    "ties_density_weight_gradients": (lambda b, e: {
        "merge_method": "ties", "base_model": b,
        "models": _models(e, [{"weight": [0.2, 0.9, 0.4], "density": [0.3, 0.9]},
                              {"weight": [{"filter": "self_attn", "value": [1.0, 0.1]}, {"value": 0.7}],
                               "density": [{"filter": "mlp", "value": [0.9, 0.25, 0.6]}, {"value": 0.5}]}]),
        "parameters": {"lambda": [0.5, 1.5]}}, True),
    "breadcrumbs_gamma_gradient": (lambda b, e: {
        "merge_method": "breadcrumbs", "base_model": b,
        "models": _models(e, [{"weight": 0.6, "gamma": [0.0, 0.1]}, {"weight": 0.4}]),
        "parameters": {"density": [0.9, 0.5, 0.7], "gamma": 0.02}}, True),
    "task_arithmetic_shared_weight_gradient": (lambda b, e: {
        "merge_method": "task_arithmetic", "base_model": b, "models": _models(e),
        "parameters": {"weight": [0.1, 0.3, 0.2, 0.9], "normalize": [True, False]}}, True),
    "slerp_readme_filters": (lambda b, e: {
        "merge_method": "slerp", "base_model": b, "models": _models([b, e[0]]),
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}}, False),
    "linear_weight_gradient": (lambda b, e: {
        "merge_method": "linear",
        "models": _models(e, [{"weight": [1.0, 0.0, 0.5]}, {"weight": [0.2, 0.8]}])}, False),
}


@pytest.mark.parametrize("case", sorted(GRADIENT_CASES))
def test_layer_gradients_and_filters_resolve_like_mergekit(zoo: Zoo, tmp_path: Path, case: str) -> None:
    base, experts = zoo.deep_llama()
    make, exact = GRADIENT_CASES[case]
    compare(make(base, experts), tmp_path / "mk", exact=exact, **({} if exact else FP32_TOL))


# ---------------------------------------------------------------------------------------------------------------
# Edge cases (docs/methods.md §6.6)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties", "task_arithmetic", "dare_ties",
                                    "dare_linear", "della"])
def test_all_zero_task_vectors(zoo: Zoo, tmp_path: Path, method: str) -> None:
    """Every expert equals the base: every Δ = 0, the L1 rescale guard (norm < 1e-7) must hold, output = base.

    The random methods draw their masks but the result does not depend on them, so whole models compare exactly.
    """
    same = [zoo.same_as_base("llama", 0), zoo.same_as_base("llama", 1)]
    base, _ = zoo.get("llama")
    params: dict[str, Any] = {} if method == "task_arithmetic" else {"density": 0.5}
    if method.startswith("della"):
        params["epsilon"] = 0.1
    config = {"merge_method": method, "base_model": base,
              "models": _models(same, [{"weight": 0.7}, {"weight": 0.4}]), "parameters": params}
    compare(config, tmp_path / "mk", exact=True)
    ours = run_ours(config)
    expected = load_file(Path(base) / "model.safetensors")
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name


@pytest.mark.parametrize("method", ["ties", "model_stock", "nuslerp", "slerp"])
def test_one_expert_equal_to_base(zoo: Zoo, tmp_path: Path, method: str) -> None:
    same = zoo.same_as_base("llama")
    base, experts = zoo.get("llama")
    config: dict[str, Any] = {"merge_method": method, "base_model": base}
    if method == "slerp":
        config |= {"models": _models([base, same]), "parameters": {"t": 0.4}}
    elif method == "model_stock":
        config |= {"models": _models([same, *experts[:2]])}
    else:
        config |= {"models": _models([same, experts[0]], [{"weight": 0.6}, {"weight": 0.4}]),
                   "parameters": {"density": 0.5} if method == "ties" else {}}
    compare(config, tmp_path / "mk", exact=method == "ties", **({} if method == "ties" else FP32_TOL))


def test_density_1_is_identity() -> None:
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(16, 8, generator=g)
    for name, comp in COMPOSITIONS.items():
        if comp.sparsify is None:
            continue
        x = KernelInput("t", None, [delta], {"density": [1.0], "weight": [1.0], "gamma": [0.01], "epsilon": [0.15]},
                        {}, generators=[torch.Generator().manual_seed(1)], compat=True)
        for rescale in (False, True):
            assert torch.equal(_sparsify_compat(delta, x, 0, comp, rescale), delta), (name, rescale)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs_ties"])
def test_weights_summing_to_zero_with_normalize_kernel(method: str) -> None:
    """mergekit guards a zero divisor (|Σw| < 1e-8, or an agreeing weight sum == 0) by dividing by 1."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(12, 10, generator=g)
    models = [base + 0.05 * torch.randn(12, 10, generator=g) for _ in range(2)]
    params = {"weight": [0.5, -0.5], "density": [0.7, 0.7], "gamma": [0.01, 0.01]}
    shared = {"normalize": True}
    theirs = merge_tensors([base, *models], method, base_index=0, ids=["base", "a", "b"],
                           parameters={"normalize": True, "weight": {"a": 0.5, "b": -0.5},
                                       **({"density": {"a": 0.7, "b": 0.7}} if method != "task_arithmetic" else {})})
    ours = compat_kernel(KernelInput("t", base, models, params, shared, compat=True), COMPOSITIONS[method])
    assert torch.equal(ours, theirs)
    assert torch.isfinite(ours).all()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs_ties"])
def test_weights_summing_to_zero_with_normalize_whole_model(zoo: Zoo, tmp_path: Path, method: str) -> None:
    """A config mergekit merges (its divisor guard) must load and merge identically in mergekit_compat mode."""
    base, experts = zoo.get("llama")
    config = {"merge_method": method, "base_model": base,
              "models": _models(experts[:2], [{"weight": 0.5}, {"weight": -0.5}]),
              "parameters": {"normalize": True} | ({} if method == "task_arithmetic" else {"density": 0.5})}
    compare(config, tmp_path / "mk", exact=True)


@pytest.mark.parametrize("numel", [1, 3, 7, 10, 33])
@pytest.mark.parametrize("density", [0.01, 0.05, 0.3])
def test_tiny_tensors_small_density(numel: int, density: float) -> None:
    """mergekit 0.1.5 keeps k = max(1, int(d·n)) by magnitude; Breadcrumbs keeps indices[n_bot : n_bot + target]."""
    g = torch.Generator().manual_seed(numel)
    delta = torch.randn(numel, generator=g)
    x = KernelInput("t", None, [delta], {"density": [density], "weight": [1.0], "gamma": [0.01]}, {}, compat=True)
    for rescale in (False, True):
        norm = RescaleNorm.l1 if rescale else None
        ours = _sparsify_compat(delta, x, 0, COMPOSITIONS["ties"], rescale)
        theirs = magnitude(delta, density, norm)
        assert torch.equal(ours, theirs), (numel, density, rescale)
        assert int((ours != 0).sum()) == max(1, int(density * numel))
        ours = _sparsify_compat(delta, x, 0, COMPOSITIONS["breadcrumbs"], rescale)
        assert torch.equal(ours, magnitude_outliers(delta, density, norm, gamma=0.01)), (numel, density, rescale)


@pytest.mark.parametrize("gamma", [0.0, 0.01, 0.2])
@pytest.mark.parametrize("shape", [(32,), (24, 16)])
def test_breadcrumbs_outliers_match(gamma: float, shape: tuple[int, ...]) -> None:
    """0.1.5 keeps the slice [n_bot : n_bot + target] (no empty [n_bot:-0] slice when gamma·n < 1)."""
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    for density in (0.1, 0.5, 0.9, 0.99):
        x = KernelInput("t", None, [delta], {"density": [density], "weight": [1.0], "gamma": [gamma]}, {},
                        compat=True)
        ours = _sparsify_compat(delta, x, 0, COMPOSITIONS["breadcrumbs"], False)
        assert torch.equal(ours, magnitude_outliers(delta, density, None, gamma=gamma)), (density, gamma)
        assert int((ours != 0).sum()) == int(density * delta.numel())


def test_tiny_density_whole_model(zoo: Zoo, tmp_path: Path) -> None:
    """density 0.01 on 32-element norm vectors: int(0.32) = 0 → mergekit keeps one entry, not zero."""
    base, experts = zoo.get("llama")
    config = {"merge_method": "ties", "base_model": base,
              "models": _models(experts, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}]),
              "parameters": {"density": 0.01}}
    compare(config, tmp_path / "mk", exact=True)


# ---------------------------------------------------------------------------------------------------------------
# Random methods: kernel level, same RNG stream
# ---------------------------------------------------------------------------------------------------------------


def test_generator_and_global_rng_draw_the_same_stream() -> None:
    """The premise of the kernel-level comparisons: torch.bernoulli with a generator seeded s == global RNG after
    torch.manual_seed(s), on CPU, for the dtypes mergekit works in."""
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        probs = torch.rand(37, 11, generator=torch.Generator().manual_seed(1)).to(dtype)
        torch.manual_seed(1234)
        a = torch.bernoulli(probs)
        b = torch.bernoulli(probs, generator=torch.Generator().manual_seed(1234))
        assert torch.equal(a, b), dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("seed", [0, 17])
def test_bernoulli_sparsifier_matches(dtype: torch.dtype, rescale: bool, seed: int) -> None:
    delta = (0.02 * torch.randn(48, 40, generator=torch.Generator().manual_seed(seed))).to(dtype)
    for density in (0.1, 0.5, 0.9):
        torch.manual_seed(seed)
        theirs = bernoulli(delta, density, RescaleNorm.l1 if rescale else None)
        after_theirs = torch.rand(4)  # the global stream must be left where mergekit leaves it
        gen = torch.Generator().manual_seed(seed)
        x = KernelInput("t", None, [delta], {"density": [density], "weight": [1.0]}, {}, generators=[gen],
                        compat=True)
        ours = _sparsify_compat(delta, x, 0, COMPOSITIONS["dare_ties"], rescale)
        assert ours.dtype == theirs.dtype == dtype
        assert torch.equal(ours, theirs), (density, dtype, rescale)
        assert torch.equal(torch.rand(4, generator=gen), after_theirs), "different number of draws"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(40,), (24, 30), (8, 4, 5)])
@pytest.mark.parametrize("rescale", [False, True])
def test_della_magprune_matches(dtype: torch.dtype, shape: tuple[int, ...], rescale: bool) -> None:
    delta = (0.02 * torch.randn(shape, generator=torch.Generator().manual_seed(5))).to(dtype)
    for density, eps in ((0.5, 0.2), (0.3, 0.1), (0.8, 0.15)):
        torch.manual_seed(99)
        theirs = della_magprune(delta, density, eps, RescaleNorm.l1 if rescale else None)
        after_theirs = torch.rand(4)
        gen = torch.Generator().manual_seed(99)
        x = KernelInput("t", None, [delta], {"density": [density], "weight": [1.0], "epsilon": [eps]}, {},
                        generators=[gen], compat=True)
        ours = _sparsify_compat(delta, x, 0, COMPOSITIONS["della"], rescale)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        assert torch.equal(ours, theirs), (density, eps)
        assert torch.equal(torch.rand(4, generator=gen), after_theirs), "different number of draws"


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_kernels_match_with_a_shared_stream(method: str, dtype: torch.dtype) -> None:
    """One generator handed to every expert replays mergekit's global-RNG order (expert by expert, config order)."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(24, 20, generator=g).to(dtype)
    models = [(base.float() + 0.02 * torch.randn(24, 20, generator=g)).to(dtype) for _ in range(3)]
    weights, densities, eps = [0.6, -0.3, 0.5], [0.4, 0.7, 0.5], [0.1, 0.2, 0.15]
    ids = ["base", "a", "b", "c"]
    params: dict[str, Any] = {"weight": dict(zip(ids[1:], weights)), "density": dict(zip(ids[1:], densities)),
                              "lambda": 1.2}
    if method.startswith("della"):
        params["epsilon"] = dict(zip(ids[1:], eps))
    for normalize in (None, True, False):
        if normalize is not None:
            params["normalize"] = normalize
        torch.manual_seed(2024)
        theirs = merge_tensors([base, *models], method, base_index=0, ids=ids, parameters=params)
        gen = torch.Generator().manual_seed(2024)
        shared = {"lambda": 1.2} | ({} if normalize is None else {"normalize": normalize})
        x = KernelInput("t", base, models, {"weight": weights, "density": densities, "epsilon": eps}, shared,
                        generators=[gen, gen, gen], compat=True)
        ours = compat_kernel(x, COMPOSITIONS[method])
        assert ours.dtype == theirs.dtype
        assert torch.equal(ours, theirs), (method, normalize)


# ---------------------------------------------------------------------------------------------------------------
# Random methods: whole merges, statistics
# ---------------------------------------------------------------------------------------------------------------


def _delta_stats(zoo: Zoo, method: str, density: float, **params: Any) -> list[tuple[str, int, float, float, float]]:
    """(name, numel, kept fraction, ‖merged − base‖₁, ‖Δ‖₁) per tensor, one expert of weight 1."""
    base, experts = zoo.get("llama")
    recipe = parse_recipe({"merge_method": method, "base_model": base, "mergekit_compat": True, "seed": 3,
                           "models": [{"model": experts[0], "parameters": {"weight": 1.0}}],
                           "parameters": {"density": density, **params}})
    merged = merge_state_dict(recipe)
    b = load_file(Path(base) / "model.safetensors")
    e = load_file(Path(experts[0]) / "model.safetensors")
    out = []
    for name, tensor in merged.items():
        delta = e[name].double() - b[name].double()
        got = tensor.double() - b[name].double()
        out.append((name, tensor.numel(), float((got != 0).double().mean()), float(got.abs().sum()),
                    float(delta.abs().sum())))
    return out


@pytest.mark.parametrize(("method", "density", "params"), [
    ("dare_linear", 0.3, {}),
    ("dare_linear", 0.8, {}),
    ("dare_ties", 0.5, {}),
    ("della_linear", 0.4, {"epsilon": 0.2}),
    ("della", 0.6, {"epsilon": 0.1}),
])
def test_random_merges_keep_density_and_l1(zoo: Zoo, method: str, density: float, params: dict[str, Any]) -> None:
    stats = _delta_stats(zoo, method, density, **params)
    total = sum(n for _, n, *_ in stats)
    kept = sum(n * f for _, n, f, *_ in stats) / total
    assert abs(kept - density) < 0.01, kept  # ~30k entries: 4σ ≈ 0.01
    for name, n, frac, l1_merged, l1_delta in stats:
        if n >= 1024:
            assert abs(frac - density) < 0.07, (name, frac)
        # L1 rescale (mergekit >= 0.1): ‖mask·Δ‖₁ scaled back to ‖Δ‖₁ (up to the rounding of base + Δ in fp32)
        assert l1_merged == pytest.approx(l1_delta, rel=2e-4), name


def test_random_merges_are_seeded_and_vary_with_the_seed(zoo: Zoo) -> None:
    base, experts = zoo.get("llama")
    config = {"merge_method": "dare_ties", "base_model": base, "mergekit_compat": True,
              "models": _models(experts, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}]),
              "parameters": {"density": 0.5}}
    a = merge_state_dict(parse_recipe({**config, "seed": 1}))
    b = merge_state_dict(parse_recipe({**config, "seed": 1}))
    c = merge_state_dict(parse_recipe({**config, "seed": 2}))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
