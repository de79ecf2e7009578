"""MLflow layer: every merged model is one run, one MLflow Model and one registered version; an alias marks the best.

A run holds the flattened recipe as params, provenance as tags (recipe hash, input content hashes, library version,
the caller's flow-run id), the caller's numbers as metrics, the evaluation data as dataset inputs (context
``evaluation``) and its files as artifacts. The model is an MLflow 3 *logged model* of the ``transformers`` flavor
(``task: text-generation``, with the ``python_function`` flavor), linked to the run as its output, with the recipe
as its params and the run's metrics on it. It is logged straight from the merged folder, whose files (weights,
config, tokenizer, card) sit unchanged under the model's ``model/`` folder beside ``MLmodel``: the weights are
uploaded once, and the standard loaders (``mlflow.pyfunc.load_model``, ``mlflow.transformers.load_model``) and
``mlflow models serve`` accept ``models:/NAME@champion``. The registered version points at the logged model
(``source = models:/<model id>``) and carries a one-line description: the method, its key parameters and the
selection score.

A run spans only the register stage (the model upload included); how long the merge and the evaluations took is in
its ``*_seconds`` metrics, as they were computed (a cached stage reports the time it cost when it ran). The
experiment is tagged as a model-development experiment, so MLflow 3's UI opens it on runs and models, not on the
GenAI (traces) view.

Safety rules:

- The registry never points at a partial model: the folder is checked first (config.json, every safetensors header
  consistent with its file size) and the version is created only after the whole model is logged.
- Registering is idempotent: a version whose ``mergeflow.model_hash`` tag equals the folder's content hash is reused,
  not logged again, so re-running a pipeline after a crash is safe (the promotion rule is still applied).
- A ``models:/`` reference resolves to the weights only if they hash to the version's ``mergeflow.model_hash``.
- An alias moves only to a strictly better version. The value of a version on a selection metric is stored as a
  model-version tag (``mergeflow.selection.<metric>``), so comparing never depends on run metrics; the rule of an
  alias (metric, direction) is stored on the registered model (``mergeflow.alias.<alias>``) and a later promotion
  with another rule is refused rather than silently comparing unlike numbers.

No Prefect here: flows pass their flow-run id in as a plain string.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as package_metadata
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple
from urllib.parse import unquote

try:
    import mlflow
    import mlflow.artifacts
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel
    from mlflow.exceptions import MlflowException
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_MODEL_VERSIONS, MLFLOW_RUN_NOTE
    from mlflow.utils.validation import (
        MAX_ENTITY_KEY_LENGTH,
        MAX_PARAM_VAL_LENGTH,
        MAX_TAG_VAL_LENGTH,
        path_not_unique,
    )
except ImportError as e:  # MLflow is an optional dependency (the pipeline extra)
    raise ImportError("MLflow is not installed (pip install 'mergeflow[pipeline]'); mergeflow.tracking needs it"
                      ) from e

from mergeflow import __version__
from mergeflow.cache import Cache, cache_key
from mergeflow.checkpoints import CONFIG, inspect_weights, resolve
from mergeflow.errors import CheckpointError, TrackingError

ENV_PROJECT_DIR = "MERGEFLOW_PROJECT_DIR"
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
MODEL_ARTIFACT = "model"  # the logged model's name; its weights sit in the transformers flavor's model/ folder
MODEL_TASK = "text-generation"  # the transformers pipeline the pyfunc flavor and `mlflow models serve` run
# What the pyfunc flavor accepts besides the prompts (without a params schema it ignores them, STACK.md)
GENERATION_PARAMS = ParamSchema([ParamSpec("max_new_tokens", "long", 32), ParamSpec("do_sample", "boolean", False),
                                 ParamSpec("return_full_text", "boolean", False)])
SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                           params=GENERATION_PARAMS)
# The packages a fresh environment needs to load the model (`mlflow models serve --env-manager virtualenv|uv`);
# the flavor's default list adds torchvision, which is not installed here and not needed for text generation.
MODEL_REQUIREMENTS = ("transformers", "torch", "safetensors", "tokenizers")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # one of them: a folder AutoTokenizer can load
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow 3's UI: which view an experiment opens in
EXPERIMENT_KIND = "custom_model_development"  # runs, metrics and models (not the GenAI traces view)
EVALUATION_CONTEXT = "evaluation"  # the dataset inputs' mlflow.data.context
RUN_NOTE = ("Registration of one merge. The run spans the register stage only (logging and the model upload); the "
            "merge, importance and evaluation times are the *_seconds metrics, as first computed.")

TAG_RECIPE_HASH = "mergeflow.recipe_hash"
TAG_MODEL_HASH = "mergeflow.model_hash"
TAG_VERSION = "mergeflow.version"
TAG_INPUT_HASHES = "mergeflow.input_hashes"  # JSON {reference: content hash}: exact, whatever the references are
TAG_INPUT_PREFIX = "mergeflow.input."  # one tag per input (sanitised reference) so runs can be searched by input
TAG_FLOW_RUN_ID = "mergeflow.flow_run_id"
TAG_SELECTION_PREFIX = "mergeflow.selection."  # model-version tag: value of the version on one selection metric
TAG_ALIAS_PREFIX = "mergeflow.alias."  # registered-model tag: the promotion rule of one alias (JSON)

_BAD_KEY_CHARS = re.compile(r"[^\w.\- /]")  # MLflow's allowed set, minus ':' which Windows stores refuse
_READY = "READY"
_PENDING = "PENDING_REGISTRATION"


@dataclass(frozen=True)
class Registration:
    """What :func:`log_merge` did: the run, the registered version and the alias outcome."""

    name: str  # registered model name
    version: str
    run_id: str
    model_uri: str  # "models:/<name>/<version>", resolvable by mergeflow.checkpoints.resolve
    source: str  # where the version's files are: "models:/<logged model id>" (older versions: "<run uri>/model")
    model_hash: str  # content hash of the weights ("sha256:...")
    champion: bool  # the version holds the alias after the call
    previous_champion: str | None  # the version that held the alias before the call
    reused: bool  # an existing version with the same weights was returned; nothing was logged
    model_id: str | None = None  # the MLflow 3 logged model (None for versions registered as a plain folder)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for task manifests."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EvaluationData:
    """One evaluation data file as an MLflow dataset input of the run: ``name`` (e.g. ``topic/validation``), the
    jsonl file, how many leading rows were scored (None: all) and the run metrics computed on it (linked to it)."""

    name: str
    path: Path
    limit: int | None = None
    metrics: tuple[str, ...] = ()


class Promotion(NamedTuple):
    """Outcome of a promotion: whether the alias moved to the version, and which version held it before.

    A tuple so callers can write ``moved, previous = promote(...)``; the version holds the alias afterwards if
    ``moved`` or if it already held it (``previous`` is the version itself).
    """

    moved: bool
    previous: str | None


@dataclass(frozen=True)
class Champion:
    """The version an alias points at, with its value on the alias's selection metric (None where unrecorded)."""

    version: str
    run_id: str | None
    model_hash: str | None
    metric: str | None
    value: float | None
    higher_is_better: bool | None


# ----------------------------------------------------------------------------------------------------- where


def project_dir() -> Path:
    """``MERGEFLOW_PROJECT_DIR`` if set, else the current directory; read at each call so workers can set it late."""
    raw = os.environ.get(ENV_PROJECT_DIR, "").strip()
    return (Path(raw).expanduser() if raw else Path.cwd()).resolve()


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else a SQLite store ``mlflow.db`` in the project folder.

    Note that :func:`configure` (through ``mlflow.set_tracking_uri``) exports the URI it sets as
    ``MLFLOW_TRACKING_URI``, so after the first call a process keeps its store even if the project folder changes.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or f"sqlite:///{(project_dir() / DB_NAME).as_posix()}"


def configure(uri: str | None = None) -> str:
    """Point MLflow's tracking and registry at ``uri`` (default :func:`tracking_uri`) and return it.

    Both are set together: a registry left on an older URI would register versions of runs it cannot see. The
    folder of a SQLite database is created, since SQLite does not create it.
    """
    uri = uri or tracking_uri()
    db = _sqlite_path(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file where a folder should be, no permission, a read-only disk
            raise TrackingError(f"the MLflow store {uri}: cannot create its folder {db.parent} "
                                f"({e.strerror or type(e).__name__})") from e
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # MLflow exports the URI to the environment only when its global changes; export it always, so that
    # tracking_uri() (and subprocesses) agree with the store just configured even if the variable was unset since.
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


# ------------------------------------------------------------------------------------- models:/ references


MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))/?")


def resolve_model_uri(uri: str) -> tuple[Path, str]:
    """The local folder of a registered model version (``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``) and
    its version: downloaded once into the mergeflow cache (versions are immutable), from the project's store.

    The folder is the one holding the weights: the transformers flavor's ``model/`` of an MLflow Model, or the
    download itself for versions registered as a plain folder. A version tagged with ``mergeflow.model_hash`` (all
    that mergeflow registers) resolves only if the weights hash to it.

    This is the ``models`` resolver of :mod:`mergeflow.resolvers`, so ``mergeflow.checkpoints.resolve`` accepts
    these URIs without the checkpoint reader importing MLflow.
    """
    match = MODEL_URI.fullmatch(uri)
    if match is None:
        raise CheckpointError(f"cannot resolve {uri!r}: expected models:/<name>/<version> or models:/<name>@<alias>")
    configure()  # the project's store (MLFLOW_TRACKING_URI, else the project folder's mlflow.db), as when logging
    name, version, alias = match["name"], match["version"], match["alias"]
    try:
        client = MlflowClient()
        if alias is not None:
            # An alias moves; resolve it now so the download is cached under the immutable version.
            version = str(client.get_model_version_by_alias(name, alias).version)
        if not version or not version.isdigit():
            raise CheckpointError(f"cannot resolve {uri!r}: version must be a number (stages are not supported); "
                                  f"use models:/{name}/<version> or models:/{name}@<alias>")
        expected = client.get_model_version(name, version).tags.get(TAG_MODEL_HASH)
        key = cache_key("mlflow-model", registry=mlflow.get_registry_uri(), name=name, version=version)
        root = Cache().get_or_create(
            "mlflow-model", key,
            lambda dst: mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}",
                                                            dst_path=str(dst)))
    except CheckpointError:
        raise
    except Exception as e:  # MLflow raises its own MlflowException and plain OSErrors for connection problems
        raise CheckpointError(f"cannot resolve {uri!r}: MLflow could not provide it ({type(e).__name__}: {e})") from e
    folder = _find_model_dir(root, uri)
    if expected:
        found = resolve(folder, scan_finite=False).content_hash  # memoised: the caller's resolve() hashes it again
        if found != expected:
            raise CheckpointError(f"cannot resolve {uri!r}: the downloaded weights hash to {found}, not to the "
                                  f"version's {TAG_MODEL_HASH} {expected}")
    return folder, version


def _find_model_dir(root: Path, reference: str) -> Path:
    """The weights' folder in a download: an MLflow Model's transformers ``model_binary`` folder (read from
    ``MLmodel``), else the shallowest folder under ``root`` holding a config.json (a plain folder version)."""
    mlmodel = root / "MLmodel"
    if mlmodel.is_file():
        import yaml

        try:
            flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors") or {}
        except (OSError, yaml.YAMLError) as e:
            raise CheckpointError(f"cannot resolve {reference!r}: unreadable MLmodel ({e})") from e
        binary = (flavors.get("transformers") or {}).get("model_binary")
        if not binary:
            raise CheckpointError(f"cannot resolve {reference!r}: an MLflow Model without a transformers flavor "
                                  f"folder (flavors: {', '.join(flavors) or 'none'})")
        folder = root / str(binary)
        if not folder.resolve().is_relative_to(root.resolve()):
            raise CheckpointError(f"cannot resolve {reference!r}: the MLflow Model's folder {binary!r} leaves it")
        if not (folder / CONFIG).is_file():
            raise CheckpointError(f"cannot resolve {reference!r}: the MLflow Model's {binary}/ holds no {CONFIG}")
        return folder
    for depth in range(4):
        hits = sorted(p.parent for p in root.glob("/".join(["*"] * depth + [CONFIG])) if p.is_file())
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            listed = ", ".join(str(h.relative_to(root)) for h in hits)
            raise CheckpointError(f"cannot resolve {reference!r}: several model folders in the download ({listed})")
    raise CheckpointError(f"cannot resolve {reference!r}: the downloaded artifacts ({root}) hold no {CONFIG}")


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths are relative to the cwd, as in SQLAlchemy)."""
    if not uri.startswith("sqlite:///"):
        return None
    raw = unquote(uri[len("sqlite:///"):].split("?", 1)[0])
    if not raw or raw == ":memory:":
        return None
    return Path(raw).resolve()


def _artifact_location(uri: str) -> str | None:
    """Artifact root for a new experiment: ``mlartifacts/`` beside a SQLite database, else the server's default.

    MLflow's own default for a SQLite store is ``./mlruns`` relative to whatever the cwd is at logging time, which
    scatters artifacts; a store and its artifacts belong together.
    """
    if not uri.startswith("sqlite:"):
        return None
    db = _sqlite_path(uri)
    folder = db.parent if db is not None else project_dir()
    return (folder / ARTIFACTS_DIR).as_uri()


# ---------------------------------------------------------------------------------------------------- params


def flatten_params(data: Mapping[str, Any]) -> dict[str, str]:
    """Flatten nested mappings and lists into MLflow params with dotted keys (``models.0.model``).

    Values are ``str()``-ed and cut to MLflow's param value limit (ending in ``...`` when cut); empty containers
    become ``{}`` / ``[]`` so their presence is recorded. Keys keep MLflow's allowed characters only (others become
    ``_``); two keys that become equal get ``_2``, ``_3``... so no value is lost to a duplicate key.
    """
    flat: dict[str, str] = {}

    def add(key: str, text: str) -> None:
        flat[_unique(_key(key), flat)] = _truncate(text, MAX_PARAM_VAL_LENGTH)

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            items: list[tuple[Any, Any]] = list(value.items())
            empty = "{}"
        elif isinstance(value, (list, tuple)):
            items = list(enumerate(value))
            empty = "[]"
        else:
            add(prefix, str(value))
            return
        if not items and prefix:
            add(prefix, empty)
        for k, v in items:
            walk(f"{prefix}.{k}" if prefix else str(k), v)

    walk("", data)
    return flat


def _key(key: str) -> str:
    """``key`` made acceptable to MLflow as a param, metric or tag name (unchanged if it already is)."""
    key = _BAD_KEY_CHARS.sub("_", key)[:MAX_ENTITY_KEY_LENGTH]
    if path_not_unique(key):  # MLflow refuses keys that are not normalised paths ("/a", "a//b", "..", "")
        key = key.replace("/", "_")
        if path_not_unique(key):
            key = "_" + key
    return key[:MAX_ENTITY_KEY_LENGTH]


def _unique(key: str, taken: Mapping[str, Any]) -> str:
    if key not in taken:
        return key
    n = 2
    while (candidate := f"{key[:MAX_ENTITY_KEY_LENGTH - len(str(n)) - 1]}_{n}") in taken:
        n += 1
    return candidate


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


# -------------------------------------------------------------------------------------------------- logging


def log_merge(
    model_dir: str | Path,
    *,
    recipe: Mapping[str, Any],
    recipe_hash: str,
    input_hashes: Mapping[str, str],
    experiment: str,
    registered_name: str,
    metrics: Mapping[str, float] | None = None,
    selection_metric: tuple[str, float] | None = None,
    higher_is_better: bool = True,
    alias: str = "champion",
    tags: Mapping[str, str] | None = None,
    artifacts: Mapping[str, str | Path] | None = None,
    run_name: str | None = None,
    flow_run_id: str | None = None,
    promote: bool = True,
    description: str | None = None,
    datasets: Sequence[EvaluationData] = (),
) -> Registration:
    """Log a merged model folder as one MLflow run, register it as a version, and apply the promotion rule.

    ``recipe`` is the canonical recipe (a plain mapping), logged as flattened params. ``metrics`` are whatever
    numbers the caller has (per-task and average accuracy, seconds, peak bytes). ``artifacts`` maps an artifact
    sub-folder name to a file or folder to log there (model card, coefficients, heatmaps, tables); ``model`` is
    reserved for the model. ``selection_metric`` is ``(metric name, value)``: the number the alias is awarded on
    (``higher_is_better`` says which way); without it no alias is touched. With ``promote=False`` the value is
    recorded on the version but the alias is left alone (a sweep promotes only its best merge, with
    :func:`promote`). ``description`` becomes the version's description; ``datasets`` are logged as the run's
    evaluation inputs, and the metrics each names are linked to it.

    Everything that can be checked is checked before anything is written: a refused call leaves no experiment, run
    or version behind, and a failure while logging ends the run FAILED with no version pointing at it. If the
    registry already holds a version with the same weights, that version is returned (``reused=True``) and nothing
    is logged.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub lookups for hub-like names cost ~50 s offline (STACK.md)
    model_dir = Path(model_dir)
    if selection_metric is not None:
        _check_selection(*selection_metric)
    model_hash = _check_model(model_dir)
    extra = _check_artifacts(artifacts or {})
    numbers = _check_metrics(metrics or {})
    data = _check_datasets(datasets, numbers)
    uri = configure()
    with _mlflow_errors(f"registering {model_dir} as {registered_name!r}"):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        existing = _find_version(client, registered_name, model_hash)
        if selection_metric is not None and promote:
            _check_promotable(client, registered_name, alias, selection_metric[0], higher_is_better)
        if existing is None:
            version = _log_and_register(
                client, uri, model_dir, model_hash=model_hash, recipe=recipe, recipe_hash=recipe_hash,
                input_hashes=input_hashes, experiment=experiment, registered_name=registered_name,
                metrics=numbers, tags=tags or {}, artifacts=extra, run_name=run_name, flow_run_id=flow_run_id,
                description=description, datasets=data)
        else:
            version = existing
        number = str(version.version)
        if selection_metric is not None and promote:
            moved, previous = _promote(client, registered_name, number, *selection_metric, alias=alias,
                                       higher_is_better=higher_is_better)
        else:
            if selection_metric is not None:
                _record_value(client, registered_name, number, *selection_metric)
            moved, previous = False, _alias_version(client, registered_name, alias)
    return Registration(
        name=registered_name, version=number, run_id=str(version.run_id),
        model_uri=f"models:/{registered_name}/{number}", source=str(version.source), model_hash=model_hash,
        champion=moved or previous == number, previous_champion=previous, reused=existing is not None,
        model_id=_model_id(version))


def _log_and_register(client: MlflowClient, uri: str, model_dir: Path, *, model_hash: str,
                      recipe: Mapping[str, Any], recipe_hash: str, input_hashes: Mapping[str, str], experiment: str,
                      registered_name: str, metrics: Mapping[str, float], tags: Mapping[str, str],
                      artifacts: Mapping[str, Path], run_name: str | None, flow_run_id: str | None,
                      description: str | None, datasets: Sequence[EvaluationData]) -> ModelVersion:
    """One run with everything in it, the logged model, then the version; the run ends FAILED if any step fails."""
    # The caller's tags first: provenance tags written after them cannot be overridden by accident.
    run_tags = {_key(key): str(value) for key, value in tags.items()}
    run_tags |= {
        TAG_RECIPE_HASH: recipe_hash,
        TAG_MODEL_HASH: model_hash,
        TAG_VERSION: __version__,
        TAG_INPUT_HASHES: json.dumps(dict(sorted(input_hashes.items())), separators=(",", ":")),
    }
    for reference, digest in sorted(input_hashes.items()):
        run_tags[_unique(_key(TAG_INPUT_PREFIX + reference), run_tags)] = digest
    if flow_run_id:
        run_tags[TAG_FLOW_RUN_ID] = flow_run_id
    run_tags.setdefault(MLFLOW_RUN_NOTE, RUN_NOTE)
    params = flatten_params(recipe)
    experiment_id = _experiment_id(client, experiment, uri)
    run = client.create_run(experiment_id, run_name=run_name or f"{registered_name}-{recipe_hash.split(':')[-1][:12]}")
    run_id = run.info.run_id
    try:
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                         tags=[RunTag(k, _truncate(v, MAX_TAG_VAL_LENGTH)) for k, v in run_tags.items()])
        linked = _log_datasets(client, run_id, datasets)
        for name, path in artifacts.items():
            if path.is_dir():
                client.log_artifacts(run_id, str(path), artifact_path=name)
            else:
                client.log_artifact(run_id, str(path), artifact_path=name)
        # The model goes last and the version after it: the registry must never point at a half-logged model.
        model_id = _log_model(client, experiment_id, run_id, model_dir, model_hash=model_hash,
                              recipe_hash=recipe_hash, params=params)
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[
            Metric(k, v, now, 0, model_id=model_id, run_id=run_id,
                   dataset_name=linked[k][0] if k in linked else None,
                   dataset_digest=linked[k][1] if k in linked else None)
            for k, v in metrics.items()])
        _ensure_registered_model(client, registered_name)
        version = client.create_model_version(
            registered_name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id,
            description=description or None,
            tags={TAG_MODEL_HASH: model_hash, TAG_RECIPE_HASH: recipe_hash, TAG_VERSION: __version__})
        version = _await_ready(client, version)
        # The logged model's page lists the versions it was registered as (what mlflow.register_model records).
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
            [{"name": registered_name, "version": str(version.version)}])})
    except BaseException:
        with contextlib.suppress(Exception):  # keep the original error; the run state is secondary
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    return version


def _log_model(client: MlflowClient, experiment_id: str, run_id: str, model_dir: Path, *, model_hash: str,
               recipe_hash: str, params: Mapping[str, str]) -> str:
    """Log ``model_dir`` as an MLflow Model of the transformers flavor, as the run's output; returns its model id.

    The logged model is created here, in the run's experiment: left to MLflow it would go to the process's active
    experiment (``mlflow.set_experiment``), which need not be the run's. MLflow copies the folder into a temporary
    MLflow Model (``model/`` beside ``MLmodel``), uploads it and marks the logged model READY (FAILED on error).
    """
    import mlflow.transformers  # transformers (~3 s to import): only when a model is logged

    logged = client.create_logged_model(
        experiment_id, name=MODEL_ARTIFACT, source_run_id=run_id, params=dict(params), model_type=MODEL_TASK,
        tags={TAG_MODEL_HASH: model_hash, TAG_RECIPE_HASH: recipe_hash, TAG_VERSION: __version__})
    with _pipeline_classes_for_mlflow():
        mlflow.transformers.log_model(
            str(model_dir), name=MODEL_ARTIFACT, model_id=logged.model_id, run_id=run_id, task=MODEL_TASK,
            signature=SIGNATURE, pip_requirements=model_requirements(), save_pretrained=True,
            metadata={TAG_MODEL_HASH: model_hash, TAG_RECIPE_HASH: recipe_hash, TAG_VERSION: __version__})
    return logged.model_id


_CHECK_TASK_LOCK = threading.Lock()


@contextlib.contextmanager
def _pipeline_classes_for_mlflow() -> Iterator[None]:
    """While logging a checkpoint folder, ``transformers.pipelines.check_task`` lists each pipeline's class, not its
    dotted path.

    MLflow 3.17.2 logs a folder (no model load, the files copied as they are) by reading
    ``check_task(task)[1]["impl"].__name__``; transformers 5 (5.23 here, above MLflow's tested 5.17) lists ``impl``
    as a dotted-path string, so that fails with ``'str' object has no attribute '__name__'``. The other way in,
    a loaded pipeline, would load the whole model into memory and write re-serialised weights (another content
    hash). transformers resolves ``impl`` itself and passes a class through unchanged, so other callers see the same
    behaviour; the lock keeps concurrent registrations from restoring each other's wrapper early.
    """
    import transformers.pipelines as pipelines

    original = pipelines.check_task
    if not isinstance(original(MODEL_TASK)[1].get("impl"), str):  # a transformers that already lists classes
        yield
        return

    def check_task(task: str) -> tuple[str, dict[str, Any], Any]:
        name, targeted, options = original(task)
        impl = targeted.get("impl")
        if isinstance(impl, str):
            module, _, cls = impl.rpartition(".")
            targeted = {**targeted, "impl": getattr(importlib.import_module(module), cls)}  # a copy: never the table
        return name, targeted, options

    with _CHECK_TASK_LOCK:
        pipelines.check_task = check_task
        try:
            yield
        finally:
            pipelines.check_task = original


def model_requirements() -> list[str]:
    """The logged model's pip requirements: the installed versions, without local labels (``2.13.0+cpu``), which
    an index cannot serve."""
    out = []
    for package in MODEL_REQUIREMENTS:
        try:
            out.append(f"{package}=={package_metadata.version(package).split('+', 1)[0]}")
        except package_metadata.PackageNotFoundError:
            out.append(package)
    return out


def _quiet_dataset_warnings() -> None:
    """Drop two warnings MLflow gives for every dataset logged from a local file: a demo registers hundreds, and
    neither says anything about our data (the source is registered twice in MLflow; the zoo's integer label column
    has no missing values). Installed once per process (filters are process-wide; adding them is idempotent)."""
    for message in ("The specified dataset source can be interpreted in multiple ways",
                    "Hint: Inferred schema contains integer column"):
        warnings.filterwarnings("ignore", message=message, category=UserWarning, module="mlflow")


def _log_datasets(client: MlflowClient, run_id: str, datasets: Sequence[EvaluationData]) -> dict[str, tuple[str, str]]:
    """Log each evaluation file as a dataset input of the run (context ``evaluation``: the rows scored, with their
    schema and digest); returns metric name -> (dataset name, digest) for the metrics computed on one dataset."""
    if not datasets:
        return {}
    import mlflow.data  # pandas: only when there are datasets
    import pandas as pd

    _quiet_dataset_warnings()

    inputs: list[DatasetInput] = []
    linked: dict[str, tuple[str, str]] = {}
    for item in datasets:
        frame = pd.read_json(item.path, lines=True)
        if item.limit is not None:
            frame = frame.head(item.limit)
        dataset = mlflow.data.from_pandas(frame, source=item.path.as_uri(), name=item.name)
        entity = dataset._to_mlflow_entity()  # what mlflow.log_input sends; the client API takes the entity
        inputs.append(DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, EVALUATION_CONTEXT)]))
        for metric in item.metrics:
            linked[metric] = (entity.name, entity.digest)
    client.log_inputs(run_id, datasets=inputs)
    return linked


def _model_id(version: ModelVersion) -> str | None:
    """The logged model a version was registered from (the registry's field, else its ``models:/<id>`` source; some
    stores do not return the field); None for a plain-folder version."""
    if getattr(version, "model_id", None):
        return str(version.model_id)
    match = re.fullmatch(r"models:/(m-[0-9a-f]+)", str(version.source or ""))
    return match[1] if match else None


def _check_model(model_dir: Path) -> str:
    """The folder's content hash, after checking it is a complete model (config, readable weights)."""
    if not model_dir.is_dir():
        raise TrackingError(f"cannot register {model_dir}: no such folder")
    if not (model_dir / CONFIG).is_file():
        raise TrackingError(f"cannot register {model_dir}: incomplete model folder (no {CONFIG})")
    try:
        snapshot = resolve(model_dir, scan_finite=False)
        # resolve() checks the weight files transformers would load; stray shards would be logged too, so check all.
        inspect_weights(model_dir, sorted(p.relative_to(model_dir).as_posix()
                                          for p in model_dir.rglob("*.safetensors")))
    except CheckpointError as e:
        raise TrackingError(f"cannot register {model_dir}: incomplete or corrupt model folder: {e}") from e
    if snapshot.format != "safetensors":
        raise TrackingError(f"cannot register {model_dir}: weights are {snapshot.format}, expected safetensors")
    # What the transformers flavor reads when logging a folder; refused here rather than half-way through a run.
    try:
        architectures = json.loads((model_dir / CONFIG).read_text(encoding="utf-8")).get("architectures")
    except (OSError, ValueError, AttributeError):
        architectures = None
    if not architectures or not isinstance(architectures, list):
        raise TrackingError(f"cannot register {model_dir}: {CONFIG} names no 'architectures' (the MLflow "
                            f"transformers flavor needs the model class)")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise TrackingError(f"cannot register {model_dir}: no tokenizer ({' or '.join(TOKENIZER_FILES)}); the MLflow "
                            f"transformers flavor needs one (merge with a tokenizer_source that has it)")
    return snapshot.content_hash


def _check_artifacts(artifacts: Mapping[str, str | Path]) -> dict[str, Path]:
    checked: dict[str, Path] = {}
    for name, path in artifacts.items():
        parts = PurePosixPath(name).parts
        if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
            raise TrackingError(f"artifact folder name {name!r} must be a relative path inside the run")
        if parts[0] == MODEL_ARTIFACT:
            raise TrackingError(f"artifact folder name {name!r}: {MODEL_ARTIFACT!r} is reserved for the model")
        path = Path(path)
        if not path.exists():
            raise TrackingError(f"artifact {name!r}: {path} does not exist")
        checked[PurePosixPath(name).as_posix()] = path
    return checked


def _check_datasets(datasets: Sequence[EvaluationData], metrics: Mapping[str, float]) -> list[EvaluationData]:
    """Each dataset an existing jsonl file with a unique name, naming only metrics that are logged."""
    checked: list[EvaluationData] = []
    names: set[str] = set()
    for item in datasets:
        path = Path(item.path)
        if not path.is_file():
            raise TrackingError(f"evaluation dataset {item.name!r}: {path} is not a file")
        if not item.name or item.name in names:
            raise TrackingError(f"evaluation dataset name {item.name!r} is empty or given twice")
        names.add(item.name)
        metric_keys = tuple(_key(m) for m in item.metrics)
        unknown = [m for m in metric_keys if m not in metrics]
        if unknown:
            raise TrackingError(f"evaluation dataset {item.name!r} names metrics that are not logged: "
                                f"{', '.join(unknown)}")
        checked.append(dataclasses.replace(item, path=path, metrics=metric_keys))
    return checked


def _check_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Metrics as floats under MLflow-safe names (NaN and Inf are kept: MLflow stores them)."""
    numbers: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            numbers[_unique(_key(key), numbers)] = float(value)
        except (TypeError, ValueError):
            raise TrackingError(f"metric {key!r}: {value!r} is not a number") from None
    return numbers


def _check_selection(metric: str, value: float) -> None:
    if not metric:
        raise TrackingError("the selection metric needs a name")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TrackingError(f"selection metric {metric!r}: {value!r} is not a number") from None
    if not math.isfinite(number):
        # NaN compares false with everything: a NaN champion could never be replaced.
        raise TrackingError(f"selection metric {metric!r}: {value!r} is not finite")


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(uri),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as e:  # created meanwhile by a concurrent run
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
            assert experiment is not None
    if experiment.lifecycle_stage != "active":
        raise TrackingError(f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore) or "
                            f"use another name")
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before experiments were tagged, or by someone else
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name, tags={TAG_VERSION: __version__})
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _await_ready(client: MlflowClient, version: ModelVersion, timeout: float = 300.0) -> ModelVersion:
    """Wait until the version is READY (remote registries copy files asynchronously); fail on anything else."""
    deadline = time.monotonic() + timeout
    while version.status == _PENDING and time.monotonic() < deadline:
        time.sleep(0.5)
        version = client.get_model_version(version.name, version.version)
    if version.status != _READY:
        raise TrackingError(f"registered model {version.name!r} version {version.version} is {version.status}, "
                            f"not READY ({version.status_message or 'no message'})")
    return version


def ensure_store(uri: str | None = None) -> str:
    """Configure the store and touch it once, so a new SQLite database is created and migrated by one process
    (parallel first touches race in the schema migration). Returns the URI."""
    uri = configure(uri)
    with _mlflow_errors(f"opening the MLflow store {uri}"):
        MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments(max_results=1)
    return uri


def registered_version(name: str, model_hash: str) -> str | None:
    """The version of ``name`` that holds exactly these weights, if the registry has one (``None`` otherwise, also
    when the store is new). Orchestrators key a registration by it, so a wiped store is registered into again."""
    uri = configure()
    with _mlflow_errors(f"looking up {name!r} in the registry"):
        found = _find_version(MlflowClient(tracking_uri=uri, registry_uri=uri), name, model_hash)
    return None if found is None else str(found.version)


def _find_version(client: MlflowClient, name: str, model_hash: str) -> ModelVersion | None:
    """The oldest READY version of ``name`` holding exactly these weights, if any."""
    # Filtering on the hash only (a safe string) avoids quoting the model name into the filter.
    found: list[ModelVersion] = []
    token: str | None = None
    while True:
        page = client.search_model_versions(f"tags.`{TAG_MODEL_HASH}` = '{model_hash}'", page_token=token)
        found += [v for v in page if v.name == name and v.status == _READY]
        token = page.token
        if not token:
            break
    return min(found, key=lambda v: int(v.version)) if found else None


# ------------------------------------------------------------------------------------------------- promotion


def promote(name: str, version: str | int, metric: str, value: float, *, alias: str = "champion",
            higher_is_better: bool = True) -> Promotion:
    """Record ``value`` as the version's ``metric`` and move ``alias`` to it if it beats the current holder.

    No holder: the version takes the alias. A tie does not move it (the incumbent stays, so re-evaluations with
    the same score do not churn the alias). The holder's value is read from its model-version tag. Refused (with
    nothing written) if the alias was awarded on another metric or direction, or the holder has no value for it.
    """
    _check_selection(metric, value)
    uri = configure()
    with _mlflow_errors(f"promoting {name!r} version {version} to {alias!r}"):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        return _promote(client, name, str(version), metric, value, alias=alias, higher_is_better=higher_is_better)


def _promote(client: MlflowClient, name: str, version: str, metric: str, value: float, *, alias: str,
             higher_is_better: bool) -> Promotion:
    holder, holder_value, rule = _check_promotable(client, name, alias, metric, higher_is_better)
    value = _record_value(client, name, version, metric, value)
    if rule is None:
        client.set_registered_model_tag(name, _alias_tag(alias), _rule_text(metric, higher_is_better))
    if holder == version:
        return Promotion(moved=False, previous=holder)
    if holder is not None:
        assert holder_value is not None  # _check_promotable refuses a holder without a value
        better = value > holder_value if higher_is_better else value < holder_value
        if not better:
            return Promotion(moved=False, previous=holder)
    client.set_registered_model_alias(name, alias, version)
    return Promotion(moved=True, previous=holder)


def _record_value(client: MlflowClient, name: str, version: str, metric: str, value: float) -> float:
    """Store the version's value on ``metric`` as a model-version tag (repr: exact round trip)."""
    value = float(value)
    client.set_model_version_tag(name, version, _selection_tag(metric), repr(value))
    return value


def _check_promotable(client: MlflowClient, name: str, alias: str, metric: str, higher_is_better: bool
                      ) -> tuple[str | None, float | None, tuple[str, bool] | None]:
    """(holder version, its value, the alias's rule), or TrackingError if ``metric`` cannot be compared."""
    rule = _alias_rule(client, name, alias)
    if rule is not None and rule != (metric, higher_is_better):
        raise TrackingError(
            f"alias {alias!r} of {name!r} is awarded on {_describe(*rule)}, not {_describe(metric, higher_is_better)}"
            f"; use another alias, or delete the registered-model tag {_alias_tag(alias)!r} to change the rule")
    holder = _alias_version(client, name, alias)
    if holder is None:
        return None, None, rule
    holder_value = _version_value(client.get_model_version(name, holder), metric)
    if holder_value is None:
        raise TrackingError(f"{name!r} version {holder} holds {alias!r} but has no value for {metric!r} (model-version "
                            f"tag {_selection_tag(metric)!r}); tag it or move the alias by hand")
    return holder, holder_value, rule


def champion(name: str, alias: str = "champion") -> Champion | None:
    """The version holding ``alias`` with its selection value, or None if the model or the alias does not exist."""
    uri = configure()
    with _mlflow_errors(f"reading {alias!r} of {name!r}"):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        holder = _alias_version(client, name, alias)
        if holder is None:
            return None
        version = client.get_model_version(name, holder)
        rule = _alias_rule(client, name, alias)
        return Champion(version=holder, run_id=version.run_id, model_hash=version.tags.get(TAG_MODEL_HASH),
                        metric=rule[0] if rule else None,
                        value=_version_value(version, rule[0]) if rule else None,
                        higher_is_better=rule[1] if rule else None)


def _registered_model(client: MlflowClient, name: str) -> RegisteredModel | None:
    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    # Read from the model's alias table: get_model_version_by_alias signals a missing alias with a generic
    # INVALID_PARAMETER_VALUE, which cannot be told apart from a real error.
    model = _registered_model(client, name)
    version = model.aliases.get(alias) if model is not None else None
    return str(version) if version is not None else None


def _alias_rule(client: MlflowClient, name: str, alias: str) -> tuple[str, bool] | None:
    model = _registered_model(client, name)
    text = model.tags.get(_alias_tag(alias)) if model is not None else None
    if not text:
        return None
    try:
        rule = json.loads(text)
        return str(rule["metric"]), bool(rule["higher_is_better"])
    except (ValueError, KeyError, TypeError):
        raise TrackingError(f"registered-model tag {_alias_tag(alias)!r} of {name!r} is not a mergeflow rule: "
                            f"{text!r}") from None


def _version_value(version: ModelVersion, metric: str) -> float | None:
    text = version.tags.get(_selection_tag(metric))
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _selection_tag(metric: str) -> str:
    return _key(TAG_SELECTION_PREFIX + metric)


def _alias_tag(alias: str) -> str:
    return _key(TAG_ALIAS_PREFIX + alias)


def _rule_text(metric: str, higher_is_better: bool) -> str:
    return json.dumps({"metric": metric, "higher_is_better": higher_is_better})


def _describe(metric: str, higher_is_better: bool) -> str:
    return f"{metric!r} ({'higher' if higher_is_better else 'lower'} is better)"


@contextlib.contextmanager
def _mlflow_errors(what: str) -> Iterator[None]:
    """MLflow's own errors (refused request, store unreachable) become TrackingError naming what we were doing."""
    try:
        yield
    except TrackingError:
        raise
    except (MlflowException, OSError) as e:
        raise TrackingError(f"{what}: MLflow failed ({type(e).__name__}: {e})") from e
