"""What every flow shares: where the project is, how a recipe parameter is read, which task runner fans out.

Task runner (``MERGEFLOW_TASK_RUNNER``; default ``dask`` for the sweep and the demo, ``threads`` for one recipe):
  * ``dask``: a local Dask cluster of worker processes (one per core, one thread each, so two CPU-bound
    stages really run side by side and torch's thread pools do not fight);
  * ``dask-threads``: one in-process Dask worker with threads (no process start-up; for tests and tiny runs);
  * ``tcp://HOST:PORT``: an existing Dask scheduler (a cluster of CPU/GPU machines);
  * ``threads``: Prefect's own thread pool.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import prefect.settings
from prefect.task_runners import ThreadPoolTaskRunner

from mergeflow.errors import RecipeError
from mergeflow.pipeline import as_recipe

# Workers log to Prefect: per-model progress bars of transformers/datasets would drown the run's log in the UI.
for _name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ENV_PROJECT = "MERGEFLOW_PROJECT_DIR"
# set when this process published its own ephemeral API address (the demo without a server), not a real server's
EPHEMERAL_API: dict[str, str] = {}
ENV_RUNNER = "MERGEFLOW_TASK_RUNNER"
ENV_WORKERS = "MERGEFLOW_DASK_WORKERS"


def project_dir() -> Path:
    """The project folder: ``MERGEFLOW_PROJECT_DIR``, else the current directory (a worker's working directory)."""
    raw = os.environ.get(ENV_PROJECT, "").strip()
    return Path(raw).expanduser().resolve() if raw else Path.cwd().resolve()


def recipe_parameter(recipe: str | Mapping[str, Any]) -> tuple[Any, str]:
    """A recipe flow parameter (a YAML/JSON path relative to the project folder, or the recipe itself) as a validated
    Recipe, plus the folder its relative model paths refer to; a bad recipe is refused before any task runs."""
    if isinstance(recipe, Mapping):
        return as_recipe(recipe, base_dir=project_dir()), str(project_dir())
    path = Path(recipe).expanduser()
    if not path.is_absolute():
        path = project_dir() / path
    if not path.is_file():
        raise RecipeError(f"recipe {recipe!r}: no such file ({path})")
    return as_recipe(path), str(path.parent.resolve())


def share_ephemeral_api() -> None:
    """Without a Prefect server (the demo), make the flow's ephemeral API the one task-runner worker processes use.

    Worker processes inherit the environment but not the flow's settings context: without ``PREFECT_API_URL``
    each would start (and stop) an ephemeral API server of its own. The ephemeral server is a per-process singleton,
    so this only starts it early and publishes its address.
    """
    if prefect.settings.PREFECT_API_URL.value() or os.environ.get("PREFECT_API_URL"):
        return
    if not prefect.settings.PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    # the API server's stack (FastAPI, SQLAlchemy; ~2 s, 1000 modules): only a run without a server needs it
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    EPHEMERAL_API["url"] = server.api_url


# Dask's scheduler always serves HTTP (health, metrics) even without a dashboard: loopback only, on a free port.
def _dask_runner_class() -> Any:
    # Dask and distributed (~0.3 s, 300 modules): not loaded by flows on the threads runner
    from prefect_dask import DaskTaskRunner

    class LocalDaskTaskRunner(DaskTaskRunner):
        """A Dask task runner whose worker processes report to the flow's own API, even an ephemeral one."""

        def __enter__(self) -> Any:
            share_ephemeral_api()
            logging.getLogger("distributed").setLevel(logging.WARNING)  # cluster start/stop chatter
            return super().__enter__()

    return LocalDaskTaskRunner


def task_runner(default: str = "dask") -> Any:
    """The task runner named by ``MERGEFLOW_TASK_RUNNER`` (see the module docstring), else ``default``: a flow of
    one recipe has little to fan out and takes threads, so it does not pay for starting worker processes."""
    choice = os.environ.get(ENV_RUNNER, default).strip() or default
    if choice == "threads":
        return ThreadPoolTaskRunner(max_workers=int(os.environ.get(ENV_WORKERS, "4")))
    runner = _dask_runner_class()
    if choice.startswith("tcp://"):
        return runner(address=choice)
    if choice == "dask-threads":
        return runner(cluster_kwargs={"n_workers": 1, "processes": False, "dashboard_address": "127.0.0.1:0",
                                      "threads_per_worker": int(os.environ.get(ENV_WORKERS, "2"))})
    if choice != "dask":
        raise ValueError(f"{ENV_RUNNER}={choice!r}: use dask, dask-threads, threads or tcp://HOST:PORT")
    workers = int(os.environ.get(ENV_WORKERS, "0")) or max(1, os.cpu_count() or 1)
    return runner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                  "dashboard_address": "127.0.0.1:0", "host": "127.0.0.1"})
