"""The demo flow (the README's main command, ``make demo``): the offline zoo through the whole pipeline on Prefect.

    python -m flows.demo [--size full|test] [--regime hard|sft] [--seed N] [--limit N] [--data-free-only] [--out demo_results]

zoo (built once, cached) → resolve → task_vectors → importance (the data-aware methods' estimators) → merges (the
data-free baselines and the data-aware methods, fanned out) → evaluate (lm-eval, test split; the selection metric on
validation) → register (every merge a version of ``mergeflow-demo``; ``champion`` moves to the best on validation).
Without PREFECT_API_URL it runs on Prefect's ephemeral API; without MLFLOW_TRACKING_URI it registers into
``mlflow.db`` / ``mlartifacts/`` in the project folder. It prints the table (APL's Table 1 shape), the registered
model and its champion version, and how to open both UIs on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Offline machine: no telemetry, and room for the ephemeral API server's first start (SQLite migrations).
for _name, _value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
                      ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"), ("HF_HUB_OFFLINE", "1")):
    os.environ.setdefault(_name, _value)

from prefect import flow, get_run_logger, task  # noqa: E402

from flows.common import accuracy_matrix, run_recipes  # noqa: E402
from flows.runtime import EPHEMERAL_API, project_dir, task_runner  # noqa: E402
from mergeflow.errors import MergeflowError  # noqa: E402
from mergeflow.paths import mergeflow_home  # noqa: E402
from mergeflow.zoo.build import Zoo, build_zoo  # noqa: E402
from mergeflow.zoo.matrix import DATA_AWARE_MERGES, DATA_FREE_MERGES, format_table, save_png  # noqa: E402
from tasks.policies import CONTENT, results_path  # noqa: E402

DEMO_MODEL = "mergeflow-demo"


@task(name="zoo", cache_policy=CONTENT, persist_result=True, result_storage=results_path())
def zoo(size: str, seed: int, home: str, regime: str = "sft") -> dict[str, Any]:
    """The offline model zoo (tokenizer, base, one expert per task, lm-eval task files), built deterministically
    once under MERGEFLOW_HOME (``home`` keys the cached result to it); its progress goes to the task's log."""
    built = build_zoo(size=size, seed=seed, regime=regime, progress=get_run_logger().info)
    return {"root": str(built.root), "size": built.size, "seed": built.seed, "in_domain": list(built.in_domain),
            "ood": list(built.ood), "recipe": built.manifest.get("recipe_sha256")}


def demo_recipes(zoo_info: dict[str, Any], *, data_aware: bool, limit: int | None,
                 selection_limit: int | None) -> list[tuple[str, dict[str, Any]]]:
    """One recipe per demo method, naming the zoo's models by reference (the same recipe on every machine)."""
    the_zoo = Zoo.load(zoo_info["root"])
    ref = f"zoo:{the_zoo.size}@{the_zoo.seed}"
    evaluation = {"tasks": ["zoo", "zoo-ood"], "zoo": ref, "split": "test", "limit": limit,
                  "selection": {"metric": "in_domain_avg", "split": "validation", "limit": selection_limit}}
    specs = DATA_FREE_MERGES + (DATA_AWARE_MERGES if data_aware else ())
    out = []
    for spec in specs:
        recipe = spec.recipe(the_zoo, the_zoo.seed, by_reference=True)
        recipe["name"] = spec.label
        recipe["evaluation"] = {k: v for k, v in evaluation.items() if v is not None}
        recipe["registry"] = {"name": DEMO_MODEL}
        out.append((spec.label, recipe))
    return out


@flow(name="mergeflow-demo", task_runner=task_runner(), log_prints=True)
def demo_flow(size: str = "full", seed: int = 0, data_aware: bool = True, limit: int | None = None,
              selection_limit: int | None = 200, out: str = "demo_results",
              tracking_uri: str | None = None, regime: str = "sft") -> dict[str, Any]:
    """Build the zoo, merge its experts with every demo method, evaluate, register, print the table."""
    start = time.perf_counter()
    info = zoo(size, seed, str(mergeflow_home()), regime)
    print(f"zoo {info['size']} seed {seed}: {info['root']} (in-domain {', '.join(info['in_domain'])}; out-of-domain "
          f"{', '.join(info['ood'])})")
    recipes = demo_recipes(info, data_aware=data_aware, limit=limit, selection_limit=selection_limit)
    ref = f"zoo:{info['size']}@{seed}"
    extra = {"base": f"{ref}/base", **{f"expert:{t}": f"{ref}/{t}" for t in info["in_domain"]}}
    result = run_recipes(recipes, recipe_dir=str(project_dir()), registered_name=DEMO_MODEL, device="auto",
                         tracking_uri=tracking_uri, extra_models=extra)
    matrix = {**accuracy_matrix(result), "split": "test", "zoo": {"size": info["size"], "seed": seed}}
    folder = Path(out) if Path(out).is_absolute() else project_dir() / out
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "accuracy_matrix.json").write_text(json.dumps(matrix, indent=2) + "\n")
    table = format_table(matrix)
    (folder / "accuracy_table.txt").write_text(table + "\n")
    png = save_png(matrix, folder / "accuracy_table.png", title=f"mergeflow demo: zoo {info['size']}, seed {seed}")
    promotion = result["promotion"].to_json() if result.get("promotion") else {}
    print("\n" + table)
    print(f"\nwrote {folder / 'accuracy_matrix.json'}, {folder / 'accuracy_table.txt'} and {png}")
    from mergeflow import tracking  # MLflow (~1-3 s to import): not in the Dask workers that unpickle the zoo task

    holder = tracking.champion(DEMO_MODEL)  # the registry's word (this run's promote may be a cached result)
    label = next((lbl for lbl, e in result["models"].items()
                  if holder and e.get("registration") and e["registration"].version == holder.version), None)
    print(f"registered model {DEMO_MODEL!r}: champion = version {holder.version if holder else None}"
          + (f" ({label}, {holder.metric} {holder.value:.2f})" if holder and label and holder.value is not None
             else "")
          + f"; this run: {promotion.get('summary', 'nothing registered')}")
    champion_uri = f"models:/{DEMO_MODEL}@champion"
    print(f"load it (with MLFLOW_TRACKING_URI={tracking_uri or tracking.tracking_uri()}): "
          f"mlflow.pyfunc.load_model({champion_uri!r}) or mlflow.transformers.load_model({champion_uri!r}); serve it: "
          f"mlflow models serve -m {champion_uri} --env-manager local -h 127.0.0.1 -p 5001 (venv activated: it "
          f"starts uvicorn from PATH); its transformers "
          f"folder: mergeflow.checkpoints.resolve({champion_uri!r}).path")
    print(ui_commands(tracking_uri))
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return {"matrix": matrix, "promotion": promotion}


def ui_commands(tracking_uri: str | None = None) -> str:
    """How to look at the run: the Prefect UI over the same database, and the MLflow UI over the same store."""
    from mergeflow import tracking  # MLflow (~1-3 s to import): not in the Dask workers that unpickle the zoo task

    uri = tracking_uri or tracking.tracking_uri()
    mlflow_ui = (f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
                 if uri.startswith("sqlite:") else f"open {uri} (the MLflow server the runs went to)")

    server = os.environ.get("PREFECT_API_URL")
    if not server or EPHEMERAL_API.get("url") == server:  # this run's temporary server is gone when it ends
        prefect_ui = ("prefect server start --host 127.0.0.1 --port 4200   (then http://127.0.0.1:4200; it reads "
                      "this run's database, under the same PREFECT_HOME)")
    else:
        prefect_ui = f"open {server.removesuffix('/api')}"
    return ("to look at the runs:\n"
            f"  Prefect UI: {prefect_ui}\n"
            f"  MLflow UI:  {mlflow_ui}   (then http://127.0.0.1:5000)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["full", "test"], default="full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--regime", choices=["hard", "sft"], default="sft",
                        help="the zoo's merging regime (README: two regimes)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N test examples of each task")
    parser.add_argument("--selection-limit", type=int, default=200,
                        help="validation examples per task for the selection metric (champion choice)")
    parser.add_argument("--data-free-only", action="store_true")
    parser.add_argument("--out", default="demo_results")
    args = parser.parse_args(argv)

    try:
        demo_flow(size=args.size, seed=args.seed, regime=args.regime, data_aware=not args.data_free_only, limit=args.limit,
                  selection_limit=args.selection_limit, out=args.out)
    except MergeflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
