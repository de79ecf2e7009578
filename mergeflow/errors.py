"""One exception tree for the whole library.

Every error a user can cause (bad recipe, unreadable checkpoint, incompatible experts, bad output path) is a
``MergeflowError`` with a message that names the offending field, file or tensor. The CLI prints ``str(error)`` on one
line and exits with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


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


class ArchitectureError(MergeflowError):
    """The architecture of a checkpoint cannot be inferred from its config and tensor names."""


class IncompatibleModelsError(MergeflowError):
    """The experts do not match the base: architecture, tensor names, shapes or vocabulary differ."""


class OutputPathError(MergeflowError):
    """The output path exists, lies inside an input, or cannot be written."""


class EvaluationError(MergeflowError):
    """An evaluation task is unknown or its data is missing."""


class ZooError(MergeflowError):
    """The offline model zoo cannot be built or read."""


class TrackingError(MergeflowError):
    """A merged model cannot be logged or registered: incomplete model folder, missing artifact, a selection rule
    that does not match the alias's, or an MLflow store that refuses or cannot be reached."""
