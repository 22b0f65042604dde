"""Shared fixtures: a config on tmp_path, a store, virtual scanners, a simulated Meetch.

Everything is real: SQLite files, pseudo-terminals, an HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.config import Config, load_config
from agent.sender import Backoff, Notifier, Sender
from agent.store import Store
from hardware_mocks.meetch_sim import SimulatedMeetch
from hardware_mocks.virtual_scanner import VirtualScanner

API_KEY = "test-key-0123456789"
REPO = Path(__file__).resolve().parents[1]


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it is truthy; fail the test with a clear message on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def make_sender(store: Store, client: Notifier, **options: Any) -> Sender:
    """A real Sender with test defaults (seeded small backoff, API_KEY); ``options`` win."""
    settings: dict[str, Any] = {
        "owner": "test",
        "max_in_flight": 2,
        "backoff": Backoff(0.02, 0.2, random.Random(1)),
        "lease_s": 10,
        "api_key": API_KEY,
        **options,
    }
    return Sender(store, client, **settings)


@contextmanager
def sender_running(sender: Sender) -> Iterator[threading.Thread]:
    """Run ``sender`` on its own thread for the with-block; then stop, drain and join it."""
    stop = threading.Event()
    thread = threading.Thread(target=sender.run, args=(stop,), name="test-sender")
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        sender.stop_waiting()
        thread.join(30)
        assert not thread.is_alive(), "sender thread did not stop"


@pytest.fixture
def meetch() -> Iterator[SimulatedMeetch]:
    """A simulated Meetch on 127.0.0.1 accepting API_KEY."""
    with SimulatedMeetch(api_keys=[API_KEY]) as sim:
        yield sim


@pytest.fixture
def scanner_factory(tmp_path: Path) -> Iterator[Callable[[str], VirtualScanner]]:
    """Makes virtual scanners behind stable links in tmp_path/by-id; all closed at the end."""
    made: list[VirtualScanner] = []

    def make(name: str) -> VirtualScanner:
        scanner = VirtualScanner(tmp_path / "by-id" / f"usb-Test_{name}-if00")
        made.append(scanner)
        return scanner

    yield make
    for scanner in made:
        scanner.close()


@dataclass
class ConfigWriter:
    """Writes agent.toml files for tests."""

    root: Path
    base_url: str = "http://127.0.0.1:9"
    scanners: list[dict[str, Any]] = field(default_factory=list)

    def write(
        self,
        *,
        agent: dict[str, Any] | None = None,
        meetch: dict[str, Any] | None = None,
        scanners: list[dict[str, Any]] | None = None,
    ) -> Path:
        """Write a config with test defaults overridden by the given tables."""
        agent_t = {
            "device_id": "test-box",
            "state_dir": str(self.root / "state"),
            "dedupe_window_s": 5.0,
            "metrics_listen": "",
            **(agent or {}),
        }
        meetch_t = {
            "base_url": self.base_url,
            "api_key_file": str(self.root / "api-key"),
            "timeout_s": 2.0,
            "retry_initial_s": 0.05,
            "retry_max_s": 0.5,
            "cancellations_poll_s": 0,
            **(meetch or {}),
        }
        lines = ["[agent]", *_toml_items(agent_t), "", "[meetch]", *_toml_items(meetch_t)]
        for scanner in scanners if scanners is not None else self.scanners:
            lines += ["", "[[scanners]]", *_toml_items(scanner)]
        path = self.root / "agent.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def load(self, **tables: Any) -> Config:
        """Write and load a config."""
        return load_config(self.write(**tables), env={})


def _toml_items(table: dict[str, Any]) -> list[str]:
    return [f"{k} = {json.dumps(v)}" for k, v in table.items()]


@pytest.fixture
def config_writer(tmp_path: Path, meetch: SimulatedMeetch) -> ConfigWriter:
    """A config writer pointed at the simulated Meetch, with the key in a file."""
    (tmp_path / "api-key").write_text(API_KEY + "\n")
    (tmp_path / "api-key").chmod(0o600)
    return ConfigWriter(tmp_path, base_url=meetch.base_url)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A fresh queue database in tmp_path."""
    s = Store(tmp_path / "state" / "queue.sqlite3", device_id="test-box")
    yield s
    s.close()


@dataclass
class AgentProcess:
    """A real ``meetch-gate run`` subprocess."""

    proc: subprocess.Popen[bytes]
    config: Path
    log: Path

    def signal(self, signum: int) -> None:
        """Send a signal to the agent."""
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """kill -9."""
        self.proc.kill()
        self.proc.wait(10)

    def output(self) -> str:
        """Everything the agent logged."""
        return self.log.read_text(errors="replace")


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m agent ARGS`` as a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=REPO,
        check=False,
    )


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Starts ``meetch-gate run`` subprocesses; any still running are killed at the end."""
    started: list[AgentProcess] = []

    def start(config: Path, env: dict[str, str] | None = None) -> AgentProcess:
        log = tmp_path / f"agent-{len(started)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                cwd=REPO,
            )
        agent = AgentProcess(proc, config, log)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait(10)
