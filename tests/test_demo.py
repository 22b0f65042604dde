"""``meetch-gate demo``: the whole pipeline on simulated hardware, as a new user runs it."""

from __future__ import annotations

import pytest

from tests.conftest import cli


@pytest.mark.slow
def test_demo_runs_an_outage_and_delivers_everything() -> None:
    """The demo goes through an outage and ends with every insured ticket delivered, exit 0."""
    result = cli("demo", "--duration", "8", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Meetch goes down" in out
    assert "Meetch is back" in out
    assert "OK: all" in out
    assert "still pending" in out
    assert "time to drain after Meetch came back" in out
