"""The pipeline's stages as Prefect tasks: ``resolve``, ``task_vectors``, ``importance`` (fed by its per-expert
``importance_measure`` shards), ``merge``, ``evaluate``, ``register`` (and ``promote``, registration's last step for
a run of several merges). Each is a thin wrapper over :mod:`mergeflow.pipeline` that takes the recipe as a plain mapping (a flow
parameter) and returns the library's small manifest; caching, retries and tags are what this layer adds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect import task

from mergeflow import pipeline
from tasks.policies import CONTENT, PROMOTE, REGISTER, RESOLVE, results_path

RecipeData = Mapping[str, Any]
Manifest = dict[str, Any]

_RESULTS = results_path()


def _recipe(recipe: RecipeData, recipe_dir: str | None) -> Any:
    return pipeline.as_recipe(recipe, base_dir=Path(recipe_dir) if recipe_dir else None)


@task(name="resolve", cache_policy=RESOLVE, persist_result=True, result_storage=_RESULTS,
      retries=3, retry_delay_seconds=[10, 60, 300], task_run_name="resolve {reference}")
def resolve(reference: str, recipe_dir: str | None = None, allow_pickle: bool = False,
            trust_remote_code: bool = False) -> Manifest:
    """A checkpoint to a checked local snapshot; downloads (hub, registry) are retried with back-off."""
    return pipeline.resolve_stage(reference, recipe_dir=recipe_dir, allow_pickle=allow_pickle,
                                  trust_remote_code=trust_remote_code)


@task(name="task_vectors", cache_policy=CONTENT, persist_result=True, result_storage=_RESULTS,
      task_run_name="task_vectors {expert[reference]}")
def task_vectors(base: Manifest, expert: Manifest, densities: Sequence[float] = (),
                 allow_pickle: bool = False) -> Manifest:
    """The expert's task vector summarised (and its global trim thresholds), streamed per tensor; keyed by the two
    checkpoints and the densities only, so recipes that differ elsewhere share it."""
    return pipeline.task_vectors_stage(base, expert, densities, allow_pickle=allow_pickle)


@task(name="importance", cache_policy=CONTENT, persist_result=True, result_storage=_RESULTS, tags=["gpu"],
      task_run_name="importance {spec[estimator]}")
def importance(spec: Mapping[str, Any], expert_tasks: Sequence[str | None], base: Manifest | None,
               experts: Sequence[Manifest], index: int = 0, recipe_dir: str | None = None,
               device: str = "auto") -> Manifest:
    """One data-aware estimator over all experts: the Coefficients the merge consumes. Its inputs are the importance
    entry, the experts' tasks and the checkpoints, so a changed merge knob reuses it. Tagged ``gpu`` so a
    concurrency limit on the tag bounds how many run at once on a GPU worker."""
    return pipeline.importance_stage(spec, expert_tasks, base, experts, index=index, recipe_dir=recipe_dir,
                                     device=device)


@task(name="importance_measure", cache_policy=CONTENT, persist_result=True, result_storage=_RESULTS, tags=["gpu"],
      task_run_name="importance_measure {spec[estimator]} {part} experts {shard}")
def importance_measure(spec: Mapping[str, Any], expert_tasks: Sequence[str | None], base: Manifest | None,
                       experts: Sequence[Manifest], part: str, shard: Sequence[int], index: int = 0,
                       recipe_dir: str | None = None, device: str = "auto") -> Manifest:
    """One shard of an importance entry's measurements (the experts that share their task data: one expert each
    in-domain), measured into the shared cache; the entry's ``importance`` task waits for its shards and finalizes
    without a model pass. Tagged ``gpu`` like ``importance``: the shards of one estimator run spread over the GPU
    workers (or the local cluster's processes) instead of queueing on one."""
    return pipeline.measure_stage(spec, expert_tasks, base, experts, part=part, shard=shard, index=index,
                                  recipe_dir=recipe_dir, device=device)


@task(name="merge", cache_policy=CONTENT, persist_result=True, result_storage=_RESULTS,
      task_run_name="merge {recipe[merge_method]}")
def merge(recipe: RecipeData, inputs: Sequence[Manifest], coefficients: Sequence[Manifest] = (),
          recipe_dir: str | None = None, device: str = "cpu") -> Manifest:
    """The merged model, written into the content-addressed cache (complete or not at all)."""
    return pipeline.merge_stage(_recipe(recipe, recipe_dir), inputs, coefficients, device=device)


@task(name="evaluate", cache_policy=CONTENT, persist_result=True, result_storage=_RESULTS,
      task_run_name="evaluate {split}")
def evaluate(recipe: RecipeData, model: Manifest, split: str | None = None, limit: int | None = None,
             recipe_dir: str | None = None, device: str = "cpu") -> Manifest:
    """lm-eval accuracy of the merged model on the recipe's evaluation tasks, on ``split``."""
    rec = _recipe(recipe, recipe_dir)
    return pipeline.evaluate_stage(model, pipeline.evaluation_spec(rec), split=split, limit=limit,
                                   recipe_dir=rec.recipe_dir, device=device)


@task(name="register", cache_policy=REGISTER, persist_result=True, result_storage=_RESULTS,
      retries=2, retry_delay_seconds=[10, 60])
def register(recipe: RecipeData, merged: Manifest, inputs: Sequence[Manifest], reported: Manifest,
             selection: Manifest | None = None, coefficients: Sequence[Manifest] = (),
             registered_name: str | None = None, tracking_uri: str | None = None,
             artifacts: Mapping[str, str] | None = None, recipe_dir: str | None = None,
             promote: bool = True) -> Manifest:
    """An MLflow run with the merge's params, metrics and artifacts, its model version, and (``promote``) the
    alias if it beats the current holder.

    The cache key includes the store and whether it already holds these weights (``RegistryState``): a new or
    wiped store is registered into again. The library's registration is idempotent too (a version with the same
    model hash is reused), so a retry after a crash never leaves two versions of one model.
    """
    from prefect.runtime import flow_run

    from mergeflow import tracking

    tracking.configure(tracking_uri)
    return pipeline.register_stage(_recipe(recipe, recipe_dir), merged, inputs, reported, selection, coefficients,
                                   registered_name=registered_name, artifacts=artifacts, promote=promote,
                                   flow_run_id=str(flow_run.id) if flow_run.id else None)


@task(name="promote", cache_policy=PROMOTE, persist_result=True, result_storage=_RESULTS)
def promote(candidates: Sequence[Manifest], tracking_uri: str | None = None) -> Manifest:
    """The end of registration for a run of several merges (a sweep): the alias moves to the run's best registered
    version on the selection metric, and only if it beats the current holder."""
    from mergeflow import tracking

    tracking.configure(tracking_uri)
    return pipeline.promote_best(candidates)
