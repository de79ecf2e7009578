"""A gate the integration test puts in front of the merge stage of the worker's flow-run processes.

Python imports ``sitecustomize`` at start-up from ``sys.path``; the integration test puts this folder on the
workers' ``PYTHONPATH`` and names a folder in ``MERGEFLOW_TEST_MERGE_GATE``. While ``<folder>/hold`` exists, a merge
(``mergeflow.pipeline.merge``, the streaming engine as the merge stage calls it) first writes
``<folder>/reached-<pid>`` and then waits until ``hold`` is removed. So the test kills a worker while its flow run is
certainly inside the merge stage, instead of racing a tiny merge with polls of the Prefect API (whose task-run states
arrive as events, later than the flow run's own state). Without ``hold`` the merge runs unchanged: the other runs of
the same workers are not slowed. Nothing of this is in the library.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys
import time
from pathlib import Path

_GATE = os.environ.get("MERGEFLOW_TEST_MERGE_GATE")
_TARGET = "mergeflow.pipeline"


def _gated(merge):  # type: ignore[no-untyped-def]
    @functools.wraps(merge)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        gate = Path(_GATE)  # type: ignore[arg-type]
        if (gate / "hold").exists():
            (gate / f"reached-{os.getpid()}").write_text("merging\n")
            while (gate / "hold").exists():
                time.sleep(0.05)
        return merge(*args, **kwargs)

    return wrapper


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:  # type: ignore[no-untyped-def]
        self.inner.exec_module(module)
        module.merge = _gated(module.merge)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if _GATE:
    sys.meta_path.insert(0, _Finder())
