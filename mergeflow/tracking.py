"""MLflow layer: every merged model is one run and one registered model version; an alias marks the best one.

A run holds the flattened recipe as params, provenance as tags (recipe hash, input content hashes, library version,
the caller's flow-run id), the caller's numbers as metrics, its files as artifacts, and the model folder under
``model/``. The registered version points at that folder (``source = <run artifact uri>/model``), so the weights are
stored once however many aliases point at them.

Safety rules:

- The registry never points at a partial model: the folder is checked first (config.json, every safetensors header
  consistent with its file size) and the version is created only after the whole folder is logged.
- Registering is idempotent: a version whose ``mergeflow.model_hash`` tag equals the folder's content hash is reused,
  not logged again, so re-running a pipeline after a crash is safe (the promotion rule is still applied).
- An alias moves only to a strictly better version. The value of a version on a selection metric is stored as a
  model-version tag (``mergeflow.selection.<metric>``), so comparing never depends on run metrics; the rule of an
  alias (metric, direction) is stored on the registered model (``mergeflow.alias.<alias>``) and a later promotion
  with another rule is refused rather than silently comparing unlike numbers.

No Prefect here: flows pass their flow-run id in as a plain string.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple
from urllib.parse import unquote

try:
    import mlflow
    import mlflow.artifacts
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunStatus, RunTag
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel
    from mlflow.exceptions import MlflowException
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
MODEL_ARTIFACT = "model"  # the model folder's place in the run's artifacts; registered versions point here

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
    source: str  # where the version's files are: "<run artifact uri>/model"
    model_hash: str  # content hash of the weights ("sha256:...")
    champion: bool  # the version holds the alias after the call
    previous_champion: str | None  # the version that held the alias before the call
    reused: bool  # an existing version with the same weights was returned; nothing was logged

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for task manifests."""
        return dataclasses.asdict(self)


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
        db.parent.mkdir(parents=True, exist_ok=True)
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

    This is the ``models`` resolver of :mod:`mergeflow.resolvers`, so ``mergeflow.checkpoints.resolve`` accepts
    these URIs without the checkpoint reader importing MLflow.
    """
    match = MODEL_URI.fullmatch(uri)
    if match is None:
        raise CheckpointError(f"cannot resolve {uri!r}: expected models:/<name>/<version> or models:/<name>@<alias>")
    configure()  # the project's store (MLFLOW_TRACKING_URI, else the project folder's mlflow.db), as when logging
    name, version, alias = match["name"], match["version"], match["alias"]
    try:
        if alias is not None:
            # An alias moves; resolve it now so the download is cached under the immutable version.
            version = str(MlflowClient().get_model_version_by_alias(name, alias).version)
        if not version or not version.isdigit():
            raise CheckpointError(f"cannot resolve {uri!r}: version must be a number (stages are not supported); "
                                  f"use models:/{name}/<version> or models:/{name}@<alias>")
        key = cache_key("mlflow-model", registry=mlflow.get_registry_uri(), name=name, version=version)
        root = Cache().get_or_create(
            "mlflow-model", key,
            lambda dst: mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}",
                                                            dst_path=str(dst)))
    except CheckpointError:
        raise
    except Exception as e:  # MLflow raises its own MlflowException and plain OSErrors for connection problems
        raise CheckpointError(f"cannot resolve {uri!r}: MLflow could not provide it ({type(e).__name__}: {e})") from e
    return _find_model_dir(root, uri), version


def _find_model_dir(root: Path, reference: str) -> Path:
    """The shallowest folder under ``root`` holding a config.json (MLflow flavours nest the weights, e.g. model/)."""
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
) -> Registration:
    """Log a merged model folder as one MLflow run, register it as a version, and apply the promotion rule.

    ``recipe`` is the canonical recipe (a plain mapping), logged as flattened params. ``metrics`` are whatever
    numbers the caller has (per-task and average accuracy, seconds, peak bytes). ``artifacts`` maps an artifact
    sub-folder name to a file or folder to log there (model card, coefficients, heatmaps, tables); ``model`` is
    reserved for the model. ``selection_metric`` is ``(metric name, value)``: the number the alias is awarded on
    (``higher_is_better`` says which way); without it no alias is touched. With ``promote=False`` the value is
    recorded on the version but the alias is left alone (a sweep promotes only its best merge, with
    :func:`promote`).

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
                metrics=numbers, tags=tags or {}, artifacts=extra, run_name=run_name, flow_run_id=flow_run_id)
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
        champion=moved or previous == number, previous_champion=previous, reused=existing is not None)


def _log_and_register(client: MlflowClient, uri: str, model_dir: Path, *, model_hash: str,
                      recipe: Mapping[str, Any], recipe_hash: str, input_hashes: Mapping[str, str], experiment: str,
                      registered_name: str, metrics: Mapping[str, float], tags: Mapping[str, str],
                      artifacts: Mapping[str, Path], run_name: str | None, flow_run_id: str | None) -> ModelVersion:
    """One run with everything in it, then the version; the run ends FAILED if any step fails."""
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
    experiment_id = _experiment_id(client, experiment, uri)
    run = client.create_run(experiment_id, run_name=run_name or f"{registered_name}-{recipe_hash.split(':')[-1][:12]}")
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            params=[Param(k, v) for k, v in flatten_params(recipe).items()],
            metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
            tags=[RunTag(k, _truncate(v, MAX_TAG_VAL_LENGTH)) for k, v in run_tags.items()])
        for name, path in artifacts.items():
            if path.is_dir():
                client.log_artifacts(run_id, str(path), artifact_path=name)
            else:
                client.log_artifact(run_id, str(path), artifact_path=name)
        # The model goes last and the version after it: the registry must never point at a half-logged folder.
        client.log_artifacts(run_id, str(model_dir), artifact_path=MODEL_ARTIFACT)
        _ensure_registered_model(client, registered_name)
        version = client.create_model_version(
            registered_name, source=f"{run.info.artifact_uri}/{MODEL_ARTIFACT}", run_id=run_id,
            tags={TAG_MODEL_HASH: model_hash, TAG_RECIPE_HASH: recipe_hash, TAG_VERSION: __version__})
        version = _await_ready(client, version)
    except BaseException:
        with contextlib.suppress(Exception):  # keep the original error; the run state is secondary
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    return version


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
            return client.create_experiment(name, artifact_location=_artifact_location(uri))
        except MlflowException as e:  # created meanwhile by a concurrent run
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
            assert experiment is not None
    if experiment.lifecycle_stage != "active":
        raise TrackingError(f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore) or "
                            f"use another name")
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
