"""LoRA adapters (PEFT folders) as experts: the expert is its base plus ``scale · B · A`` on each target tensor.

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (``.bin`` for old ones, read
only with ``allow_pickle``). :class:`LoraAdapter` reads and checks both without loading any tensor data;
:class:`LoraReader` wraps the base's :class:`~mergeflow.tensors.CheckpointReader` and answers each target tensor with
``W + scale · B · A`` computed when it is read, so an adapter expert is never materialised, on disk or in memory.
Its task vector is therefore ``scale · B · A`` (up to one fp32 rounding of the addition): adapted tensors are
returned in float32 (float64 bases stay float64), never rounded back to a bf16/fp16 base's dtype.

What PEFT's ``merge_and_unload()`` does, and so what this does:

- ``scale = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; ``r`` and ``lora_alpha`` per module
  from ``rank_pattern`` / ``alpha_pattern`` (a key matches a module whose name is the key or ends with ``.key``,
  regular expressions allowed, the first matching key wins);
- a linear layer's delta is ``B @ A`` (``[out, in]``); a layer stored ``[in, out]`` (GPT-2's ``Conv1D``, PEFT's
  ``fan_in_fan_out``) gets its transpose. PEFT decides this by the module's class whatever the config says, so the
  orientation comes from the base's architecture (:class:`~mergeflow.architecture.Architecture`'s ``conv1d``);
- an embedding's delta is ``(lora_embedding_B @ lora_embedding_A)ᵀ`` (``[num_embeddings, dim]``);
- full copies of tensors (tensors of the adapter that are not LoRA factors: ``modules_to_save``, and the embedding
  layers PEFT saves beside the factors of a targeted embedding) replace the base's tensor, before the LoRA delta of
  the same tensor, if any, is added; PEFT's copy of a ``modules_to_save`` module's original weights is ignored.

Adapters this does not apply are refused in one line naming what they use: other PEFT types (IA3, LoHa, LoKr,
AdaLoRA, VeRA, OFT, prompt tuning, ...), DoRA, LoRA biases, trainable tokens, LoRA on parameters, convolution
LoRA, layer replication. An adapter whose targets the base lacks, or whose factor shapes do not fit the base's
tensor, is refused as not matching its base (:class:`~mergeflow.errors.AdapterMismatchError`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergeflow.errors import AdapterError, AdapterMismatchError
from mergeflow.tensors import CheckpointReader, SpecsView, TensorSpec, read_json_object

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
# a folder holding one of these is a full checkpoint, even if it carries an adapter_config.json beside it
_FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_PREFIX = "base_model.model."  # PEFT's saved keys: base_model.model.<module name in the transformers model>.<...>

# config fields whose non-default value changes what merging means; the message says what each one is
_REFUSED_FIELDS: dict[str, str] = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA biases (lora_bias)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "arrow_config": "Arrow routing (arrow_config)",
}
_FACTOR_RE = re.compile(r"^(?P<module>.+)\.(?:(?P<linear>lora_[AB])\.(?P<param>weight|bias)"
                        r"|(?P<embedding>lora_embedding_[AB]))$")


def is_adapter_folder(folder: Path) -> bool:
    """Whether ``folder`` is a PEFT adapter: it has ``adapter_config.json`` and no full model weights."""
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG).is_file() and not any((folder / n).exists() for n in _FULL_WEIGHTS)


def adapter_weight_file(folder: Path, *, allow_pickle: bool = False) -> str:
    """The adapter's weight file name (safetensors preferred; a pickle one only with ``allow_pickle``)."""
    folder = Path(folder)
    if (folder / ADAPTER_SAFETENSORS).is_file():
        return ADAPTER_SAFETENSORS
    if (folder / ADAPTER_PICKLE).is_file():
        if not allow_pickle:
            raise AdapterError(f"LoRA adapter {folder} holds only {ADAPTER_PICKLE} (a pickle); set allow_pickle: true "
                               "in the recipe to load it with torch.load(weights_only=True)")
        return ADAPTER_PICKLE
    raise AdapterError(f"LoRA adapter {folder} has {ADAPTER_CONFIG} but no {ADAPTER_SAFETENSORS}")


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the value of the first key that matches the whole module
    name or a dotted suffix of it (a key may be a regular expression), else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: the names of its factors in the adapter file, its scale and its kind."""

    module: str          # the module's name in the transformers model (PEFT's key without its prefix)
    a: str               # the adapter file's key of A (lora_A.weight or lora_embedding_A)
    b: str
    rank: int
    alpha: float
    scale: float
    embedding: bool


@dataclass(frozen=True)
class LoraAdapter:
    """A checked PEFT LoRA adapter folder: its config and the layout of its weight file (no tensor data read)."""

    folder: Path
    weight_file: str
    config: dict[str, Any]
    modules: dict[str, LoraModule]       # module name -> its factors
    replaced: dict[str, str]             # full copies: tensor name (in the model) -> key in the adapter file
    specs: dict[str, TensorSpec]         # the adapter file's tensors

    @classmethod
    def read(cls, folder: Path, *, allow_pickle: bool = False) -> LoraAdapter:
        folder = Path(folder)
        config = _read_config(folder)
        weight_file = adapter_weight_file(folder, allow_pickle=allow_pickle)
        with CheckpointReader(folder, [weight_file], allow_pickle=allow_pickle) as reader:
            specs = dict(reader.specs)
        modules, replaced = _layout(folder, config, specs)
        return cls(folder, weight_file, config, modules, replaced, specs)

    def describe(self) -> dict[str, Any]:
        """What ``mergeflow check`` reports about the adapter."""
        ranks = sorted({m.rank for m in self.modules.values()})
        scales = sorted({m.scale for m in self.modules.values()})
        return {"type": "lora", "folder": str(self.folder), "rank": ranks[0] if len(ranks) == 1 else ranks,
                "lora_alpha": self.config.get("lora_alpha"), "rslora": bool(self.config.get("use_rslora")),
                "scale": scales[0] if len(scales) == 1 else scales, "modules": len(self.modules),
                "embeddings": sum(m.embedding for m in self.modules.values()), "replaced": len(self.replaced)}


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    config = read_json_object(path, AdapterError)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        what = f"an adapter of peft_type {peft_type}" if peft_type else "an adapter without a peft_type"
        raise AdapterError(f"{path}: {what}, which mergeflow does not apply; only LoRA adapters (peft_type LORA) "
                           "are")
    for key, what in _REFUSED_FIELDS.items():
        if config.get(key) not in (None, False, [], {}, ""):
            raise AdapterError(f"{path}: the adapter uses {what}, which mergeflow does not apply; merge it into its "
                               "base with PEFT's merge_and_unload() and give the merged folder instead")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterError(f"{path}: r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise AdapterError(f"{path}: lora_alpha must be a finite number, got {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        value = config.get(key) or {}
        if not isinstance(value, dict):
            raise AdapterError(f"{path}: {key} must be a mapping of module patterns to values, got {value!r}")
        config[key] = value
    return config


def _layout(folder: Path, config: dict[str, Any], specs: Mapping[str, TensorSpec]
            ) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """The adapted modules (pairs of factors) and the replaced tensors of an adapter file, checked."""
    where = folder / ADAPTER_CONFIG
    factors: dict[str, dict[str, str]] = {}
    embedding: dict[str, bool] = {}
    replaced: dict[str, str] = {}
    for key in specs:
        if not key.startswith(_PREFIX):
            raise AdapterError(f"{folder}: tensor {key!r} is not a PEFT LoRA weight (expected names starting with "
                               f"{_PREFIX!r})")
        name = key[len(_PREFIX):]
        if "lora_magnitude_vector" in name:
            raise AdapterError(f"{where}: the adapter holds DoRA magnitudes ({key}), which mergeflow does not apply")
        if "trainable_tokens" in name or "token_adapter" in name:
            raise AdapterError(f"{where}: the adapter holds trainable tokens ({key}), which mergeflow does not apply")
        m = _FACTOR_RE.match(name)
        if m is None:
            if ".lora_" in name:
                raise AdapterError(f"{folder}: unknown LoRA tensor {key!r}")
            if ".original_module." in name:
                continue  # the pre-training weights of a modules_to_save module: the base's own
            # a full copy (modules_to_save, or a targeted embedding's base layer) replaces the base's tensor
            replaced[name.replace(".base_layer.", ".")] = key
            continue
        if m.group("param") == "bias":
            raise AdapterError(f"{where}: the adapter holds LoRA biases ({key}), which mergeflow does not apply")
        part = (m.group("linear") or m.group("embedding"))[-1]
        factors.setdefault(m.group("module"), {})[part] = key
        embedding[m.group("module")] = m.group("embedding") is not None
    modules: dict[str, LoraModule] = {}
    for module, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            missing = "B" if "A" in pair else "A"
            raise AdapterError(f"{folder}: module {module!r} has no lora_{missing} factor")
        a, b = specs[pair["A"]], specs[pair["B"]]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise AdapterError(f"{where}: module {module!r} has {len(a.shape)}-D LoRA factors (convolution LoRA), "
                               "which mergeflow does not apply")
        rank = a.shape[0]  # A is [r, in] (linear) or [r, num_embeddings] (embedding)
        if b.shape[1] != rank:
            raise AdapterError(f"{folder}: module {module!r}: lora_B {list(b.shape)} does not fit lora_A "
                               f"{list(a.shape)} (rank {rank})")
        r = pattern_value(config["rank_pattern"], module, config["r"])
        if r != rank:
            raise AdapterError(f"{where}: module {module!r} has rank {rank} in the weights but {r} in the config")
        alpha = float(pattern_value(config["alpha_pattern"], module, config["lora_alpha"]))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        modules[module] = LoraModule(module, pair["A"], pair["B"], rank, alpha, scale, embedding[module])
    if not modules and not replaced:
        raise AdapterError(f"{folder}: the adapter holds no LoRA weights")
    return modules, replaced


def adapted_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of an adapted tensor: float32, or float64 for a float64 base (never rounded to bf16/fp16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lora_delta(module: LoraModule, a: torch.Tensor, b: torch.Tensor, *, transposed: bool,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scale · B · A`` in the layout of the base tensor: ``[out, in]``, transposed for an embedding (its A is
    ``[r, num_embeddings]``) and for a layer stored ``[in, out]`` (``transposed``), as PEFT's ``get_delta_weight``."""
    delta = b.to(dtype) @ a.to(dtype)
    if module.embedding or transposed:
        delta = delta.T
    return delta * module.scale


@dataclass(frozen=True)
class _Target:
    module: LoraModule | None = None  # the LoRA factors added to the tensor
    copy: str | None = None           # the key of a full copy in the adapter file, which replaces the base's tensor
    transposed: bool = False          # the base stores the tensor [in, out]


def _base_name(module: str, names: Collection[str], param: str = "weight") -> str | None:
    """The base checkpoint's tensor for a model module (``module.weight``), allowing the checkpoint to name it
    without the model's outer prefix (``h.0.attn.c_attn`` for ``transformer.h.0.attn.c_attn``) or with one more."""
    want = f"{module}.{param}" if param else module
    if want in names:
        return want
    found = [n for n in names if n.endswith("." + want) or want.endswith("." + n)]
    return found[0] if len(found) == 1 else None


def model_parameter_name(name: str, params: Collection[str], folder: Path) -> str:
    """The parameter of a transformers model that the checkpoint tensor ``name`` loads into (the same name, or one
    that differs by an outer prefix)."""
    found = _base_name(name, params, param="")
    if found is None:
        raise AdapterMismatchError(f"cannot apply the LoRA adapter {folder}: the loaded model has no parameter "
                                   f"{name!r}")
    return found


class LoraReader(SpecsView):
    """An adapter expert's tensors: the base's, with ``W + scale · B · A`` for each target, computed when read.

    Same interface as :class:`~mergeflow.tensors.CheckpointReader` (``specs``, ``get``, ``close``); it owns the base
    reader it wraps. ``transposed``: the base tensors stored ``[in, out]`` (GPT-2 ``Conv1D``). Construction checks the
    adapter against the base (every target present, every factor shape fitting) and reads no tensor data.
    """

    def __init__(self, base: CheckpointReader, adapter: LoraAdapter, *, transposed: Collection[str] = (),
                 reference: str | None = None, allow_pickle: bool = False) -> None:
        self.base = base
        self.adapter = adapter
        self.folder = adapter.folder
        who = reference or str(adapter.folder)
        names = set(base.specs)
        self._targets: dict[str, _Target] = {}
        for module, lora in adapter.modules.items():
            name = _base_name(module, names)
            if name is None:
                raise AdapterMismatchError(f"LoRA adapter {who} does not match its base {base.folder}: it adapts "
                                           f"{module!r}, but the base has no tensor {module}.weight")
            spec = base.specs[name]
            a, b = adapter.specs[lora.a].shape, adapter.specs[lora.b].shape
            flip = lora.embedding or name in transposed
            shape = (a[1], b[0]) if flip else (b[0], a[1])
            if tuple(spec.shape) != shape:
                raise AdapterMismatchError(
                    f"LoRA adapter {who} does not match its base {base.folder}: {module!r} has factors A "
                    f"{list(a)} and B {list(b)}, a delta of shape {list(shape)}, but the base's {name} is "
                    f"{list(spec.shape)}")
            self._targets[name] = _Target(lora, transposed=name in transposed)
        for tensor, key in adapter.replaced.items():  # full copies: applied first, then the LoRA delta, as PEFT does
            name = _base_name(tensor, names, param="")
            if name is None:
                raise AdapterMismatchError(f"LoRA adapter {who} does not match its base {base.folder}: it holds a "
                                           f"full copy of {tensor!r}, a tensor the base does not store")
            if tuple(adapter.specs[key].shape) != tuple(base.specs[name].shape):
                raise AdapterMismatchError(
                    f"LoRA adapter {who} does not match its base {base.folder}: its copy of {tensor!r} has shape "
                    f"{list(adapter.specs[key].shape)}, the base's {list(base.specs[name].shape)}")
            self._targets[name] = dataclasses.replace(self._targets.get(name, _Target()), copy=key)
        self._specs = {n: TensorSpec(n, s.shape, adapted_dtype(s.dtype)) if n in self._targets else s
                       for n, s in base.specs.items()}
        self._factors = CheckpointReader(adapter.folder, [adapter.weight_file], allow_pickle=allow_pickle)

    # -- the CheckpointReader interface ----------------------------------------------------------------------------

    @property
    def adapted(self) -> list[str]:
        """The base tensors this adapter changes."""
        return list(self._targets)

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` of the adapted model, in a buffer of its own."""
        target = self._targets.get(name)
        if target is None:
            return self.base.get(name)
        dtype = self._specs[name].dtype
        source = self._factors if target.copy is not None else self.base
        weight = source.get(target.copy or name).to(dtype)
        if target.module is not None:
            weight += lora_delta(target.module, self._factors.get(target.module.a),
                                 self._factors.get(target.module.b), transposed=target.transposed, dtype=dtype)
        return weight

    def close(self) -> None:
        self._factors.close()
        self.base.close()

    def __enter__(self) -> LoraReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
