"""Where the heavy stages compute: the device a setting names, and how many CPU threads torch may use."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from mergeflow.errors import RecipeError


def pick_device(device: str) -> torch.device:
    """``auto``: CUDA when this machine has it, else the CPU; a CUDA device on a machine without one is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError(f"--device {device}: CUDA is not available on this machine")
    return torch.device(device)


@contextlib.contextmanager
def compute_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads inside the block: ``threads``, default all cores but one (left to reader/writer
    threads; oversubscribed OpenMP threads spin at barriers and run many times slower than one thread)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) - 1))
    try:
        yield
    finally:
        torch.set_num_threads(old)
