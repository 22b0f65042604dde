"""Scanner readers (agent/scanners): serial reading on real ptys, reconnects, wedge stub."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import serial

from agent.barcode import OVERLONG
from agent.config import ScannerSettings
from agent.errors import ScannerError
from agent.scanners import ScannerReader, make_reader
from agent.scanners.serial_port import SerialScanner, resolve_port
from hardware_mocks.virtual_scanner import VirtualScanner
from tests.conftest import wait_until

FEEDBACK = b"\x1b7,"
TIMEOUT_S = 5.0


@dataclass
class Recorder:
    """The reader's handlers: keeps frames and state changes, answers FEEDBACK."""

    fail_on: frozenset[bytes] = frozenset()
    frames: list[bytes] = field(default_factory=list)
    states: list[tuple[bool, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_frame(self, settings: ScannerSettings, frame: bytes) -> bytes:
        """Record a frame; fail for the frames in ``fail_on``."""
        with self.lock:
            self.frames.append(frame)
        if frame in self.fail_on:
            raise RuntimeError(f"cannot record {frame!r}")
        return FEEDBACK

    def on_state(self, settings: ScannerSettings, connected: bool, error: str | None) -> None:
        """Record a connect or a drop."""
        with self.lock:
            self.states.append((connected, error))

    def got(self) -> list[bytes]:
        """The frames so far."""
        with self.lock:
            return list(self.frames)

    def connects(self) -> int:
        """How many times the reader connected."""
        with self.lock:
            return self.states.count((True, None))

    def last_state(self) -> tuple[bool, str | None] | None:
        """The latest (connected, error), None before the first."""
        with self.lock:
            return self.states[-1] if self.states else None

    def errors(self) -> list[str]:
        """Errors reported with a drop, oldest first."""
        with self.lock:
            return [e for c, e in self.states if not c and e is not None]


StartReader = Callable[..., tuple[SerialScanner, Recorder]]


@pytest.fixture
def start_reader() -> Iterator[StartReader]:
    """Starts SerialScanners (fast reconnects by default); stops and joins them all at the end."""
    started: list[SerialScanner] = []

    def start(
        port: str,
        *,
        terminator: str = "\r",
        fail_on: frozenset[bytes] = frozenset(),
        reconnect_s: float = 0.05,
    ) -> tuple[SerialScanner, Recorder]:
        recorder = Recorder(fail_on=fail_on)
        settings = ScannerSettings(name="north-1", port=port, terminator=terminator)
        reader = SerialScanner(
            settings,
            recorder.on_frame,
            recorder.on_state,
            reconnect_initial_s=reconnect_s,
            reconnect_max_s=max(reconnect_s, 0.2),
        )
        started.append(reader)
        reader.start()
        return reader, recorder

    yield start
    for reader in started:
        reader.stop()
    for reader in started:
        reader.join(2.0)


def connected(
    scanner: VirtualScanner, start: StartReader, **kwargs: object
) -> tuple[SerialScanner, Recorder]:
    """A reader on ``scanner``, once it has the port open (pyserial drops earlier input)."""
    reader, recorder = start(str(scanner.link), **kwargs)
    wait_until(lambda: recorder.connects() == 1, TIMEOUT_S)
    return reader, recorder


def frames_are(recorder: Recorder, expected: list[bytes]) -> Callable[[], bool]:
    """A wait_until predicate: exactly these frames have arrived."""
    return lambda: recorder.got() == expected


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_frame_split_across_writes_arrives_whole(
    scanner_factory: Callable[[str], VirtualScanner], start_reader: StartReader, chunk: int
) -> None:
    """A frame written a few bytes at a time reaches the handler as one frame."""
    scanner = scanner_factory("north")
    _, recorder = connected(scanner, start_reader)
    scanner.type("000001", aim="]C0", chunk=chunk, gap_s=0.01)
    scanner.type("TKT-2026-LYON-000003", chunk=chunk, gap_s=0.005)
    wait_until(frames_are(recorder, [b"]C0000001", b"TKT-2026-LYON-000003"]), TIMEOUT_S)


def test_several_frames_in_one_write_all_arrive(
    scanner_factory: Callable[[str], VirtualScanner], start_reader: StartReader
) -> None:
    """Frames that come in a single read are all handled, in order."""
    scanner = scanner_factory("north")
    _, recorder = connected(scanner, start_reader)
    scanner.write(b"000001\r000002\r]Q1000003\r")
    wait_until(frames_are(recorder, [b"000001", b"000002", b"]Q1000003"]), TIMEOUT_S)


@pytest.mark.parametrize("terminator", ["\r", "\n", "\r\n"], ids=["CR", "LF", "CRLF"])
def test_terminators(
    scanner_factory: Callable[[str], VirtualScanner],
    start_reader: StartReader,
    terminator: str,
) -> None:
    """CR, LF and CRLF frames arrive without their terminator, even cut inside it."""
    scanner = scanner_factory("north")
    _, recorder = connected(scanner, start_reader, terminator=terminator)
    end = terminator.encode()
    scanner.type("000001", terminator=end)
    scanner.type("000002", terminator=end, chunk=1, gap_s=0.005)
    scanner.write(b"000003" + end + b"000004" + end)
    wait_until(frames_are(recorder, [b"000001", b"000002", b"000003", b"000004"]), TIMEOUT_S)


def test_feedback_is_written_back(
    scanner_factory: Callable[[str], VirtualScanner], start_reader: StartReader
) -> None:
    """The bytes the frame handler returns go back to the scanner, once per frame."""
    scanner = scanner_factory("north")
    connected(scanner, start_reader)
    scanner.type("000001")
    assert scanner.wait_feedback(FEEDBACK, TIMEOUT_S)
    scanner.type("000002")
    assert scanner.wait_feedback(FEEDBACK, TIMEOUT_S, count=2)
    assert scanner.feedback == FEEDBACK * 2


def test_noise_between_frames_loses_no_valid_frame(
    scanner_factory: Callable[[str], VirtualScanner], start_reader: StartReader
) -> None:
    """Line noise and a runaway burst between frames leave the frames around them intact."""
    scanner = scanner_factory("north")
    _, recorder = connected(scanner, start_reader)
    rng = random.Random(42)
    scanner.type("000001")
    noise = scanner.noise(40, rng, terminator=b"\r")
    scanner.type("000002")
    scanner.noise(3000, rng, terminator=b"\r")
    scanner.type("000003")
    expected = [b"000001", noise[:-1], b"000002", OVERLONG, b"000003"]
    wait_until(frames_are(recorder, expected), TIMEOUT_S)


def test_unplug_and_replug_reconnects(
    scanner_factory: Callable[[str], VirtualScanner], start_reader: StartReader
) -> None:
    """A pulled scanner is reported with an error, and read again once plugged back."""
    scanner = scanner_factory("north")
    _, recorder = connected(scanner, start_reader)
    scanner.type("000001")
    wait_until(frames_are(recorder, [b"000001"]), TIMEOUT_S)
    scanner.unplug()
    wait_until(lambda: recorder.last_state() != (True, None), TIMEOUT_S)
    assert recorder.errors()
    scanner.plug()
    wait_until(lambda: recorder.connects() == 2, TIMEOUT_S)
    scanner.type("000002")
    wait_until(frames_are(recorder, [b"000001", b"000002"]), TIMEOUT_S)
    assert scanner.wait_feedback(FEEDBACK, TIMEOUT_S)
    assert recorder.last_state() == (True, None)


def test_every_unplug_is_reported(
    scanner_factory: Callable[[str], VirtualScanner], start_reader: StartReader
) -> None:
    """A second unplug with the same error as the first is still reported as disconnected."""
    scanner = scanner_factory("north")
    _, recorder = connected(scanner, start_reader)
    for round_ in (1, 2):
        scanner.unplug()
        wait_until(lambda: recorder.last_state() != (True, None), TIMEOUT_S)
        scanner.plug()
        wait_until(lambda n=round_: recorder.connects() == n + 1, TIMEOUT_S)
    assert len([e for e in recorder.errors() if e]) >= 2


def test_missing_port_is_retried_until_plugged(
    scanner_factory: Callable[[str], VirtualScanner], start_reader: StartReader
) -> None:
    """A scanner absent at start is reported not present, then connected once plugged in."""
    scanner = scanner_factory("north")
    scanner.unplug()
    _, recorder = start_reader(str(scanner.link))
    wait_until(recorder.errors, TIMEOUT_S)
    assert recorder.connects() == 0
    assert "not present" in recorder.errors()[0]
    scanner.plug()
    wait_until(lambda: recorder.connects() == 1, TIMEOUT_S)
    scanner.type("000001")
    wait_until(frames_are(recorder, [b"000001"]), TIMEOUT_S)


def test_port_held_by_another_process(
    scanner_factory: Callable[[str], VirtualScanner], start_reader: StartReader
) -> None:
    """A port someone else holds is reported as such, and opened once they let go."""
    scanner = scanner_factory("north")
    holder = serial.serial_for_url(str(scanner.link), exclusive=True)
    try:
        _, recorder = start_reader(str(scanner.link))
        wait_until(recorder.errors, TIMEOUT_S)
        assert "held by another process" in recorder.errors()[0]
        assert recorder.connects() == 0
    finally:
        holder.close()
    wait_until(lambda: recorder.connects() == 1, TIMEOUT_S)


@pytest.mark.parametrize("plugged", [True, False], ids=["silent", "absent"])
def test_stop_ends_the_thread_promptly(
    scanner_factory: Callable[[str], VirtualScanner], start_reader: StartReader, plugged: bool
) -> None:
    """stop() ends the reader within 2 s, whether it is reading or in a long reconnect wait."""
    scanner = scanner_factory("north")
    if not plugged:
        scanner.unplug()
    reader, recorder = start_reader(str(scanner.link), reconnect_s=30.0)
    wait_until(recorder.last_state, TIMEOUT_S)
    started = time.monotonic()
    reader.stop()
    reader.join(2.0)
    assert time.monotonic() - started < 2.0
    assert recorder.last_state() == (False, "agent stopped")


def test_failing_handler_does_not_kill_the_reader(
    scanner_factory: Callable[[str], VirtualScanner], start_reader: StartReader
) -> None:
    """A frame whose handler raises gets no feedback; the next frame is read as usual."""
    scanner = scanner_factory("north")
    _, recorder = connected(scanner, start_reader, fail_on=frozenset({b"000001"}))
    scanner.type("000001")
    scanner.type("000002")
    wait_until(frames_are(recorder, [b"000001", b"000002"]), TIMEOUT_S)
    assert scanner.wait_feedback(FEEDBACK, TIMEOUT_S)
    assert scanner.feedback == FEEDBACK
    assert recorder.connects() == 1


# -- usb:VID:PID[:SERIAL] ------------------------------------------------------------------


def usb_port(
    device: str, vid: int | None, pid: int | None, serial_number: str | None
) -> SimpleNamespace:
    """Stands in for pyserial's ListPortInfo."""
    return SimpleNamespace(device=device, vid=vid, pid=pid, serial_number=serial_number)


PORTS = [
    usb_port("/dev/ttyACM0", 0x0C2E, 0x0B61, "19001"),
    usb_port("/dev/ttyACM1", 0x0C2E, 0x0B61, "19002"),
    usb_port("/dev/ttyACM2", 0x05E0, 0x1200, "S-7"),
    usb_port("/dev/ttyS0", None, None, None),  # a built-in port: no USB IDs
]


def test_resolve_port_passes_paths_and_urls_through() -> None:
    """Device paths and pyserial URLs are opened as given."""
    assert (
        resolve_port("/dev/serial/by-id/usb-x-if00", lambda: []) == "/dev/serial/by-id/usb-x-if00"
    )
    assert resolve_port("socket://127.0.0.1:7000", lambda: []) == "socket://127.0.0.1:7000"


@pytest.mark.parametrize(
    ("port", "device"),
    [
        ("usb:05e0:1200", "/dev/ttyACM2"),
        ("usb:05E0:1200:S-7", "/dev/ttyACM2"),
        ("usb:0c2e:0b61:19002", "/dev/ttyACM1"),
    ],
)
def test_resolve_usb_port_finds_the_device(port: str, device: str) -> None:
    """usb:VID:PID[:SERIAL] resolves to the one matching device."""
    assert resolve_port(port, lambda: PORTS) == device


@pytest.mark.parametrize("port", ["usb:1234:5678", "usb:05e0:1200:OTHER", "usb:0c2e:0b61:S-7"])
def test_resolve_usb_port_without_match_is_an_error(port: str) -> None:
    """No matching device is a ScannerError naming the IDs."""
    with pytest.raises(ScannerError, match="no USB serial device"):
        resolve_port(port, lambda: PORTS)


def test_resolve_usb_port_with_two_matches_asks_for_the_serial() -> None:
    """Two devices with the same VID:PID need the serial number to tell them apart."""
    with pytest.raises(ScannerError, match="2 USB serial devices match 0c2e:0b61") as info:
        resolve_port("usb:0c2e:0b61", lambda: PORTS)
    assert "usb:0c2e:0b61:SERIAL" in str(info.value)


# -- make_reader ---------------------------------------------------------------------------


def test_wedge_scanner_reports_not_available() -> None:
    """A wedge scanner is reported disconnected, not available yet, and stops at once."""
    recorder = Recorder()
    settings = ScannerSettings(name="desk-1", port="/dev/input/event3", kind="wedge")
    reader: ScannerReader = make_reader(settings, recorder.on_frame, recorder.on_state)
    reader.start()
    try:
        assert len(recorder.states) == 1
        connected_, error = recorder.states[0]
        assert connected_ is False
        assert error is not None
        assert "not available yet" in error
    finally:
        reader.stop()
        reader.join(2.0)


def test_make_reader_gives_a_serial_reader_by_default() -> None:
    """kind = "serial" (the default) reads through pyserial."""
    recorder = Recorder()
    settings = ScannerSettings(name="north-1", port="/dev/ttyACM0")
    assert isinstance(make_reader(settings, recorder.on_frame, recorder.on_state), SerialScanner)
