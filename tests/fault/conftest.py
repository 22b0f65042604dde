"""Fault tests: shared knobs for the CI run and the long run (python -m tests.reliability).

``LONG`` scales every fault test up; ``figures`` adds the counts each test proves to the
figures file the reliability report prints (a no-op outside the report, but the tests
assert on the same numbers either way).
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ConfigWriter

LONG = os.environ.get("MEETCH_RELIABILITY_LONG") == "1"
FIGURES_ENV = "MEETCH_RELIABILITY_FIGURES"

Record = Callable[[str, int], None]


def add_figure(name: str, value: int) -> None:
    """Add ``value`` to figure ``name`` in the figures file, if the report asked for one."""
    path = os.environ.get(FIGURES_ENV)
    if not path:
        return
    with Path(path).open("a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # pytest-xdist workers may write at once
        fh.seek(0)
        text = fh.read()
        data = json.loads(text) if text.strip() else {}
        data[name] = data.get(name, 0) + value
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(data, indent=2, sort_keys=True))


def queue_db(config: ConfigWriter) -> Path:
    """The queue file of the daemon under test."""
    return config.root / "state" / "queue.sqlite3"


def query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    """Read the queue file read-only, as it is (a read-only handle never checkpoints it)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.fixture
def figures() -> Record:
    """Record a figure for the reliability report."""
    return add_figure


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/fault is a fault test."""
    for item in items:
        if "tests/fault/" in str(item.fspath):
            item.add_marker(pytest.mark.fault)
