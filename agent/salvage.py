"""A corrupt or truncated queue database at start: move it aside, start afresh, salvage.

The damaged file is never deleted: it is renamed ``queue.sqlite3.corrupt-<UTC time>`` (with
its WAL and shared-memory files) for later forensics. Every notification that can still be
read is copied into the fresh database with its scan id and state, so pending ones are
still delivered and delivered ones are still known (a rescan then creates no second
notification). A loud alarm goes to the logs and to ``status``.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from agent.errors import DataError, StoreError
from agent.status import ALARMS_KEY
from agent.store import EXPORT_FIELDS, Store
from agent.transfer import validate_row

log = structlog.get_logger("agent.salvage")

CHUNK = 200


@dataclass(frozen=True)
class Salvage:
    """What happened to a damaged database."""

    moved_to: Path
    reason: str
    salvaged: int
    pending: int
    unreadable: int


def open_or_salvage(
    path: Path, *, device_id: str, wall: Callable[[], datetime] = lambda: datetime.now(UTC)
) -> tuple[Store, Salvage | None]:
    """Open the queue for the daemon; a damaged one is moved aside and salvaged."""
    reason = _damage(path, device_id)
    if reason is None:
        return Store(path, device_id=device_id), None
    stamp = wall().strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        source = path.with_name(path.name + suffix)
        if source.exists():
            source.rename(aside.with_name(aside.name + suffix))
    store = Store(path, device_id=device_id)
    rows, unreadable = _readable_notifications(aside)
    added, _ = store.import_rows(rows)
    report = Salvage(aside, reason, added, sum(r["state"] == "pending" for r in rows), unreadable)
    alarm = {
        "kind": "database_salvaged",
        "at": wall().isoformat(timespec="seconds"),
        "detail": (
            f"queue database was damaged ({reason}); moved to {aside.name}, "
            f"{added} notifications salvaged ({report.pending} pending), "
            f"{unreadable} unreadable"
        ),
        "moved_to": str(aside),
    }
    store.set_meta(ALARMS_KEY, [*(store.get_meta(ALARMS_KEY) or []), alarm])
    log.critical("database_salvaged", **{k: v for k, v in alarm.items() if k != "kind"})
    return store, report


def _damage(path: Path, device_id: str) -> str | None:
    """Why the database is unusable, or None when it is sound (or does not exist yet)."""
    if not path.exists():
        return None
    try:
        store = Store(path, device_id=device_id)
    except StoreError as exc:
        cause = exc.__cause__
        damaged = isinstance(cause, sqlite3.DatabaseError) and (
            not isinstance(cause, sqlite3.OperationalError) or "malformed" in str(cause)
        )
        if not damaged:
            # A newer agent's schema, permissions, a lock: a person must act, and nothing
            # may be moved aside for it.
            raise
        return str(cause)
    try:
        verdict = store.quick_check()
    except sqlite3.DatabaseError as exc:  # so damaged the check itself cannot run
        verdict = str(exc)
    finally:
        store.close()
    return None if verdict == "ok" else f"integrity check: {verdict[:200]}"


def _readable_notifications(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Every notification row that can still be read and is well formed."""
    rows: list[dict[str, Any]] = []
    unreadable = 0
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return rows, 0
    with contextlib.closing(conn):
        for item in _rows(conn):
            if item is None:
                unreadable += 1
                continue
            try:
                rows.append(validate_row(item))
            except DataError:
                unreadable += 1
    # One notification per ticket survives, the oldest (as in the original table).
    seen: set[str] = set()
    unique = []
    for row in rows:
        if row["ticket"] not in seen:
            seen.add(row["ticket"])
            unique.append(row)
    return unique, unreadable


def _rows(conn: sqlite3.Connection) -> Iterator[dict[str, Any] | None]:
    """Rows by id range; a range that fails is retried row by row, a failing row is None."""
    cols = ", ".join(f for f in EXPORT_FIELDS if f != "clock_synced")
    try:
        top = conn.execute("SELECT max(id) FROM notifications").fetchone()[0] or 0
    except sqlite3.Error:
        top = 0
        with contextlib.suppress(sqlite3.Error):
            # The index is damaged, maybe not the table: walk it to find the end.
            for (rowid,) in conn.execute("SELECT rowid FROM notifications"):
                top = max(top, rowid)
    names = cols.split(", ")
    for start in range(1, top + 1, CHUNK):
        sql = f"SELECT {cols} FROM notifications WHERE id BETWEEN ? AND ? ORDER BY id"  # noqa: S608
        try:
            fetched = conn.execute(sql, (start, start + CHUNK - 1)).fetchall()
        except sqlite3.Error:
            fetched = None
        if fetched is not None:
            for row in fetched:
                yield dict(zip(names, row, strict=True))
            continue
        for rowid in range(start, start + CHUNK):
            try:
                one = conn.execute(
                    f"SELECT {cols} FROM notifications WHERE id = ?",  # noqa: S608
                    (rowid,),
                ).fetchone()
            except sqlite3.Error:
                yield None
                continue
            if one is not None:
                yield dict(zip(names, one, strict=True))
