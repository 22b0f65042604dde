"""Disk full: scans keep being read, are held in memory in order, and written when room
returns; past the memory bound they are counted, never silently lost. No crash loop."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.config import ScannerSettings
from agent.intake import Dedupe, Intake
from agent.store import Store
from hardware_mocks.meetch_sim import SimulatedMeetch
from hardware_mocks.virtual_scanner import VirtualScanner
from tests.conftest import AgentProcess, ConfigWriter, cli, wait_until
from tests.fault.conftest import LONG, Record

GOOD = b"\x06"
NORTH = ScannerSettings(name="north-1", port="/dev/ttyACM0", good_read=GOOD)


def fill_until_full(store: Store) -> int:
    """Cap the database at its current size (SQLITE_FULL from then on); returns the cap."""
    pages = int(store.db.conn.execute("PRAGMA page_count").fetchone()[0])
    store.db.conn.execute(f"PRAGMA max_page_count = {pages}")
    return pages


def test_sqlite_full_holds_scans_and_writes_them_when_room_returns(
    tmp_path: Path, figures: Record
) -> None:
    """SQLITE_FULL: no acknowledgement, scans held in order, then all committed once."""
    store = Store(tmp_path / "queue.sqlite3", device_id="box")
    try:
        intake = Intake(store, Dedupe(5.0), max_held=100_000)
        assert intake.handle(NORTH, b"BEFORE") == GOOD
        pages = fill_until_full(store)
        count = 3000 if LONG else 400
        tickets = [f"FULL-{i:06d}" for i in range(count)]
        answers = [intake.handle(NORTH, t.encode()) for t in tickets]
        fitted = answers.index(b"")  # the last free pages took a few scans
        # Once full, nothing is acknowledged while it is not durable.
        assert answers == [GOOD] * fitted + [b""] * (count - fitted)
        assert count - fitted > count // 2
        assert intake.health.state == "degraded"
        assert intake.health.disk_full
        assert intake.health.held == count - fitted
        assert intake.retry_held() == count - fitted  # still full: still held, nothing lost
        store.db.conn.execute(f"PRAGMA max_page_count = {pages * 1000}")
        assert intake.retry_held() == 0
        assert intake.health.state == "ok"
        written = [n.ticket for n in reversed(store.notifications())]
        assert written == ["BEFORE", *tickets]
        figures("disk_full_scans_held", count - fitted)
        figures("disk_full_scans_recovered", len(written) - 1 - fitted)
    finally:
        store.close()


def test_memory_bound_reached_is_counted_and_loud(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Past the memory bound, scans are counted as dropped with a critical log line."""
    store = Store(tmp_path / "queue.sqlite3", device_id="box")
    try:
        intake = Intake(store, Dedupe(5.0), max_held=50)
        intake.handle(NORTH, b"BEFORE")
        fill_until_full(store)
        answers = [intake.handle(NORTH, f"D{i}".encode()) for i in range(200)]
        fitted = answers.index(b"")  # the last free pages took a few scans
        assert intake.health.held == 50
        assert intake.health.dropped == 200 - fitted - 50
        assert "scan_dropped_memory_full" in capsys.readouterr().out
    finally:
        store.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 3 MiB tmpfs, so the disk really fills (ENOSPC); skipped where mounting is
    not allowed."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(mount: Path, leave: int = 0) -> Path:
    """Write a filler file until the filesystem is full (less ``leave`` bytes)."""
    filler = mount / "filler"
    with filler.open("wb") as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 16384)
            fh.flush()
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def status(config: Path) -> dict[str, object]:
    """status --json as a subprocess."""
    result = cli("status", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_real_enospc_daemon_holds_reports_and_recovers(  # noqa: PLR0917 (fixtures)
    small_disk: Path,
    config_writer: ConfigWriter,
    scanner_factory: Callable[[str], VirtualScanner],
    meetch: SimulatedMeetch,
    start_agent: Callable[..., AgentProcess],
    figures: Record,
) -> None:
    """A really full disk: the daemon stays up, status says so, and nothing is lost."""
    north = scanner_factory("north")
    path = config_writer.write(
        agent={"state_dir": str(small_disk / "state")},
        scanners=[{"name": "north-1", "port": str(north.link), "good_read": "\u0006"}],
    )
    agent = start_agent(path)
    wait_until(lambda: any(s["connected"] for s in status(path)["scanners"]), 15)  # type: ignore[union-attr]
    north.type("BEFORE-FULL")
    assert north.wait_feedback(GOOD, 10)
    assert meetch.wait_for(lambda: "BEFORE-FULL" in meetch.flagged, 10)
    filler = fill_disk(small_disk)
    held = [f"ENOSPC-{i:04d}" for i in range(40)]
    for ticket in held:
        north.type(ticket)
    wait_until(lambda: status(path)["store"]["state"] == "degraded", 15)  # type: ignore[index]
    report = status(path)
    assert report["daemon"]["running"] is True  # type: ignore[index]
    assert agent.proc.poll() is None
    doctor = cli("doctor", "--json", "--config", str(path))
    assert doctor.returncode == 1
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["queue_writes"]["status"] == "fail"
    acknowledged = north.feedback.count(GOOD)
    filler.unlink()  # room again
    wait_until(lambda: status(path)["store"]["state"] == "ok", 20)  # type: ignore[index]
    assert meetch.wait_for(lambda: set(held) <= set(meetch.flagged), 20)
    assert agent.proc.poll() is None
    assert agent.stop() == 0
    assert "store_cannot_commit" in agent.output()
    assert "store_recovered" in agent.output()
    figures("disk_full_scans_held", len(held) - (acknowledged - 1))
    figures("disk_full_scans_recovered", len(held) - (acknowledged - 1))
