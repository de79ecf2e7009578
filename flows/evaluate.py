"""The evaluate stage on its own, as a flow a GPU work pool runs (``evaluation_deployment`` of the pipelines).

At 7B, lm-eval over a merged model belongs on a GPU, like the estimators. The pipelines hand their evaluate nodes
to this flow as one flow run (``flows.common.run_remote``), each with the manifest of the model it reads (a merged
model in the shared MERGEFLOW_HOME, or a resolved checkpoint); it evaluates them on ``device`` (``auto``: CUDA when
the worker has one) and returns the Evaluation manifests in the jobs' order. The scores are cached by content, so a
re-run on any pool finds them.
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


@flow(name="evaluate", task_runner=task_runner(), persist_result=True, result_storage=results_path())
def evaluate_flow(jobs: list[dict[str, Any]], device: str = "auto") -> list[dict[str, Any]]:
    """Evaluations for each ``{"node", "inputs"}`` job, on ``device`` (``auto``: CUDA if present)."""
    return run_jobs(jobs, device)
