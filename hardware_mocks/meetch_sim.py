"""A simulated Meetch API on a real loopback HTTP server (CONTRACT §4).

:class:`SimulatedMeetch` answers the scan notification and the cancellations list the
way the contract assumes Meetch does, records every request, and lets a test inject
the faults the agent must survive: latency, a proxy answering 500/502/429, a refused
key, Meetch going away and coming back on the same address, and hostile answers:
connections reset mid-answer, answers that never come, bodies that are not JSON or
are several megabytes long.

It is a real ``ThreadingHTTPServer`` speaking HTTP/1.1 with keep-alive, so the agent's
connection pool, timeouts and error mapping are exercised exactly as in production::

    with SimulatedMeetch(api_keys={"k"}) as meetch:
        meetch.fail_next(2)                       # a load balancer hiccups twice
        ...                                       # run the agent against meetch.base_url
        assert meetch.wait_for(lambda: "000001" in meetch.flagged, timeout=5)

Order of checks on ``POST {scan_path}``: latency, queued faults, auth, validation, then
the item's state (unknown 404, refused 422, already flagged 200 or 409, else flagged 201).

Faults queue up in order, one per scan POST, whichever method queued them. Each says
whether Meetch processed the request. A fault in front of Meetch (a proxy, a load
balancer, a captive portal: :meth:`~SimulatedMeetch.fail_next` and friends, and the
other fault methods unless ``processed=True``) answers before auth and never flags the
ticket, whatever its status. A fault on Meetch's own answer (``processed=True``,
:meth:`~SimulatedMeetch.garble_next`) lets the request flag the ticket, then spoils the
answer. So :attr:`~SimulatedMeetch.flagged` always tells the truth, and an agent that
marks a ticket delivered which is not in it believed an answer it should not have.

Command line, for trying the agent by hand::

    python -m hardware_mocks.meetch_sim --port 8080 --key KEY --unknown 000404 --refunded 000002
"""

from __future__ import annotations

import argparse
import contextlib
import json as jsonlib
import math
import re
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import unquote

__all__ = [
    "AGENT_USER_AGENT_PREFIX",
    "FAULTS",
    "NO_ANSWER",
    "RESET_POINTS",
    "RecordedRequest",
    "SimulatedMeetch",
    "main",
    "parse_rfc3339",
]

AGENT_USER_AGENT_PREFIX = "meetch-gate-agent/"
"""Every agent request's ``User-Agent`` starts with this (CONTRACT §4)."""

NO_ANSWER = 0
"""``RecordedRequest.status`` of a request that got no whole answer: cut by
:meth:`SimulatedMeetch.go_offline`, reset mid-answer or left to stall."""

FAULTS = ("canned", "reset", "stall", "garbled", "huge")
"""The values of ``RecordedRequest.fault`` for a request a queued fault answered."""

RESET_POINTS = ("status", "headers", "body")
"""Where :meth:`SimulatedMeetch.reset_next` cuts an answer: after the status line, halfway
through the headers, or halfway through the body."""

_CHUNK_BYTES = 64 << 10

_MAX_BODY_BYTES = 1 << 20
_MAX_DRAIN_BYTES = 64 << 20

# How long go_offline()/stop() wait for handler threads before giving up on them. Every
# blocking point in a handler is woken by go_offline, so this only matters for a bug.
_JOIN_TIMEOUT_S = 5.0

# datetime.fromisoformat() in 3.11 also takes ISO 8601 forms that RFC 3339 forbids
# (basic format, week dates, a missing offset), so the shape is checked first.
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})", re.ASCII
)

_HTML_502 = b"""<html>
<head><title>502 Bad Gateway</title></head>
<body>
<center><h1>502 Bad Gateway</h1></center>
<hr><center>nginx</center>
</body>
</html>
"""


def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 timestamp with offset; ``ValueError`` says what is wrong."""
    if not _RFC3339.fullmatch(text):
        raise ValueError(f"{text!r} is not RFC 3339 with an offset (2026-02-20T19:42:07+01:00)")
    try:
        # Upper-casing turns the lower-case 't' and 'z' RFC 3339 allows into what Python reads.
        return datetime.fromisoformat(text.upper())
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a valid date and time: {exc}") from None


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the simulator saw it, with the status it answered (0: cut off)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    """Header names lower-case; a repeated header's values joined with ``", "``."""
    body: bytes
    json: Any | None
    """The body parsed as JSON, or None when it is empty or not JSON."""
    status: int
    at: float
    """``time.monotonic()`` when the request was received."""
    fault: str = ""
    """The queued fault that answered it (one of :data:`FAULTS`), "" for a plain answer."""


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def _json_answer(status: int, payload: Any, headers: tuple[tuple[str, str], ...] = ()) -> _Answer:
    return _Answer(status, jsonlib.dumps(payload).encode(), "application/json", headers)


def _proxy_answer(
    status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None
) -> _Answer:
    # We always compute these ourselves; a stale Content-Length would wedge the client.
    extra = tuple(
        (name, value)
        for name, value in (headers or {}).items()
        if name.lower() not in {"content-length", "content-type", "connection"}
    )
    return _Answer(status, body, content_type, extra)


@dataclass(frozen=True)
class _Fault:
    """How one scan POST goes wrong; see the fault methods of SimulatedMeetch."""

    tag: str
    proxy: _Answer | None = None
    """Answered in front of Meetch (before auth, never flagging); None: Meetch answers."""
    delay_s: float = 0.0
    """Wait this long first (go_offline cuts the wait short, with no answer)."""
    silent: bool = False
    """After the delay, close the connection without a byte of answer."""
    cut: str = ""
    """Reset the connection at this point of the answer (one of RESET_POINTS)."""
    body: bytes | None = None
    """Replaces the answer's body; the status and Meetch's state change stand."""
    content_type: str | None = None
    """Replaces the answer's content type, with ``body``."""
    pad_to: int = 0
    """Pad the body to this many bytes."""
    chunked: bool = False

    @property
    def plain(self) -> bool:
        """True when the answer goes out at once, whole and as it is (only its origin is
        faulty), on a connection that stays open."""
        return self.body is None and not (
            self.delay_s or self.silent or self.cut or self.chunked or self.pad_to
        )


@dataclass
class _Refund:
    number: str
    refunded_at: str
    when: datetime


@dataclass
class _State:
    """Everything the handlers read and write, guarded by SimulatedMeetch._lock."""

    api_keys: frozenset[str]
    requests: list[RecordedRequest] = field(default_factory=list)
    flagged: dict[str, str] = field(default_factory=dict)
    first_answers: dict[str, bytes] = field(default_factory=dict)
    scan_ids: dict[str, set[str]] = field(default_factory=dict)
    faults: deque[_Fault] = field(default_factory=deque)
    refunds: list[_Refund] = field(default_factory=list)
    in_flight: int = 0
    connections: int = 0


class SimulatedMeetch:
    """A fake Meetch on a real loopback HTTP server; see the module docstring.

    Every public method and property is thread-safe and may be used while the server
    runs. ``unknown_tickets`` and ``rejected_tickets`` are plain sets: add to them or
    replace them at any time (the handlers only test membership).
    """

    def __init__(
        self,
        *,
        api_keys: Iterable[str] = ("test-key",),
        host: str = "127.0.0.1",
        port: int = 0,
        scan_path: str = "/v1/items/scan",
        cancellations_path: str = "/v1/cancellations",
        on_request: Callable[[RecordedRequest], None] | None = None,
    ) -> None:
        """Configure the simulator; nothing listens until :meth:`start`.

        ``on_request`` is called from a handler thread after each request is recorded
        and before it is answered (the command line prints with it).
        """
        self.host = host
        self.scan_path = scan_path
        self.cancellations_path = cancellations_path
        self.unknown_tickets: set[str] = set()
        self.rejected_tickets: set[str] = set()
        self._on_request = on_request
        self._port = port
        # Re-entrant so that a wait_for() predicate may read properties that take the lock.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._state = _State(api_keys=frozenset(api_keys))
        self._latency_s = 0.0
        self._page_size = 100
        # Serialises start/stop/go_offline/go_online against each other, not against handlers.
        self._lifecycle = threading.Lock()
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> SimulatedMeetch:
        """Start listening (on a free port when ``port`` was 0) and return self."""
        with self._lifecycle:
            if self._server is not None:
                raise RuntimeError("SimulatedMeetch is already running")
            self._listen()
        return self

    def stop(self) -> None:
        """Stop listening and close every connection; returns promptly, may be repeated."""
        with self._lifecycle:
            self._shut_down()

    def go_offline(self) -> None:
        """Vanish: new connections are refused and pooled keep-alive connections are closed.

        Requests in progress (for instance waiting out ``latency_s``) are cut without an
        answer and recorded with status 0. State (flagged tickets, refunds...) is kept.
        """
        with self._lifecycle:
            self._shut_down()

    def go_online(self) -> None:
        """Listen again on the same port, so ``base_url`` is unchanged."""
        with self._lifecycle:
            if self._port == 0:
                raise RuntimeError("call start() before go_online()")
            if self._server is None:
                self._listen()

    def __enter__(self) -> SimulatedMeetch:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _listen(self) -> None:
        try:
            server = _Server((self.host, self._port), self)
        except OSError as exc:
            raise OSError(
                exc.errno, f"meetch sim: cannot listen on {self.host}:{self._port}: {exc.strerror}"
            ) from exc
        self._port = server.server_address[1]
        thread = threading.Thread(
            target=server.serve,
            name=f"meetch-sim-{self._port}",
            daemon=True,
        )
        thread.start()
        self._server, self._serve_thread = server, thread

    def _shut_down(self) -> None:
        server, thread = self._server, self._serve_thread
        if server is None or thread is None:
            return
        self._server = self._serve_thread = None
        # Wakes the accept loop and the handlers waiting out latency alike.
        server.begin_closing()
        thread.join(_JOIN_TIMEOUT_S)
        # Closing the listening socket makes the kernel refuse new connections at once.
        server.server_close()
        # A client holding an idle pooled connection must see it closed (and reconnect,
        # and be refused) rather than send into a socket nobody reads.
        server.drop_connections()
        server.join_handlers(_JOIN_TIMEOUT_S)

    # -- addresses ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port listened on; known once started and kept across go_offline/go_online."""
        if self._port == 0:
            raise RuntimeError("the port is chosen by start(); call it first")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``, the value for the agent's ``meetch.base_url``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def online(self) -> bool:
        """True while listening."""
        return self._server is not None

    # -- what happened -----------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request, in the order answered, with its status.

        Not recorded: what the stdlib HTTP layer refuses before the simulator sees it
        (a malformed request line, a method such as HEAD that nothing here serves).
        """
        with self._lock:
            return list(self._state.requests)

    @property
    def scan_requests(self) -> list[RecordedRequest]:
        """The snapshot of :attr:`requests` restricted to ``POST {scan_path}``."""
        return [r for r in self.requests if r.method == "POST" and r.path == self.scan_path]

    @property
    def flagged(self) -> dict[str, str]:
        """A snapshot of ticket -> scan_id of the notification that flagged it."""
        with self._lock:
            return dict(self._state.flagged)

    def scan_ids_for(self, ticket: str) -> set[str]:
        """Every scan_id POSTed for ``ticket``, whatever the answer (faults and 401s too)."""
        with self._lock:
            return set(self._state.scan_ids.get(ticket, ()))

    @property
    def in_flight(self) -> int:
        """Requests received but not answered yet (for example waiting out latency)."""
        with self._lock:
            return self._state.in_flight

    @property
    def connections_accepted(self) -> int:
        """TCP connections accepted so far; shows whether a client reuses its connection."""
        with self._lock:
            return self._state.connections

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` is true, re-checking it on every request; False on timeout.

        The predicate runs with the simulator's lock held, so it may read any property
        but must not block.
        """
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    # -- faults and data ---------------------------------------------------------------

    @property
    def latency_s(self) -> float:
        """Every answer is delayed by this many seconds (go_offline cuts the wait short)."""
        with self._lock:
            return self._latency_s

    @latency_s.setter
    def latency_s(self, value: float) -> None:
        if value < 0:
            raise ValueError(f"latency_s must be >= 0, got {value}")
        with self._lock:
            self._latency_s = value

    @property
    def cancellations_page_size(self) -> int:
        """How many refunds one page of the cancellations list holds (default 100)."""
        with self._lock:
            return self._page_size

    @cancellations_page_size.setter
    def cancellations_page_size(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"cancellations_page_size must be >= 1, got {value}")
        with self._lock:
            self._page_size = value

    def fail_next(
        self,
        n: int,
        status: int = 500,
        body: bytes = b'{"error":"internal"}',
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer the next ``n`` scan POSTs with this, before auth: a proxy or LB fault.

        The ticket is never flagged, whatever ``status`` says: the request did not reach
        Meetch. (A 2xx here is a proxy lying; an agent cannot tell it from Meetch unless
        the page gives itself away, as an HTML one does.)
        """
        self._queue(n, _Fault("canned", proxy=_proxy_answer(status, body, content_type, headers)))

    def html_502(self, n: int) -> None:
        """Answer the next ``n`` scan POSTs with nginx's HTML 502 Bad Gateway page."""
        self.fail_next(n, 502, _HTML_502, "text/html")

    def rate_limit(self, n: int, retry_after_s: float) -> None:
        """Answer the next ``n`` scan POSTs 429 with ``Retry-After`` in whole seconds (ceil)."""
        if retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0, got {retry_after_s}")
        self.fail_next(
            n,
            429,
            b'{"error":"rate limited"}',
            headers={"Retry-After": str(math.ceil(retry_after_s))},
        )

    def reset_next(
        self, n: int, *, after: str = "headers", processed: bool = False, status: int = 201
    ) -> None:
        """Reset (TCP RST) the next ``n`` scan POSTs' connections part way through the answer.

        ``after`` is one of :data:`RESET_POINTS`. With ``processed`` Meetch handled the
        request (the ticket may be flagged) and its answer is what gets cut; without, a
        middlebox cuts an answer of ``status`` (201 by default: a success the agent must
        not believe from half an answer) and the ticket is not flagged. Recorded with
        status :data:`NO_ANSWER`.
        """
        if after not in RESET_POINTS:
            raise ValueError(f"after must be one of {', '.join(RESET_POINTS)}, got {after!r}")
        proxy = None if processed else _json_answer(status, {"flagged": True})
        self._queue(n, _Fault("reset", proxy=proxy, cut=after))

    def stall_next(self, n: int, seconds: float, *, processed: bool = False) -> None:
        """Hold the next ``n`` scan POSTs ``seconds`` before doing anything.

        Without ``processed``: a hung proxy; the connection is then closed without a byte
        of answer, the ticket is not flagged, and the request is recorded with status
        :data:`NO_ANSWER`. With ``processed``: a slow Meetch; the request is then handled
        (and may flag the ticket) and answered, whether or not the client still waits.
        """
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds}")
        self._queue(n, _Fault("stall", delay_s=seconds, silent=not processed))

    def garble_next(
        self, n: int, body: bytes = b'{"number": "000', content_type: str = "application/json"
    ) -> None:
        """Meetch handles the next ``n`` scan POSTs, then answers ``body`` (not JSON) instead.

        The status and the state change stand: a 201 whose body is cut or mangled still
        means the ticket is flagged.
        """
        self._queue(n, _Fault("garbled", body=body, content_type=content_type))

    def huge_next(
        self,
        n: int,
        size: int = 4 << 20,
        *,
        processed: bool = False,
        status: int = 502,
        content_type: str = "text/html",
        chunked: bool = True,
    ) -> None:
        """Answer the next ``n`` scan POSTs with a body of ``size`` bytes, chunked or not.

        With ``processed`` it is Meetch's own answer padded with white space (still valid
        JSON); without, a proxy's ``status`` page in ``content_type``, never flagging.
        """
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        proxy = None if processed else _proxy_answer(status, _HTML_502, content_type, None)
        self._queue(n, _Fault("huge", proxy=proxy, pad_to=size, chunked=chunked))

    @property
    def faults_pending(self) -> int:
        """Queued faults not used yet."""
        with self._lock:
            return len(self._state.faults)

    def clear_faults(self) -> None:
        """Forget every queued fault: the next scan POSTs are answered normally."""
        with self._lock:
            self._state.faults.clear()

    def _queue(self, n: int, fault: _Fault) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        with self._lock:
            self._state.faults.extend([fault] * n)

    def set_api_keys(self, keys: Iterable[str]) -> None:
        """Accept only these keys from now on; any other Bearer key gets 401."""
        with self._lock:
            self._state.api_keys = frozenset(keys)

    def add_refund(self, number: str, refunded_at: str | None = None) -> None:
        """Make the cancellations list report ``number`` refunded at ``refunded_at``.

        ``refunded_at`` is RFC 3339 with an offset and defaults to now, in UTC.
        """
        if refunded_at is None:
            refunded_at = datetime.now(UTC).isoformat(timespec="milliseconds")
            refunded_at = refunded_at.replace("+00:00", "Z")
        refund = _Refund(number, refunded_at, parse_rfc3339(refunded_at))
        with self._lock:
            self._state.refunds.append(refund)

    # -- answering (called by _Handler) ------------------------------------------------

    def _received(self, method: str, path: str, body_json: Any) -> None:
        with self._lock:
            self._state.in_flight += 1
            if method == "POST" and path == self.scan_path and isinstance(body_json, dict):
                number, scan_id = body_json.get("number"), body_json.get("scan_id")
                if isinstance(number, str) and isinstance(scan_id, str):
                    self._state.scan_ids.setdefault(number, set()).add(scan_id)
            self._changed.notify_all()

    def _take_fault(self, request: RecordedRequest) -> _Fault | None:
        """The next queued fault, if ``request`` is a scan POST and one is queued."""
        if request.method != "POST" or request.path != self.scan_path:
            return None
        with self._lock:
            return self._state.faults.popleft() if self._state.faults else None

    def _answer(self, request: RecordedRequest, fault: _Fault | None = None) -> _Answer:
        """Decide the answer, record the request with it and wake wait_for()."""
        with self._lock:
            if request.path == self.scan_path:
                if request.method == "POST":
                    answer = self._answer_scan(request, fault)
                else:
                    answer = _json_answer(
                        405, {"error": "method not allowed"}, (("Allow", "POST"),)
                    )
            elif request.path == self.cancellations_path:
                if request.method == "GET":
                    answer = self._answer_cancellations(request)
                else:
                    answer = _json_answer(405, {"error": "method not allowed"}, (("Allow", "GET"),))
            else:
                answer = _json_answer(404, {"error": "not found"})
            # Recorded under the same lock as the state change, so no waiter ever sees
            # a ticket flagged by a request that is missing from `requests`.
            status = NO_ANSWER if fault is not None and fault.cut else answer.status
            recorded = self._record(request, status, fault.tag if fault else "")
        if self._on_request is not None:
            self._on_request(recorded)
        return answer

    def _finish(self, request: RecordedRequest, status: int, fault: str = "") -> None:
        """Record a request answered (or cut) without asking _answer()."""
        recorded = self._record(request, status, fault)
        if self._on_request is not None:
            self._on_request(recorded)

    def _record(self, request: RecordedRequest, status: int, fault: str = "") -> RecordedRequest:
        with self._lock:
            recorded = replace(request, status=status, fault=fault)
            self._state.requests.append(recorded)
            self._state.in_flight -= 1
            self._changed.notify_all()
        return recorded

    def _refused_key(self, request: RecordedRequest) -> _Answer | None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        # The auth scheme is case-insensitive (RFC 7235); the key is not.
        if scheme.lower() == "bearer" and key in self._state.api_keys:
            return None
        return _json_answer(
            401, {"error": "invalid api key"}, (("WWW-Authenticate", 'Bearer realm="meetch"'),)
        )

    def _answer_scan(self, request: RecordedRequest, fault: _Fault | None) -> _Answer:
        state = self._state
        if fault is not None and fault.proxy is not None:
            return fault.proxy
        refused = self._refused_key(request)
        if refused is not None:
            return refused
        problem = _scan_problem(request)
        if problem is not None:
            return _json_answer(400, {"error": problem})
        assert isinstance(request.json, dict)  # _scan_problem checked it
        number: str = request.json["number"]
        scan_id: str = request.json["scan_id"]
        if number in self.unknown_tickets:
            return _json_answer(404, {"error": "unknown item"})
        if number in self.rejected_tickets:
            return _json_answer(422, {"error": "item cannot be flagged as scanned"})
        if number in state.flagged:
            if state.flagged[number] == scan_id:
                # An idempotent replay answers exactly what the first request got.
                return _Answer(200, state.first_answers[number])
            return _json_answer(409, {"error": "already flagged"})
        body = jsonlib.dumps({"number": number, "scan_id": scan_id, "flagged": True}).encode()
        state.flagged[number] = scan_id
        state.first_answers[number] = body
        return _Answer(201, body)

    def _answer_cancellations(self, request: RecordedRequest) -> _Answer:
        refused = self._refused_key(request)
        if refused is not None:
            return refused
        since: datetime | None = None
        if "since" in request.query:
            try:
                since = parse_rfc3339(request.query["since"])
            except ValueError as exc:
                return _json_answer(400, {"error": f"since: {exc}"})
        page_text = request.query.get("page", "1")
        if not page_text.isdigit() or int(page_text) < 1:
            return _json_answer(400, {"error": f"page must be an integer >= 1, got {page_text!r}"})
        page, size = int(page_text), self._page_size
        # A stable sort keeps refunds with the same instant in the order they were added.
        matching = sorted(
            (r for r in self._state.refunds if since is None or r.when > since),
            key=lambda r: r.when,
        )
        chosen = matching[(page - 1) * size : page * size]
        payload = {
            "data": [{"number": r.number, "refunded_at": r.refunded_at} for r in chosen],
            "has_more": page * size < len(matching),
        }
        return _json_answer(200, payload)

    def _connection_accepted(self) -> None:
        with self._lock:
            self._state.connections += 1


def _scan_problem(request: RecordedRequest) -> str | None:
    """Why a scan notification is malformed, or None when it is well formed."""
    body = request.json
    if not isinstance(body, dict):
        return "body must be a JSON object"
    for name in ("number", "scanned_at", "scan_id"):
        if not isinstance(body.get(name), str) or not body[name]:
            return f"{name!r} must be a non-empty string"
    if "organization_id" in body and not isinstance(body["organization_id"], str):
        return "'organization_id' must be a string when present"
    try:
        parse_rfc3339(body["scanned_at"])
    except ValueError as exc:
        return f"scanned_at: {exc}"
    if request.headers.get("idempotency-key") != body["scan_id"]:
        return "the Idempotency-Key header must equal scan_id"
    if not request.headers.get("user-agent", "").startswith(AGENT_USER_AGENT_PREFIX):
        return f"the User-Agent must start with {AGENT_USER_AGENT_PREFIX!r}"
    return None


def _parse_query(raw: str) -> dict[str, str]:
    # Not parse_qs: it reads a literal '+' as a space, which would break an unencoded
    # '+01:00' offset; '%2B' (what httpx sends) decodes to '+' either way.
    query: dict[str, str] = {}
    for part in raw.split("&"):
        if part:
            name, _, value = part.partition("=")
            query[unquote(name)] = unquote(value)
    return query


class _BadRequest(Exception):
    """The request body cannot be taken; answer ``status`` and maybe close the connection."""

    def __init__(self, message: str, status: int = 400, *, close: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.close = close


class _Handler(BaseHTTPRequestHandler):
    """HTTP plumbing only: read, wait out latency, ask SimulatedMeetch, write."""

    protocol_version = "HTTP/1.1"  # keep-alive; every answer carries Content-Length
    server_version = "meetch-sim"
    # Headers and body leave in two writes; with Nagle on, the body waits for the
    # client's delayed ACK and every keep-alive request costs 40 ms.
    disable_nagle_algorithm = True
    sys_version = ""
    server: _Server

    def do_GET(self) -> None:
        """Serve any method the same way; the simulator decides."""
        self._serve()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _serve(self) -> None:
        received = time.monotonic()
        sim = self.server.sim
        path, _, raw_query = self.path.partition("?")
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        query = _parse_query(raw_query)
        try:
            body = self._read_body()
        except _BadRequest as exc:
            # When the body was not read to its end, the stream is out of step: close it.
            self.close_connection = self.close_connection or exc.close
            request = RecordedRequest(
                self.command, path, query, headers, b"", None, NO_ANSWER, received
            )
            sim._received(request.method, request.path, None)
            answer = _json_answer(exc.status, {"error": str(exc)})
            sim._finish(request, answer.status)
            self._write(answer)
            return
        try:
            parsed: Any | None = jsonlib.loads(body) if body else None
        except ValueError:
            parsed = None
        request = RecordedRequest(
            self.command, path, query, headers, body, parsed, NO_ANSWER, received
        )
        sim._received(request.method, request.path, parsed)
        latency = sim.latency_s
        if latency > 0 and self.server.closing.wait(latency):
            # go_offline() during the wait: the answer is lost, as when a server dies.
            sim._finish(request, NO_ANSWER)
            self.close_connection = True
            return
        fault = sim._take_fault(request)
        if fault is None or fault.plain:
            self._write(sim._answer(request, fault))
            return
        self._serve_fault(request, fault)

    def _serve_fault(self, request: RecordedRequest, fault: _Fault) -> None:
        sim = self.server.sim
        # Whatever goes wrong, the connection ends with this answer: a client must not
        # reuse a stream a fault may have left out of step.
        self.close_connection = True
        if fault.delay_s > 0 and self.server.closing.wait(fault.delay_s):
            sim._finish(request, NO_ANSWER, fault.tag)  # go_offline() during the stall
            return
        if fault.silent:
            sim._finish(request, NO_ANSWER, fault.tag)
            return
        answer = sim._answer(request, fault)
        body = answer.body if fault.body is None else fault.body
        content_type = fault.content_type or answer.content_type
        if fault.pad_to > len(body):
            # White space keeps a JSON answer valid JSON; a page gets filler markup.
            filler = b" " if "json" in content_type else b"<p>padding padding padding</p>\n"
            missing = fault.pad_to - len(body)
            body += (filler * (missing // len(filler) + 1))[:missing]
        headers = [("Content-Type", content_type), *answer.headers, ("Connection", "close")]
        if fault.chunked:
            headers.append(("Transfer-Encoding", "chunked"))
            payload = b"".join(
                b"%x\r\n%s\r\n" % (len(body[i : i + _CHUNK_BYTES]), body[i : i + _CHUNK_BYTES])
                for i in range(0, len(body), _CHUNK_BYTES)
            )
            payload += b"0\r\n\r\n"
        else:
            headers.append(("Content-Length", str(len(body))))
            payload = body
        status_line, head = self._head(answer.status, headers)
        wire = status_line + head
        if fault.cut:
            cut_at = {
                "status": len(status_line),
                "headers": len(status_line) + len(head) // 2,
                "body": len(wire) + max(1, len(payload) // 2),
            }[fault.cut]
            self.server.reset_on_close(self.connection)
            self.wfile.write((wire + payload)[:cut_at])
            return
        self.wfile.write(wire)
        # In pieces: a client that stops reading (it wanted 64 KiB of 4 MiB) then closes,
        # and the next write fails instead of the whole answer sitting in one sendall.
        for i in range(0, len(payload), _CHUNK_BYTES):
            self.wfile.write(payload[i : i + _CHUNK_BYTES])

    def _head(self, status: int, headers: list[tuple[str, str]]) -> tuple[bytes, bytes]:
        """The status line, and the header lines with the blank line that ends them."""
        reason = self.responses.get(status, ("",))[0]
        status_line = f"{self.protocol_version} {status} {reason}\r\n".encode("latin-1")
        lines = [
            ("Server", self.version_string()),
            ("Date", self.date_time_string()),
            *headers,
        ]
        head = "".join(f"{name}: {value}\r\n" for name, value in lines) + "\r\n"
        return status_line, head.encode("latin-1")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length_text = self.headers.get("Content-Length", "0")
        if not length_text.isdigit():
            raise _BadRequest(f"invalid Content-Length {length_text!r}")
        length = int(length_text)
        if length > _MAX_BODY_BYTES:
            # Read and drop it: closing with unread data makes the kernel send a reset,
            # which can destroy our answer before the client reads it.
            close = length > _MAX_DRAIN_BYTES
            while not close and length > 0:
                chunk = self.rfile.read(min(length, 1 << 16))
                if not chunk:
                    break
                length -= len(chunk)
            raise _BadRequest(f"body larger than {_MAX_BODY_BYTES} bytes", 413, close=close)
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            size_line = self.rfile.readline(1024).split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise _BadRequest(f"invalid chunk size {size_line!r}") from None
            if size == 0:
                # Skip trailers up to the blank line that ends the message.
                while self.rfile.readline(1024).strip():
                    pass
                return b"".join(chunks)
            total += size
            if total > _MAX_BODY_BYTES:
                raise _BadRequest(f"body larger than {_MAX_BODY_BYTES} bytes", 413)
            chunks.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def _write(self, answer: _Answer) -> None:
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        for name, value in answer.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(answer.body)

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: requests are recorded, and the command line prints its own lines."""


class _Server(ThreadingHTTPServer):
    """One listening period; go_offline() ends it and go_online() makes a new one."""

    daemon_threads = True
    request_queue_size = 64
    # Linux refuses to bind a port with connections in TIME_WAIT unless this is set
    # (HTTPServer sets it too; stated here because go_online() depends on it).
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], sim: SimulatedMeetch) -> None:
        # Set before TCPServer.__init__, which creates the socket with it.
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.sim = sim
        self.closing = threading.Event()
        self._registry = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._resetting: set[socket.socket] = set()
        self._handlers: set[threading.Thread] = set()
        # serve() sleeps in select() on the listening socket and this pair, so a byte
        # written here stops it at once (serve_forever() polls, adding up to 0.5 s).
        self._wake_r, self._wake_w = socket.socketpair()
        # handle_request() is only called once select() saw a connection waiting; a zero
        # timeout keeps it from blocking when the client gave up in between.
        self.timeout = 0
        try:
            super().__init__(address, _Handler)
        except BaseException:
            self._wake_r.close()
            self._wake_w.close()
            raise

    def serve(self) -> None:
        """Accept connections until begin_closing()."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self.closing.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self.socket and not self.closing.is_set():
                        self.handle_request()

    def begin_closing(self) -> None:
        """Stop accepting and cut latency waits short; the listening socket stays open."""
        self.closing.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def server_close(self) -> None:
        """Close the listening socket (new connections are refused) and the wake-up pair."""
        super().server_close()
        self._wake_r.close()
        self._wake_w.close()

    def server_bind(self) -> None:
        """Bind without HTTPServer's socket.getfqdn(), a DNS lookup that can stall."""
        TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        """Serve the connection on its own thread, tracked so go_offline can end it."""
        thread = threading.Thread(
            target=self._serve_connection, args=(request, client_address), daemon=True
        )
        with self._registry:
            if isinstance(request, socket.socket):
                self._connections.add(request)
            self._handlers.add(thread)
        self.sim._connection_accepted()
        thread.start()

    def _serve_connection(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._registry:
                self._handlers.discard(threading.current_thread())

    def shutdown_request(self, request: socket.socket | tuple[bytes, socket.socket]) -> None:
        """Forget the connection, then close it (with a reset if reset_on_close asked)."""
        # Under the lock, so drop_connections() never shuts down a closed socket whose
        # file descriptor the kernel may already have handed to someone else.
        with self._registry:
            if isinstance(request, socket.socket):
                self._connections.discard(request)
                if request in self._resetting:
                    self._resetting.discard(request)
                    # No shutdown(SHUT_WR) first: that would send a FIN, a clean end.
                    self.close_request(request)
                    return
            super().shutdown_request(request)

    def reset_on_close(self, connection: socket.socket) -> None:
        """Close ``connection`` with a TCP reset instead of a FIN once its handler is done."""
        # SO_LINGER on with a zero timeout: close() drops unsent data and sends RST.
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with self._registry:
            self._resetting.add(connection)

    def drop_connections(self) -> None:
        """Shut every open connection down; each handler then reads EOF and closes it."""
        with self._registry:
            for connection in self._connections:
                # OSError: the peer already went away.
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    def join_handlers(self, timeout: float) -> None:
        """Wait, up to ``timeout`` in all, for the connection threads to end."""
        deadline = time.monotonic() + timeout
        with self._registry:
            handlers = list(self._handlers)
        for thread in handlers:
            thread.join(max(0.0, deadline - time.monotonic()))

    def handle_error(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        """Ignore connection errors (clients time out, go_offline cuts); report the rest."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


# -- command line ----------------------------------------------------------------------


def _describe(request: RecordedRequest) -> str:
    """One line for the terminal: time, method, path, status and the scan's ids."""
    stamp = datetime.now().strftime("%H:%M:%S.%f")[:-3]  # local time: read by people
    line = f"{stamp} {request.method} {request.path} {request.status or 'cut'}"
    if request.query:
        line += " " + " ".join(f"{k}={v}" for k, v in request.query.items())
    if isinstance(request.json, dict):
        for name in ("number", "scan_id", "scanned_at"):
            if name in request.json:
                line += f" {name}={request.json[name]}"
    return line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hardware_mocks.meetch_sim",
        description="Run a simulated Meetch API until Ctrl-C, printing one line per request.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port (0: any free port)")
    parser.add_argument(
        "--key", action="append", dest="keys", metavar="KEY", help="accepted API key (repeatable)"
    )
    parser.add_argument(
        "--unknown", action="extend", nargs="+", default=[], metavar="T", help="answer 404"
    )
    parser.add_argument(
        "--rejected", action="extend", nargs="+", default=[], metavar="T", help="answer 422"
    )
    parser.add_argument(
        "--refunded", action="extend", nargs="+", default=[], metavar="T", help="list as refunded"
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--scan-path", default="/v1/items/scan")
    parser.add_argument("--cancellations-path", default="/v1/cancellations")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the simulator from the command line until SIGINT or SIGTERM."""
    args = _parser().parse_args(argv)
    keys: list[str] = args.keys or ["test-key"]
    sim = SimulatedMeetch(
        api_keys=keys,
        host=args.host,
        port=args.port,
        scan_path=args.scan_path,
        cancellations_path=args.cancellations_path,
        on_request=lambda request: print(_describe(request), flush=True),
    )
    sim.unknown_tickets.update(args.unknown)
    sim.rejected_tickets.update(args.rejected)
    for ticket in args.refunded:
        sim.add_refund(ticket)
    sim.latency_s = args.latency

    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    with sim:
        print(
            f"meetch sim listening on {sim.base_url}: POST {sim.scan_path}, "
            f"GET {sim.cancellations_path}, keys {', '.join(keys)}",
            flush=True,
        )
        stop.wait()
    print("meetch sim stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
