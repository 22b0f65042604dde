"""Keeps the local list of refunded tickets fresh from Meetch's cancellations list."""

from __future__ import annotations

import threading
from typing import Protocol

import structlog

from agent.errors import DeliveryError
from agent.store import Store

log = structlog.get_logger("agent.refunds")

CURSOR_KEY = "cancellations_since"


class CancellationSource(Protocol):
    """What the poller needs of Meetch."""

    def cancellations(self, since: str | None) -> list[tuple[str, str]]:
        """Refunds after ``since`` as ``(number, refunded_at)``."""
        ...


class RefundPoller:
    """Fetches refunded tickets every ``interval_s`` (at once at start)."""

    def __init__(self, store: Store, source: CancellationSource, interval_s: float) -> None:
        self.store = store
        self.source = source
        self.interval_s = interval_s

    def poll_once(self) -> int:
        """Fetch new refunds; returns how many tickets were new. Raises DeliveryError."""
        since = self.store.get_meta(CURSOR_KEY)
        refunds = self.source.cancellations(since)
        added = self.store.add_refunds(refunds)
        if refunds:
            self.store.set_meta(CURSOR_KEY, max(r[1] for r in refunds))
        return added

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set; failures are logged and retried next round."""
        while not stop.is_set():
            try:
                added = self.poll_once()
                if added:
                    log.info("refunds_updated", new=added)
            except DeliveryError as exc:
                log.warning("refunds_fetch_failed", error=str(exc))
            except Exception:
                log.exception("refunds_fetch_crashed")
            stop.wait(self.interval_s)
