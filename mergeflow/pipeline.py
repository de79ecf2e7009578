"""The merge pipeline's stages as plain functions: ``resolve``, ``task_vectors``, ``importance``, ``merge``,
``evaluate``, ``register`` (and ``promote``).

Each stage takes and returns small typed manifests (:mod:`mergeflow.manifests`: paths, content hashes and a few
numbers), never tensors, so an orchestrator can cache, retry, persist and ship them between machines; the heavy
intermediates (task-vector manifests, Coefficients, merged models, scores) live in the content-addressed cache
(:mod:`mergeflow.cache`) under keys made of their inputs' content hashes, their parameters and the code version. The
stage graph (:mod:`mergeflow.graph`) decides which stages a run needs and in which order; its nodes call these.
"""

from __future__ import annotations

import copy
import itertools
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from mergeflow.architecture import Architecture
from mergeflow.cache import Cache, cache_key
from mergeflow.checkpoints import Snapshot, open_checkpoint, read_model_config, resolve
from mergeflow.coefficients import Coefficients, plot_coefficients
from mergeflow.devices import pick_device
from mergeflow.errors import RecipeError
from mergeflow.importance.base import ModelRef
from mergeflow.importance.recipes import coefficients_for_importance, measure_for_importance, shards_for_importance
from mergeflow.manifests import (
    CoefficientsRef,
    Evaluation,
    Measurement,
    MergedModel,
    Promotion,
    Registration,
    ResolvedModel,
    TaskVectors,
)
from mergeflow.recipe import (
    EvaluationSpec,
    ImportanceSpec,
    Recipe,
    RegistrySpec,
    load_recipe,
    parse_recipe,
    resolve_path,
    resolve_relative,
    resolve_task,
)
from mergeflow.streaming import Input, MergeInputs, MergeOptions, layer_fraction, merge
from mergeflow.task_vectors import task_vector_manifest

MERGED_KIND = "merged_model"
EVAL_KIND = "evaluation"
PLOTS_KIND = "coefficient_heatmaps"


# ---------------------------------------------------------------------------------------------------- recipes


def as_recipe(recipe: Recipe | Mapping[str, Any] | str | Path, *, base_dir: Path | None = None) -> Recipe:
    """A Recipe from itself, a mapping (a flow parameter) or a YAML/JSON file (relative to ``base_dir``)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return parse_recipe(recipe, recipe_dir=base_dir)
    path = Path(recipe).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return load_recipe(path)


def registry_spec(recipe: Recipe, name: str | None = None) -> RegistrySpec:
    """The recipe's registry section with ``name`` (a flow parameter) taking precedence, and defaults filled in."""
    spec = recipe.registry or RegistrySpec()
    chosen = name or spec.name or _slug(recipe.name) or "mergeflow"
    return spec.model_copy(update={"name": chosen, "experiment": spec.experiment or chosen})


def evaluation_spec(recipe: Recipe) -> EvaluationSpec:
    return recipe.evaluation or EvaluationSpec()


def check_evaluation_zoo(spec: EvaluationSpec, recipe_dir: str | Path | None) -> None:
    """Refuse, when a run is planned, an evaluation zoo folder whose task code is not trusted (the policy of
    :func:`mergeflow.evaluation.check_task_code`), instead of after the merges it would evaluate. ``zoo:``
    references (built under MERGEFLOW_HOME/zoo), folders that are not zoos yet and unknown task names are left to
    the evaluate stage, which checks again before lm-eval reads anything."""
    if not spec.zoo or spec.zoo.startswith("zoo:"):
        return
    folder = Path(resolve_path(spec.zoo, recipe_dir))
    if not (folder / "zoo.json").is_file():
        return
    from mergeflow.errors import EvaluationError, ZooError
    from mergeflow.evaluation import check_task_code, split_task_names, zoo_tasks
    from mergeflow.zoo.build import Zoo

    try:
        zoo = Zoo.load(folder)
        tasks = zoo_tasks(split_task_names(spec.tasks), zoo)
    except (EvaluationError, ZooError):
        return
    check_task_code(zoo, tasks, trust_task_code=spec.trust_task_code)


def _slug(text: str | None) -> str | None:
    if not text:
        return None
    out = "".join(c if c.isalnum() or c in "._-" else "-" for c in text.strip()).strip("-.")
    return out or None


# ---------------------------------------------------------------------------------------------------- resolve


def resolve_stage(reference: str, *, recipe_dir: str | Path | None = None, allow_pickle: bool = False,
                  trust_remote_code: bool = False, confine_paths: bool = False,
                  adapter_base: str | None = None) -> ResolvedModel:
    """Resolve a checkpoint reference (folder, hub id, ``models:/`` URI, ``zoo:`` name, ``BASE+ADAPTER``) to a
    checked local snapshot.

    A relative path is read against ``recipe_dir``, never the working directory, when there is one;
    ``confine_paths`` refuses weight files that are symlinks leading outside the checkpoint folder.
    ``adapter_base``: the model a LoRA adapter folder ``reference`` applies to (the recipe's base_model)."""
    snap = resolve(resolve_relative(reference, recipe_dir), allow_pickle=allow_pickle,
                   trust_remote_code=trust_remote_code, confine=confine_paths,
                   base_dir=Path(recipe_dir) if recipe_dir else None,
                   adapter_base=resolve_relative(adapter_base, recipe_dir) if adapter_base else None)
    return ResolvedModel.of(reference, snap)


def resolve_again(m: ResolvedModel, *, allow_pickle: bool = False) -> Snapshot:
    """The snapshot at a resolve manifest's path(s) as it is now (hashes memoised: a file that did not change is not
    read again), to check that it did not change since it was resolved."""
    return resolve(Path(m.path), allow_pickle=allow_pickle, scan_finite=False,
                   adapter_base=Path(m.adapter_base.path) if m.adapter_base is not None else None)


def references(recipe: Recipe) -> tuple[str | None, list[str]]:
    """The base reference (or None) and the experts' references, in recipe order."""
    return recipe.base_model, [m.model for m in recipe.experts]


# ------------------------------------------------------------------------------------------------ task_vectors


def trim_settings(recipe: Recipe, index: int) -> dict[str, Any] | None:
    """What decides the densities expert ``index`` is trimmed at globally: the method, and the density and trim
    scope settings (the expert's own and the recipe's). None when the recipe trims nothing globally. Recipes that
    agree on these (a sweep over lambda) share one task-vector summary per expert."""
    if recipe.mergekit_compat or not recipe.method.needs_base:
        return None
    entry = recipe.experts[index]
    pick = ("density", "trim_scope")
    return {"method": recipe.merge_method, "model": {k: v for k, v in entry.parameters.items() if k in pick},
            "recipe": {k: v for k, v in recipe.parameters.items() if k in pick}}


def trim_densities(recipe: Recipe, base: ResolvedModel, index: int) -> list[float]:
    """The densities expert ``index`` is trimmed at globally (TIES-style methods in paper mode), else none; read
    from the base's tensor names and the recipe, without reading tensor data."""
    if trim_settings(recipe, index) is None:
        return []
    snapshot = base.snapshot()
    reader = open_checkpoint(snapshot, allow_pickle=recipe.allow_pickle)
    try:
        config = read_model_config(snapshot.model_folder)
        arch = Architecture.infer(config, {n: s.shape for n, s in reader.specs.items()})
        densities: set[float] = set()
        for name, spec in reader.specs.items():
            if spec.dtype.is_floating_point:
                per_model, shared = recipe.tensor_params(name, layer_fraction(arch, name))
                if recipe.method.needs_global_threshold(shared):
                    densities.add(float(per_model["density"][index]))
    finally:
        reader.close()
    # several densities for one expert is an error the merge reports; summarise the plain task vector then
    return sorted(densities) if len(densities) == 1 else []


def task_vectors_stage(base: ResolvedModel, expert: ResolvedModel, densities: Sequence[float] = (),
                       *, allow_pickle: bool = False) -> TaskVectors:
    """The task vector ``expert − base`` summarised (norms, and the exact global trim threshold at each density),
    streamed per tensor and cached by the two content hashes; the merge reuses it from the cache."""
    def open_input(role: str, m: ResolvedModel) -> Input:
        snap = resolve_again(m, allow_pickle=allow_pickle)
        if snap.content_hash != m.content_hash:
            raise RecipeError(f"{m.reference} changed since it was resolved; run the pipeline again")
        reader = open_checkpoint(snap, allow_pickle=allow_pickle)
        config = read_model_config(snap.model_folder)
        return Input(role, snap, reader, Architecture.infer(config, {n: s.shape for n, s in reader.specs.items()}),
                     snap.content_hash)

    base_in = open_input("base", base)
    try:
        expert_in = open_input("expert", expert)
        try:
            manifest = task_vector_manifest(base_in, expert_in, densities=densities)
        finally:
            expert_in.reader.close()
    finally:
        base_in.reader.close()
    return TaskVectors(expert=expert.reference, expert_hash=manifest.expert_hash, base_hash=manifest.base_hash,
                       densities=tuple(densities), numel=manifest.numel, l2_norm=manifest.l2_norm,
                       thresholds=manifest.thresholds, seconds=manifest.seconds)


# -------------------------------------------------------------------------------------------------- importance


def importance_inputs(recipe: Recipe, index: int) -> dict[str, Any]:
    """What the recipe's ``importance[index]`` entry reads besides the checkpoints: the entry and each expert's
    task. A pipeline keys the importance stage by these, so changing a merge knob reuses the coefficients."""
    if not 0 <= index < len(recipe.importance):
        raise RecipeError(f"importance[{index}]: the recipe has {len(recipe.importance)} importance entries")
    return {"spec": recipe.importance[index].model_dump(mode="json"), "expert_tasks": [e.task for e in recipe.experts]}


@dataclass(frozen=True)
class ImportanceJob:
    """What one importance entry reads, together: the entry (as in a recipe), each expert's task, the base's and
    experts' resolve manifests, and the recipe's folder (for relative data paths); ``index`` names the entry in
    messages. Its methods are the stage: the shards workers may measure side by side, one shard's measurement,
    and the entry's Coefficients."""

    spec: Mapping[str, Any]
    expert_tasks: Sequence[str | None]
    base: ResolvedModel | None
    experts: Sequence[ResolvedModel]
    index: int = 0
    recipe_dir: str | Path | None = None

    def _args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The importance library's arguments: the validated entry, the tasks, ModelRefs, the reference rule."""
        def ref(m: ResolvedModel) -> ModelRef:
            base = Path(m.adapter_base.path) if m.adapter_base is not None else None
            return ModelRef(m.reference, Path(m.path), m.content_hash, adapter_base=base)

        try:
            entry = ImportanceSpec.model_validate(dict(self.spec))
        except ValueError as e:
            raise RecipeError(f"importance[{self.index}]: {e}") from None
        folder = self.recipe_dir
        # task files and zoo folders are read against the recipe's folder, as model paths are (never the working
        # directory); the recipe's confine_paths was checked on them when it was validated
        if entry.data.target is not None:
            entry = entry.model_copy(update={"data": entry.data.model_copy(
                update={"target": resolve_task(entry.data.target, folder)})})
        tasks = [resolve_task(t, folder) if t else t for t in self.expert_tasks]
        return ((entry, tasks, ref(self.base) if self.base else None,
                 [ref(e) for e in self.experts]), {"resolve_reference": lambda r: resolve_path(r, folder)})

    def shards(self) -> list[dict[str, Any]]:
        """The measurement shards workers can measure side by side (``{"part", "experts", "key"}``; see
        :func:`mergeflow.importance.recipes.shards_for_importance`); empty when the estimator measures all experts in
        one go. Cheap: it reads the task data, no model."""
        args, kwargs = self._args()
        return shards_for_importance(*args, **kwargs)

    def measure(self, part: str, shard: Sequence[int], device: str = "cpu") -> Measurement:
        """One shard of the entry's measurements, measured into the cache (or found there); :meth:`coefficients`
        then finalizes from the cached shards without a model pass of its own."""
        dev = pick_device(device)
        args, kwargs = self._args()
        out = measure_for_importance(*args, part=part, shard=shard, device=dev, **kwargs)
        return Measurement(estimator=self.spec["estimator"], part=out["part"], experts=tuple(out["experts"]),
                           key=out["key"], experts_references=tuple(self.experts[i].reference for i in out["experts"]),
                           reused=out["reused"], seconds=out["seconds"], passes=out["passes"], device=str(dev))

    def coefficients(self, device: str = "cpu") -> CoefficientsRef:
        """The entry's Coefficients, computed or fetched by content (shards measured ahead are taken from the
        cache)."""
        start = time.perf_counter()
        args, kwargs = self._args()
        coeffs = coefficients_for_importance(*args, device=pick_device(device), **kwargs)
        summary = coeffs.summary()
        return CoefficientsRef(estimator=coeffs.estimator, key=coeffs.key, path=str(coeffs.path),
                               params=coeffs.params, fields=summary["fields"], passes=coeffs.stats.get("passes", {}),
                               seconds=float(coeffs.stats.get("seconds", 0.0)),
                               stage_seconds=round(time.perf_counter() - start, 3),
                               device=str(coeffs.stats.get("device", device)))


# ------------------------------------------------------------------------------------------------------- merge


@contextmanager
def peak_rss() -> Iterator[dict[str, float]]:
    """Sample this process's resident memory every 20 ms; ``out["peak_mb"]`` is the peak seen inside the block."""
    proc = psutil.Process()
    out = {"peak_mb": proc.memory_info().rss / 2**20}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            out["peak_mb"] = max(out["peak_mb"], proc.memory_info().rss / 2**20)

    thread = threading.Thread(target=sample, name="mergeflow-rss", daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["peak_mb"] = round(max(out["peak_mb"], proc.memory_info().rss / 2**20), 1)


def merge_inputs(recipe: Recipe, base: ResolvedModel | None, experts: Sequence[ResolvedModel]) -> Any:
    """The engine's :class:`~mergeflow.streaming.MergeInputs` from the resolve stage's manifests (plus the
    tokenizer's source when the recipe names one that is not among them, resolved here)."""
    tokenizer = None
    tok = recipe.vocabulary_source
    if tok and tok not in ("base", "union") and tok not in [m.reference for m in ([base] if base else []) + list(experts)]:
        tokenizer = resolve(recipe.resolve_reference(tok), scan_finite=False, confine=recipe.confine_paths,
                            base_dir=recipe.recipe_dir)
    return MergeInputs(base.snapshot() if base else None, tuple(e.snapshot() for e in experts), tokenizer)


def load_coefficients(recipe: Recipe, coefficients: Sequence[CoefficientsRef]) -> list[Any]:
    """The Coefficients a merge of ``recipe`` consumes, in order: its ``coefficients`` files, then the importance
    stage's artifacts (one per ``importance`` entry, in the recipe's order)."""
    if len(coefficients) != len(recipe.importance):
        raise RecipeError(f"importance: the recipe has {len(recipe.importance)} entries but the merge was given "
                          f"{len(coefficients)} coefficient artifacts")
    return ([Coefficients.load(recipe.local_path(p, "coefficients folder")) for p in recipe.coefficients]
            + [Coefficients.load(c.path) for c in coefficients])


def check_unchanged(models: Sequence[ResolvedModel], allow_pickle: bool = False) -> None:
    """Refuse checkpoints whose content changed since they were resolved (hashes are memoised by inode, size, mtime
    and ctime, so this reads no file that did not change)."""
    for m in models:
        now = resolve_again(m, allow_pickle=allow_pickle).content_hash
        if now != m.content_hash:
            raise RecipeError(f"{m.reference} changed between the resolve and merge stages ({m.content_hash} → "
                              f"{now}); run the pipeline again")


def merge_key(recipe: Recipe, inputs: Sequence[ResolvedModel], coefficient_keys: Sequence[str]) -> str:
    """The content address of a merged model: the recipe hash, its inputs' content hashes, the coefficients."""
    return cache_key(MERGED_KIND, recipe=recipe.recipe_hash(),
                     inputs=sorted([m.reference, m.content_hash] for m in inputs),
                     coefficients=list(coefficient_keys))


def _stage_record(entry: Path) -> dict[str, Any]:
    record = json.loads((entry / "stage.json").read_text())
    if not isinstance(record, dict) or set(record) != {"seconds", "peak_rss_mb", "bytes", "tensors"}:
        raise ValueError(f"{entry / 'stage.json'} is not a merge stage record")
    return record


def merge_stage(recipe: Recipe, base: ResolvedModel | None, experts: Sequence[ResolvedModel],
                coefficients: Sequence[CoefficientsRef] = (), *, device: str = "cpu", threads: int | None = None,
                cache: Cache | None = None) -> MergedModel:
    """Merge into the cache (a complete folder, renamed into place) and return where it is and its content hash.

    ``base`` and ``experts``: the resolve stage's manifests; ``coefficients``: the importance stage's, in the
    recipe's ``importance`` order. A recipe whose importance entries have no coefficients here is refused. The
    engine merges exactly these snapshots; the model card and provenance name the references the recipe wrote.
    """
    loaded = load_coefficients(recipe, coefficients)
    inputs = ([base] if base else []) + list(experts)
    key = merge_key(recipe, inputs, [c.key for c in loaded])
    store = cache or Cache()
    built: dict[str, Any] = {}

    def build(folder: Path) -> None:
        check_unchanged(inputs, recipe.allow_pickle)
        with peak_rss() as mem:
            result = merge(recipe, merge_inputs(recipe, base, experts), folder / "model", coefficients=loaded or None,
                           options=MergeOptions(device=device, progress=False, threads=threads))
        built.update(seconds=round(result.seconds, 3), peak_rss_mb=mem["peak_mb"], bytes=result.bytes_written,
                     tensors=result.n_tensors)
        (folder / "stage.json").write_text(json.dumps(built, indent=1) + "\n")

    # the cached model's files are checked against the hashes recorded when it was built, and a damaged one is
    # built again with a warning; so is one whose stage record cannot be read
    stats = store.load_or_create(MERGED_KIND, key, build, _stage_record)
    model = store.path(MERGED_KIND, key) / "model"
    snap = resolve(model, scan_finite=False)
    return MergedModel(path=str(model), content_hash=snap.content_hash, recipe_hash=recipe.recipe_hash(), key=key,
                       reused=not built, method=recipe.merge_method, name=recipe.name, **stats)


# ---------------------------------------------------------------------------------------------------- evaluate


def _zoo_identity(zoo: Any) -> dict[str, Any] | None:
    if zoo is None:
        return None
    info = zoo.manifest.get("task_info", {})
    return {"size": zoo.size, "seed": zoo.seed, "recipe": zoo.manifest.get("recipe_sha256"),
            "data": {t: {s: v.get("sha256") for s, v in i.get("splits", {}).items()} for t, i in info.items()}}


def evaluation_splits(spec: EvaluationSpec) -> list[tuple[str, int | None]]:
    """The (split, limit) evaluations a recipe asks for: the reported one, then the selection metric's when it
    differs in split or limit (otherwise the reported evaluation is the selection's too). The one rule for it."""
    reported = (spec.split, spec.limit)
    selection = (spec.selection.split, spec.selection.limit)
    return [reported] if selection == reported else [reported, selection]


def evaluate_stage(model: ResolvedModel | MergedModel, spec: EvaluationSpec, *, split: str | None = None,
                   limit: int | None = None, recipe_dir: str | Path | None = None, device: str = "cpu",
                   cache: Cache | None = None) -> Evaluation:
    """lm-eval accuracy of a model folder on ``spec.tasks`` (``split``/``limit`` override the spec's: the
    selection metric runs on validation), cached by the model's content hash, the task data and the settings."""
    # transformers and the zoo (~2.5 s): not on the path of `mergeflow merge`/`check`, which import this module
    from mergeflow.evaluation import (
        check_task_code,
        evaluate_path,
        resolve_zoo,
        split_task_names,
        task_code_identity,
        zoo_tasks,
    )

    device = str(pick_device(device))  # "auto": CUDA when there is one
    split = split or spec.split
    limit = limit if limit is not None else spec.limit
    names = split_task_names(spec.tasks)
    zoo = resolve_zoo(resolve_path(spec.zoo, recipe_dir) if spec.zoo else None, names)
    if zoo is not None:  # an untrusted zoo is refused even when its scores are cached
        check_task_code(zoo, zoo_tasks(names, zoo), trust_task_code=spec.trust_task_code)
    # trusted task code is part of what is scored: named in the key only when trusted (other keys are unchanged)
    code = {"task_code": task_code_identity(zoo)} if zoo is not None and spec.trust_task_code else {}
    key = cache_key(EVAL_KIND, model=model.content_hash, tasks=names, zoo=_zoo_identity(zoo), split=split,
                    limit=limit, num_fewshot=spec.num_fewshot, **code)
    store = cache or Cache()
    ran: list[float] = []

    def build(folder: Path) -> None:
        start = time.perf_counter()
        adapter = model.adapter_base if isinstance(model, ResolvedModel) else None
        result = evaluate_path(model.path, names, zoo=zoo, split=split, limit=limit, batch_size=spec.batch_size,
                               device=device, num_fewshot=spec.num_fewshot, trust_task_code=spec.trust_task_code,
                               adapter_base=adapter.path if adapter is not None else None)
        ran.append(time.perf_counter() - start)
        record = {**result.to_dict(), "seconds": round(ran[0], 3),
                  "in_domain": [t for t in result.scores if zoo is not None and t in zoo.in_domain]}
        (folder / "scores.json").write_text(json.dumps(record, indent=1) + "\n")

    record = store.load_or_create(EVAL_KIND, key, build, lambda entry: json.loads((entry / "scores.json").read_text()))
    folder = store.path(EVAL_KIND, key)
    acc = {t: s["acc"] for t, s in record["scores"].items()}
    in_domain = record["in_domain"] or list(acc)
    return Evaluation(model=model.content_hash, split=split, limit=limit, accuracy=acc,
                      in_domain_avg=round(statistics.fmean(acc[t] for t in in_domain), 3),
                      avg=round(statistics.fmean(acc.values()), 3), in_domain=in_domain,
                      ood=[t for t in acc if t not in in_domain], seconds=record["seconds"], reused=not ran,
                      path=str(folder / "scores.json"), device=device)


def selection_value(evaluation: Evaluation, metric: str) -> float:
    """The selection metric (``in_domain_avg``, ``avg`` or ``acc:TASK``) of an evaluation."""
    if metric in ("in_domain_avg", "avg"):
        return float(getattr(evaluation, metric))
    task = metric.removeprefix("acc:")
    if task not in evaluation.accuracy:
        raise RecipeError(f"evaluation.selection.metric: {metric!r} names a task that was not evaluated "
                          f"({', '.join(evaluation.accuracy)})")
    return float(evaluation.accuracy[task])


# ---------------------------------------------------------------------------------------------------- register


def merge_metrics(reported: Evaluation, selection: Evaluation | None, merged: MergedModel) -> dict[str, float]:
    """The numbers logged with a merge: per-task and average accuracy (reported split, and the selection split
    under its own prefix), the merge's time and peak memory, the evaluations' times (as first computed: a cached
    stage reports the time it cost when it ran)."""
    out: dict[str, float] = {}
    for prefix, ev in (("", reported), ("selection_", selection)):
        if ev is None:
            continue
        for task, acc in ev.accuracy.items():
            out[f"{prefix}{ev.split}_acc_{task}"] = float(acc)
        out[f"{prefix}{ev.split}_in_domain_avg"] = float(ev.in_domain_avg)
        out[f"{prefix}{ev.split}_avg"] = float(ev.avg)
    out["merge_seconds"] = float(merged.seconds)
    out["merge_peak_rss_mb"] = float(merged.peak_rss_mb)
    for prefix, ev in (("evaluate", reported), ("selection_evaluate", selection)):
        if ev is not None:
            out[f"{prefix}_seconds"] = float(ev.seconds)
    return out


def accuracy_table(evaluations: Sequence[Evaluation]) -> str:
    """Evaluations as a text table: one row per split, one column per task, then the averages."""
    tasks = list(dict.fromkeys(t for e in evaluations for t in e.accuracy))
    header = ["split", *tasks, "in_domain_avg", "avg"]
    rows = [[f"{e.split}" + (f" (first {e.limit})" if e.limit else ""),
             *(f"{e.accuracy[t]:.1f}" if t in e.accuracy else "" for t in tasks),
             f"{e.in_domain_avg:.1f}", f"{e.avg:.1f}"] for e in evaluations]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in [header, *rows]) + "\naccuracy (%)"


def _setting(value: Any) -> str:
    """A recipe setting in a description: numbers and strings as written, lists and mappings as compact JSON."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)


def version_description(recipe: Recipe, selection_metric: str, value: float, higher_is_better: bool) -> str:
    """What a registry user reads in the versions list: the method and its parameters (global, then per expert:
    once when every expert has the same), the importance estimators, how many experts over which base, the
    selection score and the recipe hash, on one line."""
    method = recipe.merge_method
    if recipe.parameters:
        method += " (" + ", ".join(f"{k}={_setting(v)}" for k, v in sorted(recipe.parameters.items())) + ")"
    parts = [method]
    knobs = [", ".join(f"{k}={_setting(v)}" for k, v in sorted(e.parameters.items())) for e in recipe.experts]
    if any(knobs):
        if len(set(knobs)) == 1:
            parts.append(f"each expert {knobs[0]}")
        else:
            parts.append("experts " + ", ".join(f"{e.task or Path(e.model).name} ({k or 'defaults'})"
                                                for e, k in zip(recipe.experts, knobs)))
    for entry in recipe.importance:
        knobs = ", ".join(f"{k}={_setting(v)}" for k, v in sorted(entry.parameters.items()))
        parts.append(f"importance {entry.estimator}" + (f" ({knobs})" if knobs else ""))
    experts = len(recipe.experts)
    parts.append(f"{experts} expert{'s' if experts != 1 else ''}" + (f" over {recipe.base_model}"
                                                                      if recipe.base_model else ""))
    parts.append(f"selection {selection_metric} = {value:.2f} ({'higher' if higher_is_better else 'lower'} is "
                 f"better)")
    parts.append(f"recipe {recipe.recipe_hash().split(':')[-1][:12]}")
    return "; ".join(parts)


def evaluation_datasets(recipe: Recipe, evaluations: Sequence[tuple[str, Evaluation]]) -> list[Any]:
    """The zoo data files the evaluations scored, as :class:`mergeflow.tracking.EvaluationData` (the first
    ``limit`` rows of each task's split), each linked to its per-task accuracy metric (``prefix`` + ``SPLIT_acc_TASK``,
    as :func:`merge_metrics` names them). Tasks that are not zoo tasks (lm-eval's own) have no local file here and
    are left out."""
    from mergeflow.evaluation import resolve_zoo, split_task_names
    from mergeflow.tracking import EvaluationData

    spec = evaluation_spec(recipe)
    zoo = resolve_zoo(resolve_path(spec.zoo, recipe.recipe_dir) if spec.zoo else None, split_task_names(spec.tasks))
    if zoo is None:
        return []
    out = []
    for prefix, ev in evaluations:
        for task in ev.accuracy:
            if task in zoo.tasks:
                name = f"{task}/{ev.split}" + (f"[:{ev.limit}]" if ev.limit else "")
                out.append(EvaluationData(name=name, path=zoo.data_file(task, ev.split), limit=ev.limit,
                                          metrics=(f"{prefix}{ev.split}_acc_{task}",)))
    return out


def coefficient_heatmaps(coefficients: CoefficientsRef, labels: Sequence[str], cache: Cache | None = None) -> Path | None:
    """The heatmaps of one Coefficients artifact (:func:`mergeflow.coefficients.plot_coefficients`), drawn once per
    artifact and row labels and kept in the cache: every merge that reuses the artifact (a re-run with another merge
    knob, a sweep's grid points) registers the same pictures without importing matplotlib and drawing them again.
    ``None`` when the artifact has no table small enough to draw."""
    store = cache or Cache()
    key = cache_key(PLOTS_KIND, coefficients=coefficients.key, labels=list(labels))

    def build(folder: Path) -> None:
        plot_coefficients(Coefficients.load(coefficients.path), folder / "heatmaps", labels=list(labels))

    pictures = store.get_or_create(PLOTS_KIND, key, build) / "heatmaps"
    return pictures if pictures.is_dir() and any(pictures.iterdir()) else None


def register_stage(recipe: Recipe, merged: MergedModel, inputs: Sequence[ResolvedModel], reported: Evaluation,
                   selection: Evaluation | None = None, coefficients: Sequence[CoefficientsRef] = (), *,
                   registered_name: str | None = None, tags: Mapping[str, str] | None = None,
                   artifacts: Mapping[str, str | Path] | None = None,
                   extra_metrics: Mapping[str, float] | None = None, promote: bool = True,
                   flow_run_id: str | None = None) -> Registration:
    """Log the merge as an MLflow run and register its folder as a model version; with ``promote``, move the
    alias to it if it beats the current holder (a sweep promotes only its best merge, see :func:`promote_best`)."""
    from mergeflow import tracking  # MLflow: the optional [pipeline] extra

    spec = registry_spec(recipe, registered_name)
    sel = evaluation_spec(recipe).selection
    ev = selection or reported
    value = selection_value(ev, sel.metric)
    files: dict[str, Path] = {k: Path(v) for k, v in (artifacts or {}).items()}
    model_dir = Path(merged.path)
    if (model_dir / "README.md").is_file():
        files.setdefault("model_card", model_dir / "README.md")
    scratch = tempfile.TemporaryDirectory(prefix="mergeflow-register-")
    tasks = [e.task or Path(e.model).name for e in recipe.experts]
    for i, c in enumerate(coefficients):
        files[f"coefficients/{i}-{c.estimator}"] = Path(c.path)
        pictures = coefficient_heatmaps(c, tasks)
        if pictures is not None:
            files[f"importance_heatmaps/{i}-{c.estimator}"] = pictures
    table = Path(scratch.name) / "evaluation"
    table.mkdir()
    evaluations = [e for e in (reported, selection) if e is not None]
    (table / "accuracy.json").write_text(json.dumps([e.to_json() for e in evaluations], indent=1) + "\n")
    (table / "accuracy.txt").write_text(accuracy_table(evaluations) + "\n")
    files["evaluation"] = table
    metrics = {**merge_metrics(reported, selection, merged), **(extra_metrics or {})}
    for i, c in enumerate(coefficients):
        metrics[f"importance_{i}_{c.estimator}_seconds"] = float(c.seconds)
    datasets = evaluation_datasets(recipe, [(p, e) for p, e in (("", reported), ("selection_", selection))
                                            if e is not None])
    description = version_description(recipe, f"{ev.split}_{sel.metric}", value, sel.higher_is_better)
    with scratch:
        registration = tracking.log_merge(
            model_dir, recipe=recipe.canonical(), recipe_hash=recipe.recipe_hash(),
            input_hashes={m.reference: m.content_hash for m in inputs}, experiment=spec.experiment,
            registered_name=spec.name, metrics=metrics, selection_metric=(f"{ev.split}_{sel.metric}", value),
            higher_is_better=sel.higher_is_better, alias=spec.alias, tags=dict(tags or {}), artifacts=files,
            run_name=recipe.name, promote=promote, flow_run_id=flow_run_id, description=description,
            datasets=datasets)
    return Registration(**registration.to_dict(), selection_metric=f"{ev.split}_{sel.metric}", selection_value=value,
                        higher_is_better=sel.higher_is_better, alias=spec.alias)


def promote_best(candidates: Sequence[Registration]) -> Promotion:
    """For each registered model among ``candidates``, move its alias to the best candidate on the selection metric
    if that beats the current holder; one move per model, whatever the candidates' order."""
    from mergeflow import tracking  # MLflow: the optional [pipeline] extra

    groups: dict[tuple[str, str], list[Registration]] = {}
    for c in candidates:
        groups.setdefault((c.name, c.alias), []).append(c)
    outcomes = []
    for (name, alias), group in groups.items():
        higher = group[0].higher_is_better
        best = (max if higher else min)(group, key=lambda c: (c.selection_value, -int(c.version)))
        moved, previous = tracking.promote(name, best.version, best.selection_metric, best.selection_value,
                                           alias=alias, higher_is_better=higher)
        holder = best.version if moved else previous
        summary = (f"moved to version {best.version} ({best.selection_metric} {best.selection_value:.2f})"
                   if moved else f"stays on version {previous} (best of this run: version {best.version}, "
                   f"{best.selection_metric} {best.selection_value:.2f})")
        outcomes.append(Promotion(name=name, alias=alias, version=holder, moved=moved, previous=previous,
                                  best_of_run=best.version, summary=summary))
    if len(outcomes) == 1:
        return outcomes[0]
    return Promotion(name=", ".join(o.name for o in outcomes), alias=outcomes[0].alias,
                     models=[o.to_json() for o in outcomes],
                     summary="; ".join(f"{o.name}: {o.summary}" for o in outcomes))


# ------------------------------------------------------------------------------------------------------ sweeps


def expand_grid(recipe: Mapping[str, Any], grid: Mapping[str, Sequence[Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Every combination of ``grid`` applied to ``recipe``: keys are dotted paths into the recipe
    (``parameters.lambda``, ``merge_method``, ``importance.0.parameters.p``; ``models.*.parameters.density`` sets
    every model), values the lists to try. Returns (label, recipe) pairs; each recipe is validated."""
    if not grid:
        return [(str(recipe.get("name") or recipe.get("merge_method") or "recipe"), dict(recipe))]
    keys = list(grid)
    for k in keys:
        values = grid[k]
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise RecipeError(f"grid.{k}: expected a non-empty list of values")
    out = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        data = copy.deepcopy(dict(recipe))
        for k, v in zip(keys, combo):
            _set_path(data, k.split("."), v, k)
        label = " ".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, combo))
        data["name"] = f"{recipe.get('name') or recipe.get('merge_method')} {label}"
        parse_recipe(data, source=f"grid point {label}")  # refuse a bad point before anything runs
        out.append((label, data))
    return out


def _set_path(data: Any, path: list[str], value: Any, where: str) -> None:
    head, rest = path[0], path[1:]
    if head == "*":
        if not isinstance(data, list) or not rest:
            raise RecipeError(f"grid.{where}: '*' stands for every item of a list and needs a path after it")
        for item in data:
            _set_path(item, rest, value, where)
        return
    if isinstance(data, list):
        if not head.isdigit() or int(head) >= len(data):
            raise RecipeError(f"grid.{where}: {head!r} is not an index of a {len(data)}-item list")
        if rest:
            _set_path(data[int(head)], rest, value, where)
        else:
            data[int(head)] = value
        return
    if not isinstance(data, dict):
        raise RecipeError(f"grid.{where}: cannot set {head!r} inside a {type(data).__name__}")
    if rest:
        data.setdefault(head, {} if not rest[0].isdigit() and rest[0] != "*" else [])
        _set_path(data[head], rest, value, where)
    else:
        data[head] = value
