"""The delivery loop against a real SQLite queue and the simulated Meetch (CONTRACT §3-4)."""

from __future__ import annotations

import contextlib
import itertools
import random
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from agent.config import MeetchSettings
from agent.errors import StoreError
from agent.meetch import Answer, MeetchClient, ScanNotice, classify
from agent.sender import IDLE_POLL_S, Backoff, Notifier, Sender
from agent.store import Notification, Store
from hardware_mocks.meetch_sim import SimulatedMeetch
from tests.conftest import API_KEY, make_sender, sender_running, wait_until

SCANNED_AT = "2026-02-20T19:42:07.120+01:00"


@dataclass
class Running:
    """A Sender running on its own thread, with the means to stop it."""

    sender: Sender
    client: MeetchClient
    thread: threading.Thread
    stop: threading.Event

    def halt(self) -> None:
        """Stop the loop, let in-flight requests finish and join the thread."""
        self.stop.set()
        self.sender.stop_waiting()
        self.thread.join(15)
        assert not self.thread.is_alive(), "sender thread did not stop"


StartSender = Callable[..., Running]


@pytest.fixture
def start_sender(meetch: SimulatedMeetch, store: Store) -> Iterator[StartSender]:
    """Starts Senders on threads against ``meetch`` and ``store``; all stopped at the end."""
    running: list[Running] = []

    def start(
        *,
        max_in_flight: int = 4,
        api_key: str = API_KEY,
        key_source: Callable[[], str] | None = None,
        on_attempt: Callable[[str, Notification, Answer], None] | None = None,
        wrap: Callable[[MeetchClient], Notifier] | None = None,
        backoff: Backoff | None = None,
    ) -> Running:
        settings = MeetchSettings(
            base_url=meetch.base_url, timeout_s=5.0, max_in_flight=max_in_flight
        )
        client = MeetchClient(settings, api_key)
        sender = Sender(
            store,
            wrap(client) if wrap else client,
            owner="test",
            max_in_flight=max_in_flight,
            backoff=backoff or Backoff(0.02, 0.2, random.Random(1)),
            lease_s=10,
            api_key=api_key,
            key_source=key_source,
            on_attempt=on_attempt,
        )
        stop = threading.Event()
        thread = threading.Thread(target=sender.run, args=(stop,), name="test-sender")
        run = Running(sender, client, thread, stop)
        running.append(run)
        thread.start()
        return run

    yield start
    for run in running:
        try:
            run.halt()
        finally:
            run.client.close()


def queue(store: Store, sender: Sender | None, *tickets: str) -> None:
    """Record a valid first scan of each ticket, then wake the sender."""
    for ticket in tickets:
        assert store.record_scan("north-1", ticket, "valid", SCANNED_AT).notification_created
    if sender is not None:
        sender.wake()


def tickets(n: int, start: int = 1) -> list[str]:
    """``n`` ticket numbers in scan order."""
    return [f"{i:06d}" for i in range(start, start + n)]


def by_ticket(store: Store) -> dict[str, Notification]:
    """Every notification, by ticket."""
    return {n.ticket: n for n in store.notifications()}


def all_in(store: Store, state: str, count: int) -> bool:
    """True once ``count`` notifications are in ``state``."""
    return store.queue_counts()[state] == count


def leased(store: Store) -> int:
    """How many notifications hold a lease (read on a connection of our own, as the CLI does)."""
    with contextlib.closing(sqlite3.connect(store.path)) as conn:
        row = conn.execute("SELECT COUNT(*) FROM notifications WHERE lease_owner IS NOT NULL")
        return int(row.fetchone()[0])


# -- delivery --------------------------------------------------------------------------


def test_every_notification_is_delivered_once(
    meetch: SimulatedMeetch, store: Store, start_sender: StartSender
) -> None:
    """Each queued ticket reaches Meetch exactly once, with its own scan id as the key."""
    run = start_sender(max_in_flight=4)
    numbers = tickets(20)

    queue(store, run.sender, *numbers)

    wait_until(lambda: all_in(store, "delivered", 20))
    notes = by_ticket(store)
    sent = [r.json["number"] for r in meetch.scan_requests]
    assert sorted(sent) == numbers
    for ticket in numbers:
        assert meetch.scan_ids_for(ticket) == {notes[ticket].scan_id}
        assert notes[ticket].attempts == 1
        assert notes[ticket].http_status == 201
        assert notes[ticket].delivered_at is not None
        assert notes[ticket].last_error is None
    assert meetch.flagged == {t: notes[t].scan_id for t in numbers}
    assert run.sender.api_state == "online"
    assert store.get_meta("api_state") == "online"
    assert leased(store) == 0


def test_oldest_first_one_at_a_time(
    meetch: SimulatedMeetch, store: Store, start_sender: StartSender
) -> None:
    """With one request in flight, notifications go out in the order they were scanned."""
    numbers = ["000300", "000100", "000200", "000500", "000400"]
    queue(store, None, *numbers)

    start_sender(max_in_flight=1)

    wait_until(lambda: all_in(store, "delivered", 5))
    assert [r.json["number"] for r in meetch.scan_requests] == numbers
    assert list(meetch.flagged) == numbers


def test_wake_sends_a_new_scan_without_waiting_for_the_poll(
    meetch: SimulatedMeetch, store: Store, start_sender: StartSender
) -> None:
    """A scan queued while the sender idles goes out at once when the sender is woken."""
    run = start_sender(max_in_flight=2)
    queue(store, run.sender, "000001")
    wait_until(lambda: all_in(store, "delivered", 1))
    # The loop now idles until its next poll, IDLE_POLL_S away.

    queue(store, run.sender, "000002")

    assert meetch.wait_for(lambda: "000002" in meetch.flagged, timeout=IDLE_POLL_S / 2)


def test_a_few_failures_do_not_make_the_api_offline(
    meetch: SimulatedMeetch, store: Store, start_sender: StartSender
) -> None:
    """Two transient failures in a row are a blip: api_state stays online."""
    seen: list[str] = []

    def note_state(result: str, item: Notification, answer: Answer) -> None:
        seen.append(store.get_meta("api_state"))

    run = start_sender(max_in_flight=1, on_attempt=note_state)
    queue(store, run.sender, "000001")
    wait_until(lambda: all_in(store, "delivered", 1))
    meetch.fail_next(2)

    queue(store, run.sender, "000002")

    wait_until(lambda: all_in(store, "delivered", 2))
    wait_until(lambda: len(seen) == 4)  # on_attempt runs just after the store is updated
    assert [r.status for r in meetch.scan_requests] == [201, 500, 500, 201]
    assert seen == ["online"] * 4
    assert run.sender.api_state == "online"
    assert by_ticket(store)["000002"].attempts == 3


def test_server_errors_are_retried_until_delivered(
    meetch: SimulatedMeetch, store: Store, start_sender: StartSender
) -> None:
    """A ticket answered 500 several times is retried with the same scan id until delivered."""
    meetch.fail_next(4)
    run = start_sender(max_in_flight=1)

    queue(store, run.sender, "000001")

    wait_until(lambda: all_in(store, "delivered", 1))
    note = by_ticket(store)["000001"]
    requests = meetch.scan_requests
    assert [r.status for r in requests] == [500, 500, 500, 500, 201]
    assert {r.headers["idempotency-key"] for r in requests} == {note.scan_id}
    assert note.attempts == 5
    assert note.last_error is None
    wait_until(lambda: run.sender.api_state == "online")


def test_outage_is_survived_without_loss_or_duplicates(
    meetch: SimulatedMeetch, store: Store, start_sender: StartSender
) -> None:
    """Meetch away: offline after repeated failures, nothing lost, then all delivered once."""
    numbers = tickets(20)
    meetch.go_offline()
    run = start_sender(max_in_flight=4)
    queue(store, run.sender, *numbers)

    wait_until(lambda: run.sender.api_state == "offline")
    wait_until(lambda: sum(n.attempts for n in store.notifications()) >= 12)
    assert store.get_meta("api_state") == "offline"
    assert store.queue_counts()["pending"] == 20
    assert meetch.requests == []

    meetch.go_online()

    wait_until(lambda: all_in(store, "delivered", 20))
    notes = by_ticket(store)
    for ticket in numbers:
        assert meetch.scan_ids_for(ticket) == {notes[ticket].scan_id}
    assert sorted(meetch.flagged) == numbers
    assert len(meetch.scan_requests) == 20
    assert run.sender.api_state == "online"
    assert store.get_meta("api_state") == "online"
    assert leased(store) == 0


def test_outage_with_a_single_pending_item_is_still_seen(
    meetch: SimulatedMeetch, store: Store, start_sender: StartSender
) -> None:
    """No answer at all is never one item's fault: one pending item is enough to see it."""
    meetch.go_offline()
    run = start_sender(max_in_flight=4)
    queue(store, run.sender, "000001")

    wait_until(lambda: run.sender.api_state == "offline")
    meetch.go_online()
    wait_until(lambda: all_in(store, "delivered", 1))
    wait_until(lambda: run.sender.api_state == "online")  # set just after the store update


def test_offline_sends_one_probe_at_a_time(
    meetch: SimulatedMeetch, store: Store, start_sender: StartSender
) -> None:
    """Once offline, one request at a time, each after the last answer plus a backoff."""
    latency, backoff = 0.05, Backoff(0.1, 0.2, random.Random(1))
    meetch.latency_s = latency
    meetch.html_502(10)
    states: list[str] = []

    def note_state(result: str, item: Notification, answer: Answer) -> None:
        states.append(store.get_meta("api_state"))

    run = start_sender(max_in_flight=4, on_attempt=note_state, backoff=backoff)

    queue(store, run.sender, *tickets(12))

    wait_until(lambda: all_in(store, "delivered", 12))
    wait_until(lambda: len(states) == 10 + 12)  # on_attempt runs just after the store update
    assert "offline" in states
    assert states[-1] == "online"
    received = sorted(r.at for r in meetch.scan_requests)
    assert len(received) == 10 + 12
    # At most max_in_flight + 2 requests go out before the third failure marks the API
    # offline; each later one waits for every earlier answer, then at least initial_s / 2.
    for earlier, later in itertools.pairwise(received[5:10]):
        assert later - earlier >= latency + backoff.initial_s / 2
    assert run.sender.api_state == "online"


def test_one_failing_ticket_does_not_block_the_queue(
    meetch: SimulatedMeetch, store: Store, start_sender: StartSender
) -> None:
    """A ticket that alone keeps failing neither marks the API offline nor blocks new scans."""
    run = start_sender(max_in_flight=2, wrap=lambda client: OneTicketFails(client, "000666"))
    queue(store, run.sender, "000666")
    wait_until(lambda: by_ticket(store)["000666"].attempts >= 4)
    assert run.sender.api_state != "offline"

    queue(store, run.sender, "000001", "000002")

    assert meetch.wait_for(lambda: len(meetch.flagged) == 2, timeout=5)
    assert by_ticket(store)["000666"].state == "pending"
    assert by_ticket(store)["000666"].attempts >= 3


class OneTicketFails:
    """The real client, except that one ticket always meets a 500 (a server bug for it)."""

    def __init__(self, client: MeetchClient, ticket: str) -> None:
        self.client = client
        self.ticket = ticket

    def notify(self, notice: ScanNotice) -> Answer:
        """Answer 500 for the poisoned ticket, ask the simulator for any other."""
        if notice.ticket == self.ticket:
            return classify(500, httpx.Headers(), '{"error":"internal"}')
        return self.client.notify(notice)

    def set_key(self, api_key: str) -> None:
        """Pass the key on."""
        self.client.set_key(api_key)


def test_rate_limit_holds_every_request_for_retry_after(
    meetch: SimulatedMeetch, store: Store, start_sender: StartSender
) -> None:
    """After a 429 with Retry-After: 1, no scan request at all comes within that second."""
    meetch.rate_limit(1, 1)
    run = start_sender(max_in_flight=4)
    queue(store, run.sender, "000001")
    # The retry is counted after the wait is set, so a scan queued now must wait too.
    wait_until(lambda: run.sender.stats.attempts["retry"] == 1)

    queue(store, run.sender, "000002")

    wait_until(lambda: all_in(store, "delivered", 2))
    limited, *later = meetch.scan_requests
    assert limited.status == 429
    assert sorted(r.json["number"] for r in later) == ["000001", "000002"]
    assert all(r.at - limited.at >= 1.0 for r in later)


def test_rejected_and_unknown_do_not_block_the_others(
    meetch: SimulatedMeetch, store: Store, start_sender: StartSender
) -> None:
    """A 422 ends rejected and a 404 unknown, each with its reason; the rest is delivered."""
    meetch.rejected_tickets.add("000422")
    meetch.unknown_tickets.add("000404")
    run = start_sender(max_in_flight=1)

    queue(store, run.sender, "000422", "000404", "000001", "000002")

    wait_until(lambda: store.queue_counts()["pending"] == 0)
    notes = by_ticket(store)
    assert {t: n.state for t, n in notes.items()} == {
        "000422": "rejected",
        "000404": "unknown",
        "000001": "delivered",
        "000002": "delivered",
    }
    assert notes["000422"].http_status == 422
    assert notes["000422"].last_error is not None
    assert "HTTP 422" in notes["000422"].last_error
    assert "item cannot be flagged as scanned" in notes["000422"].last_error
    assert notes["000404"].http_status == 404
    assert notes["000404"].last_error is not None
    assert "HTTP 404" in notes["000404"].last_error
    assert all(n.attempts == 1 for n in notes.values())
    assert len(meetch.scan_requests) == 4
    assert run.sender.api_state == "online"


# -- the key ---------------------------------------------------------------------------


def test_refused_key_pauses_sending_until_the_key_changes(
    meetch: SimulatedMeetch, store: Store, start_sender: StartSender
) -> None:
    """401: auth_failed, the queue untouched, nothing sent until set_key gives a new key."""
    meetch.set_api_keys(["new-key"])
    run = start_sender(max_in_flight=4)
    numbers = tickets(6)

    queue(store, run.sender, *numbers)

    wait_until(lambda: run.sender.api_state == "auth_failed")
    wait_until(lambda: not run.sender.pending_work())
    refused = len(meetch.requests)
    assert 1 <= refused <= 4
    assert {r.status for r in meetch.requests} == {401}
    assert store.get_meta("api_state") == "auth_failed"
    notes = by_ticket(store)
    assert all(n.state == "pending" and n.attempts == 0 for n in notes.values())
    assert leased(store) == 0

    queue(store, run.sender, "000007")
    assert not meetch.wait_for(lambda: len(meetch.requests) > refused, timeout=0.5)
    assert run.sender.api_state == "auth_failed"

    run.sender.set_key("new-key")

    wait_until(lambda: all_in(store, "delivered", 7))
    assert all(n.attempts == 1 for n in store.notifications())
    assert meetch.requests[-1].headers["authorization"] == "Bearer new-key"
    assert run.sender.stats.attempts["auth_failed"] == refused
    assert run.sender.api_state == "online"


def test_rewriting_the_key_file_resumes_sending(
    meetch: SimulatedMeetch, store: Store, start_sender: StartSender, tmp_path: Path
) -> None:
    """With a key_source, a refused key is re-read from its file; a new key resumes sending."""
    key_file = tmp_path / "api-key"
    key_file.write_text("old-key\n")
    reads: list[int] = []

    def read_key() -> str:
        reads.append(1)
        return key_file.read_text().strip()

    run = start_sender(max_in_flight=2, api_key="old-key", key_source=read_key)
    queue(store, run.sender, "000001", "000002")
    wait_until(lambda: run.sender.api_state == "auth_failed")

    # The file vanishes mid-rewrite: the sender shrugs and keeps waiting.
    key_file.unlink()
    before = len(reads)
    run.sender.wake()
    wait_until(lambda: len(reads) > before)
    assert run.thread.is_alive()
    assert run.sender.api_state == "auth_failed"

    key_file.write_text(API_KEY + "\n")

    wait_until(lambda: all_in(store, "delivered", 2), timeout=IDLE_POLL_S * 3)
    assert meetch.requests[-1].headers["authorization"] == f"Bearer {API_KEY}"
    assert all(n.attempts == 1 for n in store.notifications())


# -- stopping ----------------------------------------------------------------------------


def test_stop_lets_the_request_in_flight_finish(
    meetch: SimulatedMeetch, store: Store, start_sender: StartSender
) -> None:
    """Stopping with a request in flight waits for its answer and records it."""
    meetch.latency_s = 0.5
    run = start_sender(max_in_flight=2)
    queue(store, run.sender, "000001")
    assert meetch.wait_for(lambda: meetch.in_flight == 1, timeout=5)

    run.halt()

    note = by_ticket(store)["000001"]
    assert note.state == "delivered"
    assert note.attempts == 1
    assert leased(store) == 0
    assert [r.status for r in meetch.requests] == [201]


def test_stop_while_idle(store: Store, start_sender: StartSender) -> None:
    """An idle sender stops when asked, interrupting its wait, with no lease left behind."""
    run = start_sender()
    queue(store, None, "000001")

    run.halt()

    assert store.queue_counts()["delivered"] + store.queue_counts()["pending"] == 1
    assert leased(store) == 0


# -- Backoff ----------------------------------------------------------------------------


def samples(backoff: Backoff, failures: int, n: int = 300) -> list[float]:
    """``n`` delays after ``failures`` failures in a row."""
    return [backoff.delay(failures) for _ in range(n)]


def test_backoff_grows_with_failures() -> None:
    """The more failures in a row, the longer the delays (up to the cap)."""
    backoff = Backoff(0.1, 10.0, random.Random(3))

    means = [sum(samples(backoff, k)) / 300 for k in (1, 3, 5, 7)]

    assert means == sorted(means)
    assert means[-1] > 4 * means[0]
    assert max(samples(backoff, 3)) <= 0.4
    assert max(samples(backoff, 3)) > 0.3


def test_backoff_is_capped_at_max() -> None:
    """Delays never exceed max_s, even after very many failures."""
    backoff = Backoff(0.5, 2.0, random.Random(4))

    for failures in (5, 10, 100, 10**6):
        delays = samples(backoff, failures)
        assert max(delays) <= 2.0
        assert max(delays) > 1.5


def test_backoff_never_below_half_the_initial_delay() -> None:
    """Jitter never makes a tight loop: the floor is initial_s / 2."""
    backoff = Backoff(0.2, 5.0, random.Random(5))

    for failures in (-1, 0, 1, 2, 8):
        assert min(samples(backoff, failures)) >= 0.1


def test_backoff_with_a_seeded_rng_is_deterministic() -> None:
    """Two backoffs with equally seeded generators give the same delays."""
    first = Backoff(0.05, 1.0, random.Random(42))
    second = Backoff(0.05, 1.0, random.Random(42))

    sequence = [first.delay(k) for k in range(1, 20)]

    assert sequence == [second.delay(k) for k in range(1, 20)]
    assert len(set(sequence)) > 1


def test_backoff_first_failure_stays_within_the_initial_delay() -> None:
    """After one failure the delay is between initial_s / 2 and initial_s."""
    backoff = Backoff(0.4, 60.0, random.Random(6))

    delays = samples(backoff, 1)

    assert all(0.2 <= d <= 0.4 for d in delays)


class MetaFailsStore(Store):
    """A real store whose small status writes fail, as on a full disk."""

    def set_meta(self, key: str, value: object) -> None:
        """Always fails."""
        raise StoreError("queue database: cannot commit: database or disk is full")


def test_a_failing_status_write_never_stops_delivery(
    tmp_path: Path, meetch: SimulatedMeetch
) -> None:
    """Status writes failing (full disk) neither kill the sender thread nor stop sending."""
    store = MetaFailsStore(tmp_path / "q.sqlite3", device_id="box")
    store.record_scan("north-1", "000001", "valid", "2026-02-20T19:42:07.120+01:00")
    client = MeetchClient(MeetchSettings(base_url=meetch.base_url), API_KEY)
    try:
        with sender_running(make_sender(store, client)) as thread:
            assert meetch.wait_for(lambda: "000001" in meetch.flagged, 10)
            assert thread.is_alive()
    finally:
        client.close()
        store.close()
