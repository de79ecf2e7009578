"""Fisher merging (docs/methods.md §5.11, D-26): per-entry weights from each expert's diagonal Fisher on its own task.

``θ* = Σ_t λ_t F_t ⊙ θ_t / Σ_t λ_t F_t`` is a weighted average with one weight per entry, so this estimator only
writes an entry-level ``weight`` field and the ordinary ``linear`` kernel merges (recipe: ``merge_method: linear``).

``F_t`` = mean over examples of the squared per-example gradient of ``log p(y | x)`` summed over the answer tokens,
at the expert's own weights, on its own task's examples (rendered in that task's format, D-34). The labels ``y`` are,
by default, one token per answer position drawn from the expert's own next-token distribution (teacher-forced on the
gold text; "sampled" Fisher, seeded), or the gold answer tokens (``fisher: empirical``). Per-example gradients come
from ``torch.func.vmap(grad(...))`` over chunks of ``batch_size`` examples (one backward per example when
``batch_size`` is 1, or when vmap cannot trace the model); squares are accumulated on the fly, so memory is one Fisher
buffer plus ``batch_size`` gradients.

Written weight per entry: ``λ_t · c_t · (F_t + minimal_fisher_weight)`` with ``λ_t = 1/K`` (it cancels in the
ratio) and ``c_t = 1`` — or, with ``normalize``, ``c_t ∝ 1 / ‖F_t‖₂`` (MergeLM's per-model global-norm
normalisation, the c_t summing to 1). Tensors without a gradient (floating buffers) get no weight: the recipe's
weight applies there (uniform by default), i.e. they are averaged.

Two stages: the Fisher diagonals are measured (each written to the cached measurements as soon as it is computed, so
one expert's Fisher is in memory at a time) and ``minimal_fisher_weight`` and ``normalize`` are applied afterwards,
one expert at a time while the artifact is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.func import functional_call, grad, vmap

from mergeflow.coefficients import CoefficientField, Coefficients
from mergeflow.errors import MergeflowError
from mergeflow.importance.base import (
    WHOLE,
    Estimator,
    ImportanceRun,
    LazyEntries,
    Measurements,
    MeasurePart,
    register_estimator,
)
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
from mergeflow.importance.scoring import Encoded, batches, encode
from mergeflow.methods.base import ParamSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel

FISHER_KINDS = ("sampled", "empirical")


def label_seed(seed: int, content_hash: str) -> int:
    """The seed of an expert's sampled labels: from the run's seed and the expert's content, not its position."""
    digest = hashlib.sha256(f"{seed}\x00fisher\x00{content_hash}".encode()).digest()
    return struct.unpack("<q", digest[:8])[0] & ((1 << 63) - 1)


def sample_targets(model: PreTrainedModel, enc: Encoded, generator: torch.Generator, *, batch_size: int = 8,
                   on_batch: Callable[[], None] | None = None) -> torch.Tensor:
    """One label per answer position drawn from the model's next-token distribution: ``[N, T-1]`` (0 elsewhere).

    Inputs are the gold text (teacher forcing). Draws are by inverse CDF (float64) from uniforms of the CPU
    ``generator``, example by example and position by position, so they depend neither on the batching nor on the
    device the model runs on.
    """
    targets = torch.zeros_like(enc.targets)
    with torch.no_grad():
        for start, b in batches(enc, batch_size):
            dev = b.to(model.device)
            logits = model(input_ids=dev.input_ids, attention_mask=dev.attention_mask, use_cache=False).logits
            if on_batch is not None:
                on_batch()
            for i in range(len(b)):
                mask = b.answer_mask[i]
                probs = torch.softmax(logits[i, :-1][mask.to(logits.device)].float(), dim=-1).double().cpu()
                cdf = probs.cumsum(-1)
                u = torch.rand(probs.shape[0], generator=generator, dtype=torch.float64) * cdf[:, -1]
                labels = torch.searchsorted(cdf, u.unsqueeze(-1), right=True).squeeze(-1)
                row = targets[start + i, :mask.shape[0]]
                row[mask] = labels.clamp(max=probs.shape[-1] - 1)
    return targets


def _example_logprob(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over marked positions of log p(target): logits ``[T, V]`` (already shifted), targets/mask ``[T]``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return (logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask).sum()


def fisher_diagonal(model: PreTrainedModel, enc: Encoded, targets: torch.Tensor, *, batch_size: int = 8,
                    on_batch: Callable[[int], None] | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Mean over examples of the squared gradient of Σ_answer log p(target), per parameter (fp32).

    Returns ``({parameter name: F}, how)`` with ``how`` "vmap" or "loop". Parameter names are those of
    ``model.named_parameters()`` (tied parameters once). Sequences are right-padded and the models causal, so the
    real positions never see the padding: the per-example function runs without an attention mask.
    ``on_batch(n)`` is called after each chunk with the number of backward passes it took.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
    how = "loop" if batch_size == 1 else "vmap"
    per_example = _vmapped_grad(model) if how == "vmap" else None
    with _attention("eager" if per_example is not None else None, model):
        how = _accumulate(model, enc, targets, named, acc, per_example, batch_size, on_batch)
    for t in acc.values():
        t.div_(len(enc))
    return acc, how


@contextlib.contextmanager
def _attention(implementation: str | None, model: PreTrainedModel) -> Iterator[None]:
    """Eager attention while vmapping (it has batching rules everywhere; fused SDPA kernels fall back to a slow
    per-example loop), the model's own afterwards."""
    old = getattr(model.config, "_attn_implementation", None)
    if implementation is None or old == implementation or not hasattr(model, "set_attn_implementation"):
        yield
        return
    try:
        model.set_attn_implementation(implementation)
    except (ValueError, ImportError):
        yield
        return
    try:
        yield
    finally:
        model.set_attn_implementation(old)


def _accumulate(model: PreTrainedModel, enc: Encoded, targets: torch.Tensor,
                named: list[tuple[str, torch.nn.Parameter]], acc: dict[str, torch.Tensor],
                per_example: Callable[..., dict[str, torch.Tensor]] | None, batch_size: int,
                on_batch: Callable[[int], None] | None) -> str:
    names = [n for n, _ in named]
    how = "loop" if per_example is None else "vmap"
    for start, b in batches(enc, batch_size):
        b = b.to(model.device)
        tgt = targets[start:start + len(b), :b.answer_mask.shape[1]].to(model.device)
        mask = b.answer_mask.to(torch.float32)
        if per_example is not None:
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*batching rule.*")
                    grads = per_example({n: p.detach() for n, p in named}, b.input_ids, tgt, mask)
            except (RuntimeError, NotImplementedError) as exc:  # a model vmap cannot trace: one backward per example
                warnings.warn(f"fisher: per-example gradients by vmap failed ({exc}); using one backward per "
                              "example", RuntimeWarning, stacklevel=2)
                per_example, how = None, "loop"
            else:
                for n in names:
                    acc[n].add_(grads[n].float().square().sum(0))
                del grads
                if on_batch is not None:
                    on_batch(1)
                continue
        params = [p.requires_grad_(True) for _, p in named]
        with torch.enable_grad():
            for i in range(len(b)):
                length = int(b.lengths[i])
                logits = model(input_ids=b.input_ids[i:i + 1, :length], use_cache=False).logits[0, :-1]
                value = _example_logprob(logits, tgt[i, :length - 1], mask[i, :length - 1])
                grads = torch.autograd.grad(value, params, allow_unused=True)
                for n, g in zip(names, grads):
                    if g is not None:
                        acc[n].add_(g.float().square())
        if on_batch is not None:
            on_batch(len(b))
    return how


def _vmapped_grad(model: PreTrainedModel) -> Callable[..., dict[str, torch.Tensor]]:
    buffers = dict(model.named_buffers())

    def logprob(params: dict[str, torch.Tensor], ids: torch.Tensor, targets: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (params, buffers), (ids.unsqueeze(0),), {"use_cache": False})
        return _example_logprob(out.logits[0, :-1], targets, mask)

    return vmap(grad(logprob), in_dims=(None, 0, 0, 0))


def state_dict_tensors(model: PreTrainedModel, per_param: dict[str, torch.Tensor],
                       binding: Binding | None = None) -> dict[str, torch.Tensor]:
    """Per-parameter tensors keyed by every state-dict name of their parameter (tied names get private copies).

    With the ``binding`` of the model to its checkpoint, they are keyed by checkpoint name instead where the two
    differ: a checkpoint tensor held in a slice of a fused parameter (MoE experts, D-37) gets that slice, and a
    fused or renamed parameter's own name, which no checkpoint tensor has, is left out."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        pname = by_id.get(id(tensor))
        if pname is None or pname not in per_param:
            continue  # buffers: no gradient, no weight (the recipe's uniform weight applies)
        value = per_param[pname]
        out[name] = value.clone() if pname in used else value
        used.add(pname)
    if binding is None:
        return out
    aliases = {n: per_param[by_id[id(p)]] for n, p in model.named_parameters(remove_duplicate=False)
               if by_id.get(id(p)) in per_param}
    for name, value in binding.to_checkpoint(aliases).items():
        out.setdefault(name, value)
    for pname, held in binding.held.items():
        if pname not in held:  # a fused or renamed parameter: its checkpoint names carry it
            out.pop(pname, None)
    return out


def _measure(run: ImportanceRun) -> Measurements:
    """Each expert's Fisher diagonal, written to the measurements as soon as it is computed (entry ``fisher``)."""
    p = run.params
    per_expert: list[dict[str, Any]] = []
    for i, (ref, task) in enumerate(zip(run.experts, run.tasks)):
        model = run.load_model(ref)
        enc = encode(run.tokenizer(ref), task.examples, max_length=p["max_length"])
        if p["fisher"] == "sampled":
            gen = torch.Generator().manual_seed(label_seed(run.seed, ref.content_hash))
            targets = sample_targets(model, enc, gen, batch_size=p["batch_size"],
                                     on_batch=lambda: run.count(forward=1))
        else:
            targets = enc.targets
        diag, how = fisher_diagonal(model, enc, targets, batch_size=p["batch_size"],
                                    on_batch=lambda n: run.count(forward=n, backward=n))
        binding = binding_for(model, ref.model_folder, content_key=ref.content_hash)
        fisher = {n: t.cpu() for n, t in state_dict_tensors(model, diag, binding).items()}
        del model, diag
        bad = [n for n, t in fisher.items() if not torch.isfinite(t).all()]
        if bad:
            raise MergeflowError(f"fisher: non-finite Fisher for expert {ref.reference} (tensor {bad[0]}); "
                                 "check the model and its task data")
        total = sum(float(t.double().sum()) for t in fisher.values())
        norm = sum(float(t.double().square().sum()) for t in fisher.values()) ** 0.5
        run.write_entry("fisher", i, fisher)
        per_expert.append({"reference": ref.reference, "task": task.task, "examples": len(task),
                           "answer_tokens": int(enc.answer_mask.sum()), "fisher_l2": norm,
                           "fisher_mean": total / max(1, sum(t.numel() for t in fisher.values())),
                           "per_example_gradients": how})
        del fisher
    return Measurements(stats={"experts": per_expert})


def _finalize(run: ImportanceRun, measured: Measurements) -> Coefficients:
    p = run.params
    per_expert = measured.stats["experts"]
    eps = p["minimal_fisher_weight"]
    scale = [1.0 / run.k] * run.k  # λ_t = 1/K
    if p["normalize"]:
        inv = [1.0 / (e["fisher_l2"] + eps) for e in per_expert]
        scale = [s * i / sum(inv) for s, i in zip(scale, inv)]

    def weights(i: int) -> dict[str, torch.Tensor]:  # one expert at a time, as the artifact is saved
        return {n: (t + eps).mul_(scale[i]) for n, t in measured.entry("fisher", i)}

    out = run.coefficients({"weight": CoefficientField("entry")},
                           stats={"experts": per_expert, "model_scale": scale})
    out.entry_tensors = {"weight": LazyEntries(run.k, weights)}  # type: ignore[dict-item]
    return out


FISHER = register_estimator(Estimator(
    name="fisher",
    measure=_measure,
    finalize=_finalize,
    # the Fisher diagonals; minimal_fisher_weight and normalize only scale them
    measure_params=("fisher", "batch_size", "max_length"),
    # one expert's diagonal depends on that expert and its task only: measured (and cached) expert by expert
    measure_parts=(MeasurePart(WHOLE, ("fisher", "batch_size", "max_length"), by_expert=True,
                               expert_stats=("experts",)),),
    params=(
        ParamSpec("fisher", str, "sampled", choices=FISHER_KINDS,
                  help="labels: sampled from the expert's own distribution (seeded) or the gold answer (empirical)"),
        ParamSpec("minimal_fisher_weight", float, 1e-6, low=0.0,
                  help="added to every Fisher entry (entries no example moves are then averaged)"),
        ParamSpec("normalize", bool, False, help="divide each expert's Fisher by its global L2 norm"),
        ParamSpec("batch_size", int, 8, low=1,
                  help="examples per vmap chunk (holds this many per-example gradients); 1: one backward each"),
        ParamSpec("max_length", int, 1024, low=2, help="tokens per example (the prompt is cut on the left)"),
    ),
    summary="diagonal Fisher of each expert on its own task → per-entry weights of a weighted average (linear)",
    paper="Matena & Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022 (arXiv:2111.09832)",
    needs_base=False,
    default_split="calib",
    default_n=128,
    own_tokenizers=True,
))


@declare_plan("fisher")
def plan_costs(inputs: PlanInputs) -> CostPlan:
    """Per expert on its own task: sampled labels (one forward per batch, ``fisher: sampled``), then per-example
    gradients — a vmapped chunk of ``batch_size`` examples is one recorded forward + backward; with ``batch_size``
    1, one forward + backward per example at its own length. In memory: the expert, its Fisher diagonal and the
    chunk's per-example gradients."""
    p = inputs.params
    bs = p["batch_size"]
    passes = []
    for task in inputs.tasks:
        lengths = truncated(task.lengths, p["max_length"])
        shapes = chunks(lengths, bs)
        if p["fisher"] == "sampled":
            passes += passes_over("sampled labels", "expert", shapes)
        per_example = [(1, n) for n in lengths] if bs == 1 else shapes
        passes += passes_over("per-example gradients", "expert", per_example, backward=True, recorded=(1, 1))
    model = model_bytes(inputs.arch)
    return CostPlan("fisher", passes, {
        "models (1, fp32)": model, "Fisher diagonal (fp32)": model,
        "per-example gradients (batch_size, fp32)": model * (bs if bs > 1 else 1),
        "activations": largest_activations(inputs.arch, passes)},
        notes=["vmapped chunks also run with eager attention; a model vmap cannot trace falls back to one "
               "backward per example (more recorded passes than planned)"] if bs > 1 else [])
