"""A simulated serial barcode scanner on a real pseudo-terminal.

The scanner side holds the pty master; the agent opens the slave exactly as it
would open ``/dev/ttyACM0``, through a stable symlink that plays the part of
``/dev/serial/by-id/...``. Unplugging removes the link and hangs up the pty, so
the agent sees the same failure a pulled USB cable gives; plugging again points
the same link at a fresh pty.

Two things about pyserial that tests built on this must allow for:

- ``Serial.open()`` flushes the input queue (``tcflush(TCIFLUSH)``), so bytes
  typed before the reader opens the link are lost, as with a real scanner.
- After a hang-up the slave polls readable and ``read()`` returns nothing, which
  pyserial reports as ``SerialException("device reports readiness to read but
  returned no data ...")``; writes fail with ``SerialException("write failed:
  [Errno 5] ...")``.

Command line, for trying the agent by hand::

    python -m hardware_mocks.virtual_scanner --link /tmp/meetch-north --aim ]C0
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import random
import select
import signal
import sys
import threading
import time
import tty
import uuid
from pathlib import Path
from types import FrameType, TracebackType

__all__ = ["TERMINATORS", "VirtualScanner", "VirtualScannerError", "main"]

TERMINATORS: dict[str, bytes] = {"CR": b"\r", "LF": b"\n", "CRLF": b"\r\n"}
"""Terminator names accepted on the command line, as a scanner's setup manual names them."""

_READ_SIZE = 4096

# Noise never holds CR or LF, so a terminated burst is exactly one frame whatever
# the configured terminator; tests can then count it as one invalid scan.
_NOISE_ALPHABET = bytes(b for b in range(256) if b not in b"\r\n")


class VirtualScannerError(RuntimeError):
    """The virtual scanner cannot do what was asked (unplugged, link in the way, ...)."""


class VirtualScanner:
    """A serial barcode scanner simulated on a pty, reached through a symlink.

    ``link`` is where the agent is told the scanner lives; ``device`` is the
    ``/dev/pts/N`` behind it while plugged. Everything the agent writes back
    (good_read / bad_read feedback) is collected by :meth:`read_feedback` and
    :meth:`wait_feedback` and kept in :attr:`feedback`.
    """

    write_timeout: float = 5.0
    """Seconds :meth:`write` waits for room in the pty before giving up.

    The kernel buffers some 20 KiB per pty while nobody reads the slave; past
    that a blocking write would hang the test instead of failing it.
    """

    def __init__(self, link: str | os.PathLike[str], *, plugged: bool = True) -> None:
        """Prepare a scanner at ``link``; plug it at once unless ``plugged`` is False."""
        # abspath, not resolve(): resolve() would follow a link left by an earlier run.
        self.link: Path = Path(os.path.abspath(link))
        self.device: str | None = None
        self._master: int | None = None
        self._slave: int | None = None
        self._feedback = bytearray()
        # Tests unplug from a timer thread while another thread reads feedback.
        self._lock = threading.Lock()
        if plugged:
            self.plug()

    def __repr__(self) -> str:
        """Show the link and what is behind it."""
        return f"VirtualScanner(link={str(self.link)!r}, device={self.device!r})"

    @property
    def plugged(self) -> bool:
        """True while a pty is behind the link."""
        return self._master is not None

    @property
    def feedback(self) -> bytes:
        """Every byte read back from the agent so far, across plug cycles."""
        with self._lock:
            return bytes(self._feedback)

    def fileno(self) -> int:
        """The pty master, readable when the agent has written feedback (for select)."""
        master = self._master
        if master is None:
            raise VirtualScannerError(f"virtual scanner {self.link} is unplugged")
        return master

    def plug(self) -> None:
        """Create a fresh pty and point the link at it; does nothing if already plugged."""
        with self._lock:
            if self._master is not None:
                return
            if self.link.exists() and not self.link.is_symlink():
                raise VirtualScannerError(
                    f"{self.link} exists and is not a symlink; refusing to replace it"
                )
            master, slave = os.openpty()
            try:
                # Raw before anyone can open the link: with the default cooked mode the
                # line discipline would echo our own frames back as "feedback" and turn
                # CR into LF before the agent's first tcsetattr.
                tty.setraw(slave)
                # Non-blocking master so write() can time out and read() never hangs.
                flags = fcntl.fcntl(master, fcntl.F_GETFL)
                fcntl.fcntl(master, fcntl.F_SETFL, flags | os.O_NONBLOCK)
                device = os.ttyname(slave)
                self._point_link_at(device)
            except BaseException:
                os.close(master)
                os.close(slave)
                raise
            # The slave stays open here so the agent closing its own fd is not a hang-up
            # and our writes are buffered while nobody has the port open.
            self._master, self._slave, self.device = master, slave, device

    def _point_link_at(self, device: str) -> None:
        """Atomically make ``self.link`` a symlink to ``device``."""
        # A reader opening the link by path sees either the old target or the new
        # one, never a missing link: build the new link aside, then rename over.
        self.link.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.link.with_name(f".{self.link.name}.{uuid.uuid4().hex[:12]}.tmp")
        os.symlink(device, tmp)
        try:
            os.replace(tmp, self.link)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def unplug(self) -> None:
        """Remove the link and hang up the pty; an open reader fails on its next read."""
        with self._lock:
            master, slave, device = self._master, self._slave, self.device
            self._master = self._slave = self.device = None
        if device is not None:
            # Link first, so an agent reopening by path gets ENOENT, not the dying pty.
            # Leave it alone if someone re-pointed it meanwhile.
            try:
                if os.readlink(self.link) == device:
                    self.link.unlink()
            except FileNotFoundError:
                pass
        # Closing the master makes the kernel hang up every open slave fd at once.
        for fd in (master, slave):
            if fd is not None:
                os.close(fd)

    def close(self) -> None:
        """Unplug; safe to call any number of times."""
        self.unplug()

    def __enter__(self) -> VirtualScanner:
        """Use as a context manager that unplugs on exit."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Unplug and remove the link."""
        self.close()

    def write(self, data: bytes) -> None:
        """Send raw bytes as if the scanner had emitted them on the wire."""
        master = self.fileno()
        view = memoryview(data)
        deadline = time.monotonic() + self.write_timeout
        while view:
            try:
                written = os.write(master, view)
            except BlockingIOError:
                written = 0
            view = view[written:]
            if not view:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VirtualScannerError(
                    f"virtual scanner {self.link}: pty buffer full for {self.write_timeout}s"
                    f" with {len(view)} bytes unsent; is anything reading {self.device}?"
                )
            select.select([], [master], [], remaining)

    def type(
        self,
        ticket: str,
        *,
        terminator: bytes = b"\r",
        aim: str | None = None,
        chunk: int | None = None,
        gap_s: float = 0.0,
    ) -> bytes:
        """Scan ``ticket``: send AIM prefix + UTF-8 ticket + terminator, return the bytes.

        With ``chunk`` the frame goes out ``chunk`` bytes at a time, ``gap_s`` apart,
        so the reader gets it split across reads as a slow USB-serial bridge does.
        """
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        frame = (aim or "").encode() + ticket.encode() + terminator
        if chunk is None:
            self.write(frame)
            return frame
        for start in range(0, len(frame), chunk):
            if start and gap_s > 0:
                # The gap is what is being simulated, not a wait for a condition.
                time.sleep(gap_s)
            self.write(frame[start : start + chunk])
        return frame

    def noise(self, n: int, rng: random.Random, *, terminator: bytes | None = None) -> bytes:
        """Send ``n`` bytes of line noise (plus ``terminator`` if given) and return them.

        The noise never holds CR or LF and, when ``n`` > 0, holds at least one 0xFF
        (never valid UTF-8), so a terminated burst is always exactly one invalid frame.
        """
        if n < 0:
            raise ValueError(f"n must not be negative, got {n}")
        body = bytearray(rng.choice(_NOISE_ALPHABET) for _ in range(n))
        if n:
            body[rng.randrange(n)] = 0xFF
        data = bytes(body) + (terminator or b"")
        self.write(data)
        return data

    def read_feedback(self, timeout: float) -> bytes:
        """Collect what the agent writes back during ``timeout`` seconds and return it.

        Waits out the whole ``timeout`` (0 polls once); use :meth:`wait_feedback` to
        return as soon as expected bytes arrive. Returns at once when unplugged.
        """
        deadline = time.monotonic() + timeout
        got = bytearray()
        while True:
            got += self._read_available(max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline or not self.plugged:
                return bytes(got)

    def wait_feedback(self, expected: bytes, timeout: float, *, count: int = 1) -> bool:
        """Wait until ``expected`` occurs ``count`` times in :attr:`feedback`; False on timeout."""
        if not expected:
            raise ValueError("expected must not be empty")
        deadline = time.monotonic() + timeout
        while True:
            if self.feedback.count(expected) >= count:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.plugged:
                return False
            self._read_available(remaining)

    def _read_available(self, timeout: float) -> bytes:
        """Wait up to ``timeout`` for feedback, then drain what is there without waiting."""
        master = self._master
        if master is None:
            return b""
        got = bytearray()
        try:
            ready, _, _ = select.select([master], [], [], timeout)
            while ready:
                chunk = os.read(master, _READ_SIZE)
                if not chunk:
                    break
                got += chunk
                ready, _, _ = select.select([master], [], [], 0)
        except BlockingIOError:
            pass
        except (OSError, ValueError) as exc:
            # Unplugged by another thread mid-read: the fd is gone, and so is the data.
            if isinstance(exc, OSError) and exc.errno not in (errno.EBADF, errno.EIO):
                raise
        if got:
            with self._lock:
                self._feedback += got
        return bytes(got)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hardware_mocks.virtual_scanner",
        description="Simulate a serial barcode scanner: each stdin line is scanned as a ticket.",
    )
    parser.add_argument("--link", required=True, help="symlink the agent opens as its port")
    parser.add_argument(
        "--terminator", choices=sorted(TERMINATORS), default="CR", help="frame end (default CR)"
    )
    parser.add_argument("--aim", default=None, help="AIM symbology prefix, e.g. ]C0")
    parser.add_argument(
        "--linger",
        type=float,
        default=0.0,
        metavar="S",
        help="after end of input, keep reading feedback S seconds before unplugging",
    )
    return parser.parse_args(argv)


def _serve(scanner: VirtualScanner, args: argparse.Namespace, wake_r: int) -> None:
    """Type stdin lines and print feedback until EOF (plus linger) or a byte on ``wake_r``."""
    terminator = TERMINATORS[args.terminator]
    stdin_fd = sys.stdin.fileno()
    pending = b""
    linger_until: float | None = None  # set at end of input
    while True:
        watched = [wake_r, scanner.fileno()]
        timeout: float | None = None
        if linger_until is None:
            watched.append(stdin_fd)
        else:
            timeout = linger_until - time.monotonic()
            if timeout <= 0:
                return
        ready, _, _ = select.select(watched, [], [], timeout)
        if wake_r in ready:
            return
        if scanner.fileno() in ready:
            print(f"feedback {scanner.read_feedback(0)!r}", flush=True)
        if stdin_fd in ready:
            # os.read, not sys.stdin: select cannot see lines buffered in a TextIOWrapper.
            data = os.read(stdin_fd, _READ_SIZE)
            *lines, pending = (pending + data).split(b"\n")
            if not data:
                lines += [pending] if pending else []  # a last line without newline counts
                linger_until = time.monotonic() + args.linger
            for line in lines:
                ticket = line.rstrip(b"\r").decode(errors="replace")
                sent = scanner.type(ticket, terminator=terminator, aim=args.aim)
                print(f"sent {sent!r}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the interactive scanner until Ctrl-C, SIGTERM or end of input."""
    args = _parse_args(argv)

    def request_stop(signum: int, frame: FrameType | None) -> None:
        """Do nothing: the wakeup fd byte is the flag that ends the select loop."""

    # Signals only write to a pipe that _serve selects on, so cleanup (unplug,
    # removing the link) always runs in the main flow, never inside a handler.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    old_wakeup = signal.set_wakeup_fd(wake_w)
    old_handlers = {
        sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        with VirtualScanner(args.link) as scanner:
            print(f"device={scanner.device} link={scanner.link}", flush=True)
            print("type a ticket and Enter; Ctrl-D or Ctrl-C unplugs", file=sys.stderr, flush=True)
            _serve(scanner, args, wake_r)
    except VirtualScannerError as exc:
        print(f"virtual_scanner: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(old_wakeup)
        os.close(wake_r)
        os.close(wake_w)
    print(f"unplugged, removed {args.link}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
