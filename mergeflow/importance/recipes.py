"""A recipe's importance entries, run: the Coefficients artifacts a recipe's merge consumes, and the measurement
shards a flow fans out for them.

This module sits above :mod:`mergeflow.recipe` and :mod:`mergeflow.importance.base`: the recipe looks estimators up
in the registry of ``importance.base`` to validate its ``importance`` section, so ``importance.base`` knows nothing
of recipes, and what turns a recipe's entry into task data and a :func:`~mergeflow.importance.base.compute_coefficients`
call lives here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mergeflow.architecture import Architecture
from mergeflow.cache import Cache
from mergeflow.coefficients import Coefficients
from mergeflow.errors import MergeflowError, RecipeError
from mergeflow.importance.base import (
    ModelRef,
    compute_coefficients,
    get_estimator,
    measure_shard,
    measurement_shards,
)
from mergeflow.importance.costs import PlanInputs, estimate, task_shapes
from mergeflow.importance.data import TaskData, load_task_data

if TYPE_CHECKING:
    from mergeflow.recipe import ImportanceSpec, Recipe


def coefficients_for_recipe(recipe: Recipe, base: ModelRef | None, experts: Sequence[ModelRef], *,
                            device: str | torch.device = "cpu", cache: Cache | None = None) -> list[Coefficients]:
    """The artifacts a recipe's merge consumes: its precomputed ``coefficients`` folders, then one per
    ``importance`` entry (computed, or fetched from the cache). ``experts`` are in the recipe's order."""
    out = [Coefficients.load(recipe.resolve_reference(path)) for path in recipe.coefficients]
    for index in range(len(recipe.importance)):
        out.append(coefficients_for_spec(recipe, index, base, experts, device=device, cache=cache))
    return out


def coefficients_for_spec(recipe: Recipe, index: int, base: ModelRef | None, experts: Sequence[ModelRef], *,
                          device: str | torch.device = "cpu", cache: Cache | None = None) -> Coefficients:
    """The artifact of the recipe's ``importance[index]`` entry (computed, or fetched from the cache)."""
    if not 0 <= index < len(recipe.importance):
        raise RecipeError(f"importance[{index}]: the recipe has {len(recipe.importance)} importance entries")
    return coefficients_for_importance(recipe.importance[index], [e.task for e in recipe.experts], base, experts,
                                       resolve_reference=recipe.resolve_reference, device=device, cache=cache)


def coefficients_for_importance(spec: ImportanceSpec, expert_tasks: Sequence[str | None], base: ModelRef | None,
                                experts: Sequence[ModelRef], *,
                                resolve_reference: Callable[[str], str] = lambda ref: ref,
                                device: str | torch.device = "cpu", cache: Cache | None = None) -> Coefficients:
    """One importance entry's artifact: each expert scored on its own task's data (``expert_tasks[i]``), or all on
    the out-of-domain ``target``. Needs only the entry, not the whole recipe, so a pipeline keys it by what it
    reads: a change elsewhere in the recipe (a merge knob) reuses it."""
    tasks = importance_tasks(spec, expert_tasks, len(experts), resolve_reference)
    return compute_coefficients(spec.estimator, base=base, experts=experts, tasks=tasks, params=spec.parameters,
                                device=device, seed=spec.data.seed, ood=spec.data.target is not None, cache=cache)


def shards_for_importance(spec: ImportanceSpec, expert_tasks: Sequence[str | None], base: ModelRef | None,
                          experts: Sequence[ModelRef], *,
                          resolve_reference: Callable[[str], str] = lambda ref: ref) -> list[dict[str, Any]]:
    """The measurement shards of one importance entry that can be measured apart (``{"part", "experts", "key"}``):
    those of its by-expert parts, when there is more than one shard. A flow fans them out (one task each, on
    whichever worker is free) before the entry's own task finalizes; empty when there is nothing to fan out."""
    tasks = importance_tasks(spec, expert_tasks, len(experts), resolve_reference)
    return measurement_shards(spec.estimator, base=base, experts=experts, tasks=tasks, params=spec.parameters,
                              seed=spec.data.seed, ood=spec.data.target is not None)


def measure_for_importance(spec: ImportanceSpec, expert_tasks: Sequence[str | None], base: ModelRef | None,
                           experts: Sequence[ModelRef], *, part: str, shard: Sequence[int],
                           resolve_reference: Callable[[str], str] = lambda ref: ref,
                           device: str | torch.device = "cpu", cache: Cache | None = None) -> dict[str, Any]:
    """Measure one shard of :func:`shards_for_importance` into the cache (or find it there)."""
    tasks = importance_tasks(spec, expert_tasks, len(experts), resolve_reference)
    return measure_shard(spec.estimator, base=base, experts=experts, tasks=tasks, params=spec.parameters, part=part,
                         shard=shard, device=device, seed=spec.data.seed, ood=spec.data.target is not None,
                         cache=cache)


def importance_tasks(spec: ImportanceSpec, expert_tasks: Sequence[str | None], n_experts: int,
                      resolve_reference: Callable[[str], str]) -> list[TaskData]:
    """Expert i's data for an importance entry: its own task's examples, or the out-of-domain target's."""
    est = get_estimator(spec.estimator)
    split = spec.data.split or est.default_split
    n = spec.data.n if spec.data.n is not None else est.default_n
    zoo = resolve_reference(spec.data.zoo) if spec.data.zoo else None
    if spec.data.target is not None:
        target = load_task_data(spec.data.target, split, n, spec.data.seed, zoo=zoo)
        return [target] * n_experts
    if len(expert_tasks) != n_experts or any(t is None for t in expert_tasks):
        raise RecipeError(f"importance: {spec.estimator} scores each expert on its own task; give every model "
                          "a task (or data.target for the out-of-domain mode)")
    by_task: dict[str, TaskData] = {}
    tasks = []
    for task in expert_tasks:
        assert task is not None
        if task not in by_task:
            by_task[task] = load_task_data(task, split, n, spec.data.seed, zoo=zoo)
        tasks.append(by_task[task])
    return tasks


def importance_estimates(recipe: Recipe, snapshot: Path, *, device: str | torch.device = "cpu",
                         threads: int | None = None) -> list[dict[str, Any]]:
    """Per ``importance`` entry, the estimated passes, time on ``device`` and peak memory of its estimator
    (:mod:`mergeflow.importance.costs`), or ``{"error": ...}`` saying why it cannot be estimated. ``snapshot``: the
    folder of the base (else the first expert): its config, tensor shapes and tokenizer. Runs no estimator; times
    one decoder layer of the architecture with random weights."""
    out: list[dict[str, Any]] = []
    if not recipe.importance:
        return out
    from transformers import AutoTokenizer  # seconds to import: only for recipes with importance entries

    try:
        config = json.loads((snapshot / "config.json").read_text())
        arch = Architecture.from_folder(snapshot)
        tokenizer = AutoTokenizer.from_pretrained(str(snapshot))
    except (OSError, ValueError, MergeflowError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return [{"index": i, "estimator": spec.estimator, "error": f"cannot read {snapshot}: {reason}"}
                for i, spec in enumerate(recipe.importance)]
    expert_tasks = [e.task for e in recipe.experts]
    for i, spec in enumerate(recipe.importance):
        row: dict[str, Any] = {"index": i, "estimator": spec.estimator, "given": dict(spec.parameters)}
        try:
            _refuse_unbuilt_zoo(spec.data.zoo)
            tasks = importance_tasks(spec, expert_tasks, len(recipe.experts), recipe.resolve_reference)
            params = get_estimator(spec.estimator).resolve_params(spec.parameters)
            inputs = PlanInputs(params, task_shapes(tokenizer, tasks), arch, torch.device(device).type,
                                ood=spec.data.target is not None)
            row.update(estimate(spec.estimator, inputs, config, device=device, threads=threads).describe())
            row["data"] = [t.describe() for t in dict((t.sha256, t) for t in tasks).values()]
        except MergeflowError as exc:
            row["error"] = str(exc)  # what is missing: task data, a zoo, a parameter; never a traceback
        except (RuntimeError, ValueError, TypeError) as exc:  # an architecture transformers cannot build or time
            first = str(exc).splitlines()[0] if str(exc) else ""
            row["error"] = f"cannot time one layer of {arch.model_type}: {type(exc).__name__}: {first}"
        out.append(row)
    return out


def _refuse_unbuilt_zoo(zoo: str | None) -> None:
    """An estimate reads the task data, but must not build a zoo for it (minutes): a ``zoo:`` reference whose zoo
    is not built yet is a one-line reason instead."""
    from mergeflow.zoo.build import MANIFEST, ZOO_SCHEME, default_zoo_dir, parse_zoo_reference

    if zoo is None or not zoo.startswith(ZOO_SCHEME):
        return
    size, seed, _ = parse_zoo_reference(zoo)
    folder = default_zoo_dir(size, seed)
    if not (folder / MANIFEST).exists():
        raise RecipeError(f"importance data: zoo {zoo} is not built yet ({folder}); build it with `mergeflow zoo "
                          "build` (or merge once) and check again")
