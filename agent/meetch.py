"""The Meetch API as the agent speaks it (CONTRACT §4).

The only module that knows Meetch's URLs, headers and how its answers are classified,
so that adapting to the real API is a one-file change.
"""

from __future__ import annotations

import email.utils
import enum
import json
import math
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import certifi
import httpx

from agent import __version__
from agent.config import MeetchSettings
from agent.errors import DeliveryError

USER_AGENT = f"meetch-gate-agent/{__version__}"
MAX_BODY_BYTES = 64 * 1024
"""Read at most this much of an answer: a proxy's error page must not fill memory."""
MAX_KEPT_BODY = 500
MAX_PAGES = 1000


class Outcome(enum.Enum):
    """What an answer means for a notification."""

    DELIVERED = "delivered"
    UNKNOWN = "unknown"
    REJECTED = "rejected"
    RETRY = "retry"
    AUTH_FAILED = "auth_failed"


@dataclass(frozen=True)
class Answer:
    """Meetch's answer to one notification, classified."""

    outcome: Outcome
    status: int | None
    detail: str
    retry_after_s: float | None = None


@dataclass(frozen=True)
class ScanNotice:
    """What Meetch is told about a scan."""

    scan_id: str
    ticket: str
    scanned_at: str


class MeetchClient:
    """A keep-alive HTTP client for Meetch; safe to use from several threads."""

    def __init__(
        self,
        settings: MeetchSettings,
        api_key: str,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self._key = api_key
        self._http = httpx.Client(
            base_url=settings.base_url,
            timeout=settings.timeout_s,
            verify=_tls_context(settings.ca_file),
            limits=httpx.Limits(
                max_connections=settings.max_in_flight,
                max_keepalive_connections=settings.max_in_flight,
            ),
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
            # Proxy variables in a venue box's environment are not ours to follow blindly.
            trust_env=False,
            transport=transport,
        )

    def set_key(self, api_key: str) -> None:
        """Use a new API key from the next request on."""
        self._key = api_key

    def close(self) -> None:
        """Close pooled connections."""
        self._http.close()

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"}

    def notify(self, notice: ScanNotice) -> Answer:
        """Tell Meetch a ticket was scanned; never raises for network or HTTP trouble."""
        body: dict[str, str] = {
            "number": notice.ticket,
            "scanned_at": notice.scanned_at,
            "scan_id": notice.scan_id,
        }
        if self.settings.organization_id:
            body["organization_id"] = self.settings.organization_id
        key = self._key
        problem = _key_problem(key)
        if problem is not None:
            return Answer(Outcome.AUTH_FAILED, None, problem)
        headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": notice.scan_id}
        try:
            with self._http.stream(
                "POST", self.settings.scan_path, json=body, headers=headers
            ) as response:
                text = _redact(_read_capped(response), key)
        except httpx.TimeoutException as exc:
            return Answer(Outcome.RETRY, None, f"timeout: {exc.__class__.__name__}")
        except httpx.HTTPError as exc:
            return Answer(Outcome.RETRY, None, _error_text(exc, key))
        return classify(response.status_code, response.headers, text)

    def cancellations(self, since: str | None) -> list[tuple[str, str]]:
        """Every ticket refunded after ``since``, as ``(number, refunded_at)``, all pages."""
        refunds: list[tuple[str, str]] = []
        for page in _pages():
            params: dict[str, str | int] = {"page": page}
            if since:
                params["since"] = since
            data = self._get_json(self.settings.cancellations_path, params)
            items, has_more = data.get("data"), data.get("has_more")
            if not isinstance(items, list) or not isinstance(has_more, bool):
                raise DeliveryError("cancellations: answer has no data list or has_more flag")
            for item in items:
                number = item.get("number") if isinstance(item, dict) else None
                refunded_at = item.get("refunded_at") if isinstance(item, dict) else None
                if not isinstance(number, str) or not isinstance(refunded_at, str):
                    raise DeliveryError(f"cancellations: malformed item on page {page}")
                refunds.append((number, refunded_at))
            if not has_more:
                return refunds
        raise DeliveryError(f"cancellations: more than {MAX_PAGES} pages")

    def check_auth(self) -> Answer:
        """A cheap authenticated request: is Meetch reachable and the key accepted?"""
        problem = _key_problem(self._key)
        if problem is not None:
            return Answer(Outcome.AUTH_FAILED, None, problem)
        try:
            response = self._http.get(
                self.settings.cancellations_path,
                params={"since": _rfc3339_now(), "page": 1},
                headers=self._auth(),
            )
        except httpx.HTTPError as exc:
            return Answer(Outcome.RETRY, None, _error_text(exc, self._key))
        if response.is_success:
            return Answer(Outcome.DELIVERED, response.status_code, "key accepted")
        text = _redact(response.text, self._key)[:MAX_KEPT_BODY]
        return classify(response.status_code, response.headers, text)

    def _get_json(self, path: str, params: dict[str, str | int]) -> dict[str, Any]:
        key = self._key
        problem = _key_problem(key)
        if problem is not None:
            raise DeliveryError(f"{path}: {problem}")
        headers = {"Authorization": f"Bearer {key}"}
        try:
            with self._http.stream("GET", path, params=params, headers=headers) as response:
                text = _redact(_read_capped(response), key)
        except httpx.HTTPError as exc:
            raise DeliveryError(f"{path}: {_error_text(exc, key)}") from None
        answer = classify(response.status_code, response.headers, text)
        if answer.outcome is not Outcome.DELIVERED or response.status_code == 409:
            raise DeliveryError(f"{path}: HTTP {response.status_code}: {answer.detail}")
        try:
            data = json.loads(text)
        except ValueError:
            raise DeliveryError(f"{path}: answer is not JSON") from None
        if not isinstance(data, dict):
            raise DeliveryError(f"{path}: answer is not a JSON object")
        return data


def classify(status: int, headers: httpx.Headers, body: str) -> Answer:
    """What an HTTP answer to a scan notification means (CONTRACT §4's table)."""
    snippet = " ".join(body.split())[:MAX_KEPT_BODY]
    detail = f"HTTP {status}: {snippet}" if snippet else f"HTTP {status}"
    html = "html" in headers.get("content-type", "").lower()
    if 200 <= status < 300:
        if html:
            # A captive portal or proxy answering for Meetch: not evidence of delivery.
            return Answer(Outcome.RETRY, status, f"HTTP {status} with an HTML page, not Meetch")
        return Answer(Outcome.DELIVERED, status, detail)
    if html and 400 <= status < 500 and status not in (401, 403):
        # Meetch's API answers JSON: an HTML 404 or 400 is a proxy's or a captive portal's
        # page, no evidence that Meetch does not know the ticket or refuses it for good.
        return Answer(
            Outcome.RETRY,
            status,
            f"HTTP {status} with an HTML page, not Meetch: {snippet}"[:MAX_KEPT_BODY],
            retry_after(headers.get("retry-after")),
        )
    if status == 409:
        return Answer(Outcome.DELIVERED, status, detail)
    if status == 404:
        return Answer(Outcome.UNKNOWN, status, detail)
    if status in (401, 403):
        return Answer(Outcome.AUTH_FAILED, status, f"HTTP {status}: API key refused")
    if status in (408, 425, 429) or status >= 500 or status < 200 or 300 <= status < 400:
        return Answer(Outcome.RETRY, status, detail, retry_after(headers.get("retry-after")))
    return Answer(Outcome.REJECTED, status, detail)


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _key_problem(key: str) -> str | None:
    """Why ``key`` cannot be sent as a Bearer token, or None; never quotes the key.

    Sent anyway, a key with a line break or a control character makes the HTTP library
    fail with an error that quotes the whole header, key included (escaped, so no
    redaction finds it); a non-ASCII one makes it raise. Either way it is a key problem,
    for the technician to fix in the key file, not an outage to retry.
    """
    if not key:
        return "the API key is empty"
    if not all("!" <= ch <= "~" for ch in key):
        return (
            "the API key holds a space, a line break, a control or a non-ASCII character: "
            "the key file must hold the key alone, on one line"
        )
    return None


def _error_text(exc: httpx.HTTPError, key: str) -> str:
    return _redact(f"{exc.__class__.__name__}: {exc}", key)[:MAX_KEPT_BODY]


def _redact(text: str, key: str) -> str:
    """``text`` without the API key: a proxy's error page may echo the request's headers."""
    return text.replace(key, "[api key]") if key else text


def _read_capped(response: httpx.Response) -> str:
    data = bytearray()
    for chunk in response.iter_bytes():
        data += chunk
        if len(data) >= MAX_BODY_BYTES:
            break
    return bytes(data[:MAX_BODY_BYTES]).decode("utf-8", errors="replace")


def _pages() -> Iterator[int]:
    return iter(range(1, MAX_PAGES + 1))


def _rfc3339_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _tls_context(ca_file: str) -> ssl.SSLContext:
    """System and certifi roots, plus ``ca_file``: verification is never turned off."""
    context = ssl.create_default_context(cafile=certifi.where())
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context
