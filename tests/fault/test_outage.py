"""A long outage: thousands of scans with Meetch down, then the backlog drains.

The backlog must live on disk, not in the daemon's memory: its resident set stays flat
however many scans wait. When Meetch comes back everything goes out oldest first, each
ticket under one scan id. Scans go through the real pipeline: typed in bursts on two
pseudo-terminal scanners, read and committed by a real ``meetch-gate run`` subprocess.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from hardware_mocks.meetch_sim import SimulatedMeetch
from hardware_mocks.virtual_scanner import VirtualScanner
from tests.conftest import AgentProcess, ConfigWriter, wait_until
from tests.fault.conftest import LONG, Record, query

SCANS = 50_000 if LONG else 3_000
BURST = 100
"""Frames written to a scanner at once before waiting for their good_read bytes."""
WARM_UP = 500
"""Scans after which the daemon's memory is taken as the baseline (caches warm)."""
RSS_GROWTH_LIMIT_KB = 30 * 1024
"""A generous memory bound. Caches and allocator take some 5-10 MiB; the long run's 50,000
scans held as Python objects (~0.7 KiB each) would go well past it."""
MAX_IN_FLIGHT = 16
ORDER_SLACK = 4 * MAX_IN_FLIGHT
"""How much younger than a ticket one sent before it may be. Requests run in parallel (a
slow thread lets younger ones overtake), and the probe that finds Meetch back may be an item
whose own backoff let it go first; a queue that is not oldest first strays by thousands."""
GOOD = b"\x06"


def rss_kb(pid: int) -> int:
    """The process's resident set size (VmRSS) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def scanners_open(db: Path, names: set[str]) -> bool:
    """True once the daemon reported every named scanner open."""
    if not db.exists():
        return False
    try:
        rows = query(db, "SELECT name FROM scanner_status WHERE connected = 1")
    except sqlite3.OperationalError:  # the schema is not there yet
        return False
    return {r[0] for r in rows} >= names


def first_requests(meetch: SimulatedMeetch) -> list[str]:
    """Ticket numbers in the order of their first notification request."""
    seen: set[str] = set()
    order: list[str] = []
    for request in meetch.scan_requests:
        number = request.json["number"]
        if number not in seen:
            seen.add(number)
            order.append(number)
    return order


def worst_inversion(order: list[str], rank: dict[str, int]) -> int:
    """How many scans younger than a ticket the youngest one sent before it was (0: in order)."""
    worst, youngest = 0, -1
    for ticket in order:
        worst = max(worst, youngest - rank[ticket])
        youngest = max(youngest, rank[ticket])
    return worst


def test_long_outage_backlog_on_disk_then_drains_oldest_first(
    config_writer: ConfigWriter,
    meetch: SimulatedMeetch,
    scanner_factory: Callable[[str], VirtualScanner],
    start_agent: Callable[..., AgentProcess],
    figures: Record,
) -> None:
    """Memory stays flat through a long outage; then every ticket goes out once, oldest first."""
    north, south = scanner_factory("north"), scanner_factory("south")
    config = config_writer.write(
        meetch={"retry_initial_s": 0.05, "retry_max_s": 0.5, "max_in_flight": MAX_IN_FLIGHT},
        scanners=[
            {"name": "north-1", "port": str(north.link), "terminator": "\r", "good_read": "\u0006"},
            {"name": "south-1", "port": str(south.link), "terminator": "\n", "good_read": "\u0006"},
        ],
    )
    db = config_writer.root / "state" / "queue.sqlite3"
    meetch.go_offline()
    agent = start_agent(config)
    wait_until(lambda: scanners_open(db, {"north-1", "south-1"}), 20)
    pid = agent.proc.pid

    lanes = [(north, b"\r"), (south, b"\n")]
    acked = [0, 0]
    typed: list[str] = []
    baseline: int | None = None
    samples: list[int] = []
    for burst, first in enumerate(range(0, SCANS, BURST)):
        side = burst % 2  # one scanner at a time, so the typed order is the commit order
        scanner, terminator = lanes[side]
        tickets = [f"OUT-{i:06d}" for i in range(first, min(SCANS, first + BURST))]
        scanner.write(b"".join(t.encode() + terminator for t in tickets))
        typed += tickets
        acked[side] += len(tickets)
        assert scanner.wait_feedback(GOOD, 30, count=acked[side]), f"burst {burst} not acked"
        if baseline is None:
            if len(typed) >= WARM_UP:
                baseline = rss_kb(pid)
        else:
            samples.append(rss_kb(pid))
    assert baseline is not None

    committed = [r[0] for r in query(db, "SELECT ticket FROM notifications ORDER BY id")]
    assert committed == typed
    pending = query(db, "SELECT COUNT(*) FROM notifications WHERE state = 'pending'")[0][0]
    assert pending == SCANS
    assert not meetch.flagged

    meetch.go_online()

    def drained() -> bool:
        samples.append(rss_kb(pid))
        return len(meetch.flagged) == SCANS

    try:
        wait_until(drained, max(60.0, SCANS / 50), 0.1)
    except AssertionError:
        left = query(db, "SELECT COUNT(*) FROM notifications WHERE state = 'pending'")[0][0]
        raise AssertionError(
            f"{len(meetch.flagged)} of {SCANS} flagged, {left} pending in the queue;"
            f" daemon alive: {agent.proc.poll() is None}; log tail:\n{agent.output()[-3000:]}"
        ) from None
    assert agent.stop() == 0
    states = dict(query(db, "SELECT state, COUNT(*) FROM notifications GROUP BY state"))
    assert states == {"delivered": SCANS}

    growth = max(samples) - baseline
    order = first_requests(meetch)
    inversion = worst_inversion(order, {t: i for i, t in enumerate(typed)})
    figures("outage_scans", SCANS)
    figures("outage_rss_growth_kb", growth)
    figures("drained_oldest_first", int(inversion <= ORDER_SLACK))
    figures("outage_worst_order_inversion", inversion)

    assert growth < RSS_GROWTH_LIMIT_KB, f"RSS grew {growth} KiB over a {SCANS}-scan backlog"
    assert sorted(order) == typed, "not every ticket was sent"
    assert inversion <= ORDER_SLACK, (
        f"a ticket went out after one scanned {inversion} scans later than it"
    )
    assert all(len(meetch.scan_ids_for(t)) == 1 for t in typed)
