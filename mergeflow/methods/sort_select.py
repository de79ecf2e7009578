"""The entries a CPU ``torch.sort`` puts at positions ``[start, stop)``, without sorting.

mergekit 0.1.x trims TIES/DARE-TIES task vectors with ``torch.argsort(w, descending=True)[:k]`` and Breadcrumbs with
``torch.sort(w).indices[n_bot:n_bot + target]`` (``w = |Δ|`` as float32 on the CPU). Which of several *equal*
magnitudes land inside the slice is decided by the sort's algorithm, and bf16 task vectors have thousands of equal
magnitudes at any cut. torch's CPU sort with ``stable=False`` on this build is libstdc++'s ``std::sort`` on
(value, index) pairs compared by value only (``aten/src/ATen/native/cpu/SortingKernel.cpp``): introsort with a
median-of-three pivot moved to the front, an unguarded Hoare partition, recursion until ranges of at most 16
elements, then one insertion sort (stable) over the whole array; heapsort on a range once the depth limit
2·⌊log2 n⌋ is spent.

Which elements end up at positions ``[start, stop)`` depends only on the partitions whose range straddles ``start``
or ``stop``: every other range keeps its set of elements. :func:`sort_slice_mask` replays those partitions exactly
(same pivots, same swaps, vectorised), at most two per level, then stably sorts the ≤ 16-element ranges at the ends
of the slice, as the final insertion sort does: O(n) expected work instead of O(n log n). The replay runs on NumPy
views of the tensors: its stream compaction (``flatnonzero``) and fancy indexing are several times faster than
torch's on the CPU, and they release the GIL. Where the replay cannot be exact (a NaN, a range that would fall back
to heapsort, another device or dtype) it sorts.
``tests/test_sort_select.py`` checks it against torch's own sort and mergekit's functions on adversarial inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

INSERTION_THRESHOLD = 16  # libstdc++ _S_threshold
_CHUNK = 1 << 13  # granularity of the stop counts
_BATCH = 1 << 20  # swaps applied per batch: the partition's temporaries stay O(_BATCH) besides two boolean masks
_SMALL = 1 << 16  # ranges up to this size are partitioned in one go
# the keys the replay compares: float32 as is, non-negative bf16/fp16 as their bit patterns (same order, as the
# float32 values mergekit sorts)
_KEY_VIEWS = {torch.float32: torch.float32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _lg(n: int) -> int:
    return n.bit_length() - 1


def _before(descending: bool) -> Callable[[float, float], bool]:
    """The sort's comparator on scalar keys: ``a`` goes before ``b``."""
    return (lambda a, b: a > b) if descending else (lambda a, b: a < b)


def _chunk_counts(mask: np.ndarray) -> np.ndarray:
    """Inclusive running count of True entries at the end of each ``_CHUNK``-sized chunk of a 1-D boolean mask."""
    n = mask.size
    full = n // _CHUNK
    counts = np.count_nonzero(mask[:full * _CHUNK].reshape(full, _CHUNK), axis=1)
    if n > full * _CHUNK:
        counts = np.append(counts, np.count_nonzero(mask[full * _CHUNK:]))
    return np.cumsum(counts)


def _true_positions(mask: np.ndarray, running: np.ndarray, first: int, count: int) -> np.ndarray:
    """Positions of the True entries of rank ``first`` .. ``first + count - 1`` (0-based, from the left), ascending;
    ``running`` is ``_chunk_counts(mask)``. Reads only the chunks that hold them."""
    c0 = int(np.searchsorted(running, first, side="right"))
    c1 = int(np.searchsorted(running, first + count - 1, side="right"))
    before = int(running[c0 - 1]) if c0 else 0
    window = mask[c0 * _CHUNK:(c1 + 1) * _CHUNK]
    return np.flatnonzero(window)[first - before:first - before + count] + c0 * _CHUNK


def _crossing(left: np.ndarray, right: np.ndarray, left_run: np.ndarray, right_run: np.ndarray) -> int:
    """The number of swaps of a Hoare partition: the i-th left stop (from the left) is swapped with the i-th right stop
    (from the right) while it lies left of it, i.e. max over s of min(#left stops < s, #right stops >= s)."""
    n = left.size
    total_right = int(right_run[-1])
    cl = np.concatenate([[0], left_run[:-1]])  # left stops before each chunk start
    cr = total_right - np.concatenate([[0], right_run[:-1]])  # right stops from each chunk start on
    below = np.flatnonzero(cl < cr)  # a prefix of the chunks (cl grows, cr shrinks)
    c = int(below[-1]) if below.size else 0
    s0, s1 = c * _CHUNK, min(n, c * _CHUNK + _CHUNK)
    # exact counts for every s in [s0, s1]: the crossing is in there
    cl_s = np.concatenate([[0], np.cumsum(left[s0:s1])]) + int(cl[c])
    cr_s = int(cr[c]) - np.concatenate([[0], np.cumsum(right[s0:s1])])
    return int(np.minimum(cl_s, cr_s).max())


def _partition_small(keys: np.ndarray, idx: np.ndarray, lo: int, hi: int, pivot: np.ndarray,
                     descending: bool) -> int:
    """The same partition for a small range: all stops at once (fewer calls; the per-level overhead dominates)."""
    seg = keys[lo:hi]
    left, right = (seg <= pivot, seg >= pivot) if descending else (seg >= pivot, seg <= pivot)
    left[0] = False
    lpos = np.flatnonzero(left)
    rpos = np.flatnonzero(right)[::-1]
    m = min(lpos.size, rpos.size)
    swaps = int(np.count_nonzero(lpos[:m] < rpos[:m]))
    cut = int(lpos[swaps]) if swaps < lpos.size else hi - lo
    if swaps:
        cut = min(cut, int(rpos[swaps - 1]))
        lpos, rpos = lpos[:swaps] + lo, rpos[:swaps] + lo
        for values in (keys, idx):
            values[lpos], values[rpos] = values[rpos], values[lpos]
    return lo + cut


def _partition(keys: np.ndarray, idx: np.ndarray, lo: int, hi: int, descending: bool,
               keys_needed: Callable[[int, int], bool], idx_needed: Callable[[int, int], bool]) -> int:
    """libstdc++ ``__unguarded_partition_pivot`` on ``keys[lo:hi]`` (with ``idx`` moved alongside), in place.

    Returns the cut: afterwards ``[lo, cut)`` holds elements not after the pivot and ``[cut, hi)`` elements not before
    it, arranged exactly as std::sort arranges them -- on the sides where ``keys_needed(a, b)`` / ``idx_needed(a, b)``
    say the keys / indices of the side ``[a, b)`` are still needed; elsewhere they are left stale.
    """
    comp = _before(descending)
    mid = lo + (hi - lo) // 2
    a, b, c = lo + 1, mid, hi - 1
    ka, kb, kc = float(keys[a]), float(keys[b]), float(keys[c])
    # __move_median_to_first(first, first + 1, mid, last - 1)
    if comp(ka, kb):
        m = b if comp(kb, kc) else (c if comp(ka, kc) else a)
    elif comp(ka, kc):
        m = a
    elif comp(kb, kc):
        m = c
    else:
        m = b
    if m != lo:
        keys[[lo, m]] = keys[[m, lo]]
        idx[[lo, m]] = idx[[m, lo]]
    pivot = keys[lo].copy()
    seg = keys[lo:hi]
    if hi - lo <= _SMALL:
        return _partition_small(keys, idx, lo, hi, pivot, descending)
    # The left scan (from lo + 1) stops at every element not before the pivot, the right scan (from hi - 1) at every
    # element the pivot is not before (the pivot itself stops it at lo at the latest). Until the scans cross, the
    # i-th left stop is swapped with the i-th right stop; both are original elements, since each scan only ever
    # passes positions the other has not touched yet.
    left, right = (seg <= pivot, seg >= pivot) if descending else (seg >= pivot, seg <= pivot)
    left[0] = False
    left_run, right_run = _chunk_counts(left), _chunk_counts(right)
    n_left, n_right = int(left_run[-1]), int(right_run[-1])
    swaps = _crossing(left, right, left_run, right_run)
    # where the left scan stops after the last swap: the next left stop, or the last swapped right stop (which now
    # holds a left stop's element), whichever comes first
    cut = int(_true_positions(left, left_run, swaps, 1)[0]) if swaps < n_left else hi - lo
    if swaps:
        cut = min(cut, int(_true_positions(right, right_run, n_right - swaps, 1)[0]))
    cut += lo
    left_keys, right_keys = keys_needed(lo, cut), keys_needed(cut, hi)
    left_idx, right_idx = idx_needed(lo, cut), idx_needed(cut, hi)
    if not (left_keys or right_keys or left_idx or right_idx):
        return cut
    for i0 in range(0, swaps, _BATCH):
        count = min(_BATCH, swaps - i0)
        lpos = _true_positions(left, left_run, i0, count) + lo
        # right stops i0 .. i0 + count - 1 from the right = ranks n_right - i0 - count .. n_right - i0 - 1 from the left
        rpos = _true_positions(right, right_run, n_right - i0 - count, count)[::-1] + lo
        for values, to_left, to_right in ((keys, left_keys, right_keys), (idx, left_idx, right_idx)):
            from_left = values[lpos] if to_right else None
            if to_left:
                values[lpos] = values[rpos]
            if from_left is not None:
                values[rpos] = from_left
    return cut


def sorted_slice_mask(w: torch.Tensor, start: int, stop: int, descending: bool) -> torch.Tensor:
    """The reference (and fallback): the slice of the sort's indices itself (of float32 values on the CPU, as
    mergekit sorts them), as a mask."""
    flat = w.reshape(-1)
    if flat.device.type == "cpu":
        flat = flat.float()
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    mask[torch.sort(flat, descending=descending).indices[start:stop]] = True
    return mask.reshape(w.shape)


def sort_slice_mask(w: torch.Tensor, start: int, stop: int, *, descending: bool,
                    overwrite: bool = False) -> torch.Tensor | None:
    """Boolean mask (shape of ``w``) of the entries at positions ``[start, stop)`` of
    ``torch.sort(w.reshape(-1), descending=descending).indices`` (``stable=False``; bf16/fp16 ``w`` as float32).

    On the CPU with float32 ``w``, or non-negative bf16/fp16 ``w``, the partitions are replayed (see the module docstring); elsewhere, and where a
    replay cannot be exact, the sort itself runs. ``overwrite``: ``w`` is scratch the replay may permute (saves a
    copy) and is left in an unspecified order; then, where the replay gives up after permuting it, the result is
    ``None`` and the caller sorts its own values (:func:`sorted_slice_mask`).
    """
    n = w.numel()
    start, stop = max(0, start), min(n, stop)
    if start >= stop:
        return torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    if start == 0 and stop == n:
        return torch.ones(w.shape, dtype=torch.bool, device=w.device)
    if w.device.type != "cpu" or w.requires_grad or not w.dtype.is_floating_point:
        return sorted_slice_mask(w, start, stop, descending)
    source = w  # the caller's values: intact unless they are given up as scratch
    if w.dtype not in _KEY_VIEWS:
        w = w.float()  # a copy of our own: mergekit sorts float32 on the CPU
    flat = w.reshape(-1)
    # NaN goes by the comparator's special case, and a sign bit (even -0.0's) breaks the bit-pattern order: sort
    if bool(torch.isnan(flat.max())):  # max propagates NaN: one pass
        return sorted_slice_mask(source, start, stop, descending)
    # 16-bit floats without a sign bit order like their bit patterns: compare those (exact, half the traffic)
    view = flat.view(_KEY_VIEWS[w.dtype])
    if view.dtype == torch.int16 and int(view.min()) < 0:
        return sorted_slice_mask(source, start, stop, descending)
    shared = overwrite and flat.is_contiguous() and flat.data_ptr() == source.data_ptr()
    own = w is not source or shared  # keys may be the memory of w itself
    keys = view.numpy() if own and flat.is_contiguous() else view.numpy().copy()
    idx = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    bounds = [b for b in (start, stop) if 0 < b < n]

    def keys_needed(a: int, b: int) -> bool:  # the range is partitioned or sorted further
        return any(a < x < b for x in bounds)

    def idx_needed(a: int, b: int) -> bool:  # some of the range's elements end up inside the slice
        return a < stop and b > start

    # ranges still to partition: (lo, hi, depth limit left); each straddles at least one bound
    todo = [(0, n, 2 * _lg(n))]
    leaves: list[tuple[int, int]] = []
    while todo:
        lo, hi, depth = todo.pop()
        if hi - lo <= INSERTION_THRESHOLD:
            leaves.append((lo, hi))
            continue
        if depth == 0:
            # std::sort heapsorts this range (adversarial inputs only): sort, unless the input was given up as scratch
            return None if shared else sorted_slice_mask(source, start, stop, descending)
        cut = _partition(keys, idx, lo, hi, descending, keys_needed, idx_needed)
        for child in ((lo, cut), (cut, hi)):
            if keys_needed(*child):
                todo.append((*child, depth - 1))
    for lo, hi in leaves:
        # the final insertion sort: stable, and never moves an element out of its partition range
        leaf = keys[lo:hi]
        order = np.argsort(-leaf if descending else leaf, kind="stable")
        idx[lo:hi] = idx[lo:hi][order]
    mask = np.zeros(n, dtype=np.bool_)
    mask[idx[start:stop]] = True
    return torch.from_numpy(mask).reshape(w.shape)


def topk_mask(w: torch.Tensor, k: int, *, overwrite: bool = False) -> torch.Tensor | None:
    """The entries of ``torch.argsort(w, descending=True)[:k]`` as a boolean mask of ``w``'s shape: mergekit's
    magnitude trim, equal magnitudes kept exactly as the sort keeps them (``None``: see :func:`sort_slice_mask`)."""
    return sort_slice_mask(w, 0, k, descending=True, overwrite=overwrite)


def ascending_slice_mask(w: torch.Tensor, start: int, stop: int, *,
                         overwrite: bool = False) -> torch.Tensor | None:
    """The entries of ``torch.sort(w).indices[start:stop]`` as a boolean mask of ``w``'s shape: mergekit's
    Breadcrumbs selection (``None``: see :func:`sort_slice_mask`)."""
    return sort_slice_mask(w, start, stop, descending=False, overwrite=overwrite)
