"""The Recipe: mergekit YAML loads unchanged, every validation error names its field, parameter resolution follows
mergekit's semantics (golden values by hand, cross-checked against mergekit's own resolver), and the recipe hash is
stable under formatting but sensitive to every parameter."""

from __future__ import annotations

import itertools
import json
import math
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mergeflow.errors import RecipeError
from mergeflow.recipe import Conditional, Recipe, evaluate_setting, load_recipe, parse_recipe

try:  # run as `python -m pytest` from the repository root, or with tests/ on sys.path
    from tests.tiny_models import make_family
except ImportError:  # pragma: no cover
    from tiny_models import make_family  # type: ignore[no-redef]

Q_PROJ = "model.layers.1.self_attn.q_proj.weight"
UP_PROJ = "model.layers.0.mlp.up_proj.weight"
NORM = "model.norm.weight"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe(data)
    return str(info.value)


BASIC = {"merge_method": "ties", "base_model": "org/base", "models": [{"model": "org/a"}, {"model": "org/b"}]}


# ---------------------------------------------------------------------------------------------------------------
# mergekit YAML loads unchanged
# ---------------------------------------------------------------------------------------------------------------

LINEAR_YAML = """
# mergekit README: linear
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
parameters:
  normalize: true
dtype: float16
"""

TIES_YAML = """
# mergekit README: ties with per-model density/weight, gradients and a filter
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""

DARE_TIES_YAML = """
models:
  - model: mistralai/Mistral-7B-v0.1
    # no parameters necessary for base model
  - model: samir-fama/SamirGPT-v1
    parameters:
      density: 0.53
      weight: 0.4
  - model: abacusai/Slerp-CM-mist-dpo
    parameters:
      density: 0.53
      weight: 0.3
  - model: EmbeddedLLM/Mistral-7B-Merge-14-v0.2
    parameters:
      density: 0.53
      weight: 0.3
merge_method: dare_ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  int8_mask: true
dtype: bfloat16
"""

SLERP_YAML = """
# mergekit README's slerp example, with `models:` instead of whole-model `slices:`
models:
  - model: psmathur/orca_mini_v3_13b
  - model: garage-bAInd/Platypus2-13B
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
"""


def test_mergekit_linear_yaml(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "linear.yaml", LINEAR_YAML))
    assert recipe.merge_method == "linear" and recipe.base_model is None and recipe.dtype == "float16"
    assert [e.model for e in recipe.experts] == ["psmathur/orca_mini_v3_13b", "WizardLM/WizardLM-13B-V1.2",
                                                 "garage-bAInd/Platypus2-13B"]
    per_model, shared = recipe.tensor_params(Q_PROJ, 0.5)
    assert per_model == {"weight": [1.0, 0.3, 0.5]}
    assert shared == {"normalize": True}
    # hub ids stay hub ids: nothing of that name lies beside the recipe
    assert recipe.resolve_reference("psmathur/orca_mini_v3_13b") == "psmathur/orca_mini_v3_13b"


def test_mergekit_ties_yaml(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "ties.yaml", TIES_YAML))
    assert recipe.merge_method == "ties" and recipe.base_model == "TheBloke/Llama-2-13B-fp16"
    assert len(recipe.experts) == 3
    # t = 0 (embeddings, first block), 0.5, 1 (last block)
    per_model, shared = recipe.tensor_params("model.embed_tokens.weight", 0.0)
    assert per_model["density"] == [1.0, 0.5, 0.33]
    assert per_model["weight"] == [1.0, 0.0, 0.0]
    per_model, _ = recipe.tensor_params(UP_PROJ, 0.5)
    assert per_model["density"] == pytest.approx([0.7, 0.5, 0.33])
    assert per_model["weight"] == pytest.approx([1.0, 0.5, 0.5])  # [0, .3, .7, 1] at 1.5/3 → .3 + .5·.4
    per_model, _ = recipe.tensor_params(Q_PROJ, 1.0)
    assert per_model["density"] == pytest.approx([0.1, 0.5, 0.33])
    assert per_model["weight"] == pytest.approx([1.0, 1.0, 0.0])
    assert shared["normalize"] is True and shared["int8_mask"] is True and shared["lambda"] == 1.0


def test_mergekit_dare_ties_yaml(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "dare.yaml", DARE_TIES_YAML))
    assert recipe.merge_method == "dare_ties" and recipe.dtype == "bfloat16"
    # the base listed among the models (mergekit style) is not an expert
    assert [e.model for e in recipe.experts] == ["samir-fama/SamirGPT-v1", "abacusai/Slerp-CM-mist-dpo",
                                                 "EmbeddedLLM/Mistral-7B-Merge-14-v0.2"]
    per_model, shared = recipe.tensor_params(Q_PROJ, 0.3)
    assert per_model["density"] == [0.53, 0.53, 0.53]
    assert per_model["weight"] == [0.4, 0.3, 0.3]
    assert shared["int8_mask"] is True
    assert recipe.method.random


def test_mergekit_slerp_yaml(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "slerp.yaml", SLERP_YAML))
    assert recipe.merge_method == "slerp" and [e.model for e in recipe.experts] == ["garage-bAInd/Platypus2-13B"]

    def t_of(name: str, depth: float) -> float:
        return recipe.tensor_params(name, depth)[1]["t"]

    # self_attn: [0, 0.5, 0.3, 0.7, 1]; mlp: [1, 0.5, 0.7, 0.3, 0]; the rest 0.5
    assert t_of(Q_PROJ, 0.0) == 0.0
    assert t_of(Q_PROJ, 0.25) == pytest.approx(0.5)
    assert t_of(Q_PROJ, 0.375) == pytest.approx(0.4)  # 1.5 segments: halfway between 0.5 and 0.3
    assert t_of(Q_PROJ, 0.6) == pytest.approx(0.46)  # 2.4 segments: 0.3·0.6 + 0.7·0.4
    assert t_of(Q_PROJ, 1.0) == pytest.approx(1.0)
    assert t_of(UP_PROJ, 0.0) == 1.0
    assert t_of(UP_PROJ, 0.6) == pytest.approx(0.54)
    assert t_of(NORM, 0.0) == 0.5
    assert t_of("model.layers.3.input_layernorm.weight", 0.75) == 0.5


def test_mergekit_slices_form_is_refused_naming_slices(tmp_path: Path) -> None:
    path = write(tmp_path, "slices.yaml", """
        slices:
          - sources:
              - model: psmathur/orca_mini_v3_13b
                layer_range: [0, 40]
              - model: garage-bAInd/Platypus2-13B
                layer_range: [0, 40]
        merge_method: slerp
        base_model: psmathur/orca_mini_v3_13b
        parameters:
          t: 0.5
        """)
    with pytest.raises(RecipeError, match=r"slices: .*not supported"):
        load_recipe(path)


def test_mergekit_empty_parameters_load(tmp_path: Path) -> None:
    path = write(tmp_path, "null.yaml", """
        models:
          - model: org/base
            parameters:
          - model: org/a
            parameters:
              weight: 0.5
        merge_method: task_arithmetic
        base_model: org/base
        parameters:
        """)
    recipe = load_recipe(path)
    assert recipe.tensor_params(Q_PROJ, 0.0)[0] == {"weight": [0.5]}


def test_method_alias_and_json(tmp_path: Path) -> None:
    a = parse_recipe({**BASIC, "merge_method": "dare_linear"})
    b = parse_recipe({k: v for k, v in BASIC.items() if k != "merge_method"} | {"method": "dare_linear"})
    assert a.merge_method == b.merge_method == "dare_linear"
    assert a.recipe_hash() == b.recipe_hash()
    c = load_recipe(write(tmp_path, "r.json", json.dumps({**BASIC, "merge_method": "dare_linear"})))
    assert c.recipe_hash() == a.recipe_hash()


def test_relative_model_paths_resolve_against_the_recipe_folder(tmp_path: Path) -> None:
    folder = tmp_path / "recipes"
    (folder / "experts" / "b").mkdir(parents=True)
    path = write(folder, "r.yaml", """
        merge_method: task_arithmetic
        base_model: ./base
        models:
          - model: ../elsewhere/a
          - model: experts/b
          - model: org/hub-model
        """)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # not the recipe's folder
    try:
        recipe = load_recipe(path)
    finally:
        os.chdir(cwd)
    assert recipe.recipe_dir == folder.resolve()
    assert recipe.resolve_reference("./base") == str((folder / "base").resolve())
    assert recipe.resolve_reference("../elsewhere/a") == str((tmp_path / "elsewhere" / "a").resolve())
    assert recipe.resolve_reference("experts/b") == str((folder / "experts" / "b").resolve())
    assert recipe.resolve_reference("org/hub-model") == "org/hub-model"
    assert recipe.resolve_reference("/abs/path") == "/abs/path"
    # a recipe built in Python (no folder) leaves references alone
    assert parse_recipe({**BASIC, "base_model": "./base"}).resolve_reference("./base") == "./base"


def test_relative_paths_merge_end_to_end(tmp_path: Path) -> None:
    from mergeflow.engine import merge_state_dict

    make_family("llama", tmp_path / "zoo", n_experts=2)
    relative = write(tmp_path / "zoo", "recipe.yaml", """
        merge_method: task_arithmetic
        base_model: ./base
        models:
          - model: ./expert0
            parameters: {weight: 0.7}
          - model: expert1
            parameters: {weight: 0.2}
        parameters: {lambda: 0.9}
        """)
    absolute = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "zoo" / "base"),
                "models": [{"model": str(tmp_path / "zoo" / "expert0"), "parameters": {"weight": 0.7}},
                           {"model": str(tmp_path / "zoo" / "expert1"), "parameters": {"weight": 0.2}}],
                "parameters": {"lambda": 0.9}}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        ours = merge_state_dict(load_recipe(relative))
    finally:
        os.chdir(cwd)
    expected = merge_state_dict(parse_recipe(absolute))
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[n], expected[n]) for n in ours)


# ---------------------------------------------------------------------------------------------------------------
# Every validation error names the offending field
# ---------------------------------------------------------------------------------------------------------------

ERROR_CASES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "unknown_parameter_shared": ({**BASIC, "parameters": {"densty": 0.5}},
                                 ["parameters.densty", "unknown parameter", "density"]),
    "unknown_parameter_per_model": (
        {**BASIC, "models": [{"model": "org/a", "parameters": {"wieght": 1}}, {"model": "org/b"}]},
        ["models[0].parameters.wieght", "unknown parameter", "weight"]),
    "shared_parameter_per_model": (
        {**BASIC, "models": [{"model": "org/a"}, {"model": "org/b", "parameters": {"lambda": 0.5}}]},
        ["models[1].parameters.lambda", "shared"]),
    "density_0": ({**BASIC, "parameters": {"density": 0}}, ["parameters.density", "(0, 1]", "0"]),
    "density_1.5": ({**BASIC, "models": [{"model": "org/a"}, {"model": "org/b", "parameters": {"density": 1.5}}]},
                    ["models[1].parameters.density", "1.5"]),
    "density_negative_in_filter": (
        {**BASIC, "parameters": {"density": [{"filter": "mlp", "value": -0.1}, {"value": 0.5}]}},
        ["parameters.density", "-0.1"]),
    "density_negative_in_gradient": (
        {**BASIC, "models": [{"model": "org/a", "parameters": {"density": [0.5, -0.1]}}, {"model": "org/b"}]},
        ["models[0].parameters.density", "-0.1"]),
    "density_nan": ({**BASIC, "parameters": {"density": math.nan}}, ["parameters.density", "NaN"]),
    "string_for_number": ({**BASIC, "parameters": {"lambda": "abc"}}, ["parameters.lambda", "number", "abc"]),
    "string_for_number_per_model": (
        {**BASIC, "models": [{"model": "org/a", "parameters": {"weight": "heavy"}}, {"model": "org/b"}]},
        ["models[0].parameters.weight", "number", "heavy"]),
    "number_for_bool": ({**BASIC, "parameters": {"normalize": 1}}, ["parameters.normalize", "true/false"]),
    "bad_choice": ({**BASIC, "parameters": {"election": "max"}}, ["parameters.election", "sum", "count", "max"]),
    "missing_required_t": ({"merge_method": "slerp", "base_model": "org/base",
                            "models": [{"model": "org/base"}, {"model": "org/a"}]}, ["parameters.t", "slerp"]),
    "slerp_two_experts": ({"merge_method": "slerp", "base_model": "org/base", "parameters": {"t": 0.5},
                           "models": [{"model": "org/a"}, {"model": "org/b"}]}, ["models", "slerp", "at most 1", "2"]),
    "nuslerp_one_expert": ({"merge_method": "nuslerp", "models": [{"model": "org/a"}]},
                           ["models", "nuslerp", "at least 2", "1"]),
    "model_stock_one_expert": ({"merge_method": "model_stock", "base_model": "org/base",
                                "models": [{"model": "org/a"}]}, ["models", "model_stock", "at least 2"]),
    "only_the_base": ({**BASIC, "models": [{"model": "org/base"}]}, ["models", "no model"]),
    "base_required": ({"merge_method": "ties", "models": [{"model": "org/a"}, {"model": "org/b"}]},
                      ["base_model", "ties"]),
    "unknown_top_level_field": ({**BASIC, "paramters": {"density": 0.5}}, ["paramters", "unknown field"]),
    "unknown_model_field": ({**BASIC, "models": [{"model": "org/a", "weight": 0.5}, {"model": "org/b"}]},
                            ["models[0].weight", "unknown field"]),
    "slices": ({**BASIC, "slices": [{"sources": [{"model": "org/a", "layer_range": [0, 2]}]}]},
               ["slices", "not supported"]),
    "modules": ({**BASIC, "modules": {"text_decoder": {"models": [{"model": "org/a"}]}}}, ["modules", "not supported"]),
    # mergekit's nested reference is read as BASE+ADAPTER (tests/test_adapters.py); a revision in it is not
    "nested_revision": ({**BASIC, "models": [{"model": {"model": {"path": "org/a", "revision": "main"}}},
                                             {"model": "org/b"}]}, ["models[0].model", "revisions"]),
    "tokenizer_and_tokenizer_source": ({**BASIC, "tokenizer_source": "base", "tokenizer": {"source": "union"}},
                                       ["tokenizer_source", "not both"]),
    "tokenizer_unknown_field": ({**BASIC, "tokenizer": {"source": "union", "pad_to": 8}},
                                ["tokenizer.pad_to", "unknown field"]),
    "tokenizer_pad_zero": ({**BASIC, "tokenizer": {"pad_to_multiple_of": 0}}, ["tokenizer.pad_to_multiple_of"]),
    "tokenizer_token_without_source": ({**BASIC, "tokenizer": {"tokens": {"<x>": {"force": True}}}},
                                       ["tokenizer.tokens.<x>.source", "required"]),
    "tokenizer_model_token_both": ({**BASIC, "tokenizer": {"tokens": {"<x>": {"source": {
        "kind": "model_token", "model": "org/a", "token": "<s>", "token_id": 1}}}}}, ["exactly one of token_id"]),
    "vocab_policy_with_tokenizer_source": ({**BASIC, "vocab_policy": "base", "tokenizer_source": "base"},
                                           ["vocab_policy", "deprecated"]),
    "chat_template_builtin_name": ({**BASIC, "chat_template": "chatml"}, ["chat_template", "Jinja"]),
    "bad_dtype": ({**BASIC, "dtype": "float8"}, ["dtype", "float8"]),
    "bad_out_dtype": ({**BASIC, "out_dtype": "int8"}, ["out_dtype", "int8"]),
    "linear_weights_sum_to_zero": (
        {"merge_method": "linear", "models": [{"model": "org/a", "parameters": {"weight": 0.5}},
                                              {"model": "org/b", "parameters": {"weight": -0.5}}]},
        ["weight", "sum to zero", "normalize"]),
    "gamma_out_of_range": ({"merge_method": "breadcrumbs", "base_model": "org/base",
                            "models": [{"model": "org/a", "parameters": {"gamma": 2}}]},
                           ["models[0].parameters.gamma", "2"]),
    "epsilon_zero": ({"merge_method": "della", "base_model": "org/base",
                      "models": [{"model": "org/a", "parameters": {"epsilon": 0}}]},
                     ["models[0].parameters.epsilon", "(0, 1)"]),
    "missing_models": ({"merge_method": "ties", "base_model": "org/base"}, ["models", "missing"]),
    "seed_not_an_integer": ({**BASIC, "seed": "abc"}, ["seed"]),
    "bad_vocab_policy": ({**BASIC, "vocab_policy": "union"}, ["vocab_policy"]),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_validation_error_names_the_field(case: str) -> None:
    data, fragments = ERROR_CASES[case]
    message = error_of(data)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_unknown_method_lists_the_known_methods() -> None:
    message = error_of({**BASIC, "merge_method": "tiez"})
    assert "'tiez'" in message
    for known in ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "della",
                  "model_stock", "slerp", "nuslerp"):
        assert known in message


def test_unknown_method_names_the_field() -> None:
    assert "merge_method" in error_of({**BASIC, "merge_method": "tiez"})


def test_tokenizer_sources_and_mergekit_tokenizer_section_load() -> None:
    assert parse_recipe({**BASIC, "tokenizer_source": "union"}).vocabulary_source == "union"
    assert parse_recipe({**BASIC, "tokenizer_source": "org/a"}).vocabulary_source == "org/a"
    assert parse_recipe(BASIC).vocabulary_source is None
    recipe = parse_recipe({**BASIC, "chat_template": "auto", "tokenizer": {
        "pad_to_multiple_of": 64,
        "tokens": {"<|im_start|>": {"source": "org/a"},
                   "<|im_end|>": {"source": {"kind": "zero"}, "force": True},
                   "<tool>": {"source": {"kind": "model_token", "model": "org/b", "token": "</s>"}}}}})
    assert recipe.vocabulary_source == "union"  # mergekit's default source of a tokenizer section
    assert recipe.tokenizer is not None and recipe.tokenizer.pad_to_multiple_of == 64
    assert recipe.tokenizer.tokens["<|im_end|>"].force
    assert recipe.chat_template == "auto"
    # the tokenizer settings make another model: they are part of the recipe hash
    assert recipe.recipe_hash() != parse_recipe({**BASIC, "chat_template": "auto"}).recipe_hash()


def test_required_per_model_parameter_may_be_given_per_model() -> None:
    # linear needs no base; weights given only per model satisfy `weight`
    recipe = parse_recipe({"merge_method": "linear", "models": [{"model": "org/a", "parameters": {"weight": 2}},
                                                                {"model": "org/b", "parameters": {"weight": 1}}]})
    assert recipe.tensor_params(NORM, 0.0)[0] == {"weight": [2.0, 1.0]}


def test_confine_paths_refuses_a_model_outside_the_recipe_folder(tmp_path: Path) -> None:
    folder = tmp_path / "recipes"
    text = """
        merge_method: task_arithmetic
        base_model: ./base
        confine_paths: true
        models:
          - model: ./inside
          - model: ../outside
        """
    with pytest.raises(RecipeError, match=r"models\[1\]\.model: model '\.\./outside'.*outside the recipe folder"):
        load_recipe(write(folder, "r.yaml", text))
    recipe = load_recipe(write(folder, "r2.yaml", text.replace("          - model: ../outside\n", "")))
    assert recipe.resolve_reference("./inside") == str((folder / "inside").resolve())
    with pytest.raises(RecipeError, match=r"'\.\./outside'.*outside the recipe folder"):
        recipe.resolve_reference("../outside")
    # without confine_paths the same reference resolves
    assert load_recipe(write(folder, "free.yaml", text.replace("true", "false"))).resolve_reference(
        "../outside") == str((tmp_path / "outside").resolve())


def test_confine_paths_covers_the_tokenizer_settings(tmp_path: Path) -> None:
    folder = tmp_path / "recipes"
    text = """
        merge_method: task_arithmetic
        base_model: ./base
        confine_paths: true
        models:
          - model: ./inside
        tokenizer:
          source: union
          tokens:
            "<x>": {source: {kind: model_token, model: ../outside, token: "</s>"}}
        """
    with pytest.raises(RecipeError, match=r"tokenizer\.tokens\['<x>'\]\.source: model '\.\./outside'.*outside"):
        load_recipe(write(folder, "r.yaml", text))
    with pytest.raises(RecipeError, match=r"tokenizer\.source: model '\.\./elsewhere'.*outside"):
        load_recipe(write(folder, "r2.yaml", text.replace("source: union", "source: ../elsewhere")
                          .replace("../outside", "./inside")))


def test_confine_paths_is_checked_when_the_recipe_loads(tmp_path: Path) -> None:
    path = write(tmp_path / "recipes", "r.yaml", """
        merge_method: task_arithmetic
        base_model: ./base
        confine_paths: true
        models:
          - model: ./inside
          - model: ../outside
        """)
    with pytest.raises(RecipeError, match=r"models\[1\]\.model.*\.\./outside"):
        load_recipe(path)


def test_load_recipe_file_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "bad.yaml", "merge_method: [ties\n"))
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(write(tmp_path, "list.yaml", "- ties\n"))
    # the file name is part of the message
    with pytest.raises(RecipeError, match=r"typo\.yaml: .*parameters\.densty"):
        load_recipe(write(tmp_path, "typo.yaml", yaml.safe_dump({**BASIC, "parameters": {"densty": 0.5}})))


# ---------------------------------------------------------------------------------------------------------------
# evaluate_setting: mergekit's semantics, golden values
# ---------------------------------------------------------------------------------------------------------------


def C(value: Any, filter: str | None = None) -> Conditional:
    return Conditional(filter=filter, value=value)


@pytest.mark.parametrize(("setting", "name", "t", "expected"), [
    (0.3, Q_PROJ, 0.7, 0.3),
    ("sum", Q_PROJ, 0.7, "sum"),
    (True, Q_PROJ, 0.2, True),
    ([0, 1], Q_PROJ, 0.25, 0.25),
    ([0.2, 0.8], Q_PROJ, 0.0, 0.2),
    ([0.2, 0.8], Q_PROJ, 1.0, 0.8),
    ([0, 0.5, 0.3, 0.7, 1], Q_PROJ, 0.375, 0.4),
    ([0, 0.5, 0.3, 0.7, 1], Q_PROJ, 0.6, 0.46),
    ([1, 0.7, 0.1], Q_PROJ, 0.75, 0.4),
    ([5], Q_PROJ, 0.5, 5.0),
    # non-numeric lists pick by index int(t·(n−1)), no interpolation
    (["a", "b", "c"], Q_PROJ, 0.49, "a"),
    (["a", "b", "c"], Q_PROJ, 0.5, "b"),
    (["a", "b", "c"], Q_PROJ, 1.0, "c"),
    ([True, False], Q_PROJ, 0.99, True),
    ([True, False], Q_PROJ, 1.0, False),
    ([0, True], Q_PROJ, 0.5, 0),  # a bool makes the list non-numeric
    # filters: substring of the tensor name, first match wins, in order
    ([C(0.1, "self_attn"), C(0.2, "attn"), C(0.3)], Q_PROJ, 0.0, 0.1),
    ([C(0.1, "self_attn"), C(0.2, "attn"), C(0.3)], "transformer.h.0.attn.c_attn.weight", 0.0, 0.2),
    ([C(0.1, "self_attn"), C(0.2, "attn"), C(0.3)], UP_PROJ, 0.0, 0.3),
    ([C(0.3), C(0.1, "self_attn")], Q_PROJ, 0.0, 0.3),  # an unfiltered entry first shadows the rest
    ([C(0.9, "*"), C(0.1, "self_attn")], Q_PROJ, 0.0, 0.9),  # "*" matches everything
    ([C(0.1, "self_attn")], UP_PROJ, 0.0, None),  # no match, no fallback → not set here
    (C(0.4, "mlp"), UP_PROJ, 0.0, 0.4),  # a single conditional
    (C(0.4, "mlp"), Q_PROJ, 0.0, None),
    ([C([0, 1], "mlp"), C([1, 0])], UP_PROJ, 0.25, 0.25),  # gradients inside filters
    ([C([0, 1], "mlp"), C([1, 0])], NORM, 0.25, 0.75),
    ([C(["x", "y"], "mlp")], UP_PROJ, 1.0, "y"),
    ([], Q_PROJ, 0.5, None),
])
def test_evaluate_setting_golden(setting: Any, name: str, t: float, expected: Any) -> None:
    got = evaluate_setting(setting, name, t)
    if isinstance(expected, float) and not isinstance(expected, bool):
        assert got == pytest.approx(expected, abs=1e-12)
    else:
        assert got == expected and type(got) is type(expected)


# a spread of settings as they come out of YAML (dicts for filters), checked against mergekit's own resolver
MERGEKIT_SETTINGS: list[Any] = [
    0.25, 1, [0.1, 0.9], [1, 0.7, 0.1], [0, 0.5, 0.3, 0.7, 1], [0.9, 0.2, 0.6, 0.4],
    [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
     {"value": 0.5}],
    [{"filter": "q_proj", "value": 0.2}, {"filter": "proj", "value": [0.3, 0.6]}],
    [{"filter": "norm", "value": 1.0}, {"value": [0.1, 0.2, 0.4]}],
    {"filter": "embed", "value": 0.8},
]
TENSORS = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
           "model.layers.2.self_attn.o_proj.weight", "model.layers.3.mlp.down_proj.weight",
           "model.layers.4.post_attention_layernorm.weight", "model.norm.weight", "lm_head.weight"]
DEPTHS = [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.6, 2 / 3, 0.75, 0.9, 1.0]


@pytest.mark.parametrize("index", range(len(MERGEKIT_SETTINGS)))
def test_parameter_resolution_matches_mergekit(index: int) -> None:
    """Recipe.tensor_params (per-model value, then the shared one, then the default) against mergekit 0.1.5's
    parameter resolver on the same settings, for every tensor name and depth."""
    pytest.importorskip("mergekit")
    from mergekit.config import ConditionalParameter
    from mergekit.config import evaluate_setting as mergekit_evaluate
    from pydantic import TypeAdapter

    setting = MERGEKIT_SETTINGS[index]
    as_float = TypeAdapter(float).validate_python
    mk_setting = TypeAdapter(ConditionalParameter | list[ConditionalParameter] | float | list[float]) \
        .validate_python(setting)
    per_model = parse_recipe({"merge_method": "task_arithmetic", "base_model": "org/base",
                              "models": [{"model": "org/a", "parameters": {"weight": setting}}]})
    shared = parse_recipe({"merge_method": "task_arithmetic", "base_model": "org/base",
                           "models": [{"model": "org/a"}], "parameters": {"lambda": setting}})
    for name, t in itertools.product(TENSORS, DEPTHS):
        theirs = mergekit_evaluate(name, mk_setting, t, validate=as_float)
        expected = 1.0 if theirs is None else theirs  # unresolved → the default, 1.0 for both
        assert per_model.tensor_params(name, t)[0]["weight"] == [pytest.approx(expected, abs=1e-12)], (name, t)
        assert shared.tensor_params(name, t)[1]["lambda"] == pytest.approx(expected, abs=1e-12), (name, t)


def test_yaml_scientific_notation_in_a_gradient_interpolates(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "sci.yaml", """
        merge_method: ties
        base_model: org/base
        models:
          - model: org/a
            parameters:
              density: [1e-3, 0.5]
              weight: 5e-1
        """))
    per_model, _ = recipe.tensor_params(Q_PROJ, 0.5)
    assert per_model["weight"] == [0.5]  # a lone scalar string is coerced
    assert per_model["density"] == [pytest.approx(0.2505)]


def test_tensor_params_precedence_and_defaults() -> None:
    """Per-model value, else the shared `parameters` value, else the method default (mergekit_compat defaults in
    compat mode: ties density 1.0 instead of the paper's 0.2)."""
    data = {"merge_method": "ties", "base_model": "org/base",
            "models": [{"model": "org/a", "parameters": {"weight": [{"filter": "self_attn", "value": 0.3}],
                                                         "density": 0.6}},
                       {"model": "org/b", "parameters": {"weight": 0.9}},
                       {"model": "org/c"}],
            "parameters": {"weight": 0.5, "lambda": [0.5, 1.5]}}
    paper = parse_recipe(data)
    compat = parse_recipe({**data, "mergekit_compat": True})
    per_model, shared = paper.tensor_params(Q_PROJ, 0.5)
    assert per_model["weight"] == [0.3, 0.9, 0.5]
    assert per_model["density"] == [0.6, 0.2, 0.2]
    assert shared["lambda"] == pytest.approx(1.0) and shared["normalize"] is True
    per_model, _ = paper.tensor_params(UP_PROJ, 0.0)
    assert per_model["weight"] == [0.5, 0.9, 0.5]  # filter misses → the shared value
    per_model, shared = compat.tensor_params(UP_PROJ, 1.0)
    assert per_model["density"] == [0.6, 1.0, 1.0]
    assert shared["lambda"] == 1.5
    assert shared["trim_scope"] == "tensor" and paper.tensor_params(UP_PROJ, 1.0)[1]["trim_scope"] == "global"


# ---------------------------------------------------------------------------------------------------------------
# Recipe hash
# ---------------------------------------------------------------------------------------------------------------

HASHED = """
merge_method: ties
base_model: org/base
models:
  - model: org/a
    parameters:
      weight: 0.6
      density: [0.3, 0.9]
  - model: org/b
    parameters:
      weight:
        - filter: self_attn
          value: 0.3
        - value: 0.7
parameters:
  lambda: 1.2
  normalize: true
dtype: bfloat16
seed: 7
"""

HASHED_REFORMATTED = """
# the same recipe: other key order, flow style, comments, quoting, indentation, the `method` alias
seed: 7
dtype: "bfloat16"
parameters: {normalize: yes, lambda: 1.2}
models:
    - parameters: {density: [0.3, 0.9], weight: 0.6}   # first expert
      model: 'org/a'
    - model: org/b
      parameters:
          weight: [{value: 0.3, filter: self_attn}, {value: 0.7}]
base_model: org/base
method: ties
"""


def test_recipe_hash_is_stable_under_formatting(tmp_path: Path) -> None:
    a = load_recipe(write(tmp_path / "one", "a.yaml", HASHED))
    b = load_recipe(write(tmp_path / "two" / "deeper", "b.yml", HASHED_REFORMATTED))
    assert a.recipe_dir != b.recipe_dir  # recipe_dir is not part of the hash
    assert a.recipe_hash() == b.recipe_hash()
    assert a.recipe_hash().startswith("sha256:") and len(a.recipe_hash()) == len("sha256:") + 64
    data = yaml.safe_load(HASHED)
    assert parse_recipe(data).recipe_hash() == a.recipe_hash()
    assert parse_recipe(data, recipe_dir=tmp_path / "anywhere").recipe_hash() == a.recipe_hash()
    assert parse_recipe(dict(reversed(list(data.items())))).recipe_hash() == a.recipe_hash()
    # defaults spelled out change nothing
    explicit = {**data, "mergekit_compat": False, "allow_pickle": False, "vocab_policy": "error"}
    assert parse_recipe(explicit).recipe_hash() == a.recipe_hash()
    # round trip through the canonical YAML
    assert parse_recipe(yaml.safe_load(a.to_yaml())).recipe_hash() == a.recipe_hash()
    assert "recipe_dir" not in a.canonical()


def _mutations() -> dict[str, dict[str, Any]]:
    base = yaml.safe_load(HASHED)

    def change(path: list[Any], value: Any) -> dict[str, Any]:
        data = json.loads(json.dumps(base))
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return data

    return {
        "method": change(["merge_method"], "dare_ties"),
        "base": change(["base_model"], "org/base2"),
        "model": change(["models", 0, "model"], "org/a2"),
        "weight": change(["models", 0, "parameters", "weight"], 0.61),
        "density_gradient": change(["models", 0, "parameters", "density"], [0.3, 0.8]),
        "filter": change(["models", 1, "parameters", "weight", 0, "filter"], "mlp"),
        "filter_value": change(["models", 1, "parameters", "weight", 1, "value"], 0.71),
        "lambda": change(["parameters", "lambda"], 1.25),
        "normalize": change(["parameters", "normalize"], False),
        "new_param": change(["parameters", "int8_mask"], True),
        "dtype": change(["dtype"], "float16"),
        "out_dtype": change(["out_dtype"], "float16"),
        "seed": change(["seed"], 8),
        "compat": change(["mergekit_compat"], True),
        "tokenizer": change(["tokenizer_source"], "org/a"),
        "order": {**base, "models": list(reversed(base["models"]))},
        "extra_model": {**base, "models": [*base["models"], {"model": "org/c"}]},
    }


def test_recipe_hash_changes_with_every_parameter() -> None:
    reference = parse_recipe(yaml.safe_load(HASHED)).recipe_hash()
    hashes = {name: parse_recipe(data).recipe_hash() for name, data in _mutations().items()}
    for name, h in hashes.items():
        assert h != reference, name
    assert len(set(hashes.values())) == len(hashes)


def test_recipe_is_frozen() -> None:
    recipe = parse_recipe(BASIC)
    assert isinstance(recipe, Recipe)
    with pytest.raises(Exception):  # noqa: B017 (pydantic's frozen error type is an implementation detail)
        recipe.seed = 3  # type: ignore[misc]
