"""What ``meetch-gate status`` reports (CONTRACT §5), read from the database alone.

The daemon writes its heartbeat, API state and each scanner's connection into the queue
database, so the status works whether or not the daemon runs.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.config import Config
from agent.runtime import read_runtime
from agent.store import OUTCOMES, STATES, Store

HEARTBEAT_S = 5.0
ALARM_DAYS = 7
ALARMS_KEY = "alarms"
LOCK_NAME = "daemon.lock"


def daemon_lock_held(state_dir: Path) -> bool | None:
    """True when a daemon holds the state directory's lock; None when that cannot be told."""
    path = state_dir / LOCK_NAME
    try:
        with path.open("rb") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
            return False
    except FileNotFoundError:
        return False
    except OSError:
        return None


def snapshot(
    config: Config, store: Store | None, wall: Callable[[], float] = time.time
) -> dict[str, Any]:
    """The ``status --json`` document; ``store`` is None when no database exists yet."""
    now = wall()
    held = daemon_lock_held(config.agent.state_dir)
    if store is None:
        return {
            "device_id": config.agent.device_id,
            "queue": {**dict.fromkeys(STATES, 0), "oldest_pending_age_s": None},
            "scans": dict.fromkeys(OUTCOMES, 0),
            "api_state": "unknown",
            "last_delivery_at": None,
            "scanners": [
                {"name": s.name, "connected": False, "last_scan_at": None, "port": s.port}
                for s in config.scanners
            ],
            "daemon": {"running": bool(held), "pid": None, "heartbeat_at": None},
            "store": store_health(config, running=False),
            "alarms": [],
            "database": str(config.db_path),
        }
    daemon = store.get_meta("daemon") or {}
    beat = daemon.get("heartbeat_epoch")
    fresh = beat is not None and now - beat < 3 * HEARTBEAT_S
    running = held if held is not None else fresh
    running = bool(running) and bool(daemon.get("running", False))
    oldest = store.oldest_pending()
    states = store.scanner_states()
    scanners = []
    for s in config.scanners:
        row = states.get(s.name, {})
        scanners.append(
            {
                "name": s.name,
                "connected": bool(row.get("connected")) and running,
                "last_scan_at": row.get("last_scan_at"),
                "port": s.port,
                "last_error": row.get("last_error"),
            }
        )
    return {
        "device_id": config.agent.device_id,
        "queue": {
            **store.queue_counts(),
            "oldest_pending_age_s": round(max(0.0, now - oldest[1]), 1) if oldest else None,
        },
        "scans": store.scan_counts(),
        "api_state": (store.get_meta("api_state") or "unknown") if running else "unknown",
        "last_delivery_at": store.get_meta("last_delivery_at"),
        "scanners": scanners,
        "daemon": {
            "running": running,
            "pid": daemon.get("pid") if running else None,
            "heartbeat_at": daemon.get("heartbeat_at"),
            "started_at": daemon.get("started_at") if running else None,
        },
        "store": store_health(config, running=running),
        "alarms": recent_alarms(store, now),
        "database": str(config.db_path),
    }


def store_health(config: Config, *, running: bool) -> dict[str, Any]:
    """Is the daemon committing scans? From its runtime file, which a full disk can't stop."""
    health = read_runtime(config.agent.state_dir).get("store") if running else None
    if not isinstance(health, dict):
        return {"state": "ok", "held": 0, "dropped": 0}
    return health


def recent_alarms(store: Store, now: float) -> list[dict[str, Any]]:
    """Alarms of the last ALARM_DAYS days (a salvaged database, for instance)."""
    recent = []
    for alarm in store.get_meta(ALARMS_KEY) or []:
        try:
            at = datetime.fromisoformat(alarm["at"]).timestamp()
        except (KeyError, TypeError, ValueError):
            continue
        if now - at < ALARM_DAYS * 86400:
            recent.append(alarm)
    return recent
