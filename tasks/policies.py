"""Cache policies and result storage of the pipeline's Prefect tasks.

A task's cache key is built from what determines its output: its node's stage and own parameters (not the node's
upstream structure: its inputs enter as their manifests), the content hashes and keys inside the manifests it
receives (not their volatile parts: timings, "reused" flags, devices), the task's source (Prefect's
``TASK_SOURCE``) and mergeflow's code version. Checkpoint references are keyed by what they point at now:
a local folder by its weight files' names, sizes and modification times, so editing a checkpoint re-resolves it.
Results persist under ``MERGEFLOW_PREFECT_RESULTS`` (default ``MERGEFLOW_HOME/prefect-results``); point it at a
shared volume (or set Prefect's own result storage) when workers run on several machines.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import TASK_SOURCE, CachePolicy

from mergeflow.cache import cache_key
from mergeflow.graph import Node
from mergeflow.manifests import Manifest
from mergeflow.paths import mergeflow_home

ENV_RESULTS = "MERGEFLOW_PREFECT_RESULTS"
# Task parameters that say where a result goes, not what it is (the registry's own policies key the store).
NOT_CONTENT = frozenset({"tracking_uri"})


def results_path() -> Path:
    """Where task results are persisted (read when the tasks are defined, i.e. at import in each worker)."""
    raw = os.environ.get(ENV_RESULTS, "").strip()
    path = Path(raw).expanduser() if raw else mergeflow_home() / "prefect-results"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def identity(value: Any) -> Any:
    """What ``value`` contributes to a key: a node its stage and own parameters, a manifest its non-volatile fields
    (:meth:`mergeflow.manifests.Manifest.identity`), containers item by item."""
    if isinstance(value, Node):
        return {"stage": value.stage, "parameters": identity(value.parameters())}
    if isinstance(value, Manifest):
        return value.identity()
    if isinstance(value, Mapping):
        return {str(k): identity(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [identity(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass
class ContentInputs(CachePolicy):
    """Key = the task's inputs without their volatile parts, plus mergeflow's code version."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        content = {k: v for k, v in inputs.items() if k not in NOT_CONTENT}
        return cache_key("prefect-task", task=task_ctx.task.name if task_ctx else None, inputs=identity(content))


def _folder_signature(folder: Path) -> list[list[Any]]:
    out = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file():
            st = entry.stat()
            out.append([entry.name, st.st_size, st.st_mtime_ns])
    return out


@dataclass
class CheckpointReference(CachePolicy):
    """Key for ``resolve``: the reference, plus the files it names now when it is a local folder, plus
    MERGEFLOW_HOME (where zoo models and registry downloads live). Hub ids are keyed by name and revision:
    the Hugging Face cache already serves a pinned revision without a download."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        node = inputs["node"]
        local = Path(node.reference).expanduser()
        if not local.is_absolute() and node.recipe_dir:
            local = Path(node.recipe_dir) / local
        signature = _folder_signature(local) if local.is_dir() else None
        return cache_key("prefect-resolve", node=identity(node), files=signature, home=str(mergeflow_home()))


@dataclass
class RegistryState(CachePolicy):
    """Extra key for ``register``: the store it writes to and the version that holds these weights under the
    model's name there. When the registry has no such version (a first run, a new or wiped store, a version deleted
    by hand) the key is new every time, so the merge is registered; once it is registered, the first repeat checks
    it (idempotent: the version is reused) and later repeats are served from the cache."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        from mergeflow import tracking  # MLflow (~1-3 s to import): only when a run registers, not in every worker

        uri = tracking.configure(inputs.get("tracking_uri"))
        node = inputs["node"]
        name = node.registered_name
        version = tracking.registered_version(name, node.bind(inputs["inputs"])["merged"].content_hash)
        if version is None:  # not in this registry (any more): never served from the cache
            return cache_key("prefect-registry-miss", nonce=uuid.uuid4().hex)
        return cache_key("prefect-registry", uri=uri, name=name, version=version)


@dataclass
class AliasState(CachePolicy):
    """Extra key for ``promote``: who holds each alias the candidates compete for, now. A repeat of the same run is
    served from the cache while the alias is where that run left it; once the alias moved (another run, a hand, a
    new store) the candidates are compared with its holder again."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        from mergeflow import tracking  # MLflow (~1-3 s to import): only when a run registers, not in every worker

        uri = tracking.configure(inputs.get("tracking_uri"))
        holders = {}
        for name, alias in sorted({(c.name, c.alias) for c in inputs["inputs"]}):
            held = tracking.champion(name, alias)
            holders[f"{name}@{alias}"] = held.version if held is not None else None
        return cache_key("prefect-alias", uri=uri, holders=holders)


CONTENT = ContentInputs() + TASK_SOURCE
PROMOTE = ContentInputs() + AliasState() + TASK_SOURCE
REGISTER = ContentInputs() + RegistryState() + TASK_SOURCE
RESOLVE = CheckpointReference() + TASK_SOURCE
