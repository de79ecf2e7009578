"""The task_vectors stage: Δ_t = θ_t − θ_b streamed per tensor in fp32, summarised in a small manifest.

Deltas are never stored: kernels recompute them per tensor on the fly (a subtraction is cheaper than reading a stored
delta back). The manifest records what later stages need without touching the weights again: the tensor table,
per-tensor L2 norms and max |Δ|, and the exact global magnitude thresholds for global TIES trimming, found by
two-pass radix selection over the whole task vector in bounded memory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from mergeflow.cache import Cache, cache_key
from mergeflow.checkpoints import Snapshot
from mergeflow.methods.ops import KthSmallest, trim_rank
from mergeflow.tensors import TensorReader


class Input(Protocol):
    """An opened checkpoint (the engine's ``streaming.Input`` is one): its snapshot and its tensor reader."""

    snapshot: Snapshot
    reader: TensorReader

MANIFEST_FILE = "task_vector.json"


@dataclass
class TaskVectorManifest:
    expert: str
    expert_hash: str
    base: str
    base_hash: str
    numel: int
    l2_norm: float
    tensors: dict[str, dict[str, Any]]  # name -> {shape, numel, l2, abs_max}
    thresholds: dict[str, float]  # repr(density) -> keep |Δ| >= threshold
    seconds: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def load(cls, path: Path) -> TaskVectorManifest:
        return cls(**json.loads(Path(path).read_text()))


def _float_names(base: Input) -> list[str]:
    return [n for n, s in base.reader.specs.items() if s.dtype.is_floating_point]


# the base's and the expert's tensor ``name`` re-indexed to a merge's output vocabulary (None: not a vocabulary one)
AlignedRows = Callable[[str], "tuple[torch.Tensor, torch.Tensor] | None"]


def _deltas(base: Input, expert: Input, names: Iterable[str],
            rows: AlignedRows | None = None) -> Iterable[tuple[str, torch.Tensor]]:
    for name in names:
        pair = rows(name) if rows is not None else None
        if pair is not None:
            yield name, pair[1] - pair[0]
            continue
        b = base.reader.get(name).float()
        e = expert.reader.get(name).float()
        if e.shape != b.shape:  # vocab_policy base: compare the rows both have
            rows = min(e.shape[0], b.shape[0])
            b, e = b[:rows], e[:rows]
        yield name, e - b  # never in place: reader tensors may be views of the file mapping


def compute_manifest(base: Input, expert: Input, densities: Iterable[float] = (),
                     rows: AlignedRows | None = None) -> TaskVectorManifest:
    start = time.perf_counter()
    names = _float_names(base)
    densities = sorted(set(densities))
    tensors: dict[str, dict[str, Any]] = {}
    total = 0
    sq = 0.0
    selectors: dict[float, KthSmallest] = {}
    numel = sum(base.reader.specs[n].numel for n in names)
    for d in densities:
        rank = trim_rank(numel, d)
        if rank > 0:
            selectors[d] = KthSmallest(rank)
    for name, delta in _deltas(base, expert, names, rows):
        a = delta.abs_()
        l2 = float(torch.linalg.vector_norm(a))
        tensors[name] = {"shape": list(delta.shape), "numel": delta.numel(), "l2": l2,
                         "abs_max": float(a.max()) if a.numel() else 0.0}
        total += delta.numel()
        sq += l2 * l2
        for sel in selectors.values():
            sel.add_first(a)
    thresholds = {repr(d): float("-inf") for d in densities}
    if selectors:
        for sel in selectors.values():
            sel.finish_first()
        for _, delta in _deltas(base, expert, names, rows):
            a = delta.abs_()
            for sel in selectors.values():
                sel.add_second(a)
        thresholds.update({repr(d): sel.value() for d, sel in selectors.items()})
    return TaskVectorManifest(
        expert=expert.snapshot.reference, expert_hash=expert.snapshot.content_hash,
        base=base.snapshot.reference, base_hash=base.snapshot.content_hash, numel=total, l2_norm=sq ** 0.5,
        tensors=tensors, thresholds=thresholds, seconds=round(time.perf_counter() - start, 3),
    )


def task_vector_manifest(base: Input, expert: Input, densities: Iterable[float] = (),
                         cache: Cache | None = None, rows: AlignedRows | None = None,
                         rows_key: str | None = None) -> TaskVectorManifest:
    """The manifest of ``expert − base`` with thresholds for ``densities``, computed once per content.

    ``rows``: the vocabulary tensors re-indexed to a merge's output vocabulary (tokenizer_source), identified in the
    cache key by ``rows_key``."""
    densities = tuple(sorted(set(float(d) for d in densities)))
    cache = cache or Cache()
    extra = {"vocabulary": rows_key} if rows is not None else {}
    key = cache_key("task_vector", base=base.snapshot.content_hash, expert=expert.snapshot.content_hash,
                    densities=[repr(d) for d in densities], **extra)

    def build(folder: Path) -> None:
        (folder / MANIFEST_FILE).write_text(compute_manifest(base, expert, densities, rows).to_json())

    # the entry's files are checked against their recorded hashes first (an edited threshold is a damaged entry);
    # a manifest that still cannot be read is built again rather than failing every later merge
    return cache.load_or_create("task_vector", key, build, lambda folder: TaskVectorManifest.load(folder / MANIFEST_FILE))
