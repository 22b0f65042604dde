"""``meetch-gate run``: wires scanners, intake, store, sender and the refund poller.

Signal handlers only set flags; the main loop acts on them. SIGTERM/SIGINT: stop reading,
let in-flight requests finish, exit 0. SIGHUP: reload the config and the API key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import random
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any

import structlog

from agent import __version__, logs
from agent.clock import CachedClockState
from agent.config import Config, ScannerSettings, load_api_key, load_config
from agent.errors import AgentError, StoreError
from agent.intake import Dedupe, Intake
from agent.meetch import MeetchClient
from agent.refunds import RefundPoller
from agent.runtime import RuntimeFile
from agent.salvage import open_or_salvage
from agent.scanners import ScannerReader, make_reader
from agent.sender import Backoff, Sender
from agent.status import HEARTBEAT_S, LOCK_NAME
from agent.store import Store

log = structlog.get_logger("agent.daemon")

TICK_S = 1.0
"""How often the main loop looks at held scans and the runtime report."""


class Daemon:
    """The running agent. ``run()`` blocks until stopped."""

    def __init__(
        self,
        config: Config,
        *,
        env: Mapping[str, str] = os.environ,
        install_signals: bool = True,
        stop: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.env = env
        self.install_signals = install_signals
        self.stop_event = stop or threading.Event()
        self._signals: list[int] = []
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._readers: dict[str, ScannerReader] = {}
        self.store: Store | None = None
        self.sender: Sender | None = None
        self.intake: Intake | None = None
        self._lock_file: IO[bytes] | None = None
        self._threads: list[threading.Thread] = []

    # -- start and stop ---------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (or the stop event); returns the exit code."""
        config = self.config
        key = load_api_key(config.meetch, self.env)  # a missing key is a config error: 78
        logs.redact(key.value)
        self._take_lock(config.agent.state_dir)
        _warn_if_key_file_is_loose(key.source)
        store, _ = open_or_salvage(config.db_path, device_id=config.agent.device_id)
        self.store = store
        self.runtime = RuntimeFile(config.agent.state_dir)
        client = MeetchClient(config.meetch, key.value)
        sender = self.sender = Sender(
            store,
            client,
            owner=f"daemon:{config.agent.device_id}",
            max_in_flight=config.meetch.max_in_flight,
            backoff=Backoff(
                config.meetch.retry_initial_s, config.meetch.retry_max_s, random.Random()
            ),
            lease_s=config.meetch.timeout_s * 3,
            api_key=key.value,
            key_source=lambda: load_api_key(self.config.meetch, self.env).value,
        )
        self.intake = Intake(
            store,
            Dedupe(config.agent.dedupe_window_s),
            on_queued=sender.wake,
            clock_synced=CachedClockState(),
        )
        started_at = _now_rfc3339()
        if config.agent.metrics_listen:
            log.warning(
                "metrics_not_available_yet",
                metrics_listen=config.agent.metrics_listen,
                hint="/metrics and /healthz come in a later version; "
                'set metrics_listen = "" to silence this',
            )
        threads: list[threading.Thread] = []
        sender_stop = threading.Event()
        threads.append(_thread("sender", sender.run, sender_stop))
        if config.meetch.cancellations_poll_s > 0:
            poller = RefundPoller(store, client, config.meetch.cancellations_poll_s)
            threads.append(_thread("refunds", poller.run, self.stop_event))
        if self.install_signals:
            self._install_signals()
        log.info(
            "agent_started",
            version=__version__,
            device_id=config.agent.device_id,
            state_dir=str(config.agent.state_dir),
            scanners=[s.name for s in config.scanners],
            api_key_source=key.source,
        )
        self._beat(started_at, running=True)
        self._threads = threads
        for t in threads:
            t.start()
        self._start_readers(config.scanners)
        _sd_notify("READY=1")
        try:
            self._loop(started_at)
        finally:
            _sd_notify("STOPPING=1")
            log.info("agent_stopping")
            self.stop_event.set()
            self._stop_readers(list(self._readers))
            sender_stop.set()
            sender.stop_waiting()
            for t in threads:
                t.join(config.meetch.timeout_s + 5)
            self._beat(started_at, running=False)
            client.close()
            store.close()
            self.runtime.close()
            self._restore_signals()
            log.info("agent_stopped")
        return 0

    def _loop(self, started_at: str) -> None:
        next_beat = time.monotonic() + HEARTBEAT_S
        reported: dict[str, Any] | None = None
        while not self.stop_event.is_set():
            self._wait(max(0.0, min(TICK_S, next_beat - time.monotonic())))
            while self._signals:
                signum = self._signals.pop(0)
                if signum == signal.SIGHUP:
                    self.reload()
                else:
                    log.info("signal_received", signal=signal.Signals(signum).name)
                    self.stop_event.set()
            assert self.intake is not None
            if self.intake.health.state != "ok":
                self.intake.retry_held()  # the disk may have room again
            health = dataclasses.asdict(self.intake.health)
            if health != reported:
                self.runtime.write({"pid": os.getpid(), "store": health})
                reported = health
            if time.monotonic() >= next_beat:
                self._beat(started_at, running=True)
                if all(t.is_alive() for t in self._threads):
                    _sd_notify("WATCHDOG=1")
                else:  # a dead worker: let systemd's watchdog restart us rather than limp on
                    log.critical("worker_thread_died", threads=[t.name for t in self._threads])
                next_beat = time.monotonic() + HEARTBEAT_S

    def _wait(self, timeout: float) -> None:
        if self._wake_r is None:
            self.stop_event.wait(timeout)
            return
        ready, _, _ = select.select([self._wake_r], [], [], timeout)
        if ready:
            with contextlib.suppress(BlockingIOError):
                self._wake_r.recv(64)

    def stop(self) -> None:
        """Ask the daemon to stop (from another thread)."""
        self.stop_event.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\0")

    # -- signals ----------------------------------------------------------------------

    def _install_signals(self) -> None:
        self._wake_r, wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        wake_w.setblocking(False)
        self._wake_w = wake_w
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Only a flag: the main loop, woken by the wakeup fd, does the work.
        self._signals.append(signum)

    def _restore_signals(self) -> None:
        if self._wake_r is None:
            return
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        self._wake_r.close()
        if self._wake_w is not None:
            self._wake_w.close()
        self._wake_r = self._wake_w = None

    # -- reload -----------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the config file and the API key (SIGHUP). A bad new config is refused."""
        try:
            new = load_config(self.config.path, self.env)
            key = load_api_key(new.meetch, self.env)
        except AgentError as exc:
            log.error("reload_refused", error=str(exc), hint="the running config stays in force")
            return
        logs.redact(key.value)
        old = self.config
        needs_restart = [
            name
            for name in ("device_id", "state_dir")
            if getattr(old.agent, name) != getattr(new.agent, name)
        ]
        if {k: v for k, v in vars(old.meetch).items() if k != "api_key_file"} != {
            k: v for k, v in vars(new.meetch).items() if k != "api_key_file"
        }:
            needs_restart.append("meetch")
        self.config = new
        if self.sender is not None:
            self.sender.set_key(key.value, force=True)
        changed = [s.name for s in new.scanners if s not in old.scanners] + [
            s.name for s in old.scanners if s.name not in {n.name for n in new.scanners}
        ]
        self._stop_readers(sorted(set(changed) & set(self._readers)))
        self._start_readers(tuple(s for s in new.scanners if s.name not in self._readers))
        log.info(
            "config_reloaded",
            api_key_source=key.source,
            scanners_restarted=sorted(set(changed)),
            restart_needed_for=needs_restart,
        )

    # -- scanners ---------------------------------------------------------------------

    def _start_readers(self, scanners: tuple[ScannerSettings, ...]) -> None:
        assert self.intake is not None
        for settings in scanners:
            reader = make_reader(settings, self.intake.handle, self._on_scanner_state)
            self._readers[settings.name] = reader
            reader.start()

    def _stop_readers(self, names: list[str]) -> None:
        readers = [self._readers.pop(n) for n in names if n in self._readers]
        for reader in readers:
            reader.stop()
        for reader in readers:
            reader.join(2.0)

    def _on_scanner_state(
        self, settings: ScannerSettings, connected: bool, error: str | None
    ) -> None:
        if self.store is not None:
            try:
                self.store.set_scanner_state(
                    settings.name, settings.port, connected=connected, error=error
                )
            except StoreError as exc:
                log.warning("scanner_state_not_saved", scanner=settings.name, error=str(exc))

    # -- heartbeat and lock -----------------------------------------------------------

    def _beat(self, started_at: str, *, running: bool) -> None:
        assert self.store is not None
        try:
            self.store.set_meta(
                "daemon",
                {
                    "running": running,
                    "pid": os.getpid(),
                    "version": __version__,
                    "started_at": started_at,
                    "heartbeat_at": _now_rfc3339(),
                    "heartbeat_epoch": time.time(),
                },
            )
        except Exception as exc:
            log.warning("heartbeat_not_saved", error=str(exc))

    def _take_lock(self, state_dir: Path) -> None:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fh = (state_dir / LOCK_NAME).open("ab")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise StoreError(
                f"{state_dir} is in use by another meetch-gate run (systemctl status meetch-gate)"
            ) from None
        self._lock_file = fh


def _warn_if_key_file_is_loose(source: str) -> None:
    """A key file others can read is a leak waiting to happen: say so at every start."""
    path = Path(source)
    if not path.is_absolute():
        return  # from the environment
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return
    if mode & 0o077:
        log.warning(
            "api_key_file_readable_by_others",
            path=source,
            mode=f"{mode:04o}",
            hint=f"chmod 600 {source}",
        )


def _thread(
    name: str, target: Callable[[threading.Event], None], stop: threading.Event
) -> threading.Thread:
    return threading.Thread(target=target, args=(stop,), name=name, daemon=True)


def _now_rfc3339() -> str:
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


def _sd_notify(message: str) -> None:
    """Tell systemd (Type=notify, WatchdogSec) how we are; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.debug("sd_notify_failed", error=str(exc))
