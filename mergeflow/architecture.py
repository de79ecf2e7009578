"""What a model is made of, inferred from its config and its tensor names and shapes.

There are no per-family tables: a tensor's role comes from name tokens that the common decoder families share
(``layers.3``/``h.3`` for the block, ``self_attn``/``attn``/``mlp`` for the module, ``q_proj``/``c_attn``/``down_proj``/…
for the matrix), and the layout (``nn.Linear`` ``[out, in]`` vs GPT-2 ``Conv1D`` ``[in, out]``) comes from the shapes.
Every shape is checked against the config so that a wrong inference fails loudly, naming the tensor, instead of
producing silently wrong partitions.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from mergeflow.errors import ArchitectureError, CheckpointError

# ---------------------------------------------------------------------------------------------------------------
# Name vocabularies (tokens of a dotted tensor name, lower-cased). Shared across families, not keyed by model_type.
# ---------------------------------------------------------------------------------------------------------------

_BLOCK_TOKENS = frozenset({"layers", "h", "blocks", "layer", "block"})
_ATTN_MODULE_TOKENS = frozenset({"self_attn", "attn", "attention", "self_attention"})
_MLP_MODULE_TOKENS = frozenset({"mlp", "feed_forward", "ffn", "block_sparse_moe", "moe"})

_Q = frozenset({"q_proj", "query", "wq", "q", "q_lin"})
_K = frozenset({"k_proj", "key", "wk", "k", "k_lin"})
_V = frozenset({"v_proj", "value", "wv", "v", "v_lin"})
_O = frozenset({"o_proj", "out_proj", "wo", "dense", "o", "c_proj", "out_lin"})
_QKV = frozenset({"c_attn", "qkv_proj", "query_key_value", "wqkv", "qkv"})
_MLP_IN = frozenset({"gate_proj", "up_proj", "gate_up_proj", "c_fc", "w1", "w3", "fc1", "fc_in", "dense_h_to_4h"})
_MLP_OUT = frozenset({"down_proj", "c_proj", "w2", "fc2", "fc_out", "dense_4h_to_h"})

_EMBED = frozenset({"embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in"})
_POS_EMBED = frozenset({"wpe", "position_embeddings", "embed_positions"})
_LM_HEAD = frozenset({"lm_head", "embed_out", "output"})

# Pre-norms named after the sub-layer they feed (docs/methods.md D-18: input_layernorm -> attn, post_attention_layernorm -> mlp).
_ATTN_NORMS = frozenset({"input_layernorm", "ln_1", "attention_norm", "ln_attn", "norm1", "pre_attention_layernorm"})
_MLP_NORMS = frozenset({"post_attention_layernorm", "ln_2", "ffn_norm", "ln_mlp", "norm2",
                        "pre_feedforward_layernorm", "post_feedforward_layernorm"})

# Fused qkv names whose output rows are interleaved per head / per kv group (GPT-NeoX, Bloom, Falcon) rather than
# laid out as [all q | all k | all v] (GPT-2 c_attn, Phi-3 qkv_proj, MPT Wqkv). Shapes cannot tell these apart.
_INTERLEAVED_QKV = frozenset({"query_key_value"})

_READING = frozenset({"q", "k", "v", "qkv", "mlp_in"})   # read the residual stream: hidden is the input axis
_WRITING = frozenset({"o", "mlp_out"})                    # write the residual stream: hidden is the output axis

_CONFIG_ALIASES: dict[str, tuple[str, ...]] = {
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_heads": ("num_attention_heads", "n_head"),
    "num_kv_heads": ("num_key_value_heads", "num_kv_heads"),
    "head_dim": ("head_dim",),
    "vocab_size": ("vocab_size",),
}


@dataclass(frozen=True)
class HeadLayout:
    """How one attention tensor is split into heads along ``axis``.

    ``segments`` are the ``(part, start, stop)`` ranges of q, k and v (or the single "q"/"k"/"v"/"o" part of an
    unfused tensor) along ``axis`` when ``interleave == "none"``. Interleaved fused layouts (``query_key_value``)
    repeat ``[q heads of the group, k, v]`` per kv group instead; use :meth:`part_and_head` / :meth:`indices`, which
    handle every layout, rather than reading ``segments`` directly.
    """

    axis: int
    num_heads: int        # query heads
    num_kv_heads: int
    head_dim: int
    segments: tuple[tuple[str, int, int], ...]
    interleave: str = "none"   # "none" | "per_group" (GPT-NeoX/Bloom: groups of one q head; Falcon: GQA groups)

    @property
    def size(self) -> int:
        return self.segments[-1][2]

    def part_and_head(self, index: int) -> tuple[str, int]:
        """The part ("q", "k", "v" or "o") and head of slice ``index`` along ``axis``.

        The head is a query-head index for "q" and "o" and a kv-head index for "k" and "v".
        """
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} outside 0..{self.size - 1}")
        hd = self.head_dim
        if self.interleave == "per_group":
            q_per_group = self.num_heads // self.num_kv_heads
            group, rest = divmod(index, (q_per_group + 2) * hd)
            slot = rest // hd
            if slot < q_per_group:
                return "q", group * q_per_group + slot
            return ("k" if slot == q_per_group else "v"), group
        for part, start, stop in self.segments:
            if start <= index < stop:
                return part, (index - start) // hd
        raise AssertionError("segments cover the axis")  # pragma: no cover - guarded by the range check

    def indices(self, part: str, head: int) -> list[int]:
        """Slices along ``axis`` of ``head`` in ``part`` (q/o: query head; k/v: kv head)."""
        return [i for i in range(self.size) if self.part_and_head(i) == (part, head)]


@dataclass(frozen=True)
class TensorRole:
    name: str
    shape: tuple[int, ...]
    layer_index: int | None   # decoder block index; None outside blocks
    module: str               # in blocks "attn" | "mlp" | "other"; outside "embed" | "final_norm" | "lm_head" | "other"
    kind: str                 # q k v qkv o mlp_in mlp_out norm embed pos_embed lm_head other
    is_bias: bool
    hidden_axis: int | None   # axis indexing the residual stream (d_model); None when the tensor has none
    heads: HeadLayout | None  # q/k/v/qkv/o weights and q/k/v/qkv biases
    conv1d: bool              # a 2-D weight stored [in, out] (GPT-2 Conv1D) instead of nn.Linear's [out, in]
    dtype: str | None = None  # safetensors dtype ("F32", "BF16", "BOOL", ...) when known
    expert: int | None = None  # routed MoE expert (``mlp.experts.3.w1``: 3) of an MLP tensor; None otherwise

    @property
    def is_floating(self) -> bool:
        # Unknown dtype counts as floating: every learned parameter is, and integer buffers are rare in checkpoints.
        return self.dtype is None or self.dtype.startswith(("F", "BF"))

    @property
    def short_name(self) -> str:
        """The name below the block index (``self_attn.q_proj.weight``), or the full name outside blocks."""
        if self.layer_index is None:
            return self.name
        tokens = self.name.split(".")
        for i in range(len(tokens) - 1):
            if tokens[i].lower() in _BLOCK_TOKENS and tokens[i + 1] == str(self.layer_index):
                return ".".join(tokens[i + 2:])
        return self.name  # pragma: no cover - layer_index always comes from such a token pair


@dataclass(frozen=True)
class Architecture:
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    conv1d: bool
    tensors: dict[str, TensorRole] = field(repr=False, hash=False)   # in checkpoint order; hash the sizes only

    # -- construction --------------------------------------------------------------------------------------------

    @classmethod
    def infer(cls, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
              dtypes: Mapping[str, str] | None = None) -> Architecture:
        """Infer the architecture from a ``config.json`` dict and the checkpoint's tensor shapes (and dtypes)."""
        sizes = _read_sizes(config)
        shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
        dtypes = dict(dtypes or {})
        parsed = {name: _parse_name(name) for name in shapes}
        _check_blocks(parsed, sizes["num_layers"])
        post_norm_blocks = _blocks_with_post_norms(parsed)

        # First pass: names -> (layer, module, kind); second: orientation, which needs evidence from all tensors.
        roles0: dict[str, tuple[int | None, str, str, bool]] = {}
        for name, (layer, tokens) in parsed.items():
            module, kind = _module_and_kind(tokens, layer, layer in post_norm_blocks)
            roles0[name] = (layer, module, kind, tokens[-1] == "bias")
        conv1d = _model_orientation(roles0, shapes, sizes)

        tensors = {
            name: _make_role(name, shapes[name], dtypes.get(name), *roles0[name], parsed[name][1], conv1d, sizes)
            for name in shapes
        }
        has_lm_head = any(r.kind == "lm_head" for r in tensors.values())
        tied = _tied(config, has_lm_head)
        return cls(
            model_type=str(_lookup(config, ("model_type",)) or "unknown"),
            num_layers=sizes["num_layers"],
            hidden_size=sizes["hidden_size"],
            num_heads=sizes["num_heads"],
            num_kv_heads=sizes["num_kv_heads"],
            head_dim=sizes["head_dim"],
            vocab_size=sizes["vocab_size"],
            tie_word_embeddings=tied,
            conv1d=conv1d,
            tensors=tensors,
        )

    @classmethod
    def from_folder(cls, path: Path) -> Architecture:
        """Read ``config.json`` and the safetensors headers of a checkpoint folder; no tensor data is loaded."""
        path = Path(path)
        config_path = path / "config.json"
        try:
            config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read {config_path}: {exc}") from exc

        index_path = path / "model.safetensors.index.json"
        weight_map: dict[str, str] = {}
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"cannot read {index_path}: {exc}") from exc
            order = list(weight_map)
            files = list(dict.fromkeys(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
            order = []
        if not files:
            raise CheckpointError(f"no safetensors files in {path}")

        shapes: dict[str, tuple[int, ...]] = {}
        dtypes: dict[str, str] = {}
        for file in files:
            try:
                with safe_open(str(path / file), framework="pt") as handle:
                    for name in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                        if order and weight_map.get(name) != file:
                            continue  # the index says this tensor lives elsewhere
                        tensor_slice = handle.get_slice(name)
                        shapes[name] = tuple(tensor_slice.get_shape())
                        dtypes[name] = str(tensor_slice.get_dtype())
            except (OSError, SafetensorError) as exc:
                raise CheckpointError(f"cannot read safetensors header of {path / file}: {exc}") from exc
        if order:
            missing = [n for n in order if n not in shapes]
            if missing:
                raise CheckpointError(f"{index_path} lists tensors absent from their shards: {missing[:5]}")
            shapes = {n: shapes[n] for n in order}
        return cls.infer(config, shapes, dtypes)

    # -- queries -------------------------------------------------------------------------------------------------

    def role(self, name: str) -> TensorRole:
        try:
            return self.tensors[name]
        except KeyError:
            raise ArchitectureError(f"unknown tensor {name!r} (not in this {self.model_type} checkpoint)") from None

    def block_tensors(self, layer_index: int) -> list[str]:
        if not 0 <= layer_index < self.num_layers:
            raise ArchitectureError(f"layer_index {layer_index} outside 0..{self.num_layers - 1}")
        return [n for n, r in self.tensors.items() if r.layer_index == layer_index]

    def non_block_tensors(self) -> list[str]:
        return [n for n, r in self.tensors.items() if r.layer_index is None]

    @property
    def gqa(self) -> bool:
        return self.num_kv_heads < self.num_heads

    def describe(self) -> dict[str, Any]:
        n_params = 0
        for r in self.tensors.values():
            count = 1
            for d in r.shape:
                count *= d
            n_params += count
        return {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "conv1d": self.conv1d,
            "num_tensors": len(self.tensors),
            "num_parameters": n_params,
            "kinds": dict(sorted(Counter(r.kind for r in self.tensors.values()).items())),
            "unknown_tensors": [n for n, r in self.tensors.items() if r.kind == "other"][:20],
        }


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


def _lookup(config: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    # Multimodal configs keep the language model's sizes in text_config; the top level wins when both have a key.
    for scope in (config, config.get("text_config") or {}):
        for key in keys:
            if scope.get(key) is not None:
                return scope[key]
    return None


def _read_sizes(config: Mapping[str, Any]) -> dict[str, int]:
    raw = {field_: _lookup(config, aliases) for field_, aliases in _CONFIG_ALIASES.items()}
    missing = [f"{field_} ({'|'.join(_CONFIG_ALIASES[field_])})" for field_ in ("num_layers", "hidden_size", "num_heads")
               if raw[field_] is None]
    if missing:
        raise ArchitectureError(f"config lacks {', '.join(missing)}")
    sizes = {k: int(v) for k, v in raw.items() if v is not None}
    for key in ("num_layers", "hidden_size", "num_heads"):
        if sizes[key] <= 0:
            raise ArchitectureError(f"config {key} must be positive, got {sizes[key]}")
    # multi_query (GPT-BigCode, Falcon-7B) means one kv head; otherwise plain multi-head attention.
    sizes.setdefault("num_kv_heads", 1 if _lookup(config, ("multi_query",)) else sizes["num_heads"])
    if "head_dim" not in sizes:
        if sizes["hidden_size"] % sizes["num_heads"]:
            raise ArchitectureError(
                f"config hidden_size {sizes['hidden_size']} is not divisible by num_heads {sizes['num_heads']} "
                "and no head_dim is given")
        sizes["head_dim"] = sizes["hidden_size"] // sizes["num_heads"]
    if sizes["num_kv_heads"] <= 0 or sizes["num_heads"] % sizes["num_kv_heads"]:
        raise ArchitectureError(
            f"config num_key_value_heads {sizes['num_kv_heads']} does not divide num_heads {sizes['num_heads']}")
    sizes.setdefault("vocab_size", 0)  # checked against the embedding below when present
    return sizes


def _tied(config: Mapping[str, Any], has_lm_head: bool) -> bool:
    # An absent lm_head can only mean tied (transformers re-ties it on load). When the config says nothing, trust the
    # checkpoint rather than transformers' class-specific default (True for most, False for e.g. LlamaConfig).
    if not has_lm_head:
        return True
    declared = _lookup(config, ("tie_word_embeddings",))
    return bool(declared) if declared is not None else False


# ---------------------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------------------


def _parse_name(name: str) -> tuple[int | None, list[str]]:
    """(block index, lower-cased tokens below the block index, or all tokens outside blocks)."""
    tokens = [t.lower() for t in name.split(".")]
    for i in range(len(tokens) - 1):
        if tokens[i] in _BLOCK_TOKENS and tokens[i + 1].isdigit():
            return int(tokens[i + 1]), tokens[i + 2:]
    return None, tokens


def _check_blocks(parsed: Mapping[str, tuple[int | None, list[str]]], num_layers: int) -> None:
    found = sorted({layer for layer, _ in parsed.values() if layer is not None})
    if found != list(range(num_layers)):
        raise ArchitectureError(
            f"config says {num_layers} decoder blocks but the checkpoint's block indices are {found[:8]}"
            f"{'...' if len(found) > 8 else ''}")


def _blocks_with_post_norms(parsed: Mapping[str, tuple[int | None, list[str]]]) -> set[int]:
    # Gemma-2/3 and OLMo-2 use post_attention_layernorm as a post-norm of the attention output (they have a separate
    # pre/post_feedforward_layernorm for the MLP), so there it belongs to the attention module.
    return {layer for layer, tokens in parsed.values()
            if layer is not None and any(t in ("pre_feedforward_layernorm", "post_feedforward_layernorm")
                                         for t in tokens)}


def _leaf(tokens: list[str]) -> str:
    """The module token that owns the parameter (``q_proj`` in ``self_attn.q_proj.weight``)."""
    if len(tokens) >= 2 and tokens[-1] in ("weight", "bias"):
        return tokens[-2]
    return tokens[-1]


def _is_norm(leaf: str) -> bool:
    return "norm" in leaf or re.fullmatch(r"ln(_\w+)?", leaf) is not None


def _module_and_kind(tokens: list[str], layer: int | None, post_norm_block: bool) -> tuple[str, str]:
    leaf = _leaf(tokens)
    if layer is None:
        if _is_norm(leaf):
            # An embedding LayerNorm (Bloom word_embeddings_layernorm) is part of the embedding stage.
            return ("embed", "norm") if "embed" in leaf else ("final_norm", "norm")
        if leaf in _EMBED:
            return "embed", "embed"
        if leaf in _POS_EMBED:
            return "embed", "pos_embed"
        if leaf in _LM_HEAD:
            return "lm_head", "lm_head"
        return "other", "other"

    path = set(tokens[:-1])
    in_attn = bool(path & _ATTN_MODULE_TOKENS)
    in_mlp = bool(path & _MLP_MODULE_TOKENS) or any("moe" in t or "expert" in t for t in tokens[:-1])
    if _is_norm(leaf):
        if in_attn or in_mlp:  # q_norm / k_norm inside the attention module, etc.
            return ("attn" if in_attn else "mlp"), "norm"
        if leaf == "post_attention_layernorm" and post_norm_block:
            return "attn", "norm"
        if leaf in _ATTN_NORMS:
            return "attn", "norm"
        if leaf in _MLP_NORMS:
            return "mlp", "norm"
        return "other", "norm"
    if in_attn and not in_mlp:
        for kind, names in (("qkv", _QKV), ("q", _Q), ("k", _K), ("v", _V), ("o", _O)):
            if leaf in names:
                return "attn", kind
        return "attn", "other"
    if in_mlp:
        if leaf in _MLP_IN:
            return "mlp", "mlp_in"
        if leaf in _MLP_OUT:
            return "mlp", "mlp_out"
        return "mlp", "other"
    # No module token (e.g. MPT's blocks.0.attn is covered; a bare layers.0.q_proj is not): trust unambiguous leaves.
    for kind, names in (("qkv", _QKV - {"qkv"}), ("q", {"q_proj", "wq"}), ("k", {"k_proj", "wk"}),
                        ("v", {"v_proj", "wv"}), ("o", {"o_proj", "out_proj", "wo"})):
        if leaf in names:
            return "attn", kind
    if leaf in _MLP_IN - {"w1", "w3"}:
        return "mlp", "mlp_in"
    if leaf in _MLP_OUT - {"c_proj", "w2"}:
        return "mlp", "mlp_out"
    return "other", "other"


# ---------------------------------------------------------------------------------------------------------------
# Shapes: orientation, validation, roles
# ---------------------------------------------------------------------------------------------------------------


def _expected_width(kind: str, sizes: Mapping[str, int]) -> int | None:
    """Size of the non-hidden dimension of a q/k/v/qkv/o tensor; None for MLP matrices (intermediate is free)."""
    q = sizes["num_heads"] * sizes["head_dim"]
    kv = sizes["num_kv_heads"] * sizes["head_dim"]
    return {"q": q, "k": kv, "v": kv, "o": q, "qkv": q + 2 * kv}.get(kind)


def _orientations(kind: str, shape: tuple[int, ...], sizes: Mapping[str, int]) -> set[bool]:
    """Which layouts (False = Linear [out, in], True = Conv1D [in, out]) this 2-D weight is consistent with."""
    hidden = sizes["hidden_size"]
    width = _expected_width(kind, sizes)
    fits: set[bool] = set()
    for conv in (False, True):
        out_dim, in_dim = (shape[1], shape[0]) if conv else (shape[0], shape[1])
        hidden_dim, other_dim = (in_dim, out_dim) if kind in _READING else (out_dim, in_dim)
        if hidden_dim == hidden and (width is None or other_dim == width):
            fits.add(conv)
    return fits


def _model_orientation(roles0: Mapping[str, tuple[int | None, str, str, bool]],
                       shapes: Mapping[str, tuple[int, ...]], sizes: Mapping[str, int]) -> bool:
    # Square matrices fit both layouts; the non-square ones (fused qkv, MLP, GQA k/v) decide for the whole model.
    votes: dict[bool, str] = {}
    for name, (layer, _module, kind, is_bias) in roles0.items():
        if layer is None or is_bias or kind not in _READING | _WRITING or len(shapes[name]) != 2:
            continue
        fits = _orientations(kind, shapes[name], sizes)
        if not fits:
            raise ArchitectureError(_shape_message(name, kind, shapes[name], sizes))
        if len(fits) == 1:
            votes.setdefault(next(iter(fits)), name)
    if len(votes) == 2:
        raise ArchitectureError(
            f"tensor layouts disagree: {votes[False]!r} is stored [out, in] (nn.Linear) but {votes[True]!r} is "
            "stored [in, out] (Conv1D)")
    return votes.get(True) is not None


def _shape_message(name: str, kind: str, shape: tuple[int, ...], sizes: Mapping[str, int]) -> str:
    hidden = sizes["hidden_size"]
    width = _expected_width(kind, sizes)
    other = str(width) if width is not None else "intermediate"
    if kind in _READING:
        expected = f"[{other}, {hidden}] (or [{hidden}, {other}] for Conv1D)"
    else:
        expected = f"[{hidden}, {other}] (or [{other}, {hidden}] for Conv1D)"
    return (f"tensor {name!r} ({kind}) has shape {list(shape)} but the config (hidden_size={hidden}, "
            f"num_heads={sizes['num_heads']}, num_kv_heads={sizes['num_kv_heads']}, head_dim={sizes['head_dim']}) "
            f"implies {expected}")


def _unique_hidden_axis(shape: tuple[int, ...], hidden: int) -> int | None:
    axes = [i for i, d in enumerate(shape) if d == hidden]
    return axes[0] if len(axes) == 1 else None


def _head_layout(kind: str, axis: int, leaf: str, sizes: Mapping[str, int]) -> HeadLayout:
    nh, nkv, hd = sizes["num_heads"], sizes["num_kv_heads"], sizes["head_dim"]
    q, kv = nh * hd, nkv * hd
    if kind == "qkv":
        segments = (("q", 0, q), ("k", q, q + kv), ("v", q + kv, q + 2 * kv))
        interleave = "per_group" if leaf in _INTERLEAVED_QKV else "none"
    else:
        segments = ((kind, 0, q if kind in ("q", "o") else kv),)
        interleave = "none"
    return HeadLayout(axis=axis, num_heads=nh, num_kv_heads=nkv, head_dim=hd, segments=segments,
                      interleave=interleave)


def _make_role(name: str, shape: tuple[int, ...], dtype: str | None, layer: int | None, module: str, kind: str,
               is_bias: bool, tokens: list[str], model_conv1d: bool, sizes: Mapping[str, int]) -> TensorRole:
    hidden = sizes["hidden_size"]
    conv1d = False
    heads: HeadLayout | None = None
    hidden_axis: int | None

    def bad(expected: str) -> ArchitectureError:
        return ArchitectureError(f"tensor {name!r} ({kind}) has shape {list(shape)}; expected {expected} from the config")

    if kind in _READING | _WRITING:
        if is_bias:
            width = _expected_width(kind, sizes)
            if kind in _WRITING:
                if shape != (hidden,):
                    raise bad(f"[{hidden}]")
                hidden_axis = 0
            else:
                if len(shape) != 1 or (width is not None and shape[0] != width):
                    raise bad(f"[{width}]" if width is not None else "a vector")
                hidden_axis = None
            if kind in ("q", "k", "v", "qkv"):
                heads = _head_layout(kind, 0, _leaf(tokens), sizes)
        elif len(shape) == 2:
            fits = _orientations(kind, shape, sizes)
            if not fits:
                raise ArchitectureError(_shape_message(name, kind, shape, sizes))
            conv1d = next(iter(fits)) if len(fits) == 1 else model_conv1d
            out_axis, in_axis = (1, 0) if conv1d else (0, 1)
            hidden_axis = in_axis if kind in _READING else out_axis
            if kind != "mlp_in" and kind != "mlp_out":
                # q/k/v/qkv are split into heads along their output; o along its input (docs/methods.md §1.3 head_mlp).
                heads = _head_layout(kind, out_axis if kind != "o" else in_axis, _leaf(tokens), sizes)
        else:
            # 3-D stacked experts (e.g. [n_experts, out, in]) and other layouts: find hidden by size only.
            hidden_axis = _unique_hidden_axis(shape, hidden)
    elif kind in ("embed", "pos_embed", "lm_head"):
        if is_bias:
            hidden_axis = None
        elif len(shape) != 2 or shape[1] != hidden:
            raise bad(f"[rows, {hidden}]")
        else:
            hidden_axis = 1
            if kind != "pos_embed" and sizes["vocab_size"] and shape[0] != sizes["vocab_size"]:
                raise bad(f"[{sizes['vocab_size']}, {hidden}] (config vocab_size={sizes['vocab_size']})")
    elif kind == "norm":
        # q/k norms are per head (Qwen3: [head_dim]) or over all heads (OLMo-2: [heads*head_dim]).
        allowed = {hidden, sizes["head_dim"], sizes["num_heads"] * sizes["head_dim"],
                   sizes["num_kv_heads"] * sizes["head_dim"]}
        if len(shape) != 1 or shape[0] not in allowed:
            raise bad(f"[{hidden}] (or a q/k norm of {sorted(allowed - {hidden})})")
        # Only a block- or model-level norm scales the residual stream; a q/k norm inside the attention module does
        # not, even when it happens to be hidden-sized (OLMo-2 q_norm).
        inner = layer is not None and bool(set(tokens[:-1]) & (_ATTN_MODULE_TOKENS | _MLP_MODULE_TOKENS))
        hidden_axis = 0 if shape[0] == hidden and not inner else None
    else:
        hidden_axis = _unique_hidden_axis(shape, hidden)

    return TensorRole(name=name, shape=shape, layer_index=layer, module=module, kind=kind, is_bias=is_bias,
                      hidden_axis=hidden_axis, heads=heads, conv1d=conv1d, dtype=dtype,
                      expert=_expert_index(tokens) if module == "mlp" else None)


def _expert_index(tokens: list[str]) -> int | None:
    """The routed expert a tensor of an MoE block belongs to: the number after ``experts`` (Mixtral's
    ``block_sparse_moe.experts.3.w1``, Qwen3-MoE's ``mlp.experts.3.gate_proj``). Shared experts
    (``shared_expert.*``) and the router (``gate``) belong to no single routed expert."""
    for i in range(len(tokens) - 1):
        if tokens[i] == "experts" and tokens[i + 1].isdigit():
            return int(tokens[i + 1])
    return None
