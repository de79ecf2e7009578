"""The stage graph: the one owner of the pipeline's DAG.

Each stage of a run is a :class:`Node` — frozen, hashable data that names its input nodes and its parameters, knows
its key and how to run (it calls the stage functions of :mod:`mergeflow.pipeline`). :func:`plan` turns labelled
recipes (one recipe, a sweep's grid, the demo's method table) into one de-duplicated graph: two recipes that read
the same checkpoint share its ``resolve`` node, a sweep over a merge knob shares its ``task_vectors`` and
``importance`` nodes, and the selection evaluation is the reported one when both ask for the same split and limit.
:func:`execute` runs a graph in this process; the Prefect layer (``tasks/``, ``flows/``) maps each node to its
task instead, and the CLI, the demo, ``zoo matrix``, the flows and the benchmarks all plan through here.

Adding a stage is one :class:`Node` subclass (its fields: parameters and input nodes; its ``run``) and, for
Prefect, one task in ``tasks/stages.py``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, PrivateAttr

from mergeflow import pipeline
from mergeflow.cache import cache_key
from mergeflow.errors import RecipeError
from mergeflow.manifests import (
    CoefficientsRef,
    Evaluation,
    MergedModel,
    Promotion,
    Registration,
    ResolvedModel,
    TaskVectors,
)
from mergeflow.recipe import EvaluationSpec, Recipe, parse_recipe


@dataclass(frozen=True)
class RunContext:
    """How a node runs, not what it computes (never part of a key): the device of the heavy stages, the MLflow
    store, the orchestrator's run id for provenance."""

    device: str = "cpu"
    tracking_uri: str | None = None
    flow_run_id: str | None = None


class Node(BaseModel):
    """A stage of a run. Fields are its parameters and its input nodes (a node, a tuple of nodes or None); nodes
    compare and hash by :attr:`key`, so planning the same stage twice gives one node.

    ``context_fields`` are carried for the run (a recipe to read settings from, an index for messages) but are not
    part of the node's identity: another field must already determine everything they could change.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    stage: ClassVar[str] = ""
    context_fields: ClassVar[frozenset[str]] = frozenset()
    _key: str | None = PrivateAttr(default=None)

    # ------------------------------------------------------------------ structure

    def _items(self) -> Iterator[tuple[str, Any]]:
        for name in type(self).model_fields:
            yield name, getattr(self, name)

    def inputs(self) -> tuple[Node, ...]:
        """The nodes this one reads, in field order (a tuple field contributes its items)."""
        out: list[Node] = []
        for _, value in self._items():
            if isinstance(value, Node):
                out.append(value)
            elif isinstance(value, tuple) and value and all(isinstance(v, Node) for v in value):
                out.extend(value)
        return tuple(out)

    def parameters(self) -> dict[str, Any]:
        """The node's own parameters (JSON), without its input nodes and context fields."""
        out = {}
        for name, value in self._items():
            if name in self.context_fields or isinstance(value, Node) or (
                    isinstance(value, tuple) and value and all(isinstance(v, Node) for v in value)):
                continue
            out[name] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        return out

    @property
    def key(self) -> str:
        """The node's identity: its stage, its parameters and its inputs' keys."""
        if self._key is None:
            self._key = cache_key("node", stage=self.stage, parameters=self.parameters(),
                                  inputs=[n.key for n in self.inputs()])
        return self._key

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.key == self.key  # type: ignore[attr-defined]

    def bind(self, results: Sequence[Any]) -> dict[str, Any]:
        """The input fields with each input node replaced by its result (``results`` in :meth:`inputs` order)."""
        it = iter(results)
        out: dict[str, Any] = {}
        for name, value in self._items():
            if isinstance(value, Node):
                out[name] = next(it)
            elif isinstance(value, tuple) and value and all(isinstance(v, Node) for v in value):
                out[name] = tuple(next(it) for _ in value)
            elif value is None or value == ():
                out[name] = value
        return out

    def label(self) -> str:
        return self.stage

    # ------------------------------------------------------------------ running

    def run(self, inputs: Sequence[Any], ctx: RunContext) -> Any:
        """Compute this stage from its inputs' results (in :meth:`inputs` order)."""
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "node": self.model_dump(mode="json")}


# ---------------------------------------------------------------------------------------------------- the stages


@functools.lru_cache(maxsize=512)
def _recipe(canonical: str, recipe_dir: str | None) -> Recipe:
    """A node's recipe, validated once per process however many nodes and stages read it."""
    return parse_recipe(json.loads(canonical), recipe_dir=Path(recipe_dir) if recipe_dir else None)


def _canonical(recipe: Recipe) -> str:
    return json.dumps(recipe.canonical(), sort_keys=True, separators=(",", ":"))


class ResolveNode(Node):
    """A checkpoint reference to a checked local snapshot (downloads are the orchestrator's to retry)."""

    stage: ClassVar[str] = "resolve"
    reference: str
    recipe_dir: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    confine_paths: bool = False  # the recipe's: weight files linked outside the checkpoint folder are refused
    adapter_base: str | None = None  # a LoRA adapter folder: the recipe's base_model, which it applies to

    def parameters(self) -> dict[str, Any]:
        out = super().parameters()
        if not self.confine_paths:  # keys of unconfined resolves (and the caches keyed by them) stay as they were
            out.pop("confine_paths")
        if self.adapter_base is None:  # likewise for every reference that is not a plain adapter folder
            out.pop("adapter_base")
        return out

    def label(self) -> str:
        return f"resolve {self.reference}"

    def run(self, inputs: Sequence[Any], ctx: RunContext) -> ResolvedModel:
        return pipeline.resolve_stage(self.reference, recipe_dir=self.recipe_dir, allow_pickle=self.allow_pickle,
                                      trust_remote_code=self.trust_remote_code, confine_paths=self.confine_paths,
                                      adapter_base=self.adapter_base)


class TaskVectorsNode(Node):
    """An expert's task vector summarised, with its global trim thresholds. Keyed by the two checkpoints and the
    trim settings only (``recipe`` just reads them), so recipes that differ elsewhere share it."""

    stage: ClassVar[str] = "task_vectors"
    context_fields: ClassVar[frozenset[str]] = frozenset({"recipe", "index"})
    base: ResolveNode
    expert: ResolveNode
    trim: str  # JSON of pipeline.trim_settings (the settings that decide the densities)
    allow_pickle: bool = False
    recipe: str = ""
    index: int = 0
    recipe_dir: str | None = None

    def label(self) -> str:
        return f"task_vectors {self.expert.reference}"

    def densities(self, base: ResolvedModel) -> list[float]:
        return pipeline.trim_densities(_recipe(self.recipe, self.recipe_dir), base, self.index)

    def run(self, inputs: Sequence[Any], ctx: RunContext) -> TaskVectors:
        base, expert = inputs
        return pipeline.task_vectors_stage(base, expert, self.densities(base), allow_pickle=self.allow_pickle)


class ImportanceNode(Node):
    """One importance entry over all experts: the Coefficients the merge consumes. Keyed by the entry, the
    experts' tasks and the checkpoints, so a changed merge knob reuses it."""

    stage: ClassVar[str] = "importance"
    context_fields: ClassVar[frozenset[str]] = frozenset({"index"})
    spec: str  # the recipe's importance entry, canonical JSON
    expert_tasks: tuple[str | None, ...]
    base: ResolveNode | None
    experts: tuple[ResolveNode, ...]
    recipe_dir: str | None = None
    index: int = 0  # its place in the recipe that planned it (messages only)

    @property
    def entry(self) -> dict[str, Any]:
        return json.loads(self.spec)

    @property
    def estimator(self) -> str:
        return str(self.entry["estimator"])

    def label(self) -> str:
        return f"importance {self.estimator}"

    def job(self, inputs: Sequence[Any]) -> pipeline.ImportanceJob:
        """The stage's work over the inputs' results (the resolve manifests of the base and the experts)."""
        bound = self.bind(inputs)
        return pipeline.ImportanceJob(self.entry, list(self.expert_tasks), bound["base"], list(bound["experts"]),
                                      self.index, self.recipe_dir)

    def shards(self, inputs: Sequence[Any]) -> list[dict[str, Any]]:
        """The per-expert measurement shards an orchestrator may measure side by side before :meth:`run`."""
        return self.job(inputs).shards()

    def run(self, inputs: Sequence[Any], ctx: RunContext) -> CoefficientsRef:
        return self.job(inputs).coefficients(ctx.device)


class MergeNode(Node):
    """The merged model, written into the content-addressed cache. Keyed by the recipe hash (not its evaluation or
    registry sections), the checkpoints and the Coefficients; the task vectors are inputs so that the global trim
    thresholds the merge reads are computed (and cached) first."""

    stage: ClassVar[str] = "merge"
    context_fields: ClassVar[frozenset[str]] = frozenset({"recipe"})
    recipe_hash: str
    recipe_dir: str | None = None
    method: str
    base: ResolveNode | None
    experts: tuple[ResolveNode, ...]
    coefficients: tuple[ImportanceNode, ...] = ()
    task_vectors: tuple[TaskVectorsNode, ...] = ()
    recipe: str = ""

    def parsed(self) -> Recipe:
        return _recipe(self.recipe, self.recipe_dir)

    def label(self) -> str:
        return f"merge {self.method}"

    def run(self, inputs: Sequence[Any], ctx: RunContext) -> MergedModel:
        bound = self.bind(inputs)
        return pipeline.merge_stage(self.parsed(), bound["base"], list(bound["experts"]),
                                    list(bound["coefficients"]), device=ctx.device)


class EvaluateNode(Node):
    """lm-eval accuracy of a model (a merge, or a resolved checkpoint: the demo's base and experts) on one split."""

    stage: ClassVar[str] = "evaluate"
    model: MergeNode | ResolveNode
    spec: str  # the recipe's evaluation section, canonical JSON
    split: str
    limit: int | None = None
    recipe_dir: str | None = None

    def evaluation_spec(self) -> EvaluationSpec:
        return EvaluationSpec.model_validate(json.loads(self.spec))

    def label(self) -> str:
        return f"evaluate {self.split}"

    def run(self, inputs: Sequence[Any], ctx: RunContext) -> Evaluation:
        (model,) = inputs
        return pipeline.evaluate_stage(model, self.evaluation_spec(), split=self.split, limit=self.limit,
                                       recipe_dir=self.recipe_dir, device=ctx.device)


class RegisterNode(Node):
    """An MLflow run and model version for one merge (its alias moves only through :class:`PromoteNode` when
    ``promote`` is off)."""

    stage: ClassVar[str] = "register"
    recipe: str  # the whole recipe (its params, evaluation and registry sections are logged)
    recipe_dir: str | None = None
    registered_name: str
    promote: bool = False
    merged: MergeNode
    checkpoints: tuple[ResolveNode, ...]
    reported: EvaluateNode
    selection: EvaluateNode | None = None
    coefficients: tuple[ImportanceNode, ...] = ()

    def parsed(self) -> Recipe:
        return _recipe(self.recipe, self.recipe_dir)

    def run(self, inputs: Sequence[Any], ctx: RunContext) -> Registration:
        from mergeflow import tracking  # MLflow: the optional [pipeline] extra

        bound = self.bind(inputs)
        tracking.configure(ctx.tracking_uri)
        return pipeline.register_stage(self.parsed(), bound["merged"], list(bound["checkpoints"]), bound["reported"],
                                       bound["selection"], list(bound["coefficients"]),
                                       registered_name=self.registered_name, promote=self.promote,
                                       flow_run_id=ctx.flow_run_id)


class PromoteNode(Node):
    """The end of registration for a run of several merges: each alias moves to the run's best version, and only if
    it beats the current holder."""

    stage: ClassVar[str] = "promote"
    candidates: tuple[RegisterNode, ...]

    def run(self, inputs: Sequence[Any], ctx: RunContext) -> Promotion:
        from mergeflow import tracking  # MLflow: the optional [pipeline] extra

        tracking.configure(ctx.tracking_uri)
        return pipeline.promote_best(list(inputs))


# ---------------------------------------------------------------------------------------------------------- plan


@dataclass
class Target:
    """What a plan computes for one labelled recipe."""

    label: str
    recipe: Recipe
    merged: MergeNode
    reported: EvaluateNode
    selection: EvaluateNode | None = None
    registration: RegisterNode | None = None
    coefficients: tuple[ImportanceNode, ...] = ()


@dataclass
class Plan:
    """One de-duplicated graph: every node once, inputs before the nodes that read them."""

    nodes: list[Node] = field(default_factory=list)
    targets: dict[str, Target] = field(default_factory=dict)
    extra: dict[str, EvaluateNode] = field(default_factory=dict)  # checkpoints evaluated as rows of a table
    promote: PromoteNode | None = None

    def add(self, node: Node) -> Node:
        """``node`` in the graph (with its inputs, first); the node already there when an equal one was planned."""
        known = self._index.get(node)
        if known is not None:
            return known
        for dep in node.inputs():
            self.add(dep)
        self._index[node] = node
        self.nodes.append(node)
        return node

    def __post_init__(self) -> None:
        self._index: dict[Node, Node] = {}
        for n in list(self.nodes):
            self._index.setdefault(n, n)

    def waves(self) -> list[list[Node]]:
        """The nodes by depth (a node's inputs are all in earlier waves), each wave in planning order: what an
        orchestrator may submit together, and where it may hand one stage's nodes to another pool in one go."""
        depth: dict[Node, int] = {}
        for n in self.nodes:  # inputs are added before the nodes that read them
            depth[n] = 1 + max((depth[d] for d in n.inputs()), default=-1)
        out: list[list[Node]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
        for n in self.nodes:
            out[depth[n]].append(n)
        return out

    def count(self, stage: str) -> int:
        return sum(1 for n in self.nodes if n.stage == stage)


def as_recipes(recipes: Iterable[tuple[str, Recipe | Mapping[str, Any]]] | Recipe,
               recipe_dir: str | Path | None = None) -> list[tuple[str, Recipe]]:
    if isinstance(recipes, Recipe):
        return [(recipes.name or recipes.merge_method, recipes)]
    folder = Path(recipe_dir) if recipe_dir else None
    return [(label, pipeline.as_recipe(r, base_dir=folder)) for label, r in recipes]


def resolve_nodes(recipe: Recipe) -> tuple[ResolveNode | None, tuple[ResolveNode, ...]]:
    """The base's and the experts' resolve nodes (references checked against the recipe's path rules first)."""
    folder = str(recipe.recipe_dir) if recipe.recipe_dir else None

    def node(ref: str) -> ResolveNode:
        recipe.resolve_reference(ref)  # refuses a path outside a confined recipe's folder before anything runs
        return ResolveNode(reference=ref, recipe_dir=folder, allow_pickle=recipe.allow_pickle,
                           trust_remote_code=recipe.trust_remote_code, confine_paths=recipe.confine_paths,
                           adapter_base=recipe.adapter_base_of(ref))

    base_ref, expert_refs = pipeline.references(recipe)
    return (node(base_ref) if base_ref else None), tuple(node(r) for r in expert_refs)


def importance_nodes(recipe: Recipe, base: ResolveNode | None,
                     experts: tuple[ResolveNode, ...]) -> tuple[ImportanceNode, ...]:
    folder = str(recipe.recipe_dir) if recipe.recipe_dir else None
    out = []
    for i in range(len(recipe.importance)):
        what = pipeline.importance_inputs(recipe, i)
        out.append(ImportanceNode(spec=json.dumps(what["spec"], sort_keys=True), expert_tasks=tuple(
            what["expert_tasks"]), base=base, experts=experts, recipe_dir=folder, index=i))
    return tuple(out)


def merge_node(recipe: Recipe) -> MergeNode:
    """The merge of ``recipe`` with everything it reads: resolve, task vectors, importance."""
    folder = str(recipe.recipe_dir) if recipe.recipe_dir else None
    canonical = _canonical(recipe)
    base, experts = resolve_nodes(recipe)
    vectors: list[TaskVectorsNode] = []
    if base is not None:
        for i, expert in enumerate(experts):
            vectors.append(TaskVectorsNode(base=base, expert=expert, trim=json.dumps(
                pipeline.trim_settings(recipe, i), sort_keys=True), allow_pickle=recipe.allow_pickle,
                recipe=canonical, index=i, recipe_dir=folder))
    return MergeNode(recipe_hash=recipe.recipe_hash(), recipe_dir=folder, method=recipe.merge_method, base=base,
                     experts=experts, coefficients=importance_nodes(recipe, base, experts),
                     task_vectors=tuple(vectors), recipe=canonical)


def evaluate_node(model: MergeNode | ResolveNode, spec: EvaluationSpec, *, split: str | None = None,
                  limit: int | None = None, recipe_dir: str | Path | None = None) -> EvaluateNode:
    """``model`` evaluated with ``spec`` on ``split`` (default: the reported one) and ``limit``."""
    return EvaluateNode(model=model, spec=json.dumps(spec.model_dump(mode="json"), sort_keys=True),
                        split=split or spec.split, limit=spec.limit if split is None else limit,
                        recipe_dir=str(recipe_dir) if recipe_dir else None)


def evaluate_nodes(recipe: Recipe, model: MergeNode | ResolveNode) -> tuple[EvaluateNode, EvaluateNode | None]:
    """The reported evaluation and the selection's (None when it is the reported one: pipeline.evaluation_splits)."""
    spec = pipeline.evaluation_spec(recipe)
    pipeline.check_evaluation_zoo(spec, recipe.recipe_dir)  # untrusted task code: refused before any merge runs
    nodes = [evaluate_node(model, spec, split=split, limit=limit, recipe_dir=recipe.recipe_dir)
             for split, limit in pipeline.evaluation_splits(spec)]
    return nodes[0], (nodes[1] if len(nodes) > 1 else None)


def plan(recipes: Iterable[tuple[str, Recipe | Mapping[str, Any]]] | Recipe, *, recipe_dir: str | Path | None = None,
         register: bool = True, registered_name: str | None = None,
         extra_models: Mapping[str, str] | None = None) -> Plan:
    """One graph for labelled recipes (label, recipe or mapping; a single Recipe is its own label): each merged,
    evaluated on the reported split (and the selection split when it differs), registered without moving the alias,
    then one ``promote`` for the run. ``extra_models`` (label → reference) are only resolved and evaluated, with the
    first recipe's evaluation settings (the base and experts rows of the demo's table)."""
    out = Plan()
    parsed = as_recipes(recipes, recipe_dir)
    if not parsed:
        raise RecipeError("plan: no recipe")
    for label, recipe in parsed:
        merged = out.add(merge_node(recipe))
        assert isinstance(merged, MergeNode)
        reported, selection = evaluate_nodes(recipe, merged)
        target = Target(label, recipe, merged, out.add(reported),  # type: ignore[arg-type]
                        out.add(selection) if selection else None,  # type: ignore[arg-type]
                        coefficients=merged.coefficients)
        if register:
            name = pipeline.registry_spec(recipe, registered_name).name
            assert name is not None
            target.registration = out.add(RegisterNode(  # type: ignore[assignment]
                recipe=_canonical(recipe), recipe_dir=merged.recipe_dir, registered_name=name, merged=merged,
                checkpoints=((merged.base,) if merged.base else ()) + merged.experts, reported=target.reported,
                selection=target.selection, coefficients=merged.coefficients))
        out.targets[label] = target
    first = parsed[0][1]
    folder = str(first.recipe_dir) if first.recipe_dir else None
    for label, ref in (extra_models or {}).items():
        model = out.add(ResolveNode(reference=ref, recipe_dir=folder, adapter_base=first.adapter_base_of(ref)))
        out.extra[label] = out.add(evaluate_nodes(first, model)[0])  # type: ignore[arg-type, assignment]
    registrations = tuple(t.registration for t in out.targets.values() if t.registration is not None)
    if registrations:
        out.promote = out.add(PromoteNode(candidates=registrations))  # type: ignore[assignment]
    return out


# ------------------------------------------------------------------------------------------------------ execute


def execute(nodes: Iterable[Node], ctx: RunContext | None = None,
            results: dict[Node, Any] | None = None) -> dict[Node, Any]:
    """Run ``nodes`` (and whatever they read) in this process, each once, inputs first; returns node → result."""
    ctx = ctx or RunContext()
    done: dict[Node, Any] = {} if results is None else results

    def run(node: Node) -> Any:
        if node not in done:
            inputs = [run(dep) for dep in node.inputs()]
            done[node] = node.run(inputs, ctx)
        return done[node]

    for node in nodes:
        run(node)
    return done


@dataclass
class RunResult:
    """A plan's results gathered per recipe (the library's and the flows' common output)."""

    plan: Plan
    results: dict[Node, Any]

    def entry(self, label: str) -> dict[str, Any]:
        t = self.plan.targets[label]
        return {"recipe_hash": t.recipe.recipe_hash(), "merged": self.results[t.merged],
                "evaluation": self.results[t.reported],
                "selection": self.results[t.selection] if t.selection is not None else None,
                "coefficients": [self.results[c] for c in t.coefficients],
                "registration": self.results.get(t.registration) if t.registration is not None else None}

    @property
    def promotion(self) -> Promotion | None:
        return self.results.get(self.plan.promote) if self.plan.promote is not None else None

    def extra(self) -> dict[str, Evaluation]:
        return {label: self.results[node] for label, node in self.plan.extra.items()}


def run_plan(graph: Plan, ctx: RunContext | None = None) -> RunResult:
    return RunResult(graph, execute(graph.nodes, ctx))


def run_pipeline(recipe: Recipe | Mapping[str, Any] | str | Path, *, registered_name: str | None = None,
                 device: str = "cpu", register: bool = True) -> dict[str, Any]:
    """resolve → task_vectors → importance → merge → evaluate → register (→ promote), in this process, no
    orchestrator: the one-recipe plan run by :func:`execute`."""
    parsed = pipeline.as_recipe(recipe)
    label = parsed.name or parsed.merge_method
    graph = plan([(label, parsed)], register=register, registered_name=registered_name)
    done = run_plan(graph, RunContext(device=device))
    entry = done.entry(label)
    t = graph.targets[label]
    out = {"inputs": [done.results[n] for n in ((t.merged.base,) if t.merged.base else ()) + t.merged.experts],
           "task_vectors": [done.results[n] for n in t.merged.task_vectors], **entry}
    if register:
        out["promotion"] = done.promotion
    else:
        out.pop("registration")
    return out


def node_from_json(data: Mapping[str, Any]) -> Node:
    """A node back from :meth:`Node.to_json` (a deployment's parameter)."""
    kinds = {cls.stage: cls for cls in _node_classes()}
    if data.get("stage") not in kinds:
        raise RecipeError(f"graph: unknown stage {data.get('stage')!r} (known: {', '.join(sorted(kinds))})")
    return kinds[data["stage"]].model_validate(data["node"])


def _node_classes() -> list[type[Node]]:
    out: list[type[Node]] = []
    todo = list(Node.__subclasses__())
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in out if c.stage]


def manifest_from_json(stage: str, data: Mapping[str, Any]) -> Any:
    """A stage's manifest back from JSON (what a deployment's flow run returns)."""
    kinds: dict[str, type[BaseModel]] = {"resolve": ResolvedModel, "task_vectors": TaskVectors,
                                         "importance": CoefficientsRef, "merge": MergedModel,
                                         "evaluate": Evaluation, "register": Registration, "promote": Promotion}
    return kinds[stage].model_validate(data) if stage in kinds else data
