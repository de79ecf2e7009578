"""SLTA: per-module task-arithmetic weights from submodule linearity (Dai et al., ICLR 2025; docs/methods.md §4, D-17..D-22,
D-37..D-39).

Each module ``i`` (a decoder block, an attention or MLP sub-block, one attention head, the embeddings, the final norm
with the LM head, or the whole network) is run with the weights of every model ``k`` (base and experts) on the *same*
inputs, recorded from one forward pass of the **base** model per task. With ``Δf_k(x) = f(x; θ_k^i) − f(x; θ_0^i)``
flattened over the real (non-pad) tokens, the per-module weights ``α^i`` minimise

    Σ_a  E_{x ∈ task a} ‖ Σ_t α_t Δf_t(x) − Δf_a(x) ‖² / c(x)       (c(x) = 1, or the balanced normaliser of Eq. 34)

which is the ``K×K`` linear system ``A α = b`` with ``B_a[j, l] = E_{x∈a} <Δf_j, Δf_l> / c(x)``, ``A = Σ_a B_a`` and
``b_j = Σ_a B_a[j, a]`` (Eqs. 12–14, 33–34). It is solved in float64; ``lstsq`` takes over when ``A`` is singular or
``cond(A) > cond_max``; an expert whose ``Δf ≡ 0`` on a module gets ``α = 1`` (its delta there does nothing; D-22).

What a module is, per level (its Δf always reflects *only* the tensors of its partition; every other tensor is the
base's):

* ``layer``: decoder block ``i`` on the block input; ``attn_mlp``: the block's attention branch and MLP branch, each
  ``pre-norm → attention or MLP → post-norm`` as the family has them (D-39; Llama: ``input_layernorm + self_attn`` on
  the block input, ``post_attention_layernorm + mlp`` on the base residual after the base attention, D-18; parallel
  blocks: both on the block input; each branch on the input its first module received in the base pass);
* ``head_mlp`` (D-20): head ``h`` (or, with ``gqa_policy="group"``, kv group ``g``) outputs ``W_o[:, h] · z_h`` where
  ``z_h`` is the head's attention output with model ``k``'s q/k/v rows on the base (normalised) block input; the
  partitions every head shares (``attn_norm``: the attention branch's norms and any q/k norms; ``attn_shared``: the
  o_proj bias) are modules of their own (the attention branch's output with only those tensors from model ``k``). In
  an MoE block each routed expert is a module (D-38): its FFN on the tokens the base router sends it, times their
  routing weights; the router and the MLP norm form ``layer.i.mlp``;
* ``embed`` (exactly linear: the sum of the token and position embeddings of the input) and ``head`` (final norm +
  LM head on the base output of the last block) at every level but ``model`` (D-18; ``nonmodule="task_arithmetic"``
  gives them a fixed ``nonmodule_lambda`` instead). With tied embeddings the LM head matrix *is* the embedding: its delta is solved once,
  in ``embed``, and the ``head`` module runs the base LM head (its partition holds the final norm only);
* ``model`` (D-17): the whole network, token ids to fp32 logits.

Memory: the captured features of every task stay on the CPU in fp32 (for Llama-2-7B, 30 samples × 512 tokens, that is
about 8 GB per task at attn/MLP level); per module, the tensors of that one module for the K+1 models.

Two stages: the per-sample Grams of every module (``[N, K, K]`` per task, small; the embeddings and the head always
included) are measured and cached; ``balanced``, ``cond_max``, the clips and ``nonmodule``/``nonmodule_lambda`` only
build and solve the ``K×K`` systems from them, without a model pass.

Analysis metrics (docs/methods.md §4.5), each for one or more models and the same kind of data as the estimator:
:func:`nonlinearity_score` (Def. 2 / Eq. 19), :func:`projection_distance` (Eq. 8, with the cosine metrics of
Eqs. 15–17 / D-19). The numerical core is exposed for tests and notebooks: :func:`sample_grams`,
:func:`slta_system`, :func:`solve_alpha`, :func:`module_systems`, :func:`capture_features`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from mergeflow import transformers_io
from mergeflow.architecture import Architecture
from mergeflow.checkpoints import find_weight_files
from mergeflow.coefficients import CoefficientField, Coefficients
from mergeflow.errors import ArchitectureError, RecipeError
from mergeflow.importance.base import Estimator, ImportanceRun, Measurements, register_estimator
from mergeflow.importance.binding import Binding, Slot, binding_for
from mergeflow.importance.costs import (
    CostPlan,
    PlanInputs,
    chunks,
    declare_plan,
    largest_activations,
    model_bytes,
    passes_over,
    truncated,
)
from mergeflow.importance.data import Example
from mergeflow.importance.scoring import batches, encode
from mergeflow.methods.base import ParamSpec
from mergeflow.partitions import EMBED, HEAD, Partitioner, TensorPartition
from mergeflow.tensors import CheckpointReader, TensorReader

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

LEVELS = ("model", "layer", "attn_mlp", "head_mlp")
NONMODULE = ("closed_form", "task_arithmetic")

# Keyword arguments of a decoder layer that are state or flags, not inputs: never captured or replayed.
_NOT_INPUTS = frozenset({"past_key_values", "past_key_value", "use_cache", "output_attentions",
                         "output_hidden_states"})


# ================================================================================================ numerical core


def sample_grams(deltas: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample Gram matrices of the output changes, over the real tokens: ``[B, K, K]`` float64.

    ``deltas``: ``[K, B, T, ...]``, the change ``Δf_k`` of each of ``K`` experts on a batch of ``B`` samples of ``T``
    positions (any trailing feature axes); ``mask``: ``[B, T]``, true (or 1) at real tokens. Entry ``[x, j, l]`` is
    ``<Δf_j(x), Δf_l(x)>`` flattened over the real tokens and the feature axes of sample ``x``. Padding never enters
    (masked with ``where``, so a NaN at a pad position cannot leak in).
    """
    k, b, t = deltas.shape[:3]
    keep = mask.to(device=deltas.device, dtype=torch.bool).view(1, b, t, *([1] * (deltas.dim() - 3)))
    d = torch.where(keep, deltas.to(torch.float64), torch.zeros((), dtype=torch.float64, device=deltas.device))
    d = d.reshape(k, b, -1)
    return torch.einsum("kbn,jbn->bkj", d, d)


@dataclass
class ModuleSystem:
    """The SLTA system of one module.

    ``B[a]`` is the (balanced) mean Gram of task ``a``'s samples (Eq. 14 / 34), ``A = Σ_a B[a]``, ``b_j = Σ_a
    B[a, j, a]`` (Eq. 13). ``n_samples[a]``: samples of task ``a`` that entered ``B[a]`` (balanced: ``c(x) > 0``).
    After :func:`solve_alpha`: ``alpha`` (raw, unclipped), ``condition`` (of the solved sub-system of the experts with
    ``Δf ≢ 0``; NaN when there is none), ``method`` ("solve", "lstsq" or "none") and ``zero`` (experts with ``Δf ≡ 0``).
    """

    B: torch.Tensor
    A: torch.Tensor
    b: torch.Tensor
    n_samples: list[int]
    alpha: torch.Tensor | None = None
    condition: float = math.nan
    method: str = ""
    zero: torch.Tensor | None = None


def slta_system(grams: Sequence[torch.Tensor], *, balanced: bool = True) -> ModuleSystem:
    """Build ``B``, ``A``, ``b`` from per-sample Grams: ``grams[a]`` is ``[N_a, K, K]`` for the samples of task ``a``
    (the data of expert ``a``), as :func:`sample_grams` returns them.

    Balanced (Eqs. 33–34): each sample's Gram is divided by ``c(x) = (1/K) Σ_t ‖Δf_t(x)‖²`` (the mean diagonal);
    samples with ``c(x) = 0`` (no expert changes the module's output on them) are skipped. A task without usable
    samples contributes ``B[a] = 0``.
    """
    k = len(grams)
    big_b = torch.zeros((k, k, k), dtype=torch.float64)
    used = []
    for a, g in enumerate(grams):
        g = g.to(torch.float64).cpu()
        if g.dim() != 3 or tuple(g.shape[1:]) != (k, k):
            raise ValueError(f"grams[{a}] must be [N, {k}, {k}], got {list(g.shape)}")
        if balanced:
            c = torch.diagonal(g, dim1=1, dim2=2).sum(-1) / k
            keep = c > 0
            g = g[keep] / c[keep].view(-1, 1, 1)
        used.append(int(g.shape[0]))
        if g.shape[0]:
            big_b[a] = g.mean(0)
    a_mat = big_b.sum(0)
    b_vec = torch.einsum("aja->j", big_b)
    return ModuleSystem(big_b, a_mat, b_vec, used)


def solve_alpha(system: ModuleSystem, *, cond_max: float = 1e12) -> ModuleSystem:
    """Solve ``A α = b`` in float64 (D-22), in place, and return ``system``.

    Experts with ``A_jj = 0`` (their ``Δf`` is identically zero on every sample) get ``α = 1`` and leave the system;
    the rest is solved with ``numpy.linalg.solve`` unless it is singular or ``cond > cond_max``, in which case the
    minimum-norm ``numpy.linalg.lstsq`` solution is used (e.g. two experts with collinear changes split the weight).
    """
    a_mat = system.A.to(torch.float64).cpu().numpy()
    b_vec = system.b.to(torch.float64).cpu().numpy()
    k = a_mat.shape[0]
    zero = ~(np.diag(a_mat) > 0)
    alpha = np.ones(k)
    active = np.flatnonzero(~zero)
    method, cond = "none", math.nan
    if active.size:
        sub_a = a_mat[np.ix_(active, active)]
        sub_b = b_vec[active]
        try:
            cond = float(np.linalg.cond(sub_a))
        except np.linalg.LinAlgError:
            cond = math.inf
        x = None
        if math.isfinite(cond) and cond <= cond_max:
            try:
                x = np.linalg.solve(sub_a, sub_b)
                method = "solve"
            except np.linalg.LinAlgError:
                x = None
        if x is None:
            x = np.linalg.lstsq(sub_a, sub_b, rcond=None)[0]
            method = "lstsq"
        alpha[active] = x
    system.alpha = torch.from_numpy(alpha)
    system.condition = cond
    system.method = method
    system.zero = torch.from_numpy(zero)
    return system


def nls_of_path(outputs: torch.Tensor) -> float:
    """Eq. 19 for one input: ``outputs[s]`` is ``f(x; θ_0 + (s/N)(θ − θ_0))`` flattened, ``s = 0..N``.

    ``NLS = Σ_{i,j} (D_ij / D_N0 − |i − j| / N)²`` with Euclidean ``D``; NaN when the end points coincide (``D_N0 = 0``).
    """
    o = outputs.reshape(outputs.shape[0], -1).to(torch.float64)
    n = o.shape[0] - 1
    if n < 1:
        raise ValueError("a path needs at least two points")
    d = torch.zeros((n + 1, n + 1), dtype=torch.float64)
    for i in range(n + 1):
        for j in range(i + 1, n + 1):
            d[i, j] = d[j, i] = torch.linalg.vector_norm(o[i] - o[j])
    end = float(d[n, 0])
    if end == 0.0:
        return math.nan
    steps = torch.arange(n + 1, dtype=torch.float64)
    ideal = (steps[:, None] - steps[None, :]).abs() / n
    return float(((d / end - ideal) ** 2).sum())


# ================================================================================================ feature capture


@dataclass
class FeatureBatch:
    """The base model's module inputs for one batch of samples (right-padded), on the CPU.

    ``layer_inputs[i]``: input of decoder block ``i`` (block 0: the token embeddings); ``layer_args[i]`` and
    ``layer_kwargs[i]``: its other inputs as the model passed them (attention mask, rotary ``position_embeddings``,
    ``position_ids``); ``attn_inputs[i]`` / ``mlp_inputs[i]``: the input of the first module of block ``i``'s
    attention / MLP branch (D-39; Llama: the block input, and the residual stream after the attention, the input of
    ``post_attention_layernorm``; Phi-2: the normalised block input, which its MLP reads); ``attn_calls[i]`` /
    ``mlp_calls[i]``: the other ``(args, kwargs)`` the branch's core module (attention, MLP) was called with;
    ``final_input``: the last block's output (the input of the final norm). Lists are empty when not captured.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    layer_inputs: list[torch.Tensor] = field(default_factory=list)
    layer_kwargs: list[dict[str, Any]] = field(default_factory=list)
    mlp_inputs: list[torch.Tensor] = field(default_factory=list)
    final_input: torch.Tensor | None = None
    layer_args: list[tuple] = field(default_factory=list)
    attn_inputs: list[torch.Tensor] = field(default_factory=list)
    attn_calls: list[tuple[tuple, dict[str, Any]]] = field(default_factory=list)
    mlp_calls: list[tuple[tuple, dict[str, Any]]] = field(default_factory=list)

    @property
    def mask(self) -> torch.Tensor:
        return self.attention_mask.to(torch.bool)

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> FeatureBatch:
        """On ``device``, floating tensors in ``dtype`` (masks and ids keep theirs)."""
        def mv(x: Any) -> Any:
            return _move(x, device, dtype)
        return FeatureBatch(self.input_ids.to(device), self.attention_mask.to(device),
                            [mv(x) for x in self.layer_inputs], [mv(kw) for kw in self.layer_kwargs],
                            [mv(x) for x in self.mlp_inputs], mv(self.final_input),
                            [mv(a) for a in self.layer_args], [mv(x) for x in self.attn_inputs],
                            [mv(c) for c in self.attn_calls], [mv(c) for c in self.mlp_calls])


def _move(x: Any, device: torch.device | str, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    if isinstance(x, tuple):
        return tuple(_move(v, device, dtype) for v in x)
    if isinstance(x, list):
        return [_move(v, device, dtype) for v in x]
    if isinstance(x, dict):
        return {k: _move(v, device, dtype) for k, v in x.items()}
    return x


def _cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True) if x.device.type != "cpu" else x.detach().clone()
    if isinstance(x, tuple):
        return tuple(_cpu(v) for v in x)
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    return x


def _replayable(value: Any) -> bool:
    return value is None or isinstance(value, (torch.Tensor, bool, int, float, str)) or (
        isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value))


def _positional(args: tuple) -> tuple:
    """Positional inputs after the hidden states, kept for replay; state (a cache object) becomes None."""
    return tuple(_cpu(a) if _replayable(a) else None for a in args)


def _call_inputs(args: tuple, kwargs: Mapping[str, Any]) -> tuple[Any, tuple, dict[str, Any]]:
    """(hidden states, other positional inputs, keyword inputs) of a module call seen by a pre-hook."""
    if args:
        hidden, rest = args[0], args[1:]
    else:
        hidden, rest = kwargs["hidden_states"], ()
    kw = {k: _cpu(v) for k, v in kwargs.items()
          if k != "hidden_states" and k not in _NOT_INPUTS and _replayable(v)}
    return _cpu(hidden), _positional(rest), kw


def _side_inputs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in kwargs.items():
        if key in _NOT_INPUTS:
            continue
        if value is None or isinstance(value, torch.Tensor) or (isinstance(value, tuple)
                                               and all(isinstance(v, torch.Tensor) for v in value)):
            out[key] = _cpu(value)
    return out


# Decoder-block children by role (shared names across families, like mergeflow.architecture's vocabularies). Which
# branch a norm belongs to comes from the architecture (D-18: a post_attention_layernorm is the MLP's pre-norm in
# Llama, the attention's post-norm in Gemma-2/3 and OLMo-2).
_ATTN_CORES = ("self_attn", "attn", "attention", "self_attention")
_MLP_CORES = ("mlp", "block_sparse_moe", "feed_forward")
_PRE_NORMS = ("input_layernorm", "ln_1", "ln_attn", "pre_feedforward_layernorm", "post_attention_layernorm", "ln_2",
              "ln_mlp")
_POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")
_FINAL_NORMS = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f")
_LAYER_LISTS = ("layers", "h", "blocks", "layer")


@dataclass(frozen=True)
class _Branch:
    """One residual branch of a decoder block (D-39): ``pre`` norm → ``core`` (attention or MLP) → ``post`` norm,
    children of the block by name; its output is what the branch adds to the residual stream."""

    pre: str | None
    core: str
    post: str | None

    @property
    def first(self) -> str:
        return self.pre or self.core

    @property
    def children(self) -> tuple[str, ...]:
        return tuple(c for c in (self.pre, self.core, self.post) if c is not None)

    def run(self, block: nn.Module, x: torch.Tensor, call: tuple[tuple, dict[str, Any]]) -> torch.Tensor:
        if self.pre is not None:
            x = getattr(block, self.pre)(x)
        args, kwargs = call
        out = _layer_out(getattr(block, self.core)(x, *args, **kwargs))
        return getattr(block, self.post)(out) if self.post is not None else out


class _Parts:
    """The pieces of a decoder-only causal LM that SLTA runs one at a time: the embeddings, the decoder blocks and
    each block's attention and MLP branches, the final norm and the LM head (D-39). Found by module names shared
    across families and by the architecture's roles, not by a per-family table; a model without them is refused
    by name."""

    def __init__(self, model: PreTrainedModel, arch: Architecture | None = None,
                 binding: Binding | None = None, *, blocks: bool = True) -> None:
        self.model = model
        self.arch, self.binding = arch, binding
        # every global parameter name of each parameter object (tied weights have two)
        self.global_names: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self.global_names.setdefault(id(p), []).append(name)
        self.module_names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        if not blocks:  # the model level runs the whole network: nothing inside it needs finding
            return
        num_layers = arch.num_layers if arch is not None else int(getattr(model.config, "num_hidden_layers", 0))
        lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers
                 and n.split(".")[-1] in _LAYER_LISTS]
        family = type(model).__name__
        if num_layers <= 0 or len(lists) != 1:
            raise ArchitectureError(f"slta: cannot find the {num_layers} decoder blocks of {family} (a module list "
                                    f"named {' / '.join(_LAYER_LISTS)}); use level model, which runs the whole "
                                    "network")
        self.layers_name, self.layers = lists[0]
        self.lm_head = model.get_output_embeddings()
        if self.lm_head is None:
            raise ArchitectureError(f"slta: {family} has no output embeddings (LM head)")
        self.norm = self._final_norm(arch)
        self.embeds = self._embeddings(arch)
        self.branches = [self._branches(i, layer) for i, layer in enumerate(self.layers)]

    # -- discovery -----------------------------------------------------------------------------------------------

    def _owner(self, checkpoint_name: str) -> nn.Module | None:
        """The module whose parameter holds checkpoint tensor ``checkpoint_name``."""
        param = self.binding.slots[checkpoint_name].param if self.binding is not None and \
            checkpoint_name in self.binding else checkpoint_name
        path = param.rsplit(".", 1)[0]
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            return None

    def _final_norm(self, arch: Architecture | None) -> nn.Module:
        if arch is not None:
            owners = {id(m): m for n, r in arch.tensors.items() if r.module == "final_norm"
                      for m in [self._owner(n)] if m is not None}
            if len(owners) == 1:
                return next(iter(owners.values()))
        parent = self.model.get_submodule(self.layers_name.rsplit(".", 1)[0]) if "." in self.layers_name \
            else self.model
        for name in _FINAL_NORMS:
            module = getattr(parent, name, None)
            if isinstance(module, nn.Module):
                return module
        raise ArchitectureError(f"slta: cannot find the final norm of {type(self.model).__name__} "
                                f"(one of {', '.join(_FINAL_NORMS)} beside the blocks); use level model, which runs "
                                "the whole network")

    def _embeddings(self, arch: Architecture | None) -> list[tuple[str, nn.Module]]:
        """(``token`` or ``position``, module) of every embedding whose sum is block 0's input."""
        token = self.model.get_input_embeddings()
        out: list[tuple[str, nn.Module]] = [("token", token)]
        if arch is not None:
            for name, role in arch.tensors.items():
                if role.kind == "pos_embed" and not role.is_bias:
                    module = self._owner(name)
                    if isinstance(module, nn.Embedding) and module is not token:
                        out.append(("position", module))
        return out

    def _role_module(self, child: nn.Module) -> str | None:
        """"attn" or "mlp": the architecture's module of a block child's parameters (None: no parameter)."""
        if self.arch is None:
            return None
        names = {n for p in child.parameters() for n in self.global_names.get(id(p), [])}
        held = [c for n in names for c in (self.binding.checkpoint_names(n) if self.binding is not None else [n])]
        modules = {self.arch.tensors[c].module for c in held if c in self.arch.tensors}
        return modules.pop() if len(modules) == 1 else None

    def _branches(self, i: int, layer: nn.Module) -> dict[str, _Branch]:
        children = dict(layer.named_children())
        family = type(self.model).__name__

        def core(names: tuple[str, ...], what: str) -> str:
            found = [n for n in names if n in children]
            if len(found) != 1:
                raise ArchitectureError(f"slta: block {i} of {family} has no single {what} module "
                                        f"(one of {', '.join(names)}; its children: {', '.join(children)}), so the "
                                        "attn_mlp and head_mlp levels do not exist there; use level layer or model")
            return found[0]

        attn, mlp = core(_ATTN_CORES, "attention"), core(_MLP_CORES, "MLP")
        owner = {n: self._role_module(children[n]) for n in (*_PRE_NORMS, *_POST_NORMS) if n in children}
        if self.arch is None:  # without the architecture: its reading of the names (mergeflow.architecture)
            post_norm_block = "pre_feedforward_layernorm" in children or "post_feedforward_layernorm" in children
            owner = {n: ("attn" if n in ("input_layernorm", "ln_1", "ln_attn")
                         or (n == "post_attention_layernorm" and post_norm_block) else "mlp") for n in owner}
        pre = {b: next((n for n in _PRE_NORMS if owner.get(n) == b and not
                        (n == "post_attention_layernorm" and b == "attn")), None) for b in ("attn", "mlp")}
        post = {b: next((n for n in _POST_NORMS if owner.get(n) == b and n != pre[b] and
                         (n != "post_attention_layernorm" or b == "attn")), None) for b in ("attn", "mlp")}
        return {"attn": _Branch(pre["attn"], attn, post["attn"]), "mlp": _Branch(pre["mlp"], mlp, post["mlp"])}

    def param_map(self, template: nn.Module) -> dict[str, list[str]]:
        """Parameter (global) name → the template-relative names of that parameter."""
        out: dict[str, list[str]] = {}
        for local, p in template.named_parameters(remove_duplicate=False):
            for g in self.global_names.get(id(p), []):
                out.setdefault(g, []).append(local)
        return out


@torch.no_grad()
def capture_features(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                     batch_size: int = 8, blocks: bool = True, mlp: bool = True,
                     parts: _Parts | None = None) -> list[FeatureBatch]:
    """One base forward per batch, recording every module's input with hooks (docs/methods.md §4.3 step 1).

    ``input_ids``/``attention_mask``: right-padded ``[N, T]``. Returns one :class:`FeatureBatch` per batch, trimmed to
    the batch's longest sample. ``blocks=False`` records nothing but the ids (model level); ``mlp=False`` skips the
    post-attention residuals (layer level).
    """
    parts = parts if parts is not None else _Parts(model)
    out: list[FeatureBatch] = []
    n = int(input_ids.shape[0])
    for start in range(0, n, batch_size):
        mask = attention_mask[start:start + batch_size]
        width = int(mask.sum(1).max())
        fb = FeatureBatch(input_ids[start:start + batch_size, :width].clone(), mask[:, :width].clone())
        if blocks:
            _record(parts, fb, mlp=mlp)
        out.append(fb)
    return out


def _record(parts: _Parts, fb: FeatureBatch, *, mlp: bool) -> None:
    """Fill ``fb``'s module inputs from one forward of the base model (hooks removed afterwards): each block's input
    and call, each branch's input and its core module's call (D-39), the final norm's input."""
    n = len(parts.layers)
    layer_in: list[Any] = [None] * n
    branch_in: dict[str, list[Any]] = {"attn": [None] * n, "mlp": [None] * n}
    core_calls: dict[str, list[Any]] = {"attn": [None] * n, "mlp": [None] * n}
    final: list[Any] = [None]

    def layer_hook(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            layer_in[i] = _call_inputs(args, kwargs)
        return hook

    def first_hook(branch: str, i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            if branch_in[branch][i] is None:  # a module that runs twice (a shared norm): its first call
                branch_in[branch][i] = _call_inputs(args, kwargs)[0]
        return hook

    def core_hook(branch: str, i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            _, rest, kw = _call_inputs(args, kwargs)
            core_calls[branch][i] = (rest, kw)
        return hook

    def final_hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        final[0] = _call_inputs(args, kwargs)[0]

    handles = []
    device = next(parts.model.parameters()).device
    try:
        for i, layer in enumerate(parts.layers):
            handles.append(layer.register_forward_pre_hook(layer_hook(i), with_kwargs=True))
            for name, br in parts.branches[i].items():
                if name == "mlp" and not mlp:
                    continue
                handles.append(getattr(layer, br.first).register_forward_pre_hook(first_hook(name, i),
                                                                                 with_kwargs=True))
                handles.append(getattr(layer, br.core).register_forward_pre_hook(core_hook(name, i),
                                                                                with_kwargs=True))
        handles.append(parts.norm.register_forward_pre_hook(final_hook, with_kwargs=True))
        parts.model(input_ids=fb.input_ids.to(device), attention_mask=fb.attention_mask.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    fb.layer_inputs = [x[0] for x in layer_in]
    fb.layer_args = [x[1] for x in layer_in]
    fb.layer_kwargs = [x[2] for x in layer_in]
    fb.attn_inputs, fb.attn_calls = list(branch_in["attn"]), list(core_calls["attn"])
    fb.mlp_inputs = list(branch_in["mlp"]) if mlp else []
    fb.mlp_calls = list(core_calls["mlp"]) if mlp else []
    fb.final_input = final[0]


# ================================================================================================ modules


@dataclass
class _Unit:
    """Modules evaluated together: partition ids, the base submodule to copy, which checkpoint tensors model ``k``
    contributes (all others stay the base's), and how to run it on a feature batch (one output per partition)."""

    name: str
    pids: list[str]
    template: nn.Module
    tensors: list[str]
    apply: Callable[[nn.Module, FeatureBatch], dict[str, torch.Tensor]]
    param_map: dict[str, list[tuple[str, Slot]]]   # checkpoint tensor → (template-relative parameter, slot in it)


def _layer_out(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


class _Session:
    """Base model, partitions, checkpoint readers and captured features shared by the estimator and the metrics."""

    def __init__(self, base: Path, models: Sequence[Path], *, level: str, gqa_policy: str | None = None,
                 device: torch.device | str = "cpu", batch_size: int = 8, max_length: int | None = 512,
                 model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 readers: Sequence[TensorReader] | None = None) -> None:
        if level not in LEVELS:
            raise RecipeError(f"slta level {level!r} is not one of {', '.join(LEVELS)}")
        self.level = level
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.arch = Architecture.from_folder(Path(base))
        # refuses GQA head level without a policy before anything is loaded (D-20)
        if level == "head_mlp" and self.arch.gqa and gqa_policy is None:
            raise ArchitectureError(
                f"slta at head level needs gqa_policy='group' for grouped-query attention: {self.arch.model_type} "
                f"has {self.arch.num_heads} query heads sharing {self.arch.num_kv_heads} key/value heads, so one "
                "head is not a set of parameters (docs/methods.md D-20)")
        self.partitioner = Partitioner(self.arch, level, gqa_policy=gqa_policy)
        if model is None:
            model = transformers_io.load_causal_lm(base, dtype=torch.float32).to(self.device).eval()
        self.model = model
        # checkpoint tensor → where it lives in the loaded model (fused MoE experts, renamed modules; D-37)
        self.binding = binding_for(model, Path(base), self.arch)
        self.parts = _Parts(model, self.arch, self.binding, blocks=level != "model")
        self.tokenizer = tokenizer if tokenizer is not None else _tokenizer(Path(base))
        self.paths = [Path(base), *map(Path, models)]
        # given: the base's and experts' tensors as the merge reads them (LoRA adapter experts included)
        self.readers = list(readers) if readers is not None else [_reader(p) for p in self.paths]
        self.counts = {"base_forwards": 0, "module_passes": 0}

    def close(self) -> None:
        for r in self.readers:
            r.close()

    # -- data ----------------------------------------------------------------------------------------------------

    def capture(self, examples: Sequence[Example]) -> list[FeatureBatch]:
        enc = encode(self.tokenizer, list(examples), max_length=self.max_length, answer_only=False)
        if self.level == "model":
            out = [FeatureBatch(b.input_ids.clone(), b.attention_mask.clone()) for _, b in batches(enc,
                                                                                                    self.batch_size)]
            return out
        feats = capture_features(self.model, enc.input_ids, enc.attention_mask, batch_size=self.batch_size,
                                 blocks=True, mlp=self.level in ("attn_mlp", "head_mlp"), parts=self.parts)
        self.counts["base_forwards"] += len(feats)
        return feats

    # -- modules -------------------------------------------------------------------------------------------------

    def units(self, *, nonmodule: bool = True) -> list[_Unit]:
        """The modules of the level, in partition order; ``nonmodule=False`` leaves out ``embed`` and ``head``."""
        known = set(self.partitioner.partition_ids())
        parts = self.parts
        units: list[_Unit] = []

        def unit(name: str, pids: list[str], template: nn.Module, apply: Callable[..., dict[str, torch.Tensor]],
                 allowed: tuple[str, ...] | None = None) -> None:
            pids = [p for p in pids if p in known]
            if not pids:
                return
            locals_of = parts.param_map(template)
            tensors = list(dict.fromkeys(m[0] for p in pids for m in self.partitioner.members(p)))
            pmap: dict[str, list[tuple[str, Slot]]] = {}
            for t in tensors:
                slot = self.binding.slot(t, "slta")
                if slot.param not in locals_of:
                    raise ArchitectureError(f"slta: tensor {t!r} of partition {pids[0]} is not a parameter of the "
                                            f"module that computes it ({name})")
                if allowed is not None and not any(loc.startswith(allowed) for loc in locals_of[slot.param]):
                    raise ArchitectureError(f"slta: tensor {t!r} of partition {pids[0]} lies outside "
                                            f"{', '.join(allowed)} of block {name}")
                pmap[t] = [(loc, slot) for loc in locals_of[slot.param]]
            units.append(_Unit(name, pids, template, tensors, apply, pmap))

        if self.level == "model":
            unit("model", ["model"], parts.model,
                 lambda m, b: {"model": m(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                          use_cache=False).logits})
            return units
        if nonmodule:
            # block 0's input is the sum of the embeddings (GPT-2: tokens and positions), linear in their weights;
            # a constant scale (Gemma's √d) changes no α
            embeds = nn.ModuleDict({f"{kind}{j}": module for j, (kind, module) in enumerate(parts.embeds)})

            def embed(m: nn.Module, b: FeatureBatch) -> dict[str, torch.Tensor]:
                positions = torch.arange(b.input_ids.shape[1], device=b.input_ids.device).expand_as(b.input_ids)
                return {EMBED: sum(mod(b.input_ids if key.startswith("token") else positions)
                                   for key, mod in m.items())}

            unit(EMBED, [EMBED], embeds, embed)
        for i, layer in enumerate(parts.layers):
            self._block_units(i, layer, unit)
        if nonmodule:
            head = nn.ModuleDict({"norm": parts.norm, "lm_head": parts.lm_head})
            unit(HEAD, [HEAD], head, lambda m, b: {HEAD: m["lm_head"](m["norm"](b.final_input))})
        return units

    def _block_units(self, i: int, layer: nn.Module, unit: Callable[..., None]) -> None:
        branches = self.parts.branches[i]
        attn_branch, mlp_branch = branches["attn"], branches["mlp"]

        def attn(m: nn.Module, b: FeatureBatch) -> torch.Tensor:
            return attn_branch.run(m, b.attn_inputs[i], b.attn_calls[i])

        if self.level == "layer":
            pid = f"layer.{i}"
            unit(pid, [pid], layer, lambda m, b: {pid: _layer_out(m(b.layer_inputs[i], *b.layer_args[i],
                                                                    use_cache=False, **b.layer_kwargs[i]))})
            return
        mlp_pid = f"layer.{i}.mlp"

        def mlp(m: nn.Module, b: FeatureBatch) -> dict[str, torch.Tensor]:
            return {mlp_pid: mlp_branch.run(m, b.mlp_inputs[i], b.mlp_calls[i])}

        attn_parts = tuple(f"{c}." for c in attn_branch.children)
        mlp_parts = tuple(f"{c}." for c in mlp_branch.children)
        if self.level == "attn_mlp":
            pid = f"layer.{i}.attn"
            unit(pid, [pid], layer, lambda m, b: {pid: attn(m, b)}, attn_parts)
        else:
            self._head_units(i, layer, unit, attn, attn_branch, attn_parts)
            self._expert_units(i, unit, mlp_branch, mlp_parts)
        unit(mlp_pid, [mlp_pid], layer, mlp, mlp_parts)

    def _head_units(self, i: int, layer: nn.Module, unit: Callable[..., None], attn: Callable[..., torch.Tensor],
                    branch: _Branch, attn_parts: tuple[str, ...]) -> None:
        """D-20: head h's output is W_o[:, h] · z_h (its o_proj columns times its slice of o_proj's input)."""
        heads = [p for p in self.partitioner.partition_ids()
                 if p.startswith((f"layer.{i}.head.", f"layer.{i}.group."))]
        o_name = self._o_proj_name(i)
        o_role = self.arch.role(o_name)
        o_part = self.partitioner.partition(o_name)
        o_module = self.parts._owner(o_name)
        feature_axis = 0 if o_role.conv1d else 1   # the input (head) axis of o's weight: Conv1D stores [in, out]
        if o_part.axis != feature_axis or o_module is None or not self.binding.slot(o_name).whole:
            raise ArchitectureError(f"slta head level: {o_name} is not split into heads along its input axis")
        o_local = self.parts.module_names[id(o_module)][len(self.parts.module_names[id(layer)]) + 1:]
        cols = {p: torch.tensor(o_part.indices(p)) for p in heads}

        def per_head(m: nn.Module, b: FeatureBatch) -> dict[str, torch.Tensor]:
            seen: list[torch.Tensor] = []
            o = m.get_submodule(o_local)
            hook = o.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
            try:
                attn(m, b)
            finally:
                hook.remove()
            z, w = seen[0], o.weight
            if o_role.conv1d:
                return {p: z[..., c.to(z.device)] @ w[c.to(w.device), :] for p, c in cols.items()}
            return {p: z[..., c.to(z.device)] @ w[:, c.to(w.device)].T for p, c in cols.items()}

        unit(f"layer.{i}.heads", heads, layer, per_head, (f"{branch.core}.",))
        for suffix in ("attn_norm", "attn_shared"):
            pid = f"layer.{i}.{suffix}"
            unit(pid, [pid], layer, lambda m, b, pid=pid: {pid: attn(m, b)}, attn_parts)

    def _expert_units(self, i: int, unit: Callable[..., None], branch: _Branch,
                      mlp_parts: tuple[str, ...]) -> None:
        """D-38: routed expert e's output is its FFN on the tokens the *base* router sends it, times their routing
        weights: the block's output with every other expert's slots dropped (the router is the base's: it belongs
        to layer.i.mlp, a module of its own)."""
        experts = [p for p in self.partitioner.partition_ids() if p.startswith(f"layer.{i}.expert.")]
        if not experts:
            return
        layer = self.parts.layers[i]
        block = getattr(layer, branch.core)
        family = type(self.parts.model).__name__
        routed = getattr(block, "experts", None)
        router = getattr(block, "gate", None)
        if routed is None or router is None or not hasattr(routed, "num_experts"):
            raise ArchitectureError(
                f"slta head_mlp: the experts of {family} block {i} are not a router `gate` and a fused `experts` "
                "module as transformers 5 builds them (Mixtral, Qwen3-MoE); use level attn_mlp, where the MoE "
                "block is one module")
        index = {p: int(p.rsplit(".", 1)[1]) for p in experts}
        core = branch.core

        def per_expert(m: nn.Module, b: FeatureBatch) -> dict[str, torch.Tensor]:
            x = b.mlp_inputs[i]
            if branch.pre is not None:
                x = getattr(m, branch.pre)(x)
            moe = getattr(m, core)
            flat = x.reshape(-1, x.shape[-1])
            _, weights, chosen = moe.gate(flat)
            out = {}
            for p, e in index.items():
                # the tokens routed to e, every top-k slot pointing at e with the weight of e's own slot (0 in
                # the others): exactly e's weighted output, whichever experts implementation transformers runs
                mine = chosen == e
                rows = mine.any(-1)
                y = torch.zeros_like(flat)
                if bool(rows.any()):
                    y[rows] = moe.experts(flat[rows], torch.full_like(chosen[rows], e),
                                          torch.where(mine[rows], weights[rows], torch.zeros_like(weights[rows])))
                y = y.reshape(x.shape)
                out[p] = getattr(m, branch.post)(y) if branch.post is not None else y
            return out

        unit(f"layer.{i}.experts", experts, layer, per_expert, mlp_parts)

    def _o_proj_name(self, i: int) -> str:
        names = [n for n in self.arch.block_tensors(i) if self.arch.role(n).kind == "o"
                 and not self.arch.role(n).is_bias]
        if len(names) != 1:
            raise ArchitectureError(f"slta head level: block {i} of this {self.arch.model_type} model has "
                                    f"{len(names)} attention output projections, not one")
        return names[0]

    # -- weights -------------------------------------------------------------------------------------------------

    def weights(self, k: int, unit: _Unit) -> dict[str, torch.Tensor]:
        """Model ``k``'s tensors of ``unit`` (``k = 0``: the base), fp32, CPU."""
        reader = self.readers[k]
        out = {}
        for name in unit.tensors:
            if name not in reader:
                raise ArchitectureError(f"{self.paths[k]} has no tensor {name!r}")
            out[name] = reader.get(name).to(torch.float32)
        return out

    def instance(self, unit: _Unit, weights: Mapping[str, torch.Tensor] | None,
                 dtype: torch.dtype = torch.float32) -> nn.Module:
        """A private copy of the unit's base submodule holding ``weights`` (None: the base itself, in fp32)."""
        if weights is None and dtype == torch.float32:
            return unit.template
        inst = copy.deepcopy(unit.template).to(dtype)
        if weights:
            _load_into(inst, unit, weights)
        return inst

    def unchanged(self, unit: _Unit, base_w: Mapping[str, torch.Tensor],
                  other_w: Mapping[str, torch.Tensor]) -> dict[str, bool]:
        """Per partition of ``unit``: are all its entries equal in the two weight sets (so ``Δf ≡ 0``)?"""
        out = {}
        for pid in unit.pids:
            same = True
            for name, axis, idx in self.partitioner.members(pid):
                a, b = base_w[name], other_w[name]
                if axis is not None and idx is not None:
                    sel = torch.tensor(idx)
                    a, b = a.index_select(axis, sel), b.index_select(axis, sel)
                if not torch.equal(a, b):
                    same = False
                    break
            out[pid] = same
        return out


def _load_into(inst: nn.Module, unit: _Unit, weights: Mapping[str, torch.Tensor]) -> None:
    params = dict(inst.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, tensor in weights.items():
            for local, slot in unit.param_map[name]:
                p = slot.view(params[local].data)  # a checkpoint tensor inside a fused parameter: its slice (D-37)
                if tuple(p.shape) != tuple(tensor.shape):
                    raise ArchitectureError(f"slta: tensor {name!r} has shape {list(tensor.shape)}, the model's "
                                            f"parameter {list(p.shape)}")
                p.copy_(tensor.to(device=p.device, dtype=p.dtype))


def _tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer  # seconds to import; estimator modules load when a recipe is validated

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _reader(path: Path) -> CheckpointReader:
    files, fmt = find_weight_files(path, allow_pickle=True)
    return CheckpointReader(path, files, allow_pickle=fmt == "pickle")


def _task_keys(tasks: Sequence[Sequence[Example]]) -> list[int]:
    """Index of the first task with the same examples, per task: identical data is captured and run once."""
    first: dict[tuple, int] = {}
    out = []
    for i, t in enumerate(tasks):
        key = tuple((e.prompt, e.delimiter, e.answer) for e in t)
        out.append(first.setdefault(key, i))
    return out


# ================================================================================================ the estimator


def _unit_grams(session: _Session, unit: _Unit, feats: Mapping[int, list[FeatureBatch]],
                dtype: torch.dtype) -> tuple[dict[str, dict[int, torch.Tensor]], dict[str, list[bool]]]:
    """Per partition and distinct task: the per-sample Grams ``[N, K, K]``; and which experts leave each unchanged."""
    k = len(session.paths) - 1
    base_w = session.weights(0, unit)
    unchanged: dict[str, list[bool]] = {p: [] for p in unit.pids}
    insts: list[nn.Module | None] = [session.instance(unit, None, dtype)]
    for j in range(1, k + 1):
        w = session.weights(j, unit)
        same = session.unchanged(unit, base_w, w)
        for p in unit.pids:
            unchanged[p].append(same[p])
        insts.append(None if all(same.values()) else session.instance(unit, w, dtype))
        del w
    del base_w
    grams: dict[str, dict[int, torch.Tensor]] = {p: {} for p in unit.pids}
    for key, fbs in feats.items():
        acc: dict[str, list[torch.Tensor]] = {p: [] for p in unit.pids}
        for fb in fbs:
            b = fb.to(session.device, dtype)
            outs = [None if inst is None else unit.apply(inst, b) for inst in insts]
            session.counts["module_passes"] += sum(o is not None for o in outs)
            base_out = outs[0]
            assert base_out is not None
            for p in unit.pids:
                f0 = base_out[p].to(torch.float64)
                zero = torch.zeros_like(f0)
                deltas = torch.stack([zero if (o is None or unchanged[p][j]) else o[p].to(torch.float64) - f0
                                      for j, o in enumerate(outs[1:])])
                acc[p].append(sample_grams(deltas, b.attention_mask).cpu())
        for p in unit.pids:
            grams[p][key] = torch.cat(acc[p])
    return grams, unchanged


@torch.no_grad()
def _module_grams(session: _Session, tasks: Sequence[Sequence[Example]], *, nonmodule: bool = True,
                  modules: Sequence[str] | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[list[int], dict[str, dict[int, torch.Tensor]]]:
    """The task key of each task (:func:`_task_keys`) and, per module (in unit order) and distinct task key, the
    per-sample Grams ``[N, K, K]`` float64: everything the systems are built from."""
    keys = _task_keys(tasks)
    feats = {key: session.capture(tasks[key]) for key in dict.fromkeys(keys)}
    wanted = None if modules is None else set(modules)
    out: dict[str, dict[int, torch.Tensor]] = {}
    for unit in session.units(nonmodule=nonmodule):
        if wanted is not None and not wanted & set(unit.pids):
            continue
        grams, _ = _unit_grams(session, unit, feats, dtype)
        for p in unit.pids:
            if wanted is None or p in wanted:
                out[p] = grams[p]
    return keys, out


def _solve(keys: Sequence[int], grams: Mapping[str, Mapping[int, torch.Tensor]], *, balanced: bool,
           cond_max: float) -> dict[str, ModuleSystem]:
    return {p: solve_alpha(slta_system([by_key[key] for key in keys], balanced=balanced), cond_max=cond_max)
            for p, by_key in grams.items()}


def _systems(session: _Session, tasks: Sequence[Sequence[Example]], *, balanced: bool, cond_max: float,
             nonmodule: bool = True, modules: Sequence[str] | None = None,
             dtype: torch.dtype = torch.float32) -> dict[str, ModuleSystem]:
    keys, grams = _module_grams(session, tasks, nonmodule=nonmodule, modules=modules, dtype=dtype)
    return _solve(keys, grams, balanced=balanced, cond_max=cond_max)


def module_systems(base: str | Path, experts: Sequence[str | Path], tasks: Sequence[Sequence[Example]], *,
                   level: str = "attn_mlp", balanced: bool = True, cond_max: float = 1e12,
                   gqa_policy: str | None = None, nonmodule: bool = True, modules: Sequence[str] | None = None,
                   batch_size: int = 8, max_length: int | None = 512, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> dict[str, ModuleSystem]:
    """The solved SLTA system of every module (or of ``modules``), keyed by partition id.

    ``tasks[a]``: the examples of expert ``a``'s task (texts ``prompt + delimiter + answer``). ``dtype``: the
    precision the modules run in (float64 for exact checks on small models). This is what the ``slta`` estimator
    computes before it clips and writes the coefficients.
    """
    if len(tasks) != len(experts):
        raise ValueError(f"{len(experts)} experts but data for {len(tasks)}")
    session = _Session(Path(base), [Path(e) for e in experts], level=level, gqa_policy=gqa_policy, device=device,
                       batch_size=batch_size, max_length=max_length)
    try:
        return _systems(session, tasks, balanced=balanced, cond_max=cond_max, nonmodule=nonmodule,
                        modules=modules, dtype=dtype)
    finally:
        session.close()


def _check_clip(p: Mapping[str, Any]) -> None:
    low, high = p["clip_alpha_low"], p["clip_alpha_high"]
    if low is not None and high is not None and low > high:
        raise RecipeError(f"importance.parameters: clip_alpha_low {low} is above clip_alpha_high {high}")


def _measure(run: ImportanceRun) -> Measurements:
    """Every module's per-sample Grams (the embeddings and the head included, whatever ``nonmodule``)."""
    p = run.params
    assert run.base is not None
    # checks the level and the GQA policy before the base model is loaded
    arch = Architecture.from_folder(run.base.model_folder)
    if p["level"] == "head_mlp" and arch.gqa and p["gqa_policy"] is None:
        raise ArchitectureError(
            f"slta at head level needs importance.parameters.gqa_policy: 'group' for grouped-query attention "
            f"({arch.model_type}: {arch.num_heads} query heads share {arch.num_kv_heads} key/value heads; D-20)")
    session = _Session(run.base.model_folder, [e.path for e in run.experts], level=p["level"],
                       gqa_policy=p["gqa_policy"], readers=[m.reader() for m in [run.base, *run.experts]],
                       device=run.device, batch_size=p["batch_size"], max_length=p["max_length"],
                       model=run.load_model(run.base), tokenizer=run.tokenizer())
    try:
        keys, grams = _module_grams(session, [t.examples for t in run.tasks])
        order = session.partitioner.partition_ids()
    finally:
        session.close()
    if p["level"] == "model":
        run.count(forward=session.counts["module_passes"])
    else:
        run.count(forward=session.counts["base_forwards"])
    tensors = {f"grams.{key}.{pid}": g for pid, by_key in grams.items() for key, g in by_key.items()}
    return Measurements(tensors, stats={"modules": list(grams), "task_keys": keys, "partitions": order,
                                        "module_passes": session.counts["module_passes"],
                                        "base_forwards": session.counts["base_forwards"]})


def _finalize(run: ImportanceRun, measured: Measurements) -> Coefficients:
    p = run.params
    low, high = p["clip_alpha_low"], p["clip_alpha_high"]
    closed = p["nonmodule"] == "closed_form"
    keys = measured.stats["task_keys"]
    modules = [pid for pid in measured.stats["modules"] if closed or pid not in (EMBED, HEAD)]
    grams = {pid: {key: measured.tensors[f"grams.{key}.{pid}"] for key in keys} for pid in modules}
    systems = _solve(keys, grams, balanced=p["balanced"], cond_max=p["cond_max"])
    order = measured.stats["partitions"]
    k = run.k
    lam = float(p["nonmodule_lambda"])
    pids = [pid for pid in order if pid in systems or (not closed and pid in (EMBED, HEAD))]
    raw = torch.full((k, len(pids)), math.nan, dtype=torch.float64)
    cond = torch.full((len(pids),), math.nan, dtype=torch.float64)
    for j, pid in enumerate(pids):
        if pid in systems:
            s = systems[pid]
            assert s.alpha is not None
            raw[:, j] = s.alpha
            cond[j] = s.condition
        else:
            raw[:, j] = lam
    values = raw.clone()
    solved = torch.tensor([pid in systems for pid in pids], dtype=torch.bool)
    if low is not None or high is not None:  # the solved weights only: nonmodule_lambda is the user's own value
        values[:, solved] = raw[:, solved].clamp(min=low, max=high)
    methods: dict[str, int] = {}
    for s in systems.values():
        methods[s.method] = methods.get(s.method, 0) + 1
    stats = {
        "level": p["level"],
        "modules": len(systems),
        "module_passes": measured.stats["module_passes"],
        "base_forwards": measured.stats["base_forwards"],
        "solver": methods,
        "lstsq_modules": [pid for pid, s in systems.items() if s.method == "lstsq"][:50],
        "zero_delta": {pid: [i for i, z in enumerate(s.zero.tolist()) if z]
                       for pid, s in systems.items() if s.zero is not None and bool(s.zero.any())
                       and not bool(s.zero.all())},
        "uncovered_partitions": [pid for pid in order if pid not in pids],
    }
    field_ = CoefficientField(p["level"], pids, values, default=None, gqa_policy=p["gqa_policy"])
    return run.coefficients({"weight": field_}, scores={"alpha_raw": raw, "condition": cond},
                            score_partitions={"alpha_raw": pids, "condition": pids}, stats=stats)


SLTA = register_estimator(Estimator(
    name="slta",
    measure=_measure,
    finalize=_finalize,
    # the modules' per-sample Grams; balanced, cond_max, the clips and nonmodule(_lambda) only build and solve systems
    measure_params=("level", "gqa_policy", "batch_size", "max_length"),
    check_params=_check_clip,
    params=(
        ParamSpec("level", str, "attn_mlp", choices=LEVELS,
                  help="what one module is: model (D-17), layer, attn_mlp (paper's best), head_mlp (D-20)"),
        ParamSpec("balanced", bool, True, help="divide each sample's terms by its mean squared change (Eqs. 33-34)"),
        ParamSpec("nonmodule", str, "closed_form", choices=NONMODULE,
                  help="embeddings and final norm + LM head: own closed-form modules, or a fixed weight (D-18)"),
        ParamSpec("nonmodule_lambda", float, 1.0,
                  help="task-vector weight of the embeddings and the LM head when nonmodule = task_arithmetic"),
        ParamSpec("clip_alpha_low", float, None, help="clip every solved weight from below (off by default; D-22)"),
        ParamSpec("clip_alpha_high", float, None, help="clip every solved weight from above (off by default; D-22)"),
        ParamSpec("gqa_policy", str, None, choices=("group",),
                  help="head level on grouped-query models: one module per key/value group (D-20)"),
        ParamSpec("cond_max", float, 1e12, low=1.0,
                  help="above this condition number the system is solved by least squares (D-22)"),
        ParamSpec("batch_size", int, 8, low=1, help="samples per forward pass"),
        ParamSpec("max_length", int, 512, low=2, help="longest sample in tokens (the prompt's left side is cut)"),
    ),
    summary="closed-form per-module task-arithmetic weights from the experts' output changes on the base's "
            "module inputs (submodule linearity)",
    paper="Dai et al., Leveraging Submodule Linearity Enhances Task Arithmetic, ICLR 2025",
    default_split="calib",
    default_n=30,
))


# ================================================================================================ analysis metrics


@dataclass
class NonlinearityResult:
    """Non-linearity score of one module over the input samples: ``values[x]`` per sample with ``D_N0 > 0``,
    their mean and (population) std; ``skipped``: samples on which the module's output does not change at all."""

    mean: float
    std: float
    values: torch.Tensor
    skipped: int


@dataclass
class ProjectionResult:
    """Linearity of one module under merging weights ``α`` (Eqs. 8, 15–17).

    ``distance = |1 − mean_x <u, v> / ‖v‖²|`` with ``u = f(x; θ_0 + Σ α_t τ_t) − f(x; θ_0)`` and ``v = Σ α_t Δf_t(x)``;
    ``cos_merge = mean_x cos(u, v)``; ``cos_base = mean_x`` of the mean over unordered expert pairs of
    ``cos(Δf_t, Δf_t')`` (D-19; NaN with one expert); ``n_samples``: samples with ``v ≠ 0``.
    """

    distance: float
    mean_ratio: float
    cos_merge: float
    cos_base: float
    n_samples: int


def _flat_samples(t: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Per sample of ``t`` ``[B, T, ...]``: its real tokens' entries, flattened, float64."""
    lengths = mask.to(torch.bool).sum(1).tolist()
    return [t[i, :n].reshape(-1).to(torch.float64).cpu() for i, n in enumerate(lengths)]


def _filter_units(units: list[_Unit], modules: Sequence[str] | None) -> list[_Unit]:
    if modules is None:
        return units
    wanted = set(modules)
    known = {p for u in units for p in u.pids}
    missing = sorted(wanted - known)
    if missing:
        raise ArchitectureError(f"unknown modules {missing[:5]}; known at this level: {sorted(known)[:12]}...")
    return [u for u in units if wanted & set(u.pids)]


@torch.no_grad()
def nonlinearity_score(base: str | Path, expert: str | Path, examples: Sequence[Example], *,
                       level: str = "attn_mlp", modules: Sequence[str] | None = None, n_steps: int = 10,
                       gqa_policy: str | None = None, batch_size: int = 8, max_length: int | None = 512,
                       device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> dict[str, NonlinearityResult]:
    """Non-linearity score (Def. 2, discrete Eq. 19; docs/methods.md §4.5) of each module of one fine-tuned model.

    For every module (partition id of ``level``, or only ``modules``) and every sample ``x`` of ``examples`` (its
    input = the base model's input of that module, as for the estimator): ``θ_s = θ_0 + (s/N)(θ − θ_0)`` on the
    module's tensors, ``s = 0..N`` (``N = n_steps``, paper 10), ``D_ij = ‖f(x; θ_i) − f(x; θ_j)‖`` over the real
    tokens, ``NLS(x) = Σ_ij (D_ij / D_N0 − |i − j| / N)²``. It is 0 for a module that is linear in its weights along the
    path (e.g. the embeddings). At ``level="model"`` the module is the whole network with logits as output.
    Cost: ``(N + 1)`` module forwards per module and batch (plus one base forward per batch for the inputs).
    """
    session = _Session(Path(base), [Path(expert)], level=level, gqa_policy=gqa_policy, device=device,
                       batch_size=batch_size, max_length=max_length)
    try:
        feats = session.capture(examples)
        out: dict[str, NonlinearityResult] = {}
        for unit in _filter_units(session.units(), modules):
            w0, w1 = session.weights(0, unit), session.weights(1, unit)
            inst = session.instance(unit, w0, dtype)
            per: dict[str, list[float]] = {p: [] for p in unit.pids}
            for fb in feats:
                b = fb.to(session.device, dtype)
                path: dict[str, list[list[torch.Tensor]]] = {p: [] for p in unit.pids}
                for s in range(n_steps + 1):
                    t = s / n_steps
                    _load_into(inst, unit, {n: (w0[n].double() + t * (w1[n].double() - w0[n].double()))
                                            for n in unit.tensors})
                    res = unit.apply(inst, b)
                    session.counts["module_passes"] += 1
                    for p in unit.pids:
                        path[p].append(_flat_samples(res[p], b.attention_mask))
                for p in unit.pids:
                    for x in range(len(path[p][0])):
                        per[p].append(nls_of_path(torch.stack([step[x] for step in path[p]])))
            for p in unit.pids:
                vals = torch.tensor(per[p], dtype=torch.float64)
                ok = vals[~torch.isnan(vals)]
                mean = float(ok.mean()) if ok.numel() else math.nan
                std = float(ok.std(correction=0)) if ok.numel() else math.nan
                out[p] = NonlinearityResult(mean, std, ok, int(vals.numel() - ok.numel()))
        return out
    finally:
        session.close()


def _expand64(part: TensorPartition, values: Mapping[str, float], ndim: int) -> torch.Tensor:
    """Like ``TensorPartition.expand`` but in float64 (the metrics compare against exact ``Σ α_t Δf_t``)."""
    if part.axis is None:
        return torch.tensor(values[part.labels[0]], dtype=torch.float64)
    shape = [1] * ndim
    shape[part.axis] = -1
    return torch.tensor([values[lab] for lab in part.labels], dtype=torch.float64).view(shape)


def _alpha_table(alpha: Mapping[str, Sequence[float]] | Sequence[float] | Coefficients, k: int,
                 level: str) -> Callable[[str], list[float]]:
    if isinstance(alpha, Coefficients):
        f = alpha.fields["weight"]
        if f.level != level:
            raise RecipeError(f"coefficients are at level {f.level}, not {level}")
        assert f.values is not None
        table = {p: f.values[:, j].tolist() for j, p in enumerate(f.partitions)}
    elif isinstance(alpha, Mapping):
        table = {p: [float(v) for v in vals] for p, vals in alpha.items()}
    else:
        same = [float(v) for v in alpha]
        if len(same) != k:
            raise ValueError(f"{k} experts but {len(same)} weights")
        return lambda _pid: same

    def get(pid: str) -> list[float]:
        if pid not in table:
            raise ValueError(f"no merging weights for module {pid}")
        if len(table[pid]) != k:
            raise ValueError(f"module {pid}: {k} experts but {len(table[pid])} weights")
        return table[pid]
    return get


@torch.no_grad()
def projection_distance(base: str | Path, experts: Sequence[str | Path], tasks: Sequence[Sequence[Example]],
                        alpha: Mapping[str, Sequence[float]] | Sequence[float] | Coefficients, *,
                        level: str = "attn_mlp", modules: Sequence[str] | None = None,
                        gqa_policy: str | None = None, batch_size: int = 8, max_length: int | None = 512,
                        device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> dict[str, ProjectionResult]:
    """Projection distance (Eq. 8) and cosine metrics (Eqs. 15–17, D-19) of each module for merging weights ``alpha``.

    ``alpha``: one weight per expert for every module, ``{partition id: weights}``, or an ``slta`` Coefficients
    artifact of the same level (rows in the order of ``experts``). Samples of all ``tasks`` are pooled (``E`` over
    the merged tasks' data); each module's input is the base model's input of that module. The merged module is
    ``θ_0 + Σ_t α_t τ_t`` on that module's tensors only. Returns a :class:`ProjectionResult` per module.
    """
    k = len(experts)
    session = _Session(Path(base), [Path(e) for e in experts], level=level, gqa_policy=gqa_policy, device=device,
                       batch_size=batch_size, max_length=max_length)
    try:
        weights_of = _alpha_table(alpha, k, level)
        keys = _task_keys(tasks)
        feats = [fb for key in dict.fromkeys(keys) for fb in session.capture(tasks[key])]
        out: dict[str, ProjectionResult] = {}
        for unit in _filter_units(session.units(), modules):
            w0 = session.weights(0, unit)
            ws = [session.weights(j, unit) for j in range(1, k + 1)]
            alphas = {p: weights_of(p) for p in unit.pids}
            merged = {}
            for name in unit.tensors:
                part = session.partitioner.partition(name)
                acc = w0[name].double().clone()
                for j in range(k):
                    coeff = _expand64(part, {p: alphas[p][j] for p in unit.pids}, acc.dim())
                    acc += coeff * (ws[j][name].double() - w0[name].double())
                merged[name] = acc
            insts = [session.instance(unit, None, dtype)] + [session.instance(unit, w, dtype) for w in ws]
            m_inst = session.instance(unit, merged, dtype)
            del ws, merged
            ratios: dict[str, list[float]] = {p: [] for p in unit.pids}
            cosm: dict[str, list[float]] = {p: [] for p in unit.pids}
            cosb: dict[str, list[float]] = {p: [] for p in unit.pids}
            for fb in feats:
                b = fb.to(session.device, dtype)
                outs = [unit.apply(inst, b) for inst in insts]
                mo = unit.apply(m_inst, b)
                session.counts["module_passes"] += len(insts) + 1
                for p in unit.pids:
                    f0 = outs[0][p].to(torch.float64)
                    deltas = torch.stack([o[p].to(torch.float64) - f0 for o in outs[1:]])
                    a = torch.tensor(alphas[p], dtype=torch.float64, device=deltas.device)
                    v = torch.einsum("k,k...->...", a, deltas)
                    u = mo[p].to(torch.float64) - f0
                    g = sample_grams(torch.stack([u, v]), b.attention_mask)
                    dg = sample_grams(deltas, b.attention_mask) if k > 1 else None
                    for x in range(g.shape[0]):
                        uu, uv, vv = float(g[x, 0, 0]), float(g[x, 0, 1]), float(g[x, 1, 1])
                        if vv > 0:
                            ratios[p].append(uv / vv)
                            if uu > 0:
                                cosm[p].append(uv / math.sqrt(uu * vv))
                        if dg is not None:
                            pair = [float(dg[x, s, t]) / math.sqrt(float(dg[x, s, s] * dg[x, t, t]))
                                    for s in range(k) for t in range(s + 1, k)
                                    if dg[x, s, s] > 0 and dg[x, t, t] > 0]
                            if pair:
                                cosb[p].append(sum(pair) / len(pair))
            for p in unit.pids:
                mean_ratio = float(np.mean(ratios[p])) if ratios[p] else math.nan
                out[p] = ProjectionResult(distance=abs(1.0 - mean_ratio), mean_ratio=mean_ratio,
                                          cos_merge=float(np.mean(cosm[p])) if cosm[p] else math.nan,
                                          cos_base=float(np.mean(cosb[p])) if cosb[p] else math.nan,
                                          n_samples=len(ratios[p]))
        return out
    finally:
        session.close()


@declare_plan("slta")
def plan_costs(inputs: PlanInputs) -> CostPlan:
    """Per distinct task, in batches of ``batch_size``: level ``model`` runs the whole network with the base's and
    every expert's weights (K + 1 recorded forwards per batch); the other levels run the base once to capture every
    module's inputs (the recorded forwards), then every module with the weights of each of the K + 1 models on them
    (not recorded: about K + 1 forwards' worth of blocks, embedding and head; at ``head_mlp`` each head's attention
    and the shared attention module run apart, planned as 1.5 blocks). Planned as if every expert changed every
    module. In memory: the base, the captured features of every task (fp32) and one module per model."""
    p = inputs.params
    arch, k = inputs.arch, inputs.k
    level = p["level"]
    if level == "head_mlp" and arch.gqa and p["gqa_policy"] is None:
        raise ArchitectureError("slta at head level needs importance.parameters.gqa_policy: 'group' for "
                                "grouped-query attention")
    passes = []
    features = 0
    per_token = arch.num_layers * (2 if level in ("attn_mlp", "head_mlp") else 1) + 1
    for task in inputs.distinct():
        shapes = chunks(truncated(task.lengths, p["max_length"]), p["batch_size"])
        if level == "model":
            passes += passes_over("whole model, base weights", "base", shapes)
            passes += passes_over("whole model, expert weights", "expert", shapes, times=k)
            continue
        passes += passes_over("base capture", "base", shapes)
        passes += passes_over("module passes (K + 1 models)", "expert", shapes, times=k + 1, recorded=(0, 0),
                              layers=arch.num_layers * (1.5 if level == "head_mlp" else 1.0))
        features += sum(r * w for r, w in shapes) * arch.hidden_size * 4 * per_token
    memory = {"models (base, fp32)": model_bytes(arch),
              "modules (K + 1, one block each, fp32)": model_bytes(arch, (k + 1) / max(1, arch.num_layers)),
              "activations": largest_activations(arch, passes)}
    if features:
        memory["captured features (fp32)"] = features
    return CostPlan("slta", passes, memory,
                    ["module weights are read from the checkpoints once per module and model (disk time not "
                     "included)"] if level != "model" else [])
