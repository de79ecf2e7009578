"""LM-Cocktail weights against an independent loss computation on tiny Llama models (docs/methods.md §5.13, D-31)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeflow.cache import Cache
from mergeflow.checkpoints import resolve
from mergeflow.engine import merge_state_dict
from mergeflow.importance.base import ModelRef, compute_coefficients
from mergeflow.importance.data import load_task_data
from mergeflow.recipe import parse_recipe
from tests.tiny_models import write_jsonl

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
    folder = tmp_path_factory.mktemp("cocktail_tasks")
    files = {}
    for name, rows in TASKS.items():
        path = write_jsonl(folder / f"{name}.jsonl", rows)
        files[name] = path
    return base, experts, files, folder / "cache"


def _ref(path) -> ModelRef:
    return ModelRef(str(path), path, resolve(str(path)).content_hash)


def _task(files, name):
    return load_task_data(str(files[name]), "fewshot", len(TASKS[name]))


def _cocktail(setup, tasks, *, ood=False, **params):
    base, experts, _, cache = setup
    return compute_coefficients("cocktail", base=_ref(base), experts=[_ref(e) for e in experts], tasks=tasks,
                                params=params, ood=ood, cache=Cache(cache))


def _reference_loss(model_path, tok, rows, *, batch_size=2, eos=True) -> float:
    """The official recipe with Hugging Face's own shifted loss: prompt labels -100, EOS appended, padding -100,
    the batch loss a token mean over the batch, the model's loss the mean over batches."""
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    losses = []
    for start in range(0, len(rows), batch_size):
        ids_list, labels_list = [], []
        for prompt, answer in rows[start:start + batch_size]:
            ids = tok(prompt + " " + answer, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
            n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
            ids_list.append(ids)
            labels_list.append([-100] * n_prompt + ids[n_prompt:])
        width = max(map(len, ids_list))
        ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids_list])
        labels = torch.tensor([x + [-100] * (width - len(x)) for x in labels_list])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids_list])
        with torch.no_grad():
            losses.append(float(model(input_ids=ids, attention_mask=mask, labels=labels).loss))
    return sum(losses) / len(losses)


def test_weights_are_softmax_of_independent_losses(setup):
    base, experts, files, _ = setup
    tok = AutoTokenizer.from_pretrained(str(base))  # the run tokenises with the base's tokenizer
    rows = TASKS["fox"]
    target = _task(files, "fox")
    coeffs = _cocktail(setup, [target] * 3, ood=True, temperature=0.05)
    losses = torch.tensor([_reference_loss(m, tok, rows) for m in [base, *experts]], dtype=torch.float64)
    torch.testing.assert_close(coeffs.scores["loss"], losses, rtol=1e-5, atol=1e-6)
    w = torch.softmax(-losses / 0.05, dim=0)
    torch.testing.assert_close(coeffs.scores["member_weight"], w, rtol=1e-4, atol=1e-6)
    field = coeffs.fields["weight"]
    assert field.level == "model" and field.partitions == ["model"]
    torch.testing.assert_close(field.values[:, 0], w[1:], rtol=1e-4, atol=1e-6)
    assert coeffs.score_partitions["loss"] == ["base", "model[0]", "model[1]", "model[2]"]
    assert coeffs.stats["examples"] == 3 and coeffs.stats["passes"]["forward"] == 4 * 2  # 2 batches per member


def test_without_base_and_without_eos(setup):
    base, experts, files, _ = setup
    tok = AutoTokenizer.from_pretrained(str(base))
    target = _task(files, "soup")
    coeffs = _cocktail(setup, [target] * 3, ood=True, include_base=False, append_eos=False, batch_size=3)
    losses = torch.tensor([_reference_loss(m, tok, TASKS["soup"], batch_size=3, eos=False) for m in experts],
                          dtype=torch.float64)
    torch.testing.assert_close(coeffs.scores["loss"], losses, rtol=1e-5, atol=1e-6)
    w = torch.softmax(-losses / 5.0, dim=0)
    torch.testing.assert_close(coeffs.fields["weight"].values[:, 0], w)
    assert coeffs.score_partitions["loss"] == ["model[0]", "model[1]", "model[2]"]
    assert float(coeffs.fields["weight"].values.sum()) == pytest.approx(1.0)


def test_in_domain_uses_each_distinct_task_once(setup):
    base, _, files, _ = setup
    tok = AutoTokenizer.from_pretrained(str(base))
    fox, total = _task(files, "fox"), _task(files, "sum")
    coeffs = _cocktail(setup, [fox, total, fox])
    assert coeffs.stats["examples"] == 5
    rows = TASKS["fox"] + TASKS["sum"]
    assert float(coeffs.scores["loss"][0]) == pytest.approx(_reference_loss(base, tok, rows), rel=1e-5)


def test_recipe_end_to_end_is_the_weighted_average(setup):
    """cocktail + task_arithmetic (λ = 1) = Σ_m w_m θ_m over base and experts, out of domain and in domain."""
    base, experts, files, _ = setup
    b = load_file(str(base / "model.safetensors"))
    es = [load_file(str(e / "model.safetensors")) for e in experts]
    for models, data in [([{"model": str(e)} for e in experts], {"target": str(files["soup"]), "n": 3}),
                         ([{"model": str(e), "task": str(files[t])} for e, t in zip(experts, TASKS)], {"n": 2})]:
        recipe = parse_recipe({"merge_method": "task_arithmetic", "base_model": str(base), "models": models,
                               "importance": {"estimator": "cocktail", "parameters": {"temperature": 0.1},
                                              "data": data}})
        merged = merge_state_dict(recipe)
        if "target" in data:
            tasks = [load_task_data(data["target"], "fewshot", 3)] * 3
        else:
            tasks = [load_task_data(str(files[t]), "fewshot", 2) for t in TASKS]
        coeffs = compute_coefficients("cocktail", base=_ref(base), experts=[_ref(e) for e in experts], tasks=tasks,
                                      params={"temperature": 0.1}, ood="target" in data)
        w = coeffs.scores["member_weight"]
        for name in ["model.layers.0.self_attn.v_proj.weight", "lm_head.weight", "model.norm.weight"]:
            expected = float(w[0]) * b[name] + sum(float(w[i + 1]) * es[i][name] for i in range(3))
            torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
