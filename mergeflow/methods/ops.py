"""Building blocks of the task-arithmetic family: sparsifiers, rescaling, sign election, disjoint merge.

Small pure functions over one tensor (or a stack of K tensors), in the spirit of PEFT's ``merge_utils``. The
``*_compat`` variants reproduce mergekit 0.1.x exactly (same ops, same order, same dtypes); the others follow the
papers and are written for speed (exact thresholds by radix selection instead of a full sort).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

_HI_BINS = 1 << 15  # sign bit is 0 for |x|, so the high 16 bits of a non-negative float32 are < 2**15
_LO_BINS = 1 << 16
_RADIX_MIN_NUMEL = 1 << 20
_HIST_CHUNK = 1 << 22


class KthSmallest:
    """Exact k-th smallest of a stream of non-negative float32 values, in bounded memory.

    Two passes over the same data (e.g. every tensor of a task vector): the first histograms the high 16 bits of the
    IEEE-754 patterns (monotonic for non-negative floats), which locates the bucket holding rank ``k``; the second
    histograms the low 16 bits of the values inside that bucket, which gives the exact value. Memory is two
    histograms, whatever the number of values.
    """

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError("k must be >= 1")
        self.k = k
        self.count = 0
        # histograms live on the device of the values (so a GPU merge histograms on the GPU)
        self._hi: torch.Tensor | None = None
        self._lo: torch.Tensor | None = None
        self._bucket: int | None = None
        self._rank_in_bucket = 0

    @staticmethod
    def _bit_chunks(values: torch.Tensor) -> Iterator[torch.Tensor]:
        """The float32 bit patterns of ``values``, in chunks: the shifted bits and bincount's own copies stay
        small beside a tensor of 10⁸ values."""
        flat = values.reshape(-1)
        for start in range(0, flat.numel(), _HIST_CHUNK):
            yield flat[start:start + _HIST_CHUNK].float().view(torch.int32)

    def add_first(self, values: torch.Tensor) -> None:
        for bits in self._bit_chunks(values):
            hist = torch.bincount(bits >> 16, minlength=_HI_BINS)
            self._hi = hist if self._hi is None else self._hi.add_(hist.to(self._hi.device))
        self.count += values.numel()

    def finish_first(self) -> None:
        if self.k > self.count or self._hi is None:
            raise ValueError(f"k={self.k} exceeds the {self.count} values seen")
        cum = torch.cumsum(self._hi.cpu(), 0)
        bucket = int(torch.searchsorted(cum, torch.tensor(self.k)).item())
        self._bucket = bucket
        self._rank_in_bucket = self.k - (int(cum[bucket - 1]) if bucket > 0 else 0)

    def add_second(self, values: torch.Tensor) -> None:
        assert self._bucket is not None, "call finish_first() first"
        for bits in self._bit_chunks(values):
            inside = bits[(bits >> 16) == self._bucket]
            if inside.numel():
                hist = torch.bincount(inside & 0xFFFF, minlength=_LO_BINS)
                self._lo = hist if self._lo is None else self._lo.add_(hist.to(self._lo.device))

    def value(self) -> float:
        assert self._bucket is not None and self._lo is not None
        cum = torch.cumsum(self._lo.cpu(), 0)
        low = int(torch.searchsorted(cum, torch.tensor(self._rank_in_bucket)).item())
        bits = torch.tensor([(self._bucket << 16) | low], dtype=torch.int32)
        return float(bits.view(torch.float32).item())


def kth_smallest(values: torch.Tensor, k: int) -> float:
    """Exact k-th smallest (1-based) of a non-negative tensor; several times faster than ``torch.kthvalue`` on CPU
    for large tensors (small ones use ``kthvalue``: the histograms would cost more than the selection)."""
    if values.numel() < _RADIX_MIN_NUMEL:
        return float(values.reshape(-1).float().kthvalue(k).values)
    sel = KthSmallest(k)
    sel.add_first(values)
    sel.finish_first()
    sel.add_second(values)
    return sel.value()


def trim_rank(numel: int, density: float) -> int:
    """Rank of the trim threshold as in the official TIES code: keep |x| >= the (n - floor(d·n))-th smallest.

    Returns 0 when nothing is trimmed (density 1).
    """
    return numel - int(density * numel)


def magnitude_threshold(abs_delta: torch.Tensor, density: float) -> float:
    """Threshold t such that keeping ``|delta| >= t`` keeps the top ``density`` fraction (ties kept)."""
    rank = trim_rank(abs_delta.numel(), density)
    if rank <= 0:
        return float("-inf")
    return kth_smallest(abs_delta, rank)


def magnitude_mask(delta: torch.Tensor, density: float, scope: str = "tensor") -> torch.Tensor:
    """Boolean keep-mask of the largest-|delta| entries, per tensor or per row (official TIES tie handling)."""
    a = delta.abs()
    if scope == "tensor" or delta.dim() < 2:
        return a >= magnitude_threshold(a, density)
    if scope == "row":
        rows = a.reshape(a.shape[0], -1)
        rank = trim_rank(rows.shape[1], density)
        if rank <= 0:
            return torch.ones_like(delta, dtype=torch.bool)
        kth = rows.kthvalue(rank, dim=1, keepdim=True).values
        return (rows >= kth).reshape(delta.shape)
    raise ValueError(f"unknown trim scope {scope!r}")


def bernoulli_keep(shape: torch.Size, density: float | torch.Tensor, generator: torch.Generator | None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """DARE keep-mask: each entry kept with probability ``density`` (a float or a broadcastable tensor)."""
    u = torch.rand(shape, generator=generator, device=device)
    return u < density


def rescale_kept(delta: torch.Tensor, keep: torch.Tensor, density: float | torch.Tensor, mode: str) -> torch.Tensor:
    """Zero the dropped entries and rescale the kept ones, in place on ``delta`` (which the caller owns).

    ``inverse``: divide by the keep probability (original DARE, DELLA); ``l1``/``l2``/``linf``: match the norm of the
    unmasked tensor (mergekit >= 0.1); ``none``: no rescale.
    """
    if mode in ("l1", "l2", "linf"):
        return norm_rescale(delta, delta * keep, mode)
    masked = delta.mul_(keep)  # several times faster than masked_fill_ on CPU
    if mode == "none":
        return masked
    if mode == "inverse":
        if isinstance(density, torch.Tensor):
            inv = torch.where(density > 0, 1.0 / density.clamp_min(1e-12), torch.zeros_like(density))
            return masked.mul_(inv)
        return masked.mul_(1.0 / density) if density > 0 else masked.zero_()
    raise ValueError(f"unknown rescale mode {mode!r}")


def norm_rescale(original: torch.Tensor, masked: torch.Tensor, mode: str, eps: float = 1e-7) -> torch.Tensor:
    if mode == "l1":
        before, after = original.abs().sum(), masked.abs().sum()
    elif mode == "l2":
        before, after = original.norm(), masked.norm()
    elif mode == "linf":
        before, after = original.abs().max(), masked.abs().max()
    else:
        raise ValueError(f"unknown rescale mode {mode!r}")
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def outlier_keep(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the ``gamma`` fraction of largest |delta| and enough of the smallest to keep ``density``."""
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    w = delta.abs().reshape(-1).float()
    order = torch.sort(w, descending=False).indices
    keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
    keep[order[n_bot:n_bot + target]] = True
    return keep.reshape(delta.shape)


def della_keep_prob(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune keep probabilities: linear in the magnitude rank within each row, in [d - ε, d + ε]."""
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)
    n = rows.shape[1]
    rank_norm = ranks / (n - 1) if n > 1 else torch.ones_like(ranks)
    probs = (density - epsilon) + rank_norm * (2 * epsilon)
    return probs.reshape(delta.shape)


# --- sign election and disjoint merge (TIES family) ---

def elect_and_merge(stacked: torch.Tensor, election: str, divisor: str,
                    weights: Sequence[torch.Tensor | float] | None = None) -> torch.Tensor:
    """TIES sign election and disjoint merge of a [K, ...] stack of trimmed deltas, consuming the stack.

    The elected sign is that of the sum (``sum``, TIES "mass") or of the sign count (``count``) of the stack as
    given; ties go to +1 (mergekit and PEFT). Entries agreeing with it (zeros never agree) are summed, each times its
    ``weights[i]`` when given (a float or a tensor broadcastable to the entry), and divided by their count
    (``count``, the official disjoint mean) or not at all (``none``). With ``weights`` the vote is on the unweighted
    deltas, as in PEFT's ``ties`` and docs/methods.md D-15 (mergekit weights the stack first and passes no
    ``weights``). One model at a time and in place, so the temporaries are the size of one tensor, not K.
    """
    vote = stacked.sum(dim=0) if election == "sum" else stacked.sign().sum(dim=0)
    sign = (vote >= 0).to(vote.dtype).mul_(2.0).sub_(1.0)  # ties of the vote go to +1
    mixed = torch.zeros_like(vote)
    count = torch.zeros_like(vote) if divisor == "count" else None
    for i, d in enumerate(stacked):
        agree = (d * sign) > 0  # same sign as elected; zeros never agree
        if count is not None:
            count.add_(agree)
        d.mul_(agree)
        if weights is not None:
            d.mul_(weights[i])
        mixed.add_(d)
    if count is not None:
        mixed.div_(count.clamp_(min=1.0))
    elif divisor != "none":
        raise ValueError(f"unknown divisor {divisor!r}")
    return mixed
