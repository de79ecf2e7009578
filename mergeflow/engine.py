"""A recipe in, a merged model out: the stage graph's resolve and importance nodes, then the streaming merge.

The engine proper (:mod:`mergeflow.streaming`) merges resolved snapshots with the Coefficients it is given; this
module is the entry point that starts from a recipe, for the ``mergeflow merge`` and ``check`` commands and for
callers that merge in memory. It takes the recipe's ``resolve`` and ``importance`` nodes from the stage graph
(:func:`mergeflow.graph.resolve_nodes`, :func:`mergeflow.graph.importance_nodes`) and runs them in this process with
:func:`mergeflow.graph.execute` (everything cached by content), so a recipe is resolved and its estimators run
exactly as the pipeline does, then hands the results to the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mergeflow import graph, pipeline, streaming
from mergeflow.coefficients import Coefficients
from mergeflow.recipe import Recipe
from mergeflow.streaming import (
    DEFAULT_SHARD_SIZE,
    TOKENIZER_FILES,
    Input,
    MergeInputs,
    MergeOptions,
    MergePlan,
    MergeResult,
    compute_threads,
    iter_merged,
    layer_fraction,
    model_card,
    pick_device,
    provenance_of,
)

__all__ = ["DEFAULT_SHARD_SIZE", "TOKENIZER_FILES", "Input", "MergeInputs", "MergeOptions", "MergePlan",
           "MergeResult", "compute_threads", "iter_merged", "layer_fraction", "merge", "merge_state_dict",
           "model_card", "pick_device", "plan_merge", "provenance_of", "resolve_inputs"]


def resolve_inputs(recipe: Recipe) -> tuple[MergeInputs, dict[graph.Node, Any]]:
    """The recipe's checkpoints resolved through its graph's resolve nodes, and the results so far."""
    base, experts = graph.resolve_nodes(recipe)
    results = graph.execute(((base,) if base else ()) + experts)
    return pipeline.merge_inputs(recipe, results[base] if base else None, [results[e] for e in experts]), results


def _prepare(recipe: Recipe, out: Path | None, options: MergeOptions, strict: bool,
             coefficients: list[Coefficients] | None) -> tuple[MergeInputs, list[Coefficients] | None,
                                                               MergePlan | None]:
    """Inputs and Coefficients of a merge of ``recipe``. A data-aware recipe is checked before its estimators run
    (the returned plan, when that check found problems and ``strict`` is off)."""
    inputs, results = resolve_inputs(recipe)
    if coefficients is None and (recipe.importance or recipe.coefficients):
        checked = streaming.plan_merge(recipe, inputs, out=out, options=options, strict=strict,
                                       require_coefficients=False)
        checked.close()
        if checked.report.problems:
            return inputs, None, checked
        base, experts = graph.resolve_nodes(recipe)
        nodes = graph.importance_nodes(recipe, base, experts)
        graph.execute(nodes, graph.RunContext(device=str(pick_device(options.device))), results)
        coefficients = pipeline.load_coefficients(recipe, [results[n] for n in nodes])
    return inputs, coefficients, None


def plan_merge(recipe: Recipe, *, out: Path | None = None, options: MergeOptions | None = None,
               strict: bool = True, coefficients: list[Coefficients] | None = None) -> MergePlan:
    """Resolve the recipe's checkpoints, check the merge, and (data-aware recipes without ``coefficients``) run its
    estimators once everything else is checked; no tensor data of the merge is read."""
    options = options or MergeOptions()
    inputs, coefficients, refused = _prepare(recipe, out, options, strict, coefficients)
    if refused is not None:
        return refused
    return streaming.plan_merge(recipe, inputs, out=out, options=options, strict=strict, coefficients=coefficients)


def merge_state_dict(recipe: Recipe, *, device: str = "cpu", threads: int | None = None,
                     coefficients: list[Coefficients] | None = None) -> dict[str, torch.Tensor]:
    """Merge in memory (small models: evaluation of many candidate merges without touching disk)."""
    options = MergeOptions(device=device, progress=False)
    inputs, coefficients, _ = _prepare(recipe, None, options, True, coefficients)
    return streaming.merge_state_dict(recipe, inputs, device=device, threads=threads, coefficients=coefficients)


def merge(recipe: Recipe, out: str | Path, *, options: MergeOptions | None = None,
          coefficients: list[Coefficients] | None = None) -> MergeResult:
    """Merge to ``out``: sharded safetensors + config + tokenizer + model card + provenance, renamed into place."""
    options = options or MergeOptions()
    inputs, coefficients, _ = _prepare(recipe, Path(out), options, True, coefficients)
    return streaming.merge(recipe, inputs, out, options=options, coefficients=coefficients)
