"""The Coefficients artifact and its consumption by the merge kernels (no estimator involved: tables given here)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mergeflow.architecture import Architecture
from mergeflow.checkpoints import resolve
from mergeflow.coefficients import CoefficientField, Coefficients, CoefficientsError
from mergeflow.engine import merge_state_dict
from mergeflow.errors import RecipeError
from mergeflow.partitions import Partitioner
from mergeflow.recipe import parse_recipe


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def _artifact(base, experts, fields, entry_tensors=None) -> Coefficients:
    snap_b = resolve(str(base))
    return Coefficients(
        estimator="test",
        experts=[{"reference": str(e), "content_hash": resolve(str(e)).content_hash} for e in experts],
        base={"reference": str(base), "content_hash": snap_b.content_hash},
        fields=fields, entry_tensors=entry_tensors or {},
    )


def _partitioner(base, level, **kw):
    return Partitioner(Architecture.from_folder(base), level, **kw)


def test_layer_weights_reach_task_arithmetic(families, tmp_path):
    base, experts = families("llama")
    part = _partitioner(base, "layer")
    layers = [p for p in part.partition_ids() if p.startswith("layer.")]
    values = torch.tensor([[0.2, 0.7], [1.3, -0.4], [0.5, 0.9]], dtype=torch.float64)
    art = _artifact(base, experts, {"weight": CoefficientField("layer", layers, values, default=[1.0, 2.0, 3.0])})
    # through disk, as the pipeline hands it over
    art = Coefficients.load(art.save(tmp_path / "c"))
    recipe = parse_recipe({"merge_method": "task_arithmetic", "base_model": str(base),
                           "models": [{"model": str(e)} for e in experts]})
    merged = merge_state_dict(recipe, coefficients=[art])
    b = _weights(base)
    es = [_weights(e) for e in experts]
    default = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    for name in b:
        block = part.partition(name).labels[0]
        w = values[:, layers.index(block)] if block in layers else default
        expected = b[name] + sum(float(w[i]) * (es[i][name] - b[name]) for i in range(3))
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-6)


def test_rows_matched_by_content_hash_not_order(families):
    base, experts = families("llama")
    part = _partitioner(base, "layer")
    layers = [p for p in part.partition_ids() if p.startswith("layer.")]
    values = torch.tensor([[0.2, 0.7], [1.3, -0.4], [0.5, 0.9]], dtype=torch.float64)
    art = _artifact(base, experts, {"weight": CoefficientField("layer", layers, values, default=[1.0, 1.0, 1.0])})
    reversed_art = _artifact(base, experts[::-1], {"weight": CoefficientField(
        "layer", layers, values.flip(0), default=[1.0, 1.0, 1.0])})
    recipe = parse_recipe({"merge_method": "task_arithmetic", "base_model": str(base),
                           "models": [{"model": str(e)} for e in experts]})
    a = merge_state_dict(recipe, coefficients=[art])
    r = merge_state_dict(recipe, coefficients=[reversed_art])
    assert all(torch.equal(a[n], r[n]) for n in a)


def test_hidden_state_drop_ratios_in_dare(families):
    base, experts = families("llama")
    part = _partitioner(base, "hidden_state")
    hidden = [p for p in part.partition_ids() if p.startswith("hidden.")]
    # drop ratio 0 on even hidden dims, 0.9 on odd ones, for every expert
    p_hat = torch.tensor([[0.0 if j % 2 == 0 else 0.9 for j in range(len(hidden))]] * 3, dtype=torch.float64)
    art = _artifact(base, experts, {"drop_ratio": CoefficientField("hidden_state", hidden, p_hat,
                                                                   default=[0.5, 0.5, 0.5])})
    recipe = parse_recipe({"merge_method": "dare_linear", "base_model": str(base),
                           "models": [{"model": str(experts[0]), "parameters": {"weight": 1.0}}]})
    merged = merge_state_dict(recipe, coefficients=[_artifact(base, experts[:1], {
        "drop_ratio": CoefficientField("hidden_state", hidden, p_hat[:1], default=[0.5])})])
    del art
    b, e = _weights(base), _weights(experts[0])
    name = "model.layers.0.mlp.up_proj.weight"  # reads the residual stream: hidden axis = columns
    delta = e[name] - b[name]
    got = merged[name] - b[name]
    even, odd = got[:, 0::2], got[:, 1::2]
    torch.testing.assert_close(even, delta[:, 0::2], rtol=1e-5, atol=1e-6)  # p̂ = 0: kept as is
    kept = odd != 0
    frac = kept.float().mean().item()
    assert 0.05 < frac < 0.16  # keep probability 0.1
    torch.testing.assert_close(odd[kept], (delta[:, 1::2] / 0.1)[kept], rtol=1e-4, atol=1e-6)


def test_refusals(families, tmp_path):
    base, experts = families("llama")
    part = _partitioner(base, "layer")
    layers = [p for p in part.partition_ids() if p.startswith("layer.")]
    drop = CoefficientField("layer", layers, torch.full((3, len(layers)), 0.5, dtype=torch.float64),
                            default=[0.5] * 3)
    art = _artifact(base, experts, {"drop_ratio": drop})
    models = [{"model": str(e)} for e in experts]
    ties = parse_recipe({"merge_method": "ties", "base_model": str(base), "models": models})
    with pytest.raises(RecipeError, match="takes no per-partition 'density'"):
        merge_state_dict(ties, coefficients=[art])
    other = _artifact(base, experts[:2], {"drop_ratio": CoefficientField(
        "layer", layers, torch.full((2, len(layers)), 0.5, dtype=torch.float64), default=[0.5] * 2)})
    dare = parse_recipe({"merge_method": "dare_linear", "base_model": str(base), "models": models})
    with pytest.raises(CoefficientsError, match="not computed for expert"):
        merge_state_dict(dare, coefficients=[other])
    bad = _artifact(base, experts, {"drop_ratio": CoefficientField(
        "layer", layers, torch.full((3, len(layers)), 1.0, dtype=torch.float64), default=[0.5] * 3)})
    with pytest.raises(CoefficientsError, match=r"in \[0, 1\)"):
        bad.save(tmp_path / "bad")
    with pytest.raises(CoefficientsError, match="not a coefficients artifact"):
        Coefficients.load(tmp_path)
    with pytest.raises(RecipeError, match="mergekit equivalent"):
        parse_recipe({"merge_method": "dare_linear", "base_model": str(base), "models": models,
                      "mergekit_compat": True, "coefficients": [str(tmp_path)]})


def test_entry_level_weights_average(families, tmp_path):
    """Per-entry weights (Fisher-style) through the weighted-average kernel: Σ F_t θ_t / Σ F_t, via disk."""
    base, experts = families("llama")
    es = [_weights(e) for e in experts]
    gen = torch.Generator().manual_seed(0)
    fisher = [{n: torch.rand(t.shape, generator=gen) + 0.1 for n, t in w.items()} for w in es]
    art = _artifact(base, experts, {"weight": CoefficientField("entry")}, {"weight": fisher})
    art = Coefficients.load(art.save(tmp_path / "f"))
    recipe = parse_recipe({"merge_method": "linear", "models": [{"model": str(e)} for e in experts]})
    merged = merge_state_dict(recipe, coefficients=[art])
    for name in es[0]:
        expected = sum(f[name] * w[name] for f, w in zip(fisher, es)) / sum(f[name] for f in fisher)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


def test_recipe_importance_needs_tasks(families):
    base, experts = families("llama")
    with pytest.raises(RecipeError, match=r"models\[1\]\.task"):
        parse_recipe({"merge_method": "dare_linear", "base_model": str(base),
                      "models": [{"model": str(base)}, {"model": str(experts[0])}],
                      "importance": {"estimator": "cocktail"}})
