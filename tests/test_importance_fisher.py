"""Fisher merging: the diagonal Fisher against an independent one-backward-per-example loop, and the merge end to end."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeflow.engine import merge_state_dict
from mergeflow.importance.data import Example
from mergeflow.importance.fisher import fisher_diagonal, sample_targets
from mergeflow.importance.scoring import encode
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
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def _answer_span(tok, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of prompt + " " + answer and the index of the first answer token (independently of encode)."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = tok(prompt + " " + answer, add_special_tokens=False)["input_ids"]
    assert ids[:len(p)] == p
    return ids, len(p)


def _reference_fisher(model, tok, rows, *, seed: int | None) -> dict[str, torch.Tensor]:
    """Mean squared gradient of Σ_answer log p(label), one backward per example on the unpadded example.

    ``seed`` None: gold labels; else labels drawn per answer position from the model's distribution by inverse CDF
    from a CPU generator with that seed (the documented sampling convention).
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for prompt, answer in rows:
        ids, start = _answer_span(tok, prompt, answer)
        x = torch.tensor([ids])
        model.zero_grad(set_to_none=True)
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1], dim=-1)[start - 1:]  # predicts ids[start:]
        if gen is None:
            labels = torch.tensor(ids[start:])
        else:
            probs = logp.detach().exp().double()
            cdf = probs.cumsum(-1)
            u = torch.rand(len(ids) - start, generator=gen, dtype=torch.float64) * cdf[:, -1]
            labels = torch.searchsorted(cdf, u.unsqueeze(-1), right=True).squeeze(-1)
        logp.gather(-1, labels.unsqueeze(-1)).sum().backward()
        for n, p in model.named_parameters():
            acc[n] += p.grad.square()
    return {n: a / len(rows) for n, a in acc.items()}


@pytest.mark.parametrize("mode", ["empirical", "sampled"])
def test_fisher_diagonal_matches_per_example_loop(families, mode):
    _, experts = families("llama")
    model, tok = _load(experts[0])
    enc = encode(tok, [Example(p, a) for p, a in ROWS])
    if mode == "sampled":
        targets = sample_targets(model, enc, torch.Generator().manual_seed(7), batch_size=3)
        assert (targets[~enc.answer_mask] == 0).all()
    else:
        targets = enc.targets
    expected = _reference_fisher(model, tok, ROWS, seed=7 if mode == "sampled" else None)
    for batch_size, how in ((2, "vmap"), (1, "loop")):
        got, used = fisher_diagonal(model, enc, targets, batch_size=batch_size)
        assert used == how
        assert set(got) == set(expected)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-10, msg=f"{how} {name}")
    assert sum(float(t.sum()) for t in expected.values()) > 0


def test_fisher_merge_end_to_end(families, tmp_path):
    _, experts = families("llama")
    tasks = []
    for i in range(len(experts)):  # each expert its own task: a different rotation of the rows
        rows = (ROWS[i:] + ROWS[:i])[:3]
        path = write_jsonl(tmp_path / f"task{i}.jsonl", rows)
        tasks.append((path, rows))
    recipe = parse_recipe({
        "merge_method": "linear",
        "models": [{"model": str(e), "task": str(t)} for e, (t, _) in zip(experts, tasks)],
        "importance": {"estimator": "fisher", "parameters": {"fisher": "empirical", "batch_size": 2},
                       "data": {"n": 3}},
    })
    merged = merge_state_dict(recipe, threads=1)
    eps = 1e-6
    # the run renders every expert's data with one tokenizer (the first expert's without a base; the family's
    # experts share it)
    tok = AutoTokenizer.from_pretrained(str(experts[0]))
    for name in ("model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        fishers, thetas = [], []
        for e, (_, rows) in zip(experts, tasks):
            model, _ = _load(e)
            fishers.append(_reference_fisher(model, tok, rows, seed=None)[name] + eps)
            thetas.append(load_file(str(e / "model.safetensors"))[name])
        expected = sum(f * t for f, t in zip(fishers, thetas)) / sum(fishers)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(expected, sum(thetas) / len(thetas), rtol=1e-4, atol=1e-6)  # not a plain mean
