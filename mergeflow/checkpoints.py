"""Resolve a checkpoint reference to a checked local snapshot with a content hash.

A reference is a local folder, a Hugging Face hub id (``org/name`` or ``name``, optional ``@revision``) served from the
normal hub cache (offline mode honoured), or an MLflow registry URI (``models:/name/3``, ``models:/name@champion``).

Bad input fails here, before any heavy work, with a message naming the folder, file or tensor: checks run
cheapest first (folder, config, weight files exist and are readable → safetensors headers consistent with the file
size → content hash → tensor values finite). Hashes and "all finite" verdicts are memoised per file in
``MERGEFLOW_HOME/hashes.json``, keyed by (resolved path, size, mtime_ns), so a checkpoint is read in full once, not at
every merge.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from mergeflow.errors import CheckpointError, NonFiniteTensorError
from mergeflow.paths import mergeflow_home

logger = logging.getLogger(__name__)

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
CONFIG = "config.json"

# Bits per element of every safetensors dtype (F4/F6 pack several elements per byte).
SAFETENSORS_DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64,
}
# Float dtypes that can hold NaN or Inf (F4 and F6 have no encoding for either, so they need no scan).
_SCANNED_DTYPES = frozenset({"F8_E5M2", "F8_E4M3", "F8_E8M0", "F16", "BF16", "F32", "F64", "C64"})
_MAX_HEADER = 100_000_000  # the safetensors format's own limit

# What we fetch from the hub: weights, configs and tokenizer files. Never code (see trust_remote_code) and never
# other pickles (training_args.bin, optimizer.pt) that a merge does not need.
_HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
_HUB_PICKLE_PATTERNS = ["pytorch_model*.bin"]
_HUB_CODE_PATTERNS = ["*.py"]

_MLFLOW_RE = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))/?")
_FINITE_CHUNK = 1 << 24  # elements per isfinite() call: bounds the temporary bool mask to 16 MB

_MEMO_NAME = "hashes.json"
_MEMO_VERSION = 1


@dataclass(frozen=True)
class Snapshot:
    """A checked local checkpoint: where it is, what it holds and its content hash."""

    reference: str  # what the user wrote
    path: Path  # local folder holding config.json + weights
    content_hash: str  # "sha256:<hex>" over (relative name, bytes) of the weight files; location-independent
    weight_files: tuple[str, ...]  # relative names of the weight files, sorted
    format: str  # "safetensors" | "pickle"
    revision: str | None  # hub commit sha, MLflow model version, or None for a local folder


# --------------------------------------------------------------------------------------------------------- resolve


def resolve(
    reference: str | Path,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
    base_dir: Path | None = None,
    scan_finite: bool = True,
    trust_remote_code: bool = False,
) -> Snapshot:
    """Resolve ``reference`` to a local snapshot, check it and hash it.

    ``revision`` applies to hub ids only (same as ``org/name@revision``). ``trust_remote_code`` only lets a hub
    download include the repository's ``*.py`` files; nothing here executes them.
    """
    text = str(reference)
    folder, resolved_revision = _locate(reference, revision=revision, base_dir=base_dir,
                                        allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    _check_folder(folder, text)
    weight_files, fmt = find_weight_files(folder, allow_pickle=allow_pickle)
    inspect_weights(folder, weight_files)
    digest = content_hash(folder, weight_files)
    if scan_finite:
        _scan_finite(folder, weight_files)
    return Snapshot(reference=text, path=folder, content_hash=digest, weight_files=weight_files, format=fmt,
                    revision=resolved_revision)


def _locate(reference: str | Path, *, revision: str | None, base_dir: Path | None, allow_pickle: bool,
            trust_remote_code: bool) -> tuple[Path, str | None]:
    """The local folder for ``reference`` (downloading from the hub or MLflow if needed) and its revision."""
    if isinstance(reference, Path):
        return _local_folder(reference, str(reference), base_dir, revision), None
    text = reference.strip()
    if not text:
        raise CheckpointError("empty checkpoint reference")
    if text.startswith("models:/"):
        if revision is not None:
            raise CheckpointError(f"cannot resolve {text!r}: 'revision' applies to hub ids; put the version in the URI")
        return _from_mlflow(text)
    if text.startswith("zoo:"):
        if revision is not None:
            raise CheckpointError(f"cannot resolve {text!r}: 'revision' applies to hub ids; the zoo is named by "
                                  "size and seed")
        return _from_zoo(text), None
    candidate = _absolute(Path(text).expanduser(), base_dir)
    if candidate.exists() or candidate.is_symlink():
        return _local_folder(candidate, text, base_dir, revision), None
    repo_id, rev = _parse_hub_id(text)
    if repo_id is None:
        raise CheckpointError(f"cannot resolve {text!r}: no such folder ({candidate}) and not a hub id")
    if rev is not None and revision is not None and rev != revision:
        raise CheckpointError(f"cannot resolve {text!r}: revision {rev!r} in the reference conflicts with "
                              f"revision {revision!r}")
    return _from_hub(text, repo_id, rev or revision, allow_pickle=allow_pickle,
                     trust_remote_code=trust_remote_code)


def _absolute(path: Path, base_dir: Path | None) -> Path:
    return path if path.is_absolute() else Path(base_dir or Path.cwd()) / path


def _local_folder(path: Path, text: str, base_dir: Path | None, revision: str | None) -> Path:
    if revision is not None:
        # Silently ignoring it would merge something other than what the recipe pinned.
        raise CheckpointError(f"cannot resolve {text!r}: it is a local folder, which has no revision "
                              f"(got revision {revision!r})")
    folder = _absolute(path.expanduser(), base_dir)
    if not folder.exists():
        raise CheckpointError(f"cannot resolve {text!r}: no such folder ({folder})")
    if not folder.is_dir():
        raise CheckpointError(f"cannot resolve {text!r}: {folder} is a file, not a checkpoint folder")
    return folder.resolve()


def _parse_hub_id(text: str) -> tuple[str | None, str | None]:
    """``(repo_id, revision)`` if ``text`` is a syntactically valid hub id, else ``(None, None)``."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id, at, rev = text.partition("@")
    if at and not rev:
        return None, None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None, None
    return repo_id, (rev or None)


def _hub_cache_dir() -> str | None:
    # huggingface_hub reads these at import; reading them at call time lets tests and workers set them later.
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    def true(name: str) -> bool:
        return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}

    return constants.HF_HUB_OFFLINE or true("HF_HUB_OFFLINE") or true("TRANSFORMERS_OFFLINE")


def _from_hub(text: str, repo_id: str, revision: str | None, *, allow_pickle: bool,
              trust_remote_code: bool) -> tuple[Path, str | None]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = list(_HUB_PATTERNS)
    if allow_pickle:
        patterns += _HUB_PICKLE_PATTERNS
    if trust_remote_code:
        patterns += _HUB_CODE_PATTERNS
    cache_dir = _hub_cache_dir()
    offline = _hub_offline()
    where = cache_dir or "the default Hugging Face cache"
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns,
                                   local_files_only=offline)
    except IncompleteSnapshotError as e:
        raise CheckpointError(f"cannot resolve {text!r}: its cached snapshot in {where} is incomplete and the hub "
                              f"cannot be reached ({e})") from e
    except LocalEntryNotFoundError as e:
        mode = "offline" if offline else "the hub could not be reached"
        raise CheckpointError(
            f"cannot resolve {text!r}: not a local folder and not in the Hugging Face cache ({mode}; cache: {where}"
            f"{', revision ' + repr(revision) if revision else ''}). Download it first (`hf download {repo_id}`) "
            f"or give a local folder") from e
    except RevisionNotFoundError as e:
        raise CheckpointError(f"cannot resolve {text!r}: revision {revision!r} does not exist on the hub") from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(f"cannot resolve {text!r}: no such repository on the hub, or it is private/gated "
                              f"and no valid token was given") from e
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"cannot resolve {text!r}: hub download failed ({type(e).__name__}: {e})") from e
    path = Path(folder)
    # The cache layout is .../snapshots/<commit sha>: record the commit, not the branch name, for provenance.
    commit = path.name if path.parent.name == "snapshots" else revision
    return path, commit


def _from_mlflow(uri: str) -> tuple[Path, str | None]:
    """Download a registered model version once into MERGEFLOW_HOME and return the folder holding its weights."""
    match = _MLFLOW_RE.fullmatch(uri)
    if match is None:
        raise CheckpointError(f"cannot resolve {uri!r}: expected models:/<name>/<version> or models:/<name>@<alias>")
    try:
        import mlflow
        import mlflow.artifacts
    except ImportError as e:
        raise CheckpointError(f"cannot resolve {uri!r}: MLflow is not installed (pip install 'mergeflow[pipeline]')"
                              ) from e
    from mergeflow.cache import Cache, cache_key
    from mergeflow.tracking import configure

    configure()  # the project's store (MLFLOW_TRACKING_URI, else the project folder's mlflow.db), as when logging
    name, version, alias = match["name"], match["version"], match["alias"]
    try:
        if alias is not None:
            # An alias moves; resolve it now so the download is cached under the immutable version.
            version = str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
        if not version or not version.isdigit():
            raise CheckpointError(f"cannot resolve {uri!r}: version must be a number (stages are not supported); "
                                  f"use models:/{name}/<version> or models:/{name}@<alias>")
        registry = mlflow.get_registry_uri()
        key = cache_key("mlflow-model", registry=registry, name=name, version=version)
        root = Cache().get_or_create(
            "mlflow-model", key,
            lambda dst: mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}",
                                                            dst_path=str(dst)))
    except CheckpointError:
        raise
    except Exception as e:  # MLflow raises its own MlflowException and plain OSErrors for connection problems
        raise CheckpointError(f"cannot resolve {uri!r}: MLflow could not provide it ({type(e).__name__}: {e})") from e
    return _find_model_dir(root, uri), version


def _from_zoo(text: str) -> Path:
    """A model of the offline zoo (``zoo:full/base``), built deterministically under MERGEFLOW_HOME if missing."""
    from mergeflow.errors import ZooError
    from mergeflow.zoo.build import resolve_zoo_reference

    try:
        return resolve_zoo_reference(text)
    except ZooError as e:
        raise CheckpointError(f"cannot resolve {text!r}: {e}") from e


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


# ---------------------------------------------------------------------------------------------- folder and files


def _check_folder(folder: Path, reference: str) -> None:
    try:
        entries = os.listdir(folder)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {reference!r} ({folder}): {e.strerror or e}") from e
    if not entries:
        raise CheckpointError(f"checkpoint {reference!r} ({folder}) is an empty folder")
    config = folder / CONFIG
    if not config.is_file():
        raise CheckpointError(f"checkpoint {reference!r} ({folder}) has no {CONFIG}")
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"cannot read {config}: {e.strerror or e}") from e
    except ValueError as e:
        raise CheckpointError(f"{config} is not valid JSON: {e}") from e
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{config} is not a JSON object")


def find_weight_files(folder: Path, *, allow_pickle: bool = False) -> tuple[tuple[str, ...], str]:
    """``(weight file names, format)`` for ``folder``, preferring safetensors, as transformers does."""
    if (folder / SAFETENSORS_SINGLE).is_file():
        return (SAFETENSORS_SINGLE,), "safetensors"
    if (folder / SAFETENSORS_INDEX).exists():
        return _shards_from_index(folder, SAFETENSORS_INDEX), "safetensors"
    loose = sorted(p.name for p in folder.glob("*.safetensors") if p.is_file())
    if loose:
        return tuple(loose), "safetensors"
    has_pickle = (folder / PICKLE_SINGLE).exists() or (folder / PICKLE_INDEX).exists()
    if has_pickle and not allow_pickle:
        raise CheckpointError(f"{folder} holds only pickle .bin weights; set allow_pickle: true in the recipe to load "
                              f"them with torch.load(weights_only=True)")
    if (folder / PICKLE_SINGLE).is_file():
        return (PICKLE_SINGLE,), "pickle"
    if (folder / PICKLE_INDEX).exists():
        return _shards_from_index(folder, PICKLE_INDEX), "pickle"
    raise CheckpointError(f"{folder} holds no weights ({SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, *.safetensors"
                          f"{', ' + PICKLE_SINGLE if allow_pickle else ''})")


def _shards_from_index(folder: Path, index_name: str) -> tuple[str, ...]:
    index = folder / index_name
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"cannot read {index}: {e.strerror or e}") from e
    except ValueError as e:
        raise CheckpointError(f"{index} is not valid JSON: {e}") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no 'weight_map'")
    shards = sorted({str(v) for v in weight_map.values()})
    for shard in shards:
        parts = PurePosixPath(shard).parts
        # A shard name is a file inside the folder; an absolute or '..' path would read files outside it.
        if not parts or PurePosixPath(shard).is_absolute() or ".." in parts or "\\" in shard:
            raise CheckpointError(f"{index} lists an invalid shard name {shard!r}")
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: shard {missing[0]} listed in {index_name} is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return tuple(shards)


# ------------------------------------------------------------------------------------------------ header checks


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and validate the header of a safetensors file without reading any tensor data.

    Checks what safetensors itself checks when opening, so a truncated or corrupt file is caught here, with the
    file named: header length sane, JSON valid, every dtype known, ``shape × itemsize`` equal to the offset span,
    offsets contiguous from 0, and the data section exactly as long as the last offset.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len == 0 or header_len > _MAX_HEADER:
                raise CheckpointError(f"{path}: corrupt safetensors file (header length {header_len} is not sane)")
            if 8 + header_len > size:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header of {header_len} bytes "
                                      f"does not fit in {size} bytes)")
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not valid JSON: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not a JSON object)")

    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        spans.append(_check_entry(path, name, info))
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            raise CheckpointError(f"{path}: corrupt safetensors file (tensor {name!r} starts at byte {begin}, "
                                  f"expected {cursor}: gap or overlap)")
        cursor = end
    data_len = size - 8 - header_len
    if cursor > data_len:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, expected {8 + header_len + cursor}"
                              f"; tensor data ends past end of file)")
    if cursor < data_len:
        raise CheckpointError(f"{path}: corrupt safetensors file ({data_len - cursor} bytes after the last tensor)")
    return header


def _check_entry(path: Path, name: str, info: Any) -> tuple[int, int, str]:
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors file (tensor {name!r}: {problem})")

    if not isinstance(info, dict):
        raise bad("entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPE_BITS:
        raise bad(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise bad(f"bad shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise bad(f"bad data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise bad(f"bad data_offsets {offsets!r}")
    numel = 1
    for d in shape:
        numel *= d
    bits = numel * SAFETENSORS_DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != end - begin:
        raise bad(f"shape {shape} of {dtype} needs {bits / 8:g} bytes but data_offsets span {end - begin}")
    return begin, end, name


def _inspect_pickle(path: Path) -> None:
    # torch.save writes a zip archive whose central directory sits at the end: opening it catches truncation
    # without unpickling anything.
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    except (zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt pickle checkpoint (not a torch zip archive: {e})") from e
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        raise CheckpointError(f"{path}: corrupt pickle checkpoint (no data.pkl in the archive)")


def inspect_weights(folder: Path, weight_files: Iterable[str]) -> None:
    """Validate every weight file's structure without loading tensors; raise CheckpointError naming file and problem."""
    folder = Path(folder)
    for name in weight_files:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder}: weight file {name} is missing")
        if not os.access(path, os.R_OK):
            raise CheckpointError(f"cannot read {path}: permission denied")
        if name.endswith(".safetensors"):
            read_safetensors_header(path)
        elif name.endswith(".bin"):
            _inspect_pickle(path)
        else:
            raise CheckpointError(f"{path}: unknown weight file format")


# --------------------------------------------------------------------------------------- memo (hash, finiteness)


def _memo_path() -> Path:
    return mergeflow_home() / _MEMO_NAME


def _identity(path: Path) -> tuple[str, int, int]:
    """(resolved path, size, mtime_ns): the memo key. Resolving makes hub snapshot symlinks share their blob's entry."""
    try:
        real = path.resolve()
        st = real.stat()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    return str(real), st.st_size, st.st_mtime_ns


def _load_memo() -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(_memo_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a missing or damaged memo only costs a re-hash
    if not isinstance(data, dict) or data.get("version") != _MEMO_VERSION or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _memo_entry(memo: dict[str, dict[str, Any]], ident: tuple[str, int, int]) -> dict[str, Any]:
    entry = memo.get(ident[0])
    if isinstance(entry, dict) and entry.get("size") == ident[1] and entry.get("mtime_ns") == ident[2]:
        return entry
    return {}


def _memo_update(updates: dict[tuple[str, int, int], dict[str, Any]]) -> None:
    """Merge ``updates`` into the memo file atomically (temp file + os.replace).

    Re-reading just before writing keeps what concurrent writers added meanwhile; a lost race only loses a memo
    entry (a later re-hash), never corrupts the file. Entries of files that no longer exist are dropped.
    """
    memo_path = _memo_path()
    try:
        files = _load_memo()
        for ident, fields in updates.items():
            files[ident[0]] = {**_memo_entry(files, ident), "size": ident[1], "mtime_ns": ident[2], **fields}
        files = {k: v for k, v in files.items() if os.path.exists(k)}
        fd, tmp = tempfile.mkstemp(dir=memo_path.parent, prefix=".hashes-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": _MEMO_VERSION, "files": files}, f, indent=1, sort_keys=True)
            os.replace(tmp, memo_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        logger.warning("could not update the checkpoint memo %s: %s", memo_path, e)


# ------------------------------------------------------------------------------------------------- content hash


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(8 << 20)
    view = memoryview(buffer)
    try:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                digest.update(view[:n])
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    return digest.hexdigest()


def content_hash(folder: Path, weight_files: Iterable[str]) -> str:
    """``"sha256:<hex>"`` over the sorted (relative name, sha256 of bytes) pairs of the weight files.

    Depends only on names and bytes, so two copies of a checkpoint hash alike wherever they live. Per-file digests
    are memoised; a file whose size or mtime changed is hashed again.
    """
    folder = Path(folder)
    names = sorted({PurePosixPath(n).as_posix() for n in weight_files})
    memo = _load_memo()
    digests: dict[str, str] = {}
    updates: dict[tuple[str, int, int], dict[str, Any]] = {}
    for name in names:
        path = folder / name
        ident = _identity(path)
        cached = _memo_entry(memo, ident).get("sha256")
        if isinstance(cached, str):
            digests[name] = cached
            continue
        digests[name] = _sha256_file(path)
        if _identity(path) == ident:  # not memoised if the file changed while we read it
            updates[ident] = {"sha256": digests[name]}
    if updates:
        _memo_update(updates)
    combined = hashlib.sha256()
    for name in names:
        combined.update(f"{name}\0{digests[name]}\n".encode())
    return "sha256:" + combined.hexdigest()


# ------------------------------------------------------------------------------------------------ finite values


def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Load a pickle state dict safely: ``weights_only=True`` refuses anything but tensors and plain containers."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # UnpicklingError for refused globals, RuntimeError for damaged archives
        raise CheckpointError(f"{path}: refused or unreadable pickle checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{path}: pickle checkpoint is not a state dict (name -> tensor)")
    return state


def _count_non_finite(tensor: torch.Tensor) -> tuple[int, int]:
    """(NaN count, Inf count), in chunks so the temporary masks stay small."""
    flat = tensor.reshape(-1)
    upcast = flat.dtype.itemsize == 1  # isfinite/isnan are not implemented for the float8 types on every device
    nan = inf = 0
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        chunk = flat[start:start + _FINITE_CHUNK]
        if upcast:
            chunk = chunk.float()
        if not chunk.is_complex():
            # min and max propagate NaN and are the extreme values, so both finite means the chunk is: one fast
            # reduction instead of a full-size boolean mask
            lo, hi = torch.aminmax(chunk)
            if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
                continue
        elif bool(torch.isfinite(chunk).all()):
            continue
        n = int(torch.isnan(chunk).sum())
        nan += n
        inf += int((~torch.isfinite(chunk)).sum()) - n
    return nan, inf


def _check_tensor(path: Path, name: str, tensor: torch.Tensor) -> None:
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return
    nan, inf = _count_non_finite(tensor)
    if nan or inf:
        raise NonFiniteTensorError(f"{path}: tensor {name!r} has {nan + inf} non-finite values ({nan} NaN, {inf} Inf) "
                                   f"of {tensor.numel()}")


def _scan_file(path: Path) -> None:
    if path.name.endswith(".bin"):
        for name, value in load_pickle(path).items():
            if isinstance(value, torch.Tensor):
                _check_tensor(path, name, value)
        return
    from mergeflow.tensors import CheckpointReader

    header = read_safetensors_header(path)
    floats = [k for k, v in header.items() if k != "__metadata__" and v["dtype"] in _SCANNED_DTYPES]
    # one tensor at a time, read into a private buffer (no file mapping that would count in resident memory)
    with CheckpointReader(path.parent, [path.name]) as reader:
        for name in floats:
            _check_tensor(path, name, reader.get(name))


def scan_finite(folder: Path, weight_files: Iterable[str]) -> None:
    """Raise NonFiniteTensorError if any floating tensor holds NaN or Inf; clean files are memoised as such."""
    folder = Path(folder)
    memo = _load_memo()
    updates: dict[tuple[str, int, int], dict[str, Any]] = {}
    for name in sorted(set(weight_files)):
        path = folder / name
        ident = _identity(path)
        if _memo_entry(memo, ident).get("finite") is True:
            continue
        _scan_file(path)
        if _identity(path) == ident:
            updates[ident] = {"finite": True}
    if updates:
        _memo_update(updates)


# resolve() has a keyword argument of the same name; keep a private alias it can call.
_scan_finite = scan_finite
