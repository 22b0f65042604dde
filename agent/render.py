"""Human output for technicians: rich tables on a terminal, plain text when piped."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

if TYPE_CHECKING:
    from agent.flush import FlushResult
    from agent.store import Notification


def _table(console: Console, *columns: str) -> Table:
    """A boxed table on a terminal; plain aligned columns when piped (grep-friendly)."""
    if console.is_terminal:
        return Table(*columns)
    return Table(*columns, box=None, pad_edge=False, header_style="")


def human_age(seconds: float | None) -> str:
    """``42 s``, ``7 min``, ``3 h 05 min``, ``2 d 4 h``; ``-`` for None."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def print_status(report: dict[str, Any], console: Console | None = None) -> None:
    """Print ``status`` for a person."""
    console = console or Console()
    daemon = report["daemon"]
    if daemon["running"]:
        running = f"running (pid {daemon['pid']}, since {daemon.get('started_at') or '?'})"
    else:
        running = "NOT running"
        if daemon.get("heartbeat_at"):
            running += f" (last heartbeat {daemon['heartbeat_at']})"
    queue = report["queue"]
    scans = report["scans"]
    lines = [
        ("device", report["device_id"]),
        ("daemon", running),
        ("API", report["api_state"]),
        (
            "queue",
            f"{queue['pending']} pending, {queue['delivered']} delivered, "
            f"{queue['unknown']} unknown, {queue['rejected']} rejected",
        ),
        ("oldest pending", human_age(queue["oldest_pending_age_s"])),
        ("last delivery", report["last_delivery_at"] or "-"),
        (
            "scans",
            f"{scans['valid']} valid, {scans['duplicate']} duplicate, "
            f"{scans['invalid']} invalid, {scans['refunded']} refunded",
        ),
        ("database", report.get("database", "-")),
    ]
    store = report.get("store") or {}
    if store.get("state", "ok") != "ok":
        console.print(
            f"[bold red]QUEUE DATABASE CANNOT COMMIT[/bold red] since {store.get('since')}: "
            f"{store.get('held', 0)} scans held in memory (not acknowledged), "
            f"{store.get('dropped', 0)} dropped. {store.get('error') or ''}\n"
            "Free space in the state directory: held scans are written as soon as it can."
        )
    elif store.get("dropped"):
        console.print(
            f"[bold red]{store['dropped']} scans were dropped[/bold red] while the disk was full"
        )
    for alarm in report.get("alarms") or []:
        console.print(f"[bold red]ALARM[/bold red] {alarm.get('at')}: {alarm.get('detail')}")
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in lines:
        table.add_row(key, str(value))
    console.print(table)
    if report["scanners"]:
        scanners = _table(console, "scanner", "connected", "last scan", "port / problem")
        for s in report["scanners"]:
            scanners.add_row(
                s["name"],
                "yes" if s["connected"] else "NO",
                s["last_scan_at"] or "-",
                s.get("last_error") or s.get("port", ""),
            )
        console.print(scanners)
    else:
        console.print("no scanners configured")


@contextmanager
def flush_progress(console: Console | None = None) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar (count, rate, ETA) on a terminal; nothing when piped."""
    console = console or Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    columns = (
        TextColumn("flushing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("flush", total=None, rate="")
        started = time.monotonic()

        def update(done: int, total: int) -> None:
            elapsed = max(time.monotonic() - started, 1e-6)
            bar.update(task, completed=done, total=total, rate=f"{done / elapsed:.1f}/s")

        yield update


def print_flush(result: FlushResult, console: Console | None = None) -> None:
    """The per-state summary at the end of a flush."""
    console = console or Console()
    gained = {s: result.after[s] - result.before[s] for s in ("delivered", "unknown", "rejected")}
    console.print(
        f"flushed in {result.elapsed_s:.1f} s: {gained['delivered']} delivered, "
        f"{gained['unknown']} unknown, {gained['rejected']} rejected; "
        f"{result.pending} still pending"
    )
    if result.reason:
        console.print(f"not everything was sent: {result.reason}")


def print_notifications(items: list[Notification], console: Console | None = None) -> None:
    """``queue list`` for a person."""
    console = console or Console()
    if not items:
        console.print("no notifications")
        return
    table = _table(console, "scanned at", "ticket", "state", "tries", "scanner", "last error")
    for n in items:
        table.add_row(
            n.scanned_at,
            n.ticket,
            n.state,
            str(n.attempts),
            n.scanner,
            (n.last_error or "")[:80],
        )
    console.print(table)
