"""The reliability report: runs the fault suite and prints the figures it proved.

    uv run python -m tests.reliability           # the CI-sized run
    uv run python -m tests.reliability --long    # hundreds of kills, tens of thousands of scans

Runs ``pytest -m fault tests/fault`` in a subprocess; each fault test adds its counts to a
figures file (``tests/fault/conftest.py``: ``figures``), printed here as a table whatever
names appear. Exits with pytest's code, so a failed promise fails the report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from tests.fault.conftest import FIGURES_ENV

REPO = Path(__file__).resolve().parents[1]
LONG_ENV = "MEETCH_RELIABILITY_LONG"

LABELS: dict[str, str] = {
    "kills_survived": "kills survived (kill -9)",
    "acknowledged_scans": "acknowledged scans (through the kills)",
    "acked_scans_lost": "acknowledged scans lost",
    "tickets_under_two_scan_ids": "tickets under two scan ids",
    "hostile_api_answers": "hostile API answers survived",
    "fuzz_cases": "fuzz cases",
    "disk_full_scans_held": "disk-full scans held",
    "disk_full_scans_recovered": "disk-full scans recovered",
    "corrupt_databases_salvaged": "corrupt databases salvaged",
    "corrupt_notifications_salvaged": "notifications salvaged from corrupt databases",
    "outage_scans": "scans through a long outage",
    "outage_rss_growth_kb": "daemon memory growth over the outage (KiB)",
    "drained_oldest_first": "backlog drained oldest first (1 = yes)",
    "outage_worst_order_inversion": "worst order inversion in the drain (scans)",
}
"""Friendly labels for the figures known so far; any other name is shown as it is."""


def label(name: str) -> str:
    """The table label of a figure."""
    return LABELS.get(name, name)


def table(figures: dict[str, int]) -> str:
    """The figures as a two-column text table: known ones in LABELS order, then the rest."""
    known = [n for n in LABELS if n in figures]
    rest = sorted(n for n in figures if n not in LABELS)
    rows = [(label(n), f"{figures[n]:,}") for n in known + rest]
    if not rows:
        return "no figures were recorded"
    left = max(len(r[0]) for r in rows)
    right = max(len(r[1]) for r in rows)
    lines = [f"{'figure':<{left}}  {'value':>{right}}", f"{'-' * left}  {'-' * right}"]
    lines += [f"{name:<{left}}  {value:>{right}}" for name, value in rows]
    return "\n".join(lines)


def markdown(figures: dict[str, int]) -> str:
    """The same table in Markdown, for the README."""
    known = [n for n in LABELS if n in figures]
    rest = sorted(n for n in figures if n not in LABELS)
    lines = ["| figure | value |", "| --- | ---: |"]
    lines += [f"| {label(n)} | {figures[n]:,} |" for n in known + rest]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the fault suite, print the figures table, return pytest's exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.reliability", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--long", action="store_true", help="the long run: hundreds of kills, 30,000+ scans"
    )
    parser.add_argument(
        "--markdown", action="store_true", help="also print the table in Markdown (README)"
    )
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="meetch-reliability-") as tmp:
        figures_file = Path(tmp) / "figures.json"
        env = {**os.environ, FIGURES_ENV: str(figures_file)}
        if args.long:
            env[LONG_ENV] = "1"
        else:
            env.pop(LONG_ENV, None)
        command = [sys.executable, "-m", "pytest", "-m", "fault", "tests/fault", "-q"]
        command += args.pytest_args
        started = time.monotonic()
        print("$ " + " ".join(["pytest", *command[3:]]), flush=True)
        code = subprocess.run(command, cwd=REPO, env=env, check=False).returncode
        elapsed = time.monotonic() - started
        text = figures_file.read_text() if figures_file.exists() else ""
        figures: dict[str, int] = json.loads(text) if text.strip() else {}

    run = "long" if args.long else "CI-sized"
    print()
    print(
        f"meetch-gate reliability, {run} run, {datetime.now().astimezone():%Y-%m-%d %H:%M %Z},"
        f" {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" {elapsed / 60:.1f} min, pytest exit {code}"
    )
    print(table(figures))
    if args.markdown:
        print()
        print(markdown(figures))
    return code


if __name__ == "__main__":
    sys.exit(main())
