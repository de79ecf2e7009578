"""The importance stage on its own, as a flow a GPU work pool runs (``importance_deployment`` of the pipelines).

Its parameter is the importance nodes the pipeline did not run itself, each with the resolve manifests it reads
(``flows.common.run_remote``). It fans each node's per-expert measurement shards out over its task runner
(``importance_measure`` tasks, measured side by side by the runner's workers) and returns the Coefficients
manifests in the jobs' order; the artifacts themselves stay in the content-addressed cache, which is why the GPU
and CPU workers share MERGEFLOW_HOME.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prefect import flow

from flows.common import run_jobs
from flows.runtime import task_runner
from tasks.policies import results_path


@flow(name="importance", task_runner=task_runner(), persist_result=True, result_storage=results_path())
def importance_flow(jobs: list[dict[str, Any]], device: str = "auto") -> list[dict[str, Any]]:
    """Coefficients for each ``{"node", "inputs"}`` job, on ``device`` (``auto``: CUDA if present)."""
    return run_jobs(jobs, device)
