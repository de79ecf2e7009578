"""Sens-Merging against independent computations on tiny Llama models (docs/methods.md §3, D-2, D-7, D-13–D-16, D-29)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeflow.cache import Cache
from mergeflow.checkpoints import resolve
from mergeflow.engine import merge_state_dict
from mergeflow.importance import sens
from mergeflow.importance.base import ModelRef, compute_coefficients
from mergeflow.importance.data import load_task_data
from mergeflow.recipe import parse_recipe
from tests.tiny_models import write_jsonl

# Three tasks in the words of the tiny tokenizer's corpus; different prompt/answer lengths exercise padding.
TASKS = {
    "fox": [("the quick brown fox", "jumps over the lazy dog"), ("the lazy dog", "jumps over"),
            ("over the lazy", "dog")],
    "sum": [("nine plus three", "mod ten equals two"), ("three plus nine mod ten", "equals two")],
    "soup": [("alice went to the kitchen", "and cooked the soup"), ("alice cooked", "the soup"),
             ("the soup", "alice cooked the soup in the kitchen")],
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(families, tmp_path_factory):
    base, experts = families("llama")
    folder = tmp_path_factory.mktemp("sens_tasks")
    files = []
    for name, rows in TASKS.items():
        path = write_jsonl(folder / f"{name}.jsonl", rows)
        files.append(path)
    return base, experts, files, folder / "cache"


def _ref(path) -> ModelRef:
    return ModelRef(str(path), path, resolve(str(path)).content_hash)


def _sens(setup, cache=None, **params):
    base, experts, files, shared = setup
    tasks = [load_task_data(str(f), "calib", len(TASKS[f.stem])) for f in files]
    return compute_coefficients("sens", base=_ref(base), experts=[_ref(e) for e in experts], tasks=tasks,
                                params=params, cache=Cache(cache or shared))


# ------------------------------------------------------------------------------------- independent references


def _group(name: str) -> str:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m:
        return f"layer.{m.group(1)}"
    return "embed" if "embed_tokens" in name else "head"   # final norm + lm_head


def _tokens(tok, prompt, answer):
    whole = tok(prompt + " " + answer, add_special_tokens=False)["input_ids"]
    start = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert whole[:start] == tok(prompt, add_special_tokens=False)["input_ids"]
    return torch.tensor([whole]), start


def _tokenizer(base):
    # The run tokenises with the base's tokenizer (the tiny test models each train their own BPE, ids differ).
    return AutoTokenizer.from_pretrained(str(base))


def _reference_sensitivity(tok, expert, rows, base=None) -> dict[str, float]:
    """One backward pass per example, |θ ⊙ ∇L| (or |Δ ⊙ ∇L|) summed per layer group, summed over examples."""
    model = AutoModelForCausalLM.from_pretrained(str(expert), dtype=torch.float32).eval()
    base_w = load_file(str(base / "model.safetensors")) if base is not None else None
    out: dict[str, float] = {}
    for prompt, answer in rows:
        ids, start = _tokens(tok, prompt, answer)
        model.zero_grad()
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        targets = ids[0, 1:]
        loss = -logp[start - 1:].gather(-1, targets[start - 1:, None]).mean()
        loss.backward()
        for name, p in model.named_parameters():
            w = p.detach() - base_w[name] if base_w is not None else p.detach()
            out[_group(name)] = out.get(_group(name), 0.0) + float((w * p.grad).abs().sum())
    return out


def _reference_distances(tok, experts, files) -> torch.Tensor:
    models = [AutoModelForCausalLM.from_pretrained(str(e), dtype=torch.float32).eval() for e in experts]
    g = torch.zeros(3, 3, dtype=torch.float64)
    with torch.no_grad():
        for j, f in enumerate(files):
            rows = TASKS[f.stem]
            for i in range(3):
                if i == j:
                    continue
                total = 0.0
                for prompt, answer in rows:
                    ids, _ = _tokens(tok, prompt, answer)
                    diff = models[i](input_ids=ids).logits[0].double() - models[j](input_ids=ids).logits[0].double()
                    total += float(diff.norm(dim=-1).mean())
                g[i, j] = total / len(rows)
    return g


# ----------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("batch_size", [3, 1])
def test_sensitivities_equal_a_per_sample_loop(setup, batch_size):
    base, experts, files, _ = setup
    coeffs = _sens(setup, batch_size=batch_size, ablation="task_specific")
    groups = coeffs.score_partitions["sensitivity"]
    assert groups == ["embed", "layer.0", "layer.1", "head"]
    assert coeffs.stats["per_sample_gradients"] == ["vmap" if batch_size > 1 else "loop"] * 3
    for i, (expert, f) in enumerate(zip(experts, files)):
        ref = _reference_sensitivity(_tokenizer(base), expert, TASKS[f.stem])
        expected = torch.tensor([ref[g] for g in groups], dtype=torch.float64)
        torch.testing.assert_close(coeffs.scores["sensitivity"][i], expected, rtol=2e-5, atol=1e-7)
        torch.testing.assert_close(coeffs.scores["alpha"][i], expected / expected.norm(), rtol=2e-5, atol=1e-7)
    n = sum(len(TASKS[f.stem]) for f in files)
    assert coeffs.stats["passes"]["backward"] == (n if batch_size == 1 else 3)


def test_use_delta_sensitivity(setup):
    base, experts, files, _ = setup
    coeffs = _sens(setup, use_delta=True, ablation="task_specific")
    ref = _reference_sensitivity(_tokenizer(base), experts[1], TASKS[files[1].stem], base=base)
    groups = coeffs.score_partitions["sensitivity"]
    torch.testing.assert_close(coeffs.scores["sensitivity"][1],
                               torch.tensor([ref[g] for g in groups], dtype=torch.float64), rtol=2e-5, atol=1e-8)


def test_coefficients_from_alpha_tau_and_distances(setup):
    base, experts, files, _ = setup
    coeffs = _sens(setup, temperature=0.05, **{"lambda": 0.7})
    g = _reference_distances(_tokenizer(base), experts, files)
    torch.testing.assert_close(coeffs.scores["cross_task_distance"], g, rtol=1e-5, atol=1e-7)
    tau = g.sum(1) / g.sum()
    torch.testing.assert_close(coeffs.scores["tau"][:, 0], tau, rtol=1e-5, atol=1e-8)
    alpha = coeffs.scores["alpha"]
    sigma = torch.softmax(tau[:, None] * alpha / 0.05, dim=0)
    torch.testing.assert_close(coeffs.scores["sigma"], sigma, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(coeffs.scores["sigma"].sum(0), torch.ones(alpha.shape[1], dtype=torch.float64))
    field = coeffs.fields["weight"]
    assert field.level == "layer" and field.partitions == ["embed", "layer.0", "layer.1", "head"]
    torch.testing.assert_close(field.values, 0.7 * 3 * sigma, rtol=1e-5, atol=1e-8)


def test_cross_task_options(setup):
    base, experts, files, _ = setup
    g = _sens(setup, ablation="cross_task").scores["cross_task_distance"]
    inverse = _sens(setup, ablation="cross_task", cross_task="inverse")
    off = ~torch.eye(3, dtype=torch.bool)
    tau = ((1 / g.clamp(min=1e-300)) * off).sum(1)
    torch.testing.assert_close(inverse.scores["tau"][:, 0], tau / tau.sum())
    frob = _sens(setup, ablation="cross_task", logit_reduction="frobenius")
    tok = _tokenizer(base)
    m0, m1 = (AutoModelForCausalLM.from_pretrained(str(e), dtype=torch.float32).eval() for e in experts[:2])
    with torch.no_grad():
        dists = [float((m0(input_ids=ids).logits - m1(input_ids=ids).logits).double().norm())
                 for ids, _ in (_tokens(tok, p, a) for p, a in TASKS[files[1].stem])]
    torch.testing.assert_close(float(frob.scores["cross_task_distance"][0, 1]), sum(dists) / len(dists),
                               rtol=1e-5, atol=1e-7)


def test_fallbacks_give_the_same_numbers(setup, monkeypatch, tmp_path):
    """Pairwise distances without the reference-logit cache, and a per-sample loop where vmap fails."""
    cached = _sens(setup, ablation="cross_task")
    vmapped = _sens(setup, ablation="task_specific")

    def no_vmap(*args, **kwargs):
        raise RuntimeError("vmap cannot trace this model")

    monkeypatch.setattr(sens, "REFERENCE_CACHE_BYTES", 0)
    monkeypatch.setattr(torch.func, "vmap", no_vmap)
    pairwise = _sens(setup, cache=tmp_path / "c1", ablation="cross_task")
    torch.testing.assert_close(pairwise.scores["cross_task_distance"], cached.scores["cross_task_distance"])
    looped = _sens(setup, cache=tmp_path / "c2", ablation="task_specific")
    assert looped.stats["per_sample_gradients"] == ["loop"] * 3
    assert len(looped.stats["notes"]) == 3 and "vmap cannot trace" in looped.stats["notes"][0]
    torch.testing.assert_close(looped.scores["sensitivity"], vmapped.scores["sensitivity"], rtol=2e-5, atol=1e-7)


def test_ablations(setup):
    task_only = _sens(setup, ablation="task_specific")
    assert torch.equal(task_only.scores["tau"], torch.ones(3, 1, dtype=torch.float64))
    assert "cross_task_distance" not in task_only.scores
    alpha = task_only.scores["alpha"]
    torch.testing.assert_close(task_only.fields["weight"].values, 3 * torch.softmax(alpha / 0.05, dim=0))
    cross_only = _sens(setup, ablation="cross_task")
    assert torch.equal(cross_only.scores["alpha"], torch.ones(3, 4, dtype=torch.float64))
    assert "sensitivity" not in cross_only.scores and cross_only.stats["passes"]["backward"] == 0
    tau = cross_only.scores["tau"]
    torch.testing.assert_close(cross_only.fields["weight"].values,
                               3 * torch.softmax(tau.expand(3, 4) / 0.05, dim=0))


def test_temperature_limits_and_relative_mode(setup):
    flat = _sens(setup, temperature=1e12, **{"lambda": 0.5})
    torch.testing.assert_close(flat.fields["weight"].values, torch.full((3, 4), 0.5, dtype=torch.float64))
    rel = _sens(setup, temperature_mode="relative")
    products = rel.scores["tau"] * rel.scores["alpha"]
    torch.testing.assert_close(rel.scores["sigma"], torch.softmax(products / products.mean(), dim=0))
    assert math.isclose(rel.stats["temperature_applied"], float(products.mean()), rel_tol=1e-12)


def test_nonblock_uniform(setup):
    coeffs = _sens(setup, nonblock="uniform", **{"lambda": 0.5})
    field = coeffs.fields["weight"]
    assert field.partitions == ["layer.0", "layer.1"] and field.default == [0.5, 0.5, 0.5]
    alpha = coeffs.scores["alpha"]
    torch.testing.assert_close(alpha.norm(dim=1), torch.ones(3, dtype=torch.float64))
    assert coeffs.scores["sensitivity"].shape == (3, 2)


# ------------------------------------------------------------------------------------------------ end to end


def _recipe(setup, method, **extra):
    base, experts, files, _ = setup
    return parse_recipe({
        "merge_method": method, "base_model": str(base),
        "models": [{"model": str(e), "task": str(f)} for e, f in zip(experts, files)],
        "importance": {"estimator": "sens", "parameters": {"temperature": 0.1},
                       "data": {"n": 2}},
        **extra,
    })


def test_recipe_task_arithmetic_end_to_end(setup):
    base, experts, files, _ = setup
    merged = merge_state_dict(_recipe(setup, "task_arithmetic"))
    tasks = [load_task_data(str(f), "calib", 2) for f in files]
    coeffs = compute_coefficients("sens", base=_ref(base), experts=[_ref(e) for e in experts], tasks=tasks,
                                  params={"temperature": 0.1})
    field = coeffs.fields["weight"]
    b = load_file(str(base / "model.safetensors"))
    es = [load_file(str(e / "model.safetensors")) for e in experts]
    for name, part in [("model.layers.1.mlp.down_proj.weight", "layer.1"), ("lm_head.weight", "head"),
                       ("model.embed_tokens.weight", "embed")]:
        c = field.values[:, field.partitions.index(part)]
        expected = b[name] + sum(float(c[i]) * (es[i][name] - b[name]) for i in range(3))
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["ties", "dare_linear"])
def test_recipe_ties_and_dare_run(setup, method):
    base, _, _, _ = setup
    merged = merge_state_dict(_recipe(setup, method))
    b = load_file(str(base / "model.safetensors"))
    assert set(merged) == set(b)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.isfinite(merged[name]).all() and not torch.equal(merged[name], b[name])
