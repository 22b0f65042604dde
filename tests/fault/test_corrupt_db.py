"""A corrupt or truncated queue database at start: moved aside (never deleted), a fresh one
opened, readable notifications salvaged, a loud alarm; the daemon does not crash-loop."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.salvage import open_or_salvage
from agent.store import Store
from hardware_mocks.meetch_sim import SimulatedMeetch
from tests.conftest import AgentProcess, ConfigWriter, cli, wait_until
from tests.fault.conftest import Record

AT = "2026-02-20T19:42:07.120+01:00"
PAGE = 4096


def queue_with(path: Path, pending: int, delivered: int) -> dict[str, str]:
    """A queue with pending and delivered notifications; returns ticket -> scan id."""
    store = Store(path, device_id="box")
    ids = {}
    try:
        for i in range(pending + delivered):
            ids[f"T{i:06d}"] = store.record_scan("north-1", f"T{i:06d}", "valid", AT).scan_id
        for item in store.claim("test", delivered, 60):
            store.finish(item.scan_id, "test", "delivered", http_status=201, delivered_at=AT)
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        store.close()
    return ids


def scribble(path: Path, every: int = 4) -> None:
    """Overwrite the middle of some pages, leaving page 1 (the schema) alone."""
    data = bytearray(path.read_bytes())
    for n in range(3, len(data) // PAGE - 1, every):
        data[n * PAGE + 50 : n * PAGE + 600] = b"\xa5" * 550
    path.write_bytes(bytes(data))


def asides(path: Path) -> list[Path]:
    """The moved-aside copies of a queue file."""
    return sorted(p for p in path.parent.iterdir() if ".corrupt-" in p.name)


def test_damaged_pages_are_moved_aside_and_readable_rows_salvaged(
    tmp_path: Path, figures: Record
) -> None:
    """Pages scribbled over: the file is kept aside, readable notifications come back."""
    path = tmp_path / "queue.sqlite3"
    ids = queue_with(path, pending=1500, delivered=500)
    original = path.read_bytes()
    scribble(path)
    when = datetime(2026, 12, 4, 21, 30, tzinfo=UTC)
    store, report = open_or_salvage(path, device_id="box", wall=lambda: when)
    try:
        assert report is not None
        assert report.moved_to.name == "queue.sqlite3.corrupt-20261204T213000Z"
        assert report.moved_to.stat().st_size == len(original)  # kept whole, never deleted
        assert store.integrity_check() == "ok"
        salvaged = {n.ticket: n for n in store.notifications()}
        assert 0 < len(salvaged) <= len(ids)
        assert report.salvaged == len(salvaged)
        for ticket, n in salvaged.items():
            assert n.scan_id == ids[ticket]  # the same idempotency key: no second scan id
        assert {n.state for n in salvaged.values()} <= {"pending", "delivered"}
        alarm = store.get_meta("alarms")[0]
        assert alarm["kind"] == "database_salvaged"
        assert str(report.salvaged) in alarm["detail"]
        figures("corrupt_databases_salvaged", 1)
        figures("corrupt_notifications_salvaged", report.salvaged)
    finally:
        store.close()


@pytest.mark.parametrize(
    "damage",
    ["header", "truncated", "zeroed-tail", "garbage"],
)
def test_every_kind_of_damage_gives_a_working_queue(
    tmp_path: Path, damage: str, figures: Record
) -> None:
    """A garbage header, a truncated file, a zeroed tail, pure garbage: never a crash."""
    path = tmp_path / "queue.sqlite3"
    queue_with(path, pending=800, delivered=0)
    data = bytearray(path.read_bytes())
    if damage == "header":
        data[:100] = b"\xff" * 100
    elif damage == "truncated":
        data = data[: len(data) // 2 + 123]
    elif damage == "zeroed-tail":
        data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
    else:
        data = bytearray(b"not sqlite at all " * 500)
    path.write_bytes(bytes(data))
    store, report = open_or_salvage(path, device_id="box")
    try:
        assert report is not None, damage
        assert report.moved_to in asides(path)
        assert {p.name.removeprefix(report.moved_to.name) for p in asides(path)} <= {
            "",
            "-wal",
            "-shm",
        }
        assert store.integrity_check() == "ok"
        store.record_scan("north-1", "AFTER", "valid", AT)  # the fresh queue takes scans
        assert store.notification_for("AFTER") is not None
        figures("corrupt_databases_salvaged", 1)
    finally:
        store.close()


def test_a_sound_database_is_left_alone(tmp_path: Path) -> None:
    """A healthy queue is opened as it is: nothing moved, no alarm."""
    path = tmp_path / "queue.sqlite3"
    queue_with(path, pending=10, delivered=5)
    store, report = open_or_salvage(path, device_id="box")
    try:
        assert report is None
        assert asides(path) == []
        assert store.queue_counts()["pending"] == 10
        assert store.get_meta("alarms") is None
    finally:
        store.close()


def test_a_newer_schema_is_not_mistaken_for_damage(tmp_path: Path) -> None:
    """A database from a newer agent is refused, never moved aside."""
    path = tmp_path / "queue.sqlite3"
    queue_with(path, pending=1, delivered=0)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(Exception, match="newer than this agent"):
        open_or_salvage(path, device_id="box")
    assert asides(path) == []


def running(config: Path) -> bool:
    """True once status (which may fail while the file is still damaged) sees the daemon."""
    result = cli("status", "--json", "--config", str(config))
    return result.returncode == 0 and bool(json.loads(result.stdout)["daemon"]["running"])


def test_daemon_salvages_delivers_and_shows_the_alarm(
    config_writer: ConfigWriter,
    meetch: SimulatedMeetch,
    start_agent: Callable[..., AgentProcess],
) -> None:
    """Started on a damaged queue: the daemon salvages, delivers what was pending, and both
    status and the log raise the alarm."""
    path = config_writer.write()
    db = config_writer.root / "state" / "queue.sqlite3"
    db.parent.mkdir(mode=0o700)
    queue_with(db, pending=1200, delivered=0)
    scribble(db, every=6)
    agent = start_agent(path)
    wait_until(lambda: asides(db), 15)  # salvage happens first thing at start
    wait_until(lambda: running(path), 15)
    store = None

    def salvaged_delivered() -> bool:
        nonlocal store
        if store is None:
            store = Store(db, device_id="reader")
        counts = store.queue_counts()
        return counts["pending"] == 0 and counts["delivered"] > 0

    try:
        wait_until(salvaged_delivered, 30)
        assert store is not None
        delivered = {n.ticket for n in store.notifications(state="delivered", limit=100_000)}
    finally:
        if store is not None:
            store.close()
    assert delivered == set(meetch.flagged)
    report = json.loads(cli("status", "--json", "--config", str(path)).stdout)
    assert report["alarms"][0]["kind"] == "database_salvaged"
    human = cli("status", "--config", str(path)).stdout
    assert "ALARM" in human
    doctor = json.loads(cli("doctor", "--json", "--config", str(path)).stdout)
    assert {c["name"]: c["status"] for c in doctor["checks"]}["queue_writes"] == "warn"
    assert agent.stop() == 0
    assert "database_salvaged" in agent.output()
    assert len(asides(db)) >= 1
