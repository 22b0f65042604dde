"""Is the system clock synchronised? Scan times are evidence, so every scan records it."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
import time

TIME_ERROR = 5
"""adjtimex(2)'s return value when the kernel clock is not synchronised."""
_TIMEX_BUFFER = 512
"""Larger than ``struct timex`` on every Linux ABI (208 bytes on 64-bit)."""


def system_clock_synchronised() -> bool | None:
    """Whether the kernel says the clock is synchronised (NTP); None when it cannot be told.

    adjtimex(2) with ``modes = 0`` only reads, so it needs no privilege; it returns
    TIME_ERROR while the kernel's STA_UNSYNC flag is set, which is what chrony and
    systemd-timesyncd clear once they have synchronised.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        # Zeroed, so ``modes`` (the first field) is 0: read-only.
        buffer = ctypes.create_string_buffer(_TIMEX_BUFFER)
        state = int(libc.adjtimex(buffer))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != TIME_ERROR


class CachedClockState:
    """:func:`system_clock_synchronised`, asked at most every ``max_age_s`` (a scan burst
    must not make a syscall per frame, and synchronisation changes slowly)."""

    def __init__(self, max_age_s: float = 10.0) -> None:
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._at = -float("inf")
        self._state: bool | None = None

    def __call__(self) -> bool | None:
        now = time.monotonic()
        with self._lock:
            if now - self._at >= self.max_age_s:
                self._state = system_clock_synchronised()
                self._at = now
            return self._state
