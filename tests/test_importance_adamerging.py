"""AdaMerging on tiny Llama models: the optimised model is the merge task_arithmetic writes, the first Adam step goes
down an independently measured slope, training lowers the objective, and the clamps and levels hold."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeflow.architecture import Architecture
from mergeflow.checkpoints import resolve
from mergeflow.engine import merge_state_dict
from mergeflow.errors import RecipeError
from mergeflow.importance.base import ModelRef, compute_coefficients
from mergeflow.importance.data import load_task_data
from mergeflow.importance.scoring import encode, lm_loss
from mergeflow.partitions import Partitioner
from mergeflow.recipe import parse_recipe
from tests.tiny_models import write_jsonl

TASKS = {
    "fox": [("the quick brown fox", "jumps over the lazy dog"), ("the lazy dog", "jumps over"),
            ("over the lazy", "dog")],
    "sum": [("nine plus three", "mod ten equals two"), ("three plus nine mod ten", "equals two")],
    "soup": [("alice went to the kitchen", "and cooked the soup"), ("alice cooked", "the soup")],
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(families, tmp_path_factory):
    base, experts = families("llama")
    folder = tmp_path_factory.mktemp("adamerging_tasks")
    files = []
    for name, rows in TASKS.items():
        path = write_jsonl(folder / f"{name}.jsonl", rows)
        files.append(path)
    tasks = [load_task_data(str(f), "fewshot", len(TASKS[n])) for f, n in zip(files, TASKS)]
    return base, experts, tasks, files


def _ref(path) -> ModelRef:
    return ModelRef(str(path), path, resolve(str(path)).content_hash)


def _ada(setup, **params):
    base, experts, tasks, _ = setup
    # batch_size above every task's size: each step sees every example (full-batch, deterministic steps)
    params = {"batch_size": 8, **params}
    return compute_coefficients("adamerging", base=_ref(base), experts=[_ref(e) for e in experts], tasks=tasks,
                                params=params, use_cache=False, threads=1)


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _by_hand(setup, table: torch.Tensor, level: str) -> dict[str, torch.Tensor]:
    """θ_b + Σ_k λ_{k, p(t)} Δ_k, from the checkpoints and the partition ids, independently of the estimator."""
    base, experts, _, _ = setup
    arch = Architecture.from_folder(base)
    part = Partitioner(arch, level)
    ids = part.partition_ids()
    b, es = _weights(base), [_weights(e) for e in experts]
    out = {}
    for name, t in b.items():
        (label,) = part.partition(name).unique_labels()
        j = ids.index(label)
        out[name] = t + sum(float(table[k, j]) * (es[k][name] - t) for k in range(len(es)))
    return out


def _merge(setup, coeffs) -> dict[str, torch.Tensor]:
    base, experts, _, files = setup
    recipe = parse_recipe({"merge_method": "task_arithmetic", "base_model": str(base),
                           "models": [{"model": str(e), "task": str(f)} for e, f in zip(experts, files)],
                           "parameters": {"lambda": 1.0}})
    return merge_state_dict(recipe, coefficients=[coeffs])


def _objective(setup, state: dict[str, torch.Tensor]) -> float:
    """Mean over tasks of the mean answer cross-entropy of a model with ``state``, computed from scratch."""
    base, _, tasks, _ = setup
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    model.load_state_dict(state, strict=False)
    tok = AutoTokenizer.from_pretrained(str(base))
    with torch.no_grad():
        return sum(float(lm_loss(model, encode(tok, t.examples)).mean()) for t in tasks) / len(tasks)


def test_zero_steps_is_task_arithmetic_at_init(setup):
    coeffs = _ada(setup, steps=0, init=0.3)
    field = coeffs.fields["weight"]
    # λ is optimised in fp32: the artifact holds fp32 0.3 (widened)
    assert field.level == "layer" and torch.equal(field.values, torch.full(field.values.shape, 0.3).double())
    merged = _merge(setup, coeffs)
    for name, t in _by_hand(setup, field.values, "layer").items():
        torch.testing.assert_close(merged[name], t, rtol=1e-6, atol=1e-6)


def test_first_step_follows_the_measured_slope_and_training_lowers_the_objective(setup):
    lr = 0.02
    one = _ada(setup, steps=1, lr=lr, level="model")
    table = one.fields["weight"].values
    # Adam's first step moves every coordinate by lr · g / (|g| + 1e-8) ≈ ±lr: its sign is the slope's, which is
    # measured here by central differences of the objective of independently merged models
    init = torch.full((3, 1), 0.3, dtype=torch.float64)
    for k in range(3):
        up, down = init.clone(), init.clone()
        up[k, 0] += 0.05
        down[k, 0] -= 0.05
        slope = (_objective(setup, _by_hand(setup, up, "model")) - _objective(setup, _by_hand(setup, down, "model")))
        assert abs(slope) > 1e-6, "the tiny tasks must move the objective (fp32 noise is ~1e-7)"
        assert float(table[k, 0]) == pytest.approx(0.3 - lr * (1 if slope > 0 else -1), abs=1e-6), (k, slope)

    trained = _ada(setup, steps=12, lr=0.05, level="attn_mlp")
    assert trained.stats["steps"] == 12 and trained.stats["passes"] == {"forward": 36, "backward": 36}
    merged = _merge(setup, trained)
    by_hand = _by_hand(setup, trained.fields["weight"].values, "attn_mlp")
    for name, t in by_hand.items():  # the model optimised is the one the merge writes
        torch.testing.assert_close(merged[name], t, rtol=1e-6, atol=1e-6)
    start = _objective(setup, _by_hand(setup, torch.full_like(trained.fields["weight"].values, 0.3), "attn_mlp"))
    assert _objective(setup, merged) < start - 1e-3
    assert trained.stats["objective_first"] == pytest.approx(start, rel=1e-4)  # full-batch: the same objective


def test_clamps_levels_and_checks(setup):
    clipped = _ada(setup, steps=6, lr=0.5, init=0.3, clip_low=0.2, clip_high=0.35, level="matrix")
    values = clipped.fields["weight"].values.float()  # fp32, as optimised
    assert values.min() >= 0.2 and values.max() <= 0.35
    assert (values == 0.35).any() and (values == 0.2).any()  # lr 0.5 reaches both bounds
    entropy = _ada(setup, steps=3, objective="entropy", level="layer")
    assert entropy.stats["objective_last"] < entropy.stats["objective_first"]
    with pytest.raises(RecipeError, match="outside"):
        _ada(setup, init=0.9, clip_high=0.5)
    with pytest.raises(RecipeError, match="level"):
        _ada(setup, level="head_mlp")
