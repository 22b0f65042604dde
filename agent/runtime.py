"""A small state file the daemon can update even when the disk is full.

``<state_dir>/runtime.json`` is allocated once, at start, and then only ever overwritten in
place: no new blocks are needed, so the daemon can still say "the queue database is full"
when nothing else can be written. Readers get a whole JSON document or, mid-write, retry.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

NAME = "runtime.json"
SIZE = 16 * 1024


class RuntimeFile:
    """The daemon's side: allocate once, overwrite in place."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / NAME
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        with contextlib.suppress(OSError):  # not every filesystem preallocates; still fine
            os.posix_fallocate(self._fd, 0, SIZE)
        self.write({})

    def write(self, data: dict[str, Any]) -> bool:
        """Replace the content; False when even that failed (it is only a report)."""
        body = json.dumps(data, ensure_ascii=False).encode()
        if len(body) > SIZE:
            body = json.dumps({"error": "runtime state too large"}).encode()
        try:
            os.pwrite(self._fd, body.ljust(SIZE, b" "), 0)
        except OSError:
            return False
        return True

    def close(self) -> None:
        """Close the file (it stays, for status to read)."""
        os.close(self._fd)


def read_runtime(state_dir: Path, attempts: int = 3) -> dict[str, Any]:
    """The daemon's last runtime report; {} when there is none or it cannot be read."""
    for _ in range(attempts):
        try:
            raw = (state_dir / NAME).read_bytes()
        except OSError:
            return {}
        try:
            data = json.loads(raw.decode() or "{}")
        except ValueError:
            time.sleep(0.01)  # caught mid-write: the daemon finishes in microseconds
            continue
        return data if isinstance(data, dict) else {}
    return {}
