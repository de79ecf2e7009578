"""Resolve a checkpoint reference to a checked local snapshot with a content hash.

A reference is a local folder, a Hugging Face hub id (``org/name`` or ``name``, optional ``@revision``) served from the
normal hub cache (offline mode honoured), an MLflow registry URI (``models:/name/3``, ``models:/name@champion``) or a
zoo model (``zoo:full/base``), or a LoRA adapter folder applied to a full checkpoint (``BASE+ADAPTER``, or an adapter
folder with the base given separately; see :mod:`mergeflow.adapters`). Finding the folder is
:mod:`mergeflow.resolvers`' job (a registry of resolvers per scheme, which the MLflow and zoo layers fill), so this
reader imports neither of them; the safetensors header and pickle readers live in :mod:`mergeflow.tensors`.

Bad input fails here, before any heavy work, with a message naming the folder, file or tensor: checks run
cheapest first (folder, config, weight files exist and are readable → safetensors headers consistent with the file
size → content hash → tensor values finite). Hashes and "all finite" verdicts are memoised per file in
``MERGEFLOW_HOME/hashes.json``, keyed by (resolved path, device, inode, size, mtime_ns, ctime_ns), so a checkpoint is
read in full once, not at every merge, and a file rewritten in place with its size and mtime kept is read again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from mergeflow.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_PICKLE,
    ADAPTER_SAFETENSORS,
    LoraAdapter,
    LoraReader,
    is_adapter_folder,
)
from mergeflow.architecture import Architecture
from mergeflow.errors import AdapterError, CheckpointError, NonFiniteTensorError, UnsafePathError
from mergeflow.paths import mergeflow_home
from mergeflow.resolvers import locate, split_adapter_reference
from mergeflow.tensors import (
    PICKLE_INDEX,
    SAFETENSORS_INDEX,
    CheckpointReader,
    TensorReader,
    load_pickle,
    read_json_object,
    read_safetensors_header,
)

logger = logging.getLogger(__name__)

SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_SINGLE = "pytorch_model.bin"
CONFIG = "config.json"

# Float dtypes that can hold NaN or Inf (F4 and F6 have no encoding for either, so they need no scan).
_SCANNED_DTYPES = frozenset({"F8_E5M2", "F8_E4M3", "F8_E8M0", "F16", "BF16", "F32", "F64", "C64"})
_FINITE_CHUNK = 1 << 24  # elements per isfinite() call: bounds the temporary bool mask to 16 MB

_MEMO_NAME = "hashes.json"
_MEMO_VERSION = 1


@dataclass(frozen=True)
class Snapshot:
    """A checked local checkpoint: where it is, what it holds and its content hash."""

    reference: str  # what the user wrote
    path: Path  # local folder holding config.json + weights (a LoRA adapter: the adapter's folder)
    content_hash: str  # "sha256:<hex>" over (relative name, bytes) of the weight files; location-independent
    weight_files: tuple[str, ...]  # relative names of the weight files, sorted
    format: str  # "safetensors" | "pickle" | "lora"
    revision: str | None  # hub commit sha, MLflow model version, or None for a local folder
    # a LoRA adapter: the full checkpoint it applies to (its content hash is then that of (base, adapter))
    adapter_base: Snapshot | None = None

    @property
    def model_folder(self) -> Path:
        """The folder holding the model's ``config.json`` and tokenizer: the base's, for a LoRA adapter."""
        return self.adapter_base.path if self.adapter_base is not None else self.path

    @property
    def n_files(self) -> int:
        """How many files reading this model keeps open."""
        return len(self.weight_files) + (self.adapter_base.n_files if self.adapter_base is not None else 0)


# --------------------------------------------------------------------------------------------------------- resolve


def resolve(
    reference: str | Path,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
    base_dir: Path | None = None,
    scan_finite: bool = True,
    trust_remote_code: bool = False,
    confine: bool = False,
    adapter_base: str | Path | None = None,
) -> Snapshot:
    """Resolve ``reference`` to a local snapshot, check it and hash it.

    ``revision`` applies to hub ids only (same as ``org/name@revision``). ``trust_remote_code`` only lets a hub
    download include the repository's ``*.py`` files; nothing here executes them. ``confine`` (a recipe's
    ``confine_paths``) refuses weight files, indexes and configs that are symlinks leading outside the checkpoint
    folder, before any of them is read.

    A LoRA adapter folder resolves to the model it makes of its base: ``BASE+ADAPTER`` names the base in the
    reference, ``adapter_base`` for a plain adapter reference (a recipe's ``base_model``). The adapter is checked
    against the base (every target present, every shape fitting) from the headers alone.
    """
    text = str(reference)
    split = split_adapter_reference(text, base_dir) if isinstance(reference, str) else None
    if split is not None:
        if adapter_base is not None:
            raise CheckpointError(f"cannot resolve {text!r}: it names the model its adapter applies to, and "
                                  f"{str(adapter_base)!r} was given as well")
        adapter_base, reference = split
    folder, resolved_revision = locate(reference, revision=revision, base_dir=base_dir,
                                       allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    options = {"allow_pickle": allow_pickle, "base_dir": base_dir, "scan_finite": scan_finite,
               "trust_remote_code": trust_remote_code, "confine": confine}
    if is_adapter_folder(folder):
        return _resolve_adapter(text, folder, resolved_revision, adapter_base, options)
    if adapter_base is not None:
        raise AdapterError(f"cannot resolve {text!r}: {folder} is not a LoRA adapter (no {ADAPTER_CONFIG}), so it "
                           f"cannot be applied to {str(adapter_base)!r}")
    if confine:
        check_contained(folder, [CONFIG, SAFETENSORS_INDEX, PICKLE_INDEX], "file")
    _check_folder(folder, text)
    weight_files, fmt = find_weight_files(folder, allow_pickle=allow_pickle)
    if confine:
        check_contained(folder, weight_files, "weight file")
    inspect_weights(folder, weight_files)
    digest = content_hash(folder, weight_files)
    if scan_finite:
        _scan_finite(folder, weight_files)
    return Snapshot(reference=text, path=folder, content_hash=digest, weight_files=weight_files, format=fmt,
                    revision=resolved_revision)


def _resolve_adapter(text: str, folder: Path, revision: str | None, adapter_base: str | Path | None,
                     options: dict[str, Any]) -> Snapshot:
    if adapter_base is None:
        raise AdapterError(f"{text!r} is a LoRA adapter ({folder} has {ADAPTER_CONFIG} and no model weights): name "
                           f"the model it applies to, as the recipe's base_model or as BASE+{text}")
    if options["confine"]:
        check_contained(folder, [ADAPTER_CONFIG, ADAPTER_SAFETENSORS, ADAPTER_PICKLE], "file")
    adapter = LoraAdapter.read(folder, allow_pickle=options["allow_pickle"])
    base = resolve(adapter_base, **options)
    if base.adapter_base is not None:
        raise AdapterError(f"cannot apply the LoRA adapter {text!r} to {base.reference!r}: that is an adapter "
                           "itself; an adapter applies to a full checkpoint")
    open_adapter(folder, base.path, base.weight_files, allow_pickle=options["allow_pickle"], reference=text,
                 adapter=adapter).close()
    adapter_hash = content_hash(folder, [ADAPTER_CONFIG, adapter.weight_file])
    if options["scan_finite"]:
        scan_finite(folder, [adapter.weight_file])
    combined = hashlib.sha256(f"lora\0{base.content_hash}\0{adapter_hash}".encode()).hexdigest()
    return Snapshot(reference=text, path=folder, content_hash="sha256:" + combined,
                    weight_files=(adapter.weight_file,), format="lora", revision=revision, adapter_base=base)


def read_model_config(folder: Path) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint folder, as a dict."""
    return read_json_object(Path(folder) / CONFIG)


def open_adapter(folder: Path, base: Path, base_weight_files: Iterable[str] | None = None, *,
                 allow_pickle: bool = False, reference: str | None = None,
                 adapter: LoraAdapter | None = None) -> LoraReader:
    """A reader of the LoRA adapter in ``folder`` applied to the full checkpoint in ``base`` (its weight files
    found as :func:`resolve` finds them unless given); checks that they fit, reading headers only."""
    adapter = adapter or LoraAdapter.read(folder, allow_pickle=allow_pickle)
    if base_weight_files is None:
        base_weight_files, _ = find_weight_files(Path(base), allow_pickle=allow_pickle)
    reader = CheckpointReader(Path(base), list(base_weight_files), allow_pickle=allow_pickle)
    try:
        arch = Architecture.infer(read_model_config(base), {n: s.shape for n, s in reader.specs.items()})
        # PEFT orients a layer's delta by the module's class (Conv1D: fan_in_fan_out), which the layout tells
        transposed = {name for name, role in arch.tensors.items() if role.conv1d}
        return LoraReader(reader, adapter, transposed=transposed, reference=reference, allow_pickle=allow_pickle)
    except BaseException:
        reader.close()
        raise


def open_checkpoint(snapshot: Snapshot, *, allow_pickle: bool = False) -> TensorReader:
    """The tensor reader of a resolved snapshot: its weight files, or for a LoRA adapter its base's tensors with the
    adapter's ``scale · B · A`` added to each target as it is read."""
    base = snapshot.adapter_base
    if base is None:
        return CheckpointReader(snapshot.path, snapshot.weight_files, allow_pickle=allow_pickle)
    return open_adapter(snapshot.path, base.path, base.weight_files, allow_pickle=allow_pickle,
                        reference=snapshot.reference)


def open_model(folder: Path, adapter_base: Path | None = None, *, allow_pickle: bool = False) -> TensorReader:
    """The tensor reader of a checkpoint folder (weight files found as :func:`resolve` finds them), or of the LoRA
    adapter in ``folder`` applied to the checkpoint in ``adapter_base``; nothing is hashed."""
    if adapter_base is None:
        files, fmt = find_weight_files(Path(folder), allow_pickle=allow_pickle)
        return CheckpointReader(Path(folder), files, allow_pickle=fmt == "pickle")
    return open_adapter(Path(folder), Path(adapter_base), allow_pickle=allow_pickle)


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
    read_json_object(config)  # a config that is unreadable, not JSON or not an object: one line, now


def checkpoint_root(folder: Path) -> Path:
    """The real folder a checkpoint's files may lead into: the checkpoint folder itself, or for a Hugging Face cache
    snapshot (``snapshots/<commit>/``, whose files are links to ``../../blobs/``) its repository folder."""
    real = Path(os.path.realpath(folder))
    repo = real.parent.parent
    if real.parent.name == "snapshots" and (repo / "blobs").is_dir():
        return repo
    return real


def contained_file(folder: Path, name: str, what: str = "file") -> Path | None:
    """The real path of the file ``folder/name`` (None if there is no such file), refusing with
    :class:`UnsafePathError` one that is a symlink leading outside the checkpoint (see :func:`checkpoint_root`): a
    ``tokenizer.json`` linked to ``/etc/passwd`` must not end up in a merge's output."""
    path = Path(folder) / name
    if not path.is_file():
        return None
    real = Path(os.path.realpath(path))
    root = checkpoint_root(folder)
    if not real.is_relative_to(root):
        raise UnsafePathError(f"{what} {path} is a symlink to {real}, outside the checkpoint folder {root}; refused "
                              f"(copy the file into the checkpoint instead)")
    return real


def check_contained(folder: Path, names: Iterable[str], what: str = "file") -> None:
    """:func:`contained_file` for each of ``names`` (missing files are left to the checks that need them)."""
    for name in names:
        contained_file(folder, name, what)


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


# what identifies a file's bytes without reading them: a rewrite in place that keeps the size and the mtime (as
# `rsync -a` or `cp -p` do) still changes the ctime, which no user call can set back; a replaced file has a new inode
_IDENTITY_FIELDS = ("device", "inode", "size", "mtime_ns", "ctime_ns")
Identity = tuple[str, int, int, int, int, int]  # (resolved path, *_IDENTITY_FIELDS)


def _identity(path: Path) -> Identity:
    """(resolved path, device, inode, size, mtime_ns, ctime_ns): the memo key. Resolving makes hub snapshot symlinks
    share their blob's entry."""
    try:
        real = path.resolve()
        st = real.stat()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    return str(real), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _load_memo() -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(_memo_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a missing or damaged memo only costs a re-hash
    if not isinstance(data, dict) or data.get("version") != _MEMO_VERSION or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _memo_entry(memo: dict[str, dict[str, Any]], ident: Identity) -> dict[str, Any]:
    entry = memo.get(ident[0])
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in zip(_IDENTITY_FIELDS, ident[1:])):
        return entry
    return {}


def _memo_update(updates: dict[Identity, dict[str, Any]]) -> None:
    """Merge ``updates`` into the memo file atomically (temp file + os.replace).

    Re-reading just before writing keeps what concurrent writers added meanwhile; a lost race only loses a memo
    entry (a later re-hash), never corrupts the file. Entries of files that no longer exist are dropped.
    """
    memo_path = _memo_path()
    try:
        files = _load_memo()
        for ident, fields in updates.items():
            files[ident[0]] = {**_memo_entry(files, ident), **dict(zip(_IDENTITY_FIELDS, ident[1:])), **fields}
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
    are memoised; a file whose inode, size, mtime or ctime changed is hashed again.
    """
    folder = Path(folder)
    names = sorted({PurePosixPath(n).as_posix() for n in weight_files})
    memo = _load_memo()
    digests: dict[str, str] = {}
    updates: dict[Identity, dict[str, Any]] = {}
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
    updates: dict[Identity, dict[str, Any]] = {}
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


# the merge checks its output tensors with the same chunked count
count_non_finite = _count_non_finite

# resolve() has a keyword argument of the same name; keep a private alias it can call.
_scan_finite = scan_finite
