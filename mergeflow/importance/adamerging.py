"""AdaMerging: merging coefficients learned by gradient descent through the merged model.

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024 (arXiv:2310.02575); FusionBench
ships it, and mergekit users ask for it (arcee-ai/mergekit#309). The merged model is task arithmetic with one
coefficient per (expert, partition),

    θ(λ) = θ_b + Σ_k λ_{k,p(t)} Δ_k        for every tensor t, p(t) its partition,

and λ is optimised with Adam on data, through a functional call of the base model with the merged tensors (one
forward and one backward per task and step; the K task vectors stay in memory, fp32, on the run's device). After
each step λ is clamped to [``clip_low``, ``clip_high``] (paper: [0, 1]); it starts at ``init`` (paper: 0.3, task
arithmetic's usual λ). Levels: ``model`` (the paper's task-wise AdaMerging), ``layer`` (its layer-wise AdaMerging:
one coefficient per decoder block, the embeddings and the head each their own), ``attn_mlp`` and ``matrix`` (one per
weight tensor): every level whose partitions hold whole tensors.

Objective (the decision mergeflow takes where the paper's setting does not carry over): the paper minimises the
prediction entropy on *unlabelled test inputs*, a test-time adaptation. mergeflow never reads the test split; the
estimators read the tasks' few-shot / calibration examples, which are labelled, so the default objective is their
answer-token cross-entropy (``objective: loss``, the supervised surrogate); ``objective: entropy`` is the paper's
unsupervised objective (the mean entropy of the next-token distribution over the answer positions) on the same
inputs. Each step draws ``batch_size`` examples of every distinct task (seeded by the run's seed) and minimises the
mean over tasks, so every task counts the same whatever its size.

The artifact is a ``weight`` field at the chosen level, consumed by ``task_arithmetic`` with λ = 1 (the learned
coefficients carry the scale). Memory: (K + 1) copies of the model in fp32 plus the activations of one mini-batch;
for 7B models use a GPU worker with that much memory, or a coarse level on fewer experts.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.func import functional_call

from mergeflow.architecture import Architecture
from mergeflow.coefficients import CoefficientField, Coefficients
from mergeflow.errors import MergeflowError, RecipeError
from mergeflow.importance.base import Estimator, ImportanceRun, register_estimator
from mergeflow.importance.binding import binding_for
from mergeflow.importance.costs import (
    CostPlan,
    Pass,
    PlanInputs,
    activation_bytes,
    declare_plan,
    model_bytes,
    truncated,
)
from mergeflow.importance.scoring import Encoded, encode, lm_loss
from mergeflow.methods.base import ParamSpec
from mergeflow.partitions import Partitioner

LEVELS = ("model", "layer", "attn_mlp", "matrix")  # partitions of whole tensors
OBJECTIVES = ("loss", "entropy")

PARAMS = (
    ParamSpec("level", str, "layer", choices=LEVELS,
              help="one coefficient per expert and: model (task-wise), layer (layer-wise), attn_mlp, matrix (tensor)"),
    ParamSpec("objective", str, "loss", choices=OBJECTIVES,
              help="loss: answer cross-entropy on the labelled examples; entropy: the paper's unsupervised objective"),
    ParamSpec("init", float, 0.3, help="starting coefficient of every expert and partition (paper: 0.3)"),
    ParamSpec("lr", float, 0.01, low=0.0, low_open=True, help="Adam learning rate (paper: 1e-3 over 500 steps)"),
    ParamSpec("steps", int, 200, low=0, help="optimisation steps (paper: 500)"),
    ParamSpec("batch_size", int, 16, low=1, help="examples of every task per step (paper: 16)"),
    ParamSpec("clip_low", float, 0.0, help="coefficients are clamped to [clip_low, clip_high] after each step"),
    ParamSpec("clip_high", float, 1.0, help="upper clamp of the coefficients (paper: 1)"),
    ParamSpec("max_length", int, 1024, low=2, help="tokens per example (the prompt is cut on the left)"),
)


def _check(params: dict[str, Any]) -> None:
    if params["clip_low"] > params["clip_high"]:
        raise RecipeError(f"importance.parameters: adamerging clip_low {params['clip_low']} is above clip_high "
                          f"{params['clip_high']}")
    if not params["clip_low"] <= params["init"] <= params["clip_high"]:
        raise RecipeError(f"importance.parameters: adamerging init {params['init']} is outside "
                          f"[clip_low, clip_high] = [{params['clip_low']}, {params['clip_high']}]")


def _objective(kind: str, merged: Any, batch: Encoded) -> torch.Tensor:
    """The mean over examples of the answer cross-entropy, or of the mean next-token entropy over answer positions."""
    if kind == "loss":
        return lm_loss(merged, batch).mean()
    logits = merged(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1) * batch.answer_mask
    return (entropy.sum(1) / batch.answer_mask.sum(1).clamp(min=1)).mean()


def _combine(lam: torch.Tensor, column: int | torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Σ_k λ[k, column] Δ_k: one coefficient per expert for a whole tensor, or one per entry's partition."""
    if isinstance(column, int):
        return torch.tensordot(lam[:, column], deltas, dims=1)
    return (lam[:, column] * deltas).sum(0)


def _compute(run: ImportanceRun) -> Coefficients:
    p = run.params
    assert run.base is not None
    start = time.perf_counter()
    arch = Architecture.from_folder(run.base.model_folder)
    partitioner = Partitioner(arch, p["level"])
    ids = partitioner.partition_ids()
    model = run.load_model(run.base)
    model.requires_grad_(False)
    base = {n: t.detach() for n, t in model.named_parameters()}  # tied tensors once (the functional call re-ties)
    # a parameter may hold several checkpoint tensors (fused MoE experts, D-37), each in its own partition (matrix
    # level, D-38): its coefficient is then a tensor of partition columns, one per entry
    binding = binding_for(model, run.base.model_folder, arch, content_key=run.base.content_hash)
    aliases: dict[int, list[str]] = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(t), []).append(name)
    column: dict[str, int | torch.Tensor] = {}
    for name, t in model.named_parameters():
        # its own name's tensors first (a tied parameter stored under both names keeps its stored name's column)
        held = (binding.checkpoint_names(name)
                or [c for alias in aliases[id(t)] for c in binding.checkpoint_names(alias)] or [name])
        cols = {}
        for c in held:
            labels = partitioner.partition(c).unique_labels()
            if len(labels) != 1:
                raise RecipeError(f"importance.parameters.level: adamerging needs partitions of whole tensors; {c} "
                                  f"spans {labels} at level {p['level']}")
            cols[c] = ids.index(labels[0])
        if len(set(cols.values())) == 1:
            column[name] = next(iter(cols.values()))
        else:
            index = torch.empty(t.shape, dtype=torch.long)
            for c, col in cols.items():
                binding.slot(c, "adamerging").view(index).fill_(col)
            column[name] = index.to(run.device)
    deltas: dict[str, list[torch.Tensor]] = {name: [] for name in base}
    for ref in run.experts:
        expert = run.load_model(ref)
        params = dict(expert.named_parameters())
        missing = sorted(set(base) - set(params))
        if missing:
            raise MergeflowError(f"adamerging: expert {ref.reference} has no tensor {missing[0]} of the base")
        for name, b in base.items():
            deltas[name].append(params[name].detach() - b)
        del expert, params
    # tensors no expert changed take no part in the optimisation (their λ has no gradient through them)
    stacked = {n: torch.stack(ds) for n, ds in deltas.items() if any(bool(d.any()) for d in ds)}
    del deltas
    if not stacked:
        raise MergeflowError("adamerging: the experts are identical to the base; there is nothing to merge")

    tokenizer = run.tokenizer()
    encoded: dict[str, Encoded] = {}
    for task in run.tasks:  # each distinct task once (out of domain: the target only)
        if task.sha256 not in encoded:
            encoded[task.sha256] = encode(tokenizer, task.examples, max_length=p["max_length"]).to(run.device)
    lam = torch.full((run.k, len(ids)), float(p["init"]), dtype=torch.float32, device=run.device,
                     requires_grad=True)
    opt = torch.optim.Adam([lam], lr=p["lr"])
    gen = torch.Generator().manual_seed(run.seed)
    curve: list[float] = []
    for _ in range(p["steps"]):
        merged_params = {n: base[n] + _combine(lam, column[n], d) for n, d in stacked.items()}

        def merged(_params: dict[str, torch.Tensor] = merged_params, **kwargs: Any) -> Any:
            return functional_call(model, _params, args=(), kwargs=kwargs)

        total = torch.zeros((), device=run.device)
        for enc in encoded.values():
            index = torch.randperm(len(enc), generator=gen)[:p["batch_size"]].to(enc.input_ids.device)
            total = total + _objective(p["objective"], merged, enc.select(index))
        total = total / len(encoded)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        with torch.no_grad():
            lam.clamp_(p["clip_low"], p["clip_high"])
        run.count(forward=len(encoded), backward=len(encoded))
        curve.append(round(float(total.detach()), 6))
        if not torch.isfinite(total):
            raise MergeflowError(f"adamerging: the objective became {float(total)} at step {len(curve)}; lower lr")
    weights = lam.detach().to(torch.float64).cpu()
    stats = {"objective_first": curve[0] if curve else None, "objective_last": curve[-1] if curve else None,
             "objective_curve": curve[:: max(1, len(curve) // 50)], "steps": len(curve),
             "tensors_optimised": len(stacked), "seconds_optimising": round(time.perf_counter() - start, 3)}
    return run.coefficients({"weight": CoefficientField(p["level"], list(ids), weights, default=None)},
                            scores={"lambda": weights.clone()}, score_partitions={"lambda": list(ids)}, stats=stats)


ADAMERGING = register_estimator(Estimator(
    name="adamerging",
    compute=_compute,
    params=PARAMS,
    check_params=_check,
    summary="per-(expert, partition) task-arithmetic coefficients learned with Adam through the merged model on "
            "the tasks' examples (merge with task_arithmetic, λ = 1)",
    paper="Yang et al., AdaMerging: Adaptive Model Merging for Multi-Task Learning, ICLR 2024 (arXiv:2310.02575)",
    needs_base=True,
    default_split="calib",
    default_n=128,
    supports_ood=True,
))


@declare_plan("adamerging")
def plan_costs(inputs: PlanInputs) -> CostPlan:
    """``steps`` × distinct tasks forward + backward passes of the merged model (``batch_size`` examples of the
    task, drawn each step; the width planned is the task's longest example, an upper bound). In memory: the base,
    the K task vectors (twice while they are stacked), the merged tensors and their gradients, fp32."""
    p = inputs.params
    arch = inputs.arch
    passes = []
    for task in inputs.distinct():
        lengths = truncated(task.lengths, p["max_length"])
        passes.append(Pass("merged model steps", "merged", min(p["batch_size"], len(lengths)), max(lengths),
                           p["steps"], backward=True, recorded=(1, 1)))
    model = model_bytes(arch)
    k = inputs.k
    act = max((activation_bytes(arch, q.rows, q.width, backward=True) for q in passes), default=0)
    train = {"base model (fp32)": model, "task vectors (K, fp32)": k * model,
             "merged tensors and their gradients (fp32)": 2 * model, "activations": act}
    setup = {"base model (fp32)": model, "task vectors while stacked (2K, fp32)": 2 * k * model}
    memory = train if sum(train.values()) >= sum(setup.values()) else setup
    return CostPlan("adamerging", [q for q in passes if q.count], memory,
                    notes=["each step also builds the merged tensors: K multiply-adds per parameter (not timed)"])
