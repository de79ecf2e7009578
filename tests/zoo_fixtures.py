"""The test-size zoo, built once per test session (about 35 s on 2 idle cores).

Import the fixture into a test module with ``from tests.zoo_fixtures import test_zoo  # noqa: F401``. Each module
that imports it gets its own fixture definition, so the zoo goes to its default folder under the session's
MERGEFLOW_HOME: the first module builds it and the others find it there (``build_zoo`` returns a built zoo at once),
and so do ``zoo:test/...`` references in recipes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mergeflow.zoo import Zoo, build_zoo


@pytest.fixture(scope="session")
def test_zoo(mergeflow_home: Path) -> Zoo:
    return build_zoo(size="test", seed=0, progress=False)
