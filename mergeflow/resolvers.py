"""Where a checkpoint reference points: a registry of resolvers, one per reference scheme.

:func:`mergeflow.checkpoints.resolve` turns a reference into a checked, hashed snapshot; this module only finds the
local folder. A reference ``SCHEME:rest`` whose scheme is registered goes to that scheme's resolver; anything else
is a local folder (relative to the recipe's folder) or, if no such folder exists, a Hugging Face hub id
(``org/name[@revision]``) served from the hub cache (offline mode honoured).

Built-in schemes, imported on first use so that this module (and the checkpoint reader below it) never imports
the layers that own them:

- ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` — the MLflow model registry (:mod:`mergeflow.tracking`)
- ``zoo:SIZE[@SEED]/MEMBER`` — the offline model zoo, built on first use (:mod:`mergeflow.zoo.build`)

A resolver is ``fn(reference: str) -> Path | tuple[Path, str | None]``: the local folder holding ``config.json`` and
the weights, and optionally the version it resolved to (recorded as the snapshot's revision). Register another
scheme from the module that owns it::

    from mergeflow.resolvers import RESOLVERS

    @RESOLVERS.register("s3")
    def resolve_s3(reference: str) -> Path: ...

or add ``"s3": "package.module:function"`` to :data:`BUILTIN_RESOLVERS`. A resolver raises
:class:`~mergeflow.errors.CheckpointError` (any other :class:`~mergeflow.errors.MergeflowError` is reported as
one, prefixed with the reference).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from mergeflow.errors import CheckpointError, MergeflowError
from mergeflow.registry import Registry

Resolver = Callable[[str], "Path | tuple[Path, str | None]"]

BUILTIN_RESOLVERS: dict[str, str] = {
    "models": "mergeflow.tracking:resolve_model_uri",
    "zoo": "mergeflow.zoo.build:resolve_zoo_reference",
}

RESOLVERS: Registry[Resolver] = Registry("reference scheme", BUILTIN_RESOLVERS)

# What we fetch from the hub: weights, configs and tokenizer files. Never code (see trust_remote_code) and never
# other pickles (training_args.bin, optimizer.pt) that a merge does not need.
HUB_PATTERNS = ("*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.tiktoken", "*.jinja")
HUB_PICKLE_PATTERNS = ("pytorch_model*.bin",)
HUB_CODE_PATTERNS = ("*.py",)


def scheme_of(reference: str) -> str | None:
    """The registered scheme ``reference`` uses, or None (a local folder or a hub id)."""
    scheme, sep, _ = reference.partition(":")
    return scheme if sep and scheme in RESOLVERS else None


def split_adapter_reference(text: str, base_dir: Path | None = None) -> tuple[str, str] | None:
    """mergekit's ``BASE+ADAPTER`` (a LoRA adapter applied to the model ``BASE``): ``(base, adapter)``, or None when
    ``text`` has no ``+`` or is itself an existing local path (a folder whose name holds a ``+``)."""
    if "+" not in text:
        return None
    if _absolute(Path(text).expanduser(), base_dir).exists():
        return None
    parts = [p.strip() for p in text.split("+")]
    if len(parts) != 2 or not all(parts):
        raise CheckpointError(f"cannot resolve {text!r}: write a LoRA adapter on a model as BASE+ADAPTER (one '+', "
                              "both sides non-empty)")
    return parts[0], parts[1]


def locate(reference: str | Path, *, revision: str | None = None, base_dir: Path | None = None,
           allow_pickle: bool = False, trust_remote_code: bool = False) -> tuple[Path, str | None]:
    """The local folder for ``reference`` (downloading or building it if needed) and its revision, if any."""
    if isinstance(reference, Path):
        return local_folder(reference, str(reference), base_dir, revision), None
    text = reference.strip()
    if not text:
        raise CheckpointError("empty checkpoint reference")
    scheme = scheme_of(text)
    if scheme is not None:
        if revision is not None:
            raise CheckpointError(f"cannot resolve {text!r}: 'revision' applies to hub ids; a {scheme}: reference "
                                  "names its version itself")
        return _by_scheme(scheme, text)
    candidate = _absolute(Path(text).expanduser(), base_dir)
    if candidate.exists() or candidate.is_symlink():
        return local_folder(candidate, text, base_dir, revision), None
    repo_id, rev = parse_hub_id(text)
    if repo_id is None:
        raise CheckpointError(f"cannot resolve {text!r}: no such folder ({candidate}) and not a hub id")
    if rev is not None and revision is not None and rev != revision:
        raise CheckpointError(f"cannot resolve {text!r}: revision {rev!r} in the reference conflicts with "
                              f"revision {revision!r}")
    return from_hub(text, repo_id, rev or revision, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)


def _by_scheme(scheme: str, text: str) -> tuple[Path, str | None]:
    try:
        resolver = RESOLVERS[scheme]
    except ImportError as e:  # e.g. models:/ without MLflow installed
        raise CheckpointError(f"cannot resolve {text!r}: the {scheme}: resolver is not available ({e})") from e
    try:
        found = resolver(text)
    except CheckpointError:
        raise
    except MergeflowError as e:
        raise CheckpointError(f"cannot resolve {text!r}: {e}") from e
    folder, version = found if isinstance(found, tuple) else (found, None)
    return Path(folder), version


def _absolute(path: Path, base_dir: Path | None) -> Path:
    return path if path.is_absolute() else Path(base_dir or Path.cwd()) / path


def local_folder(path: Path, text: str, base_dir: Path | None, revision: str | None) -> Path:
    """``path`` (relative to ``base_dir``, else the working directory) as an existing folder, resolved."""
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


def parse_hub_id(text: str) -> tuple[str | None, str | None]:
    """``(repo_id, revision)`` if ``text`` is a syntactically valid hub id, else ``(None, None)``."""
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
    def true(name: str) -> bool:
        return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}

    return hub_constants.HF_HUB_OFFLINE or true("HF_HUB_OFFLINE") or true("TRANSFORMERS_OFFLINE")


def from_hub(text: str, repo_id: str, revision: str | None, *, allow_pickle: bool,
             trust_remote_code: bool) -> tuple[Path, str | None]:
    """The hub snapshot of ``repo_id`` (weights, configs, tokenizer files) and its commit sha."""
    patterns = list(HUB_PATTERNS)
    if allow_pickle:
        patterns += HUB_PICKLE_PATTERNS
    if trust_remote_code:
        patterns += HUB_CODE_PATTERNS
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
