"""RegMean (docs/methods.md §5.12, D-27): Gram matrices of every linear layer's inputs, per expert, on its own task.

For each ``nn.Linear`` (q, k, v, o, gate, up, down, and ``lm_head`` unless it is tied to the embeddings; also
transformers' ``Conv1D``, whose weight is stored ``[in, out]``: its Gram is written with a leading axis of 1) the
estimator forwards the expert's own task examples (full text: prompt and answer, rendered in the task's format, D-34)
through **that expert** and accumulates ``G_t = X_tᵀ X_t / n_t`` over the non-pad tokens reaching the layer (fp32).
Off-diagonal entries are shrunk, ``G̃_t = α G_t + (1 − α) diag(G_t)``, and ``G̃_t`` is written as the entry-level
``gram`` field under the layer's weight name. The ``regmean`` merge method (mergeflow/methods/regmean.py) solves
``W = (Σ_t W_t G̃_t)(Σ_t G̃_t)⁻¹`` per layer and averages every other tensor.

Routed MoE blocks as transformers 5 builds them (Mixtral, Qwen3-MoE: a router ``gate`` and one fused ``experts``
module, D-37, D-38) are linear layers too: the router reads the block's input (its Gram covers every real token), and
expert ``e``'s gate/up projections read the tokens the router sends to ``e`` and its down projection their
activations ``act(gate) ⊙ up``, so each checkpoint tensor ``experts.e.*`` gets the Gram of the rows that reached it
(an expert no token reached gets none, and is averaged).

Memory: ``in × in`` fp32 per linear layer per expert (Llama-7B: about 28 GB per expert), one expert's at a time: two
stages, the raw Grams are measured (each expert's written to the cached measurements as soon as they are computed) and
``alpha`` shrinks them one expert at a time while the artifact is written, so a new ``alpha`` runs no model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

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
    linear_inputs,
    model_bytes,
    passes_over,
    truncated,
)
from mergeflow.importance.scoring import Encoded, batches, encode
from mergeflow.methods.base import ParamSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def is_transposed(module: nn.Module) -> bool:
    """Whether a linear layer stores its weight ``[in, out]`` (transformers' ``Conv1D``: GPT-2 and relatives)."""
    return type(module).__name__ == "Conv1D"


def linear_layers(model: PreTrainedModel) -> tuple[dict[str, nn.Module], list[str]]:
    """``({weight tensor name: module}, tied module names)``: every ``nn.Linear`` (and ``Conv1D``) whose weight is
    its own. A linear layer whose weight is tied to another tensor (``lm_head`` tied to the embeddings) is left out:
    the shared tensor is merged once, as an embedding (averaged)."""
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    layers: dict[str, nn.Module] = {}
    tied: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or is_transposed(module):
            if owners.get(id(module.weight), 0) > 1:
                tied.append(name)
                continue
            layers[f"{name}.weight" if name else "weight"] = module
    return layers, tied


def moe_blocks(model: PreTrainedModel) -> dict[str, nn.Module]:
    """Routed MoE blocks as transformers 5 builds them: a router ``gate`` whose 2-D ``weight`` is not an
    ``nn.Linear``'s, and an ``experts`` module holding the fused ``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj``
    ``[E, H, I]`` with its activation ``act_fn``. {block name: block}."""
    out = {}
    for name, module in model.named_modules():
        gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
        if (isinstance(getattr(gate, "weight", None), nn.Parameter) and not isinstance(gate, nn.Linear)
                and isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter)
                and isinstance(getattr(experts, "down_proj", None), nn.Parameter)
                and callable(getattr(experts, "act_fn", None))):
            out[name] = module
    return out


def gram_matrices(model: PreTrainedModel, enc: Encoded, *, batch_size: int = 8,
                  on_batch: Callable[[], None] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """``({weight name: XᵀX / n}, {weight name: n})`` over the non-pad tokens of ``enc`` reaching each linear layer.

    Inputs are gathered by forward pre-hooks, so every call of a layer counts (a layer called twice per forward sees
    twice the rows). Sums are fp32 on the model's device; the Grams are returned on the CPU. The fused experts of an
    MoE block are keyed ``{parameter}[{expert}]`` (``...experts.gate_up_proj[3]``): :func:`checkpoint_grams` names
    them after the checkpoint tensors they hold.
    """
    layers, _ = linear_layers(model)
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = dict.fromkeys(layers, 0)
    current: dict[str, torch.Tensor] = {}

    def add(name: str, x: torch.Tensor) -> None:
        x = x.float()
        if name not in sums:
            sums[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
            rows.setdefault(name, 0)
        sums[name].addmm_(x.T, x)
        rows[name] += x.shape[0]

    def real_rows(x: torch.Tensor) -> torch.Tensor:
        mask = current["mask"]
        # [B, T, in] activations, or the [B·T, in] rows an MoE block works on: real tokens only
        if tuple(x.shape[:-1]) == tuple(mask.shape):
            return x[mask]
        if x.dim() == 2 and x.shape[0] == mask.numel():
            return x[mask.reshape(-1)]
        return x.reshape(-1, x.shape[-1])

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
            add(name, real_rows(args[0]))
        return pre

    def experts_hook(prefix: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
            hidden, chosen = args[0], args[1]
            keep = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
            if hidden.shape[0] == current["mask"].numel():
                keep = current["mask"].reshape(-1)
            w_in = module.gate_up_proj
            for e in range(w_in.shape[0]):
                x = hidden[(chosen == e).any(-1) & keep]
                if x.shape[0] == 0 or w_in.shape[-1] != x.shape[-1]:
                    continue
                add(f"{prefix}.gate_up_proj[{e}]", x)
                with torch.no_grad():
                    gate, up = nn.functional.linear(x, w_in[e]).chunk(2, dim=-1)
                add(f"{prefix}.down_proj[{e}]", module.act_fn(gate) * up)
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    for name, block in moe_blocks(model).items():
        prefix = f"{name}." if name else ""
        handles.append(block.gate.register_forward_pre_hook(hook(f"{prefix}gate.weight")))
        handles.append(block.experts.register_forward_pre_hook(experts_hook(f"{prefix}experts")))
    try:
        with torch.no_grad():
            for _, b in batches(enc, batch_size):
                b = b.to(model.device)
                current["mask"] = b.attention_mask.bool()
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
                if on_batch is not None:
                    on_batch()
    finally:
        for h in handles:
            h.remove()
    grams = {n: (s / rows[n]).cpu() for n, s in sums.items() if rows[n] > 0}
    return grams, {n: rows[n] for n in grams}


def checkpoint_grams(grams: dict[str, torch.Tensor], binding: Binding) -> dict[str, torch.Tensor]:
    """Grams keyed by checkpoint tensor name (D-37): a renamed layer's under its checkpoint name, a fused expert's
    (``{parameter}[{e}]``) under every checkpoint tensor of expert ``e`` that parameter holds (gate and up read the
    same rows)."""
    out: dict[str, torch.Tensor] = {}
    for key, g in grams.items():
        expert = None
        param = key
        if key.endswith("]"):
            param, _, number = key[:-1].rpartition("[")
            expert = int(number)
        held = binding.checkpoint_names(param)
        if expert is not None:
            first = True
            for name in held:
                if binding.slots[name].index[:1] == (expert,):
                    out[name] = g if first else g.clone()  # each its own storage (safetensors refuses sharing)
                    first = False
        elif held and param not in held:
            out[held[0]] = g
        else:
            out[param] = g
    return out


def shrink(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``α G + (1 − α) diag(G)``: off-diagonal entries scaled by α, the diagonal kept."""
    return gram * alpha + torch.diag_embed(gram.diagonal()) * (1.0 - alpha)


def _measure(run: ImportanceRun) -> Measurements:
    """Each expert's raw Grams, written to the measurements as soon as they are computed (entry ``gram``)."""
    p = run.params
    per_expert: list[dict[str, Any]] = []
    tied: list[str] = []
    transposed: list[list[str]] = []
    layers_of_first: list[str] = []
    for i, (ref, task) in enumerate(zip(run.experts, run.tasks)):
        model = run.load_model(ref)
        layers, tied = linear_layers(model)
        binding = binding_for(model, ref.model_folder, content_key=ref.content_hash)
        transposed.append(sorted(checkpoint_grams({n: torch.empty(0) for n, m in layers.items()
                                                   if is_transposed(m)}, binding)))
        enc = encode(run.tokenizer(ref), task.examples, max_length=p["max_length"], answer_only=False)
        raw, rows = gram_matrices(model, enc, batch_size=p["batch_size"], on_batch=lambda: run.count(forward=1))
        raw = checkpoint_grams(raw, binding)
        del model
        if not raw:
            raise MergeflowError(f"regmean: expert {ref.reference} has no linear layer to compute a Gram for")
        bad = [n for n, g in raw.items() if not torch.isfinite(g).all()]
        if bad:
            raise MergeflowError(f"regmean: non-finite Gram for expert {ref.reference} (layer {bad[0]})")
        run.write_entry("gram", i, raw)
        if i == 0:
            layers_of_first = sorted(raw)
        per_expert.append({"reference": ref.reference, "task": task.task, "examples": len(task),
                           "tokens": int(enc.attention_mask.sum()), "layers": len(raw),
                           "rows_per_layer_max": max(rows.values())})
        del raw
    return Measurements(stats={"experts": per_expert, "layers": layers_of_first, "tied_layers": tied,
                               "transposed": transposed})


def _finalize(run: ImportanceRun, measured: Measurements) -> Coefficients:
    alpha = run.params["alpha"]
    transposed = [set(names) for names in measured.stats["transposed"]]

    def grams(i: int) -> dict[str, torch.Tensor]:  # one expert at a time, as the artifact is saved
        # a leading axis of 1 marks a weight stored [in, out] (Conv1D) for the merge kernel
        return {n: (shrink(g, alpha).unsqueeze(0) if n in transposed[i] else shrink(g, alpha)).contiguous()
                for n, g in measured.entry("gram", i)}

    stats = {name: measured.stats[name] for name in ("experts", "layers", "tied_layers")}
    out = run.coefficients({"gram": CoefficientField("entry")}, stats=stats)
    out.entry_tensors = {"gram": LazyEntries(run.k, grams)}  # type: ignore[dict-item]
    return out


REGMEAN = register_estimator(Estimator(
    name="regmean",
    measure=_measure,
    finalize=_finalize,
    measure_params=("batch_size", "max_length"),  # the raw Grams; alpha only shrinks them
    # one expert's Grams depend on that expert and its task only: measured (and cached) expert by expert
    measure_parts=(MeasurePart(WHOLE, ("batch_size", "max_length"), by_expert=True,
                               expert_stats=("experts", "transposed")),),
    params=(
        ParamSpec("alpha", float, 0.9, low=0.0, high=1.0,
                  help="off-diagonal scale of each Gram: α G + (1 − α) diag(G) (1: exact RegMean, 0: diagonal)"),
        ParamSpec("batch_size", int, 8, low=1, help="examples per forward pass"),
        ParamSpec("max_length", int, 1024, low=2, help="tokens per example (the prompt is cut on the left)"),
    ),
    summary="Gram matrices of every linear layer's inputs on each expert's own task (merge with regmean)",
    paper="Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023 (arXiv:2212.09849)",
    needs_base=False,
    default_split="calib",
    default_n=128,
    own_tokenizers=True,
))


@declare_plan("regmean")
def plan_costs(inputs: PlanInputs) -> CostPlan:
    """Each expert forwards its own task's full texts in batches of ``batch_size`` (one recorded forward each);
    in memory: that expert, its Grams (``in × in`` fp32 per linear layer; the sums and the normalised copy)."""
    p = inputs.params
    # the hooks' XᵀX costs in² multiply-adds per token and linear layer, the layer's own matmuls in × out: a block
    # costs (1 + Σ in² / Σ in·out) blocks' worth of forward
    block = [(r.shape[0], r.shape[1]) if r.conv1d else (r.shape[1], r.shape[0])
             for r in inputs.arch.tensors.values() if r.layer_index == 0 and len(r.shape) == 2
             and not r.is_bias and r.kind not in ("norm", "embed", "pos_embed")]
    extra = sum(i * i for i, _ in block) / max(1, sum(i * o for i, o in block))
    passes = []
    for task in inputs.tasks:
        passes += passes_over("expert forward + Gram accumulation", "expert",
                              chunks(truncated(task.lengths, p["max_length"]), p["batch_size"]),
                              layers=inputs.arch.num_layers * (1 + extra))
    grams = sum(n * n for n in linear_inputs(inputs.arch)) * 4
    return CostPlan("regmean", passes, {"models (1, fp32)": model_bytes(inputs.arch),
                                        "Gram matrices (sums + normalised copy, fp32)": 2 * grams,
                                        "activations": largest_activations(inputs.arch, passes)})
