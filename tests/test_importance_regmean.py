"""RegMean: Gram matrices against independent hooks, the merge against its closed form computed here in float64."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeflow.engine import merge_state_dict
from mergeflow.errors import RecipeError
from mergeflow.importance.data import Example
from mergeflow.importance.regmean import gram_matrices, linear_layers, shrink
from mergeflow.importance.scoring import encode
from mergeflow.methods.base import KernelInput
from mergeflow.methods.regmean import regmean_kernel
from mergeflow.recipe import parse_recipe
from tests.tiny_models import write_jsonl

ROWS = [
    ("the quick brown fox", "jumps over the lazy dog"),
    ("alice went to the kitchen and", "cooked the soup"),
    ("nine plus three mod ten", "equals two"),
    ("merging fine tuned language", "models with task vectors"),
    ("the lazy", "dog"),
]


def _load(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _reference_gram(model, tok, rows, module: str) -> torch.Tensor:
    """XᵀX / n in float64 over the tokens of each unpadded example (prompt + " " + answer) entering ``module``."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(module).register_forward_hook(lambda m, args, out: seen.append(args[0][0]))
    try:
        with torch.no_grad():
            for prompt, answer in rows:
                ids = tok(prompt + " " + answer, add_special_tokens=False)["input_ids"]
                model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    x = torch.cat(seen).double()
    return x.T @ x / x.shape[0]


def _kernel(models, grams) -> torch.Tensor:
    params = {} if grams is None else {"gram": grams}
    return regmean_kernel(KernelInput(name="w", base=None, models=models, params=params, shared={}))


def _random_gram(n: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(rank, n, generator=gen)
    return x.T @ x / rank


def test_gram_matches_independent_hooks(families):
    _, experts = families("llama")
    model = _load(experts[0])
    tok = AutoTokenizer.from_pretrained(str(experts[0]))
    layers, skipped = linear_layers(model)
    assert len(layers) == 2 * 7 + 1 and "lm_head.weight" in layers and not skipped  # untied lm_head included
    enc = encode(tok, [Example(p, a) for p, a in ROWS], answer_only=False)
    grams, rows = gram_matrices(model, enc, batch_size=2)  # padded batches: the pad tokens must not count
    assert set(grams) == set(layers)
    for module in ("model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"):
        expected = _reference_gram(model, tok, ROWS, module)
        assert rows[f"{module}.weight"] == int(enc.attention_mask.sum())
        torch.testing.assert_close(grams[f"{module}.weight"].double(), expected, rtol=1e-5, atol=1e-6)
    g = grams["model.layers.1.mlp.down_proj.weight"]
    s = shrink(g, 0.25)
    torch.testing.assert_close(s.diagonal(), g.diagonal())
    off = ~torch.eye(g.shape[0], dtype=torch.bool)
    torch.testing.assert_close(s[off], 0.25 * g[off])


def test_regmean_merge_equals_closed_form(families, tmp_path):
    _, experts = families("llama")
    tasks = []
    for i in range(len(experts)):
        rows = (ROWS[i:] + ROWS[:i])[:3]
        path = write_jsonl(tmp_path / f"task{i}.jsonl", rows)
        tasks.append((path, rows))
    alpha = 0.5
    recipe = parse_recipe({
        "merge_method": "regmean",
        "models": [{"model": str(e), "task": str(t)} for e, (t, _) in zip(experts, tasks)],
        "importance": {"estimator": "regmean", "parameters": {"alpha": alpha, "batch_size": 2}, "data": {"n": 3}},
    })
    merged = merge_state_dict(recipe, threads=1)
    thetas = [load_file(str(e / "model.safetensors")) for e in experts]
    tok = AutoTokenizer.from_pretrained(str(experts[0]))  # the run renders every expert's data with one tokenizer
    models = [_load(e) for e in experts]
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"):
        name = f"{module}.weight"
        grams = []
        for model, (_, rows) in zip(models, tasks):
            g = _reference_gram(model, tok, rows, module)
            grams.append(alpha * g + (1 - alpha) * torch.diag(g.diagonal()))
        numerator = sum(t[name].double() @ g for t, g in zip(thetas, grams))
        expected = numerator @ torch.linalg.inv(sum(grams))
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(expected, sum(t[name].double() for t in thetas) / 3, atol=1e-4)
    for name in ("model.norm.weight", "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"):
        torch.testing.assert_close(merged[name], sum(t[name] for t in thetas) / 3, rtol=1e-6, atol=1e-7)


def test_identical_experts_give_that_expert():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 8, generator=gen)
    grams = [_random_gram(8, 20, gen), _random_gram(8, 3, gen)]  # the second one alone is singular
    torch.testing.assert_close(_kernel([w, w.clone()], grams), w, rtol=1e-5, atol=1e-6)


def test_alpha_zero_is_a_per_input_feature_weighted_average():
    gen = torch.Generator().manual_seed(1)
    ws = [torch.randn(4, 6, generator=gen) for _ in range(3)]
    full = [_random_gram(6, 10, gen) for _ in range(3)]
    grams = [shrink(g, 0.0) for g in full]
    assert all(torch.equal(g, torch.diag(f.diagonal())) for g, f in zip(grams, full))
    d = torch.stack([f.diagonal() for f in full])  # [K, in]
    expected = sum(w * d[t] for t, w in enumerate(ws)) / d.sum(0)  # column j weighted by G_t[j, j]
    torch.testing.assert_close(_kernel(ws, grams), expected, rtol=1e-5, atol=1e-6)


def test_singular_sum_uses_a_ridge_and_missing_grams_average():
    ws = [torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 6.0, 5.0]])]
    grams = [torch.diag(torch.tensor([1.0, 1.0, 0.0])), torch.diag(torch.tensor([1.0, 3.0, 0.0]))]  # feature 3 unseen
    out = _kernel(ws, grams)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, :2], torch.tensor([2.0, 5.0]))  # (1·1 + 3·1)/2, (2·1 + 6·3)/4
    assert abs(float(out[0, 2])) < 1e-3  # no input ever reaches it: the ridge shrinks it to zero
    torch.testing.assert_close(_kernel(ws, [None, None]), (ws[0] + ws[1]) / 2)
    bias = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])]
    torch.testing.assert_close(_kernel(bias, [None, None]), torch.tensor([2.0, 1.0]))


def test_conv1d_weights_stored_in_out(families):
    """GPT-2: Conv1D layers (weight [in, out]) get Grams marked with a leading axis; the tied LM head gets none."""
    _, experts = families("gpt2")
    model = _load(experts[0])
    tok = AutoTokenizer.from_pretrained(str(experts[0]))
    layers, tied = linear_layers(model)
    assert tied == ["lm_head"] and "transformer.h.0.attn.c_attn.weight" in layers and len(layers) == 2 * 4
    enc = encode(tok, [Example(p, a) for p, a in ROWS[:3]], answer_only=False)
    grams, _ = gram_matrices(model, enc, batch_size=2)
    torch.testing.assert_close(grams["transformer.h.1.mlp.c_proj.weight"].double(),
                               _reference_gram(model, tok, ROWS[:3], "transformer.h.1.mlp.c_proj"),
                               rtol=1e-5, atol=1e-6)
    gen = torch.Generator().manual_seed(2)
    ws = [torch.randn(6, 6, generator=gen) for _ in range(2)]  # square: only the marker tells the orientation
    gs = [_random_gram(6, 9, gen) for _ in range(2)]
    as_linear = _kernel([w.T.contiguous() for w in ws], gs)
    torch.testing.assert_close(_kernel(ws, [g.unsqueeze(0) for g in gs]), as_linear.T)


def test_regmean_without_coefficients_refuses(families):
    _, experts = families("llama")
    # refused when the recipe is read, before any checkpoint is opened
    with pytest.raises(RecipeError, match=r"regmean merges with coefficients.*estimator: regmean"):
        parse_recipe({"merge_method": "regmean", "models": [{"model": str(e)} for e in experts]})
    # and by the kernel when no coefficients reach it at all
    from mergeflow.methods.base import KernelInput, get_method

    w = torch.ones(2, 2)
    x = KernelInput(name="w", base=None, models=[w, w], params={}, shared={})
    with pytest.raises(RecipeError, match=r"regmean needs the Gram matrices.*importance"):
        get_method("regmean").kernel(x)
