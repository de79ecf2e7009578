"""SLTA (submodule-linearity task arithmetic): closed form, features, fallbacks, metrics, end to end (docs/methods.md §4)."""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeflow.architecture import Architecture
from mergeflow.checkpoints import resolve
from mergeflow.engine import merge_state_dict
from mergeflow.errors import ArchitectureError
from mergeflow.importance.base import ModelRef, compute_coefficients
from mergeflow.importance.data import Example, load_task_data
from mergeflow.importance.linearity import (
    ModuleSystem,
    capture_features,
    module_systems,
    nls_of_path,
    nonlinearity_score,
    projection_distance,
    sample_grams,
    slta_system,
    solve_alpha,
)
from mergeflow.importance.recipes import coefficients_for_recipe
from mergeflow.importance.scoring import encode
from mergeflow.partitions import Partitioner
from mergeflow.recipe import parse_recipe
from tests.tiny_models import write_jsonl

ROWS = [
    [("the quick brown", "fox jumps"), ("quick brown fox", "jumps over the lazy dog"), ("the lazy", "dog")],
    [("merging fine tuned", "language models"), ("task vectors", "merging models"), ("fine tuned", "models")],
    [("alice went to", "the kitchen"), ("alice cooked", "the soup"), ("the kitchen", "soup")],
]
TASKS = [[Example(p, a) for p, a in rows] for rows in ROWS]
WEIGHTS = "model.safetensors"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _variant(base, out, edits):
    """A copy of checkpoint ``base`` at ``out`` with some tensors replaced."""
    shutil.copytree(base, out)
    state = load_file(str(base / WEIGHTS))
    state.update({k: v.contiguous() for k, v in edits.items()})
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt"})
    return out


def _ref(path):
    return ModelRef(str(path), path, resolve(str(path)).content_hash)


# ------------------------------------------------------------------------------------------------- numerical core


def test_grams_and_system_follow_the_equations():
    gen = torch.Generator().manual_seed(0)
    deltas = torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    deltas[:, 1, 4] = math.nan  # a pad position may hold anything
    g = sample_grams(deltas, mask)
    for x in range(4):
        n = int(mask[x].sum())
        flat = deltas[:, x, :n].reshape(3, -1)
        torch.testing.assert_close(g[x], flat @ flat.T)
    tasks = [g[:2], g[2:], g[1:3]]
    for balanced in (True, False):
        s = slta_system(tasks, balanced=balanced)
        for a, ga in enumerate(tasks):
            c = torch.diagonal(ga, dim1=1, dim2=2).mean(-1) if balanced else torch.ones(len(ga), dtype=torch.float64)
            torch.testing.assert_close(s.B[a], (ga / c.view(-1, 1, 1)).mean(0))
        torch.testing.assert_close(s.A, s.B.sum(0))
        torch.testing.assert_close(s.b, torch.stack([sum(s.B[a, j, a] for a in range(3)) for j in range(3)]))
        # α minimises Σ_a mean_x ‖Σ_t α_t Δf_t − Δf_a‖² / c(x): the gradient vanishes there
        alpha = solve_alpha(s).alpha
        assert alpha is not None
        torch.testing.assert_close(s.A @ alpha, s.b)


def test_balanced_and_plain_agree_when_every_sample_has_the_same_norm():
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(5, 7)
    grams = []
    for _ in range(3):
        d = torch.randn(3, 5, 7, 4, generator=gen, dtype=torch.float64)
        c = d.pow(2).sum((0, 2, 3)) / 3                      # (1/K) Σ_t ‖Δf_t(x)‖² per sample
        grams.append(sample_grams(d * (4.0 / c).sqrt().view(1, -1, 1, 1), mask))   # now c(x) = 4 for every x
    bal = solve_alpha(slta_system(grams, balanced=True))
    plain = solve_alpha(slta_system(grams, balanced=False))
    torch.testing.assert_close(bal.alpha, plain.alpha, rtol=1e-12, atol=1e-12)
    # different norms per sample: the two objectives differ
    scaled = [g * torch.linspace(0.1, 10.0, len(g), dtype=torch.float64).view(-1, 1, 1) for g in grams]
    a1 = solve_alpha(slta_system(scaled, balanced=True)).alpha
    a2 = solve_alpha(slta_system(scaled, balanced=False)).alpha
    assert not torch.allclose(a1, a2, rtol=1e-3)
    torch.testing.assert_close(a1, bal.alpha)  # balancing undoes a per-sample scale


def test_solver_fallbacks():
    def system(a, b):
        a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        return ModuleSystem(torch.zeros(len(b), len(b), len(b)), a, b, [1] * len(b))

    s = solve_alpha(system([[2.0, 1.0], [1.0, 2.0]], [3.0, 3.0]))
    assert s.method == "solve" and s.alpha.tolist() == pytest.approx([1.0, 1.0]) and s.condition == pytest.approx(3.0)
    # an expert whose Δf ≡ 0 gets α = 1 and leaves the system
    s = solve_alpha(system([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 2.0]], [1.0, 0.0, 2.0]))
    assert s.zero.tolist() == [False, True, False] and s.method == "solve"
    assert s.alpha.tolist() == pytest.approx([0.0, 1.0, 1.0])
    # two collinear experts: singular, minimum-norm least squares splits the weight
    s = solve_alpha(system([[1.0, 1.0], [1.0, 1.0]], [2.0, 2.0]))
    assert s.method == "lstsq" and s.condition > 1e12 and s.alpha.tolist() == pytest.approx([1.0, 1.0])
    # ill-conditioned beyond cond_max: lstsq, same answer on a consistent system
    s = solve_alpha(system([[2.0, 1.0], [1.0, 2.0]], [3.0, 3.0]), cond_max=2.0)
    assert s.method == "lstsq" and s.alpha.tolist() == pytest.approx([1.0, 1.0])
    # nothing changes: all ones, no system
    s = solve_alpha(system([[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0]))
    assert s.method == "none" and s.alpha.tolist() == [1.0, 1.0] and math.isnan(s.condition)


def test_nls_of_a_path():
    line = torch.linspace(0, 1, 11, dtype=torch.float64).view(-1, 1) * torch.tensor([[3.0, -1.0, 2.0]])
    assert nls_of_path(line) == pytest.approx(0.0, abs=1e-24)
    bent = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])  # N = 2: D01 = D12 = 1, D02 = √2
    assert nls_of_path(bent) == pytest.approx(4 * (1 / math.sqrt(2) - 0.5) ** 2)
    assert math.isnan(nls_of_path(torch.zeros(3, 4)))


# ------------------------------------------------------------------------------------------------- features


def test_captured_inputs_reproduce_the_base_forward(families):
    base, _ = families("llama")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(base))
    enc = encode(tok, [ex for t in TASKS for ex in t], answer_only=False)
    assert (enc.lengths < enc.input_ids.shape[1]).any()  # right padding is exercised
    [fb] = capture_features(model, enc.input_ids, enc.attention_mask, batch_size=16)
    mask = fb.mask
    assert {"attention_mask", "position_embeddings", "position_ids"} <= set(fb.layer_kwargs[0])
    layers = model.model.layers
    with torch.no_grad():
        torch.testing.assert_close(fb.layer_inputs[0], model.model.embed_tokens(fb.input_ids))
        for i, layer in enumerate(layers):
            out = layer(fb.layer_inputs[i], use_cache=False, **fb.layer_kwargs[i])
            out = out[0] if isinstance(out, tuple) else out
            following = fb.layer_inputs[i + 1] if i + 1 < len(layers) else fb.final_input
            torch.testing.assert_close(out[mask], following[mask], rtol=1e-6, atol=1e-6)
            attn = layer.self_attn(layer.input_layernorm(fb.layer_inputs[i]), **fb.layer_kwargs[i])[0]
            torch.testing.assert_close((fb.layer_inputs[i] + attn)[mask], fb.mlp_inputs[i][mask], rtol=1e-6,
                                       atol=1e-6)
        logits = model(input_ids=fb.input_ids, attention_mask=fb.attention_mask, use_cache=False).logits
        head = model.lm_head(model.model.norm(fb.final_input))
        torch.testing.assert_close(head[mask], logits[mask], rtol=1e-5, atol=1e-5)


def test_system_equals_an_independent_computation(families):
    """B, A, b of one block and of the LM head, from whole models with one module swapped in, one sample at a time."""
    base, experts = families("llama")
    systems = module_systems(base, experts, TASKS, level="layer", modules=["layer.0", "head"], batch_size=2)
    assert set(systems) == {"layer.0", "head"}
    tok = AutoTokenizer.from_pretrained(str(base))
    base_model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    states = [load_file(str(e / WEIGHTS)) for e in experts]
    for pid, prefixes, read in (("layer.0", ("model.layers.0.",), lambda o: o.hidden_states[1]),
                                ("head", ("model.norm.", "lm_head."), lambda o: o.logits)):
        hybrids = []
        for state in states:
            m = copy.deepcopy(base_model)
            m.load_state_dict({n: t for n, t in state.items() if n.startswith(prefixes)}, strict=False)
            hybrids.append(m)
        big_b = torch.zeros(3, 3, 3, dtype=torch.float64)
        for a, task in enumerate(TASKS):
            for ex in task:
                ids = encode(tok, [ex], answer_only=False).input_ids
                with torch.no_grad():
                    f0 = read(base_model(input_ids=ids, output_hidden_states=True)).double()
                    d = [(read(m(input_ids=ids, output_hidden_states=True)).double() - f0).flatten() for m in hybrids]
                g = torch.stack([torch.stack([di @ dj for dj in d]) for di in d])
                big_b[a] += g / (torch.diagonal(g).sum() / 3) / len(task)
        s = systems[pid]
        torch.testing.assert_close(s.B, big_b, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(s.A, big_b.sum(0), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(s.b, big_b[0, :, 0] + big_b[1, :, 1] + big_b[2, :, 2], rtol=1e-4, atol=1e-9)
        assert s.method == "solve" and s.n_samples == [3, 3, 3]


# ------------------------------------------------------------------------------------------------- known answers


def test_exact_weights_when_each_expert_changes_only_what_its_own_task_reads(families, tmp_path):
    """The embedding is exactly linear in its weights. Expert t moves only the embedding rows of tokens that occur in
    task t alone: on its own data Δf_t is its full change, on the other tasks' data it is 0, so TA with α = 1
    reproduces every expert and the closed form must give exactly 1; every other module is untouched (D-22: α = 1)."""
    base, _ = families("llama")
    tok = AutoTokenizer.from_pretrained(str(base))
    seen = []
    for task in TASKS:
        enc = encode(tok, task, answer_only=False)
        seen.append(set(enc.input_ids[enc.attention_mask.bool()].tolist()))
    own = [sorted(s - set().union(*(o for j, o in enumerate(seen) if j != t))) for t, s in enumerate(seen)]
    assert all(own)
    embed = load_file(str(base / WEIGHTS))["model.embed_tokens.weight"]
    gen = torch.Generator().manual_seed(7)
    experts = []
    for t, rows in enumerate(own):
        e = embed.clone()
        e[rows] += 0.05 * torch.randn(len(rows), e.shape[1], generator=gen)
        experts.append(_variant(base, tmp_path / f"e{t}", {"model.embed_tokens.weight": e}))
    systems = module_systems(base, experts, TASKS, level="attn_mlp", batch_size=2)
    s = systems["embed"]
    assert s.method == "solve"
    assert torch.count_nonzero(s.A - torch.diag(torch.diagonal(s.A))) == 0
    torch.testing.assert_close(s.alpha, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert set(systems) == set(Partitioner(Architecture.from_folder(base), "attn_mlp").partition_ids())
    for pid, s in systems.items():
        if pid != "embed":
            assert s.method == "none" and bool(s.zero.all()) and s.alpha.tolist() == [1.0, 1.0, 1.0], pid


def test_experts_scored_on_the_same_data_get_equal_weights(families):
    """With one data set for all, Σ_a ‖v − Δf_a‖² = K ‖v − mean_a Δf_a‖² + const, so α = 1/K for any module."""
    base, experts = families("llama")
    shared = TASKS[0] + TASKS[1]
    for balanced in (True, False):
        systems = module_systems(base, experts, [shared] * 3, level="layer", balanced=balanced, batch_size=4)
        for pid, s in systems.items():
            assert s.method == "solve", pid
            torch.testing.assert_close(s.alpha, torch.full((3,), 1 / 3, dtype=torch.float64), rtol=0, atol=1e-9)


def test_singular_systems_fall_back(families, tmp_path):
    """Two identical experts (collinear changes: lstsq, equal split) and one identical to the base (α = 1)."""
    base, experts = families("llama")
    frozen = shutil.copytree(base, tmp_path / "frozen")
    systems = module_systems(base, [experts[0], experts[0], frozen], TASKS, level="layer", batch_size=2)
    for pid, s in systems.items():
        assert s.zero.tolist() == [False, False, True], pid
        assert s.method == "lstsq" and s.condition > 1e12, pid
        assert float(s.alpha[2]) == 1.0
        torch.testing.assert_close(s.alpha[0], s.alpha[1], rtol=1e-9, atol=0)
        torch.testing.assert_close(s.A[:2, :2] @ s.alpha[:2], s.b[:2], rtol=1e-9, atol=0)


def test_head_level(families, tmp_path):
    base, experts = families("mistral")
    tasks = [load_task_data(str(write_jsonl(tmp_path / f"t{i}.jsonl", rows))) for i, rows in enumerate(ROWS)]
    kw = {"base": _ref(base), "experts": [_ref(e) for e in experts], "tasks": tasks, "use_cache": False}
    with pytest.raises(ArchitectureError, match="gqa_policy"):
        compute_coefficients("slta", params={"level": "head_mlp"}, **kw)
    art = compute_coefficients("slta", params={"level": "head_mlp", "gqa_policy": "group"}, **kw)
    f = art.fields["weight"]
    part = Partitioner(Architecture.from_folder(base), "head_mlp", gqa_policy="group")
    assert f.partitions == part.partition_ids() and f.gqa_policy == "group"
    assert "layer.1.group.1" in f.partitions and torch.isfinite(f.values).all()

    # MHA: an expert that moves only head 0's o_proj columns in block 1. The head's output W_o[:, h] z_h has base
    # z_h, so it is exactly linear in that delta (NLS = 0) and no other module sees a change.
    base, experts = families("llama")
    name = "model.layers.1.self_attn.o_proj.weight"
    w = load_file(str(base / WEIGHTS))[name].clone()
    w[:, :8] += 0.05 * torch.randn(w.shape[0], 8, generator=torch.Generator().manual_seed(3))
    moved = _variant(base, tmp_path / "o_head0", {name: w})
    systems = module_systems(base, [moved, experts[1]], TASKS[:2], level="head_mlp", batch_size=3)
    assert systems["layer.1.head.0"].zero.tolist() == [False, False]
    for pid in ("layer.1.head.1", "layer.1.head.3", "layer.1.attn_norm", "layer.1.mlp", "layer.0.head.0", "embed"):
        assert systems[pid].zero.tolist() == [True, False], pid
    nls = nonlinearity_score(base, moved, TASKS[0], level="head_mlp", modules=["layer.1.head.0", "layer.0.head.0"],
                             dtype=torch.float64)
    assert nls["layer.1.head.0"].mean == pytest.approx(0.0, abs=1e-12)
    assert nls["layer.0.head.0"].skipped == 3  # unchanged: D_N0 = 0 on every sample


def test_nonlinearity_and_projection(families):
    base, experts = families("llama")
    nls = nonlinearity_score(base, experts[0], TASKS[0], level="attn_mlp", dtype=torch.float64)
    assert nls["embed"].mean == pytest.approx(0.0, abs=1e-12) and nls["embed"].values.numel() == 3
    for pid in ("layer.0.attn", "layer.0.mlp", "layer.1.attn", "layer.1.mlp"):
        assert nls[pid].mean > 1e-4 and nls[pid].std >= 0.0, pid
    alpha = [0.3, 0.5, 0.7]
    proj = projection_distance(base, experts, TASKS, alpha, level="attn_mlp", modules=["embed", "layer.1.mlp"],
                               dtype=torch.float64)
    assert set(proj) == {"embed", "layer.1.mlp"}
    assert proj["embed"].distance == pytest.approx(0.0, abs=1e-12)
    assert proj["embed"].cos_merge == pytest.approx(1.0, abs=1e-12)
    assert proj["embed"].n_samples == 9
    mlp = proj["layer.1.mlp"]
    assert 0.0 < mlp.distance < 1.0 and 0.0 < mlp.cos_merge < 1.0 and -1.0 <= mlp.cos_base <= 1.0


# ------------------------------------------------------------------------------------------------- end to end


def test_recipe_end_to_end(families, tmp_path):
    base, experts = families("llama")
    files = [write_jsonl(tmp_path / f"t{i}.jsonl", rows) for i, rows in enumerate(ROWS)]
    recipe = parse_recipe({
        "merge_method": "task_arithmetic", "base_model": str(base),
        "models": [{"model": str(e), "task": str(f)} for e, f in zip(experts, files)],
        "importance": {"estimator": "slta", "parameters": {"level": "layer", "batch_size": 2}, "data": {"n": 3}},
    })
    merged = merge_state_dict(recipe)
    [art] = coefficients_for_recipe(recipe, _ref(base), [_ref(e) for e in experts])  # the cached artifact
    f = art.fields["weight"]
    assert f.level == "layer" and f.partitions == ["embed", "layer.0", "layer.1", "head"]
    assert art.stats["passes"]["forward"] == 6  # one base forward per batch: 3 tasks × 2 batches
    assert art.stats["module_passes"] == 4 * 3 * 2 * 4  # modules × tasks × batches × (K + 1) models
    torch.testing.assert_close(art.scores["alpha_raw"], f.values)

    systems = module_systems(base, experts, [load_task_data(str(p), n=3).examples for p in files], level="layer")
    for j, pid in enumerate(f.partitions):
        torch.testing.assert_close(f.values[:, j], systems[pid].alpha, rtol=1e-6, atol=1e-9)
        assert float(art.scores["condition"][j]) == pytest.approx(systems[pid].condition, rel=1e-4)

    part = Partitioner(Architecture.from_folder(base), "layer")
    b = load_file(str(base / WEIGHTS))
    es = [load_file(str(e / WEIGHTS)) for e in experts]
    for name in b:
        w = f.values[:, f.partitions.index(part.partition(name).labels[0])]
        expected = b[name] + sum(float(w[i]) * (es[i][name] - b[name]) for i in range(3))
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-6)

    # fixed weight for the non-block modules, clipping of the solved ones only
    tasks = [load_task_data(str(p), n=3) for p in files]
    clipped = compute_coefficients("slta", base=_ref(base), experts=[_ref(e) for e in experts], tasks=tasks,
                                   params={"level": "layer", "nonmodule": "task_arithmetic", "nonmodule_lambda": 0.7,
                                           "clip_alpha_high": 0.3}, use_cache=False)
    g = clipped.fields["weight"]
    assert g.partitions == ["embed", "layer.0", "layer.1", "head"]
    assert g.values[:, [0, 3]].eq(0.7).all()
    raw = torch.stack([systems[p].alpha for p in ("layer.0", "layer.1")], 1)
    torch.testing.assert_close(g.values[:, 1:3], raw.clamp(max=0.3), rtol=1e-6, atol=1e-9)
