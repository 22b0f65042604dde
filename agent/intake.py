"""From a scanner frame to a committed scan and the feedback owed to the scanner.

The order is the promise of CONTRACT §3: parse, dedupe, commit to SQLite, and only then
answer ``good_read`` (or ``bad_read``) and wake the sender.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import structlog

from agent.barcode import parse_frame
from agent.config import ScannerSettings
from agent.errors import StoreError
from agent.sender import ticket_suffix
from agent.store import Recorded, Store

log = structlog.get_logger("agent.intake")


PRUNE_AT = 10_000


class Dedupe:
    """Same ticket on the same scanner inside the window = one scan (monotonic clock)."""

    def __init__(self, window_s: float, now: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._now = now
        self._seen: dict[tuple[str, str], float] = {}
        self._prune_at = PRUNE_AT
        self._lock = threading.Lock()

    def is_repeat(self, scanner: str, ticket: str) -> bool:
        """True when ``ticket`` was accepted on ``scanner`` less than the window ago."""
        now = self._now()
        with self._lock:
            if len(self._seen) > self._prune_at:  # keep memory bounded on a long night
                self._seen = {k: t for k, t in self._seen.items() if now - t < self.window_s}
                # Everything may still be inside the window: don't rebuild on every scan.
                self._prune_at = max(PRUNE_AT, 2 * len(self._seen))
            last = self._seen.get((scanner, ticket))
            if last is not None and now - last < self.window_s:
                return True
            self._seen[(scanner, ticket)] = now
            return False

    def forget(self, scanner: str, ticket: str) -> None:
        """Drop ``ticket``'s last read on ``scanner``: it was never committed."""
        with self._lock:
            self._seen.pop((scanner, ticket), None)


MAX_HELD = 10_000
"""Scans kept in memory while the database cannot commit (a full disk). About 2 MB."""


@dataclass(frozen=True)
class _Read:
    """A scan read off a scanner, not yet committed."""

    scanner: str
    ticket: str | None
    outcome: str
    scanned_at: str
    reason: str | None
    raw: bytes | None
    clock_synced: bool | None


@dataclass
class StoreHealth:
    """Whether scans are being committed, and what is held meanwhile."""

    state: str = "ok"  # "ok" or "degraded"
    held: int = 0
    dropped: int = 0
    since: str | None = None
    error: str | None = None
    disk_full: bool = False


class Intake:
    """Handles every frame from every scanner.

    When the database cannot commit (disk full, I/O error), scans are held in memory, in
    order, up to ``max_held``, without feedback (nothing is acknowledged before it is
    durable); :meth:`retry_held` writes them once the database takes writes again.
    """

    def __init__(
        self,
        store: Store,
        dedupe: Dedupe,
        *,
        on_queued: Callable[[], None] = lambda: None,
        on_scan: Callable[[str, str], None] = lambda scanner, outcome: None,
        wall: Callable[[], datetime] = lambda: datetime.now().astimezone(),
        clock_synced: Callable[[], bool | None] = lambda: None,
        max_held: int = MAX_HELD,
    ) -> None:
        self.store = store
        self.dedupe = dedupe
        self._on_queued = on_queued
        self._on_scan = on_scan
        self._wall = wall
        self._clock_synced = clock_synced
        self.max_held = max_held
        self._held: deque[_Read] = deque()
        self._lock = threading.Lock()
        self.health = StoreHealth()

    def handle(self, scanner: ScannerSettings, raw: bytes) -> bytes:
        """Record one frame; return the feedback bytes to write back to the scanner."""
        scanned_at = self._wall().isoformat(timespec="milliseconds")
        synced = self._clock_synced()
        frame = parse_frame(raw)
        if frame.ticket is None:
            log.warning("scan_invalid", scanner=scanner.name, reason=frame.reason, length=len(raw))
            read = _Read(scanner.name, None, "invalid", scanned_at, frame.reason, raw, synced)
        else:
            repeat = self.dedupe.is_repeat(scanner.name, frame.ticket)
            outcome = "duplicate" if repeat else "valid"
            read = _Read(scanner.name, frame.ticket, outcome, scanned_at, None, None, synced)
        with self._lock:
            if self._held:  # keep the order: nothing overtakes what is already waiting
                self._hold(read)
                return b""
            try:
                recorded = self._commit(read)
            except StoreError as exc:
                self._degrade(exc)
                self._hold(read)
                return b""
        if recorded.outcome == "invalid":
            return scanner.bad_read
        if recorded.outcome == "duplicate":
            return b""  # the first read already got its feedback
        if recorded.outcome == "refunded":
            return scanner.bad_read
        return scanner.good_read

    def retry_held(self) -> int:
        """Commit held scans, oldest first, while the database takes them; returns how many
        are still held."""
        with self._lock:
            while self._held:
                try:
                    self._commit(self._held[0])
                except StoreError as exc:
                    self.health.error = str(exc)
                    self.health.held = len(self._held)
                    return len(self._held)
                self._held.popleft()
            if self.health.state != "ok":
                log.warning(
                    "store_recovered",
                    dropped=self.health.dropped,
                    degraded_since=self.health.since,
                )
                self.health = StoreHealth(dropped=self.health.dropped)
            return 0

    def _commit(self, read: _Read) -> Recorded:
        recorded = self.store.record_scan(
            read.scanner,
            read.ticket,
            read.outcome,
            read.scanned_at,
            reason=read.reason,
            raw=read.raw,
            clock_synced=read.clock_synced,
        )
        self._on_scan(read.scanner, recorded.outcome)
        if read.ticket is not None:
            self._log(read.scanner, read.ticket, recorded)
        if recorded.notification_created:
            self._on_queued()
        return recorded

    def _degrade(self, exc: StoreError) -> None:
        if self.health.state == "ok":
            self.health.state = "degraded"
            self.health.since = self._wall().isoformat(timespec="seconds")
            self.health.disk_full = bool(getattr(exc, "disk_full", False))
            log.error(
                "store_cannot_commit",
                error=str(exc),
                disk_full=self.health.disk_full,
                hint="scans are held in memory and written when the database takes writes again",
            )
        self.health.error = str(exc)

    def _hold(self, read: _Read) -> None:
        if len(self._held) >= self.max_held:
            self.health.dropped += 1
            if read.ticket is not None and read.outcome == "valid":
                self.dedupe.forget(read.scanner, read.ticket)  # a rescan must count again
            if self.health.dropped == 1 or self.health.dropped % 100 == 0:
                log.critical(
                    "scan_dropped_memory_full",
                    dropped=self.health.dropped,
                    held=len(self._held),
                    hint="free disk space in the state directory now",
                )
            return
        self._held.append(read)
        self.health.held = len(self._held)

    @staticmethod
    def _log(scanner: str, ticket: str, recorded: Recorded) -> None:
        fields = {
            "scanner": scanner,
            "ticket_suffix": ticket_suffix(ticket),
            "scan_id": recorded.scan_id,
        }
        if recorded.outcome == "refunded":
            log.warning("scan_of_refunded_ticket", **fields)
        elif recorded.outcome == "duplicate":
            log.debug("scan_duplicate", **fields)
        else:
            log.info("scan_queued", new_notification=recorded.notification_created, **fields)
