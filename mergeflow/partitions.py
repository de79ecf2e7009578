"""Partitions of a model's parameters as per-tensor selectors (docs/methods.md §1.3, D-1, D-2, D-18, D-20, D-38).

A partition is a set of scalar entries. Every partition used here is a union of whole tensors or of slices along one
axis of a tensor, so one tensor's share of every partition is described by a ``TensorPartition``: an axis (or None
for "the whole tensor") and one label per slice along it. The merge engine reads ``partition(tensor)`` to turn
per-partition coefficients into a broadcastable tensor (``expand``); importance estimators read ``members(id)`` to
swap or score one partition at a time. Together the partitions of a level are disjoint and cover every entry.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mergeflow.architecture import Architecture, TensorRole
from mergeflow.errors import ArchitectureError, RecipeError

LEVELS = ("model", "layer", "attn_mlp", "head_mlp", "hidden_state", "matrix")
HIDDEN_STATE_MODES = ("residual", "per_layer_rows")
GQA_POLICIES = (None, "group")

# Labels of tensors outside decoder blocks (D-2/D-18): consumers decide whether they are partitions of their own.
EMBED, HEAD, OTHER, UNGROUPED = "embed", "head", "other", "ungrouped"

_BLOCK_LABEL = re.compile(r"^layer\.(\d+)(?:\.|$)")


def block_of(partition_id: str) -> int | None:
    """The decoder block a partition lies in, or None (embed, head, hidden.j, model, whole-tensor labels...)."""
    match = _BLOCK_LABEL.match(partition_id)
    return int(match.group(1)) if match else None


def is_block_partition(partition_id: str) -> bool:
    return block_of(partition_id) is not None


def _natural_key(label: str) -> tuple[int, tuple[str | int, ...]]:
    # Embeddings first, blocks in numeric order (layer.2 before layer.10), the LM head after them, leftovers last.
    rank = {EMBED: 0, HEAD: 2, OTHER: 3, UNGROUPED: 3}.get(label, 1)
    # re.split with a capturing group alternates text / digits, so positions always compare like with like.
    chunks = tuple(int(c) if i % 2 else c for i, c in enumerate(re.split(r"(\d+)", label)))
    return rank, chunks


@dataclass(frozen=True)
class TensorPartition:
    tensor: str
    axis: int | None          # None: the whole tensor belongs to labels[0]
    labels: tuple[str, ...]   # len 1 if axis is None, else one label per slice along axis

    def unique_labels(self) -> list[str]:
        """Labels in order of first appearance along the axis."""
        return list(dict.fromkeys(self.labels))

    def indices(self, label: str) -> list[int] | None:
        """Slices along ``axis`` that belong to ``label`` (None: the whole tensor; empty: none of it)."""
        if self.axis is None:
            return None if label == self.labels[0] else []
        return [i for i, lab in enumerate(self.labels) if lab == label]

    def expand(self, values: Mapping[str, float], default: float, shape: Sequence[int]) -> torch.Tensor:
        """Per-entry values as a float32 tensor broadcastable to ``shape``: a scalar, or a vector along ``axis``."""
        shape = tuple(shape)
        if self.axis is None:
            return torch.tensor(float(values.get(self.labels[0], default)), dtype=torch.float32)
        if self.axis >= len(shape) or shape[self.axis] != len(self.labels):
            raise ValueError(f"{self.tensor}: shape {list(shape)} has no axis {self.axis} of size {len(self.labels)}")
        per_label = {lab: float(values.get(lab, default)) for lab in self.unique_labels()}
        vector = torch.tensor([per_label[lab] for lab in self.labels], dtype=torch.float32)
        view = [1] * len(shape)
        view[self.axis] = -1
        return vector.view(view)


Member = tuple[str, int | None, list[int] | None]


class Partitioner:
    """Assigns every entry of every tensor of ``arch`` to one partition of ``level``."""

    def __init__(self, arch: Architecture, level: str, *, hidden_state_mode: str = "residual",
                 gqa_policy: str | None = None) -> None:
        if level not in LEVELS:
            raise RecipeError(f"partition level {level!r} is not one of {', '.join(LEVELS)}")
        if hidden_state_mode not in HIDDEN_STATE_MODES:
            raise RecipeError(f"hidden_state_mode {hidden_state_mode!r} is not one of {', '.join(HIDDEN_STATE_MODES)}")
        if gqa_policy not in GQA_POLICIES:
            raise RecipeError(f"gqa_policy {gqa_policy!r} is not one of None, 'group'")
        if level == "head_mlp" and arch.num_kv_heads < arch.num_heads and gqa_policy is None:
            # D-20: k/v rows are shared by several query heads, so "one head" is not a set of parameters.
            raise ArchitectureError(
                f"head-level partitions need gqa_policy='group' for GQA models: {arch.model_type} has "
                f"{arch.num_heads} query heads sharing {arch.num_kv_heads} key/value heads")
        self.arch = arch
        self.level = level
        self.hidden_state_mode = hidden_state_mode
        self.gqa_policy = gqa_policy
        self._cache: dict[str, TensorPartition] = {}
        self._members: dict[str, list[Member]] | None = None
        # One shared tuple: every hidden-axis tensor has the same d_model labels.
        self._hidden_labels = tuple(f"hidden.{j}" for j in range(arch.hidden_size))

    # -- per tensor ----------------------------------------------------------------------------------------------

    def partition(self, tensor: str) -> TensorPartition:
        cached = self._cache.get(tensor)
        if cached is None:
            cached = self._cache[tensor] = self._partition(self.arch.role(tensor))
        return cached

    def _partition(self, role: TensorRole) -> TensorPartition:
        name, i = role.name, role.layer_index
        level = self.level
        if level == "model":
            return TensorPartition(name, None, ("model",))
        if level == "matrix":
            return TensorPartition(name, None, (name,))
        if level == "hidden_state" and self.hidden_state_mode == "residual":
            if role.hidden_axis is None:
                return TensorPartition(name, None, (UNGROUPED,))   # D-1: e.g. q/k/v biases stay uncalibrated
            return TensorPartition(name, role.hidden_axis, self._hidden_labels)
        if i is None:
            return TensorPartition(name, None, (_non_block_label(role),))
        if level == "layer":
            return TensorPartition(name, None, (f"layer.{i}",))
        if level == "attn_mlp":
            return TensorPartition(name, None, (f"layer.{i}.{role.module}",))
        if level == "head_mlp":
            return self._head_partition(role, i)
        return self._row_partition(role, i)   # hidden_state, per_layer_rows

    def _head_partition(self, role: TensorRole, i: int) -> TensorPartition:
        if role.module == "mlp" and role.expert is not None:
            # D-38: the finest level splits an MoE block too: each routed expert's FFN is a partition of its own;
            # the router and the block's norm stay in layer.i.mlp
            return TensorPartition(role.name, None, (f"layer.{i}.expert.{role.expert}",))
        if role.module != "attn":
            return TensorPartition(role.name, None, (f"layer.{i}.{role.module}",))
        layout = role.heads
        if layout is None:
            # Parameters that every head shares: the pre-attention norm (and q/k norms), the o_proj bias, unknowns.
            suffix = "attn_norm" if role.kind == "norm" else "attn_shared"
            return TensorPartition(role.name, None, (f"layer.{i}.{suffix}",))
        q_per_group = layout.num_heads // layout.num_kv_heads
        labels = []
        for j in range(role.shape[layout.axis]):
            part, head = layout.part_and_head(j)
            if self.gqa_policy == "group":
                group = head // q_per_group if part in ("q", "o") else head
                labels.append(f"layer.{i}.group.{group}")
            else:
                labels.append(f"layer.{i}.head.{head}")   # MHA: kv head g is query head g
        return TensorPartition(role.name, layout.axis, tuple(labels))

    def _row_partition(self, role: TensorRole, i: int) -> TensorPartition:
        # D-1 alternative: one output unit of one tensor in one block. Conv1D weights keep outputs on axis 1.
        prefix = f"layer.{i}.{role.short_name}"
        if not role.shape:
            return TensorPartition(role.name, None, (prefix,))
        axis = 1 if role.conv1d else 0
        return TensorPartition(role.name, axis, tuple(f"{prefix}.row.{r}" for r in range(role.shape[axis])))

    # -- per partition -------------------------------------------------------------------------------------------

    def _index(self) -> dict[str, list[Member]]:
        # Built once on demand; only floating tensors take part (integer/bool buffers are copied, never merged).
        if self._members is None:
            members: dict[str, list[Member]] = {}
            for name, role in self.arch.tensors.items():
                if not role.is_floating:
                    continue
                part = self.partition(name)
                if part.axis is None:
                    members.setdefault(part.labels[0], []).append((name, None, None))
                    continue
                by_label: dict[str, list[int]] = {}
                for j, lab in enumerate(part.labels):
                    by_label.setdefault(lab, []).append(j)
                for lab, idx in by_label.items():
                    members.setdefault(lab, []).append((name, part.axis, idx))
            self._members = {lab: members[lab] for lab in sorted(members, key=_natural_key)}
        return self._members

    def partition_ids(self) -> list[str]:
        """Every partition id of this level, embeddings first, blocks in numeric order, the head last."""
        return list(self._index())

    def members(self, partition_id: str) -> list[Member]:
        """(tensor, axis, indices along axis) of each tensor in the partition; axis and indices None = whole tensor."""
        try:
            return self._index()[partition_id]
        except KeyError:
            raise ArchitectureError(
                f"unknown partition {partition_id!r} at level {self.level!r} of this {self.arch.model_type} model"
            ) from None

    def block_of(self, partition_id: str) -> int | None:
        return block_of(partition_id)

    def is_block_partition(self, partition_id: str) -> bool:
        return is_block_partition(partition_id)


def _non_block_label(role: TensorRole) -> str:
    if role.module == "embed":
        return EMBED              # token + position embeddings (and an embedding LayerNorm)
    if role.module in ("final_norm", "lm_head"):
        return HEAD               # final norm + LM head form one module (D-18)
    return OTHER
