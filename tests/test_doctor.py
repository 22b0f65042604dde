"""``meetch-gate doctor``: every check on real parts (loopback Meetch, SQLite files, ptys)."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from agent.config import Config
from agent.doctor import Check, checks_json, print_checks, run_checks
from agent.store import Store
from hardware_mocks.meetch_sim import SimulatedMeetch
from hardware_mocks.virtual_scanner import VirtualScanner
from tests.conftest import API_KEY, AgentProcess, ConfigWriter, cli, wait_until

NAMES = [
    "config",
    "api_key",
    "database",
    "queue_writes",
    "commit_latency",
    "disk_space",
    "api",
    "scanner north-1",
    "clock",
]
# The subprocess must not pick up a key or config from the developer's environment.
CLEAN_ENV = {"MEETCH_API_KEY": "", "CREDENTIALS_DIRECTORY": "", "MEETCH_GATE_CONFIG": ""}


def synced() -> bool:
    """A clock that the kernel reports synchronised."""
    return True


def by_name(checks: list[Check]) -> dict[str, Check]:
    """Checks keyed by name."""
    return {c.name: c for c in checks}


def ready_box(
    config_writer: ConfigWriter,
    scanner_factory: Callable[[str], VirtualScanner],
    *,
    with_database: bool = True,
) -> Config:
    """A config with the key file, a plugged pty scanner and (by default) a database."""
    scanner = scanner_factory("north-1")
    config = config_writer.load(scanners=[{"name": "north-1", "port": str(scanner.link)}])
    if with_database:
        Store(config.db_path, device_id="test-box").close()
    return config


def printed(checks: list[Check]) -> str:
    """What print_checks shows when piped."""
    out = io.StringIO()
    print_checks(checks, Console(file=out, width=80))
    return out.getvalue()


def test_ready_box_passes_every_check(
    config_writer: ConfigWriter, scanner_factory: Callable[[str], VirtualScanner]
) -> None:
    """Good config, key, database, Meetch, scanner and clock: every check passes, in order."""
    config = ready_box(config_writer, scanner_factory)
    checks = run_checks(config, env={}, clock_state=synced)
    assert [c.name for c in checks] == NAMES
    assert {c.name: c.status for c in checks} == dict.fromkeys(NAMES, "pass")
    assert all(c.hint == "" for c in checks)
    assert str(config.path) in checks[0].detail
    assert "1 scanner" in checks[0].detail
    assert checks_json(checks)["ok"] is True


def test_key_file_readable_by_others_fails_with_chmod_hint(
    config_writer: ConfigWriter, scanner_factory: Callable[[str], VirtualScanner]
) -> None:
    """A key file with mode 0644 fails api_key, and the hint is the chmod that fixes it."""
    config = ready_box(config_writer, scanner_factory)
    config.meetch.api_key_file.chmod(0o644)
    check = by_name(run_checks(config, env={}, clock_state=synced))["api_key"]
    assert check.status == "fail"
    assert "0644" in check.detail
    assert check.hint == f"chmod 600 {config.meetch.api_key_file}"


def test_key_from_environment_skips_the_file_mode_check(
    config_writer: ConfigWriter, scanner_factory: Callable[[str], VirtualScanner]
) -> None:
    """A key from MEETCH_API_KEY passes whatever the mode of an unused key file."""
    config = ready_box(config_writer, scanner_factory)
    config.meetch.api_key_file.chmod(0o644)
    checks = by_name(run_checks(config, env={"MEETCH_API_KEY": API_KEY}, clock_state=synced))
    assert checks["api_key"].status == "pass"
    assert "MEETCH_API_KEY" in checks["api_key"].detail
    assert checks["api"].status == "pass"


def test_missing_key_fails_and_skips_the_api_check(
    config_writer: ConfigWriter, scanner_factory: Callable[[str], VirtualScanner]
) -> None:
    """No key anywhere: api_key fails saying where it looked; api is skipped as a warning."""
    config = ready_box(config_writer, scanner_factory)
    config.meetch.api_key_file.unlink()
    checks = by_name(run_checks(config, env={}, clock_state=synced))
    assert checks["api_key"].status == "fail"
    assert str(config.meetch.api_key_file) in checks["api_key"].detail
    assert checks["api_key"].hint
    assert checks["api"].status == "warn"
    assert "skipped" in checks["api"].detail


def test_refused_key_fails_the_api_check(
    config_writer: ConfigWriter,
    scanner_factory: Callable[[str], VirtualScanner],
    meetch: SimulatedMeetch,
) -> None:
    """Meetch answering 401 fails api with 'key refused' and a hint about the key."""
    config = ready_box(config_writer, scanner_factory)
    meetch.set_api_keys(["other"])
    check = by_name(run_checks(config, env={}, clock_state=synced))["api"]
    assert check.status == "fail"
    assert "key refused" in check.detail
    assert "key" in check.hint


def test_meetch_offline_fails_the_api_check_as_unreachable(
    config_writer: ConfigWriter,
    scanner_factory: Callable[[str], VirtualScanner],
    meetch: SimulatedMeetch,
) -> None:
    """Nothing listening at base_url fails api as unreachable, with a network hint."""
    config = ready_box(config_writer, scanner_factory)
    meetch.go_offline()
    check = by_name(run_checks(config, env={}, clock_state=synced))["api"]
    assert check.status == "fail"
    assert "unreachable" in check.detail
    assert "base_url" in check.hint


def test_missing_scanner_port_fails(config_writer: ConfigWriter, tmp_path: Path) -> None:
    """A configured port that is not there fails its scanner check with a hint."""
    port = tmp_path / "by-id" / "usb-Nothing-if00"
    config = config_writer.load(scanners=[{"name": "north-1", "port": str(port)}])
    check = by_name(run_checks(config, env={}, clock_state=synced))["scanner north-1"]
    assert check.status == "fail"
    assert "not present" in check.detail
    assert "plug" in check.hint


def test_unplugged_usb_id_fails(config_writer: ConfigWriter) -> None:
    """A usb:VID:PID that matches no plugged device fails its scanner check."""
    config = config_writer.load(scanners=[{"name": "gate", "port": "usb:ffff:fffe"}])
    check = by_name(run_checks(config, env={}, clock_state=synced))["scanner gate"]
    assert check.status == "fail"
    assert "ffff:fffe" in check.detail
    assert check.hint


def test_wedge_scanner_warns_not_available(config_writer: ConfigWriter) -> None:
    """A keyboard-wedge scanner is a warning: not available yet, not a failure."""
    config = config_writer.load(
        scanners=[{"name": "kbd", "kind": "wedge", "port": "/dev/input/by-id/kbd"}]
    )
    check = by_name(run_checks(config, env={}, clock_state=synced))["scanner kbd"]
    assert check.status == "warn"
    assert "not available yet" in check.detail


def test_corrupt_database_fails_without_crashing(
    config_writer: ConfigWriter, scanner_factory: Callable[[str], VirtualScanner]
) -> None:
    """Garbage in queue.sqlite3 fails database with the move-aside hint; other checks run."""
    config = ready_box(config_writer, scanner_factory, with_database=False)
    config.db_path.parent.mkdir(mode=0o700)
    config.db_path.write_bytes(b"this is not a database, just garbage\x00\xff" * 200)
    checks = run_checks(config, env={}, clock_state=synced)
    assert [c.name for c in checks] == NAMES
    database = by_name(checks)["database"]
    assert database.status == "fail"
    assert "aside" in database.hint
    assert checks_json(checks)["ok"] is False


def test_damaged_page_fails_the_integrity_check(
    config_writer: ConfigWriter, scanner_factory: Callable[[str], VirtualScanner]
) -> None:
    """A database that opens but has a damaged page fails database, naming the check."""
    config = ready_box(config_writer, scanner_factory, with_database=False)
    store = Store(config.db_path, device_id="test-box")
    for i in range(2000):
        store.record_scan("north-1", f"T{i:08d}", "valid", "2026-02-20T19:42:07+01:00")
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    data = bytearray(config.db_path.read_bytes())
    page = 4096
    assert len(data) > 20 * page
    # Scribble over the middle of some pages, leaving page 1 (the schema) intact.
    for n in range(5, len(data) // page - 1, 3):
        data[n * page + 100 : n * page + 300] = b"\xa5" * 200
    config.db_path.write_bytes(bytes(data))
    check = by_name(run_checks(config, env={}, clock_state=synced))["database"]
    assert check.status == "fail"
    assert "integrity check failed" in check.detail
    assert "\n" not in check.detail
    assert "aside" in check.hint


def test_unsynchronised_clock_warns(
    config_writer: ConfigWriter, scanner_factory: Callable[[str], VirtualScanner]
) -> None:
    """An unsynchronised clock is a warning with the timedatectl hint, not a failure."""
    config = ready_box(config_writer, scanner_factory)
    checks = run_checks(config, env={}, clock_state=lambda: False)
    clock = by_name(checks)["clock"]
    assert clock.status == "warn"
    assert "timedatectl set-ntp true" in clock.hint
    assert checks_json(checks)["ok"] is True


def test_unknown_clock_state_warns(
    config_writer: ConfigWriter, scanner_factory: Callable[[str], VirtualScanner]
) -> None:
    """When the clock's state cannot be told, the clock check says so as a warning."""
    config = ready_box(config_writer, scanner_factory)
    clock = by_name(run_checks(config, env={}, clock_state=lambda: None))["clock"]
    assert clock.status == "warn"
    assert "could not tell" in clock.detail


def test_default_clock_check_gives_a_clock_line(
    config_writer: ConfigWriter, scanner_factory: Callable[[str], VirtualScanner]
) -> None:
    """Without an injected clock the kernel is asked; whatever it says, there is a line."""
    config = ready_box(config_writer, scanner_factory)
    clock = by_name(run_checks(config, env={}))["clock"]
    assert clock.status in ("pass", "warn")


def test_doctor_never_creates_the_state_dir(
    config_writer: ConfigWriter, scanner_factory: Callable[[str], VirtualScanner]
) -> None:
    """Before the daemon ever ran: database warns, latency is measured aside, nothing stays."""
    config = ready_box(config_writer, scanner_factory, with_database=False)
    before = sorted(p.name for p in config.agent.state_dir.parent.iterdir())
    checks = by_name(run_checks(config, env={}, clock_state=synced))
    assert not config.agent.state_dir.exists()
    assert sorted(p.name for p in config.agent.state_dir.parent.iterdir()) == before
    assert checks["database"].status == "warn"
    assert "has not run yet" in checks["database"].detail
    assert checks["commit_latency"].status == "pass"
    assert checks["disk_space"].status == "pass"


def test_latency_measurement_leaves_only_the_queue(
    config_writer: ConfigWriter, scanner_factory: Callable[[str], VirtualScanner]
) -> None:
    """The scratch database for commit latency is removed from the state dir afterwards."""
    config = ready_box(config_writer, scanner_factory)
    before = sorted(p.name for p in config.agent.state_dir.iterdir())
    check = by_name(run_checks(config, env={}, clock_state=synced))["commit_latency"]
    assert re.search(r"median \d+\.\d ms over 20 commits", check.detail)
    assert sorted(p.name for p in config.agent.state_dir.iterdir()) == before


def test_api_key_never_shown(
    config_writer: ConfigWriter,
    scanner_factory: Callable[[str], VirtualScanner],
    meetch: SimulatedMeetch,
) -> None:
    """The key appears in neither the printed lines nor the JSON, whether accepted or refused."""
    config = ready_box(config_writer, scanner_factory)
    for env in ({}, {"MEETCH_API_KEY": API_KEY}):
        accepted = run_checks(config, env=env, clock_state=synced)
        meetch.set_api_keys(["other"])
        refused = run_checks(config, env=env, clock_state=synced)
        meetch.set_api_keys([API_KEY])
        for checks in (accepted, refused):
            assert API_KEY not in printed(checks)
            assert API_KEY not in json.dumps(checks_json(checks))


def test_scanner_held_by_the_running_agent_passes(
    config_writer: ConfigWriter,
    scanner_factory: Callable[[str], VirtualScanner],
    start_agent: Callable[..., AgentProcess],
) -> None:
    """While the daemon has the scanner open, the scanner check passes saying so."""
    scanner = scanner_factory("north-1")
    path = config_writer.write(scanners=[{"name": "north-1", "port": str(scanner.link)}])
    agent = start_agent(path)

    def connected() -> bool:
        report = json.loads(cli("status", "--json", "--config", str(path)).stdout)
        return bool(report["scanners"][0]["connected"])

    wait_until(connected, 15)
    config = config_writer.load(scanners=[{"name": "north-1", "port": str(scanner.link)}])
    check = by_name(run_checks(config, env={}, clock_state=synced))["scanner north-1"]
    assert check == Check("scanner north-1", "pass", f"{scanner.link}: open by the running agent")
    assert agent.stop() == 0


def test_print_checks_one_line_per_check_with_hints_below() -> None:
    """print_checks: 'STATUS name: detail' per check, '  -> hint' under those with one."""
    checks = [
        Check("config", "pass", "/etc/x.toml: valid, 0 scanners"),
        Check("clock", "warn", "not synchronised [ntp]", "timedatectl set-ntp true"),
        Check("api", "fail", "x" * 200, "check the network"),
    ]
    assert printed(checks).splitlines() == [
        "PASS config: /etc/x.toml: valid, 0 scanners",
        "WARN clock: not synchronised [ntp]",
        "  -> timedatectl set-ntp true",
        "FAIL api: " + "x" * 200,
        "  -> check the network",
    ]


def test_cli_doctor_json_exit_0_when_nothing_fails(
    config_writer: ConfigWriter, scanner_factory: Callable[[str], VirtualScanner]
) -> None:
    """`doctor --json` exits 0 on a ready box; every check has name, status, detail, hint."""
    config = ready_box(config_writer, scanner_factory)
    result = cli("doctor", "--json", "--config", str(config.path), env=CLEAN_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["ok"] is True
    assert [c["name"] for c in report["checks"]] == NAMES
    for check in report["checks"]:
        assert set(check) == {"name", "status", "detail", "hint"}
        # The clock is the real kernel's here: synchronised or not, only a warning.
        expected = ("pass", "warn") if check["name"] == "clock" else ("pass",)
        assert check["status"] in expected, check


def test_cli_doctor_exit_1_when_a_check_fails(
    config_writer: ConfigWriter,
    scanner_factory: Callable[[str], VirtualScanner],
    meetch: SimulatedMeetch,
) -> None:
    """`doctor --json` exits 1 with ok false when Meetch cannot be reached."""
    config = ready_box(config_writer, scanner_factory)
    meetch.go_offline()
    result = cli("doctor", "--json", "--config", str(config.path), env=CLEAN_ENV)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert by_name([Check(**c) for c in report["checks"]])["api"].status == "fail"


def test_cli_doctor_human_output_one_line_per_check(
    config_writer: ConfigWriter, scanner_factory: Callable[[str], VirtualScanner]
) -> None:
    """Piped `doctor` prints plain text: one status line per check, hints indented below."""
    config = ready_box(config_writer, scanner_factory)
    result = cli("doctor", "--config", str(config.path), env=CLEAN_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    status_lines = [line for line in lines if re.match(r"(PASS|WARN|FAIL) ", line)]
    assert [line.split(":")[0].split(" ", 1)[1] for line in status_lines] == NAMES
    assert all(line in status_lines or line.startswith("  -> ") for line in lines)
    assert "\x1b" not in result.stdout
