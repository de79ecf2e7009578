"""What an importance estimator is, the run context it gets, and the registry (like ``mergeflow.methods.base``).

An estimator is a parameter spec plus either one function ``compute(run: ImportanceRun) -> Coefficients`` or two
stages: ``measure(run) -> Measurements`` (the expensive passes over models and data: gradients, logits, Gram
matrices, module features) and ``finalize(run, measurements) -> Coefficients`` (cheap arithmetic on them: softmax
temperatures, scales, shrinkage, clipping, solves). The run holds the resolved base and experts (paths and content
hashes), the task data of each expert (in-domain) or of the target task (out-of-domain), the validated parameters,
the device and the seed. Estimators load models through the run (fp32, eval mode, on the run's device), compute in
fp32 (fp64 for small solves) and return their artifact through :meth:`ImportanceRun.coefficients`, which fills in the
provenance.

:func:`compute_coefficients` validates, keys and caches: an artifact is computed once per (inputs' content hashes,
data hash, parameters, code version). A two-stage estimator's measurements are cached as well, under kind
``importance_measurements`` and a key made of the same inputs but only the parameters the measurement depends on
(``Estimator.measure_params``), so a re-run that changes a finalize parameter (a temperature, λ, α, a clip) skips
every model pass. Measurements may come in parts (:class:`MeasurePart`: Sens-Merging's sensitivities and logit
distances), each cached on its own and measured only when the parameters need it, so an ablation that needs one part
reuses it from a run that measured both, and vice versa.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergeflow import transformers_io
from mergeflow.cache import CODE_VERSION, Cache, cache_key
from mergeflow.coefficients import CoefficientField, Coefficients, coefficients_key, jsonable
from mergeflow.devices import compute_threads
from mergeflow.errors import RecipeError
from mergeflow.importance.data import TaskData
from mergeflow.methods.base import ParamSpec
from mergeflow.registry import Registry
from mergeflow.tokenizer_io import has_tokenizer, load_tokenizer, tokenizer_digest

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CACHE_KIND = "coefficients"
MEASUREMENTS_KIND = "importance_measurements"
MEASUREMENTS_META = "measurements.json"
MEASUREMENTS_TENSORS = "tensors.safetensors"
MEASUREMENTS_ENTRIES = "entries"
MEASUREMENTS_FORMAT = 1
WHOLE = "all"  # the part name of measurements that are not split into parts


@dataclass(frozen=True)
class ModelRef:
    reference: str       # as the user wrote it (hub id, folder, models:/ URI)
    path: Path           # the resolved local snapshot (a LoRA adapter: the adapter's folder)
    content_hash: str
    adapter_base: Path | None = None  # a LoRA adapter: the folder of the full checkpoint it applies to

    @property
    def model_folder(self) -> Path:
        """The folder holding the model's ``config.json`` and tokenizer (a LoRA adapter's: its base's)."""
        return self.adapter_base if self.adapter_base is not None else self.path

    def reader(self) -> Any:
        """The model's tensors, one at a time (:func:`mergeflow.checkpoints.open_model`)."""
        from mergeflow.checkpoints import open_model

        return open_model(self.path, self.adapter_base, allow_pickle=True)

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
    ood: bool = False              # every expert is scored on one target task (docs/methods.md D-10)
    passes: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})
    _tokenizer: Any = None
    part: str = WHOLE              # measure stage: the part of the measurements to measure
    _folder: Path | None = None    # measure stage: the measurements folder being written
    load_seconds: float = 0.0      # time spent reading models from disk (the cost report separates it)
    _kept: dict[str, Any] = field(default_factory=dict)  # models loaded with keep=True, shared by a run's shards
    _own: dict[str, Any] = field(default_factory=dict)  # expert content hash -> its own tokenizer (None: the base's)

    @property
    def k(self) -> int:
        return len(self.experts)

    def tokenizer(self, ref: ModelRef | None = None) -> PreTrainedTokenizerBase:
        """The tokenizer that encodes the data model ``ref`` reads: the base's (the first expert's without a base),
        or ``ref``'s own when its vocabulary differs from it (an expert that added tokens). Loaded once each."""
        if self._tokenizer is None:
            self._tokenizer = _padded(load_tokenizer(self.default_tokenizer_path()))
        if ref is None:
            return self._tokenizer
        if ref.content_hash not in self._own:
            self._own[ref.content_hash] = own_tokenizer(ref.model_folder, self.default_tokenizer_path(),
                                                         self._tokenizer)
        own = self._own[ref.content_hash]
        return self._tokenizer if own is None else own

    def default_tokenizer_path(self) -> Path:
        """The folder whose tokenizer encodes the data by default: the base's (the first expert's without a base);
        for a LoRA adapter, the folder of the model it applies to."""
        return (self.base if self.base is not None else self.experts[0]).model_folder

    def load_model(self, ref: ModelRef, *, dtype: torch.dtype = torch.float32, keep: bool = False) -> PreTrainedModel:
        """A model in eval mode on the run's device, in fp32 unless asked otherwise (statistics need fp32).

        ``keep``: the model is read once and handed again to the later shards of the same run (the base, which every
        shard of a by-expert part reads); the caller must leave it as it found it (weights, gradients, modes)."""
        memo = f"{ref.content_hash}:{dtype}"
        if keep and memo in self._kept:
            return self._kept[memo]
        start = time.perf_counter()
        model = transformers_io.load_causal_lm(ref.path, dtype=dtype, adapter_base=ref.adapter_base,
                                               allow_pickle=True).to(self.device).eval()
        self.load_seconds += time.perf_counter() - start
        if keep:
            self._kept[memo] = model
        return model

    def count(self, forward: int = 0, backward: int = 0) -> None:
        """Record passes over the data (one per batch of examples) for the cost report."""
        self.passes["forward"] += forward
        self.passes["backward"] += backward

    def write_entry(self, name: str, expert: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Measure stage: save expert ``expert``'s per-entry tensors ``name`` (a Fisher diagonal, Gram matrices)
        straight into the measurements folder, so that a model-sized measurement is held for one expert at a time.
        They come back through :meth:`Measurements.entry`."""
        if self._folder is None:
            raise RuntimeError("write_entry is for the measure stage of a two-stage estimator")
        sub = self._folder / MEASUREMENTS_ENTRIES / name
        sub.mkdir(parents=True, exist_ok=True)
        save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, str(sub / f"{expert}.safetensors"))

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


@dataclass
class Measurements:
    """What the measure stage of a two-stage estimator found: the input of its finalize stage.

    ``tensors``: named tensors of any dtype (per-sample Grams, losses, sensitivities), held in memory; ``stats``: JSON
    data (how gradients were taken, per-expert norms); ``passes``: the forward/backward passes the measurement cost
    (filled in by :func:`compute_coefficients`); ``entries``: model-sized per-expert tensors written during the
    measurement with :meth:`ImportanceRun.write_entry`, one safetensors file per expert, read back lazily with
    :meth:`entry`. On disk: ``measurements.json``, ``tensors.safetensors`` and ``entries/<name>/<expert>.safetensors``.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    passes: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})
    entries: dict[str, list[Path]] = field(default_factory=dict)
    key: str = ""
    seconds: float | None = None
    load_seconds: float = 0.0  # of ``seconds``, the time spent reading models from disk (the cost report)
    path: Path | None = None

    def entry(self, name: str, expert: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Expert ``expert``'s tensors of entry measurement ``name``, read one at a time (never modify them in place:
        they may share the cached file's mapping)."""
        with safe_open(str(self.entries[name][expert]), framework="pt") as f:
            for tensor in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                yield tensor, f.get_tensor(tensor)

    def index_entries(self, folder: Path) -> dict[str, int]:
        """Point ``entries`` at the entry files written into ``folder`` during the measurement; {name: count}."""
        entries = {}
        root = folder / MEASUREMENTS_ENTRIES
        for sub in sorted(root.iterdir()) if root.is_dir() else []:
            n = len(list(sub.glob("*.safetensors")))
            if sorted(p.name for p in sub.glob("*.safetensors")) != sorted(f"{i}.safetensors" for i in range(n)):
                raise RuntimeError(f"measurement entries {sub.name}: files are not numbered 0..{n - 1}")
            entries[sub.name] = n
        self.entries = {name: [root / name / f"{i}.safetensors" for i in range(n)] for name, n in entries.items()}
        self.path = folder
        return entries

    def save(self, folder: Path, provenance: Mapping[str, Any] | None = None) -> None:
        """Write ``tensors`` and the metadata into ``folder`` (which already holds the entries written there)."""
        save_file({n: t.detach().cpu().contiguous() for n, t in self.tensors.items()},
                  str(folder / MEASUREMENTS_TENSORS))
        entries = self.index_entries(folder)
        meta = {"format": MEASUREMENTS_FORMAT, "code_version": CODE_VERSION, "key": self.key,
                "seconds": self.seconds, "load_seconds": self.load_seconds, "passes": dict(self.passes), "entries": entries,
                "stats": jsonable(self.stats), **jsonable(dict(provenance or {}))}
        (folder / MEASUREMENTS_META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        self.path = folder

    @classmethod
    def load(cls, folder: Path) -> Measurements:
        meta = json.loads((folder / MEASUREMENTS_META).read_text())
        if meta.get("format") != MEASUREMENTS_FORMAT:
            raise RuntimeError(f"{folder}: measurements format {meta.get('format')} is not {MEASUREMENTS_FORMAT}")
        entries = {name: [folder / MEASUREMENTS_ENTRIES / name / f"{i}.safetensors" for i in range(n)]
                   for name, n in meta["entries"].items()}
        return cls(tensors=load_file(str(folder / MEASUREMENTS_TENSORS)), stats=meta["stats"],
                   passes=meta["passes"], entries=entries, key=meta["key"], seconds=meta["seconds"],
                   load_seconds=meta.get("load_seconds", 0.0), path=folder)

    @classmethod
    def stack(cls, shards: Sequence[tuple[Sequence[int], Measurements]], part: MeasurePart) -> Measurements:
        """The measurements of all experts from those of shards of them (``(expert indices, measurements)``, the
        indices together 0..K-1 once each): rows of tensors and entries put back in expert order."""
        order = [i for idx, _ in shards for i in idx]
        k = len(order)
        if sorted(order) != list(range(k)):
            raise ValueError(f"measurement shards of part {part.name} do not cover experts 0..{k - 1} once each")
        position = [0] * k  # position[expert] = its row in the concatenation
        for row, expert in enumerate(order):
            position[expert] = row
        ms = [m for _, m in shards]
        first = ms[0]
        out = cls(passes={}, seconds=sum(m.seconds or 0.0 for m in ms), load_seconds=sum(m.load_seconds for m in ms))
        index = torch.tensor(position)
        for name in first.tensors:
            rows = torch.cat([m.tensors[name] for m in ms])
            if rows.shape[0] != k:
                raise ValueError(f"measurement {name} of part {part.name} has {rows.shape[0]} rows for {k} experts")
            out.tensors[name] = rows.index_select(0, index)
        for name in first.entries:
            files = [f for m in ms for f in m.entries[name]]
            out.entries[name] = [files[position[e]] for e in range(k)]
        for key in first.stats:
            values = [m.stats[key] for m in ms]
            if key in part.expert_stats:
                flat = [v for vs in values for v in vs]
                out.stats[key] = [flat[position[e]] for e in range(k)]
            elif key in part.summed_stats:
                total = values[0]
                for v in values[1:]:
                    total = total + v
                out.stats[key] = total
            elif any(v != values[0] for v in values[1:]):
                raise ValueError(f"measurement stat {key!r} of part {part.name} differs between shards")
            else:
                out.stats[key] = values[0]
        for m in ms:
            for kind, n in m.passes.items():
                out.passes[kind] = out.passes.get(kind, 0) + n
        return out

    @classmethod
    def combine(cls, parts: Sequence[Measurements]) -> Measurements:
        """One view of several parts (their names must not collide); passes add up."""
        if len(parts) == 1:
            return parts[0]
        out = cls(passes={}, load_seconds=sum(m.load_seconds for m in parts))
        for m in parts:
            for mine, theirs in ((out.tensors, m.tensors), (out.stats, m.stats), (out.entries, m.entries)):
                clash = sorted(set(mine) & set(theirs))
                if clash:
                    raise ValueError(f"measurement parts both hold {clash[0]!r}")
                mine.update(theirs)
            for kind, n in m.passes.items():
                out.passes[kind] = out.passes.get(kind, 0) + n
        return out


class LazyEntries(Sequence[dict[str, torch.Tensor]]):
    """Per-expert entry tensors of a final artifact, made one expert at a time (``make(expert)``) when the artifact
    is saved: finalize turns measured entries into coefficients without holding K model-sized copies."""

    def __init__(self, n: int, make: Callable[[int], dict[str, torch.Tensor]]) -> None:
        self.n, self.make = n, make

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, expert: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if not isinstance(expert, int):
            raise TypeError("LazyEntries are indexed by expert number")
        if not -self.n <= expert < self.n:
            raise IndexError(expert)
        return self.make(expert % self.n)


def _always(_params: Mapping[str, Any]) -> bool:
    return True


@dataclass(frozen=True)
class MeasurePart:
    """A part of a two-stage estimator's measurements that is cached on its own: its name (``run.part`` in
    measure), the measure parameters it depends on, and whether given parameters need it at all.

    ``by_expert``: what the part measures of an expert depends only on the base, that expert and its task data (a
    Fisher diagonal, Gram matrices, a sensitivity row), so the part is measured in *shards* — the experts that share
    their task data (:func:`expert_shards`: one expert each in-domain) — each cached under its own key, measured by
    whichever worker gets it (the flows fan them out), and stacked into the whole part afterwards
    (:meth:`Measurements.stack`). Its tensors then hold one row per expert (dim 0) and its entries one file per
    expert; ``expert_stats`` names the stats that are lists with one item per expert, ``summed_stats`` those added
    up over shards (counts; lists are concatenated); any other stat must come out the same in every shard.
    ``canonical`` maps the part's parameters to a canonical form before they key (and reach) the measurement, where
    a parameter matters only for some values of another (APL's ``weights`` only for the gradient estimator).
    """

    name: str
    params: tuple[str, ...]
    needed: Callable[[Mapping[str, Any]], bool] = _always
    by_expert: bool = False
    expert_stats: tuple[str, ...] = ()
    summed_stats: tuple[str, ...] = ()
    canonical: Callable[[dict[str, Any]], dict[str, Any]] | None = None


@dataclass(frozen=True, kw_only=True)
class Estimator:
    """An estimator: one stage (``compute``) or two (``measure`` + ``finalize``; see the module docstring).

    ``measure_params``: the parameters the measurements depend on; every other parameter may only be read by
    ``finalize`` (the measure stage sees only its own parameters, so reading another one is a KeyError rather than
    a stale cache hit). ``measure_parts``: optional split of the measurements into parts, each with its own subset of
    ``measure_params``; without it the measurements are one part, :data:`WHOLE`. ``check_params``: checks across
    parameters, run before anything is measured.
    """

    name: str
    params: tuple[ParamSpec, ...]
    summary: str
    paper: str
    compute: Callable[[ImportanceRun], Coefficients] | None = None
    measure: Callable[[ImportanceRun], Measurements] | None = None
    finalize: Callable[[ImportanceRun, Measurements], Coefficients] | None = None
    measure_params: tuple[str, ...] = ()
    measure_parts: tuple[MeasurePart, ...] = ()
    check_params: Callable[[Mapping[str, Any]], None] | None = None
    needs_base: bool = True
    default_split: str = "fewshot"   # which split of each task it reads by default
    default_n: int | None = 5        # examples per task by default (None: the whole split)
    supports_ood: bool = False
    # scores each model alone, so each expert reads its data in its own tokenizer when the vocabularies differ;
    # the others run several models on one encoding (or mix their weights) and need one shared vocabulary
    own_tokenizers: bool = False

    def __post_init__(self) -> None:
        if self.two_stage:
            if self.compute is not None or self.measure is None or self.finalize is None:
                raise ValueError(f"estimator {self.name}: give compute, or measure and finalize")
            known = {p.name for p in self.params}
            unknown = sorted(set(self.measure_params) - known)
            if unknown:
                raise ValueError(f"estimator {self.name}: measure parameter {unknown[0]!r} is not a parameter")
            for part in self.measure_parts:
                extra = sorted(set(part.params) - set(self.measure_params))
                if extra:
                    raise ValueError(f"estimator {self.name}: part {part.name} depends on {extra[0]!r}, which is "
                                     "not in measure_params")
        elif self.compute is None:
            raise ValueError(f"estimator {self.name}: give compute, or measure and finalize")

    @property
    def two_stage(self) -> bool:
        return self.measure is not None or self.finalize is not None

    def parts(self, params: Mapping[str, Any]) -> list[MeasurePart]:
        """The parts of the measurements that ``params`` need, in declaration order."""
        if not self.measure_parts:
            return [MeasurePart(WHOLE, self.measure_params)]
        return [part for part in self.measure_parts if part.needed(params)]

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
        if self.check_params is not None:
            self.check_params(out)
        return out


def _unknown_estimator(name: str, known: list[str]) -> RecipeError:
    return RecipeError(f"importance.estimator: unknown estimator {name!r}; known: {', '.join(known)}")


# The built-in estimators: name -> "module:attribute", imported on first use (each module registers its estimator
# with ``register_estimator``). A new estimator is one module plus its line here.
BUILTIN_ESTIMATORS: dict[str, str] = {
    "adamerging": "mergeflow.importance.adamerging:ADAMERGING",
    "apl": "mergeflow.importance.apl:APL",
    "cocktail": "mergeflow.importance.cocktail:COCKTAIL",
    "fisher": "mergeflow.importance.fisher:FISHER",
    "regmean": "mergeflow.importance.regmean:REGMEAN",
    "sens": "mergeflow.importance.sens:SENS",
    "slta": "mergeflow.importance.linearity:SLTA",
}

ESTIMATORS: Registry[Estimator] = Registry("estimator", BUILTIN_ESTIMATORS, unknown=_unknown_estimator)


def register_estimator(estimator: Estimator) -> Estimator:
    """Register ``estimator`` under its name; returns it, so its module can keep it as a constant."""
    return ESTIMATORS.register(estimator.name, estimator)


def get_estimator(name: str) -> Estimator:
    return ESTIMATORS.lookup(name)


def _padded(tok: Any) -> Any:
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def own_tokenizer(path: Path, default_path: Path, default: Any) -> Any | None:
    """The tokenizer of the model at ``path`` when its vocabulary differs from ``default``'s (the tokenizer at
    ``default_path``), else None. Identical tokenizer files are not loaded."""
    if not has_tokenizer(path) or tokenizer_digest(path) == tokenizer_digest(default_path):
        return None
    own = load_tokenizer(path)
    return None if own.get_vocab() == default.get_vocab() else _padded(own)


def check_vocabularies(est: Estimator, base: ModelRef | None, experts: Sequence[ModelRef]) -> None:
    """Refuse, before any model is read, an estimator that needs one shared vocabulary over experts whose
    vocabularies differ from the base's."""
    if est.own_tokenizers:
        return
    default_path = (base if base is not None else experts[0]).model_folder
    if not any(has_tokenizer(e.model_folder) and tokenizer_digest(e.model_folder) != tokenizer_digest(default_path)
               for e in experts):
        return
    default = load_tokenizer(default_path)
    for e in experts:
        if own_tokenizer(e.model_folder, default_path, default) is not None:
            own = sorted(x.name for x in ESTIMATORS.unique() if x.own_tokenizers)
            raise RecipeError(f"importance: {est.name} runs the base and the experts on one encoding of the data "
                              f"(or mixes their weights), but the vocabulary of {e.reference} differs from the "
                              f"{'base' if base is not None else 'first expert'}'s; use an estimator that scores "
                              f"each expert in its own tokenizer ({', '.join(own)})")


def all_estimators() -> list[Estimator]:
    return sorted(ESTIMATORS.unique(), key=lambda e: e.name)


def measurements_key(estimator: str, part: str, *, base_hash: str | None, expert_hashes: Sequence[str],
                     data: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    """The content address of one part of an estimator's measurements: its inputs and its measure parameters."""
    return cache_key(MEASUREMENTS_KIND, estimator=estimator, part=part, base=base_hash, experts=list(expert_hashes),
                     data=dict(data), params=dict(params))


def expert_shards(tasks: Sequence[TaskData]) -> list[tuple[int, ...]]:
    """The experts grouped by the task data they are scored on, in order of first appearance: one expert a shard
    in-domain (each on its own task), one shard of all in the out-of-domain mode (one base pass serves them)."""
    groups: dict[str, list[int]] = {}
    for i, task in enumerate(tasks):
        groups.setdefault(task.sha256, []).append(i)
    return [tuple(g) for g in groups.values()]


@dataclass(frozen=True)
class MeasureJob:
    """One cached unit of an estimator's measurements: a part, over some of the experts (all of them, or a shard
    of a by-expert part), with its measure parameters and its content address."""

    part: MeasurePart
    experts: tuple[int, ...]
    params: dict[str, Any]
    key: str


def measure_jobs(est: Estimator, params: Mapping[str, Any], *, base_hash: str | None, expert_hashes: Sequence[str],
                 tasks: Sequence[TaskData], seed: int, ood: bool) -> list[MeasureJob]:
    """What measuring ``est`` with the (resolved) ``params`` takes, part by part and shard by shard. A shard's key
    names only its own experts and their data, so it is shared by every run that scores those experts on that
    data (another recipe with one more expert measures only the new one)."""
    if not est.two_stage:
        return []
    out = []
    for part in est.parts(params):
        part_params = {n: params[n] for n in part.params}
        if part.canonical is not None:
            part_params = part.canonical(part_params)
        shards = expert_shards(tasks) if part.by_expert else [tuple(range(len(tasks)))]
        for shard in shards:
            data = {"tasks": [tasks[i].sha256 for i in shard], "ood": ood, "seed": seed}
            key = measurements_key(est.name, part.name, base_hash=base_hash,
                                   expert_hashes=[expert_hashes[i] for i in shard], data=data, params=part_params)
            out.append(MeasureJob(part, shard, part_params, key))
    return out


def _jobs_by_part(jobs: Sequence[MeasureJob]) -> list[tuple[MeasurePart, list[MeasureJob]]]:
    out: dict[str, tuple[MeasurePart, list[MeasureJob]]] = {}
    for job in jobs:
        out.setdefault(job.part.name, (job.part, []))[1].append(job)
    return list(out.values())


def _measured_job(est: Estimator, job: MeasureJob, *, base: ModelRef | None, experts: Sequence[ModelRef],
                  tasks: Sequence[TaskData], device: torch.device, seed: int, ood: bool, store: Cache | None,
                  scratch: contextlib.ExitStack | None,
                  tokenizer_of: ImportanceRun | None = None) -> tuple[Measurements, bool]:
    """``job``'s measurements (from the cache, or measured now) and whether they were measured now. Without a cache
    they are measured in a scratch folder (entry files) and kept in memory, not written and read back.
    ``tokenizer_of``: the whole run, whose tokenizer and kept models (the base) the job's run shares."""
    built: list[bool] = []

    def measure_into(folder: Path) -> Measurements:
        assert est.measure is not None
        built.append(True)
        run = ImportanceRun(est.name, base, [experts[i] for i in job.experts], [tasks[i] for i in job.experts],
                            dict(job.params), device, seed, ood, part=job.part.name, _folder=folder,
                            _tokenizer=tokenizer_of._tokenizer if tokenizer_of is not None else None,
                            _kept=tokenizer_of._kept if tokenizer_of is not None else {},
                            _own=tokenizer_of._own if tokenizer_of is not None else {})
        start = time.perf_counter()
        torch.manual_seed(seed)  # each part and shard as if measured alone: the same numbers whatever else is
        m = est.measure(run)
        m.passes, m.key = dict(run.passes), job.key
        m.seconds = round(time.perf_counter() - start, 3)
        m.load_seconds = round(run.load_seconds, 3)
        if tokenizer_of is not None:
            tokenizer_of._tokenizer = run._tokenizer
        return m

    def build(folder: Path) -> None:
        measure_into(folder).save(folder, {
            "estimator": est.name, "part": job.part.name, "params": job.params,
            "base": base.content_hash if base else None, "experts": [experts[i].content_hash for i in job.experts],
            "data": {"tasks": [tasks[i].sha256 for i in job.experts], "ood": ood, "seed": seed},
            "device": str(device)})

    if store is None:
        assert scratch is not None
        folder = Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="mergeflow-measurements-")))
        m = measure_into(folder)
        m.index_entries(folder)
        # what a cached copy would hold: CPU tensors, JSON stats
        m.tensors = {n: t.detach().cpu() for n, t in m.tensors.items()}
        m.stats = json.loads(json.dumps(jsonable(m.stats)))
        return m, True
    folder = store.get_or_create(MEASUREMENTS_KIND, job.key, build)
    return Measurements.load(folder), bool(built)


def measure_shard(estimator: str, *, base: ModelRef | None, experts: Sequence[ModelRef], tasks: Sequence[TaskData],
                  params: Mapping[str, Any] | None = None, part: str, shard: Sequence[int],
                  device: str | torch.device = "cpu", seed: int = 0, ood: bool = False, cache: Cache | None = None,
                  threads: int | None = None) -> dict[str, Any]:
    """Measure (or find in the cache) one job of :func:`measure_jobs` — a part over one shard of the experts — so
    that workers can measure the shards of one run side by side; :func:`compute_coefficients` then finds them all
    in the cache. Returns ``{"part", "experts", "key", "reused", "seconds", "passes"}``."""
    est = get_estimator(estimator)
    resolved = est.resolve_params(params or {})
    check_vocabularies(est, base, experts)
    jobs = measure_jobs(est, resolved, base_hash=base.content_hash if base else None,
                        expert_hashes=[e.content_hash for e in experts], tasks=tasks, seed=seed, ood=ood)
    job = next((j for j in jobs if j.part.name == part and j.experts == tuple(shard)), None)
    if job is None:
        known = [(j.part.name, list(j.experts)) for j in jobs]
        raise RecipeError(f"importance: {estimator} has no measurement job part={part!r} experts={list(shard)} "
                          f"for these parameters; its jobs: {known}")
    with torch.random.fork_rng(devices=[]), compute_threads(threads):
        m, built = _measured_job(est, job, base=base, experts=experts, tasks=tasks, device=torch.device(device),
                                 seed=seed, ood=ood, store=cache or Cache(), scratch=None)
    return {"part": part, "experts": list(job.experts), "key": job.key, "reused": not built, "seconds": m.seconds,
            "passes": dict(m.passes)}


def compute_coefficients(estimator: str, *, base: ModelRef | None, experts: Sequence[ModelRef],
                         tasks: Sequence[TaskData], params: Mapping[str, Any] | None = None,
                         device: str | torch.device = "cpu", seed: int = 0, ood: bool = False,
                         cache: Cache | None = None, use_cache: bool = True,
                         threads: int | None = None) -> Coefficients:
    """Run (or fetch from the cache) one estimator over ``experts``; ``tasks[i]`` is expert i's data.

    A two-stage estimator fetches each part of its measurements from the cache or measures it, then finalizes;
    the artifact's ``stats["measurements"]`` says, per part, its keys (one per shard of a by-expert part), whether
    it was reused, the seconds and passes it cost when it was measured (and per shard, for a sharded part); ``stats["passes"]`` counts the passes of the measurements the artifact used.
    """
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
    check_vocabularies(est, base, experts)
    device = torch.device(device)
    base_hash = base.content_hash if base else None
    expert_hashes = [e.content_hash for e in experts]
    data = {"tasks": [t.sha256 for t in tasks], "ood": ood, "seed": seed}
    key = coefficients_key(estimator, base_hash=base_hash, expert_hashes=expert_hashes, data=data, params=resolved)
    run = ImportanceRun(estimator, base, list(experts), list(tasks), resolved, device, seed, ood)
    store = (cache or Cache()) if use_cache else None

    def measured(scratch: contextlib.ExitStack) -> tuple[Measurements, dict[str, Any]]:
        """Every part the parameters need, from the cache or measured now (in a scratch folder without a cache);
        a by-expert part shard by shard."""
        parts, record = [], {}
        loaded_now: list[float] = []  # model reading in the shards measured by this call
        for part, jobs in _jobs_by_part(measure_jobs(est, resolved, base_hash=base_hash, expert_hashes=expert_hashes,
                                                     tasks=tasks, seed=seed, ood=ood)):
            shards = []
            for job in jobs:
                m, built = _measured_job(est, job, base=base, experts=experts, tasks=tasks, device=device,
                                         seed=seed, ood=ood, store=store, scratch=scratch, tokenizer_of=run)
                shards.append((job.experts, m, built))
            m = shards[0][1] if len(shards) == 1 else Measurements.stack([(e, m) for e, m, _ in shards], part)
            parts.append(m)
            record[part.name] = {"keys": [j.key for j in jobs], "reused": not any(b for *_, b in shards),
                                 "seconds": round(sum(sm.seconds or 0.0 for _, sm, _ in shards), 3),
                                 "passes": dict(m.passes)}
            loaded_now.extend(sm.load_seconds for _, sm, built in shards if built)
            if len(jobs) > 1:
                record[part.name]["shards"] = [{"experts": list(e), "key": j.key, "reused": not b,
                                                "seconds": sm.seconds}
                                               for j, (e, sm, b) in zip(jobs, shards)]
        return Measurements.combine(parts), {"reused": all(r["reused"] for r in record.values()), "parts": record,
                                             "load_seconds": round(sum(loaded_now), 3)}

    def build(folder: Path) -> None:
        start = time.perf_counter()
        # all cores but one, like the merge: oversubscribed OpenMP threads run tiny passes many times slower
        with torch.random.fork_rng(devices=[]), compute_threads(threads), contextlib.ExitStack() as scratch:
            if est.two_stage:
                assert est.finalize is not None
                measurements, record = measured(scratch)
                run._kept.clear()  # the shards' shared base: not needed by finalize
                run.passes = dict(measurements.passes)
                torch.manual_seed(seed)
                coeffs = est.finalize(run, measurements)
                coeffs.stats["measurements"] = record
                coeffs.stats.setdefault("load_seconds", record["load_seconds"])  # of this call's "seconds"
            else:
                assert est.compute is not None
                torch.manual_seed(seed)
                coeffs = est.compute(run)
                coeffs.stats.setdefault("load_seconds", round(run.load_seconds, 3))
            coeffs.key = key
            coeffs.stats.setdefault("seconds", round(time.perf_counter() - start, 3))
            coeffs.stats.setdefault("device", str(device))
            coeffs.save(folder)  # inside the scratch context: lazy entries read the measurements while saving

    if store is None:
        # no cache: a scratch folder that lives as long as the artifact (entry fields are read from it lazily)
        tmp = Path(tempfile.mkdtemp(prefix="mergeflow-coefficients-"))
        try:
            build(tmp)
            out = Coefficients.load(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        weakref.finalize(out, shutil.rmtree, tmp, ignore_errors=True)
        return out
    return Coefficients.load(store.get_or_create(CACHE_KIND, key, build))


def measurement_shards(estimator: str, *, base: ModelRef | None, experts: Sequence[ModelRef],
                       tasks: Sequence[TaskData], params: Mapping[str, Any] | None = None, seed: int = 0,
                       ood: bool = False) -> list[dict[str, Any]]:
    """The measurement shards of a run that can be measured apart (``{"part", "experts", "key"}``): those of the
    estimator's by-expert parts, when there is more than one shard; each is measured by :func:`measure_shard`.
    Empty when there is nothing to fan out. Cheap: no model is read."""
    est = get_estimator(estimator)
    resolved = est.resolve_params(params or {})
    jobs = measure_jobs(est, resolved, base_hash=base.content_hash if base else None,
                        expert_hashes=[e.content_hash for e in experts], tasks=tasks, seed=seed, ood=ood)
    return [{"part": part.name, "experts": list(j.experts), "key": j.key}
            for part, part_jobs in _jobs_by_part(jobs) if part.by_expert and len(part_jobs) > 1 for j in part_jobs]
