"""The importance stage on its own, as a flow a GPU work pool runs (``importance_deployment`` of the pipeline).

Its parameters are the jobs the pipeline could not run locally: (recipe, importance entry index) pairs. It resolves
the checkpoints itself (from the shared cache when the workers share MERGEFLOW_HOME), fans each entry's per-expert
measurement shards out over its task runner (``importance_measure`` tasks, measured side by side by the runner's
workers), and returns the Coefficients manifests in the jobs' order; the artifacts themselves stay in the
content-addressed cache.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prefect import flow

from flows.common import submit_importance
from flows.runtime import task_runner
from mergeflow import pipeline
from tasks import stages
from tasks.policies import results_path


@flow(name="importance", task_runner=task_runner(), persist_result=True, result_storage=results_path())
def importance_flow(jobs: list[dict[str, Any]], recipe_dir: str | None = None,
                    device: str = "auto") -> list[dict[str, Any]]:
    """Coefficients for each ``{"recipe": mapping, "index": i}`` job, on ``device`` (``auto``: CUDA if present)."""
    futures = []
    shards: dict[str, Any] = {}
    resolved: dict[str, Any] = {}
    for job in jobs:
        recipe = pipeline.as_recipe(job["recipe"], base_dir=Path(recipe_dir) if recipe_dir else None)
        base_ref, expert_refs = pipeline.references(recipe)
        for ref in ([base_ref] if base_ref else []) + expert_refs:
            if ref not in resolved:
                resolved[ref] = stages.resolve.submit(ref, recipe_dir, **pipeline.resolve_options(recipe))
        base = resolved[base_ref] if base_ref else None
        experts = [resolved[r] for r in expert_refs]
        what = pipeline.importance_inputs(recipe, job["index"])
        futures.append(submit_importance(what["spec"], what["expert_tasks"], base, experts, job["index"], recipe_dir,
                                         device, shards))
    return [f.result() for f in futures]
