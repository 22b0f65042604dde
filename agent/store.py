"""The SQLite queue: schema, migrations and state transitions (CONTRACT §3).

One file, ``<state_dir>/queue.sqlite3``, in WAL mode with ``synchronous=FULL`` so that a
committed scan survives a power cut. Every write is one ``BEGIN IMMEDIATE`` transaction,
so the daemon and a technician's CLI can share the file. Notification states::

    pending ──► delivered        (2xx, 409)
       │  ╲───► unknown          (404: Meetch does not know the ticket)
       │   ╲──► rejected         (other 4xx, with status and body kept)
       └── retried: attempts + 1, stays pending

Only ``purge`` of old ``delivered`` rows ever deletes anything.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from agent.errors import StoreError

STATES = ("pending", "delivered", "unknown", "rejected")
EXPORT_FIELDS = (
    "scan_id",
    "ticket",
    "state",
    "scanner",
    "device_id",
    "scanned_at",
    "attempts",
    "last_error",
    "http_status",
    "delivered_at",
    "clock_synced",
)
"""What ``queue export`` writes for each notification, in this order."""
OUTCOMES = ("valid", "duplicate", "invalid", "refunded")
BUSY_TIMEOUT_MS = 10_000


def _v1(db: sqlite_utils.Database) -> None:
    db.execute(
        """CREATE TABLE scans (
            id INTEGER PRIMARY KEY,          -- arrival order, independent of the wall clock
            scan_id TEXT NOT NULL UNIQUE,
            scanner TEXT NOT NULL,
            ticket TEXT,                     -- NULL for an invalid frame
            outcome TEXT NOT NULL CHECK (outcome IN ('valid','duplicate','invalid','refunded')),
            reason TEXT,                     -- why a frame was invalid
            raw_hex TEXT,                    -- the start of an invalid frame, for diagnosis
            scanned_at TEXT NOT NULL         -- RFC 3339 wall time with offset
        )"""
    )
    db.execute("CREATE INDEX scans_ticket ON scans (ticket)")
    db.execute(
        """CREATE TABLE notifications (
            id INTEGER PRIMARY KEY,          -- delivery order: oldest first
            scan_id TEXT NOT NULL UNIQUE,    -- the idempotency key, the first valid scan's id
            ticket TEXT NOT NULL UNIQUE,     -- one notification per ticket, ever
            scanner TEXT NOT NULL,
            device_id TEXT NOT NULL,
            scanned_at TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending','delivered','unknown','rejected')),
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            http_status INTEGER,
            lease_owner TEXT,                -- the sender holding it while a request is in flight
            lease_until REAL,                -- epoch seconds; an expired lease is free again
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            delivered_at TEXT
        )"""
    )
    db.execute("CREATE INDEX notifications_state ON notifications (state, id)")
    db.execute("CREATE TABLE refunds (number TEXT PRIMARY KEY, refunded_at TEXT NOT NULL)")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute(
        """CREATE TABLE scanner_status (
            name TEXT PRIMARY KEY,
            port TEXT NOT NULL,
            connected INTEGER NOT NULL,
            last_error TEXT,
            last_scan_at TEXT,
            updated_at REAL NOT NULL
        )"""
    )


def _v2(db: sqlite_utils.Database) -> None:
    # Scan times are evidence: remember whether the clock was synchronised (NULL: unknown).
    db.execute("ALTER TABLE scans ADD COLUMN clock_synced INTEGER")
    db.execute("ALTER TABLE notifications ADD COLUMN clock_synced INTEGER")


MIGRATIONS: Sequence[Callable[[sqlite_utils.Database], None]] = (_v1, _v2)
"""Migration N takes ``PRAGMA user_version`` from N to N+1; never edit a released one."""


class StoreWriteError(StoreError):
    """A write could not be committed; ``disk_full`` when SQLite or the disk ran out of room."""

    def __init__(self, path: Path, exc: sqlite3.Error) -> None:
        text = str(exc)
        self.disk_full = (
            "full" in text or getattr(exc, "sqlite_errorcode", 0) == sqlite3.SQLITE_FULL
        )
        super().__init__(f"queue database {path}: cannot commit: {text}")


@dataclass(frozen=True)
class Notification:
    """One ticket's notification to Meetch."""

    scan_id: str
    ticket: str
    scanner: str
    device_id: str
    scanned_at: str
    state: str
    attempts: int
    last_error: str | None
    http_status: int | None = None
    delivered_at: str | None = None


@dataclass(frozen=True)
class Recorded:
    """What became of a scan once committed."""

    scan_id: str
    outcome: str
    notification_created: bool


class Store:
    """The queue database. Thread-safe: one connection behind a lock."""

    def __init__(self, path: Path, *, device_id: str, wall: Callable[[], float] = time.time):
        self.path = path
        self.device_id = device_id
        self._wall = wall
        self._lock = threading.RLock()
        conn: sqlite3.Connection | None = None
        try:
            _prepare_files(path)
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
            self.db = sqlite_utils.Database(conn, execute_plugins=False)
            self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self.db.query("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = FULL")
            self._migrate()
            _match_owner(path)
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, OSError):
                raise StoreError(
                    f"queue database {path}: {exc.strerror or exc} (run as the agent's user, "
                    "e.g. sudo -u meetch-gate, or check state_dir)"
                ) from exc
            if not isinstance(exc, sqlite3.DatabaseError):
                raise
            raise StoreError(
                f"queue database {path}: {exc} (a damaged queue is moved aside and salvaged "
                "when the agent starts: systemctl restart meetch-gate)"
            ) from exc

    @classmethod
    def open_existing(cls, path: Path, *, device_id: str) -> Store | None:
        """Open the queue for a CLI command; None when there is no database yet.

        A technician's command never creates the state directory or the database: that is
        the daemon's, under its own user.
        """
        if not path.exists():
            return None
        return cls(path, device_id=device_id)

    # -- lifecycle --------------------------------------------------------------------

    def _migrate(self) -> None:
        # Read first: a current database needs no write at all, so status and export still
        # open it when the disk is full.
        if int(self.db.execute("PRAGMA user_version").fetchone()[0]) == len(MIGRATIONS):
            return
        with self._write():
            version = int(self.db.execute("PRAGMA user_version").fetchone()[0])
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"queue database {self.path} has schema {version}, newer than this agent "
                    f"({len(MIGRATIONS)}): upgrade meetch-gate-agent"
                )
            for step in MIGRATIONS[version:]:
                step(self.db)
            self.db.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self.db.close()

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction, taken up front so two processes never deadlock upgrading."""
        with self._lock:
            conn = self.db.conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StoreWriteError(self.path, exc) from exc

    def _rows(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.db.query(sql, params))

    # -- scans ------------------------------------------------------------------------

    def record_scan(
        self,
        scanner: str,
        ticket: str | None,
        outcome: str,
        scanned_at: str,
        *,
        reason: str | None = None,
        raw: bytes | None = None,
        clock_synced: bool | None = None,
    ) -> Recorded:
        """Commit one scan; the first valid scan of a ticket creates its notification.

        ``outcome`` is ``valid``, ``duplicate`` or ``invalid`` as the caller saw it; a valid
        scan of a ticket Meetch lists as refunded is recorded as ``refunded``.
        """
        if outcome not in ("valid", "duplicate", "invalid"):
            raise ValueError(f"unknown outcome {outcome!r}")
        scan_id = str(uuid.uuid4())
        created = False
        now = self._wall()
        with self._write():
            if outcome == "valid" and self._is_refunded(ticket):
                outcome = "refunded"
            synced = None if clock_synced is None else int(clock_synced)
            self.db.execute(
                "INSERT INTO scans (scan_id, scanner, ticket, outcome, reason, raw_hex, scanned_at,"
                " clock_synced) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    scan_id,
                    scanner,
                    ticket,
                    outcome,
                    reason,
                    raw[:64].hex() if raw else None,
                    scanned_at,
                    synced,
                ),
            )
            if outcome in ("valid", "refunded"):
                cursor = self.db.execute(
                    "INSERT OR IGNORE INTO notifications (scan_id, ticket, scanner, device_id,"
                    " scanned_at, clock_synced, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (scan_id, ticket, scanner, self.device_id, scanned_at, synced, now, now),
                )
                created = cursor.rowcount == 1
            if outcome != "invalid":
                self.db.execute(
                    "UPDATE scanner_status SET last_scan_at = ? WHERE name = ?",
                    (scanned_at, scanner),
                )
        return Recorded(scan_id, outcome, created)

    def _is_refunded(self, ticket: str | None) -> bool:
        row = self.db.execute("SELECT 1 FROM refunds WHERE number = ?", (ticket,)).fetchone()
        return row is not None

    def add_refunds(self, refunds: Sequence[tuple[str, str]]) -> int:
        """Remember tickets Meetch lists as refunded; returns how many were new."""
        with self._write():
            before = self.db.conn.total_changes
            self.db.conn.executemany(
                "INSERT OR IGNORE INTO refunds (number, refunded_at) VALUES (?, ?)", refunds
            )
            return self.db.conn.total_changes - before

    # -- delivery ---------------------------------------------------------------------

    def claim(
        self, owner: str, limit: int, lease_s: float, skip: set[str] | frozenset[str] = frozenset()
    ) -> list[Notification]:
        """Lease up to ``limit`` pending notifications, oldest first, for ``owner`` to send.

        A notification leased by another live sender is left alone; ``owner``'s own leases
        (a restarted daemon's) and expired ones are taken. ``skip`` holds the scan ids the
        caller is already sending or backing off.
        """
        now = self._wall()
        with self._write():
            cursor = self.db.execute(
                "SELECT * FROM notifications WHERE state = 'pending'"
                " AND (lease_owner IS NULL OR lease_owner = ? OR lease_until < ?)"
                " ORDER BY id LIMIT ?",
                (owner, now, limit + len(skip)),
            )
            names = [d[0] for d in cursor.description]
            rows = (dict(zip(names, r, strict=True)) for r in cursor.fetchall())
            picked = [n for n in rows if n["scan_id"] not in skip]
            picked = picked[:limit]
            self.db.conn.executemany(
                "UPDATE notifications SET lease_owner = ?, lease_until = ? WHERE scan_id = ?",
                [(owner, now + lease_s, n["scan_id"]) for n in picked],
            )
        return [_notification(n) for n in picked]

    def finish(
        self,
        scan_id: str,
        owner: str,
        state: str,
        *,
        http_status: int | None = None,
        error: str | None = None,
        delivered_at: str | None = None,
    ) -> bool:
        """Record a final answer (``delivered``, ``unknown``, ``rejected``) for a leased item.

        Returns False when ``owner`` no longer holds the lease and another sender finished it.
        """
        if state not in ("delivered", "unknown", "rejected"):
            raise ValueError(f"not a final state: {state!r}")
        with self._write():
            cursor = self.db.execute(
                "UPDATE notifications SET state = ?, attempts = attempts + 1, http_status = ?,"
                " last_error = ?, delivered_at = ?, lease_owner = NULL, lease_until = NULL,"
                " updated_at = ? WHERE scan_id = ? AND state = 'pending'"
                " AND (lease_owner IS NULL OR lease_owner = ?)",
                (state, http_status, error, delivered_at, self._wall(), scan_id, owner),
            )
            if cursor.rowcount and state == "delivered" and delivered_at:
                self._set_meta("last_delivery_at", delivered_at)
            return cursor.rowcount == 1

    def retry_later(
        self, scan_id: str, owner: str, error: str, http_status: int | None = None
    ) -> None:
        """Count a failed attempt, keep the item pending and give up the lease."""
        with self._write():
            self.db.execute(
                "UPDATE notifications SET attempts = attempts + 1, last_error = ?, http_status = ?,"
                " lease_owner = NULL, lease_until = NULL, updated_at = ?"
                " WHERE scan_id = ? AND state = 'pending' AND lease_owner = ?",
                (error, http_status, self._wall(), scan_id, owner),
            )

    def release(self, scan_id: str, owner: str) -> None:
        """Give up a lease without counting an attempt (sending was paused)."""
        with self._write():
            self.db.execute(
                "UPDATE notifications SET lease_owner = NULL, lease_until = NULL"
                " WHERE scan_id = ? AND lease_owner = ?",
                (scan_id, owner),
            )

    def notifications(
        self, state: str | None = None, limit: int | None = None
    ) -> list[Notification]:
        """Notifications, newest first."""
        sql = "SELECT * FROM notifications"
        params: list[Any] = []
        if state:
            sql += " WHERE state = ?"
            params.append(state)
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_notification(r) for r in self._rows(sql, params)]

    def notification_for(self, ticket: str) -> Notification | None:
        """The notification of ``ticket``, if any."""
        rows = self._rows("SELECT * FROM notifications WHERE ticket = ?", [ticket])
        return _notification(rows[0]) if rows else None

    # -- technician verbs -------------------------------------------------------------

    def export_rows(self) -> Iterator[dict[str, Any]]:
        """Every notification, oldest first, in the export format (EXPORT_FIELDS)."""
        cols = ", ".join(EXPORT_FIELDS)
        with self._lock:
            rows = self.db.conn.execute(f"SELECT {cols} FROM notifications ORDER BY id")  # noqa: S608
            names = [d[0] for d in rows.description]
            fetched = rows.fetchall()
        for row in fetched:
            yield dict(zip(names, row, strict=True))

    def import_rows(self, rows: Sequence[dict[str, Any]]) -> tuple[int, int]:
        """Merge validated export rows in one transaction; returns (added, already known).

        A row is already known when its scan id is here, or when its ticket is here under
        another scan id (Meetch hears about a ticket once).
        """
        now = self._wall()
        added = 0
        with self._write():
            for r in rows:
                cursor = self.db.execute(
                    "INSERT OR IGNORE INTO notifications (scan_id, ticket, scanner, device_id,"
                    " scanned_at, state, attempts, last_error, http_status, delivered_at,"
                    " clock_synced, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        r["scan_id"],
                        r["ticket"],
                        r["scanner"],
                        r["device_id"],
                        r["scanned_at"],
                        r["state"],
                        r["attempts"],
                        r["last_error"],
                        r["http_status"],
                        r["delivered_at"],
                        r.get("clock_synced"),
                        now,
                        now,
                    ),
                )
                added += cursor.rowcount
        return added, len(rows) - added

    def retry(self, *, state: str | None = None, tickets: Sequence[str] = ()) -> int:
        """Put ``unknown``/``rejected`` notifications (all of ``state``, or ``tickets``) back
        to ``pending``; returns how many."""
        sql = (
            "UPDATE notifications SET state = 'pending', lease_owner = NULL, lease_until = NULL,"
            " updated_at = ? WHERE state IN ('unknown', 'rejected')"
        )
        params: list[Any] = [self._wall()]
        if state:
            sql += " AND state = ?"
            params.append(state)
        if tickets:
            sql += f" AND ticket IN ({', '.join('?' * len(tickets))})"
            params.extend(tickets)
        with self._write():
            return int(self.db.execute(sql, params).rowcount)

    def purge_delivered(self, before_epoch: float) -> int:
        """Delete ``delivered`` notifications finished before ``before_epoch``; returns how
        many. Nothing else is ever deleted."""
        with self._write():
            cursor = self.db.execute(
                "DELETE FROM notifications WHERE state = 'delivered' AND updated_at < ?",
                (before_epoch,),
            )
            return int(cursor.rowcount)

    # -- status -----------------------------------------------------------------------

    def queue_counts(self) -> dict[str, int]:
        """Notifications per state, every state present."""
        counts = dict.fromkeys(STATES, 0)
        for row in self._rows("SELECT state, COUNT(*) AS n FROM notifications GROUP BY state"):
            counts[row["state"]] = row["n"]
        return counts

    def scan_counts(self) -> dict[str, int]:
        """Scans per outcome, every outcome present."""
        counts = dict.fromkeys(OUTCOMES, 0)
        for row in self._rows("SELECT outcome, COUNT(*) AS n FROM scans GROUP BY outcome"):
            counts[row["outcome"]] = row["n"]
        return counts

    def oldest_pending(self) -> tuple[str, float] | None:
        """The oldest pending notification's ``scanned_at`` and creation time (epoch)."""
        rows = self._rows(
            "SELECT scanned_at, created_at FROM notifications WHERE state = 'pending'"
            " ORDER BY id LIMIT 1"
        )
        return (rows[0]["scanned_at"], rows[0]["created_at"]) if rows else None

    def get_meta(self, key: str) -> Any:
        """A JSON value saved with :meth:`set_meta`, or None."""
        rows = self._rows("SELECT value FROM meta WHERE key = ?", [key])
        return json.loads(rows[0]["value"]) if rows else None

    def set_meta(self, key: str, value: Any) -> None:
        """Save a small JSON value (heartbeat, API state, cursors)."""
        with self._write():
            self._set_meta(key, value)

    def _set_meta(self, key: str, value: Any) -> None:
        self.db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value)),
        )

    def set_scanner_state(
        self, name: str, port: str, *, connected: bool, error: str | None = None
    ) -> None:
        """Record a scanner's connection state for ``status``."""
        with self._write():
            self.db.execute(
                "INSERT INTO scanner_status (name, port, connected, last_error, updated_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET port = excluded.port,"
                " connected = excluded.connected, last_error = excluded.last_error,"
                " updated_at = excluded.updated_at",
                (name, port, int(connected), error, self._wall()),
            )

    def scanner_states(self) -> dict[str, dict[str, Any]]:
        """Each scanner's last recorded state, by name."""
        return {r["name"]: r for r in self._rows("SELECT * FROM scanner_status ORDER BY name")}

    def quick_check(self) -> str:
        """``PRAGMA quick_check``: ``ok`` when the file is sound (cheaper than integrity)."""
        rows = self._rows("PRAGMA quick_check")
        return "; ".join(str(next(iter(r.values()))) for r in rows)

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check``'s answer: ``ok`` when the file is sound."""
        rows = self._rows("PRAGMA integrity_check")
        return "; ".join(str(next(iter(r.values()))) for r in rows)


def _notification(row: dict[str, Any]) -> Notification:
    return Notification(
        scan_id=row["scan_id"],
        ticket=row["ticket"],
        scanner=row["scanner"],
        device_id=row["device_id"],
        scanned_at=row["scanned_at"],
        state=row["state"],
        attempts=row["attempts"],
        last_error=row["last_error"],
        http_status=row["http_status"],
        delivered_at=row["delivered_at"],
    )


def _match_owner(path: Path) -> None:
    """Root running a CLI command must not leave WAL files the daemon's user cannot open."""
    if os.geteuid() != 0:
        return
    owner = path.stat()
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        try:
            st = side.stat()
            if (st.st_uid, st.st_gid) != (owner.st_uid, owner.st_gid):
                os.chown(side, owner.st_uid, owner.st_gid)
        except FileNotFoundError:
            continue


def _prepare_files(path: Path) -> None:
    """State directory 0700 and database file 0600, before SQLite creates anything."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.parent.stat()
    shared = st.st_mode & stat.S_ISVTX  # never tighten /tmp or the like
    if st.st_mode & 0o077 and st.st_uid == os.geteuid() and not shared:
        # A state directory made by hand with a loose mode: the queue is ours alone.
        path.parent.chmod(0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
