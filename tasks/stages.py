"""The pipeline's stages as Prefect tasks: one per node class of :mod:`mergeflow.graph` (``resolve``,
``task_vectors``, ``importance``, ``merge``, ``evaluate``, ``register``, ``promote``), plus ``importance_measure``,
the per-expert shards an importance node fans out into.

Every task takes the node, its inputs' manifests (in the node's input order) and where it runs (``device``, the
MLflow store), and runs the node; what this layer adds is caching (``tasks/policies.py``: the node's parameters and
its inputs' content), persisted results, retries and tags. A new stage is a node class plus one ``stage_task`` line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect import Task, task
from prefect.cache_policies import CachePolicy
from prefect.runtime import flow_run, task_run

from mergeflow import graph
from mergeflow.manifests import Measurement
from tasks.policies import CONTENT, PROMOTE, REGISTER, RESOLVE, results_path

_RESULTS = results_path()
TASKS: dict[type[graph.Node], Task] = {}


def _flow_run_id() -> str | None:
    return str(flow_run.id) if flow_run.id else None


def _run_name() -> str:
    return task_run.parameters["node"].label()


def stage_task(node_type: type[graph.Node], *, cache_policy: CachePolicy = CONTENT, named: bool = True,
               **options: Any) -> Task:
    """The Prefect task that runs ``node_type``'s nodes: named after the stage (each run after the node's
    ``label()`` when ``named``), cached by ``cache_policy``, its result persisted; ``options`` go to ``@task``
    (retries, tags)."""

    def run(node: graph.Node, inputs: Sequence[Any] = (), device: str = "cpu",
            tracking_uri: str | None = None) -> Any:
        ctx = graph.RunContext(device=device, tracking_uri=tracking_uri, flow_run_id=_flow_run_id())
        return node.run(list(inputs), ctx)

    run.__name__ = run.__qualname__ = node_type.stage
    run.__doc__ = node_type.__doc__
    if named:
        options["task_run_name"] = _run_name
    made = task(name=node_type.stage, cache_policy=cache_policy, persist_result=True, result_storage=_RESULTS,
                **options)(run)
    TASKS[node_type] = made
    return made


def task_for(node: graph.Node) -> Task:
    """The task registered for ``node``'s class (or the nearest base class that has one)."""
    for cls in type(node).__mro__:
        if cls in TASKS:
            return TASKS[cls]
    raise KeyError(f"no Prefect task for stage {node.stage!r} ({type(node).__name__}); add a stage_task line")


# downloads (hub, registry) are retried with back-off
resolve = stage_task(graph.ResolveNode, cache_policy=RESOLVE, retries=3, retry_delay_seconds=[10, 60, 300])
task_vectors = stage_task(graph.TaskVectorsNode)
# tagged gpu: a concurrency limit on the tag bounds how many run at once on the GPU workers
importance = stage_task(graph.ImportanceNode, tags=["gpu"])
merge = stage_task(graph.MergeNode)
evaluate = stage_task(graph.EvaluateNode)
register = stage_task(graph.RegisterNode, cache_policy=REGISTER, named=False, retries=2, retry_delay_seconds=[10, 60])
promote = stage_task(graph.PromoteNode, cache_policy=PROMOTE, named=False)


def _measure_name() -> str:
    p = task_run.parameters
    return f"importance_measure {p['node'].estimator} {p['part']} experts {list(p['shard'])}"


@task(name="importance_measure", cache_policy=CONTENT, persist_result=True, result_storage=_RESULTS, tags=["gpu"],
      task_run_name=_measure_name)
def importance_measure(node: graph.ImportanceNode, inputs: Sequence[Any], part: str, shard: Sequence[int],
                       device: str = "auto") -> Measurement:
    """One shard of an importance node's measurements (the experts that share their task data: one expert each
    in-domain), measured into the shared cache; the node's ``importance`` task waits for its shards and finalizes
    without a model pass. Tagged ``gpu`` like ``importance``: the shards of one estimator run spread over the GPU
    workers (or the local cluster's processes) instead of queueing on one."""
    return node.job(list(inputs)).measure(part, shard, device)
