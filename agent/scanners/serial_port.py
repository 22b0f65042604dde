"""Serial scanners through pyserial: RS-232, USB CDC-ACM and USB-serial adapters.

``port`` may be a device path (``/dev/serial/by-id/...`` links included), any pyserial URL
(``socket://``, ``rfc2217://``) or ``usb:VID:PID[:SERIAL]``, resolved again at every
(re)connect so a scanner that comes back on another ttyACM is found.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import serial
import structlog
from serial.tools import list_ports

from agent.barcode import FrameSplitter
from agent.config import ScannerSettings
from agent.errors import ScannerError
from agent.scanners import FrameHandler, StateHandler

log = structlog.get_logger("agent.scanners.serial")

READ_TIMEOUT_S = 0.2
"""A read never blocks longer than this, so stopping is prompt even on a silent scanner."""
RECONNECT_INITIAL_S = 0.5
RECONNECT_MAX_S = 30.0


def resolve_port(port: str, comports: Callable[[], list[object]] | None = None) -> str:
    """The device or URL to open for a configured ``port``."""
    if not port.startswith("usb:"):
        return port
    parts = port.split(":", 3)
    vid, pid = int(parts[1], 16), int(parts[2], 16)
    serial_number = parts[3] if len(parts) > 3 else None
    ports = (comports or list_ports.comports)()
    matches = sorted(
        (p for p in ports if getattr(p, "vid", None) == vid and getattr(p, "pid", None) == pid),
        key=lambda p: str(getattr(p, "device", "")),
    )
    if serial_number is not None:
        matches = [p for p in matches if getattr(p, "serial_number", None) == serial_number]
    if not matches:
        raise ScannerError(f"no USB serial device {port[4:]} is plugged in (meetch-gate scanners)")
    if len(matches) > 1:
        raise ScannerError(
            f"{len(matches)} USB serial devices match {port[4:]}: add the serial number, "
            f"usb:{parts[1]}:{parts[2]}:SERIAL (meetch-gate scanners lists them)"
        )
    return str(getattr(matches[0], "device"))  # noqa: B009 (ListPortInfo attribute)


class SerialScanner:
    """Reads one serial scanner in a thread of its own, reconnecting with backoff."""

    def __init__(
        self,
        settings: ScannerSettings,
        on_frame: FrameHandler,
        on_state: StateHandler,
        *,
        reconnect_initial_s: float = RECONNECT_INITIAL_S,
        reconnect_max_s: float = RECONNECT_MAX_S,
    ) -> None:
        self.settings = settings
        self._on_frame = on_frame
        self._on_state = on_state
        self._initial = reconnect_initial_s
        self._max = reconnect_max_s
        self._stop = threading.Event()
        self._port: serial.SerialBase | None = None
        self._connected = False
        self._thread = threading.Thread(
            target=self._run, name=f"scanner-{settings.name}", daemon=True
        )

    def start(self) -> None:
        """Start the reader thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop reading; interrupts a blocked read."""
        self._stop.set()
        port = self._port
        if port is not None and hasattr(port, "cancel_read"):
            try:
                port.cancel_read()
            except Exception:  # closing underneath us is fine: the thread is stopping
                log.debug("cancel_read_failed", scanner=self.settings.name)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the reader thread to end."""
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        failures = 0
        last_error: str | None = None
        while not self._stop.is_set():
            try:
                error = self._session()
            except Exception as exc:  # whatever pyserial or termios throws, the reader lives on
                log.exception("scanner_reader_error", scanner=self.settings.name)
                error = describe_port_error(self.settings.port, exc)
            if error is None:  # stopped
                break
            if self._connected:  # it worked for a while: a fresh problem, reported afresh
                self._connected = False
                failures, last_error = 0, None
            failures = failures + 1 if error == last_error else 1
            if error != last_error:
                # Log a change, not every retry: an unplugged scanner must not flood logs.
                log.warning("scanner_unavailable", scanner=self.settings.name, error=error)
                self._report(False, error)
                last_error = error
            self._stop.wait(min(self._max, self._initial * 2 ** min(failures - 1, 16)))
        self._report(False, "agent stopped")

    def _session(self) -> str | None:
        """Open the port and read it; returns why it ended (None: asked to stop)."""
        try:
            device = resolve_port(self.settings.port)
            port = serial.serial_for_url(
                device,
                baudrate=self.settings.baudrate,
                timeout=READ_TIMEOUT_S,
                write_timeout=1.0,
                exclusive=True,
            )
        except (serial.SerialException, OSError, ValueError, ScannerError) as exc:
            return describe_port_error(self.settings.port, exc)
        try:
            self._port = port
            self._connected = True
            log.info(
                "scanner_connected",
                scanner=self.settings.name,
                port=self.settings.port,
                device=device,
            )
            self._report(True, None)
            return self._read(port)
        finally:
            self._port = None
            port.close()

    def _report(self, connected: bool, error: str | None) -> None:
        try:
            self._on_state(self.settings, connected, error)
        except Exception:  # a status write failing must not stop the scanner being read
            log.exception("scanner_state_report_failed", scanner=self.settings.name)

    def _read(self, port: serial.SerialBase) -> str | None:
        """Read frames until stopped (None) or the port fails (the error)."""
        splitter = FrameSplitter(self.settings.terminator_bytes)
        while not self._stop.is_set():
            try:
                data = port.read(1)
                waiting = int(getattr(port, "in_waiting", 0))
                if data and waiting:
                    data += port.read(waiting)
            except (serial.SerialException, OSError) as exc:
                return describe_port_error(self.settings.port, exc)
            except TypeError:  # pyserial on a port closed by cancel_read/stop
                return None if self._stop.is_set() else "port closed"
            if not data:
                continue
            for frame in splitter.feed(data):
                feedback = self._handle(frame)
                if feedback:
                    try:
                        port.write(feedback)
                    except (serial.SerialException, OSError) as exc:
                        return describe_port_error(self.settings.port, exc)
        return None

    def _handle(self, frame: bytes) -> bytes:
        try:
            return self._on_frame(self.settings, frame)
        except Exception:
            # Not acknowledged: no good_read, so the technician rescans.
            log.exception("scan_not_recorded", scanner=self.settings.name)
            return b""


def describe_port_error(port: str, exc: BaseException) -> str:
    """A technician's reading of why ``port`` could not be opened or read."""
    text = str(exc)
    if "exclusively lock" in text or "Resource temporarily unavailable" in text:
        return f"{port} is held by another process (fuser {port})"
    if isinstance(exc, FileNotFoundError) or "No such file" in text:
        return f"{port} is not present (unplugged?)"
    if "Permission denied" in text:
        return f"{port}: permission denied (add the agent's user to the dialout group)"
    return f"{port}: {text}"
