"""A checkpoint's tokenizer: which files make one, a hash over them, and loading it (transformers, imported only
when a tokenizer is loaded). Shared by the vocabulary alignment (:mod:`mergeflow.vocabulary`) and the importance
estimators, which encode each expert's data in its own tokenizer when vocabularies differ."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from mergeflow.checkpoints import contained_file
from mergeflow.errors import CheckpointError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# files that make a folder a tokenizer (any one of them), and every file a tokenizer may consist of
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_MARKERS)


def tokenizer_digest(folder: Path) -> str | None:
    """A hash over the tokenizer files of ``folder`` (None: it has none). Equal digests: equal tokenizers, so the
    tokenizers of a family that share their files are compared without loading any."""
    if not has_tokenizer(folder):
        return None
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        real = contained_file(Path(folder), name, "tokenizer file")
        if real is not None:
            h.update(name.encode() + b"\0" + hashlib.sha256(real.read_bytes()).digest())
    return "sha256:" + h.hexdigest()


def load_tokenizer(folder: Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The (fast, where there is one) tokenizer saved in ``folder``; a one-line :class:`CheckpointError` if it
    cannot be read."""
    from transformers import AutoTokenizer  # seconds to import: only when a vocabulary is compared

    for name in TOKENIZER_FILES:
        contained_file(Path(folder), name, "tokenizer file")  # a link outside the checkpoint is refused, not read
    try:
        return AutoTokenizer.from_pretrained(str(folder), use_fast=True, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises anything from OSError to ValueError to KeyError
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot load the tokenizer in {folder}: {text}") from None
