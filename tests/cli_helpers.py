"""What the tests of one-line errors share: running the CLI in process and asserting a refusal's shape."""

from __future__ import annotations

import signal

import pytest
from click.testing import CliRunner

from mergeflow.cli import main


@pytest.fixture(autouse=True)
def keep_sigterm():
    """The merge command turns SIGTERM into KeyboardInterrupt; in-process runs must not leave that to pytest
    (autouse in every module that imports it)."""
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def refused(result, *needles: str) -> str:
    """The run failed as a user error: exit 2 and exactly one ``error:`` line on stderr holding ``needles``."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
