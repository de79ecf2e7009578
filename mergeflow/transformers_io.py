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


def load_causal_lm(path: str | Path, *, dtype: Any = "float32", model_class: Any = None,
                   adapter_base: str | Path | None = None, allow_pickle: bool = False) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` (or ``model_class``'s) under the process-wide lock.

    ``adapter_base``: ``path`` is a LoRA adapter folder applied to the checkpoint in ``adapter_base``: the base is
    loaded and each adapted tensor set to what the merge reads for it (:class:`mergeflow.adapters.LoraReader`, so
    an estimator sees exactly the expert the engine merges)."""
    if model_class is None:
        # transformers costs seconds to import: modules that only may load a model import this one for free
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    with _LOCK:
        model = model_class.from_pretrained(str(adapter_base if adapter_base is not None else path), dtype=dtype)
    if adapter_base is not None:
        _apply_adapter(model, Path(path), Path(adapter_base), allow_pickle=allow_pickle)
    return model


def _apply_adapter(model: Any, folder: Path, base: Path, *, allow_pickle: bool) -> None:
    import torch

    from mergeflow.adapters import model_parameter_name
    from mergeflow.checkpoints import open_adapter

    # tied weights share one storage, as they do in PEFT's merged model: listed under every name, set once
    params = dict(model.named_parameters(remove_duplicate=False))
    with open_adapter(folder, base, allow_pickle=allow_pickle) as reader, torch.no_grad():
        for name in reader.adapted:
            param = params[model_parameter_name(name, params, folder)]
            param.copy_(reader.get(name).to(param.dtype))
