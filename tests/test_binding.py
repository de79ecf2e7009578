"""Checkpoint tensors inside loaded models (docs/methods.md D-37, D-38): the fused MoE experts of transformers 5.

Golden values come from the checkpoint files themselves (read with safetensors, not through the binding) and from a
model loaded from a checkpoint edited on disk, never from the code under test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeflow.architecture import Architecture
from mergeflow.importance.base import ModelRef, compute_coefficients
from mergeflow.importance.binding import binding_for
from mergeflow.importance.data import load_task_data
from mergeflow.importance.scoring import encode, gold_probability
from mergeflow.partitions import Partitioner
from tests.tiny_models import make_family, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WEIGHTS = "model.safetensors"
ROWS = [("the quick brown fox", "jumps over the lazy dog"), ("nine plus three mod ten", "equals two"),
        ("alice went to the kitchen and", "cooked the soup")]


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("moe")
    return {family: make_family(family, root / family, n_experts=1) for family in ("mixtral", "qwen3_moe")}


def _ref(path: Path) -> ModelRef:
    return ModelRef(str(path), path, f"{path.parent.name}-{path.name}")


def _model(path: Path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_every_expert_tensor_is_bound_to_its_slice_of_the_fused_parameter(moe, family: str) -> None:
    base, _ = moe[family]
    model = _model(base)
    stored = load_file(str(base / WEIGHTS))
    binding = binding_for(model, base)
    params = dict(model.named_parameters(remove_duplicate=False))
    assert binding.fused
    assert set(binding.slots) == set(stored)
    fused = [n for n in stored if ".experts." in n]
    assert fused and all(not binding.slots[n].whole for n in fused)
    for name, tensor in stored.items():
        torch.testing.assert_close(binding.view(params, name), tensor, rtol=0, atol=0)
    # expert e's tensors sit at index e of the stacked parameter
    for name in fused:
        expert = int(name.split(".experts.")[1].split(".")[0])
        assert binding.slots[name].index[0] == expert
    # every entry of every fused parameter belongs to exactly one checkpoint tensor
    for param, names in binding.held.items():
        marks = torch.zeros_like(params[param], dtype=torch.int64)
        for n in names:
            binding.slots[n].view(marks).add_(1)
        assert bool((marks == 1).all()), param


def test_a_dense_family_binds_by_name() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        base, _ = make_family("gpt2", Path(tmp), n_experts=0)
        binding = binding_for(_model(base), base)
        stored = load_file(str(base / WEIGHTS))
    assert not binding.fused
    assert {n: s.param for n, s in binding.slots.items()} == {n: n for n in stored if stored[n].is_floating_point()}


def test_moe_partitions_give_each_routed_expert_its_own_at_the_head_level(moe) -> None:
    base, _ = moe["mixtral"]
    arch = Architecture.from_folder(base)
    heads = Partitioner(arch, "head_mlp", gqa_policy="group").partition_ids()
    assert [p for p in heads if p.startswith("layer.0.expert.")] == [f"layer.0.expert.{e}" for e in range(4)]
    router = [n for n in arch.block_tensors(0) if n.endswith("gate.weight")]
    assert [Partitioner(arch, "head_mlp", gqa_policy="group").partition(n).labels[0] for n in router] == [
        "layer.0.mlp"]
    # coarser levels keep the MoE block whole
    layer = Partitioner(arch, "attn_mlp")
    assert {layer.partition(n).labels[0] for n in arch.block_tensors(0) if ".experts." in n} == {"layer.0.mlp"}


def test_apl_causal_swap_of_a_fused_expert_block_matches_the_edited_checkpoint(moe, tmp_path: Path) -> None:
    """The causal score of block 1 equals P(expert) − P(expert with block 1's checkpoint tensors set to the base's),
    the second model built by editing the checkpoint on disk and loading it with transformers."""
    base, (expert,) = moe["mixtral"]
    task = write_jsonl(tmp_path / "t.jsonl", ROWS)
    data = load_task_data(str(task), "fewshot", 3)
    coeffs = compute_coefficients("apl", base=_ref(base), experts=[_ref(expert)], tasks=[data],
                                  params={"level": "layer"}, use_cache=False)
    scores = dict(zip(coeffs.score_partitions["layer"], coeffs.scores["layer"][0].tolist()))

    b, e = load_file(str(base / WEIGHTS)), load_file(str(expert / WEIGHTS))
    edited = {n: (b[n] if ".layers.1." in n else t).clone() for n, t in e.items()}
    folder = tmp_path / "edited"
    folder.mkdir()
    save_file(edited, str(folder / WEIGHTS), metadata={"format": "pt"})
    for f in expert.iterdir():
        if f.name != WEIGHTS and f.is_file():
            (folder / f.name).write_bytes(f.read_bytes())
    tok = AutoTokenizer.from_pretrained(str(base))
    enc = encode(tok, data.examples)
    clean = float(gold_probability(_model(expert), enc).mean())
    swapped = float(gold_probability(_model(folder), enc).mean())
    assert abs(clean - swapped) > 0  # the block matters: the check below is not 0 == 0
    assert scores["layer.1"] == pytest.approx(clean - swapped, abs=1e-6)


def test_slta_expert_modules_add_up_to_the_moe_block(moe, tmp_path: Path) -> None:
    """D-38: expert e's module is the block's output with every other expert's slots dropped, so on the base the
    experts' outputs sum to the MoE block's output, and each changes only with its own expert's weights."""
    from mergeflow.importance.linearity import _Session

    base, (expert,) = moe["mixtral"]
    data = load_task_data(str(write_jsonl(tmp_path / "t.jsonl", ROWS)), "calib", 3)
    session = _Session(base, [expert], level="head_mlp", gqa_policy="group", batch_size=3)
    try:
        [fb] = session.capture(data.examples)
        units = {u.name: u for u in session.units()}
        experts, block = units["layer.1.experts"], units["layer.1.mlp"]
        assert experts.pids == [f"layer.1.expert.{e}" for e in range(4)]
        per = experts.apply(experts.template, fb)
        whole = block.apply(block.template, fb)["layer.1.mlp"]
        torch.testing.assert_close(sum(per.values()), whole, rtol=1e-5, atol=1e-6)
        # model 1's weights of expert 2 only: only expert 2's output moves
        w = session.weights(1, experts)
        only = {n: (t if ".experts.2." in n else session.weights(0, experts)[n]) for n, t in w.items()}
        moved = experts.apply(session.instance(experts, only), fb)
        for pid in experts.pids:
            same = torch.equal(moved[pid], per[pid])
            assert same == (pid != "layer.1.expert.2"), pid
    finally:
        session.close()


def test_regmean_grams_of_routed_experts_come_from_the_tokens_routed_to_them(moe, tmp_path: Path) -> None:
    """D-38: expert e's gate/up Gram is XᵀX/n over the real tokens the router sends to e, its down projection's over
    their activations silu(X w1ᵀ) ⊙ (X w3ᵀ), computed here from the checkpoint's own w1/w3 and the router's choices
    (read off the model by a hook), independently of the estimator."""
    from safetensors import safe_open

    from mergeflow.importance.base import compute_coefficients

    _, (expert,) = moe["mixtral"]
    data = load_task_data(str(write_jsonl(tmp_path / "t.jsonl", ROWS)), "calib", 3)
    coeffs = compute_coefficients("regmean", base=None, experts=[_ref(expert)], tasks=[data],
                                  params={"alpha": 1.0}, use_cache=False)
    with safe_open(str(coeffs.path / "entry" / "gram" / "0.safetensors"), framework="pt") as f:
        grams = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118

    model = _model(expert)
    stored = load_file(str(expert / WEIGHTS))
    seen: dict[str, torch.Tensor] = {}
    block = model.model.layers[1].mlp
    h1 = block.gate.register_forward_hook(lambda _m, args, out: seen.update(x=args[0], chosen=out[2]))
    enc = encode(AutoTokenizer.from_pretrained(str(expert)), data.examples, answer_only=False)
    with torch.no_grad():
        model(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    h1.remove()
    real = enc.attention_mask.bool().reshape(-1)
    prefix = "model.layers.1.block_sparse_moe."
    x_all = seen["x"][real]
    torch.testing.assert_close(grams[prefix + "gate.weight"], x_all.T @ x_all / len(x_all))
    reached = 0
    for e in range(4):
        x = seen["x"][(seen["chosen"] == e).any(-1) & real]
        name = f"{prefix}experts.{e}."
        if len(x) == 0:
            assert name + "w1.weight" not in grams
            continue
        reached += 1
        torch.testing.assert_close(grams[name + "w1.weight"], x.T @ x / len(x))
        torch.testing.assert_close(grams[name + "w3.weight"], x.T @ x / len(x))
        inner = torch.nn.functional.silu(x @ stored[name + "w1.weight"].T) * (x @ stored[name + "w3.weight"].T)
        torch.testing.assert_close(grams[name + "w2.weight"], inner.T @ inner / len(inner), rtol=1e-4, atol=1e-6)
    assert reached >= 2


def test_adamerging_learns_one_coefficient_per_expert_tensor_inside_fused_parameters(moe, tmp_path: Path) -> None:
    """At the matrix level every checkpoint tensor is a partition (D-38), also those a fused parameter holds: each
    gets its own coefficient, and its gradient reaches it through the slot (D-37). With lr 0 the coefficients stay at
    init; with a step each expert tensor that took part moves on its own."""
    base, (expert,) = moe["qwen3_moe"]
    data = load_task_data(str(write_jsonl(tmp_path / "t.jsonl", ROWS)), "calib", 3)
    arch = Architecture.from_folder(base)
    fused = [n for n in arch.tensors if ".experts." in n]
    params = {"level": "matrix", "steps": 1, "batch_size": 3, "lr": 0.05, "init": 0.5}
    coeffs = compute_coefficients("adamerging", base=_ref(base), experts=[_ref(expert)], tasks=[data],
                                  params=params, use_cache=False)
    field = coeffs.fields["weight"]
    assert set(fused) <= set(field.partitions)
    values = dict(zip(field.partitions, field.values[0].tolist()))
    # Adam's first step moves a coefficient by at most lr, by about lr where its gradient is not tiny: the routed
    # experts' tensors got theirs through the fused parameters' slots
    assert all(abs(values[n] - 0.5) <= 0.05 * (1 + 1e-4) for n in fused)
    assert any(abs(values[n] - 0.5) == pytest.approx(0.05, rel=1e-2) for n in fused)


def test_fisher_of_a_fused_expert_tensor_is_its_slice_of_the_parameters_fisher(moe, tmp_path: Path) -> None:
    """D-37, reading: the Fisher entry of ``experts.e.w1`` is rows 0..I-1 of expert e in ``gate_up_proj``'s Fisher
    (``w3`` the rows after; transformers' conversion concatenates gate then up), ``w2`` is ``down_proj[e]``, the
    router keeps its checkpoint name; the fused parameters' own names are not written. The reference is the
    one-backward-per-example loop of the Fisher tests, over the loaded model's parameters."""
    from safetensors import safe_open

    from tests.test_importance_fisher import _reference_fisher

    _, (expert,) = moe["mixtral"]
    data = load_task_data(str(write_jsonl(tmp_path / "t.jsonl", ROWS)), "calib", 3)
    coeffs = compute_coefficients("fisher", base=None, experts=[_ref(expert)], tasks=[data],
                                  params={"fisher": "empirical", "batch_size": 1, "minimal_fisher_weight": 0.0},
                                  use_cache=False)
    with safe_open(str(coeffs.path / "entry" / "weight" / "0.safetensors"), framework="pt") as f:
        weight = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118
    assert not [n for n in weight if n.endswith(("gate_up_proj", "down_proj"))]
    model = _model(expert)
    reference = _reference_fisher(model, AutoTokenizer.from_pretrained(str(expert)), ROWS, seed=None)
    inter = model.config.intermediate_size
    for layer in range(2):
        fused, stored = f"model.layers.{layer}.mlp.experts.", f"model.layers.{layer}.block_sparse_moe."
        torch.testing.assert_close(weight[stored + "gate.weight"], reference[f"model.layers.{layer}.mlp.gate.weight"])
        for e in range(4):
            gate_up, down = reference[fused + "gate_up_proj"][e], reference[fused + "down_proj"][e]
            torch.testing.assert_close(weight[f"{stored}experts.{e}.w1.weight"], gate_up[:inter])
            torch.testing.assert_close(weight[f"{stored}experts.{e}.w3.weight"], gate_up[inter:])
            torch.testing.assert_close(weight[f"{stored}experts.{e}.w2.weight"], down)
