"""Content-addressed store for intermediates (coefficients, task-vector manifests, downloaded registry models).

An entry is a folder ``<root>/<kind>/<key>`` whose key is a hash of everything that determines its content: the
inputs' content hashes, the parameters and the code version (:data:`CODE_VERSION`). An entry is either complete (it
holds the :data:`COMPLETE_MARKER` file) or absent: it is built in a temporary sibling folder and renamed into place in
one step, so a crash or a concurrent reader never sees half an entry, and two concurrent writers of the same key
both succeed (the first rename wins; the second writer's copy is discarded, as it is the same content by
construction).

An entry's marker records the size and sha256 of every file in it (and of each block of the large ones), and every
reuse checks them: files up to :data:`FULL_HASH_BYTES` are hashed in full, larger ones by size and a few sampled
blocks (first, last and random ones), every file in full when ``MERGEFLOW_VERIFY_CACHE=full`` (``mergeflow
--verify-cache``). A damaged entry (a file edited, truncated, deleted or added, a bit flipped) is removed with a
warning and built again. Temporary folders of builds whose process is gone are removed.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import Any, TypeVar

from mergeflow import __version__
from mergeflow.errors import StorageError, storage_error
from mergeflow.paths import HOST_TAG, left_by_a_gone_process, mergeflow_home

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Bump when the layout or meaning of any cached artifact changes, so old entries are never reused by new code.
CACHE_FORMAT = 1
CODE_VERSION = f"{__version__}+format{CACHE_FORMAT}"

COMPLETE_MARKER = ".complete.json"
_TMP_PREFIX = ".tmp-"
# .tmp-<key>-<pid>-<8 random hex digits><the host's tag> (the tag is absent from folders of older versions)
_TMP_RE = re.compile(r"^\.tmp-.+-(?P<pid>\d+)-[0-9a-f]{8}(?P<host>[0-9a-f]{8})?$")

VERIFY_ENV = "MERGEFLOW_VERIFY_CACHE"  # "full": hash every file of an entry in full at every reuse
FULL_HASH_BYTES = 4 << 20  # files up to this size are hashed in full at every reuse
BLOCK_BYTES = 1 << 20  # the smallest block of a larger file (at most MAX_BLOCKS blocks per file)
MAX_BLOCKS = 4096
SAMPLED_BLOCKS = 8  # random blocks checked per large file at each reuse, besides its first and last
_BLOCK_DIGEST = 16  # hex digits kept of each block's sha256
# errors of writing, when the OSError names no file (a write or fsync on an open descriptor)
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG})
_SAMPLER = random.SystemRandom()  # never the global generator: seeded runs must not depend on cache hits
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


def _entry_files(folder: Path) -> dict[str, Path]:
    """Every file (and symlink) under ``folder`` by its relative POSIX name, the root's marker excepted."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        for name in filenames + [d for d in dirnames if (here / d).is_symlink()]:
            path = here / name
            rel = path.relative_to(folder).as_posix()
            if rel != COMPLETE_MARKER:
                found[rel] = path
    return found


def _block_size(size: int) -> int:
    return max(BLOCK_BYTES, -(-size // MAX_BLOCKS))


def _digest_file(path: Path) -> dict[str, Any]:
    """A file's record: size and sha256, and for a large file the digests of its blocks (for sampled checks)."""
    if path.is_symlink():
        return {"link": os.readlink(path)}
    size = path.stat().st_size
    whole = hashlib.sha256()
    record: dict[str, Any] = {"size": size}
    blocks: list[str] = []
    block = _block_size(size)
    with open(path, "rb") as f:
        while chunk := f.read(block):
            whole.update(chunk)
            if size > FULL_HASH_BYTES:
                blocks.append(hashlib.sha256(chunk).hexdigest()[:_BLOCK_DIGEST])
    record["sha256"] = whole.hexdigest()
    if size > FULL_HASH_BYTES:
        record.update(block=block, blocks=blocks)
    return record


def record_files(folder: Path) -> dict[str, dict[str, Any]]:
    """The content record of an entry's files: what its marker keeps and every reuse checks."""
    return {rel: _digest_file(path) for rel, path in sorted(_entry_files(folder).items())}


def _check_file(path: Path, record: dict[str, Any], full: bool) -> str | None:
    """What is wrong with ``path`` against its ``record`` (None: nothing found)."""
    if "link" in record:
        return None if path.is_symlink() and os.readlink(path) == record["link"] else "the link changed"
    if path.is_symlink():
        return "is now a link"
    size = path.stat().st_size
    if size != record.get("size"):
        return f"is {size} bytes, {record.get('size')} were written"
    blocks = record.get("blocks")
    if full or not isinstance(blocks, list) or not blocks:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
        return None if digest.hexdigest() == record.get("sha256") else "its content changed (sha256 differs)"
    block = int(record["block"])
    picks = {0, len(blocks) - 1, *_SAMPLER.sample(range(len(blocks)), min(SAMPLED_BLOCKS, len(blocks)))}
    with open(path, "rb") as f:
        for i in sorted(picks):
            f.seek(i * block)
            if hashlib.sha256(f.read(block)).hexdigest()[:_BLOCK_DIGEST] != blocks[i]:
                return f"its content changed (block {i} of {len(blocks)} differs)"
    return None


def verify_files(folder: Path, files: dict[str, dict[str, Any]], *, full: bool = False) -> str | None:
    """The first problem of an entry against its record (a file missing, added, resized or changed), or None."""
    present = _entry_files(folder)
    for rel in sorted(files):
        if rel not in present:
            return f"{rel} is missing"
    for rel in sorted(present):
        if rel not in files:
            return f"{rel} was added"
    for rel, record in sorted(files.items()):
        try:
            problem = _check_file(present[rel], record, full)
        except (OSError, KeyError, TypeError, ValueError) as exc:
            problem = f"it cannot be checked ({exc})"
        if problem:
            return f"{rel}: {problem}"
    return None


def full_verification() -> bool:
    """Whether reuses hash every file in full (``MERGEFLOW_VERIFY_CACHE=full``, ``mergeflow --verify-cache``)."""
    return os.environ.get(VERIFY_ENV, "").strip().lower() in ("full", "1", "true", "yes")


class Cache:
    """Folders keyed by (kind, key) under ``root`` (default ``MERGEFLOW_HOME/cache``), written atomically."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else mergeflow_home() / "cache"

    def path(self, kind: str, key: str) -> Path:
        """Where the entry lives once complete (it may not exist yet)."""
        return self.root / _check_name("kind", kind) / _check_name("key", key)

    def get(self, kind: str, key: str) -> Path | None:
        """The entry's folder if it is complete and its files are as they were written, else ``None``.

        A damaged entry is removed with a warning (so the caller builds it again); an entry of an older version,
        whose marker has no content record, gets one now.
        """
        path = self.path(kind, key)
        marker_path = path / COMPLETE_MARKER
        try:
            raw = marker_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            if not path.is_dir():
                return None
            return self._damaged(kind, key, f"its marker cannot be read ({exc})")
        try:
            marker = json.loads(raw)
            if not isinstance(marker, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            return self._damaged(kind, key, f"its marker is not valid ({exc})")
        files = marker.get("files")
        if files is None:  # made before entries recorded their content: trust it once, record it now
            self._adopt(path, marker)
            return path
        if not isinstance(files, dict):
            return self._damaged(kind, key, "its marker's file record is not valid")
        problem = verify_files(path, files, full=full_verification())
        if problem is not None:
            return self._damaged(kind, key, problem)
        return path

    def discard(self, kind: str, key: str, reason: str) -> None:
        """Remove the entry (a caller found it unusable), with a warning saying why; the next get builds it again."""
        self._damaged(kind, key, reason)

    def _damaged(self, kind: str, key: str, reason: str) -> None:
        path = self.path(kind, key)
        logger.warning("cache entry %s/%s in %s is damaged (%s); it is removed and built again", kind, key[:16],
                       self.root, reason)
        # renamed aside first, so no reader sees a half-removed entry; a concurrent discard may have done it already
        aside = path.parent / f"{_TMP_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}{HOST_TAG}"
        try:
            os.rename(path, aside)
        except OSError:
            return None
        shutil.rmtree(aside, ignore_errors=True)
        return None

    @staticmethod
    def _adopt(path: Path, marker: dict[str, Any]) -> None:
        try:
            marker = {**marker, "files": record_files(path)}
            tmp = path / f"{COMPLETE_MARKER}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.write_text(json.dumps(marker, sort_keys=True), encoding="utf-8")
            os.replace(tmp, path / COMPLETE_MARKER)
        except OSError as exc:  # a read-only cache still serves its entries
            logger.debug("could not record the content of cache entry %s: %s", path, exc)

    def _sweep(self, folder: Path) -> None:
        """Remove temporary folders of builds (or removals) whose process is gone."""
        try:
            names = os.listdir(folder)
        except OSError:
            return
        for name in names:
            m = _TMP_RE.match(name)
            if m and left_by_a_gone_process(folder / name, int(m.group("pid")), m.group("host")):
                shutil.rmtree(folder / name, ignore_errors=True)

    @contextmanager
    def put(self, kind: str, key: str) -> Iterator[Path]:
        """Yield an empty temporary folder to fill; on success it becomes the entry in one rename.

        On error the temporary folder is removed and nothing is published. If another writer published the same
        entry meanwhile, theirs is kept and ours discarded.
        """
        final = self.path(kind, key)
        # A sibling of the final folder, so the rename stays on one filesystem and is atomic.
        tmp = final.parent / f"{_TMP_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}{HOST_TAG}"
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._sweep(final.parent)
            tmp.mkdir()
        except OSError as exc:
            raise storage_error(exc, "write the cache entry", final) from exc
        try:
            yield tmp
            marker = {"kind": kind, "key": key, "code": CODE_VERSION, "created": time.time(),
                      "files": record_files(tmp)}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, sort_keys=True), encoding="utf-8")
            self._publish(tmp, final)
        except StorageError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            at = exc.filename
            inside = isinstance(at, str) and Path(at).is_relative_to(tmp)
            if not inside and not (at is None and exc.errno in _WRITE_ERRNOS):
                raise  # not a write into the entry (a build reading its inputs): the build's own error
            # disk full or read-only MERGEFLOW_HOME: one line naming the entry and the cause
            if inside:
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
        if done is None:  # only if someone deletes or damages the entry between our rename and this check
            raise RuntimeError(f"cache entry {kind}/{key} vanished right after it was written")
        return done

    def load_or_create(self, kind: str, key: str, build: Callable[[Path], None], load: Callable[[Path], T]) -> T:
        """``load(entry)`` of the complete entry, built first if missing; an entry that ``load`` cannot read (a
        manifest truncated or deleted since it was checked) is removed with a warning and built again, once."""
        folder = self.get_or_create(kind, key, build)
        try:
            return load(folder)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.discard(kind, key, f"it cannot be read: {type(exc).__name__}: {exc}")
        return load(self.get_or_create(kind, key, build))
