"""The SQLite queue: durability settings, scan semantics, leases and migrations."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from agent.errors import StoreError
from agent.store import MIGRATIONS, Store

AT = "2026-02-20T19:42:07.120+01:00"


def test_files_are_private_and_durable(store: Store) -> None:
    """State directory 0700, database 0600, WAL journal, synchronous=FULL, schema versioned."""
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    conn = store.db.conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    assert store.integrity_check() == "ok"


def test_first_valid_scan_creates_the_only_notification(store: Store) -> None:
    """Later scans of a ticket are recorded but never create a second notification."""
    first = store.record_scan("north-1", "000001", "valid", AT)
    again = store.record_scan("south-1", "000001", "valid", AT)
    assert first.notification_created
    assert not again.notification_created
    (notification,) = store.notifications()
    assert notification.scan_id == first.scan_id
    assert notification.state == "pending"
    assert notification.device_id == "test-box"
    assert store.scan_counts() == {"valid": 2, "duplicate": 0, "invalid": 0, "refunded": 0}


def test_duplicates_and_invalid_frames_are_recorded_not_queued(store: Store) -> None:
    """Duplicates and invalid frames are counted in scans, never notified."""
    store.record_scan("north-1", "000001", "duplicate", AT)
    store.record_scan("north-1", None, "invalid", AT, reason="not_utf8", raw=b"\xff\xfe")
    assert store.notifications() == []
    assert store.scan_counts() == {"valid": 0, "duplicate": 1, "invalid": 1, "refunded": 0}
    row = store.db.conn.execute("SELECT reason, raw_hex FROM scans WHERE outcome='invalid'")
    assert row.fetchone() == ("not_utf8", "fffe")


def test_refunded_ticket_is_recorded_as_refunded_and_still_notified(store: Store) -> None:
    """A scan of a refunded ticket counts as refunded and still creates its notification."""
    assert store.add_refunds([("000002", "2026-02-19T10:00:00+00:00")]) == 1
    assert store.add_refunds([("000002", "2026-02-19T10:00:00+00:00")]) == 0
    recorded = store.record_scan("north-1", "000002", "valid", AT)
    assert recorded.outcome == "refunded"
    assert recorded.notification_created
    assert store.scan_counts()["refunded"] == 1


def test_claim_oldest_first_and_leases_exclude_other_senders(tmp_path: Path) -> None:
    """Two senders on the same file never hold the same notification; oldest go first."""
    path = tmp_path / "state" / "queue.sqlite3"
    daemon, flush = Store(path, device_id="box"), Store(path, device_id="box")
    try:
        for i in range(6):
            daemon.record_scan("north-1", f"T{i}", "valid", AT)
        first = daemon.claim("daemon", 4, lease_s=60)
        second = flush.claim("flush", 4, lease_s=60)
        assert [n.ticket for n in first] == ["T0", "T1", "T2", "T3"]
        assert [n.ticket for n in second] == ["T4", "T5"]
        # the daemon restarted: its own leases are its again
        assert [n.ticket for n in daemon.claim("daemon", 10, lease_s=60)] == [
            "T0",
            "T1",
            "T2",
            "T3",
        ]
        # skip leaves out what the caller is already sending
        assert [n.ticket for n in daemon.claim("daemon", 2, 60, frozenset({first[0].scan_id}))] == [
            "T1",
            "T2",
        ]
    finally:
        daemon.close()
        flush.close()


def test_expired_lease_is_taken_over(tmp_path: Path) -> None:
    """A crashed holder's lease expires and another sender takes the item."""
    clock = [1000.0]
    path = tmp_path / "q.sqlite3"
    a = Store(path, device_id="box", wall=lambda: clock[0])
    b = Store(path, device_id="box", wall=lambda: clock[0])
    try:
        a.record_scan("north-1", "T0", "valid", AT)
        assert len(a.claim("a", 1, lease_s=30)) == 1
        assert b.claim("b", 1, lease_s=30) == []
        clock[0] += 31
        assert [n.ticket for n in b.claim("b", 1, lease_s=30)] == ["T0"]
    finally:
        a.close()
        b.close()


def test_finish_retry_and_release(store: Store) -> None:
    """Final states keep status and error; retries count attempts; release counts none."""
    for ticket in ("D", "U", "R", "P"):
        store.record_scan("north-1", ticket, "valid", AT)
    items = {n.ticket: n for n in store.claim("me", 10, lease_s=60)}
    assert store.finish(
        items["D"].scan_id,
        "me",
        "delivered",
        http_status=201,
        delivered_at="2026-02-20T19:42:08.000+01:00",
    )
    store.finish(items["U"].scan_id, "me", "unknown", http_status=404, error="HTTP 404")
    store.finish(items["R"].scan_id, "me", "rejected", http_status=422, error="HTTP 422: bad")
    store.retry_later(items["P"].scan_id, "me", "timeout")
    by_ticket = {n.ticket: n for n in store.notifications()}
    assert by_ticket["D"].state == "delivered"
    assert by_ticket["U"].state == "unknown"
    assert by_ticket["R"].last_error == "HTTP 422: bad"
    assert by_ticket["R"].http_status == 422
    assert by_ticket["P"].state == "pending"
    assert by_ticket["P"].attempts == 1
    assert store.get_meta("last_delivery_at") == "2026-02-20T19:42:08.000+01:00"
    (again,) = store.claim("me", 10, lease_s=60)
    store.release(again.scan_id, "me")
    assert store.notification_for("P").attempts == 1  # type: ignore[union-attr]
    assert store.queue_counts() == {"pending": 1, "delivered": 1, "unknown": 1, "rejected": 1}


def test_finish_by_a_sender_that_lost_its_lease_changes_nothing(store: Store) -> None:
    """Once another sender delivered an item, a late answer cannot overwrite it."""
    store.record_scan("north-1", "T0", "valid", AT)
    (item,) = store.claim("a", 1, lease_s=60)
    assert store.finish(item.scan_id, "a", "delivered", http_status=200)
    assert not store.finish(item.scan_id, "b", "rejected", http_status=422)
    assert store.notifications()[0].state == "delivered"


def test_notifications_newest_first_with_filters(store: Store) -> None:
    """notifications() lists newest first, by state, with a limit."""
    for i in range(5):
        store.record_scan("north-1", f"T{i}", "valid", AT)
    assert [n.ticket for n in store.notifications(limit=2)] == ["T4", "T3"]
    assert store.notifications(state="delivered") == []


def test_state_survives_reopen(tmp_path: Path) -> None:
    """Everything committed is there after closing and reopening the file."""
    path = tmp_path / "q.sqlite3"
    s = Store(path, device_id="box")
    s.record_scan("north-1", "T0", "valid", AT)
    s.set_scanner_state("north-1", "/dev/ttyACM0", connected=True)
    s.close()
    s = Store(path, device_id="box")
    try:
        assert s.queue_counts()["pending"] == 1
        assert s.scanner_states()["north-1"]["connected"] == 1
    finally:
        s.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A database from a newer agent is refused with a clear StoreError, not altered."""
    path = tmp_path / "q.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this agent"):
        Store(path, device_id="box")


def test_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    """A file that is not SQLite gives a StoreError naming the file."""
    path = tmp_path / "q.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=str(path)):
        Store(path, device_id="box")


def test_open_existing_never_creates(tmp_path: Path) -> None:
    """CLI commands do not create the database (that is the daemon's job)."""
    path = tmp_path / "state" / "queue.sqlite3"
    assert Store.open_existing(path, device_id="box") is None
    assert not path.parent.exists()


def test_a_loose_state_directory_is_tightened(tmp_path: Path) -> None:
    """A state directory made by hand with mode 0755 becomes 0700 when the queue opens."""
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    Store(state / "queue.sqlite3", device_id="box").close()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
