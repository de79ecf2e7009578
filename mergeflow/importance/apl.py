"""APL — activated parameter locating via causal intervention (docs/methods.md §2; decisions D-1…D-11, D-32).

Kong, Zhang, Wang, arXiv 2408.09485. Every expert's task vector is pruned DARE-style, but with a drop ratio per
partition instead of one for the whole model: partitions that matter for the expert's task (measured on a handful of
labelled examples) are pruned less, the others more. Optionally the model-level importance of each expert also sets its
merging weight ("MI-Task Arithmetic"). This module only *measures*: it writes a :class:`Coefficients` artifact with a
``drop_ratio`` field (the DARE kernels turn it into a per-entry density ``1 − p̂`` and, in paper mode, rescale kept
entries by ``1/(1 − p̂)``) and, for MI-TA, a model-level ``weight`` field. The merge is the ordinary ``dare_linear`` /
``dare_ties`` kernel (θ = θ_b + λ Σ_t w_t Δ̂_t; λ is the recipe's own ``lambda``, default 1 — D-32).

Importance (§2.4), unified so that a larger score means more important:

* ``causal`` (Eqs. 3–8): ``P`` = mean over the few-shot examples of the gold-answer probability (length-normalised
  by default, ``probability: sequence`` for the full product; §1.6, D-4). For each partition S the expert's entries of
  S are replaced by the base's and ``s_S = P_clean − P_S`` (= −I_S). Negative scores — the swap *helps* — are kept
  (D-7). The model score is ``s^M = P(θ_t) − P(θ_b)`` (Eq. 6); ``P(θ_b)`` depends only on the data, so it is computed
  once per distinct task.
* ``grad`` (Eqs. 9–10, "w/GA"): one forward + backward of the **base** per distinct task (OOD: one, shared — D-10) on
  the answer-token LM loss (``loss_tokens: all``: every token), mean over examples (D-4); ``s_S = |Σ_{i∈S} Δ_i g_i|``
  — the signed sum over the whole partition first, the absolute value last (D-6). The model-level score comes from
  causal tracing (two extra forwards) when MI weights are asked for; otherwise the artifact records the gradient
  whole-model score ``|<Δ, g>|`` instead (``stats.model_score`` says which), so that the gradient path stays one
  forward + backward.

Partitions (§1.3): ``model`` (one partition: p̂ = p, i.e. exactly DARE, as the paper states), ``layer`` (one per
decoder block) and ``hidden_state``. D-1: in the default ``residual`` mode, hidden state h is every entry whose
residual-stream index is h (columns of the matrices that read the stream, rows of those that write it, element h of
every norm, column h of the embedding and LM head); tensors without a d_model axis (e.g. q/k/v biases) form the
uncalibrated ``ungrouped`` partition. ``per_layer_rows`` makes every output row of every block matrix a partition.
Causal tracing costs one pass per partition, so at the hidden_state level it is refused above
``hidden_state_budget`` partitions unless ``estimator: grad`` (D-1, §2.12).

Tensors outside the calibrated partitions (D-2: embeddings, final norm and LM head at the layer level and with
``per_layer_rows``; ``ungrouped`` in the residual hidden_state mode) follow ``nonblock_policy``: ``base_p``
(default) prunes them with the uncalibrated p, ``own_partitions`` scores and calibrates them like the blocks,
``keep_unpruned`` gives them drop ratio 0 (DARE keeps them whole). Every other floating tensor is pruned (D-9; the
``exclude_regex`` option of D-9 is not offered here).

Drop ratio (Eq. 11, stripped from every reachable copy of the paper and **reconstructed**, D-3, §2.5)::

    ŝ = normalize(s)              # "" = auto: raw for causal (s ∈ [−1, 1]), max for grad (s / max|s| ∈ [0, 1])
    p̂ = p − ε · act(ŝ / T)        # act = tanh (default) or 2σ(x) − 1; the paper's p + ε·tanh(I/T) with I = −s
    p̂ = clip(p̂, 0, p_max)         # p_max = 0.999 keeps 1/(1 − p̂) finite; clipping is logged as a warning

* a zero or constant score vector gives p̂ = p everywhere (D-7), whatever the normalisation;
* ``preserve_mean_drop`` shifts all p̂ of an expert by one constant, found by bisection, so that the mean of p̂
  weighted by each partition's parameter count equals p (equal-budget comparisons, §2.12); the mean is taken over
  the calibrated partitions (uncalibrated tensors are at p, or 0 with keep_unpruned, by construction);
* ``mapping: linear`` is the rank-based variant of the paper's pruning comparison (Fig. 3): r = 0 least important …
  P−1 most important (ties: the lower partition index ranks lower, D-5), ``p̂ = p + ε_lin (1 − 2r/(P−1))`` with
  ``ε_lin = min(ε, p, 1 − p − 1e-6, p_max − p)`` (D-5).

MI-TA weights (Eq. 12, reconstructed, §2.7, D-8): ``w = softmax(s^M / T_m)`` over the experts (raw model scores by
default, ``mi_normalize: zscore`` optional), times ``lambda_mi`` and times K when ``scale_by_k``; written as a
``weight`` field at the model level, which replaces the recipe's per-model weights. Without MI weights the recipe's
own weights stay (plain "APL + TA").

Out of domain (§2.7, D-10, D-11): every expert is scored on the one target task of the run; the causal base
probability and the gradient are computed once and shared.

Cost (§2.10). Causal tracing loads each expert once and never copies the model per partition. Two exact ways to
run the swaps (``tracing``):

* ``in_place``: the partition's entries are overwritten with the base's (whole tensors swapped by reference, slices
  copied) and restored after one forward. The clean run records every decoder block's output, and a swap whose first
  changed block is l replays the recorded outputs of blocks 0 … l−1 instead of computing them (checked on every clean
  run by recomputing the last block from its recorded input). Layer level: the clean run plus Σ_l (L − l) blocks instead
  of (L + 1) L — about 0.6× the time of (L + 2) plain forwards at L = 8–16.
* ``batched``: the few-shot batch is repeated once per variant along the batch axis, and forward hooks on the modules
  that own the swapped entries rewrite those rows' outputs as if the entries held the base values — a whole-module
  swap reruns the module on its rows with the base tensors, a swap of output units recomputes just those units, a swap
  of input columns of a linear map adds the low-rank correction ``x[:, idx] (W_b − W_t)[:, idx]ᵀ``; variants that swap
  one slice each (hidden states, rows) are corrected together in a few batched ops. The arithmetic is that of one
  forward per variant, but in far fewer forwards: it pays where forwards are launch-bound (small models, GPUs), not on
  a CPU, where the corrections cost more than the forwards they save. Models whose parameters are not used through
  batch-first module calls (routed MoE experts, for instance) are detected and fall back to ``in_place``.

``auto`` picks ``batched`` for hidden_state partitions on a GPU and ``in_place`` otherwise. Peak memory: the base and
one expert (fp32), the recorded block outputs of one batch, and the repeated batch's activations when batched
(``batch_size`` counts sequences per forward, variants included). The gradient estimator keeps one gradient (the
size of the model) per distinct task at a time.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mergeflow.architecture import Architecture
from mergeflow.coefficients import CoefficientField, Coefficients
from mergeflow.errors import MergeflowError, RecipeError
from mergeflow.importance.base import WHOLE, Estimator, ImportanceRun, Measurements, MeasurePart, register_estimator
from mergeflow.importance.binding import Binding, binding_for
from mergeflow.importance.costs import (
    CostPlan,
    Pass,
    PlanInputs,
    chunks,
    declare_plan,
    largest_activations,
    model_bytes,
    passes_over,
)
from mergeflow.importance.scoring import Encoded, answer_logprobs, batches, encode, lm_loss
from mergeflow.methods.base import ParamSpec
from mergeflow.partitions import HIDDEN_STATE_MODES, Partitioner, is_block_partition

log = logging.getLogger(__name__)

LEVELS = ("model", "layer", "hidden_state")
NORMALIZATIONS = ("", "raw", "max", "zscore", "center", "minmax_centered")
NONBLOCK_POLICIES = ("base_p", "own_partitions", "keep_unpruned")

PARAMS = (
    ParamSpec("level", str, "layer", choices=LEVELS,
              help="partition level: model (= DARE), layer (one per decoder block), hidden_state (D-1)"),
    ParamSpec("estimator", str, "causal", choices=("causal", "grad"),
              help="causal: swap each partition to the base and measure the gold-probability drop; "
                   "grad: |<Δ_S, ∇L(θ_b)>| from one backward of the base"),
    ParamSpec("p", float, 0.9, low=0.0, high=1.0, high_open=True, help="primary (DARE) drop ratio"),
    ParamSpec("epsilon", float, 0.3, low=0.0, high=1.0,
              help="half-width of the drop-ratio adjustment: p̂ ∈ (p − ε, p + ε)"),
    ParamSpec("temperature", float, 5.0, low=0.0, low_open=True, help="T of the drop-ratio activation (paper: 5)"),
    ParamSpec("normalize", str, "", choices=NORMALIZATIONS,
              help="score normalisation before the activation; empty = raw for causal, max for grad"),
    ParamSpec("activation", str, "tanh", choices=("tanh", "sigmoid_centered"),
              help="tanh, or 2σ(x) − 1"),
    ParamSpec("preserve_mean_drop", bool, False,
              help="shift p̂ so that its parameter-weighted mean equals p (equal-budget comparisons)"),
    ParamSpec("mapping", str, "eq11", choices=("eq11", "linear"),
              help="eq11: p − ε·act(ŝ/T); linear: rank-based p ± ε_lin (paper Fig. 3)"),
    ParamSpec("p_max", float, 0.999, low=0.0, high=1.0, high_open=True,
              help="largest drop ratio (clipped, with a warning)"),
    ParamSpec("nonblock_policy", str, "base_p", choices=NONBLOCK_POLICIES,
              help="tensors outside the calibrated partitions (D-2): prune with p, calibrate them as partitions of "
                   "their own, or keep them unpruned"),
    ParamSpec("hidden_state_mode", str, "residual", choices=HIDDEN_STATE_MODES,
              help="residual: hidden state h = residual-stream index h in every tensor; per_layer_rows: one output "
                   "row of one block matrix"),
    ParamSpec("hidden_state_budget", int, 1024, low=0,
              help="most hidden_state partitions causal tracing may take (one pass each); above it use grad"),
    ParamSpec("weights", str, "none", choices=("none", "mi"),
              help="mi: MI-TA merging weights softmax(s^M / T_m) written as a model-level weight field"),
    ParamSpec("model_temperature", float, 5.0, low=0.0, low_open=True, help="T_m of the MI-TA softmax (paper: 5)"),
    ParamSpec("mi_normalize", str, "raw", choices=("raw", "zscore"), help="model scores before the MI-TA softmax"),
    ParamSpec("lambda_mi", float, 1.0, help="scale of the MI-TA weights (they sum to one)"),
    ParamSpec("scale_by_k", bool, False, help="multiply the MI-TA weights by the number of experts"),
    ParamSpec("probability", str, "normalized", choices=("normalized", "sequence"),
              help="gold-answer probability: length-normalised (default) or the full sequence product"),
    ParamSpec("loss_tokens", str, "answer", choices=("answer", "all"),
              help="tokens of the gradient estimator's LM loss: the gold answer's (default) or every token (D-4)"),
    ParamSpec("batch_size", int, 32, low=1,
              help="sequences per forward pass; causal tracing fills it with several swapped variants"),
    ParamSpec("tracing", str, "auto", choices=("auto", "batched", "in_place"),
              help="how causal swaps run: batched (several per forward, module hooks), in_place (one forward per "
                   "swap, reusing the clean run's outputs of the blocks before the first swapped one); auto: "
                   "batched for hidden_state partitions on a GPU, in_place otherwise"),
)

_EPS = 1e-12


# ------------------------------------------------------------------------------------------------ score → p̂ (pure)


def normalize_scores(scores: torch.Tensor, mode: str) -> torch.Tensor:
    """Normalised scores (float64). Degenerate cases (zero max, zero spread) give zeros (D-7)."""
    s = scores.to(torch.float64)
    if mode == "raw" or s.numel() == 0:
        return s.clone()
    if mode == "max":
        # |s| so that signed (causal) scores keep their sign; identical to s / max s for non-negative grad scores
        top = float(s.abs().max())
        return s / top if top > 0 else torch.zeros_like(s)
    if mode == "zscore":
        std = float(s.std(unbiased=False))
        return (s - s.mean()) / (std + _EPS) if std > 0 else torch.zeros_like(s)
    if mode == "center":
        return s - s.mean()
    if mode == "minmax_centered":
        lo, hi = float(s.min()), float(s.max())
        return 2 * (s - lo) / (hi - lo) - 1 if hi > lo else torch.zeros_like(s)
    raise ValueError(f"unknown normalisation {mode!r}")


def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "tanh":
        return torch.tanh(x)
    if name == "sigmoid_centered":
        return 2 * torch.sigmoid(x) - 1
    raise ValueError(f"unknown activation {name!r}")


def linear_window(p: float, epsilon: float, p_max: float = 0.999) -> float:
    """ε_lin = min(ε, p, 1 − p − 1e-6, p_max − p) (D-5): the rank-based window never leaves [0, p_max], so the
    clip to p_max never cuts it and the mean drop ratio stays exactly p (the spec's window alone reaches 1 − 1e-6,
    which the p_max clip would cut: 1.3 % of the kept parameters at p = 0.995)."""
    return max(0.0, min(epsilon, p, 1.0 - p - 1e-6, p_max - p))


def linear_mapping(scores: torch.Tensor, p: float, epsilon: float, p_max: float = 0.999) -> torch.Tensor:
    """Rank-based p̂ (paper Fig. 3): least important → p + ε_lin, median → p, most important → p − ε_lin."""
    n = scores.numel()
    if n == 1:
        return torch.full((1,), p, dtype=torch.float64)
    order = torch.argsort(scores.to(torch.float64), stable=True)  # ties: lower partition index ranks lower (D-5)
    rank = torch.empty(n, dtype=torch.float64)
    rank[order] = torch.arange(n, dtype=torch.float64)
    return p + linear_window(p, epsilon, p_max) * (1 - 2 * rank / (n - 1))


def _mean_preserving_shift(q: torch.Tensor, sizes: torch.Tensor, p: float, p_max: float) -> float:
    """The constant c with Σ n_S clip(q_S + c, 0, p_max) / Σ n_S = p (bisection; the map is monotone in c)."""
    w = sizes.to(torch.float64) / sizes.to(torch.float64).sum()

    def mean(c: float) -> float:
        return float((w * (q + c).clamp(0.0, p_max)).sum())

    lo, hi = -2.0, 2.0  # mean(lo) = 0 ≤ p; mean(hi) = p_max
    if mean(hi) < p:
        return hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mean(mid) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class DropRatioConfig:
    p: float = 0.9
    epsilon: float = 0.3
    temperature: float = 5.0
    normalize: str = "raw"
    activation: str = "tanh"
    mapping: str = "eq11"
    preserve_mean_drop: bool = False
    p_max: float = 0.999


def drop_ratios(scores: torch.Tensor, sizes: torch.Tensor | None, cfg: DropRatioConfig) -> tuple[torch.Tensor, dict]:
    """Per-partition drop ratios p̂ of one expert from its scores (larger = more important), §2.5 / D-3.

    ``sizes`` are the partitions' parameter counts (only ``preserve_mean_drop`` reads them). Returns p̂ (float64)
    and a small report: how many values were clipped, and the mean-preserving shift.
    """
    s = scores.to(torch.float64)
    info: dict[str, Any] = {"clipped": 0, "shift": 0.0}
    if s.numel() == 0 or bool((s == s[0]).all()):
        return torch.full_like(s, cfg.p), info  # D-7: no information → plain DARE
    if cfg.mapping == "linear":
        q = linear_mapping(s, cfg.p, cfg.epsilon, cfg.p_max)
    else:
        q = cfg.p - cfg.epsilon * activation(normalize_scores(s, cfg.normalize) / cfg.temperature, cfg.activation)
    if cfg.preserve_mean_drop:
        n = torch.ones_like(s) if sizes is None else sizes
        info["shift"] = _mean_preserving_shift(q, n, cfg.p, cfg.p_max)
        q = q + info["shift"]
    info["clipped"] = int(((q < 0) | (q > cfg.p_max)).sum())
    return q.clamp(0.0, cfg.p_max), info


def mi_weights(model_scores: torch.Tensor, temperature: float, normalize: str = "raw") -> torch.Tensor:
    """MI-TA merging weights ``softmax(s^M / T_m)`` over the experts (Eq. 12 reconstructed, §2.7); they sum to one."""
    return torch.softmax(normalize_scores(model_scores, normalize) / temperature, dim=0)


# ------------------------------------------------------------------------------------------------ causal tracing


class _Unbatchable(Exception):
    """The model uses a swapped parameter outside a batch-first module call: batched variants would be wrong."""


@dataclass(frozen=True)
class _Swap:
    """One tensor's share of a partition: ``index`` along ``axis`` (None: the whole tensor) takes ``base``'s values."""

    tensor: str
    axis: int | None
    index: torch.Tensor | None
    base: torch.Tensor


def _conv1d_type() -> type | None:
    try:  # transformers costs seconds to import; estimator modules load when a recipe is validated
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return None
    return Conv1D


def _broadcast_rows(value: Any, n: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 1:
        return value.expand(n, *value.shape[1:])
    return value


def _take_rows(value: Any, rows: slice, n: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value[rows]
    return value


def _linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
                 swaps: dict[str, tuple[int | None, torch.Tensor | None, torch.Tensor]],
                 transposed: bool) -> torch.Tensor:
    """The output of ``y = x Wᵀ + b`` (``x W + b`` for GPT-2's Conv1D) on some rows, with slices of W / b swapped."""
    new_bias = bias
    if "bias" in swaps:
        _, idx, base_b = swaps["bias"]
        if idx is None:
            new_bias = base_b
        else:
            assert bias is not None
            new_bias = bias.clone()
            new_bias[idx] = base_b[idx]
    bias_shift = None if "bias" not in swaps else new_bias - bias  # type: ignore[operator]
    if "weight" not in swaps:
        return y + bias_shift
    axis, idx, base_w = swaps["weight"]
    if transposed:
        weight, base_w = weight.t(), base_w.t()
        axis = None if axis is None else 1 - axis
    if idx is None:
        return F.linear(x, base_w, new_bias)
    if axis == 0:  # output units idx: recompute just those
        new = y + bias_shift if bias_shift is not None else y.clone()
        new[..., idx] = F.linear(x, base_w[idx], None if new_bias is None else new_bias[idx])
        return new
    # input columns idx: y + x[..., idx] (W_b − W_t)[:, idx]ᵀ
    new = y + F.linear(x[..., idx], base_w[:, idx] - weight[:, idx])
    return new + bias_shift if bias_shift is not None else new


def _clone_output(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple):
        return tuple(_clone_output(o) for o in output)
    return output


def _returning(value: Any):
    def forward(*args: Any, **kwargs: Any) -> Any:
        return value
    return forward


def _block_modules(model: nn.Module, arch: Architecture, binding: Binding) -> list[nn.Module] | None:
    """The module of each decoder block (the one holding exactly that block's parameters), or None if not found."""
    blocks = []
    for layer in range(arch.num_layers):
        # the parameters holding the block's checkpoint tensors (fused MoE experts: one parameter for many, D-37)
        names = sorted({binding.slots[n].param for n in arch.block_tensors(layer) if n in binding})
        if not names:
            return None
        tokens = [n.split(".") for n in names]
        prefix = []
        for parts in zip(*tokens):
            if len(set(parts)) != 1:
                break
            prefix.append(parts[0])
        try:
            module = model.get_submodule(".".join(prefix))
        except AttributeError:
            return None
        held = {f"{'.'.join(prefix)}.{n}" for n, _ in module.named_parameters(remove_duplicate=False)}
        if not prefix or held != set(names):
            return None
        blocks.append(module)
    return blocks


class _Tracer:
    """Gold-answer probabilities of one loaded expert with partitions swapped to the base values."""

    def __init__(self, model: nn.Module, base_model: nn.Module, run: ImportanceRun, *, batch_size: int,
                 normalize: bool, batched: bool, binding: Binding, arch: Architecture | None = None) -> None:
        self.model = model
        self.binding = binding
        self.arch = arch
        self.run = run
        self.batch_size = batch_size
        self.normalize = normalize
        self.batched = batched
        self.forward_calls = 0
        self.variant_rows = 0
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.buffers = dict(model.named_buffers(remove_duplicate=False))
        self.base_params = dict(base_model.named_parameters(remove_duplicate=False))
        self.base_buffers = dict(base_model.named_buffers(remove_duplicate=False))
        owners: dict[int, list[tuple[nn.Module, str]]] = {}
        seen: set[tuple[int, str]] = set()
        for _, module in model.named_modules(remove_duplicate=False):
            for local, param in module._parameters.items():
                if param is None or (id(module), local) in seen:
                    continue
                seen.add((id(module), local))
                owners.setdefault(id(param), []).append((module, local))
        self.users = {name: owners.get(id(p), []) for name, p in self.params.items()}
        self._unchanged: dict[str, bool] = {}
        self._busy = False
        self._conv1d = _conv1d_type()
        # prefix reuse (in-place path): the decoder blocks as modules, and the clean run's outputs of each block
        self.blocks = _block_modules(model, arch, binding) if arch is not None else None
        self.prefix_reuse = self.blocks is not None
        self._prefix: dict[int, Any] | None = None
        self._record = False

    # -- which entries a partition swaps -------------------------------------------------------------------------

    def tensor(self, name: str) -> torch.Tensor:
        """The expert's checkpoint tensor ``name`` inside its parameters (a view; D-37)."""
        return self.binding.view(self.params, name)

    def base_tensor(self, name: str) -> torch.Tensor:
        return self.binding.view(self.base_params, name)

    def unchanged(self, name: str) -> bool:
        """True when the expert's tensor equals the base's (its swap is a no-op and is skipped)."""
        if name not in self._unchanged:
            if name in self.binding:
                self._unchanged[name] = torch.equal(self.tensor(name), self.base_tensor(name))
            elif name in self.buffers and name in self.base_buffers:
                if not torch.equal(self.buffers[name], self.base_buffers[name]):
                    raise MergeflowError(f"apl: tensor {name} differs between the expert and the base but is a "
                                         "buffer, not a parameter, of the loaded model; it cannot be swapped")
                self._unchanged[name] = True
            else:
                raise MergeflowError(f"apl: checkpoint tensor {name} is not a parameter of the loaded "
                                     f"{type(self.model).__name__} (renamed on load?); cannot swap it")
        return self._unchanged[name]

    def swaps(self, members: Sequence[tuple[str, int | None, list[int] | None]],
              index_cache: dict[tuple[int, ...], torch.Tensor]) -> list[_Swap]:
        out = []
        for name, axis, indices in members:
            if self.unchanged(name):
                continue
            index = None
            if indices is not None:
                key = tuple(indices)
                index = index_cache.get(key)
                if index is None:
                    index = index_cache[key] = torch.tensor(indices, dtype=torch.long, device=self.run.device)
            out.append(_Swap(name, axis, index, self.base_tensor(name).detach()))
        return out

    # -- probabilities -------------------------------------------------------------------------------------------

    def probabilities(self, enc: Encoded, variants: Sequence[Sequence[_Swap]]) -> torch.Tensor:
        """Mean gold probability over the examples of ``enc`` for every variant (a list of swaps; [] = clean)."""
        total = torch.zeros(len(variants), dtype=torch.float64)
        chunk = min(len(enc), self.batch_size)
        # record the blocks' outputs only when some swap can reuse them
        self._record = self.prefix_reuse and sum(1 for v in variants if v) > 0
        for _, part in batches(enc, chunk):
            self._prefix = None  # block outputs recorded by this chunk's clean run
            start = 0
            while start < len(variants):
                per_forward = max(1, self.batch_size // len(part)) if self.batched else 1
                group = list(variants[start:start + per_forward])
                probs = None
                if self.batched:
                    try:
                        probs = self._batched(part, group)
                    except torch.OutOfMemoryError:
                        raise
                    except (_Unbatchable, RuntimeError) as exc:  # a module the hooks cannot follow
                        log.warning("apl: swaps cannot be batched for this model (%s); one forward per swap", exc)
                        self.batched = False
                if probs is None:
                    probs = torch.stack([self._sequential(part, swaps) for swaps in group])
                total[start:start + len(group)] += probs.sum(1).double().cpu()
                start += len(group)
        return total / len(enc)

    def _gold(self, enc: Encoded, logp: torch.Tensor) -> torch.Tensor:
        lp = logp.sum(1)
        n = enc.answer_mask.sum(1).to(lp.device)
        return torch.exp(lp / n if self.normalize else lp)

    def _forward(self, enc: Encoded) -> torch.Tensor:
        self.forward_calls += 1
        self.variant_rows += len(enc)
        self.run.count(forward=1)
        return answer_logprobs(self.model, enc)

    def _sequential(self, part: Encoded, swaps: Sequence[_Swap]) -> torch.Tensor:
        if not swaps and self._record and self.prefix_reuse and self._prefix is None:
            return self._clean_and_record(part)
        with torch.no_grad(), self._swapped(swaps), self._reusing(self._first_block(swaps)):
            return self._gold(part, self._forward(part))

    def _first_block(self, swaps: Sequence[_Swap]) -> int:
        """The first decoder block a variant changes: the blocks before it see exactly the clean run's inputs."""
        if not self.prefix_reuse or self._prefix is None or self.arch is None:
            return 0
        first = self.arch.num_layers
        for s in swaps:
            role = self.arch.role(s.tensor)
            if role.layer_index is not None:
                first = min(first, role.layer_index)
            elif role.module not in ("final_norm", "lm_head"):
                return 0  # embeddings (or anything unknown) change the input of block 0
        return first

    @contextmanager
    def _reusing(self, first: int) -> Iterator[None]:
        """Blocks 0 … first−1 return the clean run's outputs instead of being computed."""
        assert self.blocks is not None or first == 0
        patched = []
        try:
            for j in range(first):
                block = self.blocks[j]  # type: ignore[index]
                patched.append((block, block.__dict__.get("forward")))
                output = self._prefix[j]  # type: ignore[index]
                # only the last reused output is read (by block first); the copy keeps the record intact
                value = _clone_output(output) if j == first - 1 else output
                block.forward = _returning(value)
            yield
        finally:
            for block, old in patched:
                if old is None:
                    del block.forward
                else:
                    block.forward = old

    def _clean_and_record(self, part: Encoded) -> torch.Tensor:
        """The clean run, recording every block's output; then one check that reusing them is exact here."""
        assert self.blocks is not None
        record: dict[int, Any] = {}

        def keep(j: int):
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                record[j] = _clone_output(output)
            return hook

        handles = [block.register_forward_hook(keep(j)) for j, block in enumerate(self.blocks)]
        try:
            with torch.no_grad():
                clean = self._gold(part, self._forward(part))
        finally:
            for h in handles:
                h.remove()
        if len(record) != len(self.blocks):
            log.info("apl: not every decoder block ran as a module; no prefix reuse")
            self.prefix_reuse = False
            return clean
        self._prefix = record
        if len(self.blocks) > 1:
            # blocks must hand their outputs to the next block and nothing else: recompute the last block from the
            # recorded input and compare (one block's cost, once per expert)
            with torch.no_grad(), self._reusing(len(self.blocks) - 1):
                again = self._gold(part, self._forward(part))
            if not torch.allclose(again, clean, rtol=1e-5, atol=1e-7):
                log.info("apl: reusing block outputs does not reproduce the clean run; no prefix reuse")
                self.prefix_reuse = False
                self._prefix = None
        return clean

    @contextmanager
    def _swapped(self, swaps: Sequence[_Swap]) -> Iterator[None]:
        """The swaps applied to the expert's own tensors in place (whole tensors by reference), then undone. A
        checkpoint tensor that is a slice of a fused parameter (MoE experts, D-37) is written through its view."""
        saved: list[tuple[str, Any, Any]] = []
        try:
            for s in swaps:
                slot = self.binding.slot(s.tensor, "apl")
                p = self.params[slot.param]
                if s.index is None and slot.whole:
                    saved.append(("ref", p, p.data))
                    p.data = s.base
                    continue
                view = slot.view(p.data)
                if s.index is None:
                    saved.append(("copy", view, view.clone()))
                    view.copy_(s.base)
                else:
                    saved.append(("index", view, (s.axis, s.index, view.index_select(s.axis, s.index))))
                    view.index_copy_(s.axis, s.index, s.base.index_select(s.axis, s.index))
            yield
        finally:
            for how, target, old in reversed(saved):
                if how == "ref":
                    target.data = old
                elif how == "copy":
                    target.copy_(old)
                else:
                    target.index_copy_(*old)

    def _batched(self, part: Encoded, group: Sequence[Sequence[_Swap]]) -> torch.Tensor:
        v, b = len(group), len(part)
        rep = Encoded(part.input_ids.repeat(v, 1), part.attention_mask.repeat(v, 1), part.answer_mask.repeat(v, 1),
                      part.targets.repeat(v, 1), part.lengths.repeat(v))
        # module → [(variant slot, {local parameter name: (axis, index, base tensor)})]; rows of slot i: i·b … i·b+b−1
        plan: dict[int, tuple[nn.Module, list[tuple[int, dict]]]] = {}
        for i, swaps in enumerate(group):
            per_module: dict[int, tuple[nn.Module, dict]] = {}
            for s in swaps:
                slot = self.binding.slots.get(s.tensor)
                # a slice of a fused parameter is not a module's own parameter: not batchable (in place instead)
                users = (self.users.get(slot.param) or []) if slot is not None and slot.whole else []
                if not users:
                    raise _Unbatchable(f"{s.tensor} has no owning module")
                for module, local in users:
                    per_module.setdefault(id(module), (module, {}))[1][local] = (s.axis, s.index, s.base)
            for key, (module, sw) in per_module.items():
                plan.setdefault(key, (module, []))[1].append((i, sw))
        fired: set[int] = set()
        handles = [module.register_forward_hook(self._hook(key, entries, v, b, fired), with_kwargs=True)
                   for key, (module, entries) in plan.items()]
        try:
            with torch.no_grad():
                probs = self._gold(rep, self._forward(rep))
        finally:
            for h in handles:
                h.remove()
            self._busy = False
        if fired != set(plan):
            raise _Unbatchable("a module owning swapped entries was not called")
        return probs.view(v, b)

    def _hook(self, key: int, entries: list[tuple[int, dict]], v: int, b: int, fired: set[int]):
        n = v * b

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if self._busy:  # the module re-run inside a correction: leave it alone
                return None
            if not isinstance(output, torch.Tensor) or output.dim() == 0 or output.shape[0] not in (1, n):
                raise _Unbatchable(f"{type(module).__name__} output is not batch-first")
            if output.shape[0] != n:  # computed once for the whole batch (GPT-2's position embeddings)
                output = output.expand(n, *output.shape[1:]).clone()
                args = tuple(_broadcast_rows(a, n) for a in args)
                kwargs = {name: _broadcast_rows(a, n) for name, a in kwargs.items()}
            fired.add(key)
            self._busy = True
            try:
                if len(entries) < 2 or not self._grouped(module, args, kwargs, output, entries, v, b):
                    for slot, swaps in entries:
                        rows = slice(slot * b, (slot + 1) * b)
                        output[rows] = self._correct(module, args, kwargs, output[rows], rows, n, swaps)
            finally:
                self._busy = False
            return output
        return hook

    def _grouped(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor,
                 entries: list[tuple[int, dict]], v: int, b: int) -> bool:
        """Corrections of many variants that each swap one equal-sized slice of ``module``'s parameters (the
        hidden-state and row levels), in a few batched ops instead of a few per variant. False: not applicable."""
        first = entries[0][1]
        names = set(first)
        for _, sw in entries:
            if set(sw) != names or any(idx is None or axis != first[n][0] or idx.numel() != first[n][1].numel()
                                       for n, (axis, idx, _) in sw.items()):
                return False
        if not output.is_contiguous():
            return False
        g = len(entries)
        slot_list = [slot for slot, _ in entries]
        # consecutive slots (the usual case: every variant swaps a slice of this module) are a view: written in place
        run_of_slots = slot_list == list(range(slot_list[0], slot_list[0] + g))
        slots: Any = slice(slot_list[0], slot_list[0] + g) if run_of_slots else torch.tensor(slot_list,
                                                                                              device=output.device)
        index = {n: torch.stack([sw[n][1] for _, sw in entries]) for n in names}  # [G, k] per parameter
        base = {n: first[n][2] for n in names}
        k = next(iter(index.values())).shape[1]
        y = output.view(v, b, *output.shape[1:])
        width = output.shape[-1]
        yg = y[slots].reshape(g, -1, width)
        kind = type(module)
        linear = kind is nn.Linear or kind is self._conv1d
        if linear and args and isinstance(args[0], torch.Tensor) and not kwargs and names <= {"weight", "bias"}:
            x = args[0]
            xg = x.reshape(v, b, *x.shape[1:])[slots].reshape(g, -1, x.shape[-1])
            rows = xg.shape[1]
            weight, bias = module.weight, module.bias
            axis_w = first["weight"][0] if "weight" in names else None
            base_w = base.get("weight")
            if kind is not nn.Linear:  # Conv1D stores [in, out]
                weight = weight.t()
                base_w = None if base_w is None else base_w.t()
                axis_w = None if axis_w is None else 1 - axis_w
            if "weight" not in names:  # bias entries only: shift the swapped outputs
                idx = index["bias"]
                shift = (base["bias"] - bias)[idx]                                       # [G, k]
                yg.scatter_add_(2, idx[:, None, :].expand(g, rows, k), shift[:, None, :].expand(g, rows, k))
            elif axis_w == 1 and names == {"weight"}:  # input columns: low-rank correction per variant
                idx = index["weight"]
                xk = xg.gather(2, idx[:, None, :].expand(g, rows, k))                    # [G, M, k]
                diff = (base_w[:, idx] - weight[:, idx]).permute(1, 2, 0)                  # [G, k, out]
                yg.baddbmm_(xk, diff)
            elif axis_w == 0 and ("bias" not in names or torch.equal(index["bias"], index["weight"])):
                idx = index["weight"]                                                     # output units
                vals = torch.bmm(xg, base_w[idx].transpose(1, 2))                         # [G, M, k]
                b_new = base["bias"] if "bias" in names else bias
                if b_new is not None:
                    vals = vals + b_new[idx][:, None, :]
                yg.scatter_(2, idx[:, None, :].expand(g, rows, k), vals)
            else:
                return False
        else:
            feature_wise = all(
                (module.get_parameter(n).dim() == 1 and axis == 0) or (isinstance(module, nn.Embedding) and axis == 1)
                for n, (axis, _, _) in first.items())
            same = all(torch.equal(index[n], index[next(iter(names))]) for n in names)
            if not (feature_wise and same and module.get_parameter(next(iter(names))).shape[-1] == width):
                return False
            def take(value: Any) -> Any:
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == v * b:
                    return value.reshape(v, b, *value.shape[1:])[slots].reshape(g * b, *value.shape[1:])
                return value

            full = functional_call(module, base, tuple(take(a) for a in args), {n: take(a) for n, a in kwargs.items()})
            idx = index[next(iter(names))][:, None, :].expand(g, yg.shape[1], k)
            yg.scatter_(2, idx, full.reshape(g, -1, width).gather(2, idx))
        if not run_of_slots:
            y[slots] = yg.view(g, b, *output.shape[1:])
        return True

    def _correct(self, module: nn.Module, args: tuple, kwargs: dict, y: torch.Tensor, rows: slice, n: int,
                 swaps: dict[str, tuple[int | None, torch.Tensor | None, torch.Tensor]]) -> torch.Tensor:
        """``module``'s output on ``rows`` as if its swapped entries held the base values."""
        sargs = tuple(_take_rows(a, rows, n) for a in args)
        skwargs = {k: _take_rows(v, rows, n) for k, v in kwargs.items()}
        x = sargs[0] if sargs and isinstance(sargs[0], torch.Tensor) and not kwargs else None
        kind = type(module)
        if x is not None and set(swaps) <= {"weight", "bias"} and (kind is nn.Linear or kind is self._conv1d):
            return _linear_rows(x, module.weight, module.bias, y, swaps, transposed=kind is not nn.Linear)
        indices = {None if idx is None else tuple(idx.tolist()) for _, idx, _ in swaps.values()}
        feature_wise = len(indices) == 1 and None not in indices and all(
            (module.get_parameter(local).dim() == 1 and axis == 0)
            or (isinstance(module, nn.Embedding) and axis == 1)
            for local, (axis, _, _) in swaps.items())
        if feature_wise:
            # output feature j of a norm / an embedding depends on entry j of its parameters only: recompute with
            # the whole base tensors and keep the swapped features (no patched copy of a big embedding)
            _, idx, _ = next(iter(swaps.values()))
            full = functional_call(module, {local: base for local, (_, _, base) in swaps.items()}, sargs, skwargs)
            if full.shape[-1] == module.get_parameter(next(iter(swaps))).shape[-1]:
                new = y.clone()
                new[..., idx] = full[..., idx]
                return new
        params = {}
        for local, (axis, idx, base) in swaps.items():
            if idx is None:
                params[local] = base
            else:
                patched = module.get_parameter(local).detach().clone()
                patched.index_copy_(axis, idx, base.index_select(axis, idx))
                params[local] = patched
        return functional_call(module, params, sargs, skwargs)


# ------------------------------------------------------------------------------------------------ gradient scores


def _gradient(run: ImportanceRun, base_model: nn.Module, enc: Encoded, batch_size: int) -> dict[str, torch.Tensor]:
    """g = ∇ of the mean over examples of the answer-token LM loss at the base (D-4, D-6), by tensor name."""
    base_model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for _, part in batches(enc, batch_size):
            loss = lm_loss(base_model, part).sum() / len(enc)
            loss.backward()
            run.count(forward=1, backward=1)
    grads = {}
    for name, p in base_model.named_parameters(remove_duplicate=False):
        grads[name] = torch.zeros_like(p) if p.grad is None else p.grad.detach()
    for p in base_model.parameters():
        p.grad = None  # the returned tensors are the gradients themselves (no copy); the model lets go of them
    return grads


class _PartitionSums:
    """Signed sums of a per-entry quantity over the partitions of a level (abs is taken by the caller, D-6)."""

    def __init__(self, partitioner: Partitioner, columns: Sequence[str], device: torch.device) -> None:
        self.partitioner = partitioner
        self.col = {pid: i for i, pid in enumerate(columns)}
        self.n = len(columns)
        self.device = device
        self._maps: dict[str, torch.Tensor] = {}

    def add(self, acc: torch.Tensor, name: str, values: torch.Tensor) -> None:
        part = self.partitioner.partition(name)
        if part.axis is None:
            i = self.col.get(part.labels[0])
            if i is not None:
                acc[i] += values.sum(dtype=torch.float64)
            return
        cols = self._maps.get(name)
        if cols is None:
            cols = self._maps[name] = torch.tensor([self.col.get(lab, self.n) for lab in part.labels],
                                                   dtype=torch.long, device=self.device)
        dims = [d for d in range(values.dim()) if d != part.axis]
        per_slice = values.sum(dim=dims, dtype=torch.float64) if dims else values.to(torch.float64)
        acc.index_add_(0, cols, per_slice)  # column n collects the slices of unscored partitions


# ------------------------------------------------------------------------------------------------ the estimator


def _sizes(arch: Architecture, partitioner: Partitioner, ids: Sequence[str]) -> torch.Tensor:
    out = []
    for pid in ids:
        total = 0
        for name, axis, idx in partitioner.members(pid):
            numel = math.prod(arch.role(name).shape)
            total += numel if axis is None else numel // arch.role(name).shape[axis] * len(idx or [])
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def _calibrated(pid: str) -> bool:
    return is_block_partition(pid) or pid.startswith("hidden.")


def _layout(run: ImportanceRun) -> tuple[Architecture, Partitioner, list[str], list[str]]:
    """The base's architecture, the partitioner of the level, the partitions scored (and calibrated) and those
    outside the calibrated ones (D-2), from the measure parameters alone (measure and finalize agree on them)."""
    prm = run.params
    assert run.base is not None
    arch, partitioner, scored, uncalibrated = _layout_of(str(run.base.model_folder), run.base.content_hash,
                                                         prm["level"], prm["hidden_state_mode"],
                                                         prm["nonblock_policy"])
    return arch, partitioner, list(scored), list(uncalibrated)


@functools.lru_cache(maxsize=8)
def _layout_of(path: str, content_hash: str, level: str, hidden_state_mode: str,
               policy: str) -> tuple[Architecture, Partitioner, tuple[str, ...], tuple[str, ...]]:
    """:func:`_layout` by the base's content hash: every shard of a run (and every finalize) reads the same base,
    so its architecture is inferred once per process, not once per shard (read-only: callers get list copies)."""
    arch = Architecture.from_folder(path)
    return (arch, *_partitions_of(arch, level, hidden_state_mode, policy))


def _partitions_of(arch: Architecture, level: str, hidden_state_mode: str,
                   policy: str) -> tuple[Partitioner, tuple[str, ...], tuple[str, ...]]:
    """The partitioner of the level, the partitions scored and those left uncalibrated (D-2)."""
    partitioner = Partitioner(arch, level, hidden_state_mode=hidden_state_mode)
    if level == "model":
        return partitioner, (), ()
    all_ids = partitioner.partition_ids()
    uncalibrated = tuple(pid for pid in all_ids if not _calibrated(pid))
    scored = tuple(pid for pid in all_ids if _calibrated(pid) or policy == "own_partitions")
    return partitioner, scored, uncalibrated


def _measure(run: ImportanceRun) -> Measurements:
    """The scores: per expert, the model-level score and one per scored partition (causal drops or |⟨Δ, ∇L⟩|).
    Measured expert by expert (experts scored on the same data together: one base pass serves them)."""
    prm = run.params
    assert run.base is not None
    level, estimator = prm["level"], prm["estimator"]
    arch, partitioner, scored, _ = _layout(run)
    if level == "hidden_state" and estimator == "causal" and len(scored) > prm["hidden_state_budget"]:
        raise RecipeError(
            f"importance.parameters: apl causal tracing over {len(scored)} hidden_state partitions "
            f"({prm['hidden_state_mode']}) takes {len(scored) + 1} forward passes per expert, above "
            f"hidden_state_budget={prm['hidden_state_budget']}; use estimator: grad, or raise hidden_state_budget")

    tokenizer = run.tokenizer()
    normalize_p = prm["probability"] == "normalized"
    batch_size = prm["batch_size"]
    encoded: dict[str, Encoded] = {}
    for task in run.tasks:
        if task.sha256 not in encoded:
            encoded[task.sha256] = encode(tokenizer, task.examples).to(run.device)
    # experts grouped by the data they are scored on: one base pass (and one gradient) per distinct task
    by_task: dict[str, list[int]] = {}
    for k, task in enumerate(run.tasks):
        by_task.setdefault(task.sha256, []).append(k)

    k_experts = run.k
    model_scores = torch.zeros(k_experts, dtype=torch.float64)
    level_scores = torch.zeros(k_experts, len(scored), dtype=torch.float64)
    causal_model_score = estimator == "causal" or prm["weights"] == "mi"
    needs_expert_forward = causal_model_score
    index_cache: dict[tuple[int, ...], torch.Tensor] = {}
    members = {pid: partitioner.members(pid) for pid in scored}
    sums = _PartitionSums(partitioner, scored, run.device) if estimator == "grad" else None
    stats: dict[str, Any] = {"model_score": "causal" if causal_model_score else "grad",
                             # per expert: how its swaps ran (a shard's experts are stacked with the others')
                             "tracing": [None] * k_experts, "prefix_reuse": [None] * k_experts,
                             "forward_calls_causal": 0,
                             "variant_rows": 0}

    tracing = prm["tracing"]
    if tracing == "auto":
        # in place, swaps of whole blocks skip the blocks before them (~half the work at the layer level); batching
        # does not cut arithmetic, it saves per-forward overhead: a gain where forwards are launch-bound (many small
        # slice swaps on a GPU), a loss on a CPU, where the corrections cost more than they save
        tracing = "batched" if level == "hidden_state" and run.device.type == "cuda" else "in_place"
    batched = tracing == "batched"
    base_model = run.load_model(run.base, keep=True)  # read once for all the run's shards; only read here
    # checkpoint tensor → where it lives in the loaded models (fused MoE experts; D-37), shared by the experts
    binding = binding_for(base_model, run.base.model_folder, arch, content_key=run.base.content_hash)
    if next(base_model.parameters()).requires_grad != (estimator == "grad"):  # kept between shards: set once
        base_model.requires_grad_(estimator == "grad")
    for sha, experts_of_task in by_task.items():
        enc = encoded[sha]
        base_prob = None
        if needs_expert_forward:
            base_tracer = _Tracer(base_model, base_model, run, batch_size=batch_size, normalize=normalize_p,
                                  batched=False, binding=binding)
            base_prob = float(base_tracer.probabilities(enc, [[]])[0])
        grads = None
        if estimator == "grad":
            loss_enc = enc if prm["loss_tokens"] == "answer" else encode(
                tokenizer, run.tasks[experts_of_task[0]].examples, answer_only=False).to(run.device)
            grads = _gradient(run, base_model, loss_enc, batch_size)
        for k in experts_of_task:
            model = run.load_model(run.experts[k])
            model.requires_grad_(False)
            tracer = _Tracer(model, base_model, run, batch_size=batch_size, normalize=normalize_p,
                             batched=batched, binding=binding, arch=arch)
            if estimator == "causal":
                variants = [tracer.swaps(members[pid], index_cache) for pid in scored]
                live = [i for i, v in enumerate(variants) if v]  # a partition the expert never changed scores 0
                probs = tracer.probabilities(enc, [[]] + [variants[i] for i in live])
                clean = float(probs[0])
                level_scores[k, live] = clean - probs[1:]
                stats["tracing"][k] = "batched" if tracer.batched else "in_place"
                stats["prefix_reuse"][k] = tracer.prefix_reuse and not tracer.batched
            elif needs_expert_forward:
                clean = float(tracer.probabilities(enc, [[]])[0])
            if needs_expert_forward:
                assert base_prob is not None
                model_scores[k] = clean - base_prob
            if grads is not None:
                assert sums is not None
                acc = torch.zeros(len(scored) + 1, dtype=torch.float64, device=run.device)
                whole = torch.zeros((), dtype=torch.float64, device=run.device)
                with torch.no_grad():
                    for name, role in arch.tensors.items():
                        if not role.is_floating or tracer.unchanged(name):
                            continue
                        prod = torch.sub(tracer.tensor(name), tracer.base_tensor(name)).mul_(
                            tracer.binding.view(grads, name))
                        sums.add(acc, name, prod)
                        whole += prod.sum(dtype=torch.float64)
                level_scores[k] = acc[:-1].abs().cpu()
                if not causal_model_score:
                    model_scores[k] = float(whole.abs())
            stats["forward_calls_causal"] += tracer.forward_calls
            stats["variant_rows"] += tracer.variant_rows
            del model, tracer
        del grads
    del base_model
    return Measurements({"model": model_scores, "level": level_scores}, stats=stats)


def _finalize(run: ImportanceRun, measured: Measurements) -> Coefficients:
    """Drop ratios from the scores (§2.5) and, for MI-TA, the model weights: no model pass."""
    arch, partitioner, scored, uncalibrated = _layout(run)
    stats = dict(measured.stats)
    # one word for the run: how every expert's swaps ran ("mixed" if they differed), prefix reuse only if all reused
    tracing = {t for t in stats["tracing"] if t is not None}
    stats["tracing"] = (tracing.pop() if len(tracing) == 1 else "mixed") if tracing else None
    reuse = [r for r in stats["prefix_reuse"] if r is not None]
    stats["prefix_reuse"] = all(reuse) if reuse else None
    return _artifact(run, run.params, arch, partitioner, run.params["level"], scored, uncalibrated,
                     measured.tensors["model"].clone(), measured.tensors["level"].clone(), stats)


def _artifact(run: ImportanceRun, prm: dict[str, Any], arch: Architecture, partitioner: Partitioner, level: str,
              scored: list[str], uncalibrated: list[str], model_scores: torch.Tensor, level_scores: torch.Tensor,
              stats: dict[str, Any]) -> Coefficients:
    k = run.k
    p = prm["p"]
    normalize = prm["normalize"] or ("raw" if prm["estimator"] == "causal" else "max")
    cfg = DropRatioConfig(p=p, epsilon=prm["epsilon"], temperature=prm["temperature"], normalize=normalize,
                          activation=prm["activation"], mapping=prm["mapping"],
                          preserve_mean_drop=prm["preserve_mean_drop"], p_max=prm["p_max"])
    policy = prm["nonblock_policy"]
    if level == "model":
        columns = ["model"]
        table = torch.full((k, 1), p, dtype=torch.float64)  # one partition: APL is exactly DARE (§2.5)
        default: list[float | None] = [p] * k
        stats.update(clipped=0, shift=[0.0] * k, mean_drop_ratio=[p] * k)
    else:
        sizes = _sizes(arch, partitioner, scored)
        rows, shifts, clipped = [], [], 0
        for i in range(k):
            p_hat, info = drop_ratios(level_scores[i], sizes, cfg)
            rows.append(p_hat)
            shifts.append(info["shift"])
            clipped += info["clipped"]
            if len(scored) <= 64:  # D-3: every run's p̂ can be audited (the full table is in the artifact)
                shown: Any = {pid: round(v, 4) for pid, v in zip(scored, p_hat.tolist())}
            else:
                shown = f"min {float(p_hat.min()):.4f} mean {float(p_hat.mean()):.4f} max {float(p_hat.max()):.4f}"
            log.info("apl: expert %s p̂ per partition %s", run.experts[i].reference, shown)
        if clipped:
            log.warning("apl: %d drop ratios clipped to [0, p_max=%g]", clipped, cfg.p_max)
        table = torch.stack(rows) if rows else torch.zeros(k, 0, dtype=torch.float64)
        weighted = (table * sizes).sum(1) / sizes.sum() if len(scored) else torch.full((k,), p)
        stats.update(clipped=clipped, shift=shifts, mean_drop_ratio=weighted.tolist(),
                     epsilon_lin=linear_window(p, cfg.epsilon, cfg.p_max) if cfg.mapping == "linear" else None)
        columns = list(scored)
        default = [p] * k
        if policy == "keep_unpruned":
            # DARE would otherwise drop these tensors at the recipe's own density (a None default means "the
            # recipe's value"), so they are listed with drop ratio 0 — kept whole, rescale 1 — and the default is 0
            # too: the table alone says what happens to every tensor.
            columns += uncalibrated
            table = torch.cat([table, torch.zeros(k, len(uncalibrated), dtype=torch.float64)], dim=1)
            default = [0.0] * k
    fields = {"drop_ratio": CoefficientField(level, columns, table, default=default,
                                             hidden_state_mode=prm["hidden_state_mode"])}
    if prm["weights"] == "mi":
        w = mi_weights(model_scores, prm["model_temperature"], prm["mi_normalize"])
        w = w * prm["lambda_mi"] * (k if prm["scale_by_k"] else 1)
        fields["weight"] = CoefficientField("model", ["model"], w.view(k, 1).to(torch.float64), default=None)
        stats["mi_weights"] = w.tolist()
    scores = {"model": model_scores.view(k, 1)}
    score_partitions = {"model": ["model"]}
    if level != "model":
        scores[level] = level_scores
        score_partitions[level] = list(scored)
    return run.coefficients(fields, scores=scores, score_partitions=score_partitions, stats=stats)


# What the scores depend on; the drop-ratio calibration (p, ε, T, normalisation, activation, mapping, p_max, the mean
# shift) and the MI-TA weights (T_m, normalisation, λ_mi, ×K) only read them. ``weights`` is one of them because MI-TA
# needs the causal model score, which the gradient estimator otherwise skips.
_SCORE_PARAMS = ("level", "estimator", "nonblock_policy", "hidden_state_mode", "hidden_state_budget", "weights",
                 "probability", "loss_tokens", "batch_size", "tracing")

def _canonical_scores(params: dict[str, Any]) -> dict[str, Any]:
    """Causal tracing measures the causal model score anyway: ``weights`` changes nothing it measures."""
    return {**params, "weights": "none"} if params["estimator"] == "causal" else params


APL = register_estimator(Estimator(
    name="apl",
    measure=_measure,
    finalize=_finalize,
    measure_params=_SCORE_PARAMS,
    measure_parts=(MeasurePart(WHOLE, _SCORE_PARAMS, by_expert=True,
                               expert_stats=("tracing", "prefix_reuse"),
                               summed_stats=("forward_calls_causal", "variant_rows"), canonical=_canonical_scores),),
    params=PARAMS,
    summary="per-partition DARE drop ratios from causal swaps (or a gradient inner product) on few-shot data; "
            "optional MI-TA model weights",
    paper="Kong, Zhang, Wang. Activated Parameter Locating via Causal Intervention for Model Merging. "
          "arXiv 2408.09485 (2024)",
    needs_base=True,
    default_split="fewshot",
    default_n=5,
    supports_ood=True,
))


def _first_changed_block(arch: Architecture, partitioner: Partitioner, pid: str) -> int:
    """As :meth:`_Tracer._first_block` for a swap of every tensor of partition ``pid``."""
    first = arch.num_layers
    for name, _, _ in partitioner.members(pid):
        role = arch.role(name)
        if role.layer_index is not None:
            first = min(first, role.layer_index)
        elif role.module not in ("final_norm", "lm_head"):
            return 0
    return first


@declare_plan("apl")
def plan_costs(inputs: PlanInputs) -> CostPlan:
    """Per distinct task: the base's probability (one forward per chunk of ``batch_size``) when causal scores are
    needed, the base's gradient (one forward + backward per chunk) for ``grad``. Per expert, causal: per chunk the
    clean run and one forward per scored partition; in place, the clean run records the blocks' outputs, one
    forward recomputes the last block to check them, and a swap whose first changed block is l computes L − l
    blocks; batched, ``batch_size // rows`` variants share a forward. Planned as if every expert changed every
    partition (a partition an expert left unchanged is skipped) and as if every decoder block is a module of its own
    (the prefix reuse of the in-place path needs it)."""
    prm = inputs.params
    arch = inputs.arch
    level, estimator, bs = prm["level"], prm["estimator"], prm["batch_size"]
    partitioner, scored, _ = _partitions_of(arch, level, prm["hidden_state_mode"], prm["nonblock_policy"])
    if level == "hidden_state" and estimator == "causal" and len(scored) > prm["hidden_state_budget"]:
        raise RecipeError(f"importance.parameters: apl causal tracing over {len(scored)} hidden_state partitions is "
                          f"above hidden_state_budget={prm['hidden_state_budget']}")
    causal_model_score = estimator == "causal" or prm["weights"] == "mi"
    tracing = prm["tracing"]
    if tracing == "auto":
        tracing = "batched" if level == "hidden_state" and inputs.device_type == "cuda" else "in_place"
    num_layers = arch.num_layers
    computed = [num_layers - _first_changed_block(arch, partitioner, pid) for pid in scored]
    passes: list[Pass] = []
    for task, experts in inputs.groups():
        shapes = chunks(list(task.lengths), bs)
        if causal_model_score:
            passes += passes_over("base probability", "base", shapes)
        if estimator == "grad":
            passes += passes_over("base gradient", "base", shapes, backward=True, recorded=(1, 1))
        n = len(experts)
        if estimator != "causal":
            if causal_model_score:
                passes += passes_over("expert probability", "expert", shapes, times=n)
            continue
        variants = 1 + len(scored)
        for rows, width in shapes:
            if tracing == "batched":
                per = max(1, bs // rows)
                full, rest = divmod(variants, per)
                passes += passes_over("swaps (batched)", "expert", [(rows * per, width)] * full, times=n)
                passes += passes_over("swaps (batched)", "expert", [(rows * rest, width)] * (rest > 0), times=n)
            elif scored:
                passes += passes_over("clean run (recorded)", "expert", [(rows, width)], times=n)
                if num_layers > 1:
                    passes += passes_over("prefix check", "expert", [(rows, width)], times=n, layers=1)
                by_depth: dict[int, int] = {}
                for c in computed:
                    by_depth[c] = by_depth.get(c, 0) + 1
                for c, m in sorted(by_depth.items()):
                    passes += passes_over("swaps (in place)", "expert", [(rows, width)], times=n * m,
                                          layers=c, head=True)
            else:
                passes += passes_over("clean run", "expert", [(rows, width)], times=n)
    model = model_bytes(arch)
    memory = {"models (base + expert, fp32)": 2 * model}
    if estimator == "grad":
        memory["base gradient (fp32)"] = model
    if estimator == "causal" and tracing == "in_place" and scored:
        widest = max((r * w for t in inputs.distinct() for r, w in chunks(list(t.lengths), bs)), default=0)
        memory["recorded block outputs (fp32)"] = widest * arch.hidden_size * 4 * num_layers
    memory["activations"] = largest_activations(arch, passes)
    return CostPlan("apl", passes, memory)
