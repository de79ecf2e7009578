"""The sweep: a grid of methods and hyper-parameters over the same experts.

    python -m flows.sweep recipes/zoo-sweep.yaml [--grid '{"parameters.lambda": [0.3, 0.5, 1.0]}']

Shared stages (resolve, task vectors, importance) run once; the merges fan out; each result is evaluated and
registered; the alias (``champion``) moves to the best merge of the sweep, on the recipe's selection metric computed
on validation data, and only if it beats the current champion. The grid comes from the parameter, else from the
recipe file's ``grid:`` section.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml
from prefect import flow

from flows.common import run_recipes
from flows.runtime import project_dir, task_runner
from mergeflow.errors import RecipeError
from mergeflow.pipeline import as_recipe, expand_grid
from mergeflow.recipe import Recipe


def sweep_parameter(recipe: str | dict[str, Any], grid: dict[str, list[Any]] | None) -> tuple[
        list[tuple[str, Recipe]], str]:
    """The grid points of a sweep, validated: a recipe file (or mapping) whose optional ``grid:`` section lists the
    values to try; a ``grid`` parameter replaces that section."""
    if isinstance(recipe, dict):
        data, folder = dict(recipe), project_dir()
    else:
        path = Path(recipe).expanduser()
        path = path if path.is_absolute() else project_dir() / path
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as e:
            raise RecipeError(f"recipe {recipe!r}: cannot read {path} ({e.strerror or e})") from None
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {recipe!r}: expected a mapping at the top level")
        folder = path.parent.resolve()
    file_grid = data.pop("grid", None) or {}
    points = expand_grid(data, grid if grid is not None else file_grid)
    return [(label, as_recipe(point, base_dir=folder)) for label, point in points], str(folder)


@flow(name="merge-sweep", task_runner=task_runner(), log_prints=True)
def sweep(recipe: str | dict[str, Any], grid: dict[str, list[Any]] | None = None,
          registered_name: str | None = None, importance_deployment: str | None = None,
          evaluation_deployment: str | None = None, device: str = "auto",
          tracking_uri: str | None = None) -> dict[str, Any]:
    """Merge, evaluate and register every grid point; promote the best one if it beats the champion."""
    points, recipe_dir = sweep_parameter(recipe, grid)
    result = run_recipes(points, recipe_dir=recipe_dir, registered_name=registered_name,
                         importance_deployment=importance_deployment, evaluation_deployment=evaluation_deployment,
                         device=device, tracking_uri=tracking_uri)
    table = {label: {"in_domain_avg": e["evaluation"].in_domain_avg,
                     "selection": e["registration"].selection_value if e.get("registration") else None,
                     "version": e["registration"].version if e.get("registration") else None}
             for label, e in result["models"].items()}
    promotion = result.get("promotion")
    summary = {"points": table, "promotion": promotion.to_json() if promotion else None}
    print(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--grid", type=json.loads, default=None, help="JSON object: dotted path → list of values")
    parser.add_argument("--registered-name", default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    sweep(args.recipe, grid=args.grid, registered_name=args.registered_name, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
