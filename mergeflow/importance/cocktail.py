"""LM-Cocktail: one weight per model from its LM loss on a few examples (docs/methods.md §5.13, §2.7, D-31).

Xiao et al., "LM-Cocktail: Resilient Tuning of Language Models via Model Merging" (arXiv 2311.13534), official code
``FlagOpen/FlagEmbedding`` ``LM_Cocktail``. The members are the base model (``include_base``, D-31) and the experts.
Each member's loss is computed as the official code does: the examples in mini-batches of ``batch_size`` (2), each
text the prompt + the gold answer + EOS (``append_eos``), prompt tokens masked, the batch's loss the token mean over
all its answer tokens, the member's loss the mean over mini-batches. The weights are ``softmax(−loss / T)`` over
the members (T = 5), and the merge ``θ = Σ_m w_m θ_m``. With the base as a member this is
``θ_b + Σ_{i≠b} w_i Δ_i``, so the artifact is a ``weight`` field at level ``model`` holding each expert's ``w_i``
for ``task_arithmetic`` with λ = 1 (the base's weight is the remainder 1 − Σ w_i). Without the base the expert
weights sum to one and the same field gives ``Σ_i w_i θ_i`` again.

Which examples: out of domain (``importance.data.target``, D-10/D-11) every member is scored on the target task's
few-shot examples, as in the paper. In domain there is no single target task: the examples are the union of the
experts' own task examples (each distinct task once, in expert order), so every member is scored on the same mix.

Differences from the official code, both to score exactly what the evaluation scores (D-34): texts are tokenised
as lm-eval does (prompt + the task's delimiter + answer, no BOS added) and an over-long example loses the left side
of its prompt rather than the end of its answer.

Two stages: the members' losses are measured (the base's and the experts' cached apart, so ``include_base`` either
way reuses them) and ``temperature`` and ``include_base`` are applied afterwards, without a model pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mergeflow.coefficients import CoefficientField, Coefficients
from mergeflow.errors import MergeflowError
from mergeflow.importance.base import Estimator, ImportanceRun, Measurements, MeasurePart, register_estimator
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
from mergeflow.importance.scoring import Encoded, answer_logprobs, batches, encode
from mergeflow.methods.base import ParamSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PARAMS = (
    ParamSpec("temperature", float, 5.0, low=0.0, low_open=True, help="softmax temperature over −loss (paper 5)"),
    ParamSpec("include_base", bool, True, help="the base model is a member of the cocktail (D-31)"),
    ParamSpec("batch_size", int, 2, low=1, help="examples per mini-batch; the loss is a mean over mini-batches"),
    ParamSpec("max_length", int, 2048, low=2, help="tokens per example, EOS included"),
    ParamSpec("append_eos", bool, True, help="append the EOS token to every answer (scored as an answer token)"),
)


def cocktail_examples(run: ImportanceRun) -> list[Example]:
    """The examples every member is scored on: each distinct task's examples once, in expert order."""
    seen: set[str] = set()
    out: list[Example] = []
    for task in run.tasks:
        if task.sha256 not in seen:
            seen.add(task.sha256)
            out.extend(task.examples)
    return out


def encode_with_eos(tokenizer: PreTrainedTokenizerBase, examples: list[Example], *, max_length: int,
                    append_eos: bool) -> Encoded:
    """:func:`~mergeflow.importance.scoring.encode`, with EOS appended to every answer and marked as answer."""
    if not append_eos:
        return encode(tokenizer, examples, max_length=max_length)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MergeflowError("cocktail: append_eos needs a tokenizer with an EOS token")
    enc = encode(tokenizer, examples, max_length=max_length - 1)
    b, width = enc.input_ids.shape
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((b, width + 1), pad, dtype=torch.long)
    attention = torch.zeros((b, width + 1), dtype=torch.long)
    answer = torch.zeros((b, width), dtype=torch.bool)
    for r, n in enumerate(enc.lengths.tolist()):
        ids[r, :n] = enc.input_ids[r, :n]
        ids[r, n] = eos
        attention[r, :n + 1] = 1
        answer[r, :n - 1] = enc.answer_mask[r, :n - 1]
        answer[r, n - 1] = True   # the logits at the last real token predict EOS
    targets = torch.where(answer, ids[:, 1:], torch.zeros_like(ids[:, 1:]))
    return Encoded(ids, attention, answer, targets, attention.sum(1))


def cocktail_loss(model: PreTrainedModel, enc: Encoded, batch_size: int) -> tuple[float, int]:
    """Mean over mini-batches of each mini-batch's token-mean answer loss (the official ``llm_loss``); batches."""
    losses = []
    with torch.no_grad():
        for _, b in batches(enc, batch_size):
            b = b.to(model.device)
            nll = -answer_logprobs(model, b).sum()
            losses.append(float(nll) / int(b.answer_mask.sum()))
    return sum(losses) / len(losses), len(losses)


def _measure(run: ImportanceRun) -> Measurements:
    """The losses of one part of the members: the base (part ``base``) or every expert (part ``experts``)."""
    p = run.params
    if run.part == "base":
        assert run.base is not None  # needs_base
        members = [run.base]
    else:
        members = list(run.experts)
    examples = cocktail_examples(run)
    encoded: dict[int, Any] = {}  # one encoding per distinct tokenizer (each member reads the text in its own)
    losses = []
    for ref in members:
        tok = run.tokenizer(ref)
        if id(tok) not in encoded:
            encoded[id(tok)] = encode_with_eos(tok, examples, max_length=p["max_length"], append_eos=p["append_eos"])
        enc = encoded[id(tok)]
        model = run.load_model(ref)
        loss, n_batches = cocktail_loss(model, enc, p["batch_size"])
        run.count(forward=n_batches)
        losses.append(loss)
        del model
    return Measurements({f"loss.{run.part}": torch.tensor(losses, dtype=torch.float64)})


def _finalize(run: ImportanceRun, measured: Measurements) -> Coefficients:
    p = run.params
    labels = [f"model[{i}]" for i in range(run.k)]
    loss_t = measured.tensors["loss.experts"]
    if p["include_base"]:
        labels.insert(0, "base")
        loss_t = torch.cat([measured.tensors["loss.base"], loss_t])
    weights = torch.softmax(-loss_t / p["temperature"], dim=0)
    expert_w = weights[1:] if p["include_base"] else weights
    field = CoefficientField("model", ["model"], expert_w[:, None].clone(), default=expert_w.tolist())
    return run.coefficients(
        {"weight": field},
        scores={"loss": loss_t, "member_weight": weights},
        score_partitions={"loss": labels, "member_weight": labels},
        stats={"examples": len(cocktail_examples(run)), "members": labels,
               "base_weight": float(weights[0]) if p["include_base"] else 0.0},
    )


_LOSS_PARAMS = ("batch_size", "max_length", "append_eos")

COCKTAIL = register_estimator(Estimator(
    name="cocktail",
    measure=_measure,
    finalize=_finalize,
    # the members' losses; the temperature and whether the base is a member are applied afterwards
    measure_params=_LOSS_PARAMS,
    measure_parts=(MeasurePart("base", _LOSS_PARAMS, lambda p: p["include_base"]),
                   MeasurePart("experts", _LOSS_PARAMS)),
    params=PARAMS,
    summary="one weight per model, softmax(−loss/T) of its LM loss on the target's few-shot examples; the base "
            "takes part (θ = Σ w_m θ_m, as task arithmetic with λ = 1)",
    paper="Xiao et al., LM-Cocktail: Resilient Tuning of Language Models via Model Merging (arXiv:2311.13534)",
    needs_base=True,
    default_split="fewshot",
    default_n=5,
    supports_ood=True,
    own_tokenizers=True,
))


@declare_plan("cocktail")
def plan_costs(inputs: PlanInputs) -> CostPlan:
    """Every member (the base when ``include_base``, each expert) forwards the union of the distinct tasks'
    examples in mini-batches of ``batch_size``: one recorded forward each; one model in memory at a time."""
    p = inputs.params
    lengths = [n for task in inputs.distinct() for n in task.lengths]
    lengths = ([min(n, p["max_length"] - 1) + 1 for n in lengths] if p["append_eos"]
               else truncated(lengths, p["max_length"]))
    shapes = chunks(lengths, p["batch_size"])
    passes = passes_over("base loss", "base", shapes) if p["include_base"] else []
    passes += passes_over("expert losses", "expert", shapes, times=inputs.k)
    return CostPlan("cocktail", passes, {"models (1, fp32)": model_bytes(inputs.arch),
                                         "activations": largest_activations(inputs.arch, passes)})
