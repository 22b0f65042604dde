"""The Meetch client against the simulated Meetch on loopback (CONTRACT §4)."""

from __future__ import annotations

import email.utils
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from agent import __version__
from agent.config import MeetchSettings
from agent.errors import DeliveryError
from agent.meetch import (
    MAX_KEPT_BODY,
    Answer,
    MeetchClient,
    Outcome,
    ScanNotice,
    classify,
    retry_after,
)
from hardware_mocks.meetch_sim import SimulatedMeetch
from tests.conftest import API_KEY

SCANNED_AT = "2026-02-20T19:42:07.120+01:00"

ClientFactory = Callable[..., MeetchClient]


@pytest.fixture
def make_client(meetch: SimulatedMeetch) -> Iterator[ClientFactory]:
    """Makes MeetchClients pointed at the simulator; all closed at the end."""
    made: list[MeetchClient] = []

    def make(api_key: str = API_KEY, **settings: Any) -> MeetchClient:
        options: dict[str, Any] = {"base_url": meetch.base_url, "timeout_s": 5.0, **settings}
        client = MeetchClient(MeetchSettings(**options), api_key)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def client(make_client: ClientFactory) -> MeetchClient:
    """A client with the accepted key and default settings."""
    return make_client()


def notice(ticket: str = "000001", scan_id: str | None = None) -> ScanNotice:
    """A scan notice for ``ticket`` with a fresh scan id."""
    return ScanNotice(scan_id or str(uuid.uuid4()), ticket, SCANNED_AT)


# -- request shape -------------------------------------------------------------------


def test_notify_sends_the_contract_request(meetch: SimulatedMeetch, client: MeetchClient) -> None:
    """A notification is a POST to scan_path with auth, user agent, idempotency key and body."""
    sent = notice("000001")

    answer = client.notify(sent)

    assert answer.outcome is Outcome.DELIVERED
    assert answer.status == 201
    [request] = meetch.requests
    assert (request.method, request.path) == ("POST", "/v1/items/scan")
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.headers["user-agent"] == f"meetch-gate-agent/{__version__}"
    assert request.headers["idempotency-key"] == sent.scan_id
    assert request.headers["content-type"] == "application/json"
    assert request.json == {"number": "000001", "scanned_at": SCANNED_AT, "scan_id": sent.scan_id}


def test_organization_id_is_sent_when_configured(
    meetch: SimulatedMeetch, make_client: ClientFactory
) -> None:
    """organization_id is in the body only when the settings carry one."""
    make_client(organization_id="org_abcdefg123").notify(notice("000001"))
    make_client(organization_id="").notify(notice("000002"))

    with_org, without_org = meetch.requests
    assert with_org.json["organization_id"] == "org_abcdefg123"
    assert "organization_id" not in without_org.json


def test_paths_come_from_settings() -> None:
    """scan_path and cancellations_path are taken from the settings, not hard-coded."""
    with SimulatedMeetch(
        api_keys=[API_KEY], scan_path="/api/v2/scan", cancellations_path="/api/v2/refunds"
    ) as sim:
        settings = MeetchSettings(
            base_url=sim.base_url,
            scan_path="/api/v2/scan",
            cancellations_path="/api/v2/refunds",
            timeout_s=5.0,
        )
        client = MeetchClient(settings, API_KEY)
        try:
            assert client.notify(notice()).outcome is Outcome.DELIVERED
            assert client.cancellations(None) == []
        finally:
            client.close()
        assert [(r.method, r.path) for r in sim.requests] == [
            ("POST", "/api/v2/scan"),
            ("GET", "/api/v2/refunds"),
        ]


def test_set_key_is_used_from_the_next_request(
    meetch: SimulatedMeetch, client: MeetchClient
) -> None:
    """After set_key the new key is sent."""
    meetch.set_api_keys(["new-key"])
    assert client.notify(notice("000001")).outcome is Outcome.AUTH_FAILED

    client.set_key("new-key")

    assert client.notify(notice("000001")).outcome is Outcome.DELIVERED
    assert meetch.requests[-1].headers["authorization"] == "Bearer new-key"


def test_connection_is_kept_alive(meetch: SimulatedMeetch, client: MeetchClient) -> None:
    """Several notifications reuse one pooled connection."""
    for ticket in ("000001", "000002", "000003"):
        assert client.notify(notice(ticket)).outcome is Outcome.DELIVERED

    assert meetch.connections_accepted == 1


# -- classification of real answers --------------------------------------------------


def test_created_is_delivered(client: MeetchClient) -> None:
    """201 means flagged: delivered."""
    answer = client.notify(notice())

    assert (answer.outcome, answer.status) == (Outcome.DELIVERED, 201)


def test_already_flagged_is_delivered(meetch: SimulatedMeetch, client: MeetchClient) -> None:
    """409 (flagged by another scan id) and an idempotent replay both count as delivered."""
    first = notice("000001")
    client.notify(first)

    replay = client.notify(first)
    other = client.notify(notice("000001"))

    assert (replay.outcome, replay.status) == (Outcome.DELIVERED, 200)
    assert (other.outcome, other.status) == (Outcome.DELIVERED, 409)
    assert meetch.flagged == {"000001": first.scan_id}


def test_unknown_item_is_unknown(meetch: SimulatedMeetch, client: MeetchClient) -> None:
    """404 means Meetch does not know the ticket."""
    meetch.unknown_tickets.add("000404")

    answer = client.notify(notice("000404"))

    assert (answer.outcome, answer.status) == (Outcome.UNKNOWN, 404)


def test_refused_key_is_auth_failed(make_client: ClientFactory) -> None:
    """401 means the key is refused."""
    answer = make_client(api_key="wrong-key").notify(notice())

    assert (answer.outcome, answer.status) == (Outcome.AUTH_FAILED, 401)
    assert "wrong-key" not in answer.detail


def test_forbidden_is_auth_failed(meetch: SimulatedMeetch, client: MeetchClient) -> None:
    """403 is a refused key too."""
    meetch.fail_next(1, 403, b'{"error":"forbidden"}')

    answer = client.notify(notice())

    assert (answer.outcome, answer.status) == (Outcome.AUTH_FAILED, 403)


def test_unprocessable_is_rejected_with_status_and_body(
    meetch: SimulatedMeetch, client: MeetchClient
) -> None:
    """422 is permanent: rejected, with the status and Meetch's reason kept."""
    meetch.rejected_tickets.add("000422")

    answer = client.notify(notice("000422"))

    assert (answer.outcome, answer.status) == (Outcome.REJECTED, 422)
    assert answer.detail.startswith("HTTP 422")
    assert "item cannot be flagged as scanned" in answer.detail
    assert answer.retry_after_s is None


def test_bad_request_is_rejected(meetch: SimulatedMeetch, client: MeetchClient) -> None:
    """Any other 4xx (here 400) is permanent."""
    meetch.fail_next(1, 400, b'{"error":"bad number"}')

    answer = client.notify(notice())

    assert (answer.outcome, answer.status) == (Outcome.REJECTED, 400)
    assert "bad number" in answer.detail


@pytest.mark.parametrize("status", [408, 425, 500, 503, 504])
def test_transient_statuses_are_retried(
    meetch: SimulatedMeetch, client: MeetchClient, status: int
) -> None:
    """408, 425 and 5xx are transient."""
    meetch.fail_next(1, status)

    answer = client.notify(notice())

    assert (answer.outcome, answer.status) == (Outcome.RETRY, status)
    assert answer.detail.startswith(f"HTTP {status}")


def test_html_bad_gateway_is_retried(meetch: SimulatedMeetch, client: MeetchClient) -> None:
    """nginx's HTML 502 page is transient, and its markup is kept on one line."""
    meetch.html_502(1)

    answer = client.notify(notice())

    assert (answer.outcome, answer.status) == (Outcome.RETRY, 502)
    assert "502 Bad Gateway" in answer.detail
    assert "\n" not in answer.detail


def test_rate_limit_is_retried_after_the_given_seconds(
    meetch: SimulatedMeetch, client: MeetchClient
) -> None:
    """429 is transient and carries Retry-After in seconds."""
    meetch.rate_limit(1, 7)

    answer = client.notify(notice())

    assert (answer.outcome, answer.status) == (Outcome.RETRY, 429)
    assert answer.retry_after_s == 7.0


def test_rate_limit_with_an_http_date(meetch: SimulatedMeetch, client: MeetchClient) -> None:
    """A Retry-After HTTP date becomes the seconds until then."""
    later = email.utils.formatdate(time.time() + 120, usegmt=True)
    meetch.fail_next(1, 429, b"{}", headers={"Retry-After": later})

    answer = client.notify(notice())

    assert answer.outcome is Outcome.RETRY
    assert answer.retry_after_s is not None
    assert 100 < answer.retry_after_s <= 120


def test_captive_portal_page_is_not_delivered(
    meetch: SimulatedMeetch, client: MeetchClient
) -> None:
    """A 200 HTML page (a captive portal answering for Meetch) is retried, not delivered."""
    meetch.fail_next(1, 200, b"<html><body>Log in to Venue-WiFi</body></html>", "text/html")

    answer = client.notify(notice("000001"))

    assert (answer.outcome, answer.status) == (Outcome.RETRY, 200)
    assert client.notify(notice("000001")).outcome is Outcome.DELIVERED


def test_redirect_is_retried_not_followed(meetch: SimulatedMeetch, client: MeetchClient) -> None:
    """A 302 to a login page is transient and is not followed."""
    meetch.fail_next(1, 302, b"", headers={"Location": "http://192.0.2.1/login"})

    answer = client.notify(notice())

    assert (answer.outcome, answer.status) == (Outcome.RETRY, 302)
    assert len(meetch.requests) == 1


def test_timeout_is_retried(meetch: SimulatedMeetch, make_client: ClientFactory) -> None:
    """No answer within timeout_s is transient, without a status."""
    meetch.latency_s = 2.0
    client = make_client(timeout_s=0.3)

    started = time.monotonic()
    answer = client.notify(notice())

    assert (answer.outcome, answer.status) == (Outcome.RETRY, None)
    assert answer.detail.startswith("timeout")
    assert time.monotonic() - started >= 0.3


def test_connection_refused_is_retried(meetch: SimulatedMeetch, client: MeetchClient) -> None:
    """Meetch gone (a pooled connection closed, new ones refused) is transient."""
    assert client.notify(notice("000001")).outcome is Outcome.DELIVERED
    meetch.go_offline()

    answer = client.notify(notice("000002"))

    assert (answer.outcome, answer.status) == (Outcome.RETRY, None)
    meetch.go_online()
    assert client.notify(notice("000002")).outcome is Outcome.DELIVERED


def test_huge_body_is_capped(meetch: SimulatedMeetch, client: MeetchClient) -> None:
    """A 1 MB error page is cut short in the detail, and the client still works afterwards."""
    meetch.fail_next(1, 500, b"x" * 1_000_000, "text/plain")

    answer = client.notify(notice("000001"))

    assert (answer.outcome, answer.status) == (Outcome.RETRY, 500)
    assert len(answer.detail) <= len("HTTP 500: ") + MAX_KEPT_BODY
    assert client.notify(notice("000001")).outcome is Outcome.DELIVERED


def test_api_key_never_appears_in_a_detail(meetch: SimulatedMeetch, client: MeetchClient) -> None:
    """Whatever comes back, even a proxy echoing the request headers, the key is not kept."""
    echo = f"bad request; Authorization: Bearer {API_KEY}".encode()
    meetch.fail_next(1, 400, echo, "text/plain")
    meetch.fail_next(1, 502, echo, "text/plain")
    meetch.rejected_tickets.add("000422")
    meetch.unknown_tickets.add("000404")
    answers = [
        client.notify(notice("000400")),
        client.notify(notice("000502")),
        client.notify(notice("000422")),
        client.notify(notice("000404")),
        client.notify(notice("000001")),
    ]
    meetch.set_api_keys(["other"])
    answers.append(client.notify(notice("000002")))
    meetch.go_offline()
    answers.append(client.notify(notice("000003")))

    assert [a.outcome for a in answers] == [
        Outcome.REJECTED,
        Outcome.RETRY,
        Outcome.REJECTED,
        Outcome.UNKNOWN,
        Outcome.DELIVERED,
        Outcome.AUTH_FAILED,
        Outcome.RETRY,
    ]
    for answer in answers:
        assert API_KEY not in answer.detail


# -- classify and retry_after as functions -------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.DELIVERED),
        (201, Outcome.DELIVERED),
        (204, Outcome.DELIVERED),
        (409, Outcome.DELIVERED),
        (404, Outcome.UNKNOWN),
        (401, Outcome.AUTH_FAILED),
        (403, Outcome.AUTH_FAILED),
        (400, Outcome.REJECTED),
        (410, Outcome.REJECTED),
        (422, Outcome.REJECTED),
        (408, Outcome.RETRY),
        (425, Outcome.RETRY),
        (429, Outcome.RETRY),
        (500, Outcome.RETRY),
        (502, Outcome.RETRY),
        (301, Outcome.RETRY),
    ],
)
def test_classify_follows_the_contract_table(status: int, outcome: Outcome) -> None:
    """Each status maps to the outcome CONTRACT §4 gives it."""
    answer = classify(status, httpx.Headers({"content-type": "application/json"}), "{}")

    assert (answer.outcome, answer.status) == (outcome, status)


def test_classify_keeps_a_bounded_one_line_body() -> None:
    """The body is kept whitespace-collapsed and cut to MAX_KEPT_BODY characters."""
    answer = classify(422, httpx.Headers(), "line one\n  line two " + "y" * 2000)

    assert answer.detail.startswith("HTTP 422: line one line two y")
    assert len(answer.detail) == len("HTTP 422: ") + MAX_KEPT_BODY


def test_classify_without_body() -> None:
    """An empty body leaves just the status in the detail."""
    assert classify(500, httpx.Headers(), "").detail == "HTTP 500"


def test_classify_html_success_is_retry() -> None:
    """A 2xx HTML page is not taken as Meetch's answer."""
    headers = httpx.Headers({"content-type": "text/html; charset=utf-8"})

    assert classify(200, headers, "<html></html>").outcome is Outcome.RETRY


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("5", 5.0),
        (" 120 ", 120.0),
        ("1.5", 1.5),
        ("0", 0.0),
        ("-3", 0.0),
        ("soon", None),
        ("inf", None),
        ("nan", None),
        ("Fri, 20 Feb 2026 18:42:37 GMT", 30.0),
        ("Fri, 20 Feb 2026 18:41:37 GMT", 0.0),
    ],
)
def test_retry_after_reads_seconds_and_http_dates(value: str | None, expected: float) -> None:
    """Retry-After in seconds or as an HTTP date, never negative; nonsense gives None."""
    now = email.utils.parsedate_to_datetime("Fri, 20 Feb 2026 18:42:07 GMT").timestamp()

    assert retry_after(value, now=now) == expected


def test_retry_after_is_honoured_only_for_transient_answers() -> None:
    """A 503 keeps its Retry-After; a 422's is irrelevant."""
    headers = httpx.Headers({"retry-after": "9"})

    assert classify(503, headers, "").retry_after_s == 9.0
    assert classify(422, headers, "").retry_after_s is None


# -- cancellations -------------------------------------------------------------------


def test_cancellations_follow_pagination(meetch: SimulatedMeetch, client: MeetchClient) -> None:
    """Every page is fetched until has_more is false, in refund order."""
    meetch.cancellations_page_size = 2
    refunds = [(f"00000{i}", f"2026-02-20T1{i}:00:00+01:00") for i in range(1, 6)]
    for number, refunded_at in refunds:
        meetch.add_refund(number, refunded_at)

    assert client.cancellations(None) == refunds
    pages = [r.query for r in meetch.requests]
    assert pages == [{"page": "1"}, {"page": "2"}, {"page": "3"}]
    assert all(r.headers["authorization"] == f"Bearer {API_KEY}" for r in meetch.requests)


def test_cancellations_since(meetch: SimulatedMeetch, client: MeetchClient) -> None:
    """``since`` is passed on every page (its '+' intact) and only later refunds come back."""
    meetch.cancellations_page_size = 1
    meetch.add_refund("000001", "2026-02-20T17:00:00+01:00")
    meetch.add_refund("000002", "2026-02-20T19:00:00+01:00")
    meetch.add_refund("000003", "2026-02-20T20:30:00+01:00")
    since = "2026-02-20T18:00:00+01:00"

    assert client.cancellations(since) == [
        ("000002", "2026-02-20T19:00:00+01:00"),
        ("000003", "2026-02-20T20:30:00+01:00"),
    ]
    assert [r.query for r in meetch.requests] == [
        {"page": "1", "since": since},
        {"page": "2", "since": since},
    ]


def test_cancellations_with_a_refused_key_raise(make_client: ClientFactory) -> None:
    """A refused key on the list is a DeliveryError that names the status, not the key."""
    with pytest.raises(DeliveryError, match="HTTP 401") as info:
        make_client(api_key="wrong-key").cancellations(None)

    assert "wrong-key" not in str(info.value)


def test_cancellations_while_offline_raise(meetch: SimulatedMeetch, client: MeetchClient) -> None:
    """Meetch unreachable while listing refunds is a DeliveryError."""
    meetch.go_offline()

    with pytest.raises(DeliveryError, match="/v1/cancellations"):
        client.cancellations(None)


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b"<html>portal</html>", "text/html", "HTTP 200"),
        (b'{"data": [', "application/json", "not JSON"),
        (b"[]", "application/json", "not a JSON object"),
        (b'{"data": []}', "application/json", "no data list or has_more"),
        (b'{"data": {}, "has_more": false}', "application/json", "no data list or has_more"),
        (b'{"data": [{"number": 2}], "has_more": false}', "application/json", "malformed item"),
        (b'{"data": ["000002"], "has_more": false}', "application/json", "malformed item"),
    ],
)
def test_malformed_cancellations_raise(body: bytes, content_type: str, message: str) -> None:
    """An answer that is not the contract's cancellations shape is a DeliveryError.

    The simulator only ever answers well-formed lists, so httpx's own transport seam
    plays a broken Meetch here.
    """

    def broken(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"Content-Type": content_type})

    settings = MeetchSettings(base_url="http://meetch.invalid", timeout_s=1.0)
    client = MeetchClient(settings, API_KEY, transport=httpx.MockTransport(broken))
    try:
        with pytest.raises(DeliveryError, match=message):
            client.cancellations(None)
    finally:
        client.close()


def test_cancellations_stop_at_a_page_that_never_ends() -> None:
    """A list that always says has_more is cut off rather than followed forever."""
    pages: list[str] = []

    def endless(request: httpx.Request) -> httpx.Response:
        pages.append(request.url.params["page"])
        return httpx.Response(200, json={"data": [], "has_more": True})

    settings = MeetchSettings(base_url="http://meetch.invalid", timeout_s=1.0)
    client = MeetchClient(settings, API_KEY, transport=httpx.MockTransport(endless))
    try:
        with pytest.raises(DeliveryError, match="pages"):
            client.cancellations(None)
    finally:
        client.close()
    assert pages[:3] == ["1", "2", "3"]
    assert len(pages) == len(set(pages))


# -- check_auth ----------------------------------------------------------------------


def test_check_auth(meetch: SimulatedMeetch, make_client: ClientFactory) -> None:
    """check_auth reports an accepted key, a refused one, and Meetch unreachable."""
    good: Answer = make_client().check_auth()
    bad = make_client(api_key="wrong-key").check_auth()
    meetch.go_offline()
    away = make_client().check_auth()

    assert good.outcome is Outcome.DELIVERED
    assert bad.outcome is Outcome.AUTH_FAILED
    assert away.outcome is Outcome.RETRY
    assert all("wrong-key" not in a.detail for a in (good, bad, away))


def test_body_is_json_encoded_once(meetch: SimulatedMeetch, client: MeetchClient) -> None:
    """A ticket with quotes and non-ASCII characters arrives exactly as scanned."""
    ticket = 'AB"12\\é'

    client.notify(notice(ticket))

    assert json.loads(meetch.requests[0].body)["number"] == ticket


def test_cancellations_error_never_shows_the_key() -> None:
    """A proxy echoing the Authorization header into an error keeps the key out of the message."""

    def echo(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, text=f"rejected {request.headers['authorization']}")

    settings = MeetchSettings(base_url="http://meetch.invalid", timeout_s=1.0)
    client = MeetchClient(settings, API_KEY, transport=httpx.MockTransport(echo))
    try:
        with pytest.raises(DeliveryError, match="HTTP 400") as info:
            client.cancellations(None)
    finally:
        client.close()
    assert API_KEY not in str(info.value)
