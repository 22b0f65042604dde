"""A hostile Meetch: storms of bad answers, and the delivery loop stays truthful and calm.

A real :class:`~agent.sender.Sender` with a real SQLite queue and a real
:class:`~agent.meetch.MeetchClient` on loopback meets the simulator's faults: 5xx storms,
proxy HTML pages (502, a 200 captive portal, 404 and 400 pages), bodies that are not JSON,
multi-megabyte bodies, answers that stall past the client's timeout, connections reset
mid-answer and 429 storms. Through all of it:

- nothing ends ``rejected`` or ``unknown`` but what Meetch itself refused (a real 422, 404);
- every ticket ends delivered, POSTed only ever under its one scan id;
- nothing is marked delivered that the simulator did not really flag (checked at the
  moment of every ``delivered`` outcome, and at the end against ``meetch.flagged``);
- no tight loop: a ticket is retried no faster than the backoff floor allows, and once
  the API is offline one probe at a time goes out, spaced by at least that floor;
- after a 429 with ``Retry-After``, nothing goes out before that many seconds.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from agent.config import MeetchSettings
from agent.meetch import Answer, MeetchClient
from agent.sender import Backoff, Sender
from agent.store import Notification, Store
from hardware_mocks.meetch_sim import RecordedRequest, SimulatedMeetch
from tests.conftest import API_KEY, wait_until
from tests.fault.conftest import LONG, Record

SCANNED_AT = "2026-02-20T19:42:07.120+01:00"
SEED = 20260220
INITIAL_S, MAX_S = 0.05, 0.2
FLOOR_S = INITIAL_S / 2
"""Backoff never waits less than this between two attempts of one ticket."""
TIMEOUT_S = 0.5
"""The client's timeout where answers stall; elsewhere a roomy one, so that a slow CI
machine never turns a good answer into a retry."""
STALL_S = TIMEOUT_S + 0.3
"""Longer than the client's timeout: the agent gives up on the request first."""
SCALE = 5 if LONG else 1
DRAIN_S = 60 * SCALE
"""How long a storm may take to drain before the test fails (a bound on waiting only)."""

PORTAL = b"<html><body><h1>Welcome to Venue-WiFi</h1><a href='/login'>Log in</a></body></html>"
HTML_404 = b"<html><head><title>404 Not Found</title></head><body>nginx</body></html>"
HTML_400 = b"<html><body><h1>400 Bad Request</h1>Request Header Or Cookie Too Large</body></html>"


@dataclass
class Run:
    """A Sender on its own thread, and what it did."""

    sender: Sender
    client: MeetchClient
    thread: threading.Thread
    stop: threading.Event
    lies: list[str] = field(default_factory=list)
    """``delivered`` outcomes for tickets the simulator had not flagged under that scan id."""

    def halt(self) -> None:
        """Stop the loop, let in-flight requests finish and join the thread."""
        self.stop.set()
        self.sender.stop_waiting()
        self.thread.join(30)
        assert not self.thread.is_alive(), "sender thread did not stop"


StartSender = Callable[..., Run]


@pytest.fixture
def start_sender(meetch: SimulatedMeetch, store: Store) -> Iterator[StartSender]:
    """Starts seeded Senders against ``meetch`` and ``store``; all stopped at the end."""
    running: list[Run] = []

    def start(*, max_in_flight: int = 4, seed: int = SEED, timeout_s: float = 5.0) -> Run:
        settings = MeetchSettings(
            base_url=meetch.base_url, timeout_s=timeout_s, max_in_flight=max_in_flight
        )
        client = MeetchClient(settings, API_KEY)
        lies: list[str] = []

        def check(result: str, item: Notification, answer: Answer) -> None:
            # Runs right after the store recorded the outcome: the simulator must already
            # hold the flag, under this very scan id.
            if result == "delivered" and meetch.flagged.get(item.ticket) != item.scan_id:
                lies.append(f"{item.ticket} delivered on {answer.status} {answer.detail!r}")

        sender = Sender(
            store,
            client,
            owner="hostile",
            max_in_flight=max_in_flight,
            backoff=Backoff(INITIAL_S, MAX_S, random.Random(seed)),
            lease_s=30,
            api_key=API_KEY,
            on_attempt=check,
        )
        stop = threading.Event()
        thread = threading.Thread(target=sender.run, args=(stop,), name="hostile-sender")
        run = Run(sender, client, thread, stop, lies)
        running.append(run)
        thread.start()
        return run

    yield start
    for run in running:
        try:
            run.halt()
        finally:
            run.client.close()


def queue(store: Store, run: Run, tickets: list[str]) -> None:
    """Record a valid first scan of each ticket, then wake the sender."""
    for ticket in tickets:
        assert store.record_scan("north-1", ticket, "valid", SCANNED_AT).notification_created
    run.sender.wake()


def numbers(n: int, prefix: str = "H") -> list[str]:
    """``n`` ticket numbers."""
    return [f"{prefix}{i:05d}" for i in range(n)]


def leased(store: Store) -> int:
    """Notifications still holding a lease, read on a connection of our own."""
    with contextlib.closing(sqlite3.connect(store.path)) as conn:
        row = conn.execute("SELECT COUNT(*) FROM notifications WHERE lease_owner IS NOT NULL")
        return int(row.fetchone()[0])


def settled(store: Store, meetch: SimulatedMeetch) -> bool:
    """Nothing pending and no request still held by the simulator."""
    return store.queue_counts()["pending"] == 0 and meetch.in_flight == 0


def assert_truthful(
    run: Run,
    store: Store,
    meetch: SimulatedMeetch,
    tickets: list[str],
    *,
    rejected: frozenset[str] = frozenset(),
    unknown: frozenset[str] = frozenset(),
) -> None:
    """Every ticket in its true final state, sent under one scan id, no lie told."""
    notes = {n.ticket: n for n in store.notifications()}
    assert set(notes) == set(tickets)
    expected = {
        t: "rejected" if t in rejected else "unknown" if t in unknown else "delivered"
        for t in tickets
    }
    assert {t: n.state for t, n in notes.items()} == expected
    for ticket, note in notes.items():
        assert meetch.scan_ids_for(ticket) == {note.scan_id}, ticket
    delivered = {t: n.scan_id for t, n in notes.items() if n.state == "delivered"}
    assert meetch.flagged == delivered
    for ticket in rejected:
        assert notes[ticket].http_status == 422
    for ticket in unknown:
        assert notes[ticket].http_status == 404
    assert run.lies == []
    assert leased(store) == 0


def assert_no_tight_loop(requests: list[RecordedRequest], items: int) -> None:
    """Fewer requests than even a loop waiting only the backoff floor could send.

    Each ticket waits at least FLOOR_S between attempts, except when the API comes back
    online (its backoff is then forgotten, once): over a window of W seconds, ``items``
    tickets send at most about ``items * (W / FLOOR_S + 1)`` requests. A tight loop on
    loopback sends hundreds a second per ticket; the bound is doubled to stay generous.
    """
    if len(requests) < 2:
        return
    window = max(r.at for r in requests) - min(r.at for r in requests)
    bound = 2 * items * (window / FLOOR_S + 1)
    assert len(requests) <= bound, f"{len(requests)} requests in {window:.2f} s for {items}"


def assert_backoff_spacing(requests: list[RecordedRequest]) -> None:
    """Each ticket's attempts at least FLOOR_S apart.

    Holds until the API answers a ticket for good: that forgets every backoff (the items
    failed because the API was away), so give only requests from before any success.
    """
    attempts: dict[str, list[float]] = {}
    for r in requests:
        attempts.setdefault(r.headers["idempotency-key"], []).append(r.at)
    for key, times in attempts.items():
        for earlier, later in itertools.pairwise(sorted(times)):
            assert later - earlier >= FLOOR_S, f"{key} retried after {later - earlier:.4f} s"


def by_arrival(requests: list[RecordedRequest]) -> list[RecordedRequest]:
    """``requests`` in the order the simulator received them (it lists them as answered)."""
    return sorted(requests, key=lambda r: r.at)


def requests_beyond(meetch: SimulatedMeetch, count: int) -> Callable[[], bool]:
    """A condition: the simulator has received more than ``count`` requests."""
    return lambda: len(meetch.requests) > count


def faulty(meetch: SimulatedMeetch) -> int:
    """Scan requests a queued fault answered."""
    return sum(1 for r in meetch.scan_requests if r.fault)


def drain(store: Store, meetch: SimulatedMeetch) -> None:
    """Wait until nothing is pending and the simulator holds no request any more."""
    wait_until(lambda: settled(store, meetch), DRAIN_S)


# -- one kind of fault at a time ---------------------------------------------------------

Storm = Callable[[SimulatedMeetch, int], None]


def five_hundreds(meetch: SimulatedMeetch, n: int) -> None:
    """500, 502, 503, 504 in turn, JSON bodies."""
    for i in range(n):
        meetch.fail_next(1, (500, 502, 503, 504)[i % 4], b'{"error": "upstream"}')


def html_502(meetch: SimulatedMeetch, n: int) -> None:
    """nginx's 502 page."""
    meetch.html_502(n)


def captive_portal(meetch: SimulatedMeetch, n: int) -> None:
    """A 200 HTML login page answering for Meetch."""
    meetch.fail_next(n, 200, PORTAL, "text/html; charset=utf-8")


def html_4xx(meetch: SimulatedMeetch, n: int) -> None:
    """A proxy's 404 and 400 HTML pages: not Meetch saying the ticket is unknown or bad."""
    for i in range(n):
        if i % 2:
            meetch.fail_next(1, 400, HTML_400, "text/html")
        else:
            meetch.fail_next(1, 404, HTML_404, "text/html")


def invalid_json_5xx(meetch: SimulatedMeetch, n: int) -> None:
    """5xx whose JSON body is cut short or is not JSON at all."""
    for i in range(n):
        body = (b'{"error": "upstr', b"\xff\xfe not json", b"")[i % 3]
        meetch.fail_next(1, 503 if i % 2 else 500, body, "application/json")


def huge_bodies(meetch: SimulatedMeetch, n: int) -> None:
    """Proxy pages of several megabytes, chunked and with a Content-Length."""
    for i in range(n):
        meetch.huge_next(1, 4 << 20, chunked=bool(i % 2), status=(502, 503)[i % 2])


def stalls(meetch: SimulatedMeetch, n: int) -> None:
    """A hung proxy that never answers, past the client's timeout."""
    meetch.stall_next(n, STALL_S)


def resets(meetch: SimulatedMeetch, n: int) -> None:
    """Connections reset after the status line, in the headers or in the body of a 201."""
    for i in range(n):
        meetch.reset_next(1, after=("status", "headers", "body")[i % 3])


def rate_limited_now(meetch: SimulatedMeetch, n: int) -> None:
    """429 with Retry-After: 0 (only the backoff spaces the retries)."""
    meetch.rate_limit(n, 0)


@pytest.mark.parametrize(
    "storm",
    [
        five_hundreds,
        html_502,
        captive_portal,
        html_4xx,
        invalid_json_5xx,
        huge_bodies,
        stalls,
        resets,
        rate_limited_now,
    ],
)
def test_storm_is_retried_until_truly_delivered(
    storm: Storm,
    meetch: SimulatedMeetch,
    store: Store,
    start_sender: StartSender,
    figures: Record,
) -> None:
    """A storm of one kind of bad answer: all retried, then all delivered once, no lie told."""
    tickets = numbers(8)
    faults = (4 if storm is stalls else 16) * SCALE
    storm(meetch, faults)
    run = start_sender(max_in_flight=4, timeout_s=TIMEOUT_S if storm is stalls else 5.0)

    queue(store, run, tickets)

    drain(store, meetch)
    assert_truthful(run, store, meetch, tickets)
    assert faulty(meetch) == faults
    requests = meetch.scan_requests
    assert_no_tight_loop(requests, len(tickets))
    first_success = min(r.at for r in requests if not r.fault)
    assert_backoff_spacing([r for r in requests if r.at < first_success])
    assert run.sender.api_state == "online"
    figures("hostile_api_answers", faulty(meetch))


def test_garbled_success_from_meetch_is_delivered_first_time(
    meetch: SimulatedMeetch, store: Store, start_sender: StartSender, figures: Record
) -> None:
    """A 2xx from Meetch whose body is not JSON still flagged the ticket: delivered, once.

    CONTRACT §4: any 2xx means flagged. The body is not read for evidence; only an HTML
    page gives a proxy away. The simulator flags before garbling, so this is the truth.
    """
    tickets = numbers(10)
    bodies = [b'{"number": "000', b"", b"OK", b"\x00\xff", b"<!-- not html -->"]
    for i in range(len(tickets)):
        meetch.garble_next(1, bodies[i % len(bodies)])
    run = start_sender()

    queue(store, run, tickets)

    drain(store, meetch)
    assert_truthful(run, store, meetch, tickets)
    assert all(n.attempts == 1 for n in store.notifications())
    assert [r.fault for r in meetch.scan_requests] == ["garbled"] * len(tickets)
    figures("hostile_api_answers", faulty(meetch))


@pytest.mark.parametrize("after", ["status", "headers", "body"])
def test_answer_lost_after_meetch_flagged_is_replayed(
    after: str, meetch: SimulatedMeetch, store: Store, start_sender: StartSender, figures: Record
) -> None:
    """Meetch flagged, the answer was reset, slow past the timeout or huge: the retry with
    the same scan id is answered as a replay and the ticket is delivered, flagged once."""
    tickets = numbers(6)
    meetch.reset_next(2, after=after, processed=True)
    meetch.stall_next(2, STALL_S, processed=True)
    meetch.huge_next(2, 3 << 20, processed=True, chunked=after != "body")
    run = start_sender(max_in_flight=2, timeout_s=TIMEOUT_S)

    queue(store, run, tickets)

    drain(store, meetch)
    assert_truthful(run, store, meetch, tickets)
    assert faulty(meetch) == 6
    replays = [r for r in meetch.scan_requests if r.status == 200]
    assert len(replays) >= 2  # at least the reset ones were answered again
    figures("hostile_api_answers", faulty(meetch))


def test_real_refusals_among_a_storm_are_the_only_ones(
    meetch: SimulatedMeetch, store: Store, start_sender: StartSender, figures: Record
) -> None:
    """Meetch's own 422 and 404 (JSON) end rejected and unknown; proxy faults never do."""
    tickets = numbers(10)
    meetch.rejected_tickets.add(tickets[3])
    meetch.unknown_tickets.add(tickets[7])
    html_4xx(meetch, 6)
    invalid_json_5xx(meetch, 6)
    run = start_sender(max_in_flight=3)

    queue(store, run, tickets)

    drain(store, meetch)
    assert_truthful(
        run,
        store,
        meetch,
        tickets,
        rejected=frozenset({tickets[3]}),
        unknown=frozenset({tickets[7]}),
    )
    assert faulty(meetch) == 12
    figures("hostile_api_answers", faulty(meetch))


# -- no tight loop, honoured Retry-After ---------------------------------------------------


def test_endless_storm_goes_offline_and_probes_calmly(
    meetch: SimulatedMeetch, store: Store, start_sender: StartSender, figures: Record
) -> None:
    """A 5xx storm with no end: offline, then one probe at a time, each at least the
    backoff floor after the last; when the storm ends everything is delivered once."""
    tickets = numbers(6)
    meetch.fail_next(10**6, 503, b'{"error": "overloaded"}')
    run = start_sender(max_in_flight=4)
    queue(store, run, tickets)
    wait_until(lambda: run.sender.api_state == "offline", DRAIN_S)
    went_offline = time.monotonic()  # the clock RecordedRequest.at is read from
    probes = 20 * SCALE
    assert meetch.wait_for(
        lambda: sum(1 for r in meetch.requests if r.at > went_offline) >= probes + 4, DRAIN_S
    )

    storm = by_arrival(meetch.scan_requests)
    after = [r for r in storm if r.at > went_offline]
    # Requests already in flight when the API went offline (at most max_in_flight) may
    # arrive just after; from then on only single probes go out.
    calm = after[4:]
    for earlier, later in itertools.pairwise(calm):
        assert later.at - earlier.at >= FLOOR_S
    assert_no_tight_loop(storm, len(tickets))
    assert_backoff_spacing(storm)
    assert store.queue_counts()["pending"] == len(tickets)
    assert all(n.state == "pending" for n in store.notifications())

    meetch.clear_faults()

    drain(store, meetch)
    assert_truthful(run, store, meetch, tickets)
    assert run.sender.api_state == "online"
    figures("hostile_api_answers", faulty(meetch))


def test_endless_429_and_proxy_404_storm_backs_off_each_ticket(
    meetch: SimulatedMeetch, store: Store, start_sender: StartSender, figures: Record
) -> None:
    """429s without a wait and proxy 404 pages with no end: Meetch (or something) answers,
    so the API is not offline, and each ticket backs off on its own, never below the floor."""
    tickets = numbers(6)
    for _ in range(5000 * SCALE):
        meetch.rate_limit(1, 0)
        meetch.fail_next(1, 404, HTML_404, "text/html")
    run = start_sender(max_in_flight=4)
    queue(store, run, tickets)

    assert meetch.wait_for(lambda: len(meetch.requests) >= 60 * SCALE, DRAIN_S)

    storm = meetch.scan_requests
    assert_backoff_spacing(storm)
    assert_no_tight_loop(storm, len(tickets))
    assert run.sender.api_state != "offline"
    assert all(n.state == "pending" for n in store.notifications())
    meetch.clear_faults()
    drain(store, meetch)
    assert_truthful(run, store, meetch, tickets)
    figures("hostile_api_answers", faulty(meetch))


def test_429_storm_honours_retry_after(
    meetch: SimulatedMeetch, store: Store, start_sender: StartSender, figures: Record
) -> None:
    """After each 429 with Retry-After: 1, no scan request at all comes within that second."""
    tickets = numbers(3)
    limited = 3
    meetch.rate_limit(limited, 1)
    # One request at a time, so every request after a 429 was sent knowing of it.
    run = start_sender(max_in_flight=1)

    queue(store, run, tickets)

    drain(store, meetch)
    assert_truthful(run, store, meetch, tickets)
    requests = by_arrival(meetch.scan_requests)
    assert [r.status for r in requests[:limited]] == [429] * limited
    for earlier, later in itertools.pairwise(requests):
        if earlier.status == 429:
            assert later.at - earlier.at >= 1.0
    assert all(r.status in (200, 201) for r in requests[limited:])
    assert faulty(meetch) == limited
    assert run.sender.stats.attempts["rejected"] == 0
    figures("hostile_api_answers", faulty(meetch))


# -- everything at once ------------------------------------------------------------------------

FaultMaker = Callable[[SimulatedMeetch], None]
MIXED: list[tuple[int, FaultMaker]] = [
    (4, lambda m: m.fail_next(1, 500)),
    (3, lambda m: m.fail_next(1, 503, b'{"error": "upstr')),
    (3, lambda m: m.html_502(1)),
    (2, lambda m: m.fail_next(1, 200, PORTAL, "text/html")),
    (2, lambda m: m.fail_next(1, 404, HTML_404, "text/html")),
    (2, lambda m: m.garble_next(1)),
    (2, lambda m: m.huge_next(1, 4 << 20)),
    (1, lambda m: m.huge_next(1, 4 << 20, processed=True, chunked=False)),
    (1, lambda m: m.stall_next(1, STALL_S)),
    (1, lambda m: m.stall_next(1, STALL_S, processed=True)),
    (2, lambda m: m.reset_next(1, after="status")),
    (2, lambda m: m.reset_next(1, after="headers")),
    (2, lambda m: m.reset_next(1, after="body", processed=True)),
    (2, lambda m: m.rate_limit(1, 0)),
    (1, lambda m: m.fail_next(1, 502, b"", headers={"Retry-After": "soon"})),
]


def test_mixed_seeded_storm(
    meetch: SimulatedMeetch, store: Store, start_sender: StartSender, figures: Record
) -> None:
    """A seeded mix of every fault, with real refusals among the tickets: all truthful."""
    rng = random.Random(SEED)
    tickets = numbers(12 * SCALE, prefix="M")
    rejected, unknown = frozenset(tickets[5::17]), frozenset(tickets[9::19])
    meetch.rejected_tickets.update(rejected)
    meetch.unknown_tickets.update(unknown)
    weights = [w for w, _ in MIXED]
    storm = 60 * SCALE
    for make in rng.choices([m for _, m in MIXED], weights, k=storm):
        make(meetch)
    run = start_sender(max_in_flight=4, seed=rng.randrange(2**32), timeout_s=TIMEOUT_S)

    # Scans arrive while the storm rages, not all at once.
    for start in range(0, len(tickets), 4):
        queue(store, run, tickets[start : start + 4])
        wait_until(requests_beyond(meetch, start), DRAIN_S)

    drain(store, meetch)
    assert_truthful(run, store, meetch, tickets, rejected=rejected, unknown=unknown)
    # Answers Meetch processed deliver at once, so the last tickets may be done before
    # the last faults are used.
    assert faulty(meetch) + meetch.faults_pending == storm
    assert faulty(meetch) >= storm // 2
    assert_no_tight_loop(meetch.scan_requests, len(tickets))
    figures("hostile_api_answers", faulty(meetch))
