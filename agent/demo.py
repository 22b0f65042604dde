"""``meetch-gate demo``: a simulated night at the gates, on this machine only.

A simulated Meetch on 127.0.0.1 and two virtual serial scanners on pseudo-terminals; the
real daemon reads them. Tickets flow with duplicates, garbage frames, uninsured and
refunded tickets; Meetch goes away for a while and comes back; the backlog drains.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from agent import logs
from agent.config import load_config
from agent.daemon import Daemon
from agent.store import Store
from hardware_mocks.meetch_sim import SimulatedMeetch
from hardware_mocks.virtual_scanner import VirtualScanner

DEMO_KEY = "demo-key-not-secret"
GOOD, BAD = b"\x07", b"\x15"  # what the virtual scanners get back: beep / buzz

CONFIG = """\
[agent]
device_id = "demo-box"
state_dir = "{state}"
dedupe_window_s = 2.0
metrics_listen = ""

[meetch]
base_url = "{base_url}"
api_key_file = "{state}/api-key"
timeout_s = 2.0
max_in_flight = 8
cancellations_poll_s = 2
retry_initial_s = 0.2
retry_max_s = 1.5

[[scanners]]
name = "north-1"
port = "{north}"
terminator = "\\r"
good_read = "\\u0007"
bad_read = "\\u0015"

[[scanners]]
name = "south-1"
port = "{south}"
terminator = "\\r\\n"
good_read = "\\u0007"
bad_read = "\\u0015"
"""


@dataclass
class Tally:
    """What the demo did and saw."""

    typed: int = 0
    valid_tickets: set[str] = field(default_factory=set)
    uninsured: set[str] = field(default_factory=set)
    duplicates: int = 0
    garbage: int = 0
    largest_backlog: int = 0
    recovered_at: float | None = None
    drained_after_s: float | None = None


def run_demo(duration: float, out: TextIO | None = None) -> int:
    """Run the simulated night; returns 0 when every insured ticket reached Meetch once."""
    console = Console(file=out, highlight=False)
    with tempfile.TemporaryDirectory(prefix="meetch-gate-demo-") as tmp:
        root = Path(tmp)
        with (
            SimulatedMeetch(api_keys=[DEMO_KEY]) as meetch,
            VirtualScanner(root / "by-id" / "usb-Demo_Scanner_North-if00") as north,
            VirtualScanner(root / "by-id" / "usb-Demo_Scanner_South-if00") as south,
        ):
            state = root / "state"
            state.mkdir(mode=0o700)
            (state / "api-key").write_text(DEMO_KEY + "\n")
            (root / "agent.toml").write_text(
                CONFIG.format(
                    state=state, base_url=meetch.base_url, north=north.link, south=south.link
                )
            )
            config = load_config(root / "agent.toml")
            log_path = root / "agent.log"
            with log_path.open("w") as log_file:
                logs.configure(json=True, stream=log_file)
                daemon = Daemon(config, env={}, install_signals=False)
                thread = threading.Thread(target=daemon.run, name="demo-daemon", daemon=True)
                console.print(
                    f"[bold]meetch-gate demo[/bold]: simulated Meetch at {meetch.base_url}, "
                    f"scanners at {north.link.name} and {south.link.name}, {duration:.0f} s"
                )
                thread.start()
                try:
                    tally = _night(console, daemon, meetch, (north, south), duration)
                finally:
                    daemon.stop()
                    thread.join(15)
            return _summary(console, config.db_path, meetch, tally)


def _night(
    console: Console,
    daemon: Daemon,
    meetch: SimulatedMeetch,
    pair: tuple[VirtualScanner, VirtualScanner],
    duration: float,
) -> Tally:
    north, south = pair
    rng = random.Random(2026)
    tally = Tally()
    start = time.monotonic()
    if not _wait(lambda: _connected(daemon) == 2, 10):
        raise RuntimeError("the virtual scanners did not connect within 10 s")
    meetch.add_refund("DEMO-REFUNDED-1")
    outage = (0.2 * duration, 0.45 * duration)
    scanning_ends = 0.7 * duration
    scanners = [(north, b"\r", None), (south, b"\r\n", "]C0")]
    serial_no = 0
    phase = "online"

    def row() -> Table:
        store = daemon.store
        assert store is not None
        q = store.queue_counts()
        tally.largest_backlog = max(tally.largest_backlog, q["pending"])
        table = Table(box=None)
        for col in (
            "time",
            "Meetch",
            "agent API state",
            "scans typed",
            "pending",
            "delivered",
            "unknown",
        ):
            table.add_column(col, justify="right")
        sender = daemon.sender
        table.add_row(
            f"{time.monotonic() - start:5.1f} s",
            phase,
            sender.api_state if sender else "-",
            str(tally.typed),
            str(q["pending"]),
            str(q["delivered"]),
            str(q["unknown"]),
        )
        return table

    with Live(row(), console=console, refresh_per_second=4, transient=False) as live:
        while True:
            t = time.monotonic() - start
            if phase == "online" and t >= outage[0]:
                phase = "DOWN"
                meetch.go_offline()
                console.print(f"[red]{t:5.1f} s  Meetch goes down (uplink lost)[/red]")
            elif phase == "DOWN" and t >= outage[1]:
                phase = "back"
                meetch.go_online()
                tally.recovered_at = time.monotonic()
                console.print(f"[green]{t:5.1f} s  Meetch is back[/green]")
            if t < scanning_ends:
                serial_no += 1
                _scan_one(rng, tally, meetch, scanners, serial_no)
            pending = daemon.store.queue_counts()["pending"] if daemon.store else 1
            if tally.recovered_at and pending == 0 and tally.drained_after_s is None:
                tally.drained_after_s = time.monotonic() - tally.recovered_at
            live.update(row())
            for scanner, _, _ in scanners:
                scanner.read_feedback(0)
            if t >= scanning_ends and (pending == 0 or t >= duration):
                break
            time.sleep(0.15)
    console.print()
    return tally


def _scan_one(
    rng: random.Random,
    tally: Tally,
    meetch: SimulatedMeetch,
    scanners: list[tuple[VirtualScanner, bytes, str | None]],
    serial_no: int,
) -> None:
    scanner, terminator, aim = scanners[serial_no % 2]
    roll = rng.random()
    if roll < 0.08:
        scanner.noise(rng.randint(3, 20), rng, terminator=terminator)
        tally.garbage += 1
    elif roll < 0.16 and tally.valid_tickets:
        ticket = sorted(tally.valid_tickets)[-1]
        scanner.type(ticket, terminator=terminator, aim=aim)  # a held ticket read twice
        tally.duplicates += 1
    else:
        ticket = f"DEMO-{serial_no:06d}"
        if serial_no % 11 == 0:
            ticket = "DEMO-REFUNDED-1"
        elif serial_no % 7 == 0:
            meetch.unknown_tickets.add(ticket)
            tally.uninsured.add(ticket)
        chunk = 3 if serial_no % 5 == 0 else None  # some frames arrive in pieces
        scanner.type(ticket, terminator=terminator, aim=aim, chunk=chunk)
        tally.valid_tickets.add(ticket)
    tally.typed += 1


def _summary(console: Console, db_path: Path, meetch: SimulatedMeetch, tally: Tally) -> int:
    store = Store(db_path, device_id="demo-box")  # reopened: the daemon closed its own
    try:
        queue, scans = store.queue_counts(), store.scan_counts()
    finally:
        store.close()
    insured = tally.valid_tickets - tally.uninsured
    missing = sorted(insured - set(meetch.flagged))
    doubled = sorted(t for t in tally.valid_tickets if len(meetch.scan_ids_for(t)) > 1)
    drained = (
        f"{tally.drained_after_s:.1f} s" if tally.drained_after_s is not None else "not drained"
    )
    table = Table(title="Summary", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in (
        ("frames typed at the scanners", tally.typed),
        ("valid scans recorded", scans["valid"] + scans["refunded"]),
        ("distinct tickets", len(tally.valid_tickets)),
        ("delivered to Meetch", queue["delivered"]),
        ("unknown to Meetch (uninsured, normal)", queue["unknown"]),
        ("refunded tickets scanned (bad_read)", scans["refunded"]),
        ("duplicates (inside the dedupe window)", scans["duplicate"]),
        ("invalid frames (garbage, never sent)", scans["invalid"]),
        ("still pending", queue["pending"]),
        ("largest backlog during the outage", tally.largest_backlog),
        ("time to drain after Meetch came back", drained),
    ):
        table.add_row(key, str(value))
    console.print(table)
    if missing or doubled or queue["pending"]:
        console.print(
            f"[red]PROBLEM[/red]: {queue['pending']} still pending; not delivered: "
            f"{missing[:10]}; under two scan ids: {doubled[:10]}"
        )
        return 1
    console.print(
        f"[green]OK[/green]: all {len(insured)} insured tickets reached Meetch, each under "
        "one scan id; nothing was lost through the outage."
    )
    return 0


def _connected(daemon: Daemon) -> int:
    store = daemon.store
    if store is None:
        return 0
    return sum(1 for s in store.scanner_states().values() if s["connected"])


def _wait(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return True
        time.sleep(0.05)
    return False
