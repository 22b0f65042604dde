"""Scanner readers: one module per kind of scanner.

A reader owns one thread, turns the bytes it reads into frames and hands each frame to a
:data:`FrameHandler`, which answers with the feedback bytes (``good_read``/``bad_read``) to
write back once the scan is durable. Readers never take the daemon down: an unplugged or
failing scanner is reported through a :data:`StateHandler` and reopened with backoff.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from agent.config import ScannerSettings

FrameHandler = Callable[[ScannerSettings, bytes], bytes]
"""Called with each frame (terminator removed); returns bytes to write back, maybe empty."""
StateHandler = Callable[[ScannerSettings, bool, "str | None"], None]
"""Called with (scanner, connected, error) whenever a scanner connects or drops."""


class ScannerReader(Protocol):
    """A running scanner reader."""

    settings: ScannerSettings

    def start(self) -> None:
        """Start reading in a thread of its own."""

    def stop(self) -> None:
        """Ask the reader to stop; interrupts a blocked read."""

    def join(self, timeout: float | None = None) -> None:
        """Wait for the reader's thread to end."""


def make_reader(
    settings: ScannerSettings, on_frame: FrameHandler, on_state: StateHandler
) -> ScannerReader:
    """The reader for ``settings.kind``."""
    if settings.kind == "wedge":
        from agent.scanners.wedge import WedgeScanner

        return WedgeScanner(settings, on_frame, on_state)
    from agent.scanners.serial_port import SerialScanner

    return SerialScanner(settings, on_frame, on_state)
