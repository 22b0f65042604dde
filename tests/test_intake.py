"""From a frame to a committed scan and its feedback (agent/intake.py)."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from agent.config import ScannerSettings
from agent.intake import Dedupe, Intake
from agent.store import Recorded, Store, StoreWriteError

GOOD = b"\x1b7,"
BAD = b"\x1b8,"
WINDOW_S = 5.0
SCANNED_AT = datetime(2026, 2, 20, 19, 42, 7, 120000, tzinfo=timezone(timedelta(hours=1)))
NORTH = ScannerSettings(name="north-1", port="/dev/ttyACM0", good_read=GOOD, bad_read=BAD)
SOUTH = ScannerSettings(name="south-1", port="/dev/ttyACM1", good_read=GOOD, bad_read=BAD)


@dataclass
class FakeClock:
    """A monotonic clock that only moves when the test says so."""

    t: float = 1000.0

    def __call__(self) -> float:
        """The current time."""
        return self.t

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.t += seconds


@dataclass
class Calls:
    """What Intake reported through its callbacks."""

    queued: int = 0
    scans: list[tuple[str, str]] = field(default_factory=list)
    committed_at_queue: list[tuple[int, int]] = field(default_factory=list)


class FailingOnceStore(Store):
    """A real store whose next scan commit fails, as a full or failing disk would."""

    fail_next = False

    def record_scan(self, *args: Any, **kwargs: Any) -> Recorded:
        """Fail once when armed, else commit for real."""
        if self.fail_next:
            self.fail_next = False
            raise StoreWriteError(self.path, sqlite3.OperationalError("disk I/O error"))
        return super().record_scan(*args, **kwargs)


def committed(path: Path, sql: str) -> list[tuple[Any, ...]]:
    """Rows as another connection sees them: only what is committed."""
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql).fetchall()


def scans(path: Path) -> list[tuple[Any, ...]]:
    """Committed scans, oldest first."""
    return committed(path, "SELECT scanner, ticket, outcome, reason FROM scans ORDER BY id")


def notifications(path: Path) -> list[tuple[Any, ...]]:
    """Committed notifications, oldest first."""
    return committed(path, "SELECT ticket, scanner, state FROM notifications ORDER BY id")


@pytest.fixture
def clock() -> FakeClock:
    """The dedupe window's clock."""
    return FakeClock()


@pytest.fixture
def calls() -> Calls:
    """Records Intake's callbacks."""
    return Calls()


@pytest.fixture
def intake(store: Store, clock: FakeClock, calls: Calls) -> Intake:
    """An Intake on the real store; on_queued notes what was committed when it ran."""

    def on_queued() -> None:
        calls.queued += 1
        calls.committed_at_queue.append((len(scans(store.path)), len(notifications(store.path))))

    return Intake(
        store,
        Dedupe(WINDOW_S, now=clock),
        on_queued=on_queued,
        on_scan=lambda scanner, outcome: calls.scans.append((scanner, outcome)),
        wall=lambda: SCANNED_AT,
    )


def test_valid_frame_is_committed_before_good_read(
    intake: Intake, store: Store, calls: Calls
) -> None:
    """A valid frame's scan and notification are committed before good_read is returned."""
    assert intake.handle(NORTH, b"]C0000001") == GOOD
    assert calls.committed_at_queue == [(1, 1)]
    assert scans(store.path) == [("north-1", "000001", "valid", None)]
    assert notifications(store.path) == [("000001", "north-1", "pending")]
    assert calls.scans == [("north-1", "valid")]
    notice = store.notification_for("000001")
    assert notice is not None
    assert notice.scanned_at == "2026-02-20T19:42:07.120+01:00"


def test_repeat_inside_window_is_a_duplicate(
    intake: Intake, store: Store, clock: FakeClock, calls: Calls
) -> None:
    """A second read inside the window is recorded as duplicate, gets no feedback, no notice."""
    assert intake.handle(NORTH, b"000001") == GOOD
    clock.advance(WINDOW_S - 0.1)
    assert intake.handle(NORTH, b"000001") == b""
    assert [s[2] for s in scans(store.path)] == ["valid", "duplicate"]
    assert len(notifications(store.path)) == 1
    assert calls.queued == 1
    assert calls.scans == [("north-1", "valid"), ("north-1", "duplicate")]


def test_repeat_after_window_is_valid_without_new_notification(
    intake: Intake, store: Store, clock: FakeClock, calls: Calls
) -> None:
    """After the window the ticket is a valid scan again but Meetch hears of it once."""
    assert intake.handle(NORTH, b"000001") == GOOD
    clock.advance(1.0)
    assert intake.handle(NORTH, b"000001") == b""
    clock.advance(WINDOW_S)
    assert intake.handle(NORTH, b"000001") == GOOD
    assert [s[2] for s in scans(store.path)] == ["valid", "duplicate", "valid"]
    assert notifications(store.path) == [("000001", "north-1", "pending")]
    assert calls.queued == 1


def test_same_ticket_on_another_scanner_is_not_a_duplicate(
    intake: Intake, store: Store, calls: Calls
) -> None:
    """The window is per scanner: another scanner's read is valid (one notification still)."""
    assert intake.handle(NORTH, b"000001") == GOOD
    assert intake.handle(SOUTH, b"000001") == GOOD
    assert scans(store.path) == [
        ("north-1", "000001", "valid", None),
        ("south-1", "000001", "valid", None),
    ]
    assert notifications(store.path) == [("000001", "north-1", "pending")]
    assert calls.queued == 1


def test_invalid_frame_is_recorded_with_its_reason(
    intake: Intake, store: Store, calls: Calls
) -> None:
    """An invalid frame is recorded as invalid with why, answered bad_read, never notified."""
    assert intake.handle(NORTH, b"\x1b[A000012") == BAD
    assert intake.handle(NORTH, b"\xff\xfe000010") == BAD
    assert scans(store.path) == [
        ("north-1", None, "invalid", "control_character"),
        ("north-1", None, "invalid", "not_utf8"),
    ]
    assert committed(store.path, "SELECT raw_hex FROM scans ORDER BY id") == [
        ("1b5b41303030303132",),
        ("fffe303030303130",),
    ]
    assert notifications(store.path) == []
    assert calls.queued == 0
    assert calls.scans == [("north-1", "invalid"), ("north-1", "invalid")]


def test_refunded_ticket_gets_bad_read_and_is_still_notified(
    intake: Intake, store: Store, calls: Calls
) -> None:
    """A ticket Meetch lists as refunded is recorded as refunded, bad_read, and notified."""
    store.add_refunds([("000002", "2026-01-01T00:00:00+00:00")])
    assert intake.handle(NORTH, b"]C0000002") == BAD
    assert scans(store.path) == [("north-1", "000002", "refunded", None)]
    assert notifications(store.path) == [("000002", "north-1", "pending")]
    assert calls.queued == 1
    assert calls.committed_at_queue == [(1, 1)]
    assert calls.scans == [("north-1", "refunded")]
    assert store.scan_counts()["refunded"] == 1


def test_on_queued_only_when_a_notification_is_created(
    intake: Intake, store: Store, clock: FakeClock, calls: Calls
) -> None:
    """on_queued wakes the sender for new notifications only."""
    intake.handle(NORTH, b"000001")
    intake.handle(NORTH, b"000001")
    intake.handle(NORTH, b"")
    intake.handle(SOUTH, b"000001")
    clock.advance(WINDOW_S + 1)
    intake.handle(NORTH, b"000001")
    assert calls.queued == 1
    intake.handle(NORTH, b"000003")
    assert calls.queued == 2
    assert len(notifications(store.path)) == 2


def test_failed_commit_is_held_unacknowledged_then_written_in_order(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A scan the database refuses gets no feedback, is held, and is written first later."""
    store = FailingOnceStore(tmp_path / "queue.sqlite3", device_id="test-box")
    queued: list[int] = []
    try:
        intake = Intake(store, Dedupe(WINDOW_S, now=clock), on_queued=lambda: queued.append(1))
        store.fail_next = True
        assert intake.handle(NORTH, b"000001") == b""  # not durable: not acknowledged
        assert intake.health.state == "degraded"
        assert intake.health.held == 1
        # While anything is held, later scans queue behind it, unacknowledged too.
        assert intake.handle(SOUTH, b"000002") == b""
        assert scans(store.path) == []
        assert intake.retry_held() == 0
        assert intake.health.state == "ok"
        assert scans(store.path) == [
            ("north-1", "000001", "valid", None),
            ("south-1", "000002", "valid", None),
        ]
        assert len(queued) == 2
        assert intake.handle(NORTH, b"000003") == GOOD
    finally:
        store.close()


def test_memory_buffer_full_counts_what_it_could_not_keep(tmp_path: Path, clock: FakeClock) -> None:
    """Past max_held, scans are dropped, counted, and a rescan counts as a first read."""
    store = FailingOnceStore(tmp_path / "queue.sqlite3", device_id="test-box")
    try:
        intake = Intake(store, Dedupe(WINDOW_S, now=clock), max_held=2)
        store.fail_next = True
        for ticket in (b"A1", b"A2", b"A3", b"A4"):
            intake.handle(NORTH, ticket)
        assert intake.health.held == 2
        assert intake.health.dropped == 2
        assert intake.retry_held() == 0
        assert [t for _, t, _, _ in scans(store.path)] == ["A1", "A2"]
        assert intake.health.dropped == 2  # still reported after recovery
        assert intake.handle(NORTH, b"A3") == GOOD  # dropped, so not a duplicate
    finally:
        store.close()


def test_dedupe_window_is_per_scanner_and_ticket(clock: FakeClock) -> None:
    """Dedupe: repeats inside the window only, keyed by scanner and ticket."""
    dedupe = Dedupe(WINDOW_S, now=clock)
    assert not dedupe.is_repeat("north-1", "000001")
    assert dedupe.is_repeat("north-1", "000001")
    assert not dedupe.is_repeat("north-1", "000002")
    assert not dedupe.is_repeat("south-1", "000001")
    clock.advance(WINDOW_S)
    assert not dedupe.is_repeat("north-1", "000001")
    assert not Dedupe(0.0, now=clock).is_repeat("north-1", "000001")
