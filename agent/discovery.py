"""What ``meetch-gate scanners`` shows: the serial ports and input devices on this machine.

A technician at a gate needs one answer: which device is my scanner, is it the one the
config names, does the daemon have it open, and if not, why not. So every serial port
(pyserial's ``comports()``) and every keyboard-like input device (keyboard-wedge scanners
show up as keyboards) is listed with its VID:PID and serial number, marked with the
scanner configured on it, and given hints for the usual culprits: ModemManager or brltty
holding the port, or the agent's user missing the ``dialout``/``input`` group.

Every configured scanner appears, found or not (a pty, a ``socket://`` URL, an unplugged
device, a ``usb:VID:PID`` nothing matches), so nothing configured is silently missing.
Everything here only reads: no port is opened, so running it beside the daemon is safe.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from serial.tools import list_ports

from agent.config import Config, ScannerSettings
from agent.store import Store

SERIAL_BY_ID = Path("/dev/serial/by-id")
"""udev's stable names for serial ports: what a config should name, so they are shown."""
SYS_CLASS_INPUT = Path("/sys/class/input")
SYS_CLASS_TTY = Path("/sys/class/tty")

HINT_MODEMMANAGER = (
    'ModemManager probes this port: add ENV{ID_MM_DEVICE_IGNORE}="1" '
    "(systemd/99-meetch-gate-scanners.rules)"
)
HINT_BRLTTY = "brltty grabs USB-serial adapters: sudo systemctl mask brltty (or remove it)"
HINT_NOT_READABLE = "not readable by this user: add the agent's user to the {group} group"
HINT_NOT_PRESENT = "configured but not plugged in (check the cable; `ls -l {by_id}`)"
HINT_NETWORK = "network port: not checked here; the daemon connects to it when it runs"
NOT_FOUND = "no serial ports or input devices found"

_USB_SPEC = re.compile(r"usb:([0-9A-Fa-f]{4}):([0-9A-Fa-f]{4})(?::(.+))?")
_KBD_SUFFIX = re.compile(r"(-if\d+)?-event-kbd$")


def discover(
    config: Config,
    store: Store | None,
    daemon_running: bool,
    *,
    comports: Callable[[], list[Any]] | None = None,
    input_dir: Path = Path("/dev/input/by-id"),
    proc_dir: Path = Path("/proc"),
) -> list[dict[str, Any]]:
    """Serial ports, keyboard-like input devices and configured scanners, one row each.

    ``store`` (None when no database exists yet) tells which scanners the daemon has
    open; ``comports``, ``input_dir`` and ``proc_dir`` are seams for tests.
    """
    real_ports = comports is None
    ports = (comports or list_ports.comports)()
    rows = [_serial_row(p, SERIAL_BY_ID) for p in ports if not (real_ports and _phantom(p))]
    rows += _input_rows(input_dir)
    for scanner in config.scanners:
        _attach(rows, scanner)

    states = store.scanner_states() if store is not None else {}
    daemon_pid = _daemon_pid(store) if daemon_running else None
    holders = _holders({r["device"] for r in rows if r["present"]}, proc_dir)
    for row in rows:
        name = row["configured_as"]
        row["open_by_daemon"] = bool(
            name is not None and daemon_running and states.get(name, {}).get("connected")
        )
        row["holders"] = holders.get(row["device"], []) if row["present"] else []
        row["hints"] = row_hints(row, daemon_pid) + row["hints"]
    return rows


def row_hints(row: dict[str, Any], daemon_pid: int | None = None) -> list[str]:
    """What to do about a row: unplugged, not readable, or held by another process."""
    by_id = "/dev/input/by-id" if row["kind"] == "input" else "/dev/serial/by-id"
    if row["present"] is None:
        return [HINT_NETWORK]
    if not row["present"]:
        # Only configured devices can be absent; permissions and holders of a missing
        # device mean nothing, so the cable is the one thing to check.
        return [HINT_NOT_PRESENT.format(by_id=by_id)]
    hints = []
    if not row["readable"]:
        group = "input" if row["kind"] == "input" else "dialout"
        hints.append(HINT_NOT_READABLE.format(group=group))
    for holder in row["holders"]:
        pid, name = holder["pid"], holder["name"]
        if pid in (daemon_pid, os.getpid()):
            continue  # the daemon holding its own scanner is the point, not a problem
        if name.lower() == "modemmanager":
            hints.append(HINT_MODEMMANAGER)
        elif name.lower() == "brltty":
            hints.append(HINT_BRLTTY)
        else:
            hints.append(f"held by {name} (pid {pid}): stop it or change port")
    return hints


def print_scanners(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    """Print the rows for a person: a table on a terminal, plain columns when piped."""
    console = console or Console()
    if not rows:
        console.print(NOT_FOUND, markup=False, highlight=False)
        return
    header = ("device / link", "VID:PID", "serial", "description", "configured", "open")
    cells = [_cells(row) for row in rows]
    if console.is_terminal:
        table = Table(*header)
        table.columns[0].overflow = "fold"  # a by-id path cut with an ellipsis is useless
        for row, cell in zip(rows, cells, strict=True):
            style = (
                "red"
                if row["present"] is False
                else "yellow"
                if row["present"] and row["hints"]
                else ""
            )
            table.add_row(*(escape(c) for c in cell), style=style)
        console.print(table)
    else:
        # Piped output is read by grep and scripts: no box drawing, no wrapping, links on
        # their own indented lines so each by-id path stays whole.
        widths = [max(len(c[i].split("\n")[0]) for c in [header, *cells]) for i in range(6)]
        for cell in [header, *cells]:
            first, *links = cell[0].split("\n")
            line = "  ".join(c.ljust(w) for c, w in zip((first, *cell[1:]), widths, strict=True))
            _plain(console, line.rstrip())
            for link in links:
                _plain(console, f"  {link}")
    for row in rows:
        for hint in row["hints"]:
            text = f"{row['configured_as'] or row['device']}: {hint}"
            if console.is_terminal:
                console.print(f"[yellow]hint[/] {escape(text)}", highlight=False)
            else:
                _plain(console, f"hint {text}")


def _plain(console: Console, line: str) -> None:
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def _cells(row: dict[str, Any]) -> tuple[str, str, str, str, str, str]:
    device = "\n".join([row["device"], *row["links"]])
    if row["present"] is False:
        opened = "no (absent)"
    elif row["configured_as"] is None:
        opened = "-"
    else:
        opened = "yes" if row["open_by_daemon"] else "no"
    return (
        device,
        row["vid_pid"] or "-",
        row["serial_number"] or "-",
        row["description"] or "-",
        row["configured_as"] or "-",
        opened,
    )


def _row(kind: str, device: str, **fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "kind": kind,
        "device": device,
        "links": [],
        "vid_pid": None,
        "serial_number": None,
        "description": None,
        "configured_as": None,
        "open_by_daemon": False,
        "present": True,
        "readable": False,
        "holders": [],
        "hints": [],
    }
    row.update(fields)
    return row


def _serial_row(port: Any, by_id: Path) -> dict[str, Any]:
    device = os.path.realpath(str(port.device))
    vid, pid = getattr(port, "vid", None), getattr(port, "pid", None)
    description = getattr(port, "description", None)
    if description in ("n/a", getattr(port, "name", None)):
        description = None  # pyserial's placeholders say nothing a technician can use
    return _row(
        "serial",
        device,
        links=_links_to(device, by_id),
        vid_pid=f"{vid:04x}:{pid:04x}" if vid is not None and pid is not None else None,
        serial_number=getattr(port, "serial_number", None) or None,
        description=description,
        readable=os.access(device, os.R_OK | os.W_OK),
    )


def _phantom(port: Any) -> bool:
    """A ttyS* with no UART behind it (sysfs ``type`` 0), which Linux creates by the dozen."""
    name = str(getattr(port, "name", "") or "")
    if not name.startswith("ttyS"):
        return False
    try:
        return (SYS_CLASS_TTY / name / "type").read_text().strip() == "0"
    except OSError:
        return False


def _links_to(device: str, directory: Path) -> list[str]:
    try:
        entries = sorted(directory.iterdir())
    except OSError:  # no such directory: no udev, or nothing plugged in
        return []
    return [str(e) for e in entries if e.is_symlink() and os.path.realpath(e) == device]


def _input_rows(input_dir: Path) -> list[dict[str, Any]]:
    """Keyboard-like input devices: a wedge scanner cannot be told from a keyboard."""
    by_device: dict[str, dict[str, Any]] = {}
    for link in sorted(input_dir.glob("*-event-kbd")):
        device = os.path.realpath(link)
        if device in by_device:
            by_device[device]["links"].append(str(link))
            continue
        sysfs = _input_sysfs(device)
        vendor, product = _read(sysfs, "id/vendor"), _read(sysfs, "id/product")
        by_device[device] = _row(
            "input",
            device,
            links=[str(link)],
            vid_pid=f"{vendor}:{product}" if vendor and product else None,
            serial_number=_read(sysfs, "uniq"),
            description=_read(sysfs, "name") or _name_from_link(link.name),
            present=os.path.exists(device),
            readable=os.access(device, os.R_OK),
        )
    return list(by_device.values())


def _input_sysfs(device: str) -> Path | None:
    # Only a real /dev/input/eventN has a sysfs entry; anything else (a test's fake
    # tree) must not pick up the attributes of whatever eventN this machine has.
    if os.path.dirname(device) != "/dev/input":
        return None
    return SYS_CLASS_INPUT / os.path.basename(device) / "device"


def _read(directory: Path | None, name: str) -> str | None:
    if directory is None:
        return None
    try:
        return (directory / name).read_text(errors="replace").strip() or None
    except OSError:
        return None


def _name_from_link(name: str) -> str:
    """``usb-Honeywell_Imaging_1900-event-kbd`` -> ``Honeywell Imaging 1900``."""
    stem = _KBD_SUFFIX.sub("", name)
    stem = stem.split("-", 1)[1] if stem.split("-", 1)[0] in ("usb", "platform") else stem
    return stem.replace("_", " ").strip()


def _attach(rows: list[dict[str, Any]], scanner: ScannerSettings) -> None:
    """Mark the rows a configured scanner uses, adding a row when none is found."""
    port = scanner.port
    kind = "input" if scanner.kind == "wedge" else "serial"
    usb = _USB_SPEC.fullmatch(port)
    if usb:
        vid_pid = f"{usb[1]}:{usb[2]}".lower()
        matches = [
            r
            for r in rows
            if r["kind"] == "serial"
            and r["vid_pid"] == vid_pid
            and (usb[3] is None or r["serial_number"] == usb[3])
        ]
        if len(matches) > 1:
            # The daemon refuses to guess between identical scanners; say how to choose.
            for r in matches:
                r["hints"].append(
                    f"{len(matches)} devices match {port}: add the serial number, "
                    f"usb:{usb[1]}:{usb[2]}:SERIAL"
                )
        for r in matches:
            _mark(r, scanner)
        if not matches:
            missing = _row(
                kind, port, vid_pid=vid_pid, serial_number=usb[3], present=False, readable=False
            )
            rows.append(_mark(missing, scanner))
        return
    if "://" in port:
        rows.append(_mark(_row(kind, port, present=None, readable=None), scanner))
        return
    device = os.path.realpath(port)
    for r in rows:
        if r["device"] == device and r["present"]:
            if port != device and port not in r["links"]:
                r["links"].append(port)
            _mark(r, scanner)
            return
    if not os.path.exists(port):
        # A dangling by-id link still resolves to the old ttyACM; showing that would
        # send the technician after a device that is gone.
        rows.append(_mark(_row(kind, port, present=False, readable=False), scanner))
        return
    mode = os.R_OK if kind == "input" else os.R_OK | os.W_OK
    row = _row(
        kind, device, links=[port] if port != device else [], readable=os.access(device, mode)
    )
    rows.append(_mark(row, scanner))


def _mark(row: dict[str, Any], scanner: ScannerSettings) -> dict[str, Any]:
    if row["configured_as"] is None:
        row["configured_as"] = scanner.name
    else:
        row["hints"].append(
            f"also configured as {scanner.name}: one port serves one scanner, "
            "the second cannot open it"
        )
    return row


def _daemon_pid(store: Store | None) -> int | None:
    daemon = store.get_meta("daemon") if store is not None else None
    pid = daemon.get("pid") if isinstance(daemon, dict) else None
    return pid if isinstance(pid, int) else None


def _holders(devices: Iterable[str], proc_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Processes with each device open, from ``/proc/PID/fd`` (what ``fuser`` does)."""
    wanted = {d for d in devices if d.startswith("/")}
    found: dict[str, list[dict[str, Any]]] = {}
    if not wanted:
        return found
    try:
        pids = sorted(int(p.name) for p in proc_dir.iterdir() if p.name.isdigit())
    except OSError:
        return found
    for pid in pids:
        try:
            fds = list((proc_dir / str(pid) / "fd").iterdir())
        except OSError:
            # Another user's process (not root) or one that just exited: nothing to tell.
            continue
        targets = set()
        for fd in fds:
            try:
                targets.add(os.readlink(fd))
            except OSError:
                # Closed since the listing: always so for the fd that listed our own
                # fd directory, often so in a busy process.
                continue
        for device in sorted(targets & wanted):
            try:
                name = (proc_dir / str(pid) / "comm").read_text(errors="replace").strip()
            except OSError:
                name = "?"
            found.setdefault(device, []).append({"pid": pid, "name": name})
    return found
