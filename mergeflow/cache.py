"""Content-addressed store for intermediates (coefficients, task-vector manifests, downloaded registry models).

An entry is a folder ``<root>/<kind>/<key>`` whose key is a hash of everything that determines its content: the
inputs' content hashes, the parameters and the code version (:data:`CODE_VERSION`). An entry is either complete (it
holds the :data:`COMPLETE_MARKER` file) or absent: it is built in a temporary sibling folder and renamed into place in
one step, so a crash or a concurrent reader never sees half an entry, and two concurrent writers of the same key
both succeed (the first rename wins; the second writer's copy is discarded, as it is the same content by
construction).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import Any

from mergeflow import __version__
from mergeflow.errors import StorageError, storage_error
from mergeflow.paths import mergeflow_home

# Bump when the layout or meaning of any cached artifact changes, so old entries are never reused by new code.
CACHE_FORMAT = 1
CODE_VERSION = f"{__version__}+format{CACHE_FORMAT}"

COMPLETE_MARKER = ".complete.json"
_TMP_PREFIX = ".tmp-"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _canonical(value: Any) -> Any:
    """Turn ``value`` into plain JSON data, rejecting anything without a stable text form.

    Unknown objects are refused rather than ``repr``-ed: a repr with a memory address would give a key that never
    hits again, and a lossy one would give two different inputs the same key.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        # json writes floats with repr(), which round-trips exactly; NaN/Inf are not JSON, so spell them out.
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return _canonical(value.value)
    if isinstance(value, bytes):
        return {"__bytes__": value.hex()}
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"cache_key: dict keys must be str, got {type(k).__name__} {k!r}")
            out[k] = _canonical(v)
        return out
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        items = [_canonical(v) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _canonical(dataclasses.asdict(value))
    model_dump = getattr(value, "model_dump", None)  # pydantic v2 models (the Recipe), without importing pydantic
    if callable(model_dump):
        return _canonical(model_dump(mode="json"))
    # torch.dtype and similar small value types have a stable str() but no JSON form.
    if type(value).__module__ == "torch" and type(value).__name__ == "dtype":
        return str(value)
    raise TypeError(f"cache_key: cannot hash a value of type {type(value).__name__}: {value!r}")


def cache_key(kind: str, **inputs: Any) -> str:
    """The hex sha256 of the canonical JSON of ``{"kind", "code", "inputs"}``.

    Keys sort, so keyword order does not matter; ``1`` and ``1.0`` and ``True`` stay distinct; paths hash as their
    text. Pass content hashes, not paths, for anything whose bytes may change in place.
    """
    payload = {"kind": kind, "code": CODE_VERSION, "inputs": _canonical(inputs)}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_name(what: str, name: str) -> str:
    # kind and key become folder names: refuse separators and dot-names so nothing escapes the cache root.
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(f"invalid cache {what} {name!r}: use letters, digits, '_', '-', '.'")
    return name


class Cache:
    """Folders keyed by (kind, key) under ``root`` (default ``MERGEFLOW_HOME/cache``), written atomically."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else mergeflow_home() / "cache"

    def path(self, kind: str, key: str) -> Path:
        """Where the entry lives once complete (it may not exist yet)."""
        return self.root / _check_name("kind", kind) / _check_name("key", key)

    def get(self, kind: str, key: str) -> Path | None:
        """The entry's folder if it is complete, else ``None``."""
        path = self.path(kind, key)
        return path if (path / COMPLETE_MARKER).is_file() else None

    @contextmanager
    def put(self, kind: str, key: str) -> Iterator[Path]:
        """Yield an empty temporary folder to fill; on success it becomes the entry in one rename.

        On error the temporary folder is removed and nothing is published. If another writer published the same
        entry meanwhile, theirs is kept and ours discarded.
        """
        final = self.path(kind, key)
        # A sibling of the final folder, so the rename stays on one filesystem and is atomic.
        tmp = final.parent / f"{_TMP_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        except OSError as exc:
            raise storage_error(exc, "write the cache entry", final) from exc
        try:
            yield tmp
            marker = {"kind": kind, "key": key, "code": CODE_VERSION, "created": time.time()}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, sort_keys=True), encoding="utf-8")
            self._publish(tmp, final)
        except StorageError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except OSError as exc:  # disk full or read-only MERGEFLOW_HOME: one line naming the entry and the cause
            shutil.rmtree(tmp, ignore_errors=True)
            at = exc.filename
            if isinstance(at, str) and Path(at).is_relative_to(tmp):
                at = str(final / Path(at).relative_to(tmp))
            raise storage_error(exc, "write the cache entry", final,
                                at=None if at in (None, str(final)) else at) from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @staticmethod
    def _publish(tmp: Path, final: Path) -> None:
        try:
            os.rename(tmp, final)
            return
        except OSError:
            if not final.exists():
                raise
        if (final / COMPLETE_MARKER).is_file():
            shutil.rmtree(tmp, ignore_errors=True)  # another writer won; same key means same content
            return
        # A folder without the marker was not made by put (which renames only complete folders): replace it.
        shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / COMPLETE_MARKER).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)

    def get_or_create(self, kind: str, key: str, build: Callable[[Path], None]) -> Path:
        """The complete entry, calling ``build(folder)`` to fill it first if it is missing."""
        hit = self.get(kind, key)
        if hit is not None:
            return hit
        with self.put(kind, key) as tmp:
            build(tmp)
        done = self.get(kind, key)
        if done is None:  # only if someone deletes the entry between our rename and this check
            raise RuntimeError(f"cache entry {kind}/{key} vanished right after it was written")
        return done
