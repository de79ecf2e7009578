"""Architecture inference and partitions on tiny real checkpoints of four families (llama, mistral, qwen2, gpt2).

Golden values come from the tiny configs (hidden 32, 4 heads of 8, mistral/qwen2 with 2 kv heads, 2 blocks), not
from running the code under test: e.g. head h of llama is rows 8h..8h+7 of q/k/v and columns 8h..8h+7 of o_proj.
Partition rules follow docs/methods.md §1.3, D-1 and D-18.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeflow.architecture import Architecture, HeadLayout, TensorRole
from mergeflow.errors import ArchitectureError, RecipeError
from mergeflow.partitions import LEVELS, Partitioner, TensorPartition, block_of, is_block_partition

try:  # run as `python -m pytest` from the repository root, or with tests/ on sys.path (pytest's prepend mode)
    from tests.tiny_models import FAMILIES, make_config, make_model
except ImportError:  # pragma: no cover
    from tiny_models import FAMILIES, make_config, make_model  # type: ignore[no-redef]

HIDDEN, HEADS, HD, LAYERS, VOCAB = 32, 4, 8, 2, 96


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("arch")
    return {family: make_model(family, root / family, seed=0) for family in FAMILIES}


@pytest.fixture(scope="module")
def archs(folders: dict[str, Path]) -> dict[str, Architecture]:
    return {family: Architecture.from_folder(path) for family, path in folders.items()}


def _layout(axis: int, kind: str, size: int, kv: int = HEADS) -> HeadLayout:
    return HeadLayout(axis=axis, num_heads=HEADS, num_kv_heads=kv, head_dim=HD, segments=((kind, 0, size),))


def _rows(h: int, offset: int = 0) -> list[int]:
    return list(range(offset + h * HD, offset + (h + 1) * HD))


# ---------------------------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------------------------


def test_llama_roles(archs: dict[str, Architecture]) -> None:
    arch = archs["llama"]
    assert (arch.model_type, arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim,
            arch.vocab_size, arch.tie_word_embeddings, arch.conv1d) == ("llama", 2, 32, 4, 4, 8, 96, False, False)
    p = "model.layers.1."
    expected = {
        p + "self_attn.q_proj.weight": (1, "attn", "q", False, 1, _layout(0, "q", 32)),
        p + "self_attn.k_proj.weight": (1, "attn", "k", False, 1, _layout(0, "k", 32)),
        p + "self_attn.v_proj.weight": (1, "attn", "v", False, 1, _layout(0, "v", 32)),
        p + "self_attn.o_proj.weight": (1, "attn", "o", False, 0, _layout(1, "o", 32)),
        p + "mlp.gate_proj.weight": (1, "mlp", "mlp_in", False, 1, None),
        p + "mlp.up_proj.weight": (1, "mlp", "mlp_in", False, 1, None),
        p + "mlp.down_proj.weight": (1, "mlp", "mlp_out", False, 0, None),
        p + "input_layernorm.weight": (1, "attn", "norm", False, 0, None),            # D-18
        p + "post_attention_layernorm.weight": (1, "mlp", "norm", False, 0, None),    # D-18
        "model.embed_tokens.weight": (None, "embed", "embed", False, 1, None),
        "model.norm.weight": (None, "final_norm", "norm", False, 0, None),
        "lm_head.weight": (None, "lm_head", "lm_head", False, 1, None),
    }
    for name, (layer, module, kind, is_bias, hidden_axis, heads) in expected.items():
        role = arch.role(name)
        assert (role.layer_index, role.module, role.kind, role.is_bias, role.hidden_axis, role.heads, role.conv1d) == (
            layer, module, kind, is_bias, hidden_axis, heads, False), name
        assert role.dtype == "F32" and role.is_floating
    assert arch.role(p + "mlp.down_proj.weight").shape == (32, 64)
    assert len(arch.tensors) == 3 + 9 * LAYERS
    assert arch.block_tensors(0) == [n for n in arch.tensors if n.startswith("model.layers.0.")]
    assert len(arch.block_tensors(0)) == 9
    assert arch.role(p + "self_attn.q_proj.weight").short_name == "self_attn.q_proj.weight"


def test_mistral_gqa(archs: dict[str, Architecture]) -> None:
    arch = archs["mistral"]
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.tie_word_embeddings) == (4, 2, 8, False)
    k = arch.role("model.layers.0.self_attn.k_proj.weight")
    assert k.shape == (16, 32) and k.hidden_axis == 1
    assert k.heads == _layout(0, "k", 16, kv=2)
    assert arch.role("model.layers.0.self_attn.q_proj.weight").heads == _layout(0, "q", 32, kv=2)
    assert [k.heads.part_and_head(i) for i in (0, 7, 8, 15)] == [("k", 0), ("k", 0), ("k", 1), ("k", 1)]


def test_qwen2_tied_and_biases(archs: dict[str, Architecture]) -> None:
    arch = archs["qwen2"]
    assert arch.tie_word_embeddings and "lm_head.weight" not in arch.tensors
    q_bias = arch.role("model.layers.0.self_attn.q_proj.bias")
    assert (q_bias.kind, q_bias.is_bias, q_bias.hidden_axis, q_bias.shape) == ("q", True, None, (32,))
    assert q_bias.heads == _layout(0, "q", 32, kv=2)
    v_bias = arch.role("model.layers.0.self_attn.v_proj.bias")
    assert v_bias.heads == _layout(0, "v", 16, kv=2) and v_bias.hidden_axis is None


def test_gpt2_conv1d_fused_qkv(archs: dict[str, Architecture]) -> None:
    arch = archs["gpt2"]
    assert arch.conv1d and arch.tie_word_embeddings and arch.num_layers == 2 and arch.hidden_size == 32
    qkv = arch.role("transformer.h.0.attn.c_attn.weight")
    segments = (("q", 0, 32), ("k", 32, 64), ("v", 64, 96))
    assert (qkv.shape, qkv.module, qkv.kind, qkv.conv1d, qkv.hidden_axis) == ((32, 96), "attn", "qkv", True, 0)
    assert qkv.heads == HeadLayout(axis=1, num_heads=4, num_kv_heads=4, head_dim=8, segments=segments)
    qkv_bias = arch.role("transformer.h.0.attn.c_attn.bias")
    assert (qkv_bias.hidden_axis, qkv_bias.conv1d, qkv_bias.heads.axis, qkv_bias.heads.segments) == (
        None, False, 0, segments)
    # c_proj is the attention output inside attn and the MLP output inside mlp; Conv1D flips the hidden axis.
    o = arch.role("transformer.h.0.attn.c_proj.weight")
    assert (o.module, o.kind, o.conv1d, o.hidden_axis, o.heads) == ("attn", "o", True, 1, _layout(0, "o", 32))
    down = arch.role("transformer.h.1.mlp.c_proj.weight")
    assert (down.layer_index, down.module, down.kind, down.shape, down.hidden_axis) == (1, "mlp", "mlp_out", (128, 32), 1)
    up = arch.role("transformer.h.1.mlp.c_fc.weight")
    assert (up.kind, up.shape, up.hidden_axis, up.conv1d) == ("mlp_in", (32, 128), 0, True)
    assert arch.role("transformer.h.0.mlp.c_fc.bias").hidden_axis is None
    assert arch.role("transformer.h.0.mlp.c_proj.bias").hidden_axis == 0
    assert arch.role("transformer.h.0.attn.c_proj.bias").hidden_axis == 0
    assert (arch.role("transformer.h.0.ln_1.bias").module, arch.role("transformer.h.0.ln_2.weight").module) == (
        "attn", "mlp")
    wpe = arch.role("transformer.wpe.weight")
    assert (wpe.module, wpe.kind, wpe.hidden_axis, wpe.layer_index) == ("embed", "pos_embed", 1, None)
    assert arch.role("transformer.ln_f.bias").module == "final_norm"
    assert arch.role("transformer.wte.weight").kind == "embed"


def test_describe_is_json(archs: dict[str, Architecture]) -> None:
    summary = archs["gpt2"].describe()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["kinds"]["qkv"] == 4 and summary["conv1d"] is True and summary["num_tensors"] == 28
    # wte 96x32 + wpe 64x32 + ln_f 2x32 + per block: c_attn 32x96+96, c_proj 32x32+32, c_fc 32x128+128,
    # mlp c_proj 128x32+32, ln_1/ln_2 4x32.
    per_block = 32 * 96 + 96 + 32 * 32 + 32 + 32 * 128 + 128 + 128 * 32 + 32 + 4 * 32
    assert summary["num_parameters"] == 96 * 32 + 64 * 32 + 2 * 32 + 2 * per_block


def test_sharded_folder_matches_single_file(folders: dict[str, Path], archs: dict[str, Architecture],
                                            tmp_path: Path) -> None:
    # Two shards plus an index, written by hand: from_folder must read shapes from headers of both.
    state = load_file(folders["llama"] / "model.safetensors")
    names = list(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: state[n] for n in part}, str(tmp_path / file))
        weight_map.update(dict.fromkeys(part, file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text((folders["llama"] / "config.json").read_text())
    sharded = Architecture.from_folder(tmp_path)
    assert list(sharded.tensors) == list(weight_map)
    assert sharded.tensors == archs["llama"].tensors


def test_config_aliases_and_tied_detection(archs: dict[str, Architecture]) -> None:
    shapes = {n: r.shape for n, r in archs["llama"].tensors.items()}
    config = {"model_type": "x", "n_layer": 2, "d_model": 32, "n_head": 4, "vocab_size": 96}
    arch = Architecture.infer(config, shapes)
    assert (arch.num_layers, arch.hidden_size, arch.num_kv_heads, arch.head_dim) == (2, 32, 4, 8)
    assert not arch.tie_word_embeddings                      # no key, lm_head present: untied
    no_head = {n: s for n, s in shapes.items() if n != "lm_head.weight"}
    assert Architecture.infer(config, no_head).tie_word_embeddings       # no lm_head: tied
    assert Architecture.infer({**config, "tie_word_embeddings": False}, no_head).tie_word_embeddings
    assert Architecture.infer({**config, "tie_word_embeddings": True}, shapes).tie_word_embeddings
    # Multimodal configs keep text sizes under text_config.
    nested = Architecture.infer({"model_type": "y", "text_config": {**config, "num_key_value_heads": 4}}, shapes)
    assert nested.hidden_size == 32 and nested.model_type == "y"


def test_unknown_tensors(archs: dict[str, Architecture]) -> None:
    shapes = {n: r.shape for n, r in archs["llama"].tensors.items()}
    shapes["model.layers.0.mlp.router.weight"] = (6, 32)       # hidden on axis 1 only
    shapes["model.layers.0.self_attn.sinks"] = (4,)            # no hidden axis
    shapes["model.extra_square"] = (32, 32)                    # ambiguous: both axes are hidden-sized
    arch = Architecture.infer(json.loads(json.dumps(_config("llama"))), shapes)
    router = arch.role("model.layers.0.mlp.router.weight")
    assert (router.module, router.kind, router.hidden_axis) == ("mlp", "other", 1)
    sinks = arch.role("model.layers.0.self_attn.sinks")
    assert (sinks.module, sinks.kind, sinks.hidden_axis) == ("attn", "other", None)
    extra = arch.role("model.extra_square")
    assert (extra.layer_index, extra.module, extra.kind, extra.hidden_axis) == (None, "other", "other", None)
    with pytest.raises(ArchitectureError, match="nope"):
        arch.role("nope")


def _config(family: str) -> dict:
    return make_config(family).to_dict()


def test_interleaved_fused_qkv_layouts() -> None:
    # GPT-NeoX query_key_value: rows are [q_h, k_h, v_h] per head; Falcon (GQA): [q heads of group g, k_g, v_g].
    neox = HeadLayout(axis=0, num_heads=2, num_kv_heads=2, head_dim=2,
                      segments=(("q", 0, 4), ("k", 4, 8), ("v", 8, 12)), interleave="per_group")
    assert [neox.part_and_head(i) for i in range(0, 12, 2)] == [
        ("q", 0), ("k", 0), ("v", 0), ("q", 1), ("k", 1), ("v", 1)]
    falcon = HeadLayout(axis=0, num_heads=4, num_kv_heads=2, head_dim=1,
                        segments=(("q", 0, 4), ("k", 4, 6), ("v", 6, 8)), interleave="per_group")
    assert [falcon.part_and_head(i) for i in range(8)] == [
        ("q", 0), ("q", 1), ("k", 0), ("v", 0), ("q", 2), ("q", 3), ("k", 1), ("v", 1)]
    assert falcon.indices("q", 2) == [4] and falcon.indices("v", 1) == [7]
    shapes = {"gpt_neox.embed_in.weight": (10, 4), "embed_out.weight": (10, 4),
              "gpt_neox.final_layer_norm.weight": (4,),
              "gpt_neox.layers.0.attention.query_key_value.weight": (12, 4),
              "gpt_neox.layers.0.attention.dense.weight": (4, 4),
              "gpt_neox.layers.0.mlp.dense_h_to_4h.weight": (16, 4),
              "gpt_neox.layers.0.mlp.dense_4h_to_h.weight": (4, 16),
              "gpt_neox.layers.0.input_layernorm.weight": (4,),
              "gpt_neox.layers.0.post_attention_layernorm.weight": (4,)}
    arch = Architecture.infer({"model_type": "gpt_neox", "num_hidden_layers": 1, "hidden_size": 4,
                               "num_attention_heads": 2, "vocab_size": 10, "tie_word_embeddings": False}, shapes)
    qkv = arch.role("gpt_neox.layers.0.attention.query_key_value.weight")
    assert (qkv.kind, qkv.hidden_axis, qkv.heads.interleave, qkv.conv1d) == ("qkv", 1, "per_group", False)
    assert arch.role("gpt_neox.layers.0.attention.dense.weight").kind == "o"
    assert arch.role("embed_out.weight").kind == "lm_head"
    assert arch.role("gpt_neox.final_layer_norm.weight").module == "final_norm"
    head1 = Partitioner(arch, "head_mlp").members("layer.0.head.1")
    assert ("gpt_neox.layers.0.attention.query_key_value.weight", 0, [6, 7, 8, 9, 10, 11]) in head1


def test_other_families_by_name_and_shape() -> None:
    # Gemma-2 style: post_attention_layernorm is a post-norm of attention when pre/post_feedforward norms exist;
    # Qwen-3 style q/k norms are per head and have no residual axis.
    h = 8
    blk = {"self_attn.q_proj.weight": (8, h), "self_attn.k_proj.weight": (4, h), "self_attn.v_proj.weight": (4, h),
           "self_attn.o_proj.weight": (h, 8), "self_attn.q_norm.weight": (4,), "input_layernorm.weight": (h,),
           "post_attention_layernorm.weight": (h,), "pre_feedforward_layernorm.weight": (h,),
           "mlp.gate_proj.weight": (12, h), "mlp.up_proj.weight": (12, h), "mlp.down_proj.weight": (h, 12)}
    shapes = {"model.embed_tokens.weight": (10, h), "model.norm.weight": (h,),
              **{f"model.layers.0.{k}": v for k, v in blk.items()}}
    config = {"model_type": "g", "num_hidden_layers": 1, "hidden_size": h, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 4, "vocab_size": 10}
    arch = Architecture.infer(config, shapes)
    assert arch.role("model.layers.0.post_attention_layernorm.weight").module == "attn"
    assert arch.role("model.layers.0.pre_feedforward_layernorm.weight").module == "mlp"
    q_norm = arch.role("model.layers.0.self_attn.q_norm.weight")
    assert (q_norm.module, q_norm.kind, q_norm.hidden_axis) == ("attn", "norm", None)
    assert arch.tie_word_embeddings
    # GPT-BigCode: c_attn is an nn.Linear [q + k + v, hidden] with one kv head (multi_query); the name is GPT-2's
    # but the non-square shape says [out, in], so orientation is not taken from the name or model_type.
    shapes = {"transformer.wte.weight": (10, h), "transformer.ln_f.weight": (h,),
              "transformer.h.0.attn.c_attn.weight": (16, h), "transformer.h.0.attn.c_proj.weight": (h, h),
              "transformer.h.0.mlp.c_fc.weight": (32, h), "transformer.h.0.mlp.c_proj.weight": (h, 32)}
    arch = Architecture.infer({"model_type": "gpt_bigcode", "n_layer": 1, "n_embd": h, "n_head": 2,
                               "multi_query": True, "vocab_size": 10}, shapes)
    qkv = arch.role("transformer.h.0.attn.c_attn.weight")
    assert (arch.conv1d, arch.num_kv_heads, qkv.conv1d, qkv.hidden_axis) == (False, 1, False, 1)
    assert qkv.heads.segments == (("q", 0, 8), ("k", 8, 12), ("v", 12, 16))
    assert arch.role("transformer.h.0.attn.c_proj.weight").hidden_axis == 0


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def test_contradicting_shapes_raise(archs: dict[str, Architecture]) -> None:
    shapes = {n: r.shape for n, r in archs["llama"].tensors.items()}
    config = _config("llama")
    q = "model.layers.1.self_attn.q_proj.weight"
    with pytest.raises(ArchitectureError, match=r"q_proj\.weight.*\[24, 32\]"):
        Architecture.infer(config, {**shapes, q: (24, 32)})
    with pytest.raises(ArchitectureError, match="k_proj"):   # llama is MHA: k must be 32 rows, not GQA's 16
        Architecture.infer(config, {**shapes, "model.layers.0.self_attn.k_proj.weight": (16, 32)})
    with pytest.raises(ArchitectureError, match="down_proj"):
        Architecture.infer(config, {**shapes, "model.layers.0.mlp.down_proj.weight": (30, 64)})
    with pytest.raises(ArchitectureError, match="embed_tokens"):
        Architecture.infer(config, {**shapes, "model.embed_tokens.weight": (96, 30)})
    with pytest.raises(ArchitectureError, match="input_layernorm"):
        Architecture.infer(config, {**shapes, "model.layers.0.input_layernorm.weight": (30,)})
    with pytest.raises(ArchitectureError, match="3 decoder blocks"):
        Architecture.infer({**config, "num_hidden_layers": 3}, shapes)
    with pytest.raises(ArchitectureError, match="hidden_size"):
        Architecture.infer({k: v for k, v in config.items() if k != "hidden_size"}, shapes)
    # One MLP matrix stored [in, out] while the rest is [out, in]: the layouts disagree.
    with pytest.raises(ArchitectureError, match="disagree"):
        Architecture.infer(config, {**shapes, "model.layers.0.mlp.up_proj.weight": (32, 64)})


def test_gqa_head_level_needs_policy(archs: dict[str, Architecture]) -> None:
    for family in ("mistral", "qwen2"):
        with pytest.raises(ArchitectureError, match="gqa_policy"):
            Partitioner(archs[family], "head_mlp")
    with pytest.raises(RecipeError, match="level"):
        Partitioner(archs["llama"], "neurons")
    with pytest.raises(RecipeError, match="hidden_state_mode"):
        Partitioner(archs["llama"], "hidden_state", hidden_state_mode="columns")
    with pytest.raises(RecipeError, match="gqa_policy"):
        Partitioner(archs["llama"], "head_mlp", gqa_policy="mean")
    with pytest.raises(ArchitectureError, match="unknown partition"):
        Partitioner(archs["llama"], "layer").members("layer.7")


# ---------------------------------------------------------------------------------------------------------------
# Partitions
# ---------------------------------------------------------------------------------------------------------------


def _partitioners(archs: dict[str, Architecture]) -> list[tuple[str, Partitioner]]:
    out = []
    for family, arch in archs.items():
        for level in LEVELS:
            policies = ["group"] if level == "head_mlp" and arch.num_kv_heads < arch.num_heads else [None]
            if level == "head_mlp" and arch.num_kv_heads == arch.num_heads:
                policies.append("group")
            modes = ["residual", "per_layer_rows"] if level == "hidden_state" else ["residual"]
            for policy in policies:
                for mode in modes:
                    out.append((f"{family}/{level}/{policy}/{mode}",
                                Partitioner(arch, level, hidden_state_mode=mode, gqa_policy=policy)))
    return out


def test_members_are_disjoint_and_complete(archs: dict[str, Architecture]) -> None:
    for case, part in _partitioners(archs):
        arch = part.arch
        counts = {n: torch.zeros(r.shape, dtype=torch.int32) for n, r in arch.tensors.items()}
        owner = {n: torch.full(r.shape, -1, dtype=torch.float32) for n, r in arch.tensors.items()}
        ids = part.partition_ids()
        assert len(ids) == len(set(ids)), case
        for k, pid in enumerate(ids):
            for tensor, axis, indices in part.members(pid):
                if axis is None:
                    assert indices is None
                    counts[tensor] += 1
                    owner[tensor].fill_(k)
                else:
                    idx = torch.tensor(indices)
                    counts[tensor].index_add_(axis, idx, torch.ones_like(counts[tensor].index_select(axis, idx)))
                    owner[tensor].index_fill_(axis, idx, float(k))
        for name, count in counts.items():
            assert torch.equal(count, torch.ones_like(count)), f"{case}: {name} not covered exactly once"
            # partition() must agree with members(): expanding partition indices reproduces the owner map.
            tp = part.partition(name)
            values = {pid: float(k) for k, pid in enumerate(ids)}
            expanded = tp.expand(values, -1.0, arch.tensors[name].shape).expand(arch.tensors[name].shape)
            assert torch.equal(expanded, owner[name]), f"{case}: {name}"


def test_layer_and_attn_mlp_labels(archs: dict[str, Architecture]) -> None:
    layer = Partitioner(archs["llama"], "layer")
    assert layer.partition_ids() == ["embed", "layer.0", "layer.1", "head"]
    assert sorted(t for t, _, _ in layer.members("head")) == ["lm_head.weight", "model.norm.weight"]
    assert layer.members("embed") == [("model.embed_tokens.weight", None, None)]
    assert sorted(t for t, _, _ in layer.members("layer.1")) == sorted(archs["llama"].block_tensors(1))
    attn_mlp = Partitioner(archs["llama"], "attn_mlp")
    assert attn_mlp.partition_ids() == ["embed", "layer.0.attn", "layer.0.mlp", "layer.1.attn", "layer.1.mlp", "head"]
    assert sorted(t.split(".", 3)[3] for t, _, _ in attn_mlp.members("layer.0.attn")) == [
        "input_layernorm.weight", "self_attn.k_proj.weight", "self_attn.o_proj.weight", "self_attn.q_proj.weight",
        "self_attn.v_proj.weight"]
    assert sorted(t.split(".", 3)[3] for t, _, _ in attn_mlp.members("layer.0.mlp")) == [
        "mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "post_attention_layernorm.weight"]
    gpt2 = Partitioner(archs["gpt2"], "layer")
    assert sorted(t for t, _, _ in gpt2.members("embed")) == ["transformer.wpe.weight", "transformer.wte.weight"]
    assert sorted(t for t, _, _ in gpt2.members("head")) == ["transformer.ln_f.bias", "transformer.ln_f.weight"]
    assert [t for t, _, _ in Partitioner(archs["qwen2"], "layer").members("head")] == ["model.norm.weight"]
    assert (block_of("layer.1.head.3"), block_of("layer.10"), block_of("embed"), block_of("hidden.3")) == (
        1, 10, None, None)
    assert is_block_partition("layer.0.mlp") and not is_block_partition("head")
    assert layer.block_of("layer.1") == 1 and not layer.is_block_partition("embed")
    assert Partitioner(archs["llama"], "model").partition_ids() == ["model"]
    matrix = Partitioner(archs["llama"], "matrix")
    assert sorted(matrix.partition_ids()) == sorted(archs["llama"].tensors)
    assert matrix.members("lm_head.weight") == [("lm_head.weight", None, None)]


def test_head_mlp_llama(archs: dict[str, Architecture]) -> None:
    part = Partitioner(archs["llama"], "head_mlp")
    p = "model.layers.1.self_attn."
    assert [i for i in part.partition_ids() if i.startswith("layer.1.")] == [
        "layer.1.attn_norm", "layer.1.head.0", "layer.1.head.1", "layer.1.head.2", "layer.1.head.3", "layer.1.mlp"]
    for h in range(HEADS):
        assert sorted(part.members(f"layer.1.head.{h}")) == sorted([
            (p + "q_proj.weight", 0, _rows(h)), (p + "k_proj.weight", 0, _rows(h)),
            (p + "v_proj.weight", 0, _rows(h)), (p + "o_proj.weight", 1, _rows(h))])
    assert part.members("layer.1.attn_norm") == [("model.layers.1.input_layernorm.weight", None, None)]
    assert ("model.layers.1.post_attention_layernorm.weight", None, None) in part.members("layer.1.mlp")


def test_head_mlp_gqa_groups(archs: dict[str, Architecture]) -> None:
    # mistral: 4 q heads, 2 kv heads -> group g = q heads 2g, 2g+1 (rows 16g..16g+15), kv head g (rows 8g..8g+7).
    part = Partitioner(archs["mistral"], "head_mlp", gqa_policy="group")
    p = "model.layers.0.self_attn."
    assert [i for i in part.partition_ids() if i.startswith("layer.0.")] == [
        "layer.0.attn_norm", "layer.0.group.0", "layer.0.group.1", "layer.0.mlp"]
    for g in range(2):
        q_rows = list(range(16 * g, 16 * (g + 1)))
        assert sorted(part.members(f"layer.0.group.{g}")) == sorted([
            (p + "q_proj.weight", 0, q_rows), (p + "k_proj.weight", 0, _rows(g)),
            (p + "v_proj.weight", 0, _rows(g)), (p + "o_proj.weight", 1, q_rows)])
    qwen = Partitioner(archs["qwen2"], "head_mlp", gqa_policy="group")
    group1 = dict((t, idx) for t, _, idx in qwen.members("layer.0.group.1"))
    assert group1[p + "q_proj.bias"] == list(range(16, 32)) and group1[p + "k_proj.bias"] == _rows(1)


def test_head_mlp_gpt2_fused(archs: dict[str, Architecture]) -> None:
    # c_attn is Conv1D [32, 96]: head h owns output columns 8h.., 32+8h.., 64+8h.. (its q, k and v slices).
    part = Partitioner(archs["gpt2"], "head_mlp")
    p = "transformer.h.0.attn."
    for h in range(HEADS):
        qkv = _rows(h) + _rows(h, 32) + _rows(h, 64)
        assert sorted(part.members(f"layer.0.head.{h}")) == sorted([
            (p + "c_attn.weight", 1, qkv), (p + "c_attn.bias", 0, qkv),
            (p + "c_proj.weight", 0, _rows(h))])   # Conv1D o: input (head) axis is 0
    assert part.members("layer.0.attn_shared") == [(p + "c_proj.bias", None, None)]
    assert sorted(t for t, _, _ in part.members("layer.0.attn_norm")) == [
        "transformer.h.0.ln_1.bias", "transformer.h.0.ln_1.weight"]


def test_hidden_state_residual(archs: dict[str, Architecture]) -> None:
    part = Partitioner(archs["llama"], "hidden_state")
    ids = part.partition_ids()
    assert ids == [f"hidden.{j}" for j in range(HIDDEN)]   # llama has no q/k/v biases: nothing ungrouped
    j = 5
    members = {t: (axis, idx) for t, axis, idx in part.members(f"hidden.{j}")}
    assert len(members) == len(archs["llama"].tensors)
    p = "model.layers.0."
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        assert members[p + name + ".weight"] == (1, [j])          # readers: column j
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        assert members[p + name + ".weight"] == (0, [j])          # writers: row j
    for name in (p + "input_layernorm.weight", p + "post_attention_layernorm.weight", "model.norm.weight"):
        assert members[name] == (0, [j])
    assert members["model.embed_tokens.weight"] == (1, [j]) and members["lm_head.weight"] == (1, [j])
    # Tensors without a d_model axis stay ungrouped (D-1).
    qwen = Partitioner(archs["qwen2"], "hidden_state")
    assert qwen.partition_ids()[-1] == "ungrouped"
    assert sorted(t.rsplit(".", 2)[1] for t, _, _ in qwen.members("ungrouped")) == ["k_proj"] * 2 + ["q_proj"] * 2 + [
        "v_proj"] * 2
    gpt2 = {t: (axis, idx) for t, axis, idx in Partitioner(archs["gpt2"], "hidden_state").members("hidden.3")}
    assert gpt2["transformer.h.1.attn.c_attn.weight"] == (0, [3])    # Conv1D reader: row 3
    assert gpt2["transformer.h.1.mlp.c_proj.weight"] == (1, [3])     # Conv1D writer: column 3
    assert gpt2["transformer.h.1.attn.c_proj.bias"] == (0, [3]) and gpt2["transformer.wpe.weight"] == (1, [3])
    assert "transformer.h.1.attn.c_attn.bias" not in gpt2


def test_hidden_state_per_layer_rows(archs: dict[str, Architecture]) -> None:
    part = Partitioner(archs["llama"], "hidden_state", hidden_state_mode="per_layer_rows")
    assert part.members("layer.1.self_attn.q_proj.weight.row.5") == [("model.layers.1.self_attn.q_proj.weight", 0, [5])]
    assert part.members("layer.0.mlp.down_proj.weight.row.31") == [("model.layers.0.mlp.down_proj.weight", 0, [31])]
    assert "embed" in part.partition_ids() and "head" in part.partition_ids()
    # 9 block tensors per layer: q,k,v,o (32 rows each), gate/up (64), down (32), 2 norms (32).
    assert sum(1 for i in part.partition_ids() if block_of(i) == 0) == 4 * 32 + 2 * 64 + 32 + 2 * 32
    gpt2 = Partitioner(archs["gpt2"], "hidden_state", hidden_state_mode="per_layer_rows")
    # Conv1D keeps output units on axis 1: c_attn has 96 of them.
    assert gpt2.members("layer.0.attn.c_attn.weight.row.95") == [("transformer.h.0.attn.c_attn.weight", 1, [95])]


def test_expand_values(archs: dict[str, Architecture]) -> None:
    part = Partitioner(archs["llama"], "head_mlp")
    q = "model.layers.0.self_attn.q_proj.weight"
    values = {"layer.0.head.1": 2.0, "layer.0.head.3": -1.0}
    vec = part.partition(q).expand(values, 0.5, (32, 32))
    assert vec.dtype == torch.float32 and vec.shape == (32, 1)
    expected = torch.full((32,), 0.5)
    expected[8:16], expected[24:32] = 2.0, -1.0
    assert torch.equal(vec[:, 0], expected)
    o = part.partition("model.layers.0.self_attn.o_proj.weight").expand(values, 0.5, (32, 32))
    assert o.shape == (1, 32) and torch.equal(o[0], expected)
    weight = torch.ones(32, 32)
    assert torch.equal((weight * vec)[:, 7], expected)   # broadcasts along rows
    scalar = part.partition("model.layers.0.mlp.up_proj.weight").expand({"layer.0.mlp": 3.0}, 0.0, (64, 32))
    assert scalar.shape == () and scalar.item() == 3.0
    assert part.partition("model.norm.weight").expand({}, 0.25, (32,)).item() == 0.25   # default
    with pytest.raises(ValueError, match="shape"):
        part.partition(q).expand(values, 0.0, (16, 32))
    tp = TensorPartition("t", 0, ("a", "b", "a"))
    assert tp.unique_labels() == ["a", "b"] and tp.indices("a") == [0, 2]
    assert torch.equal(tp.expand({"b": 1.0}, 0.0, (3, 2)), torch.tensor([[0.0], [1.0], [0.0]]))


def test_role_type(archs: dict[str, Architecture]) -> None:
    # Roles are frozen values: usable as dict keys and safe to share between threads.
    role = archs["llama"].role("lm_head.weight")
    assert isinstance(role, TensorRole) and hash(role) == hash(archs["llama"].role("lm_head.weight"))
    with pytest.raises(AttributeError):
        role.kind = "embed"  # type: ignore[misc]
