"""The Prefect flows in process, on Prefect's test harness (a temporary API server and database) and a real SQLite
MLflow store: the sweep shares its stages and promotes only a better merge; the pipeline's artifacts; the demo flow
on the test zoo end to end. The real server + worker + mlflow server path is tests/test_integration.py."""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from pathlib import Path

import pytest

from tests.zoo_fixtures import test_zoo  # noqa: F401

# In-process Dask threads: no worker processes to start for a test (the default local cluster is exercised by the
# demo and the integration test's workers).
os.environ.setdefault("MERGEFLOW_TASK_RUNNER", "dask-threads")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

TASKS = ("topic", "nli", "complete")


def recipe(**extra):
    data = {"name": "flow test", "merge_method": "ties", "base_model": "zoo:test/base",
            "models": [{"model": f"zoo:test/{t}", "parameters": {"density": 0.3}, "task": t} for t in TASKS],
            "parameters": {"lambda": 1.0},
            "evaluation": {"tasks": ["zoo", "zoo-ood"], "zoo": "zoo:test", "limit": 30,
                           "selection": {"split": "validation", "limit": 20}},
            "registry": {"name": "flow-test"}}
    data.update(extra)
    return data


@pytest.fixture(scope="module")
def harness(test_zoo, tmp_path_factory):  # noqa: F811
    from prefect.testing.utilities import prefect_test_harness

    root = tmp_path_factory.mktemp("flows")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("MERGEFLOW_PROJECT_DIR", str(root))
    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield root
    finally:
        mp.undo()
        import mlflow

        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


def task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return asyncio.run(read())


def versions(name: str) -> dict[str, float]:
    from mlflow import MlflowClient

    client = MlflowClient()
    out = {}
    for v in client.search_model_versions(f"name = '{name}'"):
        key = next(k for k in v.tags if k.startswith("mergeflow.selection."))
        out[str(v.version)] = float(v.tags[key])
    return out


def champion_version(name: str) -> str:
    from mlflow import MlflowClient

    return str(MlflowClient().get_registered_model(name).aliases["champion"])


def test_sweep_shares_stages_and_promotes_only_a_better_merge(harness):
    from flows.sweep import sweep

    state = sweep(recipe(), grid={"parameters.lambda": [0.5, 1.0]}, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    runs = task_runs(state.state_details.flow_run_id)
    names = Counter(r.name.split(" ")[0].rsplit("-", 1)[0] for r in runs)
    # shared stages once (3 experts + base), merges fanned out, both evaluated on two splits and registered
    assert names["resolve"] == 4 and names["task_vectors"] == 3
    assert names["merge"] == 2 and names["evaluate"] == 4 and names["register"] == 2 and names["promote"] == 1
    assert all(r.state.is_completed() for r in runs)
    values = versions("flow-test")
    assert len(values) == 2
    best = max(values, key=lambda v: (values[v], -int(v)))
    assert champion_version("flow-test") == best == result["promotion"]["version"]

    # a second sweep: the alias moves only if its best merge beats the champion, on the validation metric
    before = values[best]
    state = sweep(recipe(), grid={"parameters.lambda": [0.3, 0.7]}, return_state=True)
    assert state.is_completed(), state
    values = versions("flow-test")
    assert len(values) == 4
    new = {v: x for v, x in values.items() if v not in ("1", "2")}
    best_new = max(new, key=lambda v: (new[v], -int(v)))
    expected = best_new if new[best_new] > before else best
    assert champion_version("flow-test") == expected
    assert state.result()["promotion"]["moved"] == (expected == best_new)


def test_pipeline_artifacts_and_a_changed_knob_recomputes_only_later_stages(harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.merge_pipeline import merge_pipeline

    aware = recipe(merge_method="task_arithmetic", parameters={"lambda": 1.0},
                   models=[{"model": f"zoo:test/{t}", "task": t} for t in TASKS],
                   importance=[{"estimator": "cocktail", "data": {"zoo": "zoo:test"}}], registry={"name": "flow-ta"})
    first = merge_pipeline(aware, return_state=True)
    assert first.is_completed(), first
    changed = merge_pipeline({**aware, "parameters": {"lambda": 0.7}}, return_state=True)
    assert changed.is_completed(), changed
    states = {r.name.split(" ")[0].rsplit("-", 1)[0]: r.state.name for r in task_runs(
        changed.state_details.flow_run_id)}
    assert states["resolve"] == states["task_vectors"] == states["importance"] == "Cached"
    assert states["merge"] == states["evaluate"] == states["register"] == "Completed"

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[first.state_details.flow_run_id])))

    found = {a.key: a for a in asyncio.run(artifacts())}
    assert found["accuracy-matrix"].type == "table"
    assert "flow-ta" in found["model-card-summary"].data
    result = first.result()
    rows = json.loads(found["accuracy-matrix"].data)
    assert [r["model"] for r in rows] == ["flow test"]
    assert rows[0]["in_domain_avg"] == round(result["in_domain_avg"], 1)
    assert {t: rows[0][t] for t in TASKS} == {t: round(result["accuracy"][t], 1) for t in TASKS}

    from mlflow import MlflowClient

    client = MlflowClient()
    run = client.get_run(result["registration"]["run_id"])
    assert run.data.tags["mergeflow.flow_run_id"] == str(first.state_details.flow_run_id)
    assert run.data.params["importance.0.estimator"] == "cocktail"
    listed = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model_card", "evaluation"} <= listed and "model" not in listed  # the model is the run's logged model
    [output] = run.outputs.model_outputs
    version = client.get_model_version("flow-ta", result["registration"]["version"])
    assert version.source == f"models:/{output.model_id}" and result["registration"]["model_id"] == output.model_id
    assert version.description.startswith("task_arithmetic (lambda=1.0); importance cocktail; 3 experts over "
                                          "zoo:test/base; selection validation_in_domain_avg = "), version.description
    names = {d.dataset.name for d in run.inputs.dataset_inputs}
    assert {f"{t}/test[:30]" for t in TASKS} | {f"{t}/validation[:20]" for t in TASKS} <= names, names
    assert any(p.startswith("coefficients") for p in listed) and any(p.startswith("importance_heatmaps")
                                                                      for p in listed)
    # the changed knob's registration logged the same heatmaps, drawn once for the cached coefficients
    from mergeflow.cache import Cache
    from mergeflow.pipeline import PLOTS_KIND

    def heatmaps(run_id: str) -> dict[str, bytes]:
        folder = Path(client.download_artifacts(run_id, "importance_heatmaps/0-cocktail", str(harness / run_id)))
        return {f.name: f.read_bytes() for f in folder.iterdir()}

    drawn = heatmaps(run.info.run_id)
    assert drawn and heatmaps(changed.result()["registration"]["run_id"]) == drawn
    entries = [e for e in (Cache().root / PLOTS_KIND).iterdir() if not e.name.startswith(".")]
    assert len(entries) == 1, entries

    # the same run again: every stage is served from the cache; register's and promote's keys include the registry's
    # state (the version holding these weights, who holds the alias), so the first repeat checks the registry once
    # (the version is reused, nothing logged; the alias stays) and later ones are cached ...
    again = merge_pipeline(aware, return_state=True)
    states = {r.name.split(" ")[0].rsplit("-", 1)[0]: r.state.name for r in task_runs(
        again.state_details.flow_run_id)}
    assert {k: v for k, v in states.items() if k not in ("register", "promote")} == dict.fromkeys(
        ["resolve", "task_vectors", "importance", "merge", "evaluate"], "Cached")
    assert again.result()["registration"]["version"] == result["registration"]["version"]
    assert again.result()["registration"]["reused"] or states["register"] == "Cached"
    assert not again.result()["promotion"]["moved"] or states["promote"] == "Cached"
    assert champion_version("flow-ta") == result["registration"]["version"]
    third = merge_pipeline(aware, return_state=True)
    assert {r.state.name for r in task_runs(third.state_details.flow_run_id)} == {"Cached"}
    # ... but once the version is gone from the registry, the merge is registered again (not a stale cache hit)
    client.delete_model_version("flow-ta", result["registration"]["version"])
    after = merge_pipeline(aware, return_state=True)
    states = {r.name.split(" ")[0].rsplit("-", 1)[0]: r.state.name for r in task_runs(
        after.state_details.flow_run_id)}
    assert states["merge"] == "Cached" and states["register"] == "Completed"
    registration = after.result()["registration"]
    assert registration["version"] != result["registration"]["version"] and not registration["reused"]
    assert client.get_model_version("flow-ta", registration["version"]).status == "READY"
    # the alias went with the deleted version: promote's key (who holds the alias now) changed, so it compared again
    assert states["promote"] == "Completed" and champion_version("flow-ta") == registration["version"]


def test_a_store_that_cannot_be_opened_stops_the_run_before_its_merge(harness, tmp_path):
    """The MLflow store is opened on a thread while the first stages run, and waited for before any merge."""
    from flows.merge_pipeline import merge_pipeline

    not_a_folder = tmp_path / "not-a-folder"
    not_a_folder.write_text("a file where the store's folder should be\n")
    state = merge_pipeline(recipe(registry={"name": "flow-no-store"}), tracking_uri=f"sqlite:///{not_a_folder}/m.db",
                           return_state=True)
    assert state.is_failed(), state
    assert "the MLflow store" in state.message and "cannot create its folder" in state.message, state.message
    stages = {r.name.split(" ")[0].rsplit("-", 1)[0] for r in task_runs(state.state_details.flow_run_id)}
    assert "resolve" in stages and not stages & {"merge", "evaluate", "register"}, stages


def test_demo_flow_on_the_test_zoo(harness, test_zoo, tmp_path):  # noqa: F811
    from flows.demo import DEMO_MODEL, demo_flow

    out = tmp_path / "demo"
    state = demo_flow(size="test", regime="hard", seed=0, limit=20, selection_limit=10, out=str(out), return_state=True)
    assert state.is_completed(), state
    # APL, Fisher, RegMean and the Sens sensitivities are measured expert by expert, each shard once although two
    # entries of APL (TA and MI-TA) and of Sens (TA and TIES) differ only in what finalize does with the same scores
    runs = Counter(r.name.split(" ")[0].rsplit("-", 1)[0] for r in task_runs(state.state_details.flow_run_id))
    assert runs["importance_measure"] == 4 * len(test_zoo.in_domain)
    matrix = state.result()["matrix"]
    from mergeflow.zoo.matrix import DATA_AWARE_MERGES, DATA_FREE_MERGES

    labels = ["base", *(f"expert:{t}" for t in test_zoo.in_domain)] + [m.label for m in DATA_FREE_MERGES +
                                                                        DATA_AWARE_MERGES]
    assert list(matrix["models"]) == labels
    assert matrix["tasks"] == {"in_domain": list(test_zoo.in_domain), "ood": list(test_zoo.ood)}
    assert (out / "accuracy_table.txt").read_text().startswith("method")
    assert Path(out / "accuracy_table.png").stat().st_size > 0
    values = versions(DEMO_MODEL)
    assert len(values) == len(DATA_FREE_MERGES + DATA_AWARE_MERGES)
    assert values[champion_version(DEMO_MODEL)] == max(values.values())
    # the demo's champion is an MLflow Model the standard loader takes
    import mlflow

    [text] = mlflow.pyfunc.load_model(f"models:/{DEMO_MODEL}@champion").predict(["the"], params={"max_new_tokens": 2})
    assert isinstance(text, str)
