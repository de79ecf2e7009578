"""Every importance estimator on every family (issue 13): the support matrix behind README's "what you can merge".

One cell = one family × one estimator variant, run as a user runs it: a recipe with an ``importance`` entry through
``mergeflow merge`` (in process), the merged folder loaded by ``AutoModelForCausalLM`` and run. Tiny models (hidden
32, 2 blocks, 2 experts), 2 task rows per expert, few steps: the module takes about 115 s of CPU (one torch
thread; 107 s measured for the cells and the branch checks, imports and model builds included, before the three
tracing checks were added).

Each cell checks what holds for every estimator: the merge exits 0, its provenance names the estimator, the artifact
holds one value per expert for every partition of the variant's level (the level's partitions as
:class:`~mergeflow.partitions.Partitioner` lists them for the base, for the estimators that weight partitions), the
merged checkpoint has the base's tensor names and shapes, the merge moved the blocks' tensors, and the loaded merged
model is of the base's class and gives finite logits.

``tools/support_table.py`` runs this module and turns its results (junit XML) into README's table. A cell that is
not supported is an explicit ``xfail(strict=True)`` whose reason says what is missing (``UNSUPPORTED``); the table
shows it as not supported, and a cell that starts to pass fails the run until the entry is removed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mergeflow.architecture import Architecture
from mergeflow.cache import Cache
from mergeflow.coefficients import Coefficients
from mergeflow.partitions import Partitioner
from tests.cli_helpers import cli, keep_sigterm  # noqa: F401 (autouse fixture)
from tests.tiny_models import ALL_FAMILIES, make_family, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = [
    [("the quick brown fox", "jumps over the lazy dog"), ("nine plus three mod ten", "equals two")],
    [("alice went to the kitchen and", "cooked the soup"), ("merging fine tuned language", "models with task")],
]

# variant id → (estimator, merge method, importance parameters, the level whose partitions the artifact weights)
VARIANTS: dict[str, tuple[str, str, dict, str | None]] = {
    "apl-model-causal": ("apl", "dare_linear", {"level": "model", "p": 0.5}, None),
    "apl-layer-causal": ("apl", "dare_linear", {"level": "layer", "p": 0.5, "weights": "mi"}, "layer"),
    "apl-hidden_state-causal": ("apl", "dare_linear", {"level": "hidden_state", "p": 0.5}, "hidden_state"),
    "apl-model-grad": ("apl", "dare_linear", {"level": "model", "estimator": "grad", "p": 0.5}, None),
    "apl-layer-grad": ("apl", "dare_linear", {"level": "layer", "estimator": "grad", "p": 0.5}, "layer"),
    "apl-hidden_state-grad": ("apl", "dare_linear", {"level": "hidden_state", "estimator": "grad", "p": 0.5},
                              "hidden_state"),
    "sens": ("sens", "task_arithmetic", {"temperature": 0.1, "batch_size": 2}, "layer"),
    "slta-model": ("slta", "task_arithmetic", {"level": "model", "batch_size": 2}, "model"),
    "slta-layer": ("slta", "task_arithmetic", {"level": "layer", "batch_size": 2}, "layer"),
    "slta-attn_mlp": ("slta", "task_arithmetic", {"level": "attn_mlp", "batch_size": 2}, "attn_mlp"),
    "slta-head_mlp": ("slta", "task_arithmetic", {"level": "head_mlp", "batch_size": 2}, "head_mlp"),
    "cocktail": ("cocktail", "task_arithmetic", {}, None),
    "fisher": ("fisher", "linear", {"fisher": "empirical", "batch_size": 2}, None),
    "regmean": ("regmean", "regmean", {"batch_size": 2}, None),
    "adamerging": ("adamerging", "task_arithmetic", {"level": "layer", "steps": 2, "batch_size": 2}, "layer"),
    # a PEFT LoRA adapter (PEFT's default target modules for the family) as expert 0, beside a full expert 1: read
    # as base + scale·B·A by the merge and by the estimator (SLTA, which reads expert tensors and runs the base)
    "lora-slta-layer": ("slta", "task_arithmetic", {"level": "layer", "batch_size": 2}, "layer"),
}
LORA_VARIANTS = frozenset(v for v in VARIANTS if v.startswith("lora-"))

# (family, variant) → what is missing. Strict: a cell listed here that passes fails the run.
UNSUPPORTED: dict[tuple[str, str], str] = {}

CELLS = [pytest.param(family, variant, id=f"{family}-{variant}",
                      marks=[pytest.mark.xfail(strict=True, reason=UNSUPPORTED[(family, variant)])]
                      if (family, variant) in UNSUPPORTED else [])
         for family in ALL_FAMILIES for variant in VARIANTS]


@pytest.fixture(scope="session")
def matrix_families(tmp_path_factory: pytest.TempPathFactory):
    """``get(family)`` → (folder holding base, expert0, expert1, t0.jsonl, t1.jsonl), built once per family."""
    root = tmp_path_factory.mktemp("matrix")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            folder = root / family
            make_family(family, folder, n_experts=2)
            _lora_adapter(folder / "base", folder / "lora0")
            for i, rows in enumerate(ROWS):
                write_jsonl(folder / f"t{i}.jsonl", rows)
            built[family] = folder
        return built[family]

    return get


def _lora_adapter(base: Path, out: Path) -> None:
    """A PEFT LoRA adapter of ``base`` (rank 4) on every linear layer (``nn.Linear``, GPT-2's ``Conv1D``) but the head — attention and, in dense
    families, MLP projections (the MoE families' experts are fused parameters, not modules: PEFT's
    ``target_parameters`` LoRA on them is refused, see README) — with nonzero factors (PEFT starts B at zero), saved
    as a user publishes one."""
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not model.get_output_embeddings()})
    adapted = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                         target_modules=linear))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    adapted.save_pretrained(out)


def _recipe(folder: Path, variant: str) -> Path:
    estimator, method, params, _ = VARIANTS[variant]
    params = dict(params)
    arch = Architecture.from_folder(folder / "base")
    if estimator == "slta" and params.get("level") == "head_mlp" and arch.gqa:
        params["gqa_policy"] = "group"  # D-20: grouped-query heads are scored per kv group
    recipe = {
        "merge_method": method,
        "models": [{"model": "./lora0" if i == 0 and variant in LORA_VARIANTS else f"./expert{i}",
                    "task": f"./t{i}.jsonl"} for i in range(2)],
        "importance": {"estimator": estimator, "parameters": params, "data": {"n": 2}},
    }
    if method != "linear" and method != "regmean":
        recipe["base_model"] = "./base"
    if method == "linear":
        recipe["models"] = [{**m, "parameters": {"weight": 1.0}} for m in recipe["models"]]
    if method == "dare_linear":
        recipe["parameters"] = {"density": 0.5}
    path = folder / f"{variant}.yaml"
    path.write_text(json.dumps(recipe))
    return path


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                out[name] = f.get_tensor(name)
    return out


@pytest.mark.parametrize(("family", "variant"), CELLS)
def test_cell(matrix_families, tmp_path: Path, family: str, variant: str) -> None:
    from transformers import AutoModelForCausalLM

    folder = matrix_families(family)
    estimator, _, _, level = VARIANTS[variant]
    out = tmp_path / "merged"
    result = cli("merge", str(_recipe(folder, variant)), str(out), "--no-progress")
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)

    provenance = json.loads((out / "mergeflow.json").read_text())
    (summary,) = provenance["coefficients"]
    assert summary["estimator"] == estimator
    artifact = Coefficients.load(Cache().path("coefficients", summary["key"]))
    assert len(artifact.experts) == 2
    if level is not None:  # one value per expert for every partition of the level (D-2, D-18: blocks and the rest)
        arch = Architecture.from_folder(folder / "base")
        gqa = {"gqa_policy": "group"} if level == "head_mlp" and arch.gqa else {}
        ids = Partitioner(arch, level, **gqa).partition_ids()
        field = artifact.fields["drop_ratio" if estimator == "apl" else "weight"]
        assert field.level == level
        blocks = [p for p in ids if p.startswith(("layer.", "hidden.")) or level == "model"]
        assert set(blocks) <= set(field.partitions), sorted(set(blocks) - set(field.partitions))[:5]
        assert field.values is not None and field.values.shape == (2, len(field.partitions))
        assert torch.isfinite(field.values).all()
    else:
        assert artifact.fields, "the artifact holds no coefficient field"

    base, merged = _tensors(folder / "base"), _tensors(out)
    assert {n: tuple(t.shape) for n, t in merged.items()} == {n: tuple(t.shape) for n, t in base.items()}
    moved = [n for n in base if ".0." in n and not torch.equal(base[n], merged[n].to(base[n].dtype))]
    assert moved, "the merge left every tensor of block 0 at the base's values"

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    config = json.loads((folder / "base" / "config.json").read_text())
    assert [type(model).__name__] == config["architectures"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 17, 33, 8]])).logits
    assert logits.shape == (1, 4, model.config.get_text_config().vocab_size) and torch.isfinite(logits).all()


def test_every_family_and_estimator_is_in_the_matrix() -> None:
    """The matrix covers every registered estimator and the families issue 13 names."""
    from mergeflow.importance.base import all_estimators

    assert {e.name for e in all_estimators()} == {v[0] for k, v in VARIANTS.items() if k not in LORA_VARIANTS}
    assert set(ALL_FAMILIES) >= {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "phi", "gpt_neox",
                                 "falcon", "olmo2", "gpt2", "mixtral", "qwen3_moe"}
    assert not set(UNSUPPORTED) - {(f, v) for f in ALL_FAMILIES for v in VARIANTS}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_slta_branches_add_up_to_each_block(matrix_families, family: str) -> None:
    """D-39: whatever the block layout (pre- or post-norms, parallel or sequential branches, a norm shared by both
    branches, routed experts), block i's output — block i+1's input, or the final norm's, in the model's own forward
    pass — is its input plus the outputs of its attention and MLP modules as SLTA runs them on the base."""
    from mergeflow.importance.data import load_task_data
    from mergeflow.importance.linearity import _Session

    folder = matrix_families(family)
    data = load_task_data(str(folder / "t0.jsonl"), "calib", 2)
    session = _Session(folder / "base", [folder / "expert0"], level="attn_mlp", batch_size=2)
    try:
        [fb] = session.capture(data.examples)
        units = {u.name: u for u in session.units()}
        n = len(fb.layer_inputs)
        for i in range(n):
            attn, mlp = units[f"layer.{i}.attn"], units[f"layer.{i}.mlp"]
            out = (fb.layer_inputs[i] + attn.apply(attn.template, fb)[f"layer.{i}.attn"]
                   + mlp.apply(mlp.template, fb)[f"layer.{i}.mlp"])
            following = fb.layer_inputs[i + 1] if i + 1 < n else fb.final_input
            real = fb.mask
            torch.testing.assert_close(out[real], following[real], rtol=1e-5, atol=1e-5)
    finally:
        session.close()


@pytest.mark.parametrize("family", ["falcon", "gemma2", "mixtral"])
def test_apl_batched_tracing_matches_in_place(matrix_families, family: str) -> None:
    """The hidden-state swaps run batched by default on a GPU (module hooks correcting rows) and in place on a CPU;
    both give the same scores on a fused interleaved qkv (Falcon) and post-norms (Gemma-2). Fused MoE experts are
    not a module's own parameters: batching is refused and the run falls back to in place, with the same scores."""
    from mergeflow.importance.base import ModelRef, compute_coefficients
    from mergeflow.importance.data import load_task_data

    folder = matrix_families(family)
    task = load_task_data(str(folder / "t0.jsonl"), "fewshot", 2)
    refs = [ModelRef(str(folder / n), folder / n, f"{family}-{n}") for n in ("base", "expert0")]
    runs = {tracing: compute_coefficients("apl", base=refs[0], experts=[refs[1]], tasks=[task], use_cache=False,
                                          params={"level": "hidden_state", "tracing": tracing})
            for tracing in ("in_place", "batched")}
    torch.testing.assert_close(runs["batched"].scores["hidden_state"], runs["in_place"].scores["hidden_state"],
                               rtol=0, atol=1e-7)
    assert runs["batched"].stats["tracing"] == ("in_place" if family == "mixtral" else "batched")
