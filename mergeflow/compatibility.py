"""Can these checkpoints be merged? Architecture, tensor names and shapes, vocabularies, tied weights, dtypes.

A LoRA adapter expert is described as what it is (rank, alpha, scale, target modules, the base it applies to) and
compared as the model it makes of its base. Everything here reads configs and safetensors headers only, so
``mergeflow check`` and the merge's own pre-flight answer in well under a second, before any tensor is loaded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mergeflow.adapters import LoraReader
from mergeflow.architecture import Architecture
from mergeflow.tensors import TensorReader, dtype_name

_ARCH_FIELDS = ("model_type", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                "tie_word_embeddings")


@dataclass
class ModelSummary:
    role: str  # "base" or "model[i]"
    reference: str
    content_hash: str
    architecture: dict[str, Any]
    vocab_rows: int | None
    n_tensors: int
    bytes: int
    dtypes: dict[str, int]
    adapter: dict[str, Any] | None = None  # a LoRA adapter expert: what it is and the base it applies to


@dataclass
class CompatibilityReport:
    models: list[ModelSummary]
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    estimate: dict[str, int] = field(default_factory=dict)
    # how the vocabularies differ, and what tokenizer_source does about it (mergeflow.vocabulary)
    vocabulary: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        lines = ["models:"]
        for m in self.models:
            a = m.architecture
            dtypes = ", ".join(f"{k}×{v}" for k, v in sorted(m.dtypes.items()))
            lines.append(f"  {m.role:<9} {m.reference}")
            lines.append(f"            {a['model_type']}, {a['num_layers']} layers, hidden {a['hidden_size']}, "
                         f"heads {a['num_heads']}/{a['num_kv_heads']}, vocab rows {m.vocab_rows}, "
                         f"tied {a['tie_word_embeddings']}, {m.n_tensors} tensors, {_gb(m.bytes)} ({dtypes})")
            if m.adapter is not None:
                d = m.adapter
                embeddings = f", {d['embeddings']} of them embeddings" if d["embeddings"] else ""
                copies = f", {d['replaced']} full tensor copies" if d["replaced"] else ""
                lines.append(f"            LoRA adapter (rank {d['rank']}, lora_alpha {d['lora_alpha']}"
                             f"{', rslora' if d['rslora'] else ''}, scale {d['scale']}): {d['modules']} modules"
                             f"{embeddings}{copies}, {d['adapted_tensors']} tensors adapted; applied to "
                             f"{d['base']} ({d['base_hash']})")
            lines.append(f"            {m.content_hash}")
        if self.estimate:
            e = self.estimate
            held = (f": this process {_gb(e['process_bytes'])} + the merge {_gb(e['merge_bytes'])}"
                    if "merge_bytes" in e else "")
            lines.append(f"estimate: peak memory ≈ {_gb(e['peak_bytes'])}{held} (largest tensor "
                         f"{e['largest_tensor_numel']:,} entries), output on disk {_gb(e['disk_bytes'])}")
            if "workspace_bytes" in e:
                lines.append(f"          of which SVD/optimizer workspace ≈ {_gb(e['workspace_bytes'])} for the "
                             f"{e['workspace_rows']}×{e['workspace_cols']} tensor")
        if self.vocabulary:
            lines.append("vocabulary:")
            lines.extend(f"  {line}" for line in self.vocabulary)
        for w in self.warnings:
            lines.append(f"warning: {w}")
        for p in self.problems:
            lines.append(f"problem: {p}")
        lines.append("compatible" if self.ok else f"NOT compatible: {len(self.problems)} problem(s)")
        return "\n".join(lines)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _vocab_rows(arch: Architecture) -> int | None:
    for role in arch.tensors.values():
        if role.kind == "embed" and not role.is_bias:
            return role.shape[0]
    return None


def summarize(role: str, reference: str, content_hash: str, arch: Architecture, reader: TensorReader, *,
              adapter_base: tuple[str, str] | None = None) -> ModelSummary:
    """``adapter_base``: the (reference, content hash) of the base a LoRA adapter expert's ``reader`` applies to."""
    described = {k: getattr(arch, k) for k in _ARCH_FIELDS}
    adapter = None
    if isinstance(reader, LoraReader):
        adapter = {**reader.adapter.describe(), "adapted_tensors": len(reader.adapted),
                   "base": adapter_base[0] if adapter_base else str(reader.base.folder),
                   "base_hash": adapter_base[1] if adapter_base else None}
    return ModelSummary(
        role=role, reference=reference, content_hash=content_hash, architecture=described,
        vocab_rows=_vocab_rows(arch), n_tensors=len(reader.specs),
        bytes=sum(s.nbytes for s in reader.specs.values()),
        dtypes=dict(Counter(dtype_name(s.dtype) for s in reader.specs.values())), adapter=adapter,
    )


def _is_vocab_tensor(arch: Architecture, name: str) -> bool:
    role = arch.tensors.get(name)
    return role is not None and role.kind in ("embed", "lm_head") and not role.is_bias


def compare(reference: tuple[ModelSummary, Architecture, TensorReader],
            others: list[tuple[ModelSummary, Architecture, TensorReader]], *, vocab_policy: str
            ) -> tuple[list[str], list[str]]:
    """Problems (fatal) and warnings of merging ``others`` into ``reference``'s tensor layout."""
    problems: list[str] = []
    warnings: list[str] = []
    ref_sum, ref_arch, ref_reader = reference
    ref_names = set(ref_reader.specs)
    vocab_mismatch: dict[str, int | None] = {}
    for summ, _arch, reader in others:
        who = f"{summ.role} ({summ.reference})"
        for key in _ARCH_FIELDS:
            if summ.architecture[key] != ref_sum.architecture[key]:
                problems.append(f"{who}: {key} is {summ.architecture[key]!r}, the {ref_sum.role} has "
                                f"{ref_sum.architecture[key]!r}")
        names = set(reader.specs)
        missing = sorted(ref_names - names)
        extra = sorted(names - ref_names)
        if missing:
            problems.append(f"{who}: missing {len(missing)} tensor(s) of the {ref_sum.role}, e.g. {missing[:3]}")
        if extra:
            problems.append(f"{who}: has {len(extra)} tensor(s) the {ref_sum.role} lacks, e.g. {extra[:3]}")
        for name in sorted(ref_names & names):
            a, b = ref_reader.specs[name].shape, reader.specs[name].shape
            if a == b:
                continue
            if _is_vocab_tensor(ref_arch, name) and a[1:] == b[1:]:
                vocab_mismatch[summ.reference] = b[0]
                continue
            problems.append(f"{who}: tensor {name} has shape {list(b)}, the {ref_sum.role} has {list(a)}")
        # an adapter's targets are float32 by design (its task vector is not rounded to a bf16 base's dtype)
        if Counter(summ.dtypes) != Counter(ref_sum.dtypes) and summ.adapter is None:
            warnings.append(f"{who}: dtypes {summ.dtypes} differ from the {ref_sum.role}'s {ref_sum.dtypes}; "
                            "all inputs are cast to the compute dtype")
    if vocab_mismatch and vocab_policy != "tokenizer":  # "tokenizer": rows are aligned by token (vocabulary.py)
        sizes = ", ".join(f"{ref} has {rows}" for ref, rows in vocab_mismatch.items())
        text = (f"vocabulary sizes differ: the {ref_sum.role} has {ref_sum.vocab_rows} embedding rows, {sizes}")
        if vocab_policy == "error":
            problems.append(text + "; set tokenizer_source: base (the base's vocabulary), union (every model's "
                                   "tokens) or a model reference, to align the rows by token")
        else:
            warnings.append(text + f"; vocab_policy {vocab_policy}: the output keeps the {ref_sum.role}'s vocabulary")
    return problems, warnings
