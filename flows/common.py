"""One way for every flow to run its recipes: plan the stage graph, submit each node as its task.

:func:`mergeflow.graph.plan` builds the run's de-duplicated graph — resolve (once per checkpoint) → task_vectors
(once per base/expert/trim) → importance (once per distinct estimator run) → merge → evaluate (reported split, and
the selection split when it differs) → register → promote — and :func:`submit_plan` maps every node to its Prefect
task (``tasks/stages.py``), or hands the nodes of a stage to a deployment (``importance_deployment``,
``evaluation_deployment``: the gpu pool) as one flow run. The merge pipeline is this with one recipe; the sweep
with a grid; the demo with the zoo's methods and the base and experts as extra rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.deployments import run_deployment
from prefect.futures import PrefectFuture, as_completed

from mergeflow import graph
from tasks import stages


def _value(x: Any) -> Any:
    return x.result() if isinstance(x, PrefectFuture) else x


def submit_importance(node: graph.ImportanceNode, inputs: Sequence[Any], device: str,
                      shared: dict[str, PrefectFuture] | None = None) -> PrefectFuture:
    """One importance node: its per-expert measurement shards fanned out over the task runner (each an
    ``importance_measure`` task, tagged ``gpu``), then the node's ``importance`` task, which finalizes from the
    cached shards. ``shared`` (measurement key → future) lets nodes of one run that measure the same shard (two
    Sens entries that differ in a temperature) submit it once."""
    inputs = [_value(i) for i in inputs]
    shared = {} if shared is None else shared
    measured = []
    for s in node.shards(inputs):
        if s["key"] not in shared:
            shared[s["key"]] = stages.importance_measure.submit(node, inputs, s["part"], s["experts"], device)
        measured.append(shared[s["key"]])
    return stages.importance.submit(node, inputs, device, wait_for=measured)


def submit_node(node: graph.Node, inputs: Sequence[Any], *, device: str, tracking_uri: str | None = None,
                shards: dict[str, PrefectFuture] | None = None) -> PrefectFuture:
    """``node`` as its task, reading ``inputs`` (manifests or futures of them, in the node's input order)."""
    if isinstance(node, graph.ImportanceNode):
        return submit_importance(node, inputs, device, shards)
    return stages.task_for(node).submit(node, list(inputs), device, tracking_uri)


def run_remote(deployment: str, nodes: Sequence[graph.Node], done: Mapping[graph.Node, Any],
               device: str) -> dict[graph.Node, Any]:
    """Run ``nodes`` as one flow run of ``deployment`` (a flow that calls :func:`run_jobs`, on its own work pool)
    and wait for their manifests."""
    jobs = [{"node": n.to_json(), "inputs": [_value(done[d]).to_json() for d in n.inputs()]} for n in nodes]
    flow_run = run_deployment(deployment, parameters={"jobs": jobs, "device": device}, timeout=None,
                              as_subflow=True)
    state = flow_run.state
    if state is None or not state.is_completed():
        raise RuntimeError(f"deployment {deployment!r}: flow run {flow_run.id} ended "
                           f"{state.name if state else 'without a state'}")
    return {n: graph.manifest_from_json(n.stage, m) for n, m in zip(nodes, state.result())}


def run_jobs(jobs: Sequence[Mapping[str, Any]], device: str) -> list[dict[str, Any]]:
    """The body of a deployment that runs nodes for another flow (see :func:`run_remote`): each job's node as its
    task on this worker, its inputs the manifests it was sent; the manifests back as JSON, in the jobs' order."""
    futures = []
    shards: dict[str, PrefectFuture] = {}
    for job in jobs:
        node = graph.node_from_json(job["node"])
        inputs = [graph.manifest_from_json(d.stage, m) for d, m in zip(node.inputs(), job["inputs"])]
        futures.append(submit_node(node, inputs, device=device, shards=shards))
    return [f.result().to_json() for f in futures]


def submit_plan(plan: graph.Plan, *, device: str, tracking_uri: str | None = None,
                deployments: Mapping[str, str | None] | None = None,
                before: Mapping[str, Callable[[], Any]] | None = None) -> dict[graph.Node, Any]:
    """Every node of ``plan`` submitted as its task, wave by wave (a node's inputs are submitted before it); the
    nodes of a stage named in ``deployments`` (stage → deployment) run as one flow run of that deployment per
    wave instead. ``before`` (stage → callable): called once, before the first node of that stage is submitted
    (what must be ready by then: the MLflow store before the merges), or at the end if the plan has none. Returns
    node → future (or manifest, for nodes that ran elsewhere)."""
    remote = {stage: name for stage, name in (deployments or {}).items() if name}
    waiting = dict(before or {})
    futures: dict[graph.Node, Any] = {}
    shards: dict[str, PrefectFuture] = {}
    for wave in plan.waves():
        for stage in [s for s in waiting if any(node.stage == s for node in wave)]:
            waiting.pop(stage)()
        elsewhere: dict[str, list[graph.Node]] = {}
        for node in wave:
            if node.stage in remote:
                elsewhere.setdefault(node.stage, []).append(node)
            else:
                futures[node] = submit_node(node, [futures[d] for d in node.inputs()], device=device,
                                            tracking_uri=tracking_uri, shards=shards)
        for stage, nodes in elsewhere.items():
            futures.update(run_remote(remote[stage], nodes, futures, device))
    for call in waiting.values():
        call()
    return futures


def wait_logging_progress(futures: Mapping[graph.Node, Any], log: Any) -> None:
    """Wait for every submitted node, logging each one that finishes as done / to do, stage by stage and in all
    (a run of the demo's table is minutes of importance, merges and evaluations that otherwise show nothing)."""
    pending = {id(f): (node, f) for node, f in futures.items() if isinstance(f, PrefectFuture)}
    totals = Counter(node.stage for node, _ in pending.values())
    finished: Counter[str] = Counter()
    for i, future in enumerate(as_completed([f for _, f in pending.values()]), start=1):
        node, _ = pending[id(future)]
        finished[node.stage] += 1
        log.info("%s %d/%d done (%s); %d/%d steps of the run", node.stage, finished[node.stage],
                 totals[node.stage], node.label(), i, len(pending))


def _ensure_store(tracking_uri: str | None) -> str:
    from mergeflow import tracking  # MLflow (~1-3 s to import): only when a run registers, not in every worker

    return tracking.ensure_store(tracking_uri)


def _in_background(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """Start ``fn(*args)`` on a thread now; the returned callable waits for it and returns its result or raises
    its error."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeflow-prepare")
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return future.result


def run_recipes(recipes: Sequence[tuple[str, Any]], *, recipe_dir: str | None,
                registered_name: str | None = None, importance_deployment: str | None = None,
                evaluation_deployment: str | None = None, device: str = "auto", tracking_uri: str | None = None,
                register: bool = True, extra_models: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run labelled recipes (label, Recipe or mapping) through every stage; ``extra_models`` (label → reference) are
    only resolved and evaluated (the base and the experts, as rows of the table)."""
    log = get_run_logger()
    plan = graph.plan(recipes, recipe_dir=recipe_dir, register=register, registered_name=registered_name,
                      extra_models=extra_models)
    # Create (and migrate) a new MLflow store once, in this process, before parallel workers touch it at the same
    # moment: on a thread while the checkpoints, task vectors and importance are resolved or read from the cache
    # (importing MLflow and opening a SQLite store take seconds), and waited for before the first merge is
    # submitted, so a store that cannot be opened still stops the run before its merges and evaluations.
    store_ready = {"merge": _in_background(_ensure_store, tracking_uri)} if register else {}
    futures = submit_plan(plan, device=device, tracking_uri=tracking_uri,
                          deployments={"importance": importance_deployment, "evaluate": evaluation_deployment},
                          before=store_ready)
    wait_logging_progress(futures, log)
    done = graph.RunResult(plan, {n: _value(f) for n, f in futures.items()})
    results: dict[str, Any] = {"models": {label: done.entry(label) for label in plan.targets},
                               "extra": done.extra()}
    if done.promotion is not None:
        results["promotion"] = done.promotion
        log.info("alias %s of %s: %s", done.promotion.alias, done.promotion.name, done.promotion.summary)
    _publish_artifacts(results)
    return results


def accuracy_matrix(results: Mapping[str, Any]) -> dict[str, Any]:
    """The run's accuracies in the zoo matrix's JSON shape (rows: extra models, then merges)."""
    models: dict[str, dict[str, float]] = {}
    in_domain: list[str] = []
    ood: list[str] = []
    for label, ev in results.get("extra", {}).items():
        models[label] = ev.accuracy
    for label, entry in results["models"].items():
        ev = entry["evaluation"]
        models[label] = ev.accuracy
        in_domain = in_domain or ev.in_domain
        ood = ood or ev.ood
    return {"tasks": {"in_domain": in_domain, "ood": ood}, "models": models}


def _publish_artifacts(results: Mapping[str, Any]) -> None:
    """A table artifact with the accuracy matrix and a markdown model-card summary with registry links."""
    matrix = accuracy_matrix(results)
    tasks = matrix["tasks"]["in_domain"] + matrix["tasks"]["ood"]
    rows = []
    for label, acc in matrix["models"].items():
        row = {"model": label, **{t: round(acc[t], 1) for t in tasks if t in acc}}
        ind = [acc[t] for t in matrix["tasks"]["in_domain"] if t in acc]
        row["in_domain_avg"] = round(sum(ind) / len(ind), 1) if ind else None
        rows.append(row)
    create_table_artifact(key="accuracy-matrix", table=rows,
                          description="Accuracy (%) of every model of the run on the reported split")
    lines = ["# mergeflow run", ""]
    promotion = results.get("promotion")
    if promotion:
        lines += [f"**Registered model** `{promotion.name}` — alias `{promotion.alias}`: {promotion.summary}", ""]
    lines += ["| model | method | in-domain avg | selection | version | run |", "|---|---|---|---|---|---|"]
    for label, entry in results["models"].items():
        reg = entry.get("registration")
        sel = f"{reg.selection_value:.1f}" if reg else ""
        lines.append(f"| {label} | {entry['merged'].method} | {entry['evaluation'].in_domain_avg:.1f} | {sel} | "
                     f"{reg.model_uri if reg else ''} | {reg.run_id if reg else ''} |")
    lines += ["", "Each merged model's folder holds its model card (README.md) and provenance (mergeflow.json)."]
    create_markdown_artifact(key="model-card-summary", markdown="\n".join(lines),
                             description="Merged models of this run and where they are registered")
