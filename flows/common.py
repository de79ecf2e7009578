"""One engine for every flow: run a list of recipes over shared inputs.

resolve (once per checkpoint) → task_vectors (once per base/expert/density) → importance (once per distinct
estimator run, on the gpu pool when a deployment is named) → merge (fan-out) → evaluate (reported split, and the
selection split) → register (every merge a run and a model version) → promote (the alias moves to the best merge of
the run, and only if it beats the current holder). The merge pipeline is this with one recipe; the sweep with a
grid; the demo with the zoo's baselines and data-aware methods.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture, wait

from mergeflow import pipeline
from tasks import stages


@dataclass
class Job:
    """One recipe of the run and where its stages' futures are."""

    label: str
    recipe: dict[str, Any]
    parsed: Any
    importance_keys: list[str] = field(default_factory=list)  # its importance runs, in the recipe's order
    vectors: list[PrefectFuture] = field(default_factory=list)
    merged: PrefectFuture | None = None
    reported: PrefectFuture | None = None
    selection: PrefectFuture | None = None
    registered: PrefectFuture | None = None


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def run_recipes(recipes: Sequence[tuple[str, Mapping[str, Any]]], *, recipe_dir: str | None,
                registered_name: str | None = None, importance_deployment: str | None = None,
                device: str = "auto", tracking_uri: str | None = None, register: bool = True,
                extra_models: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run labelled recipes (label, recipe mapping) through every stage; ``extra_models`` (label → reference) are
    only resolved and evaluated (the base and the experts, as rows of the table)."""
    log = get_run_logger()
    if register:
        from mergeflow import tracking

        # create (and migrate) a new store once, here, before parallel workers touch it at the same moment
        tracking.ensure_store(tracking_uri)
    folder = Path(recipe_dir) if recipe_dir else None
    jobs = [Job(label, dict(data), pipeline.as_recipe(data, base_dir=folder)) for label, data in recipes]

    # resolve: every distinct checkpoint once
    resolved: dict[str, PrefectFuture] = {}
    for job in jobs:
        base, experts = pipeline.references(job.parsed)
        for ref in ([base] if base else []) + experts:
            if ref not in resolved:
                resolved[ref] = stages.resolve.submit(ref, recipe_dir, **pipeline.resolve_options(job.parsed))
    extra_refs = dict(extra_models or {})
    first = jobs[0].recipe
    for ref in extra_refs.values():
        if ref not in resolved:
            resolved[ref] = stages.resolve.submit(ref, recipe_dir)
    manifests = {ref: f.result() for ref, f in resolved.items()}

    # task_vectors: once per (base, expert, densities)
    vectors: dict[str, PrefectFuture] = {}
    for job in jobs:
        base_ref, expert_refs = pipeline.references(job.parsed)
        if base_ref is None:
            continue
        base = manifests[base_ref]
        for i, ref in enumerate(expert_refs):
            densities = pipeline.trim_densities(job.parsed, base, i)
            k = _key([base["content_hash"], manifests[ref]["content_hash"], densities])
            if k not in vectors:
                vectors[k] = stages.task_vectors.submit(base, manifests[ref], densities, job.parsed.allow_pickle)
            job.vectors.append(vectors[k])

    # importance: once per distinct estimator run (its spec, the base, the experts and their tasks)
    runs: dict[str, Any] = {}
    shards: dict[str, PrefectFuture] = {}  # per-expert measurement shards, once each however many entries need them
    remote: list[tuple[Job, int, str]] = []
    for job in jobs:
        base_ref, expert_refs = pipeline.references(job.parsed)
        base = manifests[base_ref] if base_ref else None
        experts = [manifests[r] for r in expert_refs]
        for i in range(len(job.parsed.importance)):
            what = pipeline.importance_inputs(job.parsed, i)
            k = _key([what, base and base["content_hash"], [e["content_hash"] for e in experts]])
            if k not in runs:
                if importance_deployment:
                    runs[k] = None
                    remote.append((job, i, k))
                else:
                    runs[k] = submit_importance(what["spec"], what["expert_tasks"], base, experts, i, recipe_dir,
                                                device, shards)
            job.importance_keys.append(k)
    if remote:
        runs.update(_remote_importance(importance_deployment, remote, recipe_dir, device))

    # merge → evaluate → register, fanned out
    for job in jobs:
        base_ref, expert_refs = pipeline.references(job.parsed)
        inputs = [manifests[r] for r in ([base_ref] if base_ref else []) + expert_refs]
        coefficients = [runs[k] for k in job.importance_keys]
        job.merged = stages.merge.submit(job.recipe, inputs, coefficients, recipe_dir, device, wait_for=job.vectors)
        spec = pipeline.evaluation_spec(job.parsed)
        job.reported = stages.evaluate.submit(job.recipe, job.merged, spec.split, spec.limit, recipe_dir, device)
        if spec.selection.split != spec.split or spec.selection.limit != spec.limit:
            job.selection = stages.evaluate.submit(job.recipe, job.merged, spec.selection.split,
                                                   spec.selection.limit, recipe_dir, device)
        if register:
            job.registered = stages.register.submit(
                job.recipe, job.merged, inputs, job.reported, selection=job.selection, coefficients=coefficients,
                registered_name=registered_name, tracking_uri=tracking_uri, recipe_dir=recipe_dir, promote=False)
    extra_evals = {}
    for label, ref in extra_refs.items():
        spec = pipeline.evaluation_spec(jobs[0].parsed)
        extra_evals[label] = stages.evaluate.submit(first, manifests[ref], spec.split, spec.limit, recipe_dir,
                                                    device)

    wait([f for job in jobs for f in (job.merged, job.reported, job.selection, job.registered) if f is not None])
    results: dict[str, Any] = {"models": {}, "extra": {k: f.result() for k, f in extra_evals.items()}}
    candidates = []
    for job in jobs:
        entry = {"recipe_hash": job.parsed.recipe_hash(), "merged": job.merged.result(),
                 "evaluation": job.reported.result(),
                 "selection": job.selection.result() if job.selection is not None else None}
        if job.registered is not None:
            entry["registration"] = job.registered.result()
            candidates.append(entry["registration"])
        results["models"][job.label] = entry
    if candidates:
        results["promotion"] = stages.promote(candidates, tracking_uri)
        log.info("alias %s of %s: %s", results["promotion"]["alias"], results["promotion"]["name"],
                 results["promotion"]["summary"])
    _publish_artifacts(results)
    return results


def submit_importance(spec: Mapping[str, Any], expert_tasks: Sequence[str | None], base: Any, experts: Sequence[Any],
                      index: int, recipe_dir: str | None, device: str,
                      shared: dict[str, PrefectFuture] | None = None) -> PrefectFuture:
    """One importance entry: its per-expert measurement shards fanned out over the task runner (each an
    ``importance_measure`` task, tagged ``gpu``), then the entry's ``importance`` task, which finalizes from the
    cached shards. ``base`` and ``experts`` are resolve manifests (or futures of them); ``shared`` (measurement key
    → future) lets entries of one run that measure the same shard (two Sens entries that differ in a temperature)
    submit it once."""
    base_m = base.result() if isinstance(base, PrefectFuture) else base
    expert_ms = [e.result() if isinstance(e, PrefectFuture) else e for e in experts]
    shared = {} if shared is None else shared
    measured = []
    for s in pipeline.importance_shards(spec, expert_tasks, base_m, expert_ms, index=index, recipe_dir=recipe_dir):
        if s["key"] not in shared:
            shared[s["key"]] = stages.importance_measure.submit(spec, expert_tasks, base_m, expert_ms, s["part"],
                                                                s["experts"], index, recipe_dir, device)
        measured.append(shared[s["key"]])
    return stages.importance.submit(spec, expert_tasks, base_m, expert_ms, index, recipe_dir, device,
                                    wait_for=measured)


def _remote_importance(deployment: str, remote: list[tuple[Job, int, str]], recipe_dir: str | None,
                       device: str) -> dict[str, Any]:
    """Run the importance entries as one flow run of ``deployment`` (a gpu work pool) and wait for its result."""
    from prefect.deployments import run_deployment

    jobs = [{"recipe": job.recipe, "index": i} for job, i, _ in remote]
    flow_run = run_deployment(deployment, parameters={"jobs": jobs, "recipe_dir": recipe_dir, "device": device},
                              timeout=None, as_subflow=True)
    state = flow_run.state
    if state is None or not state.is_completed():
        raise RuntimeError(f"importance deployment {deployment!r}: flow run {flow_run.id} ended "
                           f"{state.name if state else 'without a state'}")
    manifests = state.result()
    return {k: m for (_, _, k), m in zip(remote, manifests)}


def accuracy_matrix(results: Mapping[str, Any]) -> dict[str, Any]:
    """The run's accuracies in the zoo matrix's JSON shape (rows: extra models, then merges)."""
    models: dict[str, dict[str, float]] = {}
    in_domain: list[str] = []
    ood: list[str] = []
    for label, ev in results.get("extra", {}).items():
        models[label] = ev["accuracy"]
    for label, entry in results["models"].items():
        ev = entry["evaluation"]
        models[label] = ev["accuracy"]
        in_domain = in_domain or ev["in_domain"]
        ood = ood or ev["ood"]
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
        lines += [f"**Registered model** `{promotion['name']}` — alias `{promotion['alias']}`: "
                  f"{promotion['summary']}", ""]
    lines += ["| model | method | in-domain avg | selection | version | run |", "|---|---|---|---|---|---|"]
    for label, entry in results["models"].items():
        reg = entry.get("registration") or {}
        sel = reg.get("selection_value")
        lines.append(f"| {label} | {entry['merged']['method']} | {entry['evaluation']['in_domain_avg']:.1f} | "
                     f"{'' if sel is None else f'{sel:.1f}'} | {reg.get('model_uri', '')} | "
                     f"{reg.get('run_id', '')} |")
    lines += ["", "Each merged model's folder holds its model card (README.md) and provenance (mergeflow.json)."]
    create_markdown_artifact(key="model-card-summary", markdown="\n".join(lines),
                             description="Merged models of this run and where they are registered")
