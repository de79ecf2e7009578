"""LoRA adapters (PEFT folders) as experts, checked against PEFT itself: every tensor the engine reads for an adapter
expert equals PEFT's ``merge_and_unload()`` of the same adapter (ranks, lora_alpha, rslora, rank/alpha patterns,
attention, MLP, embeddings, modules_to_save, GPT-2's fan_in_fan_out), in the merge, the task vector, the importance
estimators' model and ``mergeflow check``; adapters we do not apply and adapters that do not fit their base are
refused in one line before any tensor is read."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergeflow.adapters import ADAPTER_CONFIG, LoraReader
from mergeflow.checkpoints import content_hash, open_checkpoint, resolve
from mergeflow.engine import merge_state_dict
from mergeflow.errors import AdapterError, AdapterMismatchError, RecipeError
from mergeflow.graph import resolve_nodes
from mergeflow.importance.base import ImportanceRun, ModelRef
from mergeflow.pipeline import resolve_stage, task_vectors_stage
from mergeflow.recipe import parse_recipe
from tests.cli_helpers import cli, keep_sigterm, refused  # noqa: F401 (keep_sigterm: autouse fixture)
from tests.tiny_models import make_expert, make_model
from tests.zoo_fixtures import test_zoo  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# family -> LoraConfig arguments: every feature PEFT's merge applies, across the three layouts
CASES = {
    "llama": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj", "embed_tokens"],
              "rank_pattern": {"down_proj": 2, "layers.1.self_attn.q_proj": 6}, "alpha_pattern": {"o_proj": 3},
              "modules_to_save": ["lm_head"]},
    "qwen2": {"r": 8, "lora_alpha": 4, "use_rslora": True, "target_modules": ["q_proj", "v_proj", "gate_proj",
                                                                              "embed_tokens"]},
    "gpt2": {"r": 4, "lora_alpha": 16, "fan_in_fan_out": True, "target_modules": ["c_attn", "c_proj", "c_fc", "wte"]},
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("lora_bases")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = make_model(family, root / family, seed=0)
        return built[family]

    return get


def make_adapter(base: Path, out: Path, *, seed: int = 0, config: type | None = None, **kwargs) -> dict:
    """Save a PEFT adapter of ``base`` whose factors are all nonzero and return PEFT's merge_and_unload() of it."""
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    adapted = peft.get_peft_model(model, (config or peft.LoraConfig)(task_type="CAUSAL_LM", **kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_" in name or "modules_to_save" in name or "ia3_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)  # PEFT initialises B (or A) to zero
    adapted.save_pretrained(out)
    if config is not None:
        return {}
    return {k: v.detach().clone() for k, v in adapted.merge_and_unload().state_dict().items()}


def materialize(base: Path, state: dict, out: Path) -> Path:
    """PEFT's merged model written out as a full checkpoint (what an adapter expert must equal), with the base's
    tokenizer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.load_state_dict(state)
    model.save_pretrained(out)
    for f in Path(base).iterdir():  # the tokenizer files
        if f.is_file() and not (out / f.name).exists():
            (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("lora_adapters")
    built: dict[str, tuple[Path, dict]] = {}

    def get(family: str) -> tuple[Path, dict]:
        if family not in built:
            built[family] = (root / family, make_adapter(bases(family), root / family, **CASES[family]))
        return built[family]

    return get


@pytest.mark.parametrize("family", sorted(CASES))
def test_adapter_expert_equals_peft_merge_and_unload(bases, adapters, family: str) -> None:
    base = bases(family)
    folder, merged = adapters(family)
    snap = resolve(f"{base}+{folder}")
    assert snap.format == "lora" and snap.adapter_base is not None and snap.adapter_base.path == base.resolve()
    # the expert's identity is that of (its base, its adapter)
    adapter_hash = content_hash(folder, [ADAPTER_CONFIG, "adapter_model.safetensors"])
    expected = hashlib.sha256(f"lora\0{snap.adapter_base.content_hash}\0{adapter_hash}".encode()).hexdigest()
    assert snap.content_hash == "sha256:" + expected
    stored = load_file(base / "model.safetensors")
    reader = open_checkpoint(snap)
    try:
        assert isinstance(reader, LoraReader)
        assert set(reader.specs) == set(stored)
        changed = 0
        for name in stored:
            got = reader.get(name)
            assert got.shape == merged[name].shape, name
            assert torch.allclose(got, merged[name], atol=1e-6, rtol=0), name
            changed += not torch.equal(merged[name], stored[name])
        assert sorted(reader.adapted) == sorted(n for n in stored if not torch.equal(merged[n], stored[n]))
        assert changed == len(reader.adapted) >= 7  # attention, MLP and embedding tensors of both layers
    finally:
        reader.close()


def test_scale_follows_rank_alpha_patterns_and_rslora(adapters) -> None:
    from mergeflow.adapters import LoraAdapter

    llama = LoraAdapter.read(adapters("llama")[0])
    assert llama.modules["model.layers.0.mlp.down_proj"].rank == 2
    assert llama.modules["model.layers.1.self_attn.q_proj"].rank == 6
    assert llama.modules["model.layers.0.self_attn.q_proj"].scale == 8 / 4
    assert llama.modules["model.layers.0.self_attn.o_proj"].scale == 3 / 4
    assert llama.modules["model.layers.0.mlp.down_proj"].scale == 8 / 2
    assert llama.modules["model.embed_tokens"].embedding
    # modules_to_save, and the targeted embedding's layer, which PEFT saves whole beside its factors
    assert set(llama.replaced) == {"lm_head.weight", "model.embed_tokens.weight"}
    qwen = LoraAdapter.read(adapters("qwen2")[0])
    assert {m.scale for m in qwen.modules.values()} == {4 / math.sqrt(8)}


def test_mixed_recipe_merges_as_the_materialized_experts(bases, adapters, tmp_path: Path) -> None:
    """One full expert, one adapter folder on the recipe's base, one BASE+ADAPTER: the merge equals the merge of
    PEFT's merged models saved as full checkpoints."""
    base = bases("llama")
    full = make_expert(base, tmp_path / "full", seed=7)
    lora, merged = adapters("llama")
    second = tmp_path / "lora2"
    merged2 = make_adapter(base, second, seed=3, r=2, lora_alpha=2, target_modules=["q_proj", "up_proj"])
    materialized = [materialize(base, state, tmp_path / f"materialized{i}") for i, state in enumerate((merged, merged2))]

    def recipe(models: list[str]):
        return parse_recipe({"merge_method": "ties", "base_model": str(base), "parameters": {"lambda": 0.9},
                             "models": [{"model": m, "parameters": {"weight": w, "density": 0.6}}
                                        for m, w in zip(models, (0.5, 0.3, 0.7))]}, recipe_dir=tmp_path)

    mixed = recipe([str(full), str(lora), f"{base}+./lora2"])
    # only the plain adapter folder is resolved against the recipe's base; BASE+ADAPTER names its own
    _, nodes = resolve_nodes(mixed)
    assert [n.adapter_base for n in nodes] == [None, str(base), None]
    assert "adapter_base" not in nodes[0].parameters() and nodes[1].parameters()["adapter_base"] == str(base)
    got = merge_state_dict(mixed)
    want = merge_state_dict(recipe([str(full), str(materialized[0]), str(materialized[1])]))
    assert set(got) == set(want)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6, rtol=0), name


def test_task_vector_of_an_adapter_is_scale_b_a(bases, adapters) -> None:
    base = bases("gpt2")
    folder, merged = adapters("gpt2")
    base_manifest = resolve_stage(str(base))
    expert = resolve_stage(str(folder), adapter_base=str(base))
    assert expert.adapter_base is not None and expert.adapter_base.content_hash == base_manifest.content_hash
    assert expert.snapshot() == resolve(str(folder), adapter_base=str(base))
    # a full checkpoint's manifest identity (and so every cache key downstream) is what it was before adapters
    assert "adapter_base" not in base_manifest.identity()
    assert expert.identity()["adapter_base"] == base_manifest.identity()
    summary = task_vectors_stage(base_manifest, expert)
    stored = load_file(base / "model.safetensors")
    expected = math.sqrt(sum(float((merged[n] - stored[n]).double().pow(2).sum()) for n in stored))
    assert summary.l2_norm == pytest.approx(expected, rel=1e-5)
    assert summary.expert_hash == expert.content_hash


def test_importance_estimators_load_the_adapted_model(bases, adapters) -> None:
    base = bases("qwen2")
    folder, merged = adapters("qwen2")
    snap = resolve(f"{base}+{folder}")
    run = ImportanceRun("test", None, [ModelRef(snap.reference, snap.path, snap.content_hash,
                                                adapter_base=snap.adapter_base.path)], [], {})
    model = run.load_model(run.experts[0])
    for name, tensor in model.state_dict().items():
        assert torch.allclose(tensor, merged[name], atol=1e-6, rtol=0), name
    assert run.tokenizer() is not None  # the base's tokenizer: the adapter folder has none


def test_weight_reading_estimators_read_the_adapted_weights(bases, adapters, tmp_path: Path) -> None:
    """SLTA reads expert tensors through readers, not loaded models: an adapter expert gives the coefficients its
    materialised copy gives."""
    from mergeflow.importance.base import compute_coefficients
    from mergeflow.importance.data import load_task_data
    from tests.tiny_models import write_jsonl

    base = bases("llama")
    folder, merged = adapters("llama")
    full = make_expert(base, tmp_path / "full", seed=9)
    copy = materialize(base, merged, tmp_path / "materialized")
    tasks = [load_task_data(str(write_jsonl(tmp_path / f"t{i}.jsonl", rows))) for i, rows in enumerate(
        [[("the quick brown", "fox jumps"), ("the lazy", "dog")], [("alice went to", "the kitchen"),
                                                                   ("alice cooked", "the soup")]])]

    def ref(path: Path, adapter_base: Path | None = None) -> ModelRef:
        snap = resolve(path, adapter_base=adapter_base)
        return ModelRef(str(path), snap.path, snap.content_hash, adapter_base=adapter_base)

    def weights(expert: ModelRef) -> torch.Tensor:
        art = compute_coefficients("slta", base=ref(base), experts=[expert, ref(full)], tasks=tasks,
                                   params={"level": "layer", "batch_size": 2}, use_cache=False)
        return art.fields["weight"].values

    got, want = weights(ref(folder, base)), weights(ref(copy))
    assert torch.isfinite(want).all() and not torch.equal(want[0], want[1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_check_reports_adapter_experts(bases, adapters, tmp_path: Path) -> None:
    base = bases("llama")
    folder, _ = adapters("llama")
    full = make_expert(base, tmp_path / "full", seed=5)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {full}\n"
                      f"  - model: {folder}\n")
    result = cli("check", str(recipe))
    assert result.exit_code == 0, result.output
    assert "LoRA adapter (rank [2, 4, 6], lora_alpha 8" in result.output
    assert f"applied to {base}" in result.output and "compatible" in result.output
    report = json.loads(cli("check", "--json", str(recipe)).output)
    described = [m["adapter"] for m in report["models"]]
    assert described[:2] == [None, None]  # the base and the full expert
    assert described[2]["modules"] == 2 * 7 + 1 and described[2]["replaced"] == 2 and described[2]["embeddings"] == 1


def test_adapters_we_do_not_apply_are_refused(bases, tmp_path: Path) -> None:
    import peft

    base = bases("llama")
    make_adapter(base, tmp_path / "dora", config=peft.LoraConfig, r=2, target_modules=["q_proj"], use_dora=True)
    make_adapter(base, tmp_path / "ia3", config=peft.IA3Config, target_modules=["k_proj", "down_proj"],
                 feedforward_modules=["down_proj"])
    for name, needle in (("dora", "DoRA"), ("ia3", "IA3")):
        with pytest.raises(AdapterError, match=needle):
            resolve(f"{base}+{tmp_path / name}")
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: ./{name}\n")
        refused(cli("check", str(recipe)), needle)
    # an adapter config edited to something we do not apply, with weights that would otherwise load
    lora = tmp_path / "biased"
    make_adapter(base, lora, config=peft.LoraConfig, r=2, target_modules=["q_proj"])
    config = json.loads((lora / ADAPTER_CONFIG).read_text())
    (lora / ADAPTER_CONFIG).write_text(json.dumps({**config, "lora_bias": True}))
    with pytest.raises(AdapterError, match="LoRA biases"):
        resolve(f"{base}+{lora}")


def test_adapter_whose_base_does_not_match_is_refused(bases, adapters, tmp_path: Path) -> None:
    folder, _ = adapters("llama")
    with pytest.raises(AdapterMismatchError, match="does not match its base"):  # GQA: k_proj is [16, 32] there
        resolve(f"{bases('mistral')}+{folder}")
    with pytest.raises(AdapterMismatchError, match="the base has no tensor"):
        resolve(f"{bases('gpt2')}+{folder}")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {bases('mistral')}\nmodels:\n  - model: {folder}\n")
    refused(cli("merge", str(recipe), str(tmp_path / "out")), "does not match its base")
    assert not (tmp_path / "out").exists()


def test_an_adapter_needs_the_model_it_applies_to(bases, adapters, tmp_path: Path) -> None:
    folder, _ = adapters("llama")
    base = bases("llama")
    with pytest.raises(RecipeError, match=r"models\[0\].model: .* is a LoRA adapter"):
        parse_recipe({"merge_method": "linear", "models": [{"model": str(folder)}, {"model": str(base)}]})
    with pytest.raises(RecipeError, match=r"base_model: .* is a LoRA adapter"):
        parse_recipe({"merge_method": "task_arithmetic", "base_model": str(folder), "models": [{"model": str(base)}]})
    with pytest.raises(AdapterError, match="name the model it applies to"):
        resolve(folder)
    with pytest.raises(AdapterError, match="is not a LoRA adapter"):
        resolve(f"{base}+{base}")
    # mergekit's nested reference is the same model as BASE+ADAPTER
    nested = parse_recipe({"merge_method": "linear", "models": [
        {"model": {"model": {"path": str(base)}, "lora": {"path": str(folder)}}}, {"model": str(base)}]})
    assert nested.models[0].model == f"{base}+{folder}"
    # without a base in the recipe, BASE+ADAPTER names it: a linear merge of the adapted model and its base
    got = merge_state_dict(nested)
    merged = adapters("llama")[1]
    stored = load_file(base / "model.safetensors")
    for name, tensor in got.items():
        assert torch.allclose(tensor, (merged[name] + stored[name]) / 2, atol=1e-6, rtol=0), name


def test_evaluation_of_an_adapter_expert_is_that_of_the_merged_model(test_zoo, tmp_path: Path) -> None:  # noqa: F811
    """The pipeline's evaluate stage (evaluate_path with the adapter's base) scores what PEFT's merge would."""
    from mergeflow.evaluation import evaluate_path

    adapter = tmp_path / "adapter"
    merged = make_adapter(test_zoo.base, adapter, seed=11, r=4, lora_alpha=16,
                          target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    materialize(test_zoo.base, merged, tmp_path / "materialized")
    got = evaluate_path(adapter, ["topic"], zoo=test_zoo, limit=20, adapter_base=test_zoo.base)
    want = evaluate_path(tmp_path / "materialized", ["topic"], zoo=test_zoo, limit=20)
    assert got.scores["topic"] == want.scores["topic"] and got.scores["topic"].n == 20
