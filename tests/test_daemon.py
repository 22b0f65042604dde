"""The daemon end to end, as a real subprocess driven only through CONTRACT.md.

Real pseudo-terminal scanners, a real loopback Meetch, a real SQLite file; signals and
``kill -9`` sent to a real process.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.store import Store
from hardware_mocks.meetch_sim import SimulatedMeetch
from hardware_mocks.virtual_scanner import VirtualScanner
from tests.conftest import API_KEY, AgentProcess, ConfigWriter, cli, wait_until

GOOD, BAD = b"\x06", b"\x15"


def scanner_entry(name: str, scanner: VirtualScanner, terminator: str = "\r") -> dict[str, Any]:
    """A [[scanners]] table for a virtual scanner."""
    return {
        "name": name,
        "port": str(scanner.link),
        "terminator": terminator,
        "good_read": "\u0006",
        "bad_read": "\u0015",
    }


def status(config: Path) -> dict[str, Any]:
    """``meetch-gate status --json`` as a real subprocess."""
    result = cli("status", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def connected(config: Path, names: set[str]) -> bool:
    """True once the daemon reports every named scanner connected."""
    report = status(config)
    return {s["name"] for s in report["scanners"] if s["connected"]} >= names


def queue_counts(state_dir: Path) -> dict[str, int]:
    """Notification counts read straight from the queue file."""
    store = Store(state_dir / "queue.sqlite3", device_id="reader")
    try:
        return store.queue_counts()
    finally:
        store.close()


def start_connected(
    start_agent: Callable[..., AgentProcess], config: Path, *names: str
) -> AgentProcess:
    """Start the agent and wait until it has the named scanners open."""
    agent = start_agent(config)
    wait_until(lambda: connected(config, set(names)), 15)
    return agent


@pytest.fixture
def two_scanners(
    config_writer: ConfigWriter, scanner_factory: Callable[[str], VirtualScanner]
) -> tuple[Path, VirtualScanner, VirtualScanner]:
    """A config with two virtual scanners, north (CR) and south (CRLF)."""
    north, south = scanner_factory("north"), scanner_factory("south")
    path = config_writer.write(
        scanners=[scanner_entry("north-1", north), scanner_entry("south-1", south, "\r\n")]
    )
    return path, north, south


def test_happy_path_two_scanners(
    two_scanners: tuple[Path, VirtualScanner, VirtualScanner],
    meetch: SimulatedMeetch,
    start_agent: Callable[..., AgentProcess],
) -> None:
    """Tickets from two scanners, some AIM-prefixed or split, each reach Meetch once."""
    config, north, south = two_scanners
    agent = start_connected(start_agent, config, "north-1", "south-1")
    tickets = [f"T-{i:04d}" for i in range(20)]
    for i, ticket in enumerate(tickets):
        if i % 2:
            south.type(ticket, terminator=b"\r\n", aim="]C0", chunk=3 if i % 3 == 0 else None)
        else:
            north.type(ticket, chunk=2 if i % 4 == 0 else None)
    assert north.wait_feedback(GOOD, 10, count=10)
    assert south.wait_feedback(GOOD, 10, count=10)
    assert meetch.wait_for(lambda: set(meetch.flagged) == set(tickets), 15)
    report = status(config)
    assert report["scans"]["valid"] == 20
    assert report["daemon"]["running"] is True
    assert report["api_state"] == "online"
    assert agent.stop() == 0
    assert all(len(meetch.scan_ids_for(t)) == 1 for t in tickets)
    assert status(config)["daemon"]["running"] is False


def test_duplicates_invalid_and_uninsured(
    two_scanners: tuple[Path, VirtualScanner, VirtualScanner],
    meetch: SimulatedMeetch,
    start_agent: Callable[..., AgentProcess],
) -> None:
    """Repeats inside the window are duplicates, garbage is never sent, uninsured is unknown."""
    config, north, _ = two_scanners
    meetch.unknown_tickets.add("NOT-INSURED")
    start_connected(start_agent, config, "north-1")
    north.type("DUP-1")
    north.type("DUP-1")
    north.write(b"\xff\xfe\x00garbage\r")
    north.type("")
    north.type("NOT-INSURED")
    assert north.wait_feedback(BAD, 10, count=2)
    wait_until(lambda: status(config)["queue"]["unknown"] == 1, 10)
    assert meetch.wait_for(lambda: "DUP-1" in meetch.flagged, 10)
    report = status(config)
    assert report["scans"] == {"valid": 2, "duplicate": 1, "invalid": 2, "refunded": 0}
    assert report["queue"]["delivered"] == 1
    sent = [r.json["number"] for r in meetch.scan_requests]
    assert sorted(sent) == ["DUP-1", "NOT-INSURED"]


def test_outage_then_recovery_loses_nothing(
    two_scanners: tuple[Path, VirtualScanner, VirtualScanner],
    meetch: SimulatedMeetch,
    start_agent: Callable[..., AgentProcess],
) -> None:
    """Scans taken while Meetch is down are held and all delivered, once, after it returns."""
    config, north, south = two_scanners
    start_connected(start_agent, config, "north-1", "south-1")
    meetch.go_offline()
    tickets = [f"OUT-{i:03d}" for i in range(30)]
    for i, ticket in enumerate(tickets):
        (north if i % 2 else south).type(ticket, terminator=b"\r" if i % 2 else b"\r\n")
    assert north.wait_feedback(GOOD, 10, count=15)
    wait_until(lambda: status(config)["api_state"] == "offline", 15)
    assert status(config)["queue"]["pending"] == 30
    meetch.go_online()
    assert meetch.wait_for(lambda: set(meetch.flagged) == set(tickets), 20)
    wait_until(lambda: status(config)["queue"]["pending"] == 0, 10)
    assert all(len(meetch.scan_ids_for(t)) == 1 for t in tickets)


def test_refused_key_then_new_key_and_sighup(
    two_scanners: tuple[Path, VirtualScanner, VirtualScanner],
    meetch: SimulatedMeetch,
    start_agent: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    """401 pauses sending (auth_failed), a new key plus SIGHUP delivers everything."""
    config, north, _ = two_scanners
    meetch.set_api_keys(["rotated-key-42"])
    agent = start_connected(start_agent, config, "north-1")
    for i in range(5):
        north.type(f"KEY-{i}")
    wait_until(lambda: status(config)["api_state"] == "auth_failed", 10)
    assert status(config)["queue"]["pending"] == 5
    (tmp_path / "api-key").write_text("rotated-key-42\n")
    agent.signal(signal.SIGHUP)
    assert meetch.wait_for(lambda: len(meetch.flagged) == 5, 15)
    assert "rotated-key-42" not in agent.output()
    assert API_KEY not in agent.output()
    assert agent.stop() == 0


def test_unplug_and_replug_at_the_same_path(
    two_scanners: tuple[Path, VirtualScanner, VirtualScanner],
    meetch: SimulatedMeetch,
    start_agent: Callable[..., AgentProcess],
) -> None:
    """An unplugged scanner shows disconnected, and reads again once plugged back."""
    config, north, south = two_scanners
    agent = start_connected(start_agent, config, "north-1", "south-1")
    north.unplug()
    wait_until(lambda: not connected(config, {"north-1"}), 10)
    south.type("STILL-WORKS", terminator=b"\r\n")
    assert meetch.wait_for(lambda: "STILL-WORKS" in meetch.flagged, 10)
    north.plug()
    wait_until(lambda: connected(config, {"north-1"}), 15)
    north.type("AFTER-REPLUG")
    assert meetch.wait_for(lambda: "AFTER-REPLUG" in meetch.flagged, 10)
    assert agent.proc.poll() is None


def test_kill_9_then_restart_delivers_every_committed_scan(
    two_scanners: tuple[Path, VirtualScanner, VirtualScanner],
    meetch: SimulatedMeetch,
    start_agent: Callable[..., AgentProcess],
) -> None:
    """Every scan acknowledged before kill -9 is delivered after a restart, once."""
    config, north, _ = two_scanners
    meetch.go_offline()
    agent = start_connected(start_agent, config, "north-1")
    tickets = [f"K9-{i:03d}" for i in range(25)]
    for ticket in tickets:
        north.type(ticket)
    assert north.wait_feedback(GOOD, 10, count=25)  # acknowledged = committed
    agent.kill()
    meetch.go_online()
    again = start_agent(config)
    assert meetch.wait_for(lambda: set(meetch.flagged) == set(tickets), 20)
    assert all(len(meetch.scan_ids_for(t)) == 1 for t in tickets)
    assert again.stop() == 0


def test_sigterm_exits_zero_and_status_works_without_daemon(
    two_scanners: tuple[Path, VirtualScanner, VirtualScanner],
    start_agent: Callable[..., AgentProcess],
) -> None:
    """SIGTERM ends the daemon with 0; status still answers from the database."""
    config, _, _ = two_scanners
    agent = start_agent(config)
    wait_until(lambda: status(config)["daemon"]["running"], 15)
    assert agent.stop() == 0
    report = status(config)
    assert report["daemon"]["running"] is False
    assert report["api_state"] == "unknown"
    assert {s["name"] for s in report["scanners"]} == {"north-1", "south-1"}
    assert not any(s["connected"] for s in report["scanners"])


def test_bad_config_exits_78_naming_the_key(config_writer: ConfigWriter) -> None:
    """A bad value stops ``run`` with 78 and one line naming file and key."""
    path = config_writer.write(meetch={"base_url": "ftp://meetch.example"})
    result = cli("run", "--config", str(path))
    assert result.returncode == 78
    assert "meetch.base_url" in result.stderr
    assert str(path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_key_exits_78(config_writer: ConfigWriter, tmp_path: Path) -> None:
    """No API key anywhere is a config error, 78, saying where it looked."""
    (tmp_path / "api-key").unlink()
    path = config_writer.write()
    result = cli("run", "--config", str(path), env={"MEETCH_API_KEY": ""})
    assert result.returncode == 78
    assert "MEETCH_API_KEY" in result.stderr
