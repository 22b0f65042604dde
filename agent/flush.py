"""``meetch-gate flush``: deliver everything pending now, beside a running daemon or not.

Flush runs the daemon's own :class:`~agent.sender.Sender` under its own lease owner, so the
two never send the same notification at once: each only takes notifications nobody else
holds, and a crashed holder's lease expires.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from agent.config import Config, load_api_key
from agent.meetch import MeetchClient
from agent.sender import Backoff, Sender
from agent.store import Store

POLL_S = 0.2


@dataclass(frozen=True)
class FlushResult:
    """What a flush did: counts before and after, and why anything is left."""

    before: dict[str, int]
    after: dict[str, int]
    reason: str | None
    elapsed_s: float

    @property
    def pending(self) -> int:
        """Notifications still pending."""
        return self.after["pending"]


Progress = Callable[[int, int], None]
"""Called with (finished so far, total to finish) as the flush goes."""


def flush(
    config: Config,
    *,
    timeout_s: float,
    env: Mapping[str, str] = os.environ,
    progress: Progress | None = None,
    now: Callable[[], float] = time.monotonic,
) -> FlushResult:
    """Send every pending notification until none is left or ``timeout_s`` passes."""
    store = Store.open_existing(config.db_path, device_id=config.agent.device_id)
    if store is None:
        empty = {"pending": 0, "delivered": 0, "unknown": 0, "rejected": 0}
        return FlushResult(empty, empty, None, 0.0)
    try:
        return _flush(config, store, timeout_s=timeout_s, env=env, progress=progress, now=now)
    finally:
        store.close()


def _flush(
    config: Config,
    store: Store,
    *,
    timeout_s: float,
    env: Mapping[str, str],
    progress: Progress | None,
    now: Callable[[], float],
) -> FlushResult:
    start = now()
    before = store.queue_counts()
    if not before["pending"]:
        return FlushResult(before, before, None, 0.0)
    key = load_api_key(config.meetch, env)
    client = MeetchClient(config.meetch, key.value)
    sender = Sender(
        store,
        client,
        owner=f"flush:{socket.gethostname()}:{os.getpid()}",
        max_in_flight=config.meetch.max_in_flight,
        backoff=Backoff(config.meetch.retry_initial_s, config.meetch.retry_max_s, random.Random()),
        lease_s=config.meetch.timeout_s * 3,
        api_key=key.value,
        publish_state=False,
    )
    stop = threading.Event()
    thread = threading.Thread(target=sender.run, args=(stop,), name="flush-sender", daemon=True)
    thread.start()
    deadline = start + timeout_s
    try:
        while True:
            counts = store.queue_counts()
            done = sum(counts[s] - before[s] for s in ("delivered", "unknown", "rejected"))
            if progress is not None:
                progress(max(done, 0), max(done, 0) + counts["pending"])
            if not counts["pending"] or sender.api_state == "auth_failed" or now() >= deadline:
                break
            stop.wait(POLL_S)
    finally:
        stop.set()
        sender.stop_waiting()
        thread.join(config.meetch.timeout_s + 5)
        client.close()
    after = store.queue_counts()
    return FlushResult(before, after, _why(sender, after, timeout_s), now() - start)


def _why(sender: Sender, after: dict[str, int], timeout_s: float) -> str | None:
    if not after["pending"]:
        return None
    if sender.api_state == "auth_failed":
        return "Meetch refused the API key (check the key; meetch-gate doctor)"
    if sender.rate_limited_for() > 0:
        return "Meetch asked us to slow down (rate limited); run flush again in a minute"
    if sender.api_state == "offline":
        return "Meetch is unreachable (no uplink?); the queue is safe, try again when online"
    return f"not finished within {timeout_s:g} s; run flush again or give a longer --timeout"
