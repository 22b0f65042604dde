"""kill -9 of the daemon at random moments while scans stream in and notifications flow.

The promise (README, Reliability): a scan the agent acknowledged with ``good_read`` is never
lost, and no ticket reaches Meetch under two scan ids, whatever happens to the process.

Two virtual scanners type tickets one at a time, so each ``good_read`` byte is matched to
the one ticket waiting for it. A ticket typed just before a kill may or may not be
acknowledged; only acknowledged ones must survive. The simulated Meetch is online, offline,
slow, faulty or coming back while the daemon is killed, seeded so every run is the same
plan (thread timing aside).
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hardware_mocks.meetch_sim import SimulatedMeetch
from hardware_mocks.virtual_scanner import VirtualScanner
from tests.conftest import AgentProcess, ConfigWriter, wait_until
from tests.fault.conftest import LONG, Record, query, queue_db

SEED = 20260220
KILLS = 300 if LONG else 30
GOOD = b"\x06"
ACK_TIMEOUT_S = 20.0
"""A live daemon that has not acknowledged a frame after this long is a failure."""
STARTUP_KILL_CHANCE = 0.1
"""Share of kills that hit the daemon while it starts, before its scanners are open."""
REPEAT_CHANCE = 0.15
"""Share of scans that are a ticket already scanned at the other gate."""
MODES = ("online", "online", "offline", "slow", "faults", "comes_back")


def integrity(db: Path) -> str:
    """``PRAGMA integrity_check`` of the queue file."""
    return "; ".join(str(row[0]) for row in query(db, "PRAGMA integrity_check"))


def pending(db: Path) -> int:
    """Notifications still pending in the queue file."""
    return int(query(db, "SELECT COUNT(*) FROM notifications WHERE state = 'pending'")[0][0])


def scanners_open(db: Path, names: set[str], since: float) -> bool:
    """True once this daemon (not a killed one before it) reported every scanner open."""
    if not db.exists():
        return False
    try:
        rows = query(db, "SELECT name, connected, updated_at FROM scanner_status")
    except sqlite3.OperationalError:  # not created yet, or the schema is being made
        return False
    fresh = {str(name) for name, connected, at in rows if connected and at >= since}
    return fresh >= names


@dataclass
class Lane:
    """One scanner's stream of tickets and what came back."""

    name: str
    prefix: str
    terminator: bytes
    scanner: VirtualScanner
    rng: random.Random
    typed: list[str] = field(default_factory=list)
    acked: list[str] = field(default_factory=list)
    credited: int = 0
    """``good_read`` bytes already matched to a ticket."""
    waiting: str | None = None
    """The ticket typed last whose acknowledgement has not been seen (at most one)."""
    this_run: set[str] = field(default_factory=set)
    """Tickets typed at this scanner since the daemon started (a repeat would be deduped)."""
    fresh: int = 0

    def settle(self) -> None:
        """Match a ``good_read`` that arrived after the kill to the ticket that waited for it."""
        self.scanner.read_feedback(0)
        got = self.scanner.feedback.count(GOOD)
        assert got <= self.credited + 1, f"{self.name}: more good_read than tickets typed"
        if got == self.credited + 1:
            assert self.waiting is not None
            self.acked.append(self.waiting)
            self.credited = got
        self.waiting = None
        self.this_run = set()

    def next_ticket(self, other: Lane) -> str:
        """A new ticket, or now and then one already scanned at the other gate."""
        if other.typed and self.rng.random() < REPEAT_CHANCE:
            ticket = self.rng.choice(other.typed[-200:])  # a copy: other.typed grows meanwhile
            if ticket not in self.this_run:
                return ticket
        self.fresh += 1
        return f"{self.prefix}{self.fresh:06d}"

    def stream(self, other: Lane, dead: threading.Event, errors: list[BaseException]) -> None:
        """Type tickets one at a time, each waiting for its ``good_read``, until the kill."""
        try:
            while not dead.is_set():
                ticket = self.next_ticket(other)
                self.waiting = ticket
                self.typed.append(ticket)
                self.this_run.add(ticket)
                self.scanner.type(ticket, terminator=self.terminator)
                deadline = time.monotonic() + ACK_TIMEOUT_S
                while not self.scanner.wait_feedback(GOOD, 0.05, count=self.credited + 1):
                    if dead.is_set():
                        return  # settle() decides once the dust is down
                    if time.monotonic() > deadline:
                        raise AssertionError(
                            f"{self.name}: no good_read for {ticket} in {ACK_TIMEOUT_S} s"
                            " from a running daemon"
                        )
                self.credited += 1
                self.acked.append(ticket)
                self.waiting = None
                extra = self.scanner.feedback.count(GOOD) - self.credited
                assert extra == 0, f"{self.name}: {extra} good_read too many after {ticket}"
                # The arrival pace of people at a gate: the workload, not a wait for a condition.
                dead.wait(self.rng.uniform(0, 0.01))
        except BaseException as exc:
            errors.append(exc)


def set_mode(meetch: SimulatedMeetch, mode: str, rng: random.Random) -> None:
    """Put the simulated Meetch in this cycle's state."""
    meetch.latency_s = 0.0
    if mode in ("offline", "comes_back"):
        meetch.go_offline()
        return
    meetch.go_online()
    if mode == "slow":
        meetch.latency_s = rng.uniform(0.02, 0.3)
    elif mode == "faults":
        if rng.random() < 0.5:
            meetch.fail_next(rng.randint(1, 8), rng.choice([500, 503]))
        else:
            meetch.html_502(rng.randint(1, 8))


def test_kill_9_at_random_moments_loses_no_acknowledged_scan(
    config_writer: ConfigWriter,
    meetch: SimulatedMeetch,
    scanner_factory: Callable[[str], VirtualScanner],
    start_agent: Callable[..., AgentProcess],
    figures: Record,
) -> None:
    """Every good_read scan survives repeated kill -9 and reaches Meetch once, by one scan id."""
    rng = random.Random(SEED)
    north, south = scanner_factory("north"), scanner_factory("south")
    config = config_writer.write(
        meetch={"retry_initial_s": 0.05, "retry_max_s": 0.3},
        scanners=[
            {"name": "north-1", "port": str(north.link), "terminator": "\r", "good_read": "\u0006"},
            {
                "name": "south-1",
                "port": str(south.link),
                "terminator": "\r\n",
                "good_read": "\u0006",
            },
        ],
    )
    db = queue_db(config_writer)
    names = {"north-1", "south-1"}
    lanes = [
        Lane("north-1", "N", b"\r", north, random.Random(rng.random())),
        Lane("south-1", "S", b"\r\n", south, random.Random(rng.random())),
    ]

    def start_ready() -> AgentProcess:
        since = time.time()
        agent = start_agent(config)
        wait_until(lambda: agent.proc.poll() is None and scanners_open(db, names, since), 20)
        for lane in lanes:
            lane.settle()
        return agent

    kills = 0
    damaged: list[str] = []
    for _ in range(KILLS):
        mode = rng.choice(MODES)
        set_mode(meetch, mode, rng)
        if rng.random() < STARTUP_KILL_CHANCE:
            agent = start_agent(config)
            time.sleep(rng.uniform(0.0, 0.5))  # the kill point: the fault being injected
            agent.kill()
        else:
            agent = start_ready()
            dead = threading.Event()
            errors: list[BaseException] = []
            threads = [
                threading.Thread(target=lane.stream, args=(other, dead, errors))
                for lane, other in ((lanes[0], lanes[1]), (lanes[1], lanes[0]))
            ]
            for t in threads:
                t.start()
            try:
                time.sleep(rng.uniform(0.0, 0.4))  # the kill point: the fault being injected
                if mode == "comes_back":
                    meetch.go_online()
                time.sleep(rng.uniform(0.0, 0.4))
                agent.kill()
            finally:
                dead.set()
                for t in threads:
                    t.join(ACK_TIMEOUT_S + 5)
            if errors:
                raise errors[0]
        kills += 1
        if db.exists() and (verdict := integrity(db)) != "ok":
            damaged.append(f"after kill {kills}: {verdict}")

    meetch.latency_s = 0.0
    meetch.go_online()
    agent = start_ready()
    try:
        wait_until(lambda: pending(db) == 0, 60, 0.1)
        left = 0
    except AssertionError:
        left = pending(db)
    log_tail = agent.output()[-3000:]
    stopped = agent.stop()
    for lane in lanes:
        lane.settle()
    if (verdict := integrity(db)) != "ok":
        damaged.append(f"at the end: {verdict}")

    acked = [t for lane in lanes for t in lane.acked]
    typed = {t for lane in lanes for t in lane.typed}
    flagged = meetch.flagged
    lost = [t for t in acked if t not in flagged]
    doubled = sorted(t for t in typed if len(meetch.scan_ids_for(t)) > 1)
    figures("kills_survived", kills - len(damaged))
    figures("acknowledged_scans", len(acked))
    figures("acked_scans_lost", len(lost))
    figures("tickets_under_two_scan_ids", len(doubled))

    assert not damaged, damaged
    assert not lost, f"{len(lost)} acknowledged scans never reached Meetch: {lost[:10]}"
    assert not doubled, f"tickets notified under two scan ids: {doubled[:10]}"
    assert left == 0, f"{left} notifications still pending after 60 s online; log:\n{log_tail}"
    assert stopped == 0
    committed = dict(query(db, "SELECT ticket, scan_id FROM notifications"))
    assert set(acked) <= committed.keys()
    assert all(flagged[t] == committed[t] for t in set(acked)), "Meetch holds another scan id"
    states = dict(query(db, "SELECT state, COUNT(*) FROM notifications GROUP BY state"))
    assert set(states) == {"delivered"}, states
    assert len(acked) > KILLS, "too few scans acknowledged for the kills to mean anything"
