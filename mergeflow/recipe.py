"""The Recipe: what to merge, how, and with which parameters, validated up front.

A recipe is a superset of mergekit's YAML (``merge_method``, ``models``, ``base_model``, ``parameters`` with
per-model values, tensor-name filters and layer gradients, ``dtype``, ``out_dtype``, ``tokenizer_source`` or the
``tokenizer`` section, ``chat_template``), so a mergekit config loads unchanged. Every problem is reported with the path of the offending field before any
checkpoint is opened.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergeflow.adapters import is_adapter_folder
from mergeflow.errors import CheckpointError, RecipeError
from mergeflow.methods.base import MergeMethod, ParamSpec, get_method
from mergeflow.resolvers import scheme_of, split_adapter_reference
from mergeflow.tensors import DTYPE_NAMES

Scalar = bool | int | float | str


class Conditional(BaseModel):
    """A value that applies to tensors whose name contains ``filter`` (mergekit semantics)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    filter: str | None = None
    value: Scalar | list[Scalar]


Setting = Scalar | list[Scalar] | Conditional | list[Conditional]


def evaluate_setting(setting: Setting, tensor_name: str, t: float,
                     coerce: Callable[[Any], Any] | None = None) -> Any:
    """Resolve a setting for one tensor: filters by substring, gradients interpolated at depth ``t`` in [0, 1].

    ``coerce`` is the parameter's scalar type: as in mergekit, list entries are converted before interpolating, so
    YAML's ``1e-3`` (which PyYAML reads as a string) is a numeric endpoint for a numeric parameter.
    """
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, bool | int | float | str):
        return setting
    if not setting:
        return None
    if all(isinstance(e, bool | int | float | str) for e in setting):
        values = [_coerce(v, coerce) for v in setting]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    for cond in setting:
        if not isinstance(cond, Conditional):
            raise RecipeError(f"cannot mix plain values and {{filter, value}} entries in one setting: {setting!r}")
        if cond.filter in (None, "*") or (tensor_name and cond.filter in tensor_name):
            return evaluate_setting(cond.value, tensor_name, t, coerce)
    return None


def _coerce(value: Scalar, coerce: Callable[[Any], Any] | None) -> Scalar:
    if coerce is None or coerce is bool or coerce is str or isinstance(value, bool):
        return value
    try:
        return coerce(value)
    except (TypeError, ValueError):
        return value


def _scalars(setting: Setting) -> list[Scalar]:
    """Every scalar a setting can produce (to validate them all up front)."""
    if isinstance(setting, Conditional):
        return _scalars(setting.value)
    if isinstance(setting, list):
        out: list[Scalar] = []
        for item in setting:
            out.extend(_scalars(item))
        return out
    return [setting]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str
    parameters: dict[str, Setting] = Field(default_factory=dict)
    # the task this expert was fine-tuned for (zoo task, lm-eval task or .jsonl file): its data feeds the
    # data-aware estimators of ``importance``
    task: str | None = None

    @field_validator("parameters", mode="before")
    @classmethod
    def _null_parameters(cls, v: Any) -> Any:
        return {} if v is None else v  # mergekit accepts `parameters:` left empty

    @field_validator("model", mode="before")
    @classmethod
    def _ref(cls, v: Any) -> str:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, dict) and "model" in v:
            return _mergekit_reference(v)
        return v


def _mergekit_reference(v: Mapping[str, Any]) -> str:
    """mergekit's nested ModelReference ``{model: {path: BASE}, lora: {path: ADAPTER}}`` as ``BASE+ADAPTER``."""
    def path_of(x: Any, where: str) -> str:
        if isinstance(x, Mapping) and set(x) <= {"path"} and isinstance(x.get("path"), str):
            return x["path"]
        if isinstance(x, str):
            return x
        raise ValueError(f"{where}: give {{path: ...}} (revisions and other fields of nested references are not "
                         "supported; write the model as a folder, hub id or BASE+ADAPTER)")

    unknown = set(v) - {"model", "lora", "override_architecture"}
    if unknown or v.get("override_architecture"):
        fields = sorted(unknown) or ["override_architecture"]
        raise ValueError(f"unsupported fields of a nested model reference: {fields}")
    model = path_of(v["model"], "model")
    return f"{model}+{path_of(v['lora'], 'lora')}" if v.get("lora") is not None else model


class ImportanceData(BaseModel):
    """Which examples an estimator reads: ``n`` examples of each expert's task ``split`` (estimator defaults when
    unset), drawn with ``seed``; ``target`` scores every expert on one task instead (out-of-domain mode, docs/methods.md D-10)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    split: Literal["fewshot", "calib", "validation", "train"] | None = None
    n: int | None = Field(default=None, ge=0)
    seed: int = 0
    target: str | None = None
    zoo: str | None = None  # the zoo whose task files zoo task names refer to (default: the default zoo)


class ImportanceSpec(BaseModel):
    """One data-aware estimator run whose Coefficients the merge consumes."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    estimator: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: ImportanceData = Field(default_factory=ImportanceData)

    @field_validator("parameters", mode="before")
    @classmethod
    def _null(cls, v: Any) -> Any:
        return {} if v is None else v


class SelectionSpec(BaseModel):
    """How a pipeline ranks merges (the sweep's winner, the ``champion`` alias): ``metric`` on ``split``, never on
    the test split the reports use. ``in_domain_avg``: mean accuracy over the evaluated zoo in-domain tasks (or over
    all tasks when none is a zoo task); ``avg``: mean over every evaluated task; ``acc:TASK``: one task."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    metric: str = "in_domain_avg"
    split: Literal["validation", "test"] = "validation"
    limit: int | None = Field(default=None, ge=1)
    higher_is_better: bool = True

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v not in ("in_domain_avg", "avg") and not (v.startswith("acc:") and len(v) > 4):
            raise ValueError(f"unknown selection metric {v!r}; use in_domain_avg, avg or acc:TASK")
        return v


class EvaluationSpec(BaseModel):
    """What the pipeline's evaluate stage runs with lm-eval: task names (``zoo``/``zoo-ood`` groups, zoo task names
    or any lm-eval task), the zoo those names refer to (``zoo:SIZE[@SEED]`` or a folder), the reported split.
    ``trust_task_code`` lets lm-eval run the code of the zoo's task files (``!function``, ``include:``), needed for a
    zoo folder outside MERGEFLOW_HOME/zoo whose task files are not mergeflow's own (see mergeflow.evaluation)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tasks: list[str] = Field(default_factory=lambda: ["zoo", "zoo-ood"], min_length=1)
    zoo: str | None = None
    trust_task_code: bool = False
    split: Literal["test", "validation"] = "test"
    limit: int | None = Field(default=None, ge=1)
    num_fewshot: int | None = Field(default=None, ge=0)
    batch_size: int = Field(default=64, ge=1)
    selection: SelectionSpec = Field(default_factory=SelectionSpec)

    @field_validator("tasks", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [t.strip() for t in v.split(",") if t.strip()] if isinstance(v, str) else v


class RegistrySpec(BaseModel):
    """Where the register stage files the merge: an MLflow experiment, a registered model and the alias that
    moves to a new version only when it beats the current holder on the selection metric."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str | None = None  # registered model name; default: the recipe's name, else "mergeflow"
    experiment: str | None = None  # default: the registered model name
    alias: str = "champion"

    @field_validator("name", "alias")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(f"{v!r}: use letters, digits, '.', '_' and '-' (MLflow names and aliases)")
        return v


_UNSUPPORTED = {
    "slices": "layer slices (passthrough / frankenmerges) are not supported; merge whole models with `models:`",
    "modules": "per-module definitions are not supported; use `models:` with tensor-name filters in parameters",
}


class ZeroEmbedding(BaseModel):
    """A token's default row is zeros (mergekit's ``{kind: zero}``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["zero"]


class ModelTokenEmbedding(BaseModel):
    """A token's default row is one row of a model: the row of ``token`` in that model's own vocabulary, or row
    ``token_id`` (mergekit's ``{kind: model_token}``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["model_token"]
    model: str
    token_id: int | None = Field(default=None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ModelTokenEmbedding:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id or token")
        return self


class TokenEmbedding(BaseModel):
    """Where one token's rows come from, for the models that lack it (all models with ``force``); ``source`` a
    model reference means that model's row of the same token."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: ZeroEmbedding | ModelTokenEmbedding | str
    force: bool = False

    @field_validator("source", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        return str(v) if isinstance(v, Path) else v


class TokenizerSpec(BaseModel):
    """mergekit's ``tokenizer:`` section: the output tokenizer's ``source`` (``union`` by default, as in mergekit),
    per-token rules for the rows of tokens some models lack, and padding of the vocabulary rows."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: str = "union"
    tokens: dict[str, TokenEmbedding] = Field(default_factory=dict)
    pad_to_multiple_of: int | None = Field(default=None, ge=1)

    @field_validator("source", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        return str(v) if isinstance(v, Path) else v

    @field_validator("tokens", mode="before")
    @classmethod
    def _null(cls, v: Any) -> Any:
        return {} if v is None else v


PIPELINE_SECTIONS = ("evaluation", "registry")


def adapter_parts(ref: str, recipe_dir: str | Path | None) -> tuple[str, str] | None:
    """``(base, adapter)`` of a ``BASE+ADAPTER`` reference, else None (a malformed one is left for resolve to
    report)."""
    try:
        return split_adapter_reference(ref, Path(recipe_dir) if recipe_dir is not None else None)
    except CheckpointError:
        return None


def resolve_relative(ref: str, recipe_dir: str | Path | None) -> str:
    """How a recipe in ``recipe_dir`` names local things: an existing (or ``./``/``/``/``~``-prefixed) path relative
    to the recipe's folder becomes absolute, ``~`` expanded and symlinks resolved; anything else (hub id, a reference
    with a registered scheme such as a ``models:/`` URI or a ``zoo:`` name) stays as written. Each side of a
    ``BASE+ADAPTER`` reference is resolved so."""
    parts = adapter_parts(ref, recipe_dir)
    if parts is not None:
        return "+".join(resolve_relative(p, recipe_dir) for p in parts)
    if scheme_of(ref) is not None:
        return ref
    if ref.startswith("~"):
        return str(Path(ref).expanduser().resolve())
    if recipe_dir is None:
        return ref
    candidate = Path(ref) if Path(ref).is_absolute() else Path(recipe_dir) / ref
    return str(candidate.resolve()) if ref.startswith((".", "/")) or candidate.exists() else ref


def resolve_path(ref: str, recipe_dir: str | Path | None) -> str:
    """A local file or folder a recipe names (a task file, a coefficients folder, a zoo folder): ``~`` expanded,
    relative to the recipe's folder (never the working directory, when the recipe has a folder), symlinks
    resolved. A reference with a registered scheme (``zoo:full@0``) stays as written, as does a relative path of a
    recipe without a folder."""
    if scheme_of(ref) is not None:
        return ref
    path = Path(ref).expanduser()
    if not path.is_absolute():
        if recipe_dir is None:
            return ref
        path = Path(recipe_dir) / path
    return os.path.realpath(path)


def is_task_file(task: str, recipe_dir: str | Path | None) -> bool:
    """Whether a ``task`` names a data file (``.jsonl``/``.json``, a path, or a file beside the recipe) rather than
    a zoo or lm-eval task name."""
    if task.endswith((".jsonl", ".json")) or task.startswith((".", "/", "~")):
        return True
    return recipe_dir is not None and (Path(recipe_dir) / task).is_file()


def resolve_task(task: str, recipe_dir: str | Path | None) -> str:
    """A model's ``task`` as the importance stage reads it: a data file resolved like :func:`resolve_path`
    (relative to the recipe's folder), a task name unchanged."""
    return resolve_path(task, recipe_dir) if is_task_file(task, recipe_dir) else task


class Recipe(BaseModel):
    """A merge recipe. Load one with :func:`load_recipe` (YAML/JSON file) or ``Recipe.model_validate(dict)``."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    merge_method: str = Field(alias="method")
    models: list[ModelEntry]
    base_model: str | None = None
    parameters: dict[str, Setting] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None
    name: str | None = None
    seed: int = 0
    mergekit_compat: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    # deprecated: rows merged by index when vocabularies differ; tokenizer_source: base aligns them by token
    vocab_policy: Literal["error", "base"] = "error"
    confine_paths: bool = False
    # data-aware coefficients: estimators to run (cached by content) and/or precomputed artifact folders
    importance: list[ImportanceSpec] = Field(default_factory=list)
    coefficients: list[str] = Field(default_factory=list)
    # pipeline stages after the merge; they do not change the model, so they are not part of the recipe hash
    evaluation: EvaluationSpec | None = None
    registry: RegistrySpec | None = None
    # folder that relative model paths are resolved against (the recipe file's folder); not part of the hash
    recipe_dir: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for key, why in _UNSUPPORTED.items():
                if data.get(key) not in (None, [], {}):
                    raise ValueError(f"{key}: {why}")
        if isinstance(data, Mapping):
            data = {k: v for k, v in data.items() if k not in _UNSUPPORTED}
        return data

    @field_validator("parameters", mode="before")
    @classmethod
    def _null_parameters(cls, v: Any) -> Any:
        return {} if v is None else v

    @field_validator("importance", "coefficients", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        if v is None:
            return []
        return [v] if isinstance(v, (Mapping, str, Path)) else v

    @field_validator("coefficients", mode="before")
    @classmethod
    def _paths(cls, v: Any) -> Any:
        return [str(x) if isinstance(x, Path) else x for x in v]

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, v: str | None) -> str | None:
        if v is None or v == "auto" or ("{" in v and len(v) >= 20):
            return v
        if len(v) < 256 and "\n" not in v and "{" not in v:
            raise ValueError(f"{v!r}: mergekit's built-in template names are not shipped with mergeflow; give the "
                             "template's Jinja text, or auto (the template most inputs share)")
        raise ValueError(f"{v[:40]!r} is not a Jinja chat template (nor auto)")

    @model_validator(mode="after")
    def _check_tokenizer(self) -> Recipe:
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("tokenizer_source: give either tokenizer_source or a tokenizer section, not both "
                             "(tokenizer.source is the same setting)")
        if self.vocab_policy == "base" and self.vocabulary_source is not None:
            raise ValueError("vocab_policy: base is deprecated and cannot be combined with tokenizer_source / "
                             "tokenizer, which align the rows by token; remove vocab_policy")
        source = self.vocabulary_source
        if source is not None and source not in ("base", "union") and not source.strip():
            raise ValueError("tokenizer_source: empty model reference")
        return self

    @field_validator("base_model", "tokenizer_source", mode="before")
    @classmethod
    def _path_to_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, Path) else v

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is not None and v.lower() not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {v!r}; use float32, float16 or bfloat16")
        return v

    @model_validator(mode="after")
    def _check_method(self) -> Recipe:
        try:
            method = get_method(self.merge_method)
        except RecipeError as exc:
            raise ValueError(str(exc)) from None
        experts = self.experts
        if method.needs_base and not self.base_model:
            raise ValueError(f"base_model: {method.name} needs a base model")
        if not experts:
            raise ValueError("models: no model to merge besides the base")
        if len(experts) < method.min_models:
            raise ValueError(f"models: {method.name} needs at least {method.min_models} model(s) besides the base, "
                             f"got {len(experts)}")
        if method.max_models is not None and len(experts) > method.max_models:
            raise ValueError(f"models: {method.name} takes at most {method.max_models} model(s) besides the base, "
                             f"got {len(experts)}")
        _check_params(method, self)
        _check_importance(method, self)
        self._check_adapters()
        if self.confine_paths:
            self._check_confined()
        return self

    def _check_confined(self) -> None:
        """Every local path the recipe names lies inside its folder (``confine_paths``), compared as real paths."""
        refs = [("base_model", self.base_model), ("tokenizer_source", self.tokenizer_source)]
        if self.tokenizer is not None:
            refs.append(("tokenizer.source", self.tokenizer.source if self.tokenizer.source != "union" else None))
            for token, rule in self.tokenizer.tokens.items():
                model = rule.source if isinstance(rule.source, str) else getattr(rule.source, "model", None)
                refs.append((f"tokenizer.tokens[{token!r}].source", model))
        refs += [(f"models[{i}].model", m.model) for i, m in enumerate(self.models)]
        paths = [(f"coefficients[{i}]", "coefficients folder", c) for i, c in enumerate(self.coefficients)]
        paths += [(f"models[{i}].task", "task file", m.task) for i, m in enumerate(self.models)
                  if m.task and is_task_file(m.task, self.recipe_dir)]
        for i, spec in enumerate(self.importance):
            if spec.data.zoo:
                paths.append((f"importance[{i}].data.zoo", "zoo", spec.data.zoo))
            if spec.data.target and is_task_file(spec.data.target, self.recipe_dir):
                paths.append((f"importance[{i}].data.target", "task file", spec.data.target))
        if self.evaluation is not None and self.evaluation.zoo:
            paths.append(("evaluation.zoo", "zoo", self.evaluation.zoo))
        checks: list[tuple[str, Callable[[str], str], str]] = [
            (where, self.resolve_reference, ref) for where, ref in refs if ref and ref != "base"]
        checks += [(where, functools.partial(self.local_path, what=what), ref) for where, what, ref in paths]
        for where, check, ref in checks:
            try:
                check(ref)
            except RecipeError as exc:
                raise ValueError(f"{where}: {exc}") from None

    # --- derived views ---

    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    @property
    def vocabulary_source(self) -> str | None:
        """The output tokenizer's source (``tokenizer_source`` or ``tokenizer.source``): ``base``, ``union``, a model
        reference, or None (the reference's tokenizer files copied, rows merged by index)."""
        if self.tokenizer is not None:
            return self.tokenizer.source
        return self.tokenizer_source

    @property
    def experts(self) -> list[ModelEntry]:
        """The non-base models in recipe order (mergekit lets the base appear in ``models``; it is not an expert)."""
        return [m for m in self.models if m.model != self.base_model]

    def _check_adapters(self) -> None:
        """A LoRA adapter folder needs the model it applies to: the base_model, or BASE+ADAPTER."""
        if self.base_model and self.is_adapter_folder(self.base_model):
            raise ValueError(f"base_model: {self.base_model!r} is a LoRA adapter; name the model it applies to as "
                             f"BASE+{self.base_model}")
        if self.base_model is None:
            for i, m in enumerate(self.models):
                if self.is_adapter_folder(m.model):
                    raise ValueError(f"models[{i}].model: {m.model!r} is a LoRA adapter, which applies to the "
                                     f"recipe's base_model, and the recipe has none; set base_model or write "
                                     f"BASE+{m.model}")

    def is_adapter_folder(self, ref: str) -> bool:
        """Whether ``ref`` is a local LoRA adapter folder named alone (not as BASE+ADAPTER)."""
        if scheme_of(ref) is not None or adapter_parts(ref, self.recipe_dir) is not None:
            return False
        path = Path(resolve_relative(ref, self.recipe_dir)).expanduser()
        if not path.is_absolute():
            path = Path(self.recipe_dir or Path.cwd()) / path
        return path.is_dir() and is_adapter_folder(path)

    def adapter_base_of(self, ref: str) -> str | None:
        """The model a reference applies to when it is a LoRA adapter folder named alone: the recipe's base_model
        (None for anything else; ``BASE+ADAPTER`` names its own)."""
        if ref == self.base_model or not self.is_adapter_folder(ref):
            return None
        return self.base_model

    def resolve_reference(self, ref: str) -> str:
        """A model reference with relative local paths resolved against the recipe's folder (``~`` expanded,
        symlinks resolved); with ``confine_paths`` a local path outside the folder is refused. Each side of a
        ``BASE+ADAPTER`` reference is resolved so."""
        parts = adapter_parts(ref, self.recipe_dir)
        if parts is not None:
            return "+".join(self.resolve_reference(p) for p in parts)
        resolved = resolve_relative(ref, self.recipe_dir)
        if self.confine_paths:
            # a path, not a hub id / URI / zoo name (without a folder: anything that exists where it would be read)
            local = resolved != ref or Path(ref).is_absolute() or (
                self.recipe_dir is None and scheme_of(ref) is None and Path(ref).exists())
            if local:
                self._confine(resolved if resolved != ref else os.path.realpath(ref), ref, "model")
        return resolved

    def local_path(self, ref: str, what: str = "path") -> str:
        """A local file or folder the recipe names (coefficients folder, task file, zoo folder), resolved as
        :func:`resolve_path` does; with ``confine_paths`` one outside the recipe's folder is refused."""
        resolved = resolve_path(ref, self.recipe_dir)
        if self.confine_paths and scheme_of(ref) is None:
            self._confine(resolved if Path(resolved).is_absolute() else os.path.realpath(ref), ref, what)
        return resolved

    def resolve_task(self, task: str) -> str:
        """A model's (or an importance target's) task: a data file resolved against the recipe's folder (and
        confined with ``confine_paths``), a task name unchanged."""
        return self.local_path(task, "task file") if is_task_file(task, self.recipe_dir) else task

    def _confine(self, real: str, ref: str, what: str) -> None:
        if self.recipe_dir is None:
            raise RecipeError(f"{what} {ref!r} is a local path, but the recipe has no folder to confine it to "
                              "(confine_paths: true; load the recipe from a file)")
        folder = os.path.realpath(self.recipe_dir)
        if not Path(real).is_relative_to(folder):
            raise RecipeError(f"{what} {ref!r} lies outside the recipe folder {folder} (it resolves to {real}; "
                              "confine_paths: true)")

    def default(self, spec: ParamSpec) -> Any:
        return spec.default_for(self.mergekit_compat)

    def tensor_params(self, tensor_name: str, t: float) -> tuple[dict[str, list[Any]], dict[str, Any]]:
        """Per-model and shared parameter values for one tensor (per-model value first, then the global one)."""
        method = self.method
        per_model: dict[str, list[Any]] = {}
        for spec in method.per_model_params:
            values = []
            for entry in self.experts:
                value = None
                for source in (entry.parameters, self.parameters):
                    if spec.name in source:
                        value = evaluate_setting(source[spec.name], tensor_name, t, spec.type)
                        if value is not None:
                            break
                values.append(self.default(spec) if value is None else spec.type(value))
            per_model[spec.name] = values
        shared: dict[str, Any] = {}
        for spec in method.shared_params:
            value = evaluate_setting(self.parameters[spec.name], tensor_name, t, spec.type) \
                if spec.name in self.parameters else None
            shared[spec.name] = self.default(spec) if value is None else spec.type(value)
        return per_model, shared

    def canonical(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=False, exclude_none=True)

    def recipe_hash(self) -> str:
        """The identity of the merged model: the canonical recipe without its evaluation and registry sections."""
        model = {k: v for k, v in self.canonical().items() if k not in PIPELINE_SECTIONS}
        raw = json.dumps(model, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(raw.encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.canonical(), sort_keys=False)


# Parameters scale float32 tensors: a value beyond float32's range (1e300) overflows to Inf like .inf itself does.
_FLOAT32_MAX = 3.4028234663852886e38


def _check_finite(value: Any, where: str) -> None:
    """Refuse a numeric parameter that is infinite, NaN or beyond float32's range (the merge would be Inf/NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    if (isinstance(value, float) and not math.isfinite(value)) or abs(value) > _FLOAT32_MAX:
        raise ValueError(f"{where}: {value!r} is not a finite number within float32 range (|value| <= 3.4e38); "
                         "the merged tensors would overflow to Inf/NaN")


def _check_finite_tree(value: Any, where: str) -> None:
    """:func:`_check_finite` over every number of a nested mapping / list (estimator parameters)."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_finite_tree(v, f"{where}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_finite_tree(v, f"{where}[{i}]")
    else:
        _check_finite(value, where)


def _check_params(method: MergeMethod, recipe: Recipe) -> None:
    known = {p.name: p for p in method.params}

    def check(settings: Mapping[str, Setting], where: str, allow_shared: bool) -> None:
        for name, setting in settings.items():
            spec = known.get(name)
            if spec is None:
                names = ", ".join(sorted(known)) or "none"
                raise ValueError(f"{where}.{name}: unknown parameter for {method.name} (its parameters: {names})")
            if not spec.per_model and not allow_shared:
                raise ValueError(f"{where}.{name}: a shared parameter of {method.name}; set it under the top-level "
                                 "`parameters`")
            for value in _scalars(setting):
                try:
                    checked = spec.check(value, f"{where}.{name}")
                except RecipeError as exc:
                    raise ValueError(str(exc)) from None
                _check_finite(checked, f"{where}.{name}")

    check(recipe.parameters, "parameters", allow_shared=True)
    for i, entry in enumerate(recipe.models):
        check(entry.parameters, f"models[{i}].parameters", allow_shared=False)
    for spec in method.params:
        if spec.required and spec.name not in recipe.parameters and not (
                spec.per_model and all(spec.name in e.parameters for e in recipe.experts)):
            raise ValueError(f"parameters.{spec.name}: required by {method.name} ({spec.help})")
    # weights that sum to zero where the method normalises by them
    if method.normalizes_by_weight_sum and not (recipe.mergekit_compat and method.compat_guards_zero_weight_sum):
        normalize = recipe.parameters.get("normalize", recipe.default(known["normalize"]))
        if normalize is True:
            weights = []
            for entry in recipe.experts:
                w = entry.parameters.get("weight", recipe.parameters.get("weight", known["weight"].default))
                if not isinstance(w, int | float):
                    return  # filters / gradients: checked per tensor when the merge is planned
                weights.append(float(w))
            if abs(sum(weights)) < 1e-8:
                raise ValueError(f"models[*].parameters.weight: the weights sum to zero but {method.name} normalises "
                                 "by their sum (set normalize: false or change the weights)")


def _check_importance(method: MergeMethod, recipe: Recipe) -> None:
    """Estimator names and parameters, and the data each needs, checked before anything is loaded."""
    if method.requires_estimator and not (recipe.importance or recipe.coefficients):
        raise ValueError(f"importance: {method.name} merges with coefficients from its estimator; add "
                         f"`importance: {{estimator: {method.requires_estimator}}}` (and a task per model)")
    if not (recipe.importance or recipe.coefficients):
        return
    if recipe.mergekit_compat:
        raise ValueError("importance: data-aware coefficients have no mergekit equivalent; "
                         "set mergekit_compat: false")
    from mergeflow.importance.base import get_estimator

    for i, spec in enumerate(recipe.importance):
        _check_finite_tree(spec.parameters, f"importance[{i}].parameters")
        try:
            est = get_estimator(spec.estimator)
            est.resolve_params(spec.parameters)
        except RecipeError as exc:
            raise ValueError(str(exc).replace("importance.", f"importance[{i}].", 1)) from None
        if est.needs_base and not recipe.base_model:
            raise ValueError(f"importance[{i}]: {est.name} needs base_model")
        if spec.data.target is not None and not est.supports_ood:
            raise ValueError(f"importance[{i}].data.target: {est.name} has no out-of-domain mode")
        if spec.data.target is None:
            missing = [j for j, m in enumerate(recipe.models) if m.model != recipe.base_model and not m.task]
            if missing:
                raise ValueError(f"models[{missing[0]}].task: {est.name} scores each expert on its own task; "
                                 "name it (a zoo task, an lm-eval task or a .jsonl file), or set "
                                 f"importance[{i}].data.target")


def _format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"]).replace(".[", "[")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "required field is missing"
        parts.append(f"{loc}: {msg}" if loc else msg)
    # unions produce one error per alternative: keep the distinct messages
    return "; ".join(dict.fromkeys(parts))


def parse_recipe(data: Mapping[str, Any], *, recipe_dir: Path | None = None, source: str = "recipe") -> Recipe:
    if not isinstance(data, Mapping):
        raise RecipeError(f"{source}: expected a mapping at the top level")
    try:
        return Recipe.model_validate({**data, "recipe_dir": recipe_dir})
    except ValidationError as exc:
        raise RecipeError(f"{source}: {_format_validation_error(exc)}") from None


def load_recipe(path: str | Path, **overrides: Any) -> Recipe:
    """Read a YAML (or JSON) recipe; relative model paths are resolved against the recipe's folder."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(data, Mapping):
        data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    return parse_recipe(data, recipe_dir=path.parent.resolve(), source=str(path))
