"""The merge pipeline: one recipe → one merged, evaluated and registered model.

    python -m flows.merge_pipeline recipes/zoo-ta-apl.yaml [--registered-name NAME]

resolve → task_vectors → importance → merge → evaluate → register; every stage cached by content, so a re-run with
one changed knob recomputes only what depends on it. Deployed on a schedule by ``prefect.yaml``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python flows/merge_pipeline.py` and Prefect's entrypoint loading
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prefect import flow

from flows.common import run_recipes
from flows.runtime import recipe_parameter, task_runner


@flow(name="merge-pipeline", task_runner=task_runner("threads"), log_prints=True)
def merge_pipeline(recipe: str | dict[str, Any], registered_name: str | None = None,
                   importance_deployment: str | None = None, evaluation_deployment: str | None = None,
                   device: str = "auto", tracking_uri: str | None = None) -> dict[str, Any]:
    """Merge, evaluate and register one recipe (a path relative to the project folder, or the recipe itself).

    ``importance_deployment`` (e.g. ``importance/importance-gpu``) runs the data-aware estimators as a flow run of
    that deployment, i.e. on its (GPU) work pool; ``evaluation_deployment`` (e.g. ``evaluate/evaluate-gpu``) does
    the same for lm-eval; ``tracking_uri`` overrides MLFLOW_TRACKING_URI.
    """
    parsed, recipe_dir = recipe_parameter(recipe)
    label = parsed.name or parsed.merge_method
    result = run_recipes([(label, parsed)], recipe_dir=recipe_dir, registered_name=registered_name,
                         importance_deployment=importance_deployment, evaluation_deployment=evaluation_deployment,
                         device=device, tracking_uri=tracking_uri)
    entry = result["models"][label]
    registration, promotion = entry.get("registration"), result.get("promotion")
    summary = {"model": entry["merged"].path, "content_hash": entry["merged"].content_hash,
               "accuracy": entry["evaluation"].accuracy, "in_domain_avg": entry["evaluation"].in_domain_avg,
               "registration": registration.to_json() if registration else None,
               "promotion": promotion.to_json() if promotion else None}
    print(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--registered-name", default=None)
    parser.add_argument("--importance-deployment", default=None)
    parser.add_argument("--evaluation-deployment", default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    merge_pipeline(args.recipe, registered_name=args.registered_name,
                   importance_deployment=args.importance_deployment,
                   evaluation_deployment=args.evaluation_deployment, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
