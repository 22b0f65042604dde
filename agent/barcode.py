"""Pure scanner-frame parsing (CONTRACT §3).

A scanner sends frames ended by a terminator. :class:`FrameSplitter` cuts a byte stream
into frames; :func:`parse_frame` turns one frame into a ticket number or the reason it is
invalid. Nothing here does I/O.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

MAX_TICKET_CHARS = 128
"""Meetch's limit for an item number."""

MAX_FRAME_BYTES = 1024
"""A frame longer than this, terminator included, cannot hold a valid ticket (128 characters
of at most 4 bytes, an AIM identifier and some padding): the splitter drops it instead of
growing memory."""

TERMINATORS = {"\r": b"\r", "\n": b"\n", "\r\n": b"\r\n"}

# The white space a scanner pads with. Not str.strip(): that would also eat the
# information separators (GS, RS, US), which must make a frame invalid instead.
_PADDING = " \t\r\n"
_AIM = re.compile(r"\][A-Za-z][0-9A-Za-z]")


@dataclass(frozen=True)
class Frame:
    """One parsed frame: ``ticket`` when valid, else ``reason`` says why not."""

    ticket: str | None
    reason: str | None = None

    @property
    def valid(self) -> bool:
        """True when the frame holds a ticket number."""
        return self.ticket is not None


def parse_frame(raw: bytes) -> Frame:
    """Extract the ticket number from one frame (terminator optional) or say why it is invalid."""
    if raw == OVERLONG:
        return Frame(None, "too_long")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return Frame(None, "not_utf8")
    text = text.strip(_PADDING)
    if _AIM.match(text):
        text = text[3:].strip(_PADDING)
    if not text:
        return Frame(None, "empty")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in text):
        return Frame(None, "control_character")
    if len(text) > MAX_TICKET_CHARS:
        return Frame(None, "too_long")
    return Frame(text)


class FrameSplitter:
    """Cuts a byte stream into frames at a terminator, whatever the read boundaries.

    A frame may arrive in several reads and several frames in one read. A runaway
    frame (no terminator within :data:`MAX_FRAME_BYTES`) is dropped, reported once as
    an overlong frame, and everything up to the next terminator is discarded.
    """

    def __init__(self, terminator: bytes, max_bytes: int = MAX_FRAME_BYTES) -> None:
        if not terminator:
            raise ValueError("terminator must not be empty")
        self._terminator = terminator
        self._max = max_bytes
        self._buffer = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes read from the scanner; return the complete frames, terminators removed.

        An overlong frame comes back as ``OVERLONG`` so the caller can count it.
        """
        self._buffer += data
        frames: list[bytes] = []
        term = self._terminator
        while True:
            cut = self._buffer.find(term)
            if cut < 0:
                break
            frame = bytes(self._buffer[:cut])
            del self._buffer[: cut + len(term)]
            if self._discarding:
                self._discarding = False
                continue
            # Terminator included, so a frame is overlong whether or not a read boundary
            # fell inside a multi-byte terminator (the check below sees its first byte).
            frames.append(OVERLONG if len(frame) + len(term) > self._max else frame)
        if len(self._buffer) > self._max:
            if not self._discarding:
                frames.append(OVERLONG)
                self._discarding = True
            # Keep the tail: it may hold the start of a split terminator.
            del self._buffer[: len(self._buffer) - (len(term) - 1)]
        return frames

    @property
    def pending(self) -> int:
        """Bytes held waiting for a terminator."""
        return len(self._buffer)


OVERLONG = b"\x00<overlong>"
"""Marker frame for a runaway frame; parse_frame finds it invalid (NUL is a control character)."""
