"""The API key never leaves the agent, and what the agent writes is its user's alone.

A distinctive key, longer than the 80 characters a traceback shows of a value (so a cut
prefix would be caught too), goes through a hostile night: answers that echo the
Authorization header back (500, 400, a captive portal, a 401), a key refused, an empty key
file with SIGHUP, a new key with SIGHUP. Then the daemon's whole log, ``status --json``,
``queue list --json``, ``queue export`` (JSONL and CSV, to stdout and to files) and
``doctor --json`` must not hold the key, nor any 12 characters of it in a row. Keys that
cannot be sent at all (two lines, a non-ASCII character) are refused locally, never echoed
by the HTTP library. A bug's traceback, rendered by the agent's logger in both modes, shows
no frame's local variables. The state directory is 0700, everything in it 0600, and so are
exports, whatever the umask the agent was started with.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import stat
import string
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from agent import logs
from agent.config import MeetchSettings
from agent.meetch import Answer, MeetchClient, ScanNotice
from agent.sender import Backoff, Sender
from agent.store import Store
from hardware_mocks.meetch_sim import SimulatedMeetch
from hardware_mocks.virtual_scanner import VirtualScanner
from tests.conftest import AgentProcess, ConfigWriter, cli, wait_until

WINDOW = 12
"""Any run of this many characters of the key counts as a leak."""
GOOD = b"\x06"


def make_key(seed: int, length: int = 120) -> str:
    """A distinctive key, seeded, longer than a traceback's 80-character cut."""
    rng = random.Random(seed)
    return "mgk_live_" + "".join(rng.choices(string.ascii_letters + string.digits, k=length))


KEY = make_key(1)
NEW_KEY = make_key(2)


def fragments(key: str) -> set[str]:
    """Every run of WINDOW characters of ``key`` (for a multi-line key, of each line)."""
    found: set[str] = set()
    for line in key.split("\n"):
        part = line.strip()
        found |= {part[i : i + WINDOW] for i in range(max(1, len(part) - WINDOW + 1))}
    return found - {""}


def assert_no_key(text: str, *keys: str, where: str) -> None:
    """``text`` holds no key and no WINDOW characters in a row of one."""
    for key in keys:
        leaked = sorted(f for f in fragments(key) if f in text)
        assert not leaked, f"{where} leaks the key: {leaked[:3]}"


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """Run with this umask: the agent must not count on a careful one."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def run_cli(config: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """A subcommand's stdout and stderr together (the exit code is not the point here)."""
    result = cli(*args, "--config", str(config), env=env)
    return result.stdout + result.stderr


def status(config: Path) -> dict[str, Any]:
    """``status --json``."""
    result = cli("status", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def write_key(path: Path, text: str) -> None:
    """Write the key file the way a technician would, 0600."""
    path.write_text(text)
    path.chmod(0o600)


def scanner_config(config_writer: ConfigWriter, scanner: VirtualScanner) -> Path:
    """A config with one virtual scanner and quick retries."""
    return config_writer.write(
        meetch={"retry_initial_s": 0.05, "retry_max_s": 0.3},
        scanners=[
            {
                "name": "north-1",
                "port": str(scanner.link),
                "terminator": "\r",
                "good_read": "\u0006",
                "bad_read": "\u0015",
            }
        ],
    )


def echo(key: str) -> bytes:
    """A proxy's error page that shows the request's headers back."""
    return (
        f"<pre>upstream error\nPOST /v1/items/scan\nAuthorization: Bearer {key}\n"
        f"User-Agent: meetch-gate-agent</pre>"
    ).encode()


def every_output(
    config: Path, tmp_path: Path, agent: AgentProcess, *, human: bool = True
) -> dict[str, str]:
    """What the technician and a monitoring system can see, by where it comes from
    (``human``: the plain-text renderings too, not only the JSON ones and the exports)."""
    outputs = {
        "status --json": run_cli(config, "status", "--json"),
        "queue list --json": run_cli(config, "queue", "list", "--json"),
        "queue export": run_cli(config, "queue", "export"),
        "doctor --json": run_cli(config, "doctor", "--json"),
    }
    if human:
        outputs["status"] = run_cli(config, "status")
        outputs["queue list"] = run_cli(config, "queue", "list")
        outputs["doctor"] = run_cli(config, "doctor")
    for fmt in ("jsonl", "csv"):
        out = tmp_path / f"stick.{fmt}"
        outputs[f"export -o {out.name}"] = run_cli(
            config, "queue", "export", "--format", fmt, "-o", str(out)
        )
        outputs[out.name] = out.read_text()
    outputs["daemon log"] = agent.output()
    return outputs


def assert_private(state_dir: Path, *exports: Path) -> None:
    """The state directory is 0700; every file in it, and each export, 0600 at most."""
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    files = [p for p in state_dir.rglob("*") if p.is_file()]
    assert any(p.name == "queue.sqlite3" for p in files)
    for path in [*files, *exports]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {mode:04o}"
    for path in state_dir.rglob("*"):
        if path.is_dir():
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_key_never_leaks_through_a_hostile_night(
    config_writer: ConfigWriter,
    meetch: SimulatedMeetch,
    scanner_factory: Callable[[str], VirtualScanner],
    start_agent: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    """Echoed headers, a 401, an empty key file and a new key with SIGHUP: the key appears
    in no log line, status, list, export or doctor report, and every file is private."""
    key_file = tmp_path / "api-key"
    write_key(key_file, KEY + "\n")
    meetch.set_api_keys([KEY])
    north = scanner_factory("north")
    config = scanner_config(config_writer, north)
    state_dir = tmp_path / "state"

    with umask(0):
        agent = start_agent(config)
        wait_until(lambda: any(s["connected"] for s in status(config)["scanners"]), 20)

        # Error pages that echo the Authorization header, then Meetch answers.
        meetch.fail_next(2, 500, echo(KEY), "text/plain")
        meetch.fail_next(
            1, 502, json.dumps({"headers": {"authorization": f"Bearer {KEY}"}}).encode()
        )
        meetch.fail_next(1, 200, echo(KEY), "text/html")
        north.type("SEC-0001")
        assert meetch.wait_for(lambda: "SEC-0001" in meetch.flagged, 20)

        # A permanent refusal whose body (kept as last_error) echoes the key.
        meetch.fail_next(1, 422, json.dumps({"error": f"bad header Bearer {KEY}"}).encode())
        north.type("SEC-0002")
        wait_until(lambda: status(config)["queue"]["rejected"] == 1, 20)

        # The key is refused (the 401 page echoes it too), and stays refused.
        meetch.set_api_keys([NEW_KEY])
        meetch.fail_next(1, 401, echo(KEY), "text/html")
        north.type("SEC-0003")
        wait_until(lambda: status(config)["api_state"] == "auth_failed", 20)

        # A technician empties the key file by mistake and reloads: refused, logged.
        write_key(key_file, "")
        agent.signal(signal.SIGHUP)
        wait_until(lambda: "reload_refused" in agent.output(), 20)
        assert status(config)["api_state"] == "auth_failed"

        # The new key, and a reload: everything goes out.
        write_key(key_file, NEW_KEY + "\n")
        agent.signal(signal.SIGHUP)
        assert meetch.wait_for(lambda: "SEC-0003" in meetch.flagged, 20)
        north.type("SEC-0004")
        assert meetch.wait_for(lambda: "SEC-0004" in meetch.flagged, 20)
        assert north.wait_feedback(GOOD, 10, count=4)

        outputs = every_output(config, tmp_path, agent)
        # doctor with the old key, refused, from the environment.
        outputs["doctor (refused key)"] = run_cli(
            config, "doctor", "--json", env={"MEETCH_API_KEY": KEY}
        )
        assert agent.stop() == 0
    outputs["daemon log"] = agent.output()

    for where, text in outputs.items():
        assert_no_key(text, KEY, NEW_KEY, where=where)
    # The outputs are real: they show the night, just not the key.
    assert "SEC-0002" in outputs["queue list --json"]
    rejected = [n for n in json.loads(outputs["queue list --json"]) if n["state"] == "rejected"]
    assert rejected[0]["last_error"].startswith("HTTP 422")
    assert "reload_refused" in outputs["daemon log"]
    assert "api_key_refused" in outputs["daemon log"]
    doctor = json.loads(outputs["doctor (refused key)"])
    assert any(c["name"] == "api" and c["status"] == "fail" for c in doctor["checks"])
    assert_private(state_dir, tmp_path / "stick.jsonl", tmp_path / "stick.csv")


@pytest.mark.parametrize(
    "key_text",
    [
        pytest.param(KEY + "\n" + NEW_KEY + "\n", id="two-lines"),
        pytest.param(KEY[:60] + "é" + KEY[60:], id="non-ascii"),
        pytest.param(KEY[:60] + "\x7f" + KEY[60:], id="control-character"),
    ],
)
def test_a_key_that_cannot_be_sent_is_refused_not_echoed(
    key_text: str,
    config_writer: ConfigWriter,
    meetch: SimulatedMeetch,
    scanner_factory: Callable[[str], VirtualScanner],
    start_agent: Callable[..., AgentProcess],
) -> None:
    """A key no HTTP header can carry: auth_failed at once, nothing sent, and the HTTP
    library's error (which quotes the header it refused) never reaches a log or the queue."""
    tmp_path = config_writer.root
    write_key(tmp_path / "api-key", key_text)
    north = scanner_factory("north")
    config = scanner_config(config_writer, north)
    agent = start_agent(config)
    wait_until(lambda: any(s["connected"] for s in status(config)["scanners"]), 20)

    north.type("SEC-0100")

    wait_until(lambda: status(config)["api_state"] == "auth_failed", 20)
    assert meetch.scan_requests == []
    notes = json.loads(run_cli(config, "queue", "list", "--json"))
    assert [(n["ticket"], n["state"]) for n in notes] == [("SEC-0100", "pending")]
    outputs = every_output(config, tmp_path, agent, human=False)
    assert agent.stop() == 0
    outputs["daemon log"] = agent.output()
    for where, text in outputs.items():
        assert_no_key(text, key_text, where=where)
    assert "Traceback" not in outputs["daemon log"]
    assert "notify_crashed" not in outputs["daemon log"]
    doctor = json.loads(outputs["doctor --json"])
    (api,) = [c for c in doctor["checks"] if c["name"] == "api"]
    assert api["status"] == "fail"
    assert "one line" in api["detail"]


class CrashingNotifier:
    """The real client, except that a bug strikes in a frame that holds the key."""

    def __init__(self, client: MeetchClient, key: str) -> None:
        self.client = client
        self.key = key

    def notify(self, notice: ScanNotice) -> Answer:
        """Build the headers as the client does, then fail like a bug would."""
        headers = {"Authorization": f"Bearer {self.key}", "Idempotency-Key": notice.scan_id}
        raise RuntimeError(f"bug while sending {notice.ticket} with {len(headers)} headers")

    def set_key(self, api_key: str) -> None:
        """Pass the key on."""
        self.client.set_key(api_key)


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """Put structlog and the redaction list back as they were."""
    config = structlog.get_config()
    secrets = set(logs._secrets)
    try:
        yield
    finally:
        structlog.configure(**config)
        logs._secrets.clear()
        logs._secrets.update(secrets)


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "console"])
@pytest.mark.parametrize("key", [KEY, 'mgk_"quoted\\slashed"_' + KEY[:90]], ids=["long", "escapes"])
@pytest.mark.usefixtures("restored_logging")
def test_a_crash_traceback_never_shows_the_key(
    as_json: bool, key: str, meetch: SimulatedMeetch, store: Store
) -> None:
    """notify_crashed renders the traceback (JSON lines or console) without locals and with
    the key redacted from the exception, even where JSON escaping would hide it."""
    stream = io.StringIO()
    logs.configure(json=as_json, stream=stream)
    logs.redact(key)
    client = MeetchClient(MeetchSettings(base_url=meetch.base_url, timeout_s=2.0), key)
    sender = Sender(
        store,
        CrashingNotifier(client, key),
        owner="crash",
        max_in_flight=1,
        backoff=Backoff(0.05, 0.1, random.Random(3)),
        lease_s=10,
        api_key=key,
    )
    stop = threading.Event()
    thread = threading.Thread(target=sender.run, args=(stop,))
    thread.start()
    try:
        store.record_scan("north-1", "SEC-0200", "valid", "2026-02-20T19:42:07.120+01:00")
        sender.wake()
        wait_until(lambda: stream.getvalue().count("notify_crashed") >= 2, 10)
    finally:
        stop.set()
        sender.stop_waiting()
        thread.join(10)
        client.close()

    # An exception whose very message holds the key (an HTTP library quoting a header).
    try:
        raise RuntimeError(f"Illegal header value Bearer {key}")
    except RuntimeError:
        structlog.get_logger("agent.test").exception("header_refused")

    text = stream.getvalue()
    assert "RuntimeError" in text  # the tracebacks are there...
    assert "bug while sending SEC-0200" in text
    assert "Illegal header value Bearer [redacted]" in text
    assert_no_key(text, key, where="traceback")  # ...the key is not
    if as_json:
        crashed = [json.loads(line) for line in text.splitlines() if "notify_crashed" in line]
        assert crashed[0]["exception"]
