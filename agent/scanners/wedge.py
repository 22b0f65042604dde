"""USB keyboard-wedge scanners (evdev): not available yet in this version.

A configured wedge scanner is reported, loudly and in ``status``, as not available rather
than silently ignored; the other scanners keep working.
"""

from __future__ import annotations

import threading

import structlog

from agent.config import ScannerSettings
from agent.scanners import FrameHandler, StateHandler

log = structlog.get_logger("agent.scanners.wedge")

NOT_AVAILABLE = (
    'kind = "wedge" (USB keyboard-wedge scanners) is not available yet in this version; '
    'program the scanner for USB serial (CDC-ACM) and use kind = "serial"'
)


class WedgeScanner:
    """Placeholder reader: reports that keyboard-wedge scanners are not available yet."""

    def __init__(
        self, settings: ScannerSettings, on_frame: FrameHandler, on_state: StateHandler
    ) -> None:
        self.settings = settings
        self._on_state = on_state
        self._on_frame = on_frame
        self._stopped = threading.Event()

    def start(self) -> None:
        """Report the scanner as unavailable."""
        log.error("scanner_not_available", scanner=self.settings.name, error=NOT_AVAILABLE)
        self._on_state(self.settings, False, NOT_AVAILABLE)

    def stop(self) -> None:
        """Nothing runs; nothing to stop."""
        self._stopped.set()

    def join(self, timeout: float | None = None) -> None:
        """Nothing runs; returns at once."""
