"""The simulated Meetch behaves as CONTRACT §4 assumes Meetch does, faults included."""

from __future__ import annotations

import json
import math
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from hardware_mocks.meetch_sim import NO_ANSWER, RESET_POINTS, SimulatedMeetch

SCAN = "/v1/items/scan"
CANCELLATIONS = "/v1/cancellations"
KEY = "test-key"
AGENT_HEADERS = {"Authorization": f"Bearer {KEY}", "User-Agent": "meetch-gate-agent/0.1.0"}


@pytest.fixture
def sim() -> Iterator[SimulatedMeetch]:
    """A running simulator accepting the key ``test-key``."""
    with SimulatedMeetch(api_keys=[KEY]) as meetch:
        yield meetch


@pytest.fixture
def client(sim: SimulatedMeetch) -> Iterator[httpx.Client]:
    """An httpx client that talks to the simulator the way the agent does."""
    with httpx.Client(base_url=sim.base_url, headers=AGENT_HEADERS, timeout=2.0) as http:
        yield http


def scan(
    client: httpx.Client, number: str, scan_id: str | None = None, **overrides: Any
) -> httpx.Response:
    """POST a well-formed scan notification; ``overrides`` replace body fields."""
    scan_id = scan_id or str(uuid.uuid4())
    body: dict[str, Any] = {
        "number": number,
        "scanned_at": "2026-02-20T19:42:07.120+01:00",
        "scan_id": scan_id,
        "organization_id": "org_abcdefg123",
    }
    body.update(overrides)
    return client.post(SCAN, json=body, headers={"Idempotency-Key": scan_id})


def test_accepted_scan_is_flagged_and_recorded(sim: SimulatedMeetch, client: httpx.Client) -> None:
    """A well-formed scan gets 201, flags the ticket and is recorded with its status."""
    response = scan(client, "000001", "s-1")

    assert response.status_code == 201
    assert response.json() == {"number": "000001", "scan_id": "s-1", "flagged": True}
    assert response.headers["content-type"] == "application/json"
    assert sim.flagged == {"000001": "s-1"}
    (recorded,) = sim.requests
    assert (recorded.method, recorded.path, recorded.status) == ("POST", SCAN, 201)
    assert recorded.headers["idempotency-key"] == "s-1"
    assert recorded.headers["authorization"] == f"Bearer {KEY}"
    assert recorded.json is not None
    assert recorded.json["number"] == "000001"
    assert recorded.at <= time.monotonic()


def test_same_scan_id_replays_the_first_answer(client: httpx.Client) -> None:
    """Sending the same scan id again is an idempotent replay: 200 with the first body."""
    first = scan(client, "000001", "s-1")
    again = scan(client, "000001", "s-1")

    assert again.status_code == 200
    assert again.content == first.content


def test_second_scan_id_is_409_and_both_ids_are_seen(
    sim: SimulatedMeetch, client: httpx.Client
) -> None:
    """Another scan id for a flagged ticket gets 409; scan_ids_for shows both ids."""
    scan(client, "000001", "s-1")
    response = scan(client, "000001", "s-2")

    assert response.status_code == 409
    assert response.json() == {"error": "already flagged"}
    assert sim.flagged == {"000001": "s-1"}
    assert sim.scan_ids_for("000001") == {"s-1", "s-2"}
    assert sim.scan_ids_for("000002") == set()


def test_wrong_key_is_401_until_the_key_set_changes(
    sim: SimulatedMeetch, client: httpx.Client
) -> None:
    """A key outside the set gets 401 (scan and list alike); set_api_keys changes the set."""
    sim.set_api_keys(["new-key"])

    assert scan(client, "000001").status_code == 401
    assert client.get(CANCELLATIONS).status_code == 401
    assert sim.flagged == {}

    client.headers["Authorization"] = "Bearer new-key"
    assert scan(client, "000001").status_code == 201


def test_missing_authorization_is_401(sim: SimulatedMeetch) -> None:
    """A request without an Authorization header gets 401 with a JSON error."""
    with httpx.Client(base_url=sim.base_url, timeout=2.0) as anonymous:
        response = anonymous.get(CANCELLATIONS)

    assert response.status_code == 401
    assert response.json() == {"error": "invalid api key"}


def test_unknown_ticket_is_404(sim: SimulatedMeetch, client: httpx.Client) -> None:
    """A ticket in unknown_tickets gets 404 unknown item and is not flagged."""
    sim.unknown_tickets.add("000404")

    response = scan(client, "000404")

    assert response.status_code == 404
    assert response.json() == {"error": "unknown item"}
    assert sim.flagged == {}


def test_rejected_ticket_is_422(sim: SimulatedMeetch, client: httpx.Client) -> None:
    """A ticket in rejected_tickets gets 422, a permanent error."""
    sim.rejected_tickets.add("000422")

    response = scan(client, "000422")

    assert response.status_code == 422
    assert "error" in response.json()
    assert sim.flagged == {}


@pytest.mark.parametrize(
    ("overrides", "headers", "mentions"),
    [
        ({"scanned_at": "2026-02-20T19:42:07"}, {}, "scanned_at"),
        ({"scanned_at": "20260220T194207+0100"}, {}, "scanned_at"),
        ({"number": 1}, {}, "number"),
        ({"organization_id": 7}, {}, "organization_id"),
        ({}, {"Idempotency-Key": "other"}, "Idempotency-Key"),
        ({}, {"User-Agent": "curl/8.0"}, "User-Agent"),
    ],
)
def test_malformed_scan_is_400(
    sim: SimulatedMeetch,
    client: httpx.Client,
    overrides: dict[str, Any],
    headers: dict[str, str],
    mentions: str,
) -> None:
    """A malformed body or a wrong agent header gets 400 naming the problem."""
    body = {"number": "000001", "scanned_at": "2026-02-20T19:42:07Z", "scan_id": "s-1"}
    body.update(overrides)
    response = client.post(SCAN, json=body, headers={"Idempotency-Key": "s-1", **headers})

    assert response.status_code == 400
    assert mentions in response.json()["error"]
    assert sim.flagged == {}


def test_non_json_body_is_400(client: httpx.Client) -> None:
    """A body that is not a JSON object gets 400."""
    response = client.post(SCAN, content=b"number=000001", headers={"Idempotency-Key": "s-1"})

    assert response.status_code == 400
    assert response.json() == {"error": "body must be a JSON object"}


def test_chunked_body_is_read(sim: SimulatedMeetch, client: httpx.Client) -> None:
    """A body sent with chunked transfer encoding is decoded like any other."""
    parts = [b'{"number": "000001", "scan_id": "s-1", ', b'"scanned_at": "2026-02-20T19:42:07Z"}']

    response = client.post(SCAN, content=iter(parts), headers={"Idempotency-Key": "s-1"})

    assert response.status_code == 201
    assert sim.requests[0].headers["transfer-encoding"] == "chunked"
    assert sim.requests[0].body == b"".join(parts)


def test_oversized_body_is_413_and_recorded(sim: SimulatedMeetch, client: httpx.Client) -> None:
    """A body over 1 MiB gets 413 and is recorded; the connection stays usable."""
    response = client.post(SCAN, content=b"x" * ((1 << 20) + 1))

    assert response.status_code == 413
    assert scan(client, "000001").status_code == 201
    assert [r.status for r in sim.requests] == [413, 201]
    assert sim.connections_accepted == 1


def test_canned_faults_come_first_in_order(sim: SimulatedMeetch, client: httpx.Client) -> None:
    """fail_next, html_502 and rate_limit answer the next scans in FIFO order, before auth."""
    sim.fail_next(1, 503, b"busy", "text/plain", headers={"X-Trace": "lb-7"})
    sim.html_502(1)
    sim.rate_limit(1, retry_after_s=1.2)
    sim.set_api_keys([])  # the faults come from a proxy, which never looks at the key

    unavailable, bad_gateway, limited = (scan(client, "000001", "s-1") for _ in range(3))
    after = scan(client, "000001", "s-1")

    assert (unavailable.status_code, unavailable.text) == (503, "busy")
    assert unavailable.headers["x-trace"] == "lb-7"
    assert bad_gateway.status_code == 502
    assert bad_gateway.headers["content-type"] == "text/html"
    assert "<h1>502 Bad Gateway</h1>" in bad_gateway.text
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "2"
    assert after.status_code == 401
    assert [r.status for r in sim.requests] == [503, 502, 429, 401]
    assert sim.scan_ids_for("000001") == {"s-1"}


def test_fail_next_defaults_to_a_json_500(sim: SimulatedMeetch, client: httpx.Client) -> None:
    """fail_next(n) answers n scans 500 with a JSON body, then scans are served again."""
    sim.fail_next(2)

    statuses = [scan(client, "000001", "s-1").status_code for _ in range(3)]

    assert statuses == [500, 500, 201]
    assert sim.requests[0].status == 500


def test_canned_faults_only_hit_scans(sim: SimulatedMeetch, client: httpx.Client) -> None:
    """The cancellations list is not answered by a queued scan fault."""
    sim.fail_next(1)

    assert client.get(CANCELLATIONS).status_code == 200
    assert scan(client, "000001").status_code == 500


def test_a_canned_success_flags_nothing(sim: SimulatedMeetch, client: httpx.Client) -> None:
    """A canned 2xx comes from in front of Meetch: the ticket stays unflagged."""
    sim.fail_next(1, 200, b'{"flagged": true}')

    assert scan(client, "000001", "s-1").status_code == 200
    assert sim.flagged == {}
    assert [(r.status, r.fault) for r in sim.requests] == [(200, "canned")]
    assert scan(client, "000001", "s-1").status_code == 201


def test_faults_queue_in_order_and_can_be_cleared(
    sim: SimulatedMeetch, client: httpx.Client
) -> None:
    """Every kind of fault joins one FIFO; faults_pending counts it, clear_faults empties it."""
    sim.fail_next(1, 503)
    sim.garble_next(1)
    sim.reset_next(1)
    sim.html_502(2)
    assert sim.faults_pending == 5

    first = scan(client, "000001", "s-1")
    second = scan(client, "000002", "s-2")
    with pytest.raises(httpx.TransportError):
        scan(client, "000003", "s-3")
    sim.clear_faults()

    assert (first.status_code, second.status_code) == (503, 201)
    assert sim.faults_pending == 0
    assert scan(client, "000003", "s-3").status_code == 201
    assert [(r.status, r.fault) for r in sim.requests] == [
        (503, "canned"),
        (201, "garbled"),
        (NO_ANSWER, "reset"),
        (201, ""),
    ]


@pytest.mark.parametrize("after", RESET_POINTS)
def test_reset_mid_answer_flags_nothing(
    sim: SimulatedMeetch, client: httpx.Client, after: str
) -> None:
    """A reset in front of Meetch is a transport error, status 0, and flags nothing."""
    sim.reset_next(1, after=after)

    with pytest.raises(httpx.TransportError):
        scan(client, "000001", "s-1")

    assert sim.flagged == {}
    assert sim.scan_ids_for("000001") == {"s-1"}
    assert [(r.status, r.fault) for r in sim.requests] == [(NO_ANSWER, "reset")]
    assert scan(client, "000001", "s-1").status_code == 201  # the client reconnects


def read_to_end(raw: socket.socket, into: bytearray) -> None:
    """Read ``raw`` into ``into`` until a clean end of stream (or an error)."""
    while chunk := raw.recv(65536):
        into += chunk


@pytest.mark.parametrize("after", RESET_POINTS)
def test_reset_is_a_tcp_reset_after_part_of_the_answer(sim: SimulatedMeetch, after: str) -> None:
    """The peer reads the start of the answer, then ECONNRESET, never a clean end of stream."""
    sim.reset_next(1, after=after, status=201)
    body = json.dumps({"number": "000001", "scanned_at": "2026-02-20T19:42:07Z", "scan_id": "s"})
    request = f"POST {SCAN} HTTP/1.1\r\nHost: meetch\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    received = bytearray()
    with socket.create_connection(("127.0.0.1", sim.port), timeout=5) as raw:
        raw.sendall(request.encode())
        with pytest.raises(ConnectionResetError):
            read_to_end(raw, received)

    assert received.startswith(b"HTTP/1.1 201 Created\r\n")
    if after == "status":
        assert received == b"HTTP/1.1 201 Created\r\n"
    else:
        assert (b"\r\n\r\n" in received) is (after == "body")
    if after == "body":
        header, _, partial = bytes(received).partition(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", header).group(1))  # type: ignore[union-attr]
        assert 0 < len(partial) < length


def test_reset_after_processing_flags_the_ticket(
    sim: SimulatedMeetch, client: httpx.Client
) -> None:
    """processed=True: Meetch flagged the ticket, only the answer was lost; a retry replays."""
    sim.reset_next(1, after="body", processed=True)

    with pytest.raises(httpx.TransportError):
        scan(client, "000001", "s-1")

    assert sim.flagged == {"000001": "s-1"}
    assert scan(client, "000001", "s-1").status_code == 200
    assert [r.status for r in sim.requests] == [NO_ANSWER, 200]


def test_stall_past_the_timeout_answers_nothing_and_flags_nothing(
    sim: SimulatedMeetch, client: httpx.Client
) -> None:
    """A hung proxy: the client times out, the request is cut with status 0, nothing flagged."""
    sim.stall_next(1, 0.3)

    with pytest.raises(httpx.ReadTimeout):
        client.post(
            SCAN,
            json={"number": "000001", "scanned_at": "2026-02-20T19:42:07Z", "scan_id": "s-1"},
            headers={"Idempotency-Key": "s-1"},
            timeout=0.05,
        )

    assert sim.wait_for(lambda: len(sim.requests) == 1, timeout=5)
    assert [(r.status, r.fault) for r in sim.requests] == [(NO_ANSWER, "stall")]
    assert sim.flagged == {}
    assert scan(client, "000001", "s-1").status_code == 201


def test_stall_then_close_without_a_byte(sim: SimulatedMeetch, client: httpx.Client) -> None:
    """A client that waits longer sees the connection closed with no answer, after the stall."""
    sim.stall_next(1, 0.1)
    started = time.monotonic()

    with pytest.raises(httpx.RemoteProtocolError):
        scan(client, "000001", "s-1")

    assert time.monotonic() - started >= 0.1
    assert sim.flagged == {}


def test_processed_stall_is_a_slow_meetch(sim: SimulatedMeetch, client: httpx.Client) -> None:
    """processed=True: the answer comes after the stall, and flags; a client gone still flags."""
    sim.stall_next(1, 0.1, processed=True)
    started = time.monotonic()

    response = scan(client, "000001", "s-1")

    assert response.status_code == 201
    assert time.monotonic() - started >= 0.1
    sim.stall_next(1, 0.2, processed=True)
    with pytest.raises(httpx.ReadTimeout):
        client.post(
            SCAN,
            json={"number": "000002", "scanned_at": "2026-02-20T19:42:07Z", "scan_id": "s-2"},
            headers={"Idempotency-Key": "s-2"},
            timeout=0.05,
        )
    assert sim.wait_for(lambda: "000002" in sim.flagged, timeout=5)
    assert [r.fault for r in sim.requests] == ["stall", "stall"]


def test_stop_cuts_a_stall_short(sim: SimulatedMeetch, client: httpx.Client) -> None:
    """A stalled request does not hold stop() up: it is cut, recorded with status 0."""
    sim.stall_next(1, 60, processed=True)
    errors: list[Exception] = []

    def request() -> None:
        try:
            scan(client, "000001", "s-1")
        except httpx.TransportError as exc:
            errors.append(exc)

    worker = threading.Thread(target=request)
    worker.start()
    assert sim.wait_for(lambda: sim.in_flight == 1, timeout=5)

    sim.stop()
    worker.join(timeout=10)

    assert not worker.is_alive()
    assert len(errors) == 1
    assert [(r.status, r.fault) for r in sim.requests] == [(NO_ANSWER, "stall")]
    assert sim.flagged == {}


def test_garbled_answer_keeps_status_and_flags(sim: SimulatedMeetch, client: httpx.Client) -> None:
    """Meetch flags the ticket, then its answer body is not JSON; the status stands."""
    sim.garble_next(1, b'{"number": "0000')

    response = scan(client, "000001", "s-1")

    assert response.status_code == 201
    assert response.headers["content-type"] == "application/json"
    assert response.content == b'{"number": "0000'
    with pytest.raises(json.JSONDecodeError):
        response.json()
    assert sim.flagged == {"000001": "s-1"}
    assert [(r.status, r.fault) for r in sim.requests] == [(201, "garbled")]


@pytest.mark.parametrize("chunked", [True, False])
def test_huge_proxy_page_flags_nothing(
    sim: SimulatedMeetch, client: httpx.Client, chunked: bool
) -> None:
    """A proxy's multi-megabyte page, chunked or with a length, is read whole; not flagged."""
    sim.huge_next(1, 3 << 20, chunked=chunked)

    response = scan(client, "000001", "s-1")

    assert response.status_code == 502
    assert len(response.content) == 3 << 20
    assert response.content.startswith(b"<html>")
    assert ("transfer-encoding" in response.headers) is chunked
    assert ("content-length" in response.headers) is not chunked
    assert sim.flagged == {}
    assert [(r.status, r.fault) for r in sim.requests] == [(502, "huge")]


def test_huge_meetch_answer_is_padded_json_and_flags(
    sim: SimulatedMeetch, client: httpx.Client
) -> None:
    """processed=True: Meetch's own answer padded with white space, still JSON; flagged."""
    sim.huge_next(1, 2 << 20, processed=True)

    response = scan(client, "000001", "s-1")

    assert response.status_code == 201
    assert len(response.content) == 2 << 20
    assert response.json() == {"number": "000001", "scan_id": "s-1", "flagged": True}
    assert sim.flagged == {"000001": "s-1"}


def test_huge_answer_abandoned_by_the_client(sim: SimulatedMeetch, client: httpx.Client) -> None:
    """A client that reads 64 KiB of a huge answer and hangs up leaves the simulator serving."""
    sim.huge_next(1, 8 << 20)
    body = {"number": "000001", "scanned_at": "2026-02-20T19:42:07Z", "scan_id": "s-1"}

    with client.stream("POST", SCAN, json=body, headers={"Idempotency-Key": "s-1"}) as response:
        first = next(response.iter_bytes(64 << 10))

    assert response.status_code == 502
    assert first
    assert scan(client, "000002", "s-2").status_code == 201
    assert sim.flagged == {"000002": "s-2"}


@pytest.mark.parametrize(
    "call",
    [
        lambda sim: sim.reset_next(1, after="trailers"),
        lambda sim: sim.stall_next(1, -1),
        lambda sim: sim.huge_next(1, -1),
        lambda sim: sim.garble_next(-1),
    ],
)
def test_fault_arguments_are_checked(sim: SimulatedMeetch, call: Any) -> None:
    """Nonsense fault arguments are refused with ValueError, and nothing is queued."""
    with pytest.raises(ValueError, match="must"):
        call(sim)
    assert sim.faults_pending == 0


def test_latency_delays_every_answer(sim: SimulatedMeetch, client: httpx.Client) -> None:
    """latency_s delays answers: a short client timeout expires, a long one waits it out."""
    sim.latency_s = 0.2

    with pytest.raises(httpx.ReadTimeout):
        client.get(CANCELLATIONS, timeout=0.05)
    started = time.monotonic()
    response = client.get(CANCELLATIONS)

    assert response.status_code == 200
    assert time.monotonic() - started >= 0.2


def test_latency_happens_before_flagging(sim: SimulatedMeetch, client: httpx.Client) -> None:
    """A client that times out still gets its ticket flagged once the delay ends."""
    sim.latency_s = 0.1

    with pytest.raises(httpx.ReadTimeout):
        client.post(
            SCAN,
            json={"number": "000001", "scanned_at": "2026-02-20T19:42:07Z", "scan_id": "s-1"},
            headers={"Idempotency-Key": "s-1"},
            timeout=0.02,
        )

    assert sim.wait_for(lambda: "000001" in sim.flagged, timeout=2.0)
    sim.latency_s = 0.0
    assert scan(client, "000001", "s-1").status_code == 200


def test_go_offline_refuses_and_go_online_restores(
    sim: SimulatedMeetch, client: httpx.Client
) -> None:
    """Offline: pooled and new connections fail with ConnectError; online: same URL works."""
    base_url = sim.base_url
    assert scan(client, "000001", "s-1").status_code == 201  # leaves a pooled connection

    sim.go_offline()

    with pytest.raises(httpx.ConnectError):
        client.get(CANCELLATIONS)
    with (
        httpx.Client(base_url=base_url, headers=AGENT_HEADERS, timeout=2.0) as fresh,
        pytest.raises(httpx.ConnectError),
    ):
        fresh.get(CANCELLATIONS)
    assert not sim.online

    sim.go_online()

    assert sim.base_url == base_url
    assert scan(client, "000001", "s-1").status_code == 200  # state survived the outage


def test_go_offline_cuts_requests_waiting_out_latency(
    sim: SimulatedMeetch, client: httpx.Client
) -> None:
    """A request held by latency is cut promptly by go_offline and recorded with status 0."""
    sim.latency_s = 30.0
    errors: list[Exception] = []

    def request() -> None:
        try:
            client.get(CANCELLATIONS, timeout=5.0)
        except httpx.TransportError as exc:
            errors.append(exc)

    worker = threading.Thread(target=request)
    worker.start()
    assert sim.wait_for(lambda: sim.in_flight == 1, timeout=2.0)

    started = time.monotonic()
    sim.stop()
    worker.join(timeout=5.0)

    assert time.monotonic() - started < 1.0
    assert not worker.is_alive()
    assert len(errors) == 1
    assert [r.status for r in sim.requests] == [NO_ANSWER]


def test_keep_alive_reuses_one_connection(sim: SimulatedMeetch, client: httpx.Client) -> None:
    """Answers carry Content-Length and keep the connection open for the next request."""
    for number in ("000001", "000002", "000003"):
        response = scan(client, number)
        assert response.headers["content-length"] == str(len(response.content))

    assert sim.connections_accepted == 1


def test_wait_for_wakes_on_a_request_and_times_out(
    sim: SimulatedMeetch, client: httpx.Client
) -> None:
    """wait_for returns True once a request satisfies the predicate, False on timeout."""
    assert not sim.wait_for(lambda: bool(sim.flagged), timeout=0.01)

    worker = threading.Thread(target=scan, args=(client, "000001"))
    worker.start()
    try:
        assert sim.wait_for(lambda: "000001" in sim.flagged, timeout=2.0)
    finally:
        worker.join()


def test_cancellations_are_ordered_and_paginated(
    sim: SimulatedMeetch, client: httpx.Client
) -> None:
    """The list is ordered by refunded_at and cut into pages with has_more."""
    sim.cancellations_page_size = 2
    sim.add_refund("000003", "2026-02-20T21:00:00+01:00")
    sim.add_refund("000001", "2026-02-20T18:00:00Z")
    sim.add_refund("000002", "2026-02-20T19:30:00+00:00")

    pages = [client.get(CANCELLATIONS, params={"page": n}).json() for n in (1, 2, 3)]

    assert pages[0] == {
        "data": [
            {"number": "000001", "refunded_at": "2026-02-20T18:00:00Z"},
            {"number": "000002", "refunded_at": "2026-02-20T19:30:00+00:00"},
        ],
        "has_more": True,
    }
    assert pages[1] == {
        "data": [{"number": "000003", "refunded_at": "2026-02-20T21:00:00+01:00"}],
        "has_more": False,
    }
    assert pages[2] == {"data": [], "has_more": False}
    assert client.get(CANCELLATIONS).json() == pages[0]  # page defaults to 1


def test_cancellations_since_is_strict_and_offset_aware(
    sim: SimulatedMeetch, client: httpx.Client
) -> None:
    """since keeps refunds strictly after it, comparing instants across offsets."""
    sim.add_refund("000001", "2026-02-20T18:00:00Z")
    sim.add_refund("000002", "2026-02-20T19:30:00Z")

    def numbers(since: str) -> list[str]:
        response = client.get(CANCELLATIONS, params={"since": since})
        assert response.status_code == 200
        return [item["number"] for item in response.json()["data"]]

    # 19:00+01:00 is 18:00Z: the first refund is not strictly after it.
    assert numbers("2026-02-20T19:00:00+01:00") == ["000002"]
    assert numbers("2026-02-20T17:59:59.999Z") == ["000001", "000002"]
    assert numbers("2026-02-20T19:30:00Z") == []
    # A client that leaves the '+' unencoded is understood too.
    raw = client.get(f"{CANCELLATIONS}?since=2026-02-20T19:00:00+01:00")
    assert [item["number"] for item in raw.json()["data"]] == ["000002"]
    assert sim.requests[-1].query == {"since": "2026-02-20T19:00:00+01:00"}


@pytest.mark.parametrize("query", [{"since": "yesterday"}, {"page": "0"}, {"page": "two"}])
def test_cancellations_bad_query_is_400(client: httpx.Client, query: dict[str, str]) -> None:
    """An unparsable since or a page below 1 gets 400."""
    assert client.get(CANCELLATIONS, params=query).status_code == 400


def test_add_refund_defaults_to_now_in_utc(sim: SimulatedMeetch, client: httpx.Client) -> None:
    """add_refund without a time lists the item as refunded now, in UTC."""
    sim.add_refund("000001")

    (item,) = client.get(CANCELLATIONS).json()["data"]

    assert item["number"] == "000001"
    assert item["refunded_at"].endswith("Z")
    with pytest.raises(ValueError, match="RFC 3339"):
        sim.add_refund("000002", "2026-02-20 late")


def test_unknown_path_is_404_and_wrong_method_405(client: httpx.Client) -> None:
    """Paths outside the API get 404; the wrong method on an API path gets 405."""
    assert client.get("/v1/nothing").status_code == 404
    wrong = client.get(SCAN)
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "POST"


def test_custom_paths_are_served() -> None:
    """scan_path and cancellations_path move the API, as the agent's config can."""
    with (
        SimulatedMeetch(scan_path="/api/scan", cancellations_path="/api/refunds") as sim,
        httpx.Client(base_url=sim.base_url, headers=AGENT_HEADERS, timeout=2.0) as http,
    ):
        assert http.get("/api/refunds").status_code == 200
        assert http.get(CANCELLATIONS).status_code == 404


def test_rate_limit_rounds_retry_after_up() -> None:
    """Retry-After is the ceiling of the seconds asked for, as an integer."""
    with (
        SimulatedMeetch() as sim,
        httpx.Client(base_url=sim.base_url, headers=AGENT_HEADERS, timeout=2.0) as http,
    ):
        for seconds in (0.0, 0.1, 3.0):
            sim.rate_limit(1, seconds)
            response = scan(http, "000001")
            assert response.headers["retry-after"] == str(math.ceil(seconds))


def test_command_line_prints_one_line_per_request() -> None:
    """`python -m hardware_mocks.meetch_sim` serves, prints each request, stops on SIGTERM."""
    command = [sys.executable, "-m", "hardware_mocks.meetch_sim", "--port", "0", "--key", "K"]
    command += ["--unknown", "000404", "--refunded", "000002"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            banner = process.stdout.readline()
            found = re.search(r"http://[\d.]+:\d+", banner)
            assert found, banner
            url = found.group()
            headers = {**AGENT_HEADERS, "Authorization": "Bearer K"}
            with httpx.Client(base_url=url, headers=headers, timeout=2.0) as http:
                listed = http.get(CANCELLATIONS).json()["data"]
                unknown = scan(http, "000404", "s-1")
            line = process.stdout.readline()
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=5.0)
            # Not communicate(): it reads the pipe directly and misses what readline() buffered.
            rest = process.stdout.read()
        finally:
            if process.poll() is None:
                process.kill()

    assert [item["number"] for item in listed] == ["000002"]
    assert unknown.status_code == 404
    assert "GET /v1/cancellations 200" in line
    assert "POST /v1/items/scan 404 number=000404 scan_id=s-1" in rest
    assert process.returncode == 0
