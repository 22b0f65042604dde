"""``meetch-gate scanners``: serial ports and input devices, configured scanners, hints.

Real pseudo-terminals stand in for scanners; fake ``comports()`` answers, a fake
``/dev/input/by-id`` and a fake ``/proc`` tree built from symlinks in tmp_path stand in
for what only real hardware and other processes would give.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from agent.config import AgentSettings, Config, ScannerSettings
from agent.discovery import (
    HINT_BRLTTY,
    HINT_MODEMMANAGER,
    NOT_FOUND,
    discover,
    print_scanners,
    row_hints,
)
from agent.store import Store
from hardware_mocks.virtual_scanner import VirtualScanner
from tests.conftest import AgentProcess, ConfigWriter, cli, wait_until


@dataclass
class FakePort:
    """What pyserial's ``ListPortInfo`` gives for one port."""

    device: str
    vid: int | None = None
    pid: int | None = None
    serial_number: str | None = None
    description: str = "n/a"
    hwid: str = "n/a"
    name: str = ""


def ports(*items: FakePort) -> Callable[[], list[Any]]:
    """A ``comports`` replacement answering ``items``."""
    return lambda: list(items)


def no_ports() -> list[Any]:
    """A machine with no serial ports at all."""
    return []


def make_config(tmp_path: Path, *scanners: ScannerSettings) -> Config:
    """A config holding ``scanners``, its state directory in tmp_path."""
    return Config(
        tmp_path / "agent.toml", AgentSettings("test-box", tmp_path / "state"), scanners=scanners
    )


def run(
    tmp_path: Path,
    config: Config,
    *,
    comports: Callable[[], list[Any]] = no_ports,
    store: Store | None = None,
    daemon_running: bool = False,
) -> list[dict[str, Any]]:
    """discover() with empty fake input and /proc trees unless the test made its own."""
    for name in ("input", "proc"):
        (tmp_path / name).mkdir(exist_ok=True)
    return discover(
        config,
        store,
        daemon_running,
        comports=comports,
        input_dir=tmp_path / "input",
        proc_dir=tmp_path / "proc",
    )


def row_for(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The row configured as ``name``."""
    [row] = [r for r in rows if r["configured_as"] == name]
    return row


def fake_process(proc: Path, pid: int, comm: str, *targets: str) -> None:
    """A /proc/PID entry whose open files are ``targets``."""
    fd = proc / str(pid) / "fd"
    fd.mkdir(parents=True)
    (proc / str(pid) / "comm").write_text(comm + "\n")
    for i, target in enumerate(targets):
        (fd / str(i)).symlink_to(target)


def test_configured_pty_is_present_and_configured(
    tmp_path: Path, scanner_factory: Callable[[str], VirtualScanner]
) -> None:
    """A configured scanner behind a by-id-style link shows present, with link and device."""
    scanner = scanner_factory("north")
    config = make_config(tmp_path, ScannerSettings("north-1", str(scanner.link)))
    row = row_for(run(tmp_path, config), "north-1")
    assert row["kind"] == "serial"
    assert row["device"] == os.path.realpath(scanner.link)
    assert row["links"] == [str(scanner.link)]
    assert row["present"] is True
    assert row["readable"] is True
    assert row["open_by_daemon"] is False
    assert row["hints"] == []


def test_missing_port_says_plug_it_in(tmp_path: Path) -> None:
    """A configured path that does not exist is a row, not present, with a cable hint."""
    port = str(tmp_path / "by-id" / "usb-Gone-if00")
    row = row_for(run(tmp_path, make_config(tmp_path, ScannerSettings("gone", port))), "gone")
    assert row["device"] == port
    assert row["present"] is False
    assert row["hints"] == [
        "configured but not plugged in (check the cable; `ls -l /dev/serial/by-id`)"
    ]


def test_network_port_is_listed_unchecked(tmp_path: Path) -> None:
    """A socket:// scanner appears with present None and a network-port hint."""
    config = make_config(tmp_path, ScannerSettings("net", "socket://127.0.0.1:7000"))
    row = row_for(run(tmp_path, config), "net")
    assert row["device"] == "socket://127.0.0.1:7000"
    assert row["present"] is None
    assert "network port" in row["hints"][0]


def test_usb_id_matches_comport(
    tmp_path: Path, scanner_factory: Callable[[str], VirtualScanner]
) -> None:
    """usb:VID:PID:SERIAL marks the one port with that id and serial number."""
    one, two = scanner_factory("one"), scanner_factory("two")
    comports = ports(
        FakePort(str(one.device), 0x0C2E, 0x0B61, "AAA", "Honeywell 1900"),
        FakePort(str(two.device), 0x0C2E, 0x0B61, "BBB", "Honeywell 1900"),
    )
    config = make_config(tmp_path, ScannerSettings("north-1", "usb:0C2E:0B61:BBB"))
    rows = run(tmp_path, config, comports=comports)
    assert len(rows) == 2
    row = row_for(rows, "north-1")
    assert row["device"] == two.device
    assert row["vid_pid"] == "0c2e:0b61"
    assert row["serial_number"] == "BBB"
    assert row["description"] == "Honeywell 1900"
    assert row["present"] is True
    assert row["hints"] == []


def test_usb_id_ambiguous_or_absent(
    tmp_path: Path, scanner_factory: Callable[[str], VirtualScanner]
) -> None:
    """Without a serial number two twins both match (asking for it); no match is absent."""
    one, two = scanner_factory("one"), scanner_factory("two")
    comports = ports(
        FakePort(str(one.device), 0x0C2E, 0x0B61, "AAA"),
        FakePort(str(two.device), 0x0C2E, 0x0B61, "BBB"),
    )
    config = make_config(
        tmp_path,
        ScannerSettings("twins", "usb:0c2e:0b61"),
        ScannerSettings("zebra", "usb:05e0:1200"),
    )
    rows = run(tmp_path, config, comports=comports)
    twins = [r for r in rows if r["configured_as"] == "twins"]
    assert len(twins) == 2
    assert all("add the serial number" in r["hints"][0] for r in twins)
    zebra = row_for(rows, "zebra")
    assert (zebra["device"], zebra["vid_pid"], zebra["present"]) == (
        "usb:05e0:1200",
        "05e0:1200",
        False,
    )
    assert "not plugged in" in zebra["hints"][0]


def test_holders_give_modemmanager_and_brltty_hints(
    tmp_path: Path, scanner_factory: Callable[[str], VirtualScanner]
) -> None:
    """Processes with the device open are listed; known culprits get their own hint."""
    scanner = scanner_factory("north")
    device = os.path.realpath(scanner.link)
    proc = tmp_path / "proc"
    fake_process(proc, 812, "ModemManager", "/dev/null", device)
    fake_process(proc, 913, "brltty", device, "socket:[4242]")
    fake_process(proc, 1001, "minicom", device)
    fake_process(proc, 1002, "bash", "/dev/pts/999999")
    (proc / "self").mkdir()  # not a pid: skipped
    (proc / "812" / "fd" / "99").mkdir()  # unreadable like an fd closed mid-scan: skipped
    config = make_config(tmp_path, ScannerSettings("north-1", str(scanner.link)))
    row = row_for(run(tmp_path, config), "north-1")
    assert row["holders"] == [
        {"pid": 812, "name": "ModemManager"},
        {"pid": 913, "name": "brltty"},
        {"pid": 1001, "name": "minicom"},
    ]
    assert row["hints"] == [
        HINT_MODEMMANAGER,
        HINT_BRLTTY,
        "held by minicom (pid 1001): stop it or change port",
    ]
    assert 'ENV{ID_MM_DEVICE_IGNORE}="1"' in HINT_MODEMMANAGER


def test_daemon_holding_its_scanner_is_no_problem(
    tmp_path: Path, scanner_factory: Callable[[str], VirtualScanner], store: Store
) -> None:
    """The running daemon is listed as a holder but gets no hint, and the row is open."""
    scanner = scanner_factory("north")
    fake_process(tmp_path / "proc", 4321, "meetch-gate", os.path.realpath(scanner.link))
    store.set_meta("daemon", {"pid": 4321, "running": True})
    store.set_scanner_state("north-1", str(scanner.link), connected=True)
    config = make_config(tmp_path, ScannerSettings("north-1", str(scanner.link)))
    row = row_for(run(tmp_path, config, store=store, daemon_running=True), "north-1")
    assert row["holders"] == [{"pid": 4321, "name": "meetch-gate"}]
    assert row["hints"] == []
    assert row["open_by_daemon"] is True
    stopped = row_for(run(tmp_path, config, store=store, daemon_running=False), "north-1")
    assert stopped["open_by_daemon"] is False


def test_real_proc_finds_this_process(
    tmp_path: Path, scanner_factory: Callable[[str], VirtualScanner]
) -> None:
    """The real /proc shows this process holding the pty it made, with no hint about itself."""
    scanner = scanner_factory("north")
    config = make_config(tmp_path, ScannerSettings("north-1", str(scanner.link)))
    (tmp_path / "input").mkdir()
    rows = discover(config, None, False, comports=no_ports, input_dir=tmp_path / "input")
    row = row_for(rows, "north-1")
    assert {"pid": os.getpid(), "name": Path(f"/proc/{os.getpid()}/comm").read_text().strip()} in (
        row["holders"]
    )
    assert row["hints"] == []


def test_not_readable_hint_names_the_group() -> None:
    """A device the user cannot open points at dialout (serial) or input (wedge)."""
    row = {"kind": "serial", "present": True, "readable": False, "holders": []}
    assert row_hints(row) == [
        "not readable by this user: add the agent's user to the dialout group"
    ]
    assert row_hints({**row, "kind": "input"}) == [
        "not readable by this user: add the agent's user to the input group"
    ]
    assert row_hints({**row, "readable": True}) == []


def test_unreadable_device_file_gets_hint(tmp_path: Path) -> None:
    """A configured device with mode 000 is present but not readable, with the hint."""
    if os.geteuid() == 0:
        pytest.skip("root can open any file: os.access is always true")
    device = tmp_path / "ttyFAKE0"
    device.write_text("")
    device.chmod(0)
    row = row_for(run(tmp_path, make_config(tmp_path, ScannerSettings("n", str(device)))), "n")
    assert (row["present"], row["readable"]) == (True, False)
    assert "dialout group" in row["hints"][0]


def test_input_devices_from_by_id(tmp_path: Path) -> None:
    """Keyboard event links are listed once per device; a wedge scanner's is marked."""
    dev, by_id = tmp_path / "dev", tmp_path / "input"
    dev.mkdir()
    by_id.mkdir()
    for event in ("event3", "event4", "event5"):
        (dev / event).write_text("")
    (by_id / "usb-Honeywell_Imaging_1900-event-kbd").symlink_to(dev / "event3")
    (by_id / "usb-Honeywell_Imaging_1900-if01-event-kbd").symlink_to(dev / "event3")
    (by_id / "usb-Logitech_USB_Keyboard-event-kbd").symlink_to(dev / "event4")
    (by_id / "usb-Logitech_USB_Mouse-event-mouse").symlink_to(dev / "event5")
    link = by_id / "usb-Honeywell_Imaging_1900-event-kbd"
    config = make_config(tmp_path, ScannerSettings("wedge-1", str(link), kind="wedge"))
    rows = run(tmp_path, config)
    assert [(r["kind"], r["device"], r["description"]) for r in rows] == [
        ("input", str(dev / "event3"), "Honeywell Imaging 1900"),
        ("input", str(dev / "event4"), "Logitech USB Keyboard"),
    ]
    wedge = row_for(rows, "wedge-1")
    assert wedge["links"] == [str(link), str(by_id / "usb-Honeywell_Imaging_1900-if01-event-kbd")]
    assert (wedge["present"], wedge["readable"]) == (True, True)


def test_two_scanners_on_one_port_are_flagged(
    tmp_path: Path, scanner_factory: Callable[[str], VirtualScanner]
) -> None:
    """Two configured scanners on the same device: the second is named in a hint."""
    scanner = scanner_factory("north")
    config = make_config(
        tmp_path,
        ScannerSettings("north-1", str(scanner.link)),
        ScannerSettings("north-2", str(scanner.device)),
    )
    rows = run(tmp_path, config)
    assert len(rows) == 1
    assert rows[0]["configured_as"] == "north-1"
    assert "also configured as north-2" in rows[0]["hints"][0]


def test_print_plain_when_piped(tmp_path: Path) -> None:
    """Piped output is plain columns with the hints below; nothing found says so."""
    out = io.StringIO()
    console = Console(file=out, width=60)
    port = str(tmp_path / "by-id" / "usb-Honeywell_Imaging___Mobility_1900_Long_Name-if00")
    comports = ports(FakePort("/dev/ttyACM0", 0x0C2E, 0x0B61, "17034B4E32", "1900 Scanner"))
    rows = run(tmp_path, make_config(tmp_path, ScannerSettings("north-1", port)), comports=comports)
    print_scanners(rows, console)
    lines = out.getvalue().splitlines()
    assert " ".join(lines[0].split()) == "device / link VID:PID serial description configured open"
    assert lines[1].split()[:3] == ["/dev/ttyACM0", "0c2e:0b61", "17034B4E32"]
    assert port in lines[2]  # never wrapped, even on a narrow console
    assert lines[-1].startswith("hint north-1: configured but not plugged in")
    assert "\x1b" not in out.getvalue()
    empty = io.StringIO()
    print_scanners([], Console(file=empty))
    assert empty.getvalue() == NOT_FOUND + "\n"


def test_print_table_on_terminal(tmp_path: Path) -> None:
    """On a terminal the rows are a table and markup-like text is shown as is."""
    out = io.StringIO()
    comports = ports(FakePort("/dev/ttyUSB0", 0x067B, 0x2303, None, "PL2303 [adapter]"))
    rows = run(tmp_path, make_config(tmp_path), comports=comports)
    print_scanners(rows, Console(file=out, force_terminal=True, width=120))
    text = out.getvalue()
    assert "┃" in text
    assert "067b:2303" in text
    assert "PL2303 [adapter]" in text


def test_cli_scanners_json(
    config_writer: ConfigWriter, scanner_factory: Callable[[str], VirtualScanner]
) -> None:
    """``scanners --json`` prints an array with every configured scanner, exit 0."""
    scanner = scanner_factory("north")
    config = config_writer.write(
        scanners=[
            {"name": "north-1", "port": str(scanner.link)},
            {"name": "far-1", "port": "socket://127.0.0.1:9"},
        ]
    )
    result = cli("scanners", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    north = row_for(rows, "north-1")
    assert (north["present"], north["open_by_daemon"]) == (True, False)
    assert row_for(rows, "far-1")["present"] is None
    plain = cli("scanners", "--config", str(config))
    assert plain.returncode == 0, plain.stderr
    assert "north-1" in plain.stdout


def test_cli_scanners_open_by_running_daemon(
    config_writer: ConfigWriter,
    scanner_factory: Callable[[str], VirtualScanner],
    start_agent: Callable[..., AgentProcess],
) -> None:
    """With the daemon running and connected, the scanner's row says open_by_daemon."""
    scanner = scanner_factory("north")
    config = config_writer.write(scanners=[{"name": "north-1", "port": str(scanner.link)}])

    def north() -> dict[str, Any]:
        result = cli("scanners", "--json", "--config", str(config))
        assert result.returncode == 0, result.stderr
        return row_for(json.loads(result.stdout), "north-1")

    agent = start_agent(config)
    row = wait_until(lambda: (r := north())["open_by_daemon"] and r, 15)
    assert row["present"] is True
    # The daemon holds its own port: listed when /proc is readable, never a hint about it.
    assert not any(f"(pid {agent.proc.pid})" in h for h in row["hints"])
    assert agent.stop() == 0
    assert north()["open_by_daemon"] is False
