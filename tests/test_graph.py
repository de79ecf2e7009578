"""The stage graph: planning de-duplicates across recipes, the selection rule, nodes as data, and a new stage added
through the graph alone (one node class + one task) run by the local executor and on Prefect."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest

from mergeflow import graph
from mergeflow.manifests import Manifest, ResolvedModel
from tests.zoo_fixtures import test_zoo  # noqa: F401

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

TASKS = ("topic", "nli", "complete")


def recipe(**extra: Any) -> dict[str, Any]:
    data = {"merge_method": "ties", "base_model": "zoo:test/base", "name": "graph test",
            "models": [{"model": f"zoo:test/{t}", "parameters": {"density": 0.3}, "task": t} for t in TASKS],
            "parameters": {"lambda": 1.0},
            "evaluation": {"tasks": ["zoo"], "zoo": "zoo:test", "limit": 20,
                           "selection": {"split": "validation", "limit": 10}}}
    data.update(extra)
    return data


def aware(**extra: Any) -> dict[str, Any]:
    return recipe(merge_method="task_arithmetic", models=[{"model": f"zoo:test/{t}", "task": t} for t in TASKS],
                  importance=[{"estimator": "cocktail", "data": {"zoo": "zoo:test"}}], **extra)


def test_plan_shares_stages_across_recipes():
    plan = graph.plan([("a", recipe()), ("b", recipe(parameters={"lambda": 0.5})),
                       ("c", aware()), ("d", aware(parameters={"lambda": 0.5}))],
                      extra_models={"base": "zoo:test/base"})
    stages = Counter(n.stage for n in plan.nodes)
    # one resolve per checkpoint; task vectors per (expert, trim settings): TIES' density 0.3 and TA's none
    assert stages["resolve"] == 4 and stages["task_vectors"] == 6
    # the two TA recipes share their estimator run; every recipe has its merge, two evaluations and a registration
    assert stages["importance"] == 1 and stages["merge"] == 4
    assert stages["evaluate"] == 4 * 2 + 1 and stages["register"] == 4 and stages["promote"] == 1
    assert plan.targets["c"].coefficients == plan.targets["d"].coefficients
    # inputs come first; waves group what may run together
    seen: set[graph.Node] = set()
    for node in plan.nodes:
        assert set(node.inputs()) <= seen
        seen.add(node)
    assert [sorted({n.stage for n in wave}) for wave in plan.waves()] == [
        ["resolve"], ["evaluate", "importance", "task_vectors"], ["merge"], ["evaluate"], ["register"], ["promote"]]
    # a recipe that differs only in its evaluation or registry sections merges the same model
    again = graph.plan([("a", recipe()), ("e", recipe(registry={"name": "other"}))])
    assert again.targets["a"].merged == again.targets["e"].merged and again.count("merge") == 1


def test_selection_is_evaluated_when_split_or_limit_differ():
    def selection(sel: dict[str, Any]) -> graph.EvaluateNode | None:
        plan = graph.plan([("x", recipe(evaluation={"tasks": ["zoo"], "zoo": "zoo:test", "limit": 20,
                                                     "selection": sel}))], register=False)
        return plan.targets["x"].selection

    assert selection({"split": "test", "limit": 20}) is None
    assert selection({"split": "test", "limit": 10}).limit == 10  # type: ignore[union-attr]
    node = selection({"split": "validation", "limit": 20})
    assert node is not None and (node.split, node.limit) == ("validation", 20)


def test_nodes_are_data():
    plan = graph.plan([("a", aware())])
    registration = plan.targets["a"].registration
    assert registration is not None
    back = graph.node_from_json(json.loads(json.dumps(registration.to_json())))
    assert back == registration and back.key == registration.key and hash(back) == hash(registration)
    # context fields (an index for messages, the recipe a node reads settings from) are not its identity
    imp = plan.targets["a"].coefficients[0]
    assert imp.model_copy(update={"index": 3}).parameters() == imp.parameters()
    with pytest.raises(Exception, match="frozen"):
        imp.spec = "{}"  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------- a new stage


class WeightBytes(Manifest):
    """The toy stage's manifest."""

    volatile = frozenset({"seconds"})

    reference: str
    content_hash: str
    bytes: int
    scale: int
    seconds: float = 0.0


class WeightBytesNode(graph.Node):
    """A toy stage: the bytes of a checkpoint's weight files (times ``scale``), read from its resolve manifest."""

    stage: ClassVar[str] = "weight_bytes"
    model: graph.ResolveNode
    scale: int = 1

    def label(self) -> str:
        return f"weight_bytes {self.model.reference}"

    def run(self, inputs: Sequence[Any], ctx: graph.RunContext) -> WeightBytes:
        (model,) = inputs
        assert isinstance(model, ResolvedModel)
        size = sum((Path(model.path) / f).stat().st_size for f in model.weight_files)
        return WeightBytes(reference=model.reference, content_hash=model.content_hash, bytes=size * self.scale,
                           scale=self.scale)


def test_a_new_stage_runs_locally_and_on_prefect(test_zoo):  # noqa: F811
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from tasks.stages import stage_task, task_for

    weight_bytes = stage_task(WeightBytesNode)  # the one line the Prefect layer needs
    assert task_for(WeightBytesNode(model=graph.ResolveNode(reference="zoo:test/base"))) is weight_bytes

    plan = graph.Plan()
    nodes = [plan.add(WeightBytesNode(model=graph.ResolveNode(reference=f"zoo:test/{m}"), scale=2))
             for m in ("base", "topic", "base")]
    assert nodes[0] is nodes[2] and plan.count("weight_bytes") == 2 and plan.count("resolve") == 2
    expected = {m: 2 * sum(p.stat().st_size for p in test_zoo.member(m).glob("*.safetensors"))
                for m in ("base", "topic")}

    # locally
    local = graph.execute(plan.nodes)
    assert {r.reference: r.bytes for n, r in local.items() if n.stage == "weight_bytes"} == {
        f"zoo:test/{m}": b for m, b in expected.items()}

    # on Prefect: the same plan, each node its task; a second run is served from the task cache
    @flow(name="toy-graph")
    def toy_flow() -> dict[str, Any]:
        from flows.common import submit_plan

        futures = submit_plan(plan, device="cpu")
        return {futures[n].result().reference: futures[n].result() for n in plan.nodes if n.stage == "weight_bytes"}

    with prefect_test_harness(server_startup_timeout=120):
        first = toy_flow(return_state=True)
        assert first.is_completed(), first
        assert {ref: r.bytes for ref, r in first.result().items()} == {f"zoo:test/{m}": b for m, b in expected.items()}
        names = _task_run_states(first.state_details.flow_run_id, expected=4)
        assert sorted(names) == ["resolve zoo:test/base", "resolve zoo:test/topic", "weight_bytes zoo:test/base",
                                 "weight_bytes zoo:test/topic"]
        second = toy_flow(return_state=True)
        assert set(_task_run_states(second.state_details.flow_run_id, expected=4).values()) == {"Cached"}


def _task_run_states(flow_run_id: Any, expected: int, timeout: float = 60.0) -> dict[str, str]:
    """The flow run's task runs (name → state), read once the server holds ``expected`` of them, each in a final
    state: Prefect 3 sends task-run states to the server as events, which can land after the flow has returned
    (seconds later on a loaded machine)."""
    import asyncio
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    deadline = time.monotonic() + timeout
    while True:
        runs = asyncio.run(read())
        settled = len(runs) >= expected and all(r.state is not None and r.state.is_final() for r in runs)
        if settled or time.monotonic() > deadline:
            return {r.name: r.state.name if r.state else "" for r in runs}
        time.sleep(0.5)
