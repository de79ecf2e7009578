"""One exception tree for the whole library.

Every error a user can cause (bad recipe, unreadable checkpoint, incompatible experts, bad output path) is a
``MergeflowError`` with a message that names the offending field, file or tensor. The CLI prints ``str(error)`` on one
line and exits with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno as _errno
import os
from pathlib import Path


class MergeflowError(Exception):
    """Base class of every error mergeflow raises on purpose."""


class RecipeError(MergeflowError):
    """The recipe is invalid: unknown method or parameter, a value out of range, a bad path."""


class CheckpointError(MergeflowError):
    """A checkpoint cannot be resolved or read: missing, unreadable, truncated, corrupt, or a refused format."""


class NonFiniteTensorError(CheckpointError):
    """An input tensor holds NaN or Inf values."""


class UnsafePathError(CheckpointError):
    """A checkpoint file (weight shard, config, tokenizer file) is a symlink that leads outside its checkpoint
    folder: refused rather than read or copied into a merge."""


class NonFiniteResultError(MergeflowError):
    """A merged tensor holds NaN or Inf values (nothing is written)."""


class StorageError(MergeflowError, OSError):
    """The operating system refused a read or write: disk full, permission denied, a parent that is a file, too many
    open files. The message names the path and the cause (``[ENOSPC]``...); nothing half-written is left in place.
    Still an ``OSError`` (with the original ``errno``), so callers that catch those keep working."""


# What to do about the errors a user's environment causes (the message's last part).
_HINTS = {
    _errno.ENOSPC: "free space on that filesystem or write elsewhere",
    _errno.EDQUOT: "free space within your quota or write elsewhere",
    _errno.EMFILE: "raise the open-file limit (ulimit -n)",
    _errno.ENFILE: "the system's open-file table is full; close other programs or raise fs.file-max",
    _errno.EACCES: "check the permissions of the folder",
    _errno.EPERM: "check the permissions of the folder",
    _errno.EROFS: "the filesystem is read-only; write elsewhere",
    _errno.ENOTDIR: "a part of the path is a file, not a folder",
    _errno.EEXIST: "a file of that name is in the way",
}

# OSErrors a user's environment causes, never a bug: the CLI prints them on one line too
ENVIRONMENT_ERRNOS = frozenset({*_HINTS, _errno.EIO, _errno.ENOENT, _errno.EISDIR, _errno.ENAMETOOLONG,
                                _errno.ELOOP, _errno.EFBIG, _errno.ENOTEMPTY, _errno.EXDEV, _errno.EBUSY})


def describe_os_error(exc: OSError) -> str:
    """``No space left on device [ENOSPC]; free space ...``: the cause of ``exc`` on one line, with a hint."""
    code = _errno.errorcode.get(exc.errno or 0, "")
    cause = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc)) or type(exc).__name__
    text = f"{cause} [{code}]" if code else cause
    hint = _HINTS.get(exc.errno or 0)
    return f"{text}; {hint}" if hint else text


def storage_error(exc: OSError, doing: str, path: str | os.PathLike[str] | None = None, *,
                  at: str | os.PathLike[str] | None = None) -> StorageError:
    """A one-line :class:`StorageError` for ``exc``: "cannot {doing} {path} (at {file}): {cause}; {hint}". ``path``
    defaults to the file the error names; ``at`` (default: that file, when it is not ``path``) says where inside."""
    named = os.fsdecode(exc.filename) if isinstance(exc.filename, (str, bytes, os.PathLike)) else None
    where = path if path is not None else named
    if at is None and named is not None and path is not None and Path(named) != Path(path):
        at = named
    subject = f"{doing} {where}" if where is not None else doing
    if at is not None:
        subject += f" (at {at})"
    error = StorageError(f"cannot {subject}: {describe_os_error(exc)}")
    error.errno = exc.errno
    return error


class ArchitectureError(MergeflowError):
    """The architecture of a checkpoint cannot be inferred from its config and tensor names."""


class IncompatibleModelsError(MergeflowError):
    """The experts do not match the base: architecture, tensor names, shapes or vocabulary differ."""


class AdapterError(CheckpointError):
    """A LoRA adapter folder cannot be applied: unreadable, malformed, or a kind of adapter mergeflow does not apply
    (DoRA, IA3, LoHa, ...)."""


class AdapterMismatchError(AdapterError, IncompatibleModelsError):
    """A LoRA adapter does not fit the base it is applied to: a target module the base lacks, or a factor shape
    that does not fit the base's tensor."""


class OutputPathError(MergeflowError):
    """The output path exists, lies inside an input, or cannot be written."""


class EvaluationError(MergeflowError):
    """An evaluation task is unknown or its data is missing."""


class TaskCodeError(EvaluationError):
    """A zoo's lm-eval task files would run code (``!function``, ``include:``, templates) that is not trusted: a
    folder outside MERGEFLOW_HOME/zoo without --trust-task-code, or code reaching outside the zoo folder."""


class ZooError(MergeflowError):
    """The offline model zoo cannot be built or read."""


class TrackingError(MergeflowError):
    """A merged model cannot be logged or registered: incomplete model folder, missing artifact, a selection rule
    that does not match the alias's, or an MLflow store that refuses or cannot be reached."""
