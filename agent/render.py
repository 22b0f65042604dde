"""Human output for technicians: rich tables on a terminal, plain text when piped."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


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
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in lines:
        table.add_row(key, str(value))
    console.print(table)
    if report["scanners"]:
        scanners = Table("scanner", "connected", "last scan", "port / problem")
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
