"""APL importance (docs/methods.md §2, D-1…D-11): scores checked against swaps and gradients computed here independently."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeflow.checkpoints import resolve
from mergeflow.engine import merge_state_dict
from mergeflow.errors import RecipeError
from mergeflow.importance import base as importance_base
from mergeflow.importance.apl import DropRatioConfig, drop_ratios, linear_mapping, linear_window, mi_weights
from mergeflow.importance.base import ModelRef, compute_coefficients, get_estimator
from mergeflow.importance.data import load_task_data
from mergeflow.importance.recipes import coefficients_for_recipe
from mergeflow.recipe import parse_recipe

# words of the tiny tokenizer's corpus (tests/tiny_models.py), so that every token is a real merge
ROWS = [
    {"prompt": "the quick brown fox", "answer": "jumps over the lazy dog"},
    {"prompt": "alice went to the", "answer": "kitchen"},
    {"prompt": "nine plus three mod ten", "answer": "equals two"},
    {"prompt": "merging fine tuned language", "answer": "models with task vectors"},
    {"prompt": "alice went to the kitchen and", "answer": "cooked the soup"},
]
OTHER_ROWS = [
    {"context": "alice cooked the", "choices": ["soup", "dog"], "gold": 0},
    {"context": "the lazy", "choices": ["fox", "dog"], "gold": 1},
    {"context": "task", "choices": ["vectors", "kitchen"], "gold": 0},
    {"context": "nine plus three", "choices": ["mod", "fox"], "gold": 0},
    {"context": "the quick brown", "choices": ["dog", "fox"], "gold": 1},
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ref(path) -> ModelRef:
    snap = resolve(str(path))
    return ModelRef(str(path), snap.path, snap.content_hash)


def _run(base, experts, tasks, **params):
    return compute_coefficients("apl", base=_ref(base), experts=[_ref(e) for e in experts], tasks=tasks,
                                params=params, use_cache=False)


def _model(path, state=None):
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    if state is not None:
        model.load_state_dict(state, strict=False)
    return model


def _gold_by_hand(model, tok, rows) -> float:
    """Mean over examples of exp(mean log p(answer token)), one unpadded sequence at a time."""
    probs = []
    for row in rows:
        prompt = row.get("prompt", row.get("context"))
        answer = row["answer"] if "answer" in row else row["choices"][row["gold"]]
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(prompt + " " + answer, add_special_tokens=False)["input_ids"]
        assert ids[:len(p_ids)] == p_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        logp = torch.log_softmax(logits.double(), -1)
        picked = [logp[j - 1, ids[j]] for j in range(len(p_ids), len(ids))]
        probs.append(math.exp(float(sum(picked)) / len(picked)))
    return sum(probs) / len(probs)


def _loss_by_hand(model, tok, rows, all_tokens=False) -> torch.Tensor:
    losses = []
    for row in rows:
        p_ids = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        ids = tok(row["prompt"] + " " + row["answer"], add_special_tokens=False)["input_ids"]
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        first = 1 if all_tokens else len(p_ids)
        losses.append(-torch.stack([logp[j - 1, ids[j]] for j in range(first, len(ids))]).mean())
    return torch.stack(losses).mean()


def _weights(path):
    return load_file(str(path / "model.safetensors"))


# ------------------------------------------------------------------------------------------------------------ causal


def test_causal_layer_scores_are_explicit_swaps(families, tmp_path):
    base, experts = families("llama")
    task = load_task_data(str(_write(tmp_path / "t.jsonl", ROWS)))
    coeffs = _run(base, experts[:2], [task, task], level="layer")
    assert coeffs.score_partitions["layer"] == ["layer.0", "layer.1"]
    tok = AutoTokenizer.from_pretrained(str(base))
    b = _weights(base)
    p_base = _gold_by_hand(_model(base), tok, ROWS)
    for k, expert in enumerate(experts[:2]):
        e = _weights(expert)
        p_clean = _gold_by_hand(_model(expert), tok, ROWS)
        assert float(coeffs.scores["model"][k, 0]) == pytest.approx(p_clean - p_base, abs=2e-6)
        for col, layer in enumerate((0, 1)):
            swapped = {n: (b[n] if n.startswith(f"model.layers.{layer}.") else t) for n, t in e.items()}
            p_swap = _gold_by_hand(_model(expert, swapped), tok, ROWS)
            assert float(coeffs.scores["layer"][k, col]) == pytest.approx(p_clean - p_swap, abs=2e-6)
            assert p_clean != pytest.approx(p_swap, abs=1e-7)  # the swap does something
    # default Eq. 11 reading with raw causal scores: p̂ = p − ε·tanh(s/T)
    expected = 0.9 - 0.3 * torch.tanh(coeffs.scores["layer"] / 5.0)
    torch.testing.assert_close(coeffs.fields["drop_ratio"].values, expected, rtol=0, atol=1e-12)
    assert coeffs.fields["drop_ratio"].default == [0.9, 0.9]  # D-2: embeddings / head pruned with p
    # per expert the clean run, the prefix-reuse check and one per layer (layer 1's swap reuses layer 0's output);
    # one base pass for the shared task
    assert coeffs.stats["tracing"] == "in_place" and coeffs.stats["prefix_reuse"]
    assert coeffs.stats["passes"]["forward"] == 2 * (1 + 1 + 2) + 1


@pytest.mark.parametrize("tracing", ["in_place", "batched"])
def test_causal_hidden_state_score_is_an_explicit_swap(families, tmp_path, tracing):
    base, experts = families("llama")
    task = load_task_data(str(_write(tmp_path / "t.jsonl", ROWS)))
    coeffs = _run(base, experts[:1], [task], level="hidden_state", tracing=tracing)
    assert coeffs.stats["tracing"] == tracing
    cols = coeffs.score_partitions["hidden_state"]
    assert cols == [f"hidden.{j}" for j in range(32)]
    tok = AutoTokenizer.from_pretrained(str(base))
    b, e = _weights(base), _weights(experts[0])
    p_clean = _gold_by_hand(_model(experts[0]), tok, ROWS)
    reads = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight",
             "embed_tokens.weight", "lm_head.weight")
    for j in (3, 17):
        swapped = {}
        for name, t in e.items():
            t = t.clone()
            if name.endswith(reads):            # reads the residual stream: column j
                t[:, j] = b[name][:, j]
            elif name.endswith(("o_proj.weight", "down_proj.weight")):  # writes it: row j
                t[j] = b[name][j]
            else:
                assert "norm" in name
                t[j] = b[name][j]
            swapped[name] = t
        p_swap = _gold_by_hand(_model(experts[0], swapped), tok, ROWS)
        assert float(coeffs.scores["hidden_state"][0, cols.index(f"hidden.{j}")]) == pytest.approx(
            p_clean - p_swap, abs=2e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_batched_swaps_equal_in_place_swaps(families, tmp_path, family):
    """Hooks on Linear, Conv1D (GPT-2), tied embeddings and biases (Qwen2) give the in-place swap's numbers."""
    base, experts = families(family)
    task = load_task_data(str(_write(tmp_path / "t.jsonl", ROWS[:3])))
    level = "layer" if family == "llama" else "hidden_state"
    common = {"level": level, "nonblock_policy": "own_partitions"}
    batched = _run(base, experts[:1], [task], **common, batch_size=12, tracing="batched")
    single = _run(base, experts[:1], [task], **common, tracing="in_place")
    assert (batched.stats["tracing"], single.stats["tracing"]) == ("batched", "in_place")
    assert single.stats["prefix_reuse"]
    assert batched.score_partitions == single.score_partitions
    torch.testing.assert_close(batched.scores[level], single.scores[level], rtol=0, atol=1e-6)
    n_parts = len(single.score_partitions[level])
    # in place: the base, the clean run, the prefix-reuse check, one per partition; batched: 4 variants a forward
    assert single.stats["passes"]["forward"] == 1 + 1 + 1 + n_parts
    assert batched.stats["passes"]["forward"] == 1 + math.ceil((n_parts + 1) / 4)


def test_hidden_state_budget_and_parameter_errors(families, tmp_path):
    base, experts = families("llama")
    task = load_task_data(str(_write(tmp_path / "t.jsonl", ROWS[:2])))
    with pytest.raises(RecipeError, match=r"32 hidden_state partitions.*hidden_state_budget=16.*estimator: grad"):
        _run(base, experts[:1], [task], level="hidden_state", hidden_state_budget=16)
    grad = _run(base, experts[:1], [task], level="hidden_state", hidden_state_budget=16, estimator="grad")
    assert grad.scores["hidden_state"].shape == (1, 32)
    with pytest.raises(RecipeError, match=r"importance.parameters.p: must be in \[0, 1\)"):
        _run(base, experts[:1], [task], p=1.0)
    with pytest.raises(RecipeError, match=r"importance\.parameters\.level: must be one of"):
        _run(base, experts[:1], [task], level="head_mlp")


# ---------------------------------------------------------------------------------------------------------- gradient


def test_gradient_scores_are_an_autograd_inner_product(families, tmp_path):
    base, experts = families("llama")
    task = load_task_data(str(_write(tmp_path / "t.jsonl", ROWS)))
    layer = _run(base, experts, [task] * 3, level="layer", estimator="grad", nonblock_policy="own_partitions")
    hidden = _run(base, experts[:1], [task], level="hidden_state", estimator="grad")
    assert layer.stats["passes"] == {"forward": 1, "backward": 1}  # one base pass shared by the three experts

    tok = AutoTokenizer.from_pretrained(str(base))
    model = _model(base)
    _loss_by_hand(model, tok, ROWS).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    b = _weights(base)
    cols = layer.score_partitions["layer"]
    assert cols == ["embed", "layer.0", "layer.1", "head"]
    for k, expert in enumerate(experts):
        e = _weights(expert)
        signed = dict.fromkeys(cols, 0.0)
        for name in e:
            prefix = name.split(".")
            pid = (f"layer.{prefix[2]}" if prefix[1] == "layers" else "embed" if "embed" in name else "head")
            signed[pid] += float(((e[name] - b[name]) * grads[name]).double().sum())
        for i, pid in enumerate(cols):  # |<Δ_S, g_S>|: abs of the signed partition sum (D-6)
            assert float(layer.scores["layer"][k, i]) == pytest.approx(abs(signed[pid]), rel=1e-4, abs=1e-9)
        # no MI weights asked: the model-level score is the gradient one |<Δ, g>|
        assert float(layer.scores["model"][k, 0]) == pytest.approx(abs(sum(signed.values())), rel=1e-4)
    assert layer.stats["model_score"] == "grad"
    # max-normalised gradient scores (auto) in Eq. 11
    s = layer.scores["layer"]
    expected = 0.9 - 0.3 * torch.tanh(s / s.max(1, keepdim=True).values / 5.0)
    torch.testing.assert_close(layer.fields["drop_ratio"].values, expected, rtol=0, atol=1e-12)

    # loss over every token instead of the answer's (D-4 option)
    every = _run(base, experts[:1], [task], level="layer", estimator="grad", loss_tokens="all")
    model.zero_grad()
    _loss_by_hand(model, tok, ROWS, all_tokens=True).backward()
    e = _weights(experts[0])
    for i in (0, 1):
        inner = sum(float(((e[n] - b[n]) * p.grad).double().sum()) for n, p in model.named_parameters()
                    if n.startswith(f"model.layers.{i}."))
        assert float(every.scores["layer"][0, i]) == pytest.approx(abs(inner), rel=1e-4)
        assert abs(inner) != pytest.approx(float(layer.scores["layer"][0, i + 1]), rel=1e-2)

    # preserve_mean_drop: the parameter-weighted mean of p̂ is p (embeddings and head are larger than a block)
    even = _run(base, experts[:1], [task], level="layer", estimator="grad", nonblock_policy="own_partitions",
                preserve_mean_drop=True)
    shapes = {n: t.numel() for n, t in b.items()}
    sizes = torch.tensor([sum(v for n, v in shapes.items() if "embed" in n),
                          *(sum(v for n, v in shapes.items() if f"layers.{i}." in n) for i in (0, 1)),
                          shapes["model.norm.weight"] + shapes["lm_head.weight"]], dtype=torch.float64)
    p_hat = even.fields["drop_ratio"].values[0]
    assert float((p_hat * sizes).sum() / sizes.sum()) == pytest.approx(0.9, abs=1e-12)
    assert even.stats["mean_drop_ratio"][0] == pytest.approx(0.9, abs=1e-12)
    assert float(p_hat.std()) > 1e-3

    e = _weights(experts[0])
    j = 7
    total = 0.0
    for name in e:
        prod = (e[name] - b[name]) * grads[name]
        axis = 0 if name.endswith(("o_proj.weight", "down_proj.weight")) or prod.dim() == 1 else 1
        total += float(prod.select(axis, j).double().sum())
    assert float(hidden.scores["hidden_state"][0, j]) == pytest.approx(abs(total), rel=1e-4)


# ------------------------------------------------------------------------------------------------ score → drop ratio


def test_drop_ratio_mapping():
    cfg = DropRatioConfig(p=0.9, epsilon=0.3, temperature=5.0)
    p_hat, _ = drop_ratios(torch.tensor([0.4, 0.0, -0.2]), None, cfg)
    assert float(p_hat[1]) == 0.9                                   # zero score → p
    assert float(p_hat[0]) == pytest.approx(0.9 - 0.3 * math.tanh(0.4 / 5))  # important → lower
    assert float(p_hat[2]) > 0.9                                    # a helpful swap → drop more (D-7)
    for flat in (torch.zeros(4), torch.full((4,), 0.3)):           # zero or constant vector → p everywhere
        assert torch.equal(drop_ratios(flat, None, cfg)[0], torch.full((4,), 0.9, dtype=torch.float64))
    sig, _ = drop_ratios(torch.tensor([0.4, 0.0]), None, dataclasses.replace(cfg, activation="sigmoid_centered"))
    assert float(sig[0]) == pytest.approx(0.9 - 0.3 * (2 / (1 + math.exp(-0.08)) - 1))

    # preserve_mean_drop: parameter-count-weighted mean equals p
    scores = torch.tensor([0.9, 0.1, 0.5, -0.3])
    sizes = torch.tensor([10.0, 1000.0, 7.0, 300.0])
    keep, info = drop_ratios(scores, sizes, dataclasses.replace(cfg, preserve_mean_drop=True, normalize="max"))
    assert float((keep * sizes).sum() / sizes.sum()) == pytest.approx(0.9, abs=1e-12)
    assert info["shift"] != 0.0
    plain, _ = drop_ratios(scores, sizes, dataclasses.replace(cfg, normalize="max"))
    torch.testing.assert_close(keep - plain, torch.full((4,), info["shift"], dtype=torch.float64))

    # linear mapping: the median gets p, the ends p ± ε_lin
    lin = linear_mapping(torch.tensor([0.2, -0.1, 0.7, 0.0, 0.3]), 0.9, 0.3)
    eps = linear_window(0.9, 0.3)
    assert eps == pytest.approx(0.999 - 0.9)  # the p_max clip bounds the window (D-5)
    assert float(lin.median()) == pytest.approx(0.9)
    assert float(lin[2]) == pytest.approx(0.9 - eps) and float(lin[1]) == pytest.approx(0.9 + eps)
    assert float(lin.mean()) == pytest.approx(0.9)
    assert linear_window(0.3, 0.5) == 0.3 and linear_window(0.995, 0.3, p_max=1.0) == pytest.approx(0.005 - 1e-6)
    # at the default p_max = 0.999 the window stops there: no ratio is clipped and the mean is exactly p (budget)
    assert linear_window(0.995, 0.3) == pytest.approx(0.004)
    deep, info = drop_ratios(torch.linspace(-1, 1, 32), None, dataclasses.replace(cfg, mapping="linear", p=0.995))
    assert info["clipped"] == 0 and float(deep.max()) <= 0.999 and float(deep.mean()) == pytest.approx(0.995, abs=1e-12)
    ties = linear_mapping(torch.tensor([0.0, 0.0, 1.0]), 0.5, 0.2)  # ties: the lower index ranks lower
    assert ties.tolist() == pytest.approx([0.7, 0.5, 0.3])

    # clipping at p_max
    clipped, info = drop_ratios(torch.tensor([-1.0, 1.0]), None, dataclasses.replace(cfg, epsilon=1.0, p_max=0.95,
                                                                                      temperature=0.1))
    assert clipped.tolist() == [0.95, 0.0] and info["clipped"] == 2  # 0.9 ± tanh(10) leaves [0, p_max]

    # MI-TA weights: softmax(s / T_m), summing to one
    s = torch.tensor([0.2, -0.05, 0.4], dtype=torch.float64)
    w = mi_weights(s, 5.0)
    assert float(w.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(w, torch.exp(s / 5) / torch.exp(s / 5).sum())
    z = mi_weights(s, 5.0, "zscore")
    zs = (s - s.mean()) / s.std(unbiased=False)
    torch.testing.assert_close(z, torch.softmax(zs / 5, 0))


def test_model_level_is_dare_and_mi_weights(families, tmp_path):
    base, experts = families("llama")
    task = load_task_data(str(_write(tmp_path / "t.jsonl", ROWS)))
    other = load_task_data(str(_write(tmp_path / "o.jsonl", OTHER_ROWS)))
    coeffs = _run(base, experts, [task, other, task], level="model", weights="mi", model_temperature=0.01,
                  lambda_mi=0.5, scale_by_k=True)
    assert coeffs.fields["drop_ratio"].values.tolist() == [[0.9]] * 3
    w = coeffs.fields["weight"]
    assert w.level == "model" and w.partitions == ["model"]
    s = coeffs.scores["model"].view(-1)
    torch.testing.assert_close(w.values.view(-1), torch.softmax(s / 0.01, 0) * 0.5 * 3)
    assert float(w.values.sum()) == pytest.approx(1.5)
    # one base pass per distinct task, one clean pass per expert
    assert coeffs.stats["passes"]["forward"] == 2 + 3
    tok = AutoTokenizer.from_pretrained(str(base))
    assert float(s[1]) == pytest.approx(_gold_by_hand(_model(experts[1]), tok, OTHER_ROWS)
                                        - _gold_by_hand(_model(base), tok, OTHER_ROWS), abs=2e-6)


# ------------------------------------------------------------------------------------------------------- end to end


def test_recipe_end_to_end_and_cache(families, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEFLOW_HOME", str(tmp_path / "home"))  # a cache of our own
    base, experts = families("llama")
    tasks = [_write(tmp_path / f"t{i}.jsonl", ROWS[i:] + ROWS[:i]) for i in range(3)]
    recipe = parse_recipe({
        "merge_method": "dare_linear", "base_model": str(base),
        "models": [{"model": str(e), "task": str(t), "parameters": {"weight": 1.0}} for e, t in zip(experts, tasks)],
        "importance": {"estimator": "apl", "parameters": {"level": "layer", "epsilon": 0.5, "weights": "mi",
                                                          "nonblock_policy": "keep_unpruned"}},
    })
    est = get_estimator("apl")
    calls = []

    def counted(run):
        calls.append(run)
        return est.measure(run)

    monkeypatch.setitem(importance_base.ESTIMATORS, "apl", dataclasses.replace(est, measure=counted))
    first = merge_state_dict(recipe)
    second = merge_state_dict(recipe)
    assert len(calls) == 3  # scored expert by expert (each on its own task), once
    assert [[e.content_hash for e in c.experts] for c in calls] == [[r.content_hash] for r in map(_ref, experts)]
    assert all(torch.equal(first[n], second[n]) for n in first)  # the second merge read the cached artifact
    assert all(torch.equal(first[n], second[n]) for n in first)

    refs = [_ref(e) for e in experts]
    (coeffs,) = coefficients_for_recipe(recipe, _ref(base), refs)
    assert len(calls) == 3 and coeffs.path is not None
    assert [p.name for p in coeffs.path.parent.iterdir()] == [coeffs.key]  # one artifact, under its key
    drop = coeffs.fields["drop_ratio"]
    assert drop.partitions == ["layer.0", "layer.1", "embed", "head"]
    assert drop.values[:, 2:].abs().max() == 0 and drop.default == [0.0, 0.0, 0.0]
    assert coeffs.data["tasks"][1]["task"] == str(tasks[1]) and not coeffs.data["ood"]
    # keep_unpruned tensors are merged exactly: θ_b + Σ_t w_t Δ_t with the MI-TA weights
    w = coeffs.fields["weight"].values.view(-1)
    assert float(w.sum()) == pytest.approx(1.0)
    b, es = _weights(base), [_weights(e) for e in experts]
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        expected = b[name] + sum(float(w[i]) * (es[i][name] - b[name]) for i in range(3))
        torch.testing.assert_close(first[name], expected, rtol=1e-6, atol=1e-6)
    # block tensors are DARE-pruned with p̂ ≈ 0.9: most of their delta is gone
    name = "model.layers.0.mlp.up_proj.weight"
    kept = (first[name] - b[name]) != 0
    assert 0.1 < kept.float().mean() < 0.5  # ≈ 1 − 0.9³ of the entries keep some expert's delta


def test_out_of_domain_uses_the_target_for_every_expert(families, tmp_path):
    base, experts = families("llama")
    target = _write(tmp_path / "target.jsonl", OTHER_ROWS)
    own = [_write(tmp_path / f"own{i}.jsonl", ROWS[i:]) for i in range(3)]
    recipe = parse_recipe({
        "merge_method": "dare_linear", "base_model": str(base),
        "models": [{"model": str(e), "task": str(t)} for e, t in zip(experts, own)],
        "importance": {"estimator": "apl", "parameters": {"estimator": "grad", "weights": "mi"},
                       "data": {"target": str(target)}},
    })
    (ood,) = coefficients_for_recipe(recipe, _ref(base), [_ref(e) for e in experts])
    assert ood.data["ood"] and {t["task"] for t in ood.data["tasks"]} == {str(target)}
    # one gradient and one base probability for all experts, one clean pass each for the MI-TA model scores
    assert ood.stats["passes"] == {"forward": 1 + 1 + 3, "backward": 1}
    task = load_task_data(str(target), "fewshot", 5)
    same = _run(base, experts, [task] * 3, estimator="grad", weights="mi")
    torch.testing.assert_close(ood.scores["layer"], same.scores["layer"], rtol=0, atol=0)
    torch.testing.assert_close(ood.scores["model"], same.scores["model"], rtol=0, atol=0)
    tok = AutoTokenizer.from_pretrained(str(base))
    p_base = _gold_by_hand(_model(base), tok, OTHER_ROWS)
    for k in range(3):
        assert float(ood.scores["model"][k, 0]) == pytest.approx(
            _gold_by_hand(_model(experts[k]), tok, OTHER_ROWS) - p_base, abs=2e-6)
