"""What an importance estimator is, the run context it gets, and the registry (like ``mergeflow.methods.base``).

An estimator is a function ``compute(run: ImportanceRun) -> Coefficients`` plus a parameter spec. The run holds the
resolved base and experts (paths and content hashes), the task data of each expert (in-domain) or of the target
task (out-of-domain), the validated parameters, the device and the seed. Estimators load models through the run
(fp32, eval mode, on the run's device), compute in fp32 (fp64 for small solves) and return their artifact through
:meth:`ImportanceRun.coefficients`, which fills in the provenance. :func:`compute_coefficients` validates, keys and
caches: an artifact is computed once per (inputs' content hashes, data hash, parameters, code version).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mergeflow.cache import Cache
from mergeflow.coefficients import CoefficientField, Coefficients, coefficients_key
from mergeflow.errors import RecipeError
from mergeflow.importance.data import TaskData, load_task_data
from mergeflow.methods.base import ParamSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from mergeflow.recipe import Recipe

CACHE_KIND = "coefficients"


@dataclass(frozen=True)
class ModelRef:
    reference: str       # as the user wrote it (hub id, folder, models:/ URI)
    path: Path           # the resolved local snapshot
    content_hash: str

    def describe(self) -> dict[str, str]:
        return {"reference": self.reference, "content_hash": self.content_hash}


@dataclass
class ImportanceRun:
    estimator: str
    base: ModelRef | None
    experts: list[ModelRef]
    tasks: list[TaskData]          # row i: the data expert i is scored on (its own task, or the OOD target)
    params: dict[str, Any]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    ood: bool = False              # every expert is scored on one target task (METHODS D-10)
    passes: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})
    _tokenizer: Any = None

    @property
    def k(self) -> int:
        return len(self.experts)

    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            source = self.base.path if self.base is not None else self.experts[0].path
            self._tokenizer = AutoTokenizer.from_pretrained(str(source))
            if self._tokenizer.pad_token_id is None:
                self._tokenizer.pad_token = self._tokenizer.eos_token
        return self._tokenizer

    def load_model(self, ref: ModelRef, *, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
        """A model in eval mode on the run's device, in fp32 unless asked otherwise (statistics need fp32)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(ref.path), dtype=dtype)
        return model.to(self.device).eval()

    def count(self, forward: int = 0, backward: int = 0) -> None:
        """Record passes over the data (one per batch of examples) for the cost report."""
        self.passes["forward"] += forward
        self.passes["backward"] += backward

    def coefficients(self, fields: Mapping[str, CoefficientField], *,
                     scores: Mapping[str, torch.Tensor] | None = None,
                     score_partitions: Mapping[str, list[str]] | None = None,
                     stats: Mapping[str, Any] | None = None) -> Coefficients:
        return Coefficients(
            estimator=self.estimator,
            experts=[e.describe() for e in self.experts],
            base=self.base.describe() if self.base else None,
            fields=dict(fields),
            scores={k: v.detach().double().cpu() for k, v in (scores or {}).items()},
            score_partitions=dict(score_partitions or {}),
            params=dict(self.params),
            data={"tasks": [t.describe() for t in self.tasks], "ood": self.ood},
            stats={"passes": dict(self.passes), **(stats or {})},
        )


@dataclass(frozen=True)
class Estimator:
    name: str
    compute: Callable[[ImportanceRun], Coefficients]
    params: tuple[ParamSpec, ...]
    summary: str
    paper: str
    needs_base: bool = True
    default_split: str = "fewshot"   # which split of each task it reads by default
    default_n: int | None = 5        # examples per task by default (None: the whole split)
    supports_ood: bool = False

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)

    def resolve_params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults filled in, every value checked; an unknown name is an error naming the estimator."""
        unknown = sorted(set(given) - {p.name for p in self.params})
        if unknown:
            known = ", ".join(p.name for p in self.params)
            raise RecipeError(f"importance.parameters: {self.name} has no parameter {unknown[0]!r}; known: {known}")
        out = {}
        for spec in self.params:
            value = given.get(spec.name, spec.default)
            if value is None:
                if spec.required and spec.name in given:
                    raise RecipeError(f"importance.parameters.{spec.name}: a value is required")
                out[spec.name] = None
                continue
            out[spec.name] = spec.check(value, f"importance.parameters.{spec.name}")
        return out


_REGISTRY: dict[str, Estimator] = {}


def register_estimator(estimator: Estimator) -> Estimator:
    if estimator.name in _REGISTRY:
        raise ValueError(f"estimator {estimator.name!r} registered twice")
    _REGISTRY[estimator.name] = estimator
    return estimator


def _load_builtin() -> None:
    import importlib

    for module in ("apl", "sens", "linearity", "cocktail", "fisher", "regmean"):
        try:
            importlib.import_module(f"mergeflow.importance.{module}")
        except ModuleNotFoundError as exc:  # an estimator module not written yet must not break the others
            if exc.name != f"mergeflow.importance.{module}":
                raise


def get_estimator(name: str) -> Estimator:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RecipeError(f"importance.estimator: unknown estimator {name!r}; known: "
                          f"{', '.join(sorted(_REGISTRY))}") from None


def all_estimators() -> list[Estimator]:
    _load_builtin()
    return sorted(_REGISTRY.values(), key=lambda e: e.name)


def compute_coefficients(estimator: str, *, base: ModelRef | None, experts: Sequence[ModelRef],
                         tasks: Sequence[TaskData], params: Mapping[str, Any] | None = None,
                         device: str | torch.device = "cpu", seed: int = 0, ood: bool = False,
                         cache: Cache | None = None, use_cache: bool = True,
                         threads: int | None = None) -> Coefficients:
    """Run (or fetch from the cache) one estimator over ``experts``; ``tasks[i]`` is expert i's data."""
    est = get_estimator(estimator)
    resolved = est.resolve_params(params or {})
    if est.needs_base and base is None:
        raise RecipeError(f"importance: {estimator} needs a base model")
    if len(tasks) != len(experts):
        raise RecipeError(f"importance: {len(experts)} experts but data for {len(tasks)}")
    if ood and not est.supports_ood:
        raise RecipeError(f"importance: {estimator} has no out-of-domain mode")
    if not experts:
        raise RecipeError("importance: no experts")
    device = torch.device(device)
    key = coefficients_key(estimator, base_hash=base.content_hash if base else None,
                           expert_hashes=[e.content_hash for e in experts],
                           data={"tasks": [t.sha256 for t in tasks], "ood": ood, "seed": seed},
                           params=resolved)
    run = ImportanceRun(estimator, base, list(experts), list(tasks), resolved, device, seed, ood)

    def build(folder: Path) -> None:
        from mergeflow.engine import compute_threads

        start = time.perf_counter()
        # all cores but one, like the merge: oversubscribed OpenMP threads run tiny passes many times slower
        with torch.random.fork_rng(devices=[]), compute_threads(threads):
            torch.manual_seed(seed)
            coeffs = est.compute(run)
        coeffs.key = key
        coeffs.stats.setdefault("seconds", round(time.perf_counter() - start, 3))
        coeffs.stats.setdefault("device", str(device))
        coeffs.save(folder)

    if not use_cache:
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="mergeflow-coefficients-"))
        build(tmp)
        return Coefficients.load(tmp)
    store = cache or Cache()
    return Coefficients.load(store.get_or_create(CACHE_KIND, key, build))


def coefficients_for_recipe(recipe: Recipe, base: ModelRef | None, experts: Sequence[ModelRef], *,
                            device: str | torch.device = "cpu", cache: Cache | None = None) -> list[Coefficients]:
    """The artifacts a recipe's merge consumes: its precomputed ``coefficients`` folders, then one per
    ``importance`` entry (computed, or fetched from the cache). ``experts`` are in the recipe's order."""
    out = [Coefficients.load(recipe.resolve_reference(path)) for path in recipe.coefficients]
    entries = recipe.experts
    for spec in recipe.importance:
        est = get_estimator(spec.estimator)
        split = spec.data.split or est.default_split
        n = spec.data.n if spec.data.n is not None else est.default_n
        zoo = recipe.resolve_reference(spec.data.zoo) if spec.data.zoo else None
        if spec.data.target is not None:
            target = load_task_data(spec.data.target, split, n, spec.data.seed, zoo=zoo)
            tasks = [target] * len(experts)
        else:
            cache_by_task: dict[str, TaskData] = {}
            tasks = []
            for entry in entries:
                assert entry.task is not None  # checked when the recipe was validated
                if entry.task not in cache_by_task:
                    cache_by_task[entry.task] = load_task_data(entry.task, split, n, spec.data.seed, zoo=zoo)
                tasks.append(cache_by_task[entry.task])
        out.append(compute_coefficients(spec.estimator, base=base, experts=experts, tasks=tasks,
                                        params=spec.parameters, device=device, seed=spec.data.seed,
                                        ood=spec.data.target is not None, cache=cache))
    return out
