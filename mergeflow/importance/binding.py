"""Where each checkpoint tensor lives in a model that transformers has loaded (docs/methods.md D-37).

Estimators run the loaded model but read, swap and report per *checkpoint tensor*: the partitions, the merge and the
coefficients artifact all speak checkpoint names. For most families a checkpoint tensor is a model parameter of the
same name. transformers 5 converts some checkpoints while it loads them: the experts of Mixtral and Qwen3-MoE,
stored one tensor per expert and projection (``mlp.experts.3.w1.weight``, ``mlp.experts.3.gate_proj.weight`` ...),
become one parameter per projection kind stacked over the experts (``mlp.experts.gate_up_proj`` ``[E, 2I, H]``,
``mlp.experts.down_proj``), and modules may be renamed on the way. A :class:`Binding` maps every checkpoint tensor to
its :class:`Slot`, ``(parameter, index into it, transposed)``, both ways:

* reading: ``binding.view(params, name)`` is the checkpoint tensor ``name`` inside a parameter dict (the model's
  parameters, their gradients, a Fisher diagonal): a view, no copy;
* writing: the same view, written in place, swaps one checkpoint tensor's values inside the fused parameter (the
  causal intervention of APL, the per-module weights of SLTA).

The mapping is not a per-family table: it is found by value. Checkpoint tensors that are not parameters by name are
grouped by their name with the expert indices taken out (``layers.0.mlp.experts.*.w1.weight``); for one member of a
group every place in the parameters of the same block that holds exactly its values (the whole parameter, or a slice
of it along one axis, stacked over the group's indices, possibly transposed) is a candidate, and the group's first and
last members must agree on one. Then every parameter that received slots must be covered entry for entry. A
parameter that a conversion made from values no checkpoint tensor holds unchanged (a permutation, a scale) has no
slot, and the estimators refuse it by name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mergeflow.architecture import Architecture
from mergeflow.checkpoints import find_weight_files
from mergeflow.errors import ArchitectureError
from mergeflow.tensors import CheckpointReader

Index = tuple[int | slice, ...]


@dataclass(frozen=True)
class Slot:
    """One checkpoint tensor inside a model parameter: ``param[index]`` (transposed when ``transposed``)."""

    param: str
    index: Index = ()
    transposed: bool = False

    @property
    def whole(self) -> bool:
        """The checkpoint tensor *is* the parameter (same name or not): swapped by reference, not copied."""
        return not self.index and not self.transposed

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The checkpoint tensor's entries inside ``tensor`` (a parameter-shaped tensor): a view that writes through."""
        out = tensor[self.index] if self.index else tensor
        return out.t() if self.transposed else out


@dataclass
class Binding:
    """Checkpoint tensor name → :class:`Slot` for one loaded model class and checkpoint layout."""

    slots: dict[str, Slot]
    held: dict[str, list[str]] = field(default_factory=dict)   # parameter → the checkpoint tensors it holds
    fused: bool = False                                          # some parameter holds several checkpoint tensors

    def __post_init__(self) -> None:
        if not self.held:
            for name, slot in self.slots.items():
                self.held.setdefault(slot.param, []).append(name)
        self.fused = self.fused or any(not s.whole for s in self.slots.values())

    def __contains__(self, name: str) -> bool:
        return name in self.slots

    def slot(self, name: str, who: str = "estimator") -> Slot:
        try:
            return self.slots[name]
        except KeyError:
            raise ArchitectureError(
                f"{who}: checkpoint tensor {name!r} is not a parameter of the loaded model and no parameter holds "
                "its values (renamed or converted on load in a way mergeflow cannot follow)") from None

    def view(self, tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        """Checkpoint tensor ``name`` inside ``tensors`` (keyed by parameter name)."""
        slot = self.slot(name)
        return slot.view(tensors[slot.param])

    def to_checkpoint(self, per_param: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Parameter-keyed tensors (gradients, Fisher diagonals) re-keyed by checkpoint name; slices are copied so
        that each result owns its storage (``save_file`` refuses shared or strided tensors)."""
        out = {}
        for name, slot in self.slots.items():
            if slot.param in per_param:
                value = slot.view(per_param[slot.param])
                out[name] = value if slot.whole else value.contiguous().clone()
        return out

    def checkpoint_names(self, param: str) -> list[str]:
        return list(self.held.get(param, []))


_DIGITS = re.compile(r"^\d+$")


def _pattern(name: str) -> tuple[str, tuple[int, ...]]:
    """``layers.0.mlp.experts.3.w1.weight`` → (``layers.0.mlp.experts.*.w1.weight``, (3,)): every number after the
    first (the block index) is an index into a stack."""
    tokens = name.split(".")
    numbers: list[int] = []
    seen_block = False
    out = []
    for tok in tokens:
        if _DIGITS.match(tok):
            if seen_block:
                numbers.append(int(tok))
                out.append("*")
                continue
            seen_block = True
        out.append(tok)
    return ".".join(out), tuple(numbers)


def _block(name: str) -> str:
    """The name up to and including the first number (the block), or "" outside blocks."""
    tokens = name.split(".")
    for i, tok in enumerate(tokens):
        if _DIGITS.match(tok):
            return ".".join(tokens[:i + 1])
    return ""


def _same_place(a: str, b: str) -> bool:
    """Equal names, or one the other with a model prefix (old GPT-2 checkpoints lack ``transformer.``)."""
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def _prefixed(name: str, params: Mapping[str, torch.Tensor]) -> str | None:
    """The one parameter whose name is ``name`` up to a model prefix, if exactly one is."""
    hits = [n for n in params if _same_place(n, name)]
    return hits[0] if len(hits) == 1 else None


def _places(target: torch.Tensor, holder: torch.Tensor) -> list[tuple[Index, bool]]:
    """Every (index, transposed) with ``holder[index] (ᵀ) == target``: the whole holder, or a slice along one axis."""
    found: list[tuple[Index, bool]] = []
    for transposed in ((False, True) if target.dim() == 2 else (False,)):
        t = target.t() if transposed else target
        if t.dim() != holder.dim():
            continue
        if tuple(t.shape) == tuple(holder.shape):
            if torch.equal(t, holder):
                found.append(((), transposed))
            continue
        differ = [a for a in range(t.dim()) if t.shape[a] != holder.shape[a]]
        if len(differ) != 1 or holder.shape[differ[0]] % t.shape[differ[0]]:
            continue
        axis, size = differ[0], t.shape[differ[0]]
        for start in range(0, holder.shape[axis], size):
            if torch.equal(holder.narrow(axis, start, size), t):
                index = (slice(None),) * axis + (slice(start, start + size),)
                found.append((index, transposed))
    return found


def _match(target: torch.Tensor, numbers: tuple[int, ...], holder: torch.Tensor) -> list[tuple[int, Index, bool]]:
    """Places of ``target`` in ``holder``: unstacked (``numbers`` not used: extra == 0) or stacked over the indices."""
    out: list[tuple[int, Index, bool]] = []
    extra = holder.dim() - target.dim()
    if extra == 0:
        out += [(0, index, tr) for index, tr in _places(target, holder)]
    elif extra > 0 and extra <= len(numbers):
        # the last `extra` numbers of the name index the stacked axes (layers.0.mlp.experts.3: expert 3)
        stack = numbers[len(numbers) - extra:]
        if all(0 <= n < holder.shape[a] for a, n in enumerate(stack)):
            out += [(extra, index, tr) for index, tr in _places(target, holder[stack])]
    return out


def build_binding(params: Mapping[str, torch.Tensor], arch: Architecture,
                  read: Callable[[str], torch.Tensor]) -> Binding:
    """The binding of a loaded model (``params``: ``named_parameters(remove_duplicate=False)``) to its checkpoint
    (``arch``, ``read(name)`` the checkpoint tensor). Reads only tensors whose names are not parameters."""
    slots: dict[str, Slot] = {}
    unmatched: list[str] = []
    for name, role in arch.tensors.items():
        if not role.is_floating:
            continue
        pname = name if name in params else _prefixed(name, params)
        if pname is not None and tuple(params[pname].shape) == tuple(role.shape):
            slots[name] = Slot(pname)
        else:
            unmatched.append(name)
    if not unmatched:
        return Binding(slots)
    claimed = {id(params[s.param]) for s in slots.values()}
    free = {n: p for n, p in params.items() if id(p) not in claimed}
    groups: dict[str, list[tuple[tuple[int, ...], str]]] = {}
    for name in unmatched:
        pattern, numbers = _pattern(name)
        groups.setdefault(pattern, []).append((numbers, name))
    work = [(pattern, sorted(members)) for pattern, members in groups.items()]
    while work:
        pattern, members = work.pop(0)
        block = _block(pattern)
        candidates = {n: p for n, p in free.items() if _same_place(_block(n), block)}
        first_numbers, first = members[0]
        target = read(first).to(torch.float32)
        found = []
        for pname, p in candidates.items():
            for extra, index, tr in _match(target, first_numbers, p.detach().to(torch.float32)):
                found.append((pname, extra, index, tr))
        if len(found) > 1 and len(members) > 1:
            # the last member tells places apart that the first member's values cannot (equal slices)
            last_numbers, last = members[-1]
            last_target = read(last).to(torch.float32)
            found = [f for f in found if _holds(params[f[0]], f[1], f[2], f[3], last_numbers, last_target)]
        if not found:
            continue  # left unbound: an estimator that needs it names it
        if len(found) > 1:
            raise ArchitectureError(
                f"checkpoint tensor {first!r} matches several places of the loaded model "
                f"({', '.join(sorted({f[0] for f in found}))}); cannot tell which one it is")
        pname, extra, index, tr = found[0]
        if extra == 0 and len(members) > 1:
            # not stacked: each member has a parameter of its own (a renamed module list); searched one by one
            work += [(pattern, [m]) for m in members]
            continue
        for numbers, name in members:
            stack = numbers[len(numbers) - extra:] if extra else ()
            slot = Slot(pname, tuple(stack) + index, tr)
            if tuple(slot.view(params[pname]).shape) != tuple(arch.role(name).shape):
                raise ArchitectureError(f"checkpoint tensor {name!r} {list(arch.role(name).shape)} does not fit "
                                        f"{pname}{_show(slot)} of the loaded model")
            slots[name] = slot
        if len(members) > 1:
            last_numbers, last = members[-1]
            if not _holds(params[pname], extra, index, tr, last_numbers, read(last).to(torch.float32)):
                raise ArchitectureError(f"checkpoint tensor {last!r} is not where {first!r} places it in {pname}")
    binding = Binding(slots)
    for pname in binding.held:
        if pname in free:
            covered = sum(math.prod(arch.role(n).shape) for n in binding.held[pname])
            if covered != free[pname].numel():
                raise ArchitectureError(
                    f"parameter {pname} of the loaded model holds {covered} entries of checkpoint tensors "
                    f"({binding.held[pname][0]}, ...) but has {free[pname].numel()}")
    return binding


def _holds(p: torch.Tensor, extra: int, index: Index, transposed: bool, numbers: tuple[int, ...],
           target: torch.Tensor) -> bool:
    stack = numbers[len(numbers) - extra:] if extra else ()
    if any(not 0 <= n < p.shape[a] for a, n in enumerate(stack)):
        return False
    view = Slot("", tuple(stack) + index, transposed).view(p.detach().to(torch.float32))
    return tuple(view.shape) == tuple(target.shape) and torch.equal(view, target)


def _show(slot: Slot) -> str:
    parts = [str(i) if isinstance(i, int) else (":" if i == slice(None) else f"{i.start}:{i.stop}")
             for i in slot.index]
    return (f"[{', '.join(parts)}]" if parts else "") + (".T" if slot.transposed else "")


_BINDINGS: dict[tuple[str, str, tuple[str, ...]], Binding] = {}


def binding_for(model: nn.Module, checkpoint: Path | str, arch: Architecture | None = None, *,
                content_key: str | None = None) -> Binding:
    """The binding of ``model`` (loaded from ``checkpoint``, or from any checkpoint of the same layout: experts share
    their base's) to that checkpoint's tensors. Remembered per (checkpoint content, model class, parameter names),
    so a run builds it once for the base and reuses it for every expert."""
    params = dict(model.named_parameters(remove_duplicate=False))
    key = (content_key or str(checkpoint), type(model).__name__, tuple(params))
    hit = _BINDINGS.get(key)
    if hit is not None:
        return hit
    checkpoint = Path(checkpoint)
    arch = arch if arch is not None else Architecture.from_folder(checkpoint)
    reader: CheckpointReader | None = None

    def read(name: str) -> torch.Tensor:
        nonlocal reader
        if reader is None:
            files, fmt = find_weight_files(checkpoint, allow_pickle=True)
            reader = CheckpointReader(checkpoint, files, allow_pickle=fmt == "pickle")
        return reader.get(name)

    try:
        binding = build_binding(params, arch, read)
    finally:
        if reader is not None:
            reader.close()
    if len(_BINDINGS) > 32:
        _BINDINGS.clear()
    _BINDINGS[key] = binding
    return binding
