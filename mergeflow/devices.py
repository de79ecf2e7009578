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
def compute_threads(threads: int | None, *, all_cores: bool = False) -> Iterator[None]:
    """torch's CPU threads inside the block: ``threads``, default all cores but one (left to reader/writer
    threads; oversubscribed OpenMP threads spin at barriers and run many times slower than one thread), or every
    core with ``all_cores`` (work where the arithmetic dominates the reading and writing many times over, such as
    an SVD per tensor)."""
    old = torch.get_num_threads()
    cores = os.cpu_count() or 2
    torch.set_num_threads(threads or (cores if all_cores else max(1, cores - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(old)
