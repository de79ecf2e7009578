"""Shared test setup: offline, an isolated MERGEFLOW_HOME, and tiny model families built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def mergeflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Caches (hash memo, task-vector manifests, zoo) go to a per-session folder, never the user's home."""
    home = tmp_path_factory.mktemp("mergeflow_home")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Run on several workers (``make test``: pytest-xdist), each its own session: the zoos (built once, in minutes)
        # go to one folder beside the workers' base folders, so the first worker that needs one builds it and the
        # others wait on build_zoo's file lock and find it there, as the modules of one session do.
        shared = tmp_path_factory.getbasetemp().parent / "shared-zoo"
        shared.mkdir(exist_ok=True)
        (home / "zoo").symlink_to(shared, target_is_directory=True)
    old = os.environ.get("MERGEFLOW_HOME")
    os.environ["MERGEFLOW_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("MERGEFLOW_HOME", None)
    else:
        os.environ["MERGEFLOW_HOME"] = old


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one compute thread is fastest, and far faster than two on a shared, busy machine. Modules of
    tiny-model tests use it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def families(tmp_path_factory: pytest.TempPathFactory):
    """Lazily built tiny families: ``families("llama")`` → (base, [expert0, expert1, expert2])."""
    from tests.tiny_models import make_family

    root = tmp_path_factory.mktemp("families")
    built: dict[str, tuple[Path, list[Path]]] = {}

    def get(family: str) -> tuple[Path, list[Path]]:
        if family not in built:
            built[family] = make_family(family, root / family)
        return built[family]

    return get
