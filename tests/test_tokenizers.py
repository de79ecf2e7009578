"""Experts whose tokenizers differ: ``tokenizer_source: base | union | <model>`` and mergekit's ``tokenizer:`` section,
checked against the mergekit package (``mergekit==0.1.5``) on tiny families whose experts added tokens.

The family: a base, a "chat" expert that added ``<|im_start|>``/``<|im_end|>`` (special) and a chat template, a
"tools" expert that added ``<tool_call>`` and ``<|im_start|>`` (so ``<|im_start|>`` has another id there), and an
expert that added the ordinary token ``zebra``; each resized its embeddings (and untied head) with transformers.
With ``mergekit_compat`` every tensor mergekit writes must be ours bit for bit, and the saved tokenizers must agree
(vocabulary and ids, added tokens and their settings, special tokens, chat template), as must ``vocab_size``.

mergekit orders the models of a union by hash (``referenced_models()`` is a set, randomised per process); compat
mode takes the recipe's order, so each comparison lists the experts in the order mergekit uses in this process.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("mergekit")

from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions as MergekitOptions
from transformers import AutoTokenizer

from mergeflow.engine import MergeOptions, merge, merge_state_dict, plan_merge
from mergeflow.errors import IncompatibleModelsError, RecipeError
from mergeflow.recipe import parse_recipe
from tests.cli_helpers import cli, keep_sigterm  # noqa: F401  (an autouse fixture)
from tests.tiny_models import CHAT_TEMPLATE, make_expert, make_expert_with_tokens, make_model, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OTHER_TEMPLATE = "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"


class TokenFamily:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, tuple[str, dict[str, str]]] = {}

    def get(self, family: str, dtype: torch.dtype = torch.float32) -> tuple[str, dict[str, str]]:
        """(base, {"chat", "tools", "zebra": expert folder})."""
        key = f"{family}_{str(dtype).removeprefix('torch.')}"
        if key not in self._built:
            root = self.root / key
            base = make_model(family, root / "base", seed=0, dtype=dtype)
            experts = {
                "chat": make_expert_with_tokens(base, root / "chat", seed=11, special=("<|im_start|>", "<|im_end|>"),
                                                chat_template=CHAT_TEMPLATE),
                "tools": make_expert_with_tokens(base, root / "tools", seed=12,
                                                 special=("<tool_call>", "<|im_start|>"),
                                                 chat_template=CHAT_TEMPLATE),
                "zebra": make_expert_with_tokens(base, root / "zebra", seed=13, plain=("zebra",),
                                                 chat_template=OTHER_TEMPLATE),
            }
            self._built[key] = (str(base), {k: str(v) for k, v in experts.items()})
        return self._built[key]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> TokenFamily:
    return TokenFamily(tmp_path_factory.mktemp("token_families"))


def _fixed_point(config: dict[str, Any]) -> dict[str, Any] | None:
    for perm in itertools.permutations(config["models"]):
        candidate = {**config, "models": list(perm)}
        refs = [str(r.model.path) for r in MergeConfiguration.model_validate(candidate).referenced_models()]
        listed = [m["model"] for m in perm]
        if sorted(listed, key=refs.index) == listed:
            return candidate
    return None


def _renamed(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _renamed(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed(v, names) for v in value]
    return names.get(value, value) if isinstance(value, str) else value


def in_mergekit_order(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its models listed in the order mergekit visits them in this process (its union's order).

    mergekit collects the models in a ``set``, whose order follows the (per-process, randomized) string hashes and,
    where two collide, the order of insertion: reordering the list can reorder the set, and for some hash seeds no
    listing is visited in its own order. Every permutation is tried; when none is a fixed point, the experts are
    copied to other folder names (other hashes: the same models) and the permutations tried again."""
    for attempt in range(8):
        found = _fixed_point(config)
        if found is not None:
            return found
        names = {}
        for m in config["models"]:
            src = Path(m["model"])
            dst = src.with_name(f"{src.name.split('~')[0]}~{attempt + 1}")
            if not dst.exists():
                shutil.copytree(src, dst)
            names[m["model"]] = str(dst)
        config = _renamed(config, names)
    raise AssertionError("no listing of the models is visited by mergekit in its own order")


def run_mergekit(config: dict[str, Any], out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    options = MergekitOptions(write_model_card=False, copy_tokenizer=True, random_seed=0, quiet=True, device="cpu")
    run_merge(MergeConfiguration.model_validate(config), str(out), options)
    return out


def run_ours(config: dict[str, Any], out: Path, **extra: Any) -> Path:
    merge(parse_recipe({**config, "mergekit_compat": True, **extra}), out,
          options=MergeOptions(progress=False, threads=1))
    return out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def added(tok: Any) -> dict[int, tuple]:
    return {i: (t.content, t.special, t.normalized, t.lstrip, t.rstrip, t.single_word)
            for i, t in tok.added_tokens_decoder.items()}


def assert_same_output(theirs: Path, ours: Path) -> AutoTokenizer:
    a, b = tensors(theirs), tensors(ours)
    only_theirs = set(a) - set(b)
    assert all("lm_head" in n for n in only_theirs), sorted(only_theirs)  # a tied head mergekit may write
    assert not set(b) - set(a), sorted(set(b) - set(a))
    for name in sorted(set(a) & set(b)):
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, (name, a[name].shape, b[name].shape)
        assert torch.equal(a[name], b[name]), f"{name}: max |diff| {(a[name] - b[name]).abs().max():.3g}"
    cfg_a = json.loads((theirs / "config.json").read_text())
    cfg_b = json.loads((ours / "config.json").read_text())
    assert cfg_a["vocab_size"] == cfg_b["vocab_size"]
    tok_a, tok_b = AutoTokenizer.from_pretrained(theirs), AutoTokenizer.from_pretrained(ours)
    assert tok_a.get_vocab() == tok_b.get_vocab()
    assert added(tok_a) == added(tok_b)
    assert tok_a.chat_template == tok_b.chat_template
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(tok_a, attr) == getattr(tok_b, attr), attr
    text = "<|im_start|>user\nthe quick zebra<tool_call><|im_end|>"
    assert tok_a(text)["input_ids"] == tok_b(text)["input_ids"]
    embed = next(n for n in b if "embed" in n or n.endswith("wte.weight"))
    assert b[embed].shape[0] == cfg_b["vocab_size"]
    return tok_b


def _models(paths: list[str], weights: list[float] | None = None) -> list[dict[str, Any]]:
    return [{"model": p, **({"parameters": {"weight": w}} if weights else {})}
            for p, w in zip(paths, weights or [None] * len(paths))]


# ---------------------------------------------------------------------------------------------------- vs mergekit


@pytest.mark.parametrize(("family", "dtype"), [("llama", "float32"), ("qwen2", "float32"), ("llama", "bfloat16")])
def test_union_matches_mergekit(tokens: TokenFamily, tmp_path: Path, family: str, dtype: str) -> None:
    """<|im_start|> (chat and tools, not the base) takes their mean in the base and the zebra expert; <|im_end|>,
    <tool_call> and zebra take their only owner's rows; bf16 checkpoints are aligned and merged in bf16."""
    base, e = tokens.get(family, getattr(torch, dtype))
    config = in_mergekit_order({
        "merge_method": "task_arithmetic", "base_model": base, "tokenizer_source": "union", "chat_template": "auto",
        "models": _models([e["chat"], e["tools"], e["zebra"]], [0.5, 0.3, 0.7])})
    tok = assert_same_output(run_mergekit(config, tmp_path / "mk"), run_ours(config, tmp_path / "ours"))
    for t in ("<|im_start|>", "<|im_end|>", "<tool_call>", "zebra"):
        assert t in tok.get_vocab()
    assert tok.chat_template == CHAT_TEMPLATE  # two of three experts share it (auto)
    assert len(tok) == 96 + 4


def test_base_source_with_ties_matches_mergekit(tokens: TokenFamily, tmp_path: Path) -> None:
    base, e = tokens.get("llama")
    config = in_mergekit_order({
        "merge_method": "ties", "base_model": base, "tokenizer_source": "base", "chat_template": CHAT_TEMPLATE,
        "models": [{"model": e["chat"], "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": e["tools"], "parameters": {"weight": 0.4, "density": 0.7}}]})
    tok = assert_same_output(run_mergekit(config, tmp_path / "mk"), run_ours(config, tmp_path / "ours"))
    assert len(tok) == 96 and tok.chat_template == CHAT_TEMPLATE


def test_model_source_without_base_matches_mergekit(tokens: TokenFamily, tmp_path: Path) -> None:
    """The tools expert's vocabulary without a base: the chat expert's <|im_start|> row moves to the tools id,
    <tool_call> (only in tools) takes the tools expert's row in the chat expert, <|im_end|> is dropped."""
    _, e = tokens.get("llama")
    config = {"merge_method": "linear", "tokenizer_source": e["tools"],
              "models": _models([e["chat"], e["tools"]], [0.3, 0.7])}
    tok = assert_same_output(run_mergekit(config, tmp_path / "mk"), run_ours(config, tmp_path / "ours"))
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(e["tools"]).get_vocab()


def test_source_outside_the_merge_matches_mergekit(tokens: TokenFamily, tmp_path: Path) -> None:
    """tokenizer_source names a checkpoint that is not merged: its vocabulary, the inputs' rows aligned to it."""
    base, e = tokens.get("llama")
    config = in_mergekit_order({"merge_method": "task_arithmetic", "base_model": base, "tokenizer_source": e["zebra"],
                                "models": _models([e["chat"], e["tools"]], [0.6, 0.4])})
    tok = assert_same_output(run_mergekit(config, tmp_path / "mk"), run_ours(config, tmp_path / "ours"))
    assert "zebra" in tok.get_vocab() and "<tool_call>" not in tok.get_vocab()


def test_chat_template_without_tokenizer_source_matches_mergekit(families, tmp_path: Path) -> None:
    """mergekit re-saves the base's tokenizer with the template; the vocabularies agree, rows merge by index."""
    base, experts = families("llama")
    config = {"merge_method": "task_arithmetic", "base_model": str(base), "chat_template": CHAT_TEMPLATE,
              "models": _models([str(x) for x in experts[:2]], [0.5, 0.5])}
    tok = assert_same_output(run_mergekit(config, tmp_path / "mk"), run_ours(config, tmp_path / "ours"))
    assert tok.chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize("pad", [None, 64])
def test_padded_embeddings_match_mergekit(tmp_path: Path, pad: int | None) -> None:
    """A base whose embeddings have more rows (100) than its tokenizer has tokens (96), as many released models
    do: with a tokenizer setting the output has one row per token, or pads to pad_to_multiple_of with mean rows."""
    base = make_model("llama", tmp_path / "base", seed=0, vocab_size=100)
    expert = make_expert(base, tmp_path / "expert", seed=5)
    bare = make_expert(base, tmp_path / "bare", seed=6)  # saved without tokenizer files: shares the base's
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (bare / name).unlink(missing_ok=True)
    config: dict[str, Any] = {"merge_method": "task_arithmetic", "base_model": str(base),
                              "models": _models([str(expert), str(bare)], [0.7, 0.2])}
    config |= {"tokenizer_source": "base"} if pad is None else {"tokenizer": {"source": "base",
                                                                              "pad_to_multiple_of": pad}}
    config = in_mergekit_order(config)
    assert_same_output(run_mergekit(config, tmp_path / "mk"), run_ours(config, tmp_path / "ours"))
    rows = tensors(tmp_path / "ours")["model.embed_tokens.weight"].shape[0]
    assert rows == (96 if pad is None else 128)


def test_tokenizer_section_rules_and_padding_match_mergekit(tokens: TokenFamily, tmp_path: Path) -> None:
    base, e = tokens.get("llama")
    config = in_mergekit_order({
        "merge_method": "task_arithmetic", "base_model": base,
        "models": _models([e["chat"], e["tools"], e["zebra"]], [0.5, 0.5, 0.5]),
        "tokenizer": {"source": "union", "pad_to_multiple_of": 16, "tokens": {
            "<|im_start|>": {"source": e["tools"]},
            "<|im_end|>": {"source": {"kind": "zero"}, "force": True},
            "<extra>": {"source": {"kind": "model_token", "model": base, "token": "</s>"}},
            "zebra": {"source": {"kind": "model_token", "model": e["zebra"], "token_id": 3}, "force": True}}}})
    ours = run_ours(config, tmp_path / "ours")
    assert_same_output(run_mergekit(config, tmp_path / "mk"), ours)
    out = tensors(ours)["model.embed_tokens.weight"]
    tok = AutoTokenizer.from_pretrained(ours)
    provenance = json.loads((ours / "mergeflow.json").read_text())["vocabulary"]
    assert provenance["source"] == "union" and (provenance["tokens"], provenance["rows"]) == (101, 112)
    assert len(tok) == 101 and out.shape[0] == 112  # 96 + 4 + <extra>, padded to a multiple of 16
    assert torch.equal(out[tok.convert_tokens_to_ids("<|im_end|>")], torch.zeros(out.shape[1]))
    # padding rows: the mean of the token rows (of every model, then merged: equal rows)
    assert torch.allclose(out[101:], out[:101].mean(0).expand(11, -1), atol=1e-6)


# ------------------------------------------------------------------------------------------------ paper mode


def test_union_is_independent_of_the_experts_order_in_paper_mode(tokens: TokenFamily) -> None:
    base, e = tokens.get("llama")

    def run(order: list[str]) -> dict[str, torch.Tensor]:
        return merge_state_dict(parse_recipe({
            "merge_method": "task_arithmetic", "base_model": base, "tokenizer_source": "union",
            "models": _models([e[k] for k in order], [{"chat": 0.5, "tools": 0.3, "zebra": 0.7}[k] for k in order])}),
            threads=1)

    a, b = run(["chat", "tools", "zebra"]), run(["zebra", "tools", "chat"])
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # a token only one expert has keeps that expert's rows whatever the weights (every Δ of that row is zero)
    recipe = parse_recipe({"merge_method": "task_arithmetic", "base_model": base, "tokenizer_source": "union",
                           "models": _models([e["chat"], e["tools"], e["zebra"]])})
    plan = plan_merge(recipe, strict=False)
    plan.close()
    vocab = plan.vocabulary.tokenizer.get_vocab()
    zebra_rows = load_file(Path(e["zebra"]) / "model.safetensors")
    own = AutoTokenizer.from_pretrained(e["zebra"]).convert_tokens_to_ids("zebra")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(a[name][vocab["zebra"]], zebra_rows[name][own]), name
    # the base's tokens: a plain task-arithmetic merge of the rows (the experts keep the base's ids)
    base_rows = load_file(Path(base) / "model.safetensors")["model.embed_tokens.weight"]
    assert a["model.embed_tokens.weight"].shape[0] == 100
    assert not torch.equal(a["model.embed_tokens.weight"][:96], base_rows)


def test_global_ties_trims_the_realigned_task_vectors(tokens: TokenFamily) -> None:
    """Paper-mode TIES takes its global magnitude thresholds over the experts' Δ after the rows are aligned by
    token; a token one expert added has Δ = 0 everywhere and keeps that expert's row."""
    base, e = tokens.get("llama")
    recipe = parse_recipe({"merge_method": "ties", "base_model": base, "tokenizer_source": "union",
                           "models": _models([e["chat"], e["tools"]], [0.6, 0.4]), "parameters": {"density": 0.4}})
    plan = plan_merge(recipe)
    try:
        assert plan.thresholds is not None and all(t > 0 for t in plan.thresholds)
        vocab = plan.vocabulary.tokenizer.get_vocab()
    finally:
        plan.close()
    merged = merge_state_dict(recipe, threads=1)
    tools = load_file(Path(e["tools"]) / "model.safetensors")
    own = AutoTokenizer.from_pretrained(e["tools"]).convert_tokens_to_ids("<tool_call>")
    assert torch.equal(merged["lm_head.weight"][vocab["<tool_call>"]], tools["lm_head.weight"][own])
    assert merged["model.embed_tokens.weight"].shape[0] == len(vocab) == 99


# ------------------------------------------------------------------------------------------ check and refusals


def _write_recipe(folder: Path, data: dict[str, Any]) -> Path:
    import yaml

    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_check_reports_the_vocabularies_and_what_tokenizer_source_does(tokens: TokenFamily,
                                                                       tmp_path: Path) -> None:
    base, e = tokens.get("llama")
    data = {"merge_method": "task_arithmetic", "base_model": base, "models": _models([e["chat"], e["tools"]])}
    result = cli("check", str(_write_recipe(tmp_path, data)))
    assert result.exit_code == 2
    assert "vocabulary sizes differ" in result.output and "tokenizer_source: base" in result.output
    with pytest.raises(IncompatibleModelsError, match="tokenizer_source"):
        merge_state_dict(parse_recipe(data))

    result = cli("check", str(_write_recipe(tmp_path, {**data, "tokenizer_source": "union"})))
    assert result.exit_code == 0, result.output
    text = result.output
    assert "vocabulary:" in text and "tokenizer_source union" in text
    assert "'<tool_call>'" in text and "lacks" in text
    assert "take its rows in every model" in text  # <|im_end|> (chat only), <tool_call> (tools only)

    result = cli("check", "--json", str(_write_recipe(tmp_path, {**data, "tokenizer_source": "base"})))
    report = json.loads(result.output)
    assert report["ok"] and any("dropped" in line for line in report["vocabulary"])


def test_same_rows_different_tokens_are_reported(tokens: TokenFamily, tmp_path: Path) -> None:
    """Two experts with equally many rows but other tokens: merged by index (mergekit's behaviour without a
    tokenizer_source), with a warning that says how the vocabularies differ."""
    base, e = tokens.get("llama")
    same_size = make_expert_with_tokens(Path(base), tmp_path / "other", seed=14, special=("<a>", "<b>"))
    recipe = parse_recipe({"merge_method": "linear", "models": _models([e["chat"], str(same_size)])})
    plan = plan_merge(recipe, strict=False)
    plan.close()
    assert plan.report.ok
    assert any("merged by index" in w for w in plan.report.warnings)
    assert any("'<a>'" in line for line in plan.report.vocabulary)


def test_vocab_policy_still_merges_by_index_and_says_it_is_deprecated(tokens: TokenFamily) -> None:
    base, e = tokens.get("llama")
    recipe = parse_recipe({"merge_method": "task_arithmetic", "base_model": base, "vocab_policy": "base",
                           "models": _models([e["chat"]])})
    plan = plan_merge(recipe, strict=False)
    plan.close()
    assert plan.report.ok and any("deprecated" in w for w in plan.report.warnings)
    assert merge_state_dict(recipe, threads=1)["model.embed_tokens.weight"].shape[0] == 96


def test_bad_token_rules_are_refused_before_any_weight_is_read(tokens: TokenFamily) -> None:
    base, e = tokens.get("llama")
    common = {"merge_method": "task_arithmetic", "base_model": base, "models": _models([e["chat"], e["tools"]])}
    cases = [
        ({"tokens": {"<tool_call>": {"source": e["chat"]}}}, "has no token '<tool_call>'"),
        ({"tokens": {"<x>": {"source": "org/elsewhere"}}}, "not one of the merge's models"),
        ({"tokens": {"<x>": {"source": {"kind": "model_token", "model": base, "token_id": 500}}}}, "outside the 96"),
        ({"tokens": {"<x>": {"source": {"kind": "model_token", "model": base, "token": "<nope>"}}}}, "no token"),
    ]
    for section, needle in cases:
        with pytest.raises(RecipeError, match=needle):
            plan_merge(parse_recipe({**common, "tokenizer": {"source": "union", **section}}))


# ------------------------------------------------------------------------------------------------- importance


def test_estimators_score_each_expert_in_its_own_tokenizer(tokens: TokenFamily, tmp_path: Path) -> None:
    from mergeflow.importance.base import ImportanceRun, ModelRef, compute_coefficients
    from mergeflow.importance.data import load_task_data

    base, e = tokens.get("llama")
    rows = [("<|im_start|>user\nthe quick brown fox", "jumps"), ("nine plus three", "two")]
    task = load_task_data(str(write_jsonl(tmp_path / "task.jsonl", rows)), n=2)
    refs = [ModelRef(p, Path(p), f"sha256:{k}") for k, p in enumerate([e["chat"], e["tools"]])]
    base_ref = ModelRef(base, Path(base), "sha256:base")
    run = ImportanceRun("fisher", base_ref, refs, [task, task], {})
    assert "<|im_start|>" not in run.tokenizer().get_vocab()
    chat = run.tokenizer(refs[0])
    assert chat.get_vocab()["<|im_start|>"] == AutoTokenizer.from_pretrained(e["chat"]).get_vocab()["<|im_start|>"]
    assert run.tokenizer(refs[1]).get_vocab()["<|im_start|>"] != chat.get_vocab()["<|im_start|>"]
    # an estimator that runs the base and the experts on one encoding is refused before any model is read
    with pytest.raises(RecipeError, match=r"vocabulary of .* differs"):
        compute_coefficients("sens", base=base_ref, experts=refs, tasks=[task, task], use_cache=False)
    # fisher scores each expert alone: it runs, and the merge over the union consumes its coefficients
    recipe = parse_recipe({
        "merge_method": "linear", "tokenizer_source": "union",
        "models": [{"model": e["chat"], "task": str(tmp_path / "task.jsonl")},
                   {"model": e["tools"], "task": str(tmp_path / "task.jsonl")}],
        "importance": {"estimator": "fisher", "parameters": {"fisher": "empirical", "batch_size": 2,
                                                             "max_length": 32}, "data": {"n": 2}}})
    merged = merge_state_dict(recipe, threads=1)
    assert merged["model.embed_tokens.weight"].shape[0] == 99
    assert all(torch.isfinite(t).all() for t in merged.values())
