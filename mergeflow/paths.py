"""Where mergeflow keeps its caches and built artifacts.

Everything mergeflow writes on its own (content-hash memo, intermediate cache, downloaded registry models) lives under
one folder, ``MERGEFLOW_HOME`` (default ``~/.cache/mergeflow``), so it can be moved, shared or wiped in one place.
"""

from __future__ import annotations

import os
from pathlib import Path

from mergeflow.errors import storage_error

ENV_HOME = "MERGEFLOW_HOME"
DEFAULT_HOME = Path("~/.cache/mergeflow")


def mergeflow_home() -> Path:
    """The mergeflow home folder, created on demand.

    Read from the environment at every call (not at import) so tests and workers can point it elsewhere at run time.
    """
    raw = os.environ.get(ENV_HOME, "").strip()
    home = Path(raw).expanduser() if raw else DEFAULT_HOME.expanduser()
    home = home.resolve()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(exc, f"create {ENV_HOME}", home) from exc
    return home
