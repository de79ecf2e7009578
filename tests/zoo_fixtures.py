"""The test-size zoo, built once per test session (about 35 s on 2 idle cores).

Import the fixture into a test module with ``from tests.zoo_fixtures import test_zoo  # noqa: F401``. Each module
that imports it gets its own fixture definition, so the zoo goes to a fixed folder of the session's temporary root:
the first module builds it and the others find it there (``build_zoo`` returns a built zoo at once).
"""

from __future__ import annotations

import pytest

from mergeflow.zoo import Zoo, build_zoo


@pytest.fixture(scope="session")
def test_zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return build_zoo(tmp_path_factory.getbasetemp() / "zoo" / "test-seed0", size="test", seed=0, progress=False)
