"""The delivery loop: claim, send, classify, back off (CONTRACT §3-4).

Oldest first, up to ``max_in_flight`` requests at once on keep-alive connections. Each
notification backs off on its own (exponential, full jitter, capped), so one bad item never
blocks the others. Three failures in a row (no answer, or a 5xx for three different items)
mark the API ``offline``: then only one probe request is in flight at a time, spaced by the
same backoff, and the first answer from Meetch brings everything back at full speed. A
refused key (401/403) pauses all sending without touching the queue until the key changes.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import structlog

from agent.errors import StoreError
from agent.meetch import Answer, Outcome, ScanNotice
from agent.store import Notification, Store

log = structlog.get_logger("agent.sender")

OFFLINE_AFTER = 3
"""Failures in a row before the API counts as offline (one blip, or one item failing on its
own, is not)."""
AUTH_RETRY_S = 300.0
"""While the key is refused, try again this often even if the key did not change."""
IDLE_POLL_S = 2.0
"""Look for work another process queued (an import, a retry) at least this often."""
MAX_RETRY_AFTER_S = 3600.0


class Notifier(Protocol):
    """What the sender needs of Meetch: :class:`agent.meetch.MeetchClient` or a fake."""

    def notify(self, notice: ScanNotice) -> Answer:
        """Send one notification and classify the answer."""
        ...

    def set_key(self, api_key: str) -> None:
        """Use another API key."""
        ...


class Backoff:
    """Capped exponential backoff with full jitter (and a small floor, never a tight loop)."""

    def __init__(self, initial_s: float, max_s: float, rng: random.Random) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self._rng = rng

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failure in a row (1-based)."""
        ceiling = min(self.max_s, self.initial_s * 2 ** min(max(failures - 1, 0), 30))
        return max(self.initial_s / 2, self._rng.uniform(0, ceiling))


@dataclass
class SenderStats:
    """Counters since start, for logs, metrics and the demo."""

    attempts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("delivered", "unknown", "rejected", "retry", "auth_failed"), 0
        )
    )
    in_flight: int = 0


class Sender:
    """Delivers pending notifications from the store to Meetch."""

    def __init__(
        self,
        store: Store,
        client: Notifier,
        *,
        owner: str,
        max_in_flight: int,
        backoff: Backoff,
        lease_s: float,
        api_key: str,
        key_source: Callable[[], str] | None = None,
        now: Callable[[], float] = time.monotonic,
        on_attempt: Callable[[str, Notification, Answer], None] | None = None,
        publish_state: bool = True,
    ) -> None:
        self.store = store
        self.client = client
        self.owner = owner
        self.max_in_flight = max_in_flight
        self.backoff = backoff
        self.lease_s = lease_s
        self.stats = SenderStats()
        self._key = api_key
        self._key_source = key_source
        self._now = now
        self._on_attempt = on_attempt
        self._publish_state = publish_state  # the daemon's view goes to status; a flush's not
        self._cond = threading.Condition()
        self._in_flight: set[str] = set()
        self._due: dict[str, tuple[float, int]] = {}  # scan_id -> (monotonic due, failures)
        self._gate_until = 0.0
        self._rate_limited_until = 0.0  # Retry-After: holds even once Meetch answers again
        # The outage detector: failures in a row with no answer, and distinct items that got
        # a 5xx in a row. Any other answer from Meetch resets both.
        self._no_answer = 0
        self._failing_items: set[str] = set()
        self._probe_failures = 0
        self._state = "unknown"
        self._auth_failed_at = 0.0
        self._woken = False

    # -- state ------------------------------------------------------------------------

    @property
    def api_state(self) -> str:
        """``online``, ``offline``, ``auth_failed`` or ``unknown``."""
        return self._state

    def _set_state(self, state: str) -> None:
        if state != self._state:
            log.info("api_state_changed", old=self._state, new=state)
            self._state = state
            if self._publish_state:
                try:
                    self.store.set_meta("api_state", state)
                except StoreError as exc:  # status shows a stale state; sending goes on
                    log.warning("api_state_not_saved", error=str(exc))

    def rate_limited_for(self) -> float:
        """Seconds Meetch still asked us to wait (``Retry-After``), 0 when not limited."""
        return max(0.0, self._rate_limited_until - self._now())

    def wake(self) -> None:
        """A new notification is queued: send it now rather than at the next poll."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def set_key(self, api_key: str, *, force: bool = False) -> None:
        """Use a new key; resumes sending after a refusal if it changed (or ``force``)."""
        with self._cond:
            changed = api_key != self._key
            self._key = api_key
            self.client.set_key(api_key)
            if self._state == "auth_failed" and (changed or force):
                log.info("api_key_reloaded", resumed=True)
                self._set_state("unknown")
            self._woken = True
            self._cond.notify_all()

    # -- loop -------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Deliver until ``stop`` is set, then let in-flight requests finish."""
        if self._publish_state:
            with contextlib.suppress(StoreError):  # a full disk must not stop delivery
                self.store.set_meta("api_state", self._state)
        with ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="send") as pool:
            while not stop.is_set():
                try:
                    self._check_key()
                    items = self._claim()
                except StoreError as exc:
                    # A full disk or a locked file: the items stay in the queue; try again.
                    log.warning("claim_failed", error=str(exc))
                    items = []
                except Exception:
                    # Whatever it is, delivery must not stop for good: log it, carry on.
                    log.exception("sender_loop_error")
                    items = []
                for item in items:
                    pool.submit(self._send, item)
                with self._cond:
                    if not self._woken and not stop.is_set():
                        self._cond.wait(self._wait_time())
                    self._woken = False
            log.info("sender_stopping", in_flight=len(self._in_flight))
        self.stats.in_flight = 0

    def stop_waiting(self) -> None:
        """Interrupt the loop's wait (after setting its stop event)."""
        self.wake()

    def pending_work(self) -> bool:
        """True while requests are in flight."""
        with self._cond:
            return bool(self._in_flight)

    def _slots(self) -> int:
        now = self._now()
        if self._state == "auth_failed" or now < self._gate_until:
            return 0
        capacity = 1 if self._state == "offline" else self.max_in_flight
        return max(0, capacity - len(self._in_flight))

    def _claim(self) -> list[Notification]:
        with self._cond:
            slots = self._slots()
            if not slots:
                return []
            now = self._now()
            # Offline too: were the probe always the oldest item, one item that keeps
            # failing on its own (a 500 for that ticket) would block the queue for good.
            skip = set(self._in_flight)
            skip |= {sid for sid, (due, _) in self._due.items() if due > now}
        items = self.store.claim(self.owner, slots, self.lease_s, frozenset(skip))
        with self._cond:
            self._in_flight.update(i.scan_id for i in items)
            self.stats.in_flight = len(self._in_flight)
        return items

    def _wait_time(self) -> float:
        now = self._now()
        deadline = now + IDLE_POLL_S
        if self._gate_until > now:
            deadline = min(deadline, self._gate_until)
        elif self._state != "auth_failed":
            future = [due for due, _ in self._due.values() if due > now]
            if future:
                deadline = min([deadline, *future])
        return max(0.01, deadline - now)

    def _check_key(self) -> None:
        if self._state != "auth_failed":
            return
        if self._key_source is not None:
            try:
                key = self._key_source()
            except Exception as exc:  # a key file being rewritten: try again next round
                log.warning("api_key_unreadable", error=str(exc))
                return
            if key != self._key:
                self.set_key(key)
                return
        if self._now() - self._auth_failed_at >= AUTH_RETRY_S:
            log.info("api_key_retry", after_s=AUTH_RETRY_S)
            self.set_key(self._key, force=True)

    # -- one request ------------------------------------------------------------------

    def _send(self, item: Notification) -> None:
        notice = ScanNotice(item.scan_id, item.ticket, item.scanned_at)
        try:
            answer = self.client.notify(notice)
        except Exception as exc:  # a bug in a notifier must not kill the worker or the item
            log.exception("notify_crashed", scan_id=item.scan_id)
            answer = Answer(Outcome.RETRY, None, f"internal error: {exc.__class__.__name__}")
        try:
            self._record(item, answer)
        except Exception:
            log.exception("record_answer_failed", scan_id=item.scan_id)
        finally:
            with self._cond:
                self._in_flight.discard(item.scan_id)
                self.stats.in_flight = len(self._in_flight)
                self._woken = True
                self._cond.notify_all()

    def _record(self, item: Notification, answer: Answer) -> None:
        outcome = answer.outcome
        result = outcome.value
        if outcome is Outcome.AUTH_FAILED:
            self.store.release(item.scan_id, self.owner)
            with self._cond:
                if self._state != "auth_failed":
                    log.error("api_key_refused", status=answer.status, detail=answer.detail)
                self._auth_failed_at = self._now()
                self._set_state("auth_failed")
        elif outcome is Outcome.RETRY:
            self._transient(item, answer)
            self.store.retry_later(item.scan_id, self.owner, answer.detail, answer.status)
        else:
            state = outcome.value
            delivered_at = _wall_rfc3339() if outcome is Outcome.DELIVERED else None
            error = None if outcome is Outcome.DELIVERED else answer.detail
            # Meetch answered: it is reachable, whatever becomes of our write below (and
            # whoever sees the item finished sees the state already online).
            self._reachable(item.scan_id)
            self.store.finish(
                item.scan_id,
                self.owner,
                state,
                http_status=answer.status,
                error=error,
                delivered_at=delivered_at,
            )
            log_fn = log.warning if outcome is Outcome.REJECTED else log.info
            log_fn(
                f"notification_{state}",
                scan_id=item.scan_id,
                ticket_suffix=ticket_suffix(item.ticket),
                status=answer.status,
            )
        with self._cond:
            self.stats.attempts[result] += 1
        if self._on_attempt is not None:
            self._on_attempt(result, item, answer)

    def _transient(self, item: Notification, answer: Answer) -> None:
        with self._cond:
            now = self._now()
            _, failures = self._due.get(item.scan_id, (0.0, 0))
            failures += 1
            due = now + self.backoff.delay(failures)
            if answer.status is None or answer.status < 400:
                # No answer, or a captive portal's: never the item's fault, always counts.
                self._no_answer += 1
            elif answer.status >= 500:
                self._failing_items.add(item.scan_id)  # one item failing alone is not an outage
            else:
                self._no_answer, self._failing_items = 0, set()  # 408/425/429: Meetch is there
            outage = self._no_answer + len(self._failing_items) >= OFFLINE_AFTER
            if self._state != "auth_failed" and (outage or self._state == "offline"):
                if self._state != "offline":
                    self._set_state("offline")
                    self._probe_failures = 0
                self._probe_failures += 1
                probe = now + self.backoff.delay(self._probe_failures)
                self._gate_until = max(self._gate_until, probe)
            if answer.retry_after_s is not None:
                # Meetch asked everyone to wait, not just this item.
                wait = min(answer.retry_after_s, MAX_RETRY_AFTER_S)
                self._gate_until = max(self._gate_until, now + wait)
                self._rate_limited_until = max(self._rate_limited_until, now + wait)
                due = max(due, now + wait)
            self._due[item.scan_id] = (due, failures)
        log.info(
            "notification_retry",
            scan_id=item.scan_id,
            error=answer.detail,
            failures=failures,
            retry_in_s=round(due - now, 2),
        )

    def _reachable(self, scan_id: str) -> None:
        with self._cond:
            self._due.pop(scan_id, None)
            self._no_answer, self._failing_items = 0, set()
            if self._state != "online":
                # The items failed because the API was away, not because of themselves.
                self._due.clear()
                self._gate_until = self._rate_limited_until
            self._set_state("online")


def ticket_suffix(ticket: str) -> str:
    """The end of a ticket number, enough to find it in logs without printing it whole."""
    return "…" + ticket[-4:] if len(ticket) > 4 else ticket


def _wall_rfc3339() -> str:
    return datetime.now().astimezone().isoformat(timespec="milliseconds")
