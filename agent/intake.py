"""From a scanner frame to a committed scan and the feedback owed to the scanner.

The order is the promise of CONTRACT §3: parse, dedupe, commit to SQLite, and only then
answer ``good_read`` (or ``bad_read``) and wake the sender.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime

import structlog

from agent.barcode import parse_frame
from agent.config import ScannerSettings
from agent.sender import ticket_suffix
from agent.store import Recorded, Store

log = structlog.get_logger("agent.intake")


class Dedupe:
    """Same ticket on the same scanner inside the window = one scan (monotonic clock)."""

    def __init__(self, window_s: float, now: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._now = now
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def is_repeat(self, scanner: str, ticket: str) -> bool:
        """True when ``ticket`` was accepted on ``scanner`` less than the window ago."""
        now = self._now()
        with self._lock:
            if len(self._seen) > 10_000:  # keep memory bounded on a long night
                self._seen = {k: t for k, t in self._seen.items() if now - t < self.window_s}
            last = self._seen.get((scanner, ticket))
            if last is not None and now - last < self.window_s:
                return True
            self._seen[(scanner, ticket)] = now
            return False

    def forget(self, scanner: str, ticket: str) -> None:
        """Drop ``ticket``'s last read on ``scanner``: it was never committed."""
        with self._lock:
            self._seen.pop((scanner, ticket), None)


class Intake:
    """Handles every frame from every scanner."""

    def __init__(
        self,
        store: Store,
        dedupe: Dedupe,
        *,
        on_queued: Callable[[], None] = lambda: None,
        on_scan: Callable[[str, str], None] = lambda scanner, outcome: None,
        wall: Callable[[], datetime] = lambda: datetime.now().astimezone(),
    ) -> None:
        self.store = store
        self.dedupe = dedupe
        self._on_queued = on_queued
        self._on_scan = on_scan
        self._wall = wall

    def handle(self, scanner: ScannerSettings, raw: bytes) -> bytes:
        """Record one frame; return the feedback bytes to write back to the scanner."""
        scanned_at = self._wall().isoformat(timespec="milliseconds")
        frame = parse_frame(raw)
        if frame.ticket is None:
            self.store.record_scan(
                scanner.name, None, "invalid", scanned_at, reason=frame.reason, raw=raw
            )
            log.warning("scan_invalid", scanner=scanner.name, reason=frame.reason, length=len(raw))
            self._on_scan(scanner.name, "invalid")
            return scanner.bad_read
        outcome = "duplicate" if self.dedupe.is_repeat(scanner.name, frame.ticket) else "valid"
        try:
            recorded = self.store.record_scan(scanner.name, frame.ticket, outcome, scanned_at)
        except Exception:
            if outcome == "valid":
                # Not committed, so not acknowledged: the rescan must count as a first read.
                self.dedupe.forget(scanner.name, frame.ticket)
            raise
        self._on_scan(scanner.name, recorded.outcome)
        self._log(scanner, frame.ticket, recorded)
        if recorded.notification_created:
            self._on_queued()
        if recorded.outcome == "duplicate":
            return b""  # the first read already got its feedback
        if recorded.outcome == "refunded":
            return scanner.bad_read
        return scanner.good_read

    @staticmethod
    def _log(scanner: ScannerSettings, ticket: str, recorded: Recorded) -> None:
        fields = {
            "scanner": scanner.name,
            "ticket_suffix": ticket_suffix(ticket),
            "scan_id": recorded.scan_id,
        }
        if recorded.outcome == "refunded":
            log.warning("scan_of_refunded_ticket", **fields)
        elif recorded.outcome == "duplicate":
            log.debug("scan_duplicate", **fields)
        else:
            log.info("scan_queued", new_notification=recorded.notification_created, **fields)
