"""The virtual scanner behaves like a serial scanner to a pyserial reader."""

from __future__ import annotations

import os
import random
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial

from hardware_mocks.virtual_scanner import VirtualScanner, VirtualScannerError


def open_reader(link: Path) -> serial.Serial:
    """Open the link the way the agent opens a configured port."""
    return serial.serial_for_url(str(link), baudrate=9600, timeout=0.5, exclusive=True)


@pytest.fixture
def link(tmp_path: Path) -> Path:
    """Where the scanner's by-id style symlink goes."""
    return tmp_path / "usb-Honeywell_1900-if00"


@pytest.fixture
def scanner(link: Path) -> Iterator[VirtualScanner]:
    """A plugged virtual scanner, unplugged after the test."""
    with VirtualScanner(link) as s:
        yield s


@pytest.fixture
def reader(scanner: VirtualScanner) -> Iterator[serial.Serial]:
    """A pyserial reader with the scanner's link open."""
    with open_reader(scanner.link) as ser:
        yield ser


def test_plug_points_link_at_a_pty(scanner: VirtualScanner, link: Path) -> None:
    """Plugging makes the link a symlink to the pty slave."""
    assert scanner.plugged
    assert scanner.link == link
    assert scanner.device is not None
    assert scanner.device.startswith("/dev/pts/")
    assert os.readlink(link) == scanner.device


@pytest.mark.parametrize(
    ("aim", "terminator"),
    [(None, b"\r"), ("]C0", b"\r\n"), ("]Q1", b"\n")],
)
def test_typed_frame_arrives_exactly(
    scanner: VirtualScanner, reader: serial.Serial, aim: str | None, terminator: bytes
) -> None:
    """A typed ticket reaches the reader byte for byte, AIM prefix and terminator included."""
    sent = scanner.type("000042", terminator=terminator, aim=aim)
    assert sent == (aim or "").encode() + b"000042" + terminator
    assert reader.read_until(terminator) == sent


def test_type_encodes_utf8(scanner: VirtualScanner, reader: serial.Serial) -> None:
    """Non-ASCII tickets go out as UTF-8."""
    sent = scanner.type("BILLET-é", terminator=b"\n")
    assert sent == "BILLET-é\n".encode()
    assert reader.read_until(b"\n") == sent


def test_chunked_typing_arrives_in_several_reads(
    scanner: VirtualScanner, reader: serial.Serial
) -> None:
    """With chunk and gap_s the reader gets the frame split across reads."""
    typist = threading.Thread(
        target=scanner.type, args=("123456789",), kwargs={"chunk": 4, "gap_s": 0.05}
    )
    typist.start()
    pieces: list[bytes] = []
    while not b"".join(pieces).endswith(b"\r"):
        first = reader.read(1)
        assert first, "frame did not complete"
        pieces.append(first + reader.read(reader.in_waiting))
    typist.join()
    assert b"".join(pieces) == b"123456789\r"
    assert len(pieces) >= 2


def test_reader_writes_come_back_as_feedback(
    scanner: VirtualScanner, reader: serial.Serial
) -> None:
    """wait_feedback returns once the agent's good_read bytes have arrived count times."""
    reader.write(b"\x1b7,")
    assert scanner.wait_feedback(b"\x1b7,", 1.0)
    reader.write(b"\x1b7,\x1b7,")
    assert scanner.wait_feedback(b"\x1b7,", 1.0, count=3)
    assert scanner.feedback == b"\x1b7," * 3


def test_wait_feedback_times_out(scanner: VirtualScanner, reader: serial.Serial) -> None:
    """wait_feedback gives False when the bytes never come."""
    reader.write(b"bad")
    started = time.monotonic()
    assert not scanner.wait_feedback(b"good", 0.1)
    assert 0.1 <= time.monotonic() - started < 0.5
    assert scanner.feedback == b"bad"


def test_read_feedback_collects_within_timeout(
    scanner: VirtualScanner, reader: serial.Serial
) -> None:
    """read_feedback returns what arrived during the timeout and adds it to feedback."""
    assert scanner.read_feedback(0) == b""
    reader.write(b"\x07")
    assert scanner.read_feedback(0.1) == b"\x07"
    reader.write(b"\x1b8,")
    assert scanner.read_feedback(0.1) == b"\x1b8,"
    assert scanner.feedback == b"\x07\x1b8,"


def test_unplug_fails_an_open_reader_promptly(
    scanner: VirtualScanner, reader: serial.Serial, link: Path
) -> None:
    """Unplugging while the reader waits in read() makes it raise within a second."""
    pull = threading.Timer(0.1, scanner.unplug)
    pull.start()
    started = time.monotonic()
    with pytest.raises(serial.SerialException):
        reader.read(1)
    pull.join()
    assert time.monotonic() - started < 1.0
    assert not scanner.plugged
    assert scanner.device is None
    assert not link.is_symlink()
    with pytest.raises(serial.SerialException):
        reader.write(b"\x1b7,")


def test_replug_serves_new_frames_at_same_link(scanner: VirtualScanner, link: Path) -> None:
    """After unplug and plug, reopening the same link path reads new frames."""
    with open_reader(link) as old:
        scanner.type("before")
        assert old.read_until(b"\r") == b"before\r"
        scanner.unplug()
        with pytest.raises(serial.SerialException):
            old.read(1)
    with pytest.raises(serial.SerialException):
        open_reader(link)
    scanner.plug()
    with open_reader(link) as new:
        scanner.type("after", aim="]C0")
        assert new.read_until(b"\r") == b"]C0after\r"
        new.write(b"ok")
        assert scanner.wait_feedback(b"ok", 1.0)


def test_reader_reopen_does_not_hang_up(scanner: VirtualScanner, link: Path) -> None:
    """The agent closing and reopening the port leaves the scanner plugged and working."""
    with open_reader(link):
        pass
    with open_reader(link) as ser:
        scanner.type("000007")
        assert ser.read_until(b"\r") == b"000007\r"


def test_write_without_reader_is_buffered(scanner: VirtualScanner) -> None:
    """Writing while nobody has the port open does not block."""
    scanner.write(b"x" * 1000)


def test_write_times_out_when_pty_buffer_is_full(scanner: VirtualScanner) -> None:
    """A write that cannot fit in the pty fails after write_timeout instead of hanging."""
    scanner.write_timeout = 0.05
    with pytest.raises(VirtualScannerError, match="buffer full"):
        scanner.write(b"x" * 1_000_000)


def test_close_is_idempotent_and_removes_link(link: Path) -> None:
    """close() unplugs, removes the link and may be called again."""
    scanner = VirtualScanner(link)
    assert link.is_symlink()
    scanner.close()
    scanner.close()
    assert not link.is_symlink()
    assert not scanner.plugged
    assert scanner.device is None
    assert scanner.read_feedback(0.5) == b""
    with pytest.raises(VirtualScannerError, match="unplugged"):
        scanner.type("000001")


def test_unplugged_until_plug(link: Path) -> None:
    """plugged=False creates no link until plug() is called."""
    with VirtualScanner(link, plugged=False) as scanner:
        assert not scanner.plugged
        assert not link.is_symlink()
        scanner.plug()
        assert os.readlink(link) == scanner.device
    assert not link.is_symlink()


def test_plug_replaces_a_stale_link(link: Path) -> None:
    """A dangling link left by a crashed run is replaced atomically."""
    link.symlink_to("/dev/pts/does-not-exist")
    with VirtualScanner(link) as scanner:
        assert os.readlink(link) == scanner.device


def test_plug_refuses_to_replace_a_regular_file(link: Path) -> None:
    """A real file at the link path is never clobbered."""
    link.write_text("keep me")
    with pytest.raises(VirtualScannerError, match="not a symlink"):
        VirtualScanner(link)
    assert link.read_text() == "keep me"


def test_noise_is_one_invalid_frame(scanner: VirtualScanner, reader: serial.Serial) -> None:
    """noise() sends n bytes without CR/LF, never valid UTF-8, then the terminator."""
    sent = scanner.noise(40, random.Random(7), terminator=b"\r")
    assert len(sent) == 41
    assert sent.endswith(b"\r")
    assert b"\r" not in sent[:-1]
    assert b"\n" not in sent
    with pytest.raises(UnicodeDecodeError):
        sent.decode()
    assert reader.read_until(b"\r") == sent
    assert scanner.noise(5, random.Random(7)) == scanner.noise(5, random.Random(7))


def read_line(fd: int, buffer: bytearray, deadline: float) -> bytes:
    """Read one line from a pipe fd without ever blocking past deadline."""
    while b"\n" not in buffer:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no line from the CLI, got {bytes(buffer)!r}"
        if select.select([fd], [], [], remaining)[0]:
            data = os.read(fd, 4096)
            assert data, f"CLI closed stdout, got {bytes(buffer)!r}"
            buffer += data
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


def test_cli_types_stdin_lines_and_prints_feedback(link: Path) -> None:
    """The CLI types each stdin line as a ticket, prints feedback, and unplugs on EOF."""
    command = [sys.executable, "-m", "hardware_mocks.virtual_scanner", "--link", str(link)]
    command += ["--terminator", "CRLF", "--aim", "]C0"]
    deadline = time.monotonic() + 2.0
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        out = proc.stdout.fileno()
        buffer = bytearray()
        banner = read_line(out, buffer, deadline).decode()
        assert banner == f"device={os.readlink(link)} link={link}"
        with open_reader(link) as ser:
            proc.stdin.write(b"000001\n")
            proc.stdin.flush()
            assert ser.read_until(b"\r\n") == b"]C0000001\r\n"
            assert read_line(out, buffer, deadline) == b"sent b']C0000001\\r\\n'"
            ser.write(b"\x1b7,")
            assert read_line(out, buffer, deadline) == b"feedback b'\\x1b7,'"
            proc.stdin.close()
            assert proc.wait(timeout=max(0.1, deadline - time.monotonic())) == 0
    assert not link.is_symlink()
