"""Clock jumps: ordering and backoff run on a monotonic clock and a sequence; scanned_at
keeps the wall time; each scan records whether the clock was synchronised."""

from __future__ import annotations

import random
import sqlite3
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path

from agent.clock import CachedClockState, system_clock_synchronised
from agent.config import MeetchSettings, ScannerSettings
from agent.intake import Dedupe, Intake
from agent.meetch import MeetchClient
from agent.sender import Backoff
from agent.store import Store
from hardware_mocks.meetch_sim import SimulatedMeetch
from tests.conftest import API_KEY, make_sender, sender_running, wait_until

NORTH = ScannerSettings(name="north-1", port="/dev/ttyACM0", good_read=b"G")
TZ = timezone(timedelta(hours=1))


class JumpingWall:
    """A wall clock a test sets back and forth, as NTP stepping or a dead RTC battery does."""

    def __init__(self) -> None:
        self.now = datetime(2026, 2, 20, 19, 0, tzinfo=TZ)

    def __call__(self) -> datetime:
        return self.now


def test_wall_clock_jumps_do_not_reorder_delivery(tmp_path: Path, meetch: SimulatedMeetch) -> None:
    """Scans taken across a backwards jump are sent in the order they were read."""
    wall = JumpingWall()
    store = Store(tmp_path / "queue.sqlite3", device_id="box")
    intake = Intake(store, Dedupe(5.0), wall=wall, clock_synced=lambda: False)
    order = []
    for i, jump in enumerate([0, -3600, +7200, -86400 * 30, +60]):
        wall.now += timedelta(seconds=jump)
        ticket = f"J{i}"
        intake.handle(NORTH, ticket.encode())
        order.append(ticket)
    client = MeetchClient(MeetchSettings(base_url=meetch.base_url, max_in_flight=1), API_KEY)
    try:
        with sender_running(make_sender(store, client, max_in_flight=1)):
            wait_until(lambda: len(meetch.flagged) == len(order))
    finally:
        client.close()
    assert [r.json["number"] for r in meetch.scan_requests] == order
    sent_times = [r.json["scanned_at"] for r in meetch.scan_requests]
    assert sent_times[1] < sent_times[0]  # the wall time is kept as it was read
    store.close()


def test_dedupe_window_ignores_wall_clock_jumps(tmp_path: Path) -> None:
    """A wall clock stepped back an hour does not turn a repeat into a new scan, nor the
    reverse: the window runs on the monotonic clock."""
    store = Store(tmp_path / "queue.sqlite3", device_id="box")
    mono = [100.0]
    wall = JumpingWall()
    intake = Intake(store, Dedupe(5.0, now=lambda: mono[0]), wall=wall)
    assert intake.handle(NORTH, b"T1") == b"G"
    wall.now -= timedelta(hours=1)
    mono[0] += 1
    assert intake.handle(NORTH, b"T1") == b""  # still a repeat
    wall.now += timedelta(hours=5)
    mono[0] += 1
    assert intake.handle(NORTH, b"T1") == b""
    mono[0] += 10
    assert intake.handle(NORTH, b"T1") == b"G"
    store.close()


def test_each_scan_records_whether_the_clock_was_synchronised(tmp_path: Path) -> None:
    """clock_synced is stored with every scan and notification, and exported."""
    store = Store(tmp_path / "queue.sqlite3", device_id="box")
    state = [True]
    intake = Intake(store, Dedupe(5.0), clock_synced=lambda: state[0])
    intake.handle(NORTH, b"SYNCED")
    state[0] = False
    intake.handle(NORTH, b"UNSYNCED")
    intake.handle(NORTH, b"\x00bad")
    with closing(sqlite3.connect(store.path)) as conn:
        rows = conn.execute("SELECT ticket, clock_synced FROM scans ORDER BY id").fetchall()
    assert rows == [("SYNCED", 1), ("UNSYNCED", 0), (None, 0)]
    exported = {r["ticket"]: r["clock_synced"] for r in store.export_rows()}
    assert exported == {"SYNCED": 1, "UNSYNCED": 0}
    store.close()


def test_backoff_runs_on_the_monotonic_clock(tmp_path: Path, meetch: SimulatedMeetch) -> None:
    """The sender's waits use the clock it is given (monotonic), never the wall clock."""
    mono = [1000.0]
    store = Store(tmp_path / "queue.sqlite3", device_id="box")
    store.record_scan("north-1", "B1", "valid", "2026-02-20T19:00:00+01:00")
    meetch.go_offline()
    client = MeetchClient(MeetchSettings(base_url=meetch.base_url, timeout_s=1), API_KEY)
    sender = make_sender(
        store,
        client,
        max_in_flight=1,
        backoff=Backoff(30.0, 60.0, random.Random(1)),
        now=lambda: mono[0],
    )
    try:
        with sender_running(sender):
            wait_until(lambda: store.notification_for("B1").attempts == 1)  # type: ignore[union-attr]
            meetch.go_online()
            # Real time passes but the given clock does not: the 15 s+ backoff holds.
            assert not meetch.wait_for(lambda: "B1" in meetch.flagged, 1.0)
            mono[0] += 61  # the monotonic clock moves on: the retry goes out
            sender.wake()
            wait_until(lambda: "B1" in meetch.flagged)
    finally:
        client.close()
    store.close()


def test_clock_state_is_cached_and_real() -> None:
    """The kernel's answer is a bool or None, and the cached reader asks it rarely."""
    assert system_clock_synchronised() in (True, False, None)
    cached = CachedClockState(max_age_s=3600)
    first = cached()
    assert cached() is first
