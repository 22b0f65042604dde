"""``meetch-gate doctor``: is this box ready for the gates tonight? (CONTRACT §5).

Each check gives one line, ``pass``, ``warn`` or ``fail``, and a hint saying what to do
about anything that is not a pass. A technician runs it before doors open, with or
without the daemon running, so every check is read-only towards the agent's state: it
never creates the state directory or the queue database, and it opens a scanner only
when the daemon does not already hold it.

``fail`` means the box will lose or withhold evidence (no key, a corrupt queue, Meetch
unreachable, a scanner missing); ``warn`` means it works but something deserves a look
(a slow SD card, little disk left, an unsynchronised clock).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import ssl
import stat
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import serial
from rich.console import Console
from rich.text import Text

from agent.clock import system_clock_synchronised
from agent.config import API_KEY_ENV, ApiKey, Config, ScannerSettings, load_api_key
from agent.errors import ConfigError, ScannerError, StoreError
from agent.meetch import MeetchClient, Outcome
from agent.scanners.serial_port import describe_port_error, resolve_port
from agent.status import daemon_lock_held, recent_alarms, store_health
from agent.store import Store

PASS, WARN, FAIL = "pass", "warn", "fail"

LATENCY_COMMITS = 20
"""Single-row commits timed for ``commit_latency``: enough for a stable median, under a
second even on a poor SD card."""
SLOW_COMMIT_MS = 50.0
"""Above this median, every scan waits noticeably for its fsync: a worn or cheap SD card."""
DISK_FAIL_BYTES = 20 * 1024 * 1024
DISK_WARN_BYTES = 200 * 1024 * 1024

_STYLES = {PASS: "green", WARN: "yellow", FAIL: "bold red"}


@dataclass(frozen=True)
class Check:
    """The result of one check: a ``name``, ``pass``/``warn``/``fail``, and what to do."""

    name: str
    status: str
    detail: str
    hint: str = ""


def run_checks(
    config: Config,
    env: Mapping[str, str] = os.environ,
    *,
    clock_state: Callable[[], bool | None] | None = None,
) -> list[Check]:
    """Run every check against an already-loaded ``config``, in the order printed.

    ``clock_state`` says whether the system clock is synchronised (None: cannot tell);
    it defaults to asking the kernel through adjtimex(2).
    """
    checks = [
        Check(
            "config",
            PASS,
            f"{config.path}: valid, {_plural(len(config.scanners), 'scanner')}",
        )
    ]
    key: ApiKey | None = None
    with _guard(checks, "api_key"):
        key, check = _check_api_key(config, env)
        checks.append(check)
    store: Store | None = None
    try:
        with _guard(checks, "database"):
            store, check = _check_database(config)
            checks.append(check)
        running = daemon_lock_held(config.agent.state_dir) is True
        with _guard(checks, "queue_writes"):
            checks.append(_check_queue_writes(config, store, running=running))
        with _guard(checks, "commit_latency"):
            checks.append(_check_commit_latency(config.agent.state_dir))
        with _guard(checks, "disk_space"):
            checks.append(_check_disk_space(config.agent.state_dir))
        with _guard(checks, "api"):
            checks.append(_check_api(config, key))
        for scanner in config.scanners:
            with _guard(checks, f"scanner {scanner.name}"):
                checks.append(_check_scanner(scanner, store if running else None))
        with _guard(checks, "clock"):
            checks.append(_check_clock(clock_state or system_clock_synchronised))
    finally:
        if store is not None:
            store.close()
    # Defence in depth: an error text (a proxy echoing headers, say) must not carry the
    # key to a terminal, a ticket or a pasted log.
    return [_tidy(c, key.value if key is not None else "") for c in checks]


def _check_queue_writes(config: Config, store: Store | None, *, running: bool) -> Check:
    """Is the running daemon committing scans, and was a damaged database salvaged lately?"""
    health = store_health(config, running=running)
    if health.get("state", "ok") != "ok":
        return Check(
            "queue_writes",
            FAIL,
            f"the agent cannot commit scans since {health.get('since')}: "
            f"{health.get('held', 0)} held in memory, {health.get('dropped', 0)} dropped",
            "free space in the state directory (df -h); held scans are written within a second",
        )
    alarms = recent_alarms(store, time.time()) if store is not None else []
    if alarms:
        return Check(
            "queue_writes",
            WARN,
            f"last alarm {alarms[-1].get('at')}: {alarms[-1].get('detail')}",
            "keep the .corrupt- file for analysis and plan to replace the SD card",
        )
    dropped = health.get("dropped", 0)
    if dropped:
        return Check(
            "queue_writes",
            WARN,
            f"{dropped} scans were dropped while the disk was full",
            "keep free space in the state directory",
        )
    return Check(
        "queue_writes", PASS, "scans are being committed" if running else "agent not running"
    )


def print_checks(checks: list[Check], console: Console | None = None) -> None:
    """One line per check (``PASS name: detail``), and ``  -> hint`` under any that has one.

    Colored on a terminal; plain text when piped, never wrapped, so it greps well.
    """
    console = console or Console(highlight=False)
    for check in checks:
        line = Text()
        line.append(check.status.upper(), style=_STYLES.get(check.status, ""))
        line.append(f" {check.name}: {check.detail}")
        # soft_wrap: a piped console is 80 columns, and a wrapped line is two lines to grep.
        console.print(line, soft_wrap=True)
        if check.hint:
            console.print(Text(f"  -> {check.hint}", style="dim"), soft_wrap=True)


def checks_json(checks: list[Check]) -> dict[str, Any]:
    """The ``doctor --json`` document: ``ok`` is False when any check failed."""
    return {
        "ok": all(c.status != FAIL for c in checks),
        "checks": [asdict(c) for c in checks],
    }


# -- the checks ---------------------------------------------------------------------------


def _check_api_key(config: Config, env: Mapping[str, str]) -> tuple[ApiKey | None, Check]:
    try:
        key = load_api_key(config.meetch, env)
    except ConfigError as exc:
        # The message says where it looked (or which file it could not read), never a key.
        return None, Check(
            "api_key",
            FAIL,
            str(exc),
            f"write the key to {config.meetch.api_key_file} (chmod 600, owned by the agent's "
            f"user), or set {API_KEY_ENV}; if it exists, run doctor as root or the agent's user",
        )
    if key.source != str(config.meetch.api_key_file):
        # The environment or a systemd credential: systemd guards the credential's mode.
        return key, Check("api_key", PASS, f"present ({key.source})")
    mode = stat.S_IMODE(os.stat(config.meetch.api_key_file).st_mode)
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        return key, Check(
            "api_key",
            FAIL,
            f"{key.source} is readable by other users (mode {mode:04o})",
            f"chmod 600 {key.source}",
        )
    return key, Check("api_key", PASS, f"present ({key.source}, mode {mode:04o})")


def _check_database(config: Config) -> tuple[Store | None, Check]:
    path = config.db_path
    if not path.exists():
        return None, Check(
            "database",
            WARN,
            f"no database at {path}: the daemon has not run yet",
            "start the agent (systemctl start meetch-gate); it creates the database",
        )
    aside = (
        f"stop the agent (systemctl stop meetch-gate), move {path} aside (keep it: it may "
        "hold scans not yet delivered), then start the agent to create a fresh one"
    )
    if not os.access(path, os.R_OK | os.W_OK):
        return None, Check(
            "database",
            FAIL,
            f"{path}: permission denied",
            "run doctor as root or as the agent's user (sudo -u meetch-gate meetch-gate doctor)",
        )
    try:
        store = Store.open_existing(path, device_id=config.agent.device_id)
    except StoreError as exc:
        return None, Check("database", FAIL, f"cannot open: {exc}", aside)
    if store is None:  # removed between the exists() above and the open
        return None, Check("database", WARN, f"no database at {path}", "start the agent")
    try:
        verdict = store.integrity_check()
    except sqlite3.DatabaseError as exc:
        verdict = str(exc)
    if verdict != "ok":
        return store, Check(
            "database", FAIL, f"{path}: integrity check failed: {verdict[:300]}", aside
        )
    return store, Check("database", PASS, f"{path}: integrity ok")


def _check_commit_latency(state_dir: Path) -> Check:
    try:
        with _scratch_dir(state_dir) as where:
            samples = _time_commits(where / f".doctor-commit-{os.getpid()}.sqlite3")
    except (OSError, sqlite3.Error) as exc:
        return Check(
            "commit_latency",
            WARN,
            f"could not measure near {state_dir}: {exc}",
            "run doctor as root or as the agent's user",
        )
    median = statistics.median(samples)
    where_note = "" if state_dir.is_dir() else f" (beside {state_dir}, not created yet)"
    detail = f"median {median:.1f} ms over {len(samples)} commits{where_note}"
    if median > SLOW_COMMIT_MS:
        return Check(
            "commit_latency",
            WARN,
            f"{detail}: slow storage, every scan waits for this",
            "the SD card is slow or worn: use an industrial-grade SD card or a USB SSD "
            "for the state directory",
        )
    return Check("commit_latency", PASS, detail)


def _check_disk_space(state_dir: Path) -> Check:
    where = _nearest_existing(state_dir)
    free = shutil.disk_usage(where).free
    detail = f"{_size(free)} free on {where}"
    hint = (
        f"free space on {where}: purge old deliveries "
        "(meetch-gate queue purge --delivered-before 30d), logs (journalctl --vacuum-size)"
    )
    if free < DISK_FAIL_BYTES:
        return Check("disk_space", FAIL, detail, hint)
    if free < DISK_WARN_BYTES:
        return Check("disk_space", WARN, detail, hint)
    return Check("disk_space", PASS, detail)


def _check_api(config: Config, key: ApiKey | None) -> Check:
    base = config.meetch.base_url
    if key is None:
        return Check("api", WARN, f"skipped: no API key to try {base}", "fix api_key first")
    try:
        client = MeetchClient(config.meetch, key.value)
    except (OSError, ssl.SSLError) as exc:
        return Check(
            "api",
            FAIL,
            f"cannot set up TLS: {exc}",
            f"check meetch.ca_file ({config.meetch.ca_file}) is a PEM CA bundle",
        )
    try:
        answer = client.check_auth()
    finally:
        client.close()
    if answer.outcome is Outcome.DELIVERED:
        return Check("api", PASS, f"{base} reachable, key accepted")
    if answer.outcome is Outcome.AUTH_FAILED:
        return Check(
            "api",
            FAIL,
            f"{base}: key refused ({answer.detail})",
            f"check the key with Meetch and replace it in {key.source}; "
            "a running agent picks up a new key file within seconds",
        )
    if answer.outcome is Outcome.RETRY:
        return Check(
            "api",
            FAIL,
            f"{base} unreachable: {answer.detail}",
            "check the network and DNS, meetch.base_url, any proxy or captive portal on "
            "the venue network, and meetch.ca_file if TLS is intercepted; scans queue "
            "meanwhile",
        )
    # 404 or another 4xx to an authenticated GET: the URL is not Meetch's API.
    return Check(
        "api",
        FAIL,
        f"{base}: unexpected answer ({answer.detail})",
        "check meetch.base_url and meetch.cancellations_path",
    )


def _check_scanner(scanner: ScannerSettings, running_store: Store | None) -> Check:
    """Open and close the port at once; ``running_store`` is given when the daemon runs."""
    name = f"scanner {scanner.name}"
    if scanner.kind == "wedge":
        return Check(
            name,
            WARN,
            f"{scanner.port}: keyboard-wedge scanners are not available yet",
            'switch the scanner to USB serial (CDC-ACM) mode and set kind = "serial"',
        )
    try:
        device = resolve_port(scanner.port)
        port = serial.serial_for_url(device, baudrate=scanner.baudrate, timeout=0, exclusive=True)
        port.close()
    except (serial.SerialException, OSError, ValueError, ScannerError) as exc:
        if running_store is not None:
            row = running_store.scanner_states().get(scanner.name, {})
            if row.get("connected"):
                # The daemon's exclusive lock is why our open failed: that is the good case.
                return Check(name, PASS, f"{scanner.port}: open by the running agent")
        reason = describe_port_error(scanner.port, exc)
        return Check(name, FAIL, reason, _scanner_hint(scanner.port, reason))
    shown = scanner.port if device == scanner.port else f"{scanner.port} -> {device}"
    return Check(name, PASS, f"{shown}: present and openable")


def _check_clock(clock_state: Callable[[], bool | None]) -> Check:
    state = clock_state()
    if state is True:
        return Check("clock", PASS, "system clock synchronised")
    if state is False:
        return Check(
            "clock",
            WARN,
            "system clock NOT synchronised: scan times are evidence and may be wrong",
            "timedatectl set-ntp true (with chrony or systemd-timesyncd installed), "
            "and let the box reach an NTP server",
        )
    return Check(
        "clock",
        WARN,
        "could not tell whether the system clock is synchronised",
        "check with timedatectl status (System clock synchronized: yes)",
    )


# -- helpers ------------------------------------------------------------------------------


@contextlib.contextmanager
def _guard(checks: list[Check], name: str) -> Iterator[None]:
    """Turn a check's unexpected exception into a failing line: doctor must finish."""
    try:
        yield
    except Exception as exc:  # a diagnostic tool reports every other check regardless
        checks.append(
            Check(
                name,
                FAIL,
                f"check could not run: {exc.__class__.__name__}: {exc}",
                "report this with the output of meetch-gate doctor",
            )
        )


@contextlib.contextmanager
def _scratch_dir(state_dir: Path) -> Iterator[Path]:
    """The state directory, or a temporary one beside it when it does not exist yet.

    Latency depends on the file system, so the scratch file goes where the queue lives
    (or will), yet doctor must not create the state directory: that is the daemon's.
    """
    if state_dir.is_dir():
        yield state_dir
        return
    with tempfile.TemporaryDirectory(
        prefix=".meetch-gate-doctor-", dir=_nearest_existing(state_dir)
    ) as tmp:
        yield Path(tmp)


def _time_commits(path: Path) -> list[float]:
    """Milliseconds for each of LATENCY_COMMITS single-row commits, as the queue commits."""
    samples: list[float] = []
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        # The same durability settings as the queue, so the fsyncs are the real ones.
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT)")
        for i in range(LATENCY_COMMITS):
            start = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (v) VALUES (?)", (f"scan {i}",))
            conn.execute("COMMIT")
            samples.append((time.perf_counter() - start) * 1000)
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm", "-journal"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
    return samples


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest existing ancestor."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _scanner_hint(port: str, reason: str) -> str:
    if "held by another process" in reason:
        return (
            f"see who holds it (fuser -v {port}); stop ModemManager, brltty or the "
            "terminal program, or a second agent"
        )
    if "permission denied" in reason:
        return "add the agent's user to the dialout group and install the udev rules"
    if "not present" in reason or "is plugged in" in reason:
        return (
            "plug the scanner in, or fix its port in the config "
            "(meetch-gate scanners lists what is connected)"
        )
    return "check the cable and the port in the config (meetch-gate scanners lists ports)"


def _tidy(check: Check, key: str) -> Check:
    """``check`` on one line (SQLite and httpx messages hold newlines) and without the key."""

    def clean(text: str) -> str:
        if key:
            text = text.replace(key, "[api key]")
        return " ".join(text.split())

    return Check(check.name, check.status, clean(check.detail), clean(check.hint))


def _size(n_bytes: int) -> str:
    mib = n_bytes / 1024 / 1024
    return f"{mib:.0f} MB" if mib < 1024 else f"{mib / 1024:.1f} GB"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
