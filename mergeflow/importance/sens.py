"""Sens-Merging: one task-vector weight per (expert, layer) from sensitivities and logit distances (docs/methods.md §3).

Liu et al., "Sens-Merging: Sensitivity-Guided Parameter Balancing for Merging Large Language Models" (arXiv
2502.12420, ACL 2025 Findings). No official code exists; the decisions below are docs/methods.md D-2, D-6, D-7, D-12–D-16
and D-28–D-30.

* **Task-specific factor** α (Eqs. 1–3): on each of expert i's own calibration examples, the gradient of the
  answer-token LM loss at the expert (D-28), ``Σ_entries |θ_i ⊙ ∇L(x_k; θ_i)|`` per layer with the absolute value
  taken per sample (D-6; full fine-tuned weights unless ``use_delta``, D-29), summed over samples, then
  L2-normalised over the expert's layers. Per-sample gradients come from ``torch.func`` (``vmap`` of ``grad`` over
  a chunk of ``batch_size`` examples, one forward/backward per chunk) and are reduced to the per-layer vector inside
  the vmapped function, so no gradient outlives its chunk; ``batch_size = 1`` (or a model ``vmap`` cannot trace)
  takes one backward pass per sample instead. Memory: a chunk holds ``batch_size`` gradients of the model.
* **Cross-task factor** τ (Eqs. 4–5): ``g_{i,j}`` = mean over task j's calibration examples of the distance between
  expert i's and expert j's logits on the full teacher-forced text (D-13: per-token L2 over the common vocabulary
  prefix, mean over non-pad positions; or the Frobenius norm of the sample's logit matrix), ``τ_i = Σ_{j≠i} g_{i,j}``
  (or ``Σ 1/g``, ``cross_task = "inverse"``, D-14), L1-normalised over experts.
* **Coefficients** (Eqs. 6–7): ``σ_i^l = softmax_i(τ_i α_i^l / T)`` over experts per layer (D-30; ``relative`` mode
  divides the products by their mean and uses T = 1, D-16), and the ``weight`` field ``c_i^l = λ·K·σ_i^l``.
  Embeddings and the final norm + LM head are groups of their own (``nonblock = "own"``) or get σ = 1/K, i.e.
  ``c = λ`` (``nonblock = "uniform"``, D-2).

All-zero guards (D-7): an expert whose layer sensitivities are all zero gets α = 1/√L; all distances zero gives
τ = 1/K. The ablations of Table 4 set τ := 1 (``task_specific``) or α := 1 (``cross_task``), keeping softmax and K.

Two stages: the sensitivities (of every layer group, embeddings and head included) and the distances are measured
and cached as two parts, each only when the ablation needs it; every other parameter (temperature, mode, λ,
``cross_task``, ``nonblock``, the ablation itself) is applied afterwards without a model pass.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from mergeflow.architecture import Architecture
from mergeflow.coefficients import CoefficientField, Coefficients
from mergeflow.errors import MergeflowError
from mergeflow.importance.base import Estimator, ImportanceRun, Measurements, MeasurePart, register_estimator
from mergeflow.importance.binding import Binding, binding_for
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
from mergeflow.importance.scoring import Encoded, batches, encode, lm_loss
from mergeflow.methods.base import ParamSpec
from mergeflow.partitions import Partitioner, is_block_partition

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Reference logits of one task (expert j on task j) are kept between the K-1 comparisons when they fit in this many
# bytes; otherwise they are recomputed for every comparison (two models in memory either way).
REFERENCE_CACHE_BYTES = 1 << 30
_TINY = 1e-12  # floor of a distance in the inverse mode (a zero distance means "identical": the largest weight)

PARAMS = (
    ParamSpec("temperature", float, 0.05, low=0.0, low_open=True,
              help="softmax temperature over experts (absolute mode); D-16 grid 0.01–1"),
    ParamSpec("temperature_mode", str, "absolute", choices=("absolute", "relative"),
              help="absolute: softmax(τα/T); relative: softmax(τα/mean(τα)) (T = 1, scale-free in K and L)"),
    ParamSpec("cross_task", str, "distance", choices=("distance", "inverse"),
              help="τ_i ∝ Σ_j g_ij (the equations) or Σ_j 1/g_ij (the prose's 'closer transfers better')"),
    ParamSpec("ablation", str, "both", choices=("both", "task_specific", "cross_task"),
              help="task_specific: τ := 1; cross_task: α := 1 (Table 4)"),
    ParamSpec("use_delta", bool, False, help="sensitivity |Δ ⊙ ∇L| instead of the paper's |θ ⊙ ∇L| (D-29)"),
    ParamSpec("nonblock", str, "own", choices=("own", "uniform"),
              help="embeddings and final norm + LM head: groups of their own, or σ = 1/K (plain λ) (D-2)"),
    ParamSpec("logit_reduction", str, "token_l2", choices=("token_l2", "frobenius"),
              help="logit distance: per-token L2 averaged over positions, or the whole matrix's norm (D-13)"),
    ParamSpec("lambda", float, 1.0, help="the baseline's scale λ: c = λ·K·σ (TA 1.0, DARE 0.5)"),
    ParamSpec("batch_size", int, 8, low=1,
              help="examples per forward pass; per-sample gradients of this many examples at once (1: a loop)"),
    ParamSpec("max_length", int, 2048, low=2, help="tokens per example (the prompt is cut on the left)"),
)


class _Functional:
    """A model called with other parameter tensors (``torch.func.functional_call``), for the shared scorers."""

    def __init__(self, model: PreTrainedModel, params: dict[str, torch.Tensor]) -> None:
        self.model, self.params = model, params

    def __call__(self, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.model, self.params, (), kwargs)


class _Slot:
    """The one expert model kept between steps, so that consecutive steps on the same expert load it once."""

    def __init__(self, run: ImportanceRun) -> None:
        self.run = run
        self.index: int | None = None
        self.model: PreTrainedModel | None = None

    def get(self, i: int) -> PreTrainedModel:
        if self.index != i or self.model is None:
            self.model = None   # free the previous model before loading the next
            self.model = self.run.load_model(self.run.experts[i])
            self.index = i
        return self.model

    def first(self, order: range) -> list[int]:
        """``order`` with the loaded expert moved to the front."""
        return sorted(order, key=lambda i: i != self.index)

    def release(self) -> None:
        self.model, self.index = None, None


# --------------------------------------------------------------------------------------------- layer groups


def _checkpoint_name(param: str, known: dict[str, Any]) -> str:
    """The checkpoint tensor a model parameter is stored as (identical for most models; GPT-2 style checkpoints
    may lack the ``transformer.`` prefix)."""
    if param in known:
        return param
    hits = [n for n in known if param.endswith("." + n) or n.endswith("." + param)]
    if len(hits) == 1:
        return hits[0]
    raise MergeflowError(f"sens: parameter {param} has no unique tensor in the checkpoint")


def _group_members(model: PreTrainedModel, arch: Architecture, partitioner: Partitioner,
                   groups: list[str], binding: Binding) -> list[list[str]]:
    """Model parameter names in each group (a tied parameter counts once, in the group of its stored name). A
    parameter holding several checkpoint tensors (fused MoE experts, D-37) holds them from one block: one group."""
    position = {g: j for j, g in enumerate(groups)}
    members: list[list[str]] = [[] for _ in groups]
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    for name, param in model.named_parameters():
        if not param.dtype.is_floating_point:
            continue
        # its own name's tensors first: a tied parameter stored under both names stays in its stored name's group
        held = binding.checkpoint_names(name) or [c for alias in aliases[id(param)]
                                                  for c in binding.checkpoint_names(alias)]
        if not held:
            held = [_checkpoint_name(name, arch.tensors)]
        labels = {partitioner.partition(c).labels[0] for c in held}
        if len(labels) != 1:
            raise MergeflowError(f"sens: parameter {name} holds checkpoint tensors of several layer groups "
                                 f"({', '.join(sorted(labels))})")
        label = labels.pop()
        if label in position:
            members[position[label]].append(name)
    return members


# ------------------------------------------------------------------------------------- task-specific factor


def _per_sample_fn(model: PreTrainedModel, fixed: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
                   members: list[list[str]]) -> Callable[..., torch.Tensor]:
    """f(params, one example's tensors) → [L] per-group Σ|w ⊙ ∇L|: the gradient is reduced where it is made."""

    def loss(params: dict[str, torch.Tensor], ids: torch.Tensor, attention: torch.Tensor, answer: torch.Tensor,
             targets: torch.Tensor) -> torch.Tensor:
        enc = Encoded(ids.unsqueeze(0), attention.unsqueeze(0), answer.unsqueeze(0), targets.unsqueeze(0),
                      attention.sum().unsqueeze(0))
        return lm_loss(_Functional(model, {**fixed, **params}), enc)[0]

    gradient = torch.func.grad(loss)

    def per_sample(params: dict[str, torch.Tensor], ids: torch.Tensor, attention: torch.Tensor,
                   answer: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        g = gradient(params, ids, attention, answer, targets)
        sums = []
        for names in members:
            total = ids.new_zeros((), dtype=torch.float32)
            for n in names:
                total = total + (weights[n] * g[n]).abs().sum()
            sums.append(total)
        return torch.stack(sums)

    return per_sample


def _sensitivity(run: ImportanceRun, slot: _Slot, i: int, arch: Architecture, partitioner: Partitioner,
                 groups: list[str], base_params: dict[str, torch.Tensor] | None,
                 notes: list[str]) -> tuple[torch.Tensor, str]:
    """Expert i's per-group sensitivities s_i (float64, [L]) and how the per-sample gradients were taken."""
    p = run.params
    model = slot.get(i)
    model.requires_grad_(False)
    attention_impl = getattr(model.config, "_attn_implementation", None)
    members = _group_members(model, arch, partitioner, groups,
                             binding_for(model, run.experts[i].model_folder, arch, content_key=run.experts[i].content_hash))
    used = [n for names in members for n in names]
    all_params = {n: t.detach() for n, t in model.named_parameters()}
    params = {n: all_params[n] for n in used}
    fixed = {n: t for n, t in all_params.items() if n not in params}
    weights = params if base_params is None else {n: params[n] - base_params[n] for n in used}
    per_sample = _per_sample_fn(model, fixed, weights, members)
    enc = encode(run.tokenizer(), run.tasks[i].examples, max_length=p["max_length"])
    how = "vmap" if p["batch_size"] > 1 and len(enc) > 1 else "loop"
    if how == "vmap":
        # eager attention has batching rules for every op; SDPA's fused kernels fall back to a slow loop
        with contextlib.suppress(AttributeError, ValueError, ImportError):
            model.set_attn_implementation("eager")
    total = torch.zeros(len(groups), dtype=torch.float64)
    start = 0
    while start < len(enc):
        stop = min(len(enc), start + (p["batch_size"] if how == "vmap" else 1))
        b = enc.rows(start, stop).to(run.device)
        rows = (b.input_ids, b.attention_mask, b.answer_mask, b.targets)
        if how == "vmap":
            try:
                part = torch.func.vmap(per_sample, in_dims=(None, 0, 0, 0, 0))(params, *rows).sum(0)
            except Exception as exc:  # a model vmap cannot trace (or a chunk too big): one sample at a time
                how = "loop"
                notes.append(f"expert {run.experts[i].reference}: vmap failed ({type(exc).__name__}: {str(exc)[:200]}); one backward "
                             "pass per sample")
                continue
        else:
            part = per_sample(params, *(t[0] for t in rows))
        run.count(forward=1, backward=1)
        total += part.detach().double().cpu()
        start = stop
    if attention_impl is not None and getattr(model.config, "_attn_implementation", None) != attention_impl:
        with contextlib.suppress(AttributeError, ValueError, ImportError):
            model.set_attn_implementation(attention_impl)
    return total, how


def _l2_rows(s: torch.Tensor) -> torch.Tensor:
    """α: each row over its unit L2 norm; an all-zero row gets 1/√L (D-7)."""
    norms = s.norm(dim=1, keepdim=True)
    uniform = torch.full_like(s, 1.0 / math.sqrt(s.shape[1]))
    return torch.where(norms > 0, s / norms.clamp(min=torch.finfo(s.dtype).tiny), uniform)


# ---------------------------------------------------------------------------------------- cross-task factor


def _logits(run: ImportanceRun, model: PreTrainedModel, b: Encoded) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits.float()
    run.count(forward=1)
    return out


def logit_distance(a: torch.Tensor, b: torch.Tensor, attention: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-example distance between two [B, T, V] logit tensors over the real positions, on the common vocabulary."""
    v = min(a.shape[-1], b.shape[-1])
    diff = a[..., :v].double() - b[..., :v].double()
    mask = attention.to(diff.dtype)
    if reduction == "token_l2":
        return (diff.norm(dim=-1) * mask).sum(1) / mask.sum(1).clamp(min=1)
    return ((diff.square().sum(-1) * mask).sum(1)).sqrt()


def _vocab_size(model: PreTrainedModel) -> int:
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def _cross_task_distances(run: ImportanceRun, slot: _Slot) -> torch.Tensor:
    """g[i, j]: mean distance between expert i's and expert j's logits on task j's examples ([K, K] float64).

    When every task's reference logits (expert j on task j) fit in ``REFERENCE_CACHE_BYTES`` they are computed
    once and each expert is then loaded once more to be compared on the other tasks (about 2K loads); otherwise
    each pair runs with both models in memory, recomputing the reference (K² loads)."""
    p = run.params
    k = run.k
    g = torch.zeros((k, k), dtype=torch.float64)
    if k == 1:
        return g
    tok = run.tokenizer()
    encoded = [encode(tok, t.examples, max_length=p["max_length"], answer_only=False) for t in run.tasks]
    chunks = [[b for _, b in batches(enc, p["batch_size"])] for enc in encoded]
    vocab = _vocab_size(slot.get(slot.first(range(k))[0]))
    size = sum(b.input_ids.numel() for task in chunks for b in task) * vocab * 4

    def distances(model: PreTrainedModel, j: int, reference: Callable[[int, Encoded], torch.Tensor]) -> float:
        total = 0.0
        for c, b in enumerate(chunks[j]):
            b = b.to(run.device)
            total += float(logit_distance(_logits(run, model, b), reference(c, b), b.attention_mask,
                                          p["logit_reduction"]).sum())
        return total / len(encoded[j])

    if size <= REFERENCE_CACHE_BYTES:
        cached: dict[int, list[torch.Tensor]] = {}
        for j in slot.first(range(k)):
            model = slot.get(j)
            cached[j] = [_logits(run, model, b.to(run.device)).cpu() for b in chunks[j]]
        for i in slot.first(range(k)):
            model = slot.get(i)
            for j in range(k):
                if j != i:
                    g[i, j] = distances(model, j, lambda c, b, j=j: cached[j][c].to(run.device))
        return g
    for j in slot.first(range(k)):
        model_j = slot.get(j)
        for i in range(k):
            if i != j:
                other = run.load_model(run.experts[i])
                g[i, j] = distances(other, j, lambda c, b, m=model_j: _logits(run, m, b))
                del other
    return g


def _tau(g: torch.Tensor, mode: str) -> torch.Tensor:
    """τ_i = Σ_{j≠i} g_ij (or 1/g_ij), L1-normalised; all distances zero → 1/K (D-7)."""
    k = g.shape[0]
    off = ~torch.eye(k, dtype=torch.bool)
    if k == 1 or not bool((g[off] != 0).any()):
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    values = 1.0 / g.clamp(min=_TINY) if mode == "inverse" else g
    tau = (values * off).sum(1)
    return tau / tau.abs().sum()


# -------------------------------------------------------------------------------------------- coefficients


def sens_sigma(tau: torch.Tensor, alpha: torch.Tensor, temperature: float, mode: str) -> tuple[torch.Tensor, float]:
    """σ [K, L] = softmax over experts of τ_i·α_i^l per layer, and the temperature applied to the raw products."""
    products = tau.double()[:, None] * alpha.double()
    if mode == "relative":
        mean = float(products.mean())
        if mean <= 0:
            return torch.full_like(products, 1.0 / products.shape[0]), math.inf
        return torch.softmax(products / mean, dim=0), mean
    return torch.softmax(products / temperature, dim=0), temperature


def _layer_groups(run: ImportanceRun) -> tuple[Architecture, Partitioner, list[str]]:
    arch = Architecture.from_folder((run.base or run.experts[0]).model_folder)
    partitioner = Partitioner(arch, "layer")
    return arch, partitioner, partitioner.partition_ids()


def _measure(run: ImportanceRun) -> Measurements:
    """Part ``sensitivity``: every expert's sensitivity in every layer group (embeddings and head included, whatever
    ``nonblock``); part ``distance``: the cross-task logit distances."""
    p = run.params
    slot = _Slot(run)
    if run.part == "distance":
        distance = _cross_task_distances(run, slot)
        slot.release()
        return Measurements({"cross_task_distance": distance})
    arch, partitioner, groups = _layer_groups(run)
    base_params = None
    if p["use_delta"]:
        if run.base is None:
            raise MergeflowError("sens: use_delta needs a base model")
        base_model = run.load_model(run.base, keep=True)  # read once for all the run's shards
        base_params = {n: t.detach() for n, t in base_model.named_parameters()}
        del base_model
    rows, hows, notes = [], [], []
    for i in range(run.k):
        s, how = _sensitivity(run, slot, i, arch, partitioner, groups, base_params, notes)
        rows.append(s)
        hows.append(how)
    slot.release()
    return Measurements({"sensitivity": torch.stack(rows)},
                        stats={"groups": groups, "per_sample_gradients": hows, "notes": notes})


def _finalize(run: ImportanceRun, measured: Measurements) -> Coefficients:
    p = run.params
    k = run.k
    _, _, ids = _layer_groups(run)
    groups = ids if p["nonblock"] == "own" else [g for g in ids if is_block_partition(g)]
    scores: dict[str, torch.Tensor] = {}
    score_partitions: dict[str, list[str]] = {}
    stats: dict[str, Any] = {}

    if p["ablation"] != "cross_task":
        measured_groups = measured.stats["groups"]
        sensitivity = measured.tensors["sensitivity"][:, [measured_groups.index(g) for g in groups]]
        alpha = _l2_rows(sensitivity)
        scores["sensitivity"] = sensitivity
        score_partitions["sensitivity"] = list(groups)
        if measured.stats["notes"]:
            stats["notes"] = measured.stats["notes"]
        stats["per_sample_gradients"] = measured.stats["per_sample_gradients"]
    else:
        alpha = torch.ones((k, len(groups)), dtype=torch.float64)

    if p["ablation"] != "task_specific":
        distance = measured.tensors["cross_task_distance"]
        tau = _tau(distance, p["cross_task"])
        scores["cross_task_distance"] = distance
        score_partitions["cross_task_distance"] = [f"task_of_expert.{j}" for j in range(k)]
    else:
        tau = torch.ones(k, dtype=torch.float64)

    sigma, temperature = sens_sigma(tau, alpha, p["temperature"], p["temperature_mode"])
    weight = p["lambda"] * k * sigma
    scores.update(alpha=alpha, tau=tau[:, None], sigma=sigma)
    score_partitions.update(alpha=list(groups), tau=["tau"], sigma=list(groups))
    stats["temperature_applied"] = temperature
    # Tensors in no listed group (embeddings and head with nonblock="uniform") get σ = 1/K, i.e. c = λ.
    field = CoefficientField("layer", list(groups), weight, default=[p["lambda"]] * k)
    return run.coefficients({"weight": field}, scores=scores, score_partitions=score_partitions, stats=stats)


SENS = register_estimator(Estimator(
    name="sens",
    measure=_measure,
    finalize=_finalize,
    # sensitivities and distances are measured (and cached) apart: an ablation needs one of them; temperature,
    # temperature_mode, cross_task, ablation, lambda and nonblock only combine them
    measure_params=("use_delta", "logit_reduction", "batch_size", "max_length"),
    # an expert's sensitivities need only it (and the base) on its own task: measured expert by expert; the
    # distances compare every expert on every task, one part
    measure_parts=(MeasurePart("sensitivity", ("use_delta", "batch_size", "max_length"),
                               lambda p: p["ablation"] != "cross_task", by_expert=True,
                               expert_stats=("per_sample_gradients",), summed_stats=("notes",)),
                   MeasurePart("distance", ("logit_reduction", "batch_size", "max_length"),
                               lambda p: p["ablation"] != "task_specific")),
    params=PARAMS,
    summary="per-(expert, layer) task-vector weights λ·K·softmax(τ·α/T): layer sensitivities |θ⊙∇L| on each "
            "expert's task times cross-task logit distances",
    paper="Liu et al., Sens-Merging, ACL 2025 Findings (arXiv:2502.12420)",
    needs_base=True,
    default_split="calib",
    default_n=100,
    supports_ood=False,
))


@declare_plan("sens")
def plan_costs(inputs: PlanInputs) -> CostPlan:
    """Part ``sensitivity``: per expert on its own task, one recorded forward + backward per vmapped chunk of
    ``batch_size`` examples (per example when ``batch_size`` is 1 or the task has one example). Part ``distance``
    (K > 1): every task j's batches through every expert; when all reference logits fit in
    ``REFERENCE_CACHE_BYTES`` expert j's are computed once (K forwards per batch), else recomputed for every pair
    (2(K − 1) forwards per batch, two models in memory)."""
    p = inputs.params
    arch, k, bs = inputs.arch, inputs.k, p["batch_size"]
    passes = []
    model = model_bytes(arch)
    memory = {"models (fp32)": model}
    notes = []
    if p["ablation"] != "cross_task":
        for task in inputs.tasks:
            lengths = truncated(task.lengths, p["max_length"])
            step = bs if bs > 1 and len(lengths) > 1 else 1
            passes += passes_over("sensitivity (per-example gradients)", "expert", chunks(lengths, step),
                                  backward=True, recorded=(1, 1))
        memory["per-example gradients (batch_size, fp32)"] = bs * model
        if p["use_delta"]:
            memory["models (fp32)"] += model  # the base's tensors, for Δ
        notes.append("a model vmap cannot trace falls back to one backward per example (more passes than planned)")
    if p["ablation"] != "task_specific" and k > 1:
        per_task = [chunks(truncated(t.lengths, p["max_length"]), bs) for t in inputs.tasks]
        size = sum(r * w for shapes in per_task for r, w in shapes) * arch.vocab_size * 4
        cached = size <= REFERENCE_CACHE_BYTES
        for shapes in per_task:
            passes += passes_over("cross-task logits", "expert", shapes, times=k if cached else 2 * (k - 1))
        if cached:
            memory["reference logits (fp32)"] = size
        else:
            memory["models (fp32)"] = max(memory["models (fp32)"], 2 * model)
    memory["activations"] = largest_activations(arch, passes)
    return CostPlan("sens", passes, memory, notes)
