"""Loading and building transformers models safely from several threads of one process.

While it loads a checkpoint, transformers (5.x) swaps class-level functions for no-ops — ``PreTrainedModel.tie_weights``
(``no_tie_weights``) and torch's ``nn.init`` functions (``no_init_weights``) — and puts the originals back when it
is done. Two loads in two threads interleave those swaps, and the process can be left with the no-ops for good:
later models come out with untied heads left on the meta device, or with uninitialised weights. Pipeline tasks run
in threads (Prefect's and Dask's thread runners), so every load and construction in mergeflow goes through one lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_LOCK = threading.RLock()


@contextmanager
def exclusive() -> Iterator[None]:
    """Hold while transformers builds or loads a model in this process."""
    with _LOCK:
        yield


def load_causal_lm(path: str | Path, *, dtype: Any = "float32", model_class: Any = None) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` (or ``model_class``'s) under the process-wide lock."""
    if model_class is None:
        # transformers costs seconds to import: modules that only may load a model import this one for free
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    with _LOCK:
        return model_class.from_pretrained(str(path), dtype=dtype)
