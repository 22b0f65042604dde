"""Configuration: the TOML file of CONTRACT §2 into frozen dataclasses, and the API key.

Every validation failure is one :class:`~agent.errors.ConfigError` line naming the file,
the key and what is allowed.
"""

from __future__ import annotations

import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

from agent.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/meetch-gate/agent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/meetch-gate")
CONFIG_ENV = "MEETCH_GATE_CONFIG"
API_KEY_ENV = "MEETCH_API_KEY"
CREDENTIAL_NAME = "meetch-api-key"
BAUDRATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)
TERMINATORS = ("\r", "\n", "\r\n")
SCANNER_KINDS = ("serial", "wedge")
PORT_FORMS = "a device path, a pyserial URL (socket://, rfc2217://) or usb:VID:PID[:SERIAL]"
_USB_PORT = re.compile(r"usb:[0-9A-Fa-f]{4}:[0-9A-Fa-f]{4}(:.+)?")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class AgentSettings:
    """The ``[agent]`` table."""

    device_id: str
    state_dir: Path
    dedupe_window_s: float = 5.0
    metrics_listen: str = "127.0.0.1:9464"


@dataclass(frozen=True)
class MeetchSettings:
    """The ``[meetch]`` table. ``retry_*`` are this agent's own keys (backoff bounds)."""

    base_url: str = "https://api.meetch.io"
    api_key_file: Path = Path("/etc/meetch-gate/api-key")
    organization_id: str = ""
    scan_path: str = "/v1/items/scan"
    cancellations_path: str = "/v1/cancellations"
    timeout_s: float = 10.0
    max_in_flight: int = 16
    cancellations_poll_s: float = 300.0
    ca_file: str = ""
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0


@dataclass(frozen=True)
class ScannerSettings:
    """One ``[[scanners]]`` entry."""

    name: str
    port: str
    kind: str = "serial"
    baudrate: int = 9600
    terminator: str = "\r"
    good_read: bytes = b""
    bad_read: bytes = b""

    @property
    def terminator_bytes(self) -> bytes:
        """The terminator as it comes off the wire."""
        return self.terminator.encode("ascii")


@dataclass(frozen=True)
class Config:
    """The whole configuration, as read from :attr:`path`."""

    path: Path
    agent: AgentSettings
    meetch: MeetchSettings = field(default_factory=MeetchSettings)
    scanners: tuple[ScannerSettings, ...] = ()

    @property
    def db_path(self) -> Path:
        """The queue database."""
        return self.agent.state_dir / "queue.sqlite3"


def config_path(option: str | os.PathLike[str] | None, env: Mapping[str, str] = os.environ) -> Path:
    """The config file to read: ``--config``, then ``$MEETCH_GATE_CONFIG``, then the default."""
    if option:
        return Path(option)
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    return DEFAULT_CONFIG


def load_config(path: Path, env: Mapping[str, str] = os.environ) -> Config:
    """Read and validate the config file at ``path``."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: config file not found (give --config PATH or set {CONFIG_ENV})"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(raw, path, env)


def parse_config(raw: Mapping[str, Any], path: Path, env: Mapping[str, str] = os.environ) -> Config:
    """Validate an already-parsed TOML document."""
    check = _Checker(path)
    check.only_keys("", raw, {"agent", "meetch", "scanners"})
    agent_raw = check.table("agent", raw.get("agent", {}))
    meetch_raw = check.table("meetch", raw.get("meetch", {}))
    scanners_raw = raw.get("scanners", [])
    if not isinstance(scanners_raw, list):
        check.fail("scanners", scanners_raw, "[[scanners]] tables")
    return Config(
        path=path,
        agent=_agent(check, agent_raw, env),
        meetch=_meetch(check, meetch_raw),
        scanners=_scanners(check, scanners_raw),
    )


def _agent(check: _Checker, t: Mapping[str, Any], env: Mapping[str, str]) -> AgentSettings:
    d = AgentSettings(device_id="", state_dir=DEFAULT_STATE_DIR)
    check.only_keys("agent", t, {"device_id", "state_dir", "dedupe_window_s", "metrics_listen"})
    device_id = check.string("agent.device_id", t.get("device_id", socket.gethostname()))
    if not device_id.strip():
        check.fail("agent.device_id", device_id, "a non-empty name for this box")
    state_default = env.get("STATE_DIRECTORY", "").split(":")[0] or str(DEFAULT_STATE_DIR)
    state_dir = check.string("agent.state_dir", t.get("state_dir", state_default))
    if not state_dir:
        check.fail("agent.state_dir", state_dir, "a directory path")
    window = check.number("agent.dedupe_window_s", t.get("dedupe_window_s", d.dedupe_window_s))
    if window < 0:
        check.fail("agent.dedupe_window_s", window, "seconds >= 0")
    listen = check.string("agent.metrics_listen", t.get("metrics_listen", d.metrics_listen))
    if listen and not re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):\d{1,5}", listen):
        check.fail("agent.metrics_listen", listen, '"host:port" or "" to turn it off')
    return AgentSettings(device_id, Path(state_dir), window, listen)


def _meetch(check: _Checker, t: Mapping[str, Any]) -> MeetchSettings:
    d = MeetchSettings()
    check.only_keys("meetch", t, set(MeetchSettings.__dataclass_fields__))
    base_url = check.string("meetch.base_url", t.get("base_url", d.base_url)).rstrip("/")
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        check.fail("meetch.base_url", base_url, "an http:// or https:// URL")
    paths = {}
    for key in ("scan_path", "cancellations_path"):
        value = check.string(f"meetch.{key}", t.get(key, getattr(d, key)))
        if not value.startswith("/"):
            check.fail(f"meetch.{key}", value, 'a path starting with "/"')
        paths[key] = value
    timeout = check.number("meetch.timeout_s", t.get("timeout_s", d.timeout_s))
    if not 0 < timeout <= 300:
        check.fail("meetch.timeout_s", timeout, "seconds, more than 0 and at most 300")
    in_flight = check.integer("meetch.max_in_flight", t.get("max_in_flight", d.max_in_flight))
    if not 1 <= in_flight <= 256:
        check.fail("meetch.max_in_flight", in_flight, "a whole number from 1 to 256")
    poll = check.number(
        "meetch.cancellations_poll_s", t.get("cancellations_poll_s", d.cancellations_poll_s)
    )
    if poll < 0 or 0 < poll < 1:
        check.fail("meetch.cancellations_poll_s", poll, "0 (off) or seconds >= 1")
    initial = check.number("meetch.retry_initial_s", t.get("retry_initial_s", d.retry_initial_s))
    most = check.number("meetch.retry_max_s", t.get("retry_max_s", d.retry_max_s))
    if not 0 < initial <= most <= 3600:
        check.fail(
            "meetch.retry_initial_s", initial, "0 < retry_initial_s <= retry_max_s <= 3600 seconds"
        )
    ca_file = check.string("meetch.ca_file", t.get("ca_file", d.ca_file))
    if ca_file and not Path(ca_file).is_file():
        check.fail("meetch.ca_file", ca_file, "an existing CA bundle file, or empty")
    return MeetchSettings(
        base_url=base_url,
        api_key_file=Path(check.string("meetch.api_key_file", t.get("api_key_file", "")))
        if t.get("api_key_file")
        else d.api_key_file,
        organization_id=check.string("meetch.organization_id", t.get("organization_id", "")),
        scan_path=paths["scan_path"],
        cancellations_path=paths["cancellations_path"],
        timeout_s=timeout,
        max_in_flight=in_flight,
        cancellations_poll_s=poll,
        ca_file=ca_file,
        retry_initial_s=initial,
        retry_max_s=most,
    )


def _scanners(check: _Checker, items: list[Any]) -> tuple[ScannerSettings, ...]:
    allowed = set(ScannerSettings.__dataclass_fields__)
    seen: set[str] = set()
    scanners = []
    for i, item in enumerate(items):
        where = f"scanners[{i}]"
        t = check.table(where, item)
        check.only_keys(where, t, allowed)
        if "name" not in t:
            check.fail(f"{where}.name", None, 'a unique name such as "north-1"')
        name = check.string(f"{where}.name", t["name"])
        if not _NAME.fullmatch(name):
            check.fail(f"{where}.name", name, "letters, digits, '.', '_' or '-', at most 64")
        if name in seen:
            check.fail(f"{where}.name", name, "a name not used by another scanner")
        seen.add(name)
        kind = check.string(f"{where}.kind", t.get("kind", "serial"))
        if kind not in SCANNER_KINDS:
            check.fail(f"{where}.kind", kind, " or ".join(f'"{k}"' for k in SCANNER_KINDS))
        if "port" not in t:
            check.fail(f"{where}.port", None, PORT_FORMS)
        port = check.string(f"{where}.port", t["port"])
        if not (port.startswith("/") or "://" in port or _USB_PORT.fullmatch(port)):
            check.fail(f"{where}.port", port, PORT_FORMS)
        baud = check.integer(f"{where}.baudrate", t.get("baudrate", 9600))
        if baud not in BAUDRATES:
            check.fail(f"{where}.baudrate", baud, "one of " + ", ".join(map(str, BAUDRATES)))
        term = check.string(f"{where}.terminator", t.get("terminator", "\r"))
        if term not in TERMINATORS:
            check.fail(f"{where}.terminator", term, '"\\r", "\\n" or "\\r\\n"')
        good = _feedback_bytes(check, f"{where}.good_read", t.get("good_read", ""))
        bad = _feedback_bytes(check, f"{where}.bad_read", t.get("bad_read", ""))
        scanners.append(ScannerSettings(name, port, kind, baud, term, good, bad))
    return tuple(scanners)


def _feedback_bytes(check: _Checker, key: str, value: Any) -> bytes:
    text = check.string(key, value)
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        check.fail(key, text, "bytes written as characters \\u0000 to \\u00ff")


T = TypeVar("T")


class _Checker:
    """Type checks that fail with one line naming file, key and what is allowed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, value: Any, allowed: str) -> NoReturn:
        shown = "is missing" if value is None else f"= {value!r}"
        raise ConfigError(f"{self.path}: {key} {shown}: expected {allowed}")

    def only_keys(self, where: str, t: Mapping[str, Any], allowed: set[str]) -> None:
        for key in t:
            if key not in allowed:
                name = f"{where}.{key}" if where else key
                known = ", ".join(sorted(allowed))
                raise ConfigError(
                    f"{self.path}: {name} is not a known key: expected one of {known}"
                )

    def table(self, key: str, value: Any) -> Mapping[str, Any]:
        return self._typed(key, value, dict, "a table", lambda v: True)

    def string(self, key: str, value: Any) -> str:
        return self._typed(key, value, str, "a string", lambda v: True)

    def integer(self, key: str, value: Any) -> int:
        return self._typed(key, value, int, "a whole number", lambda v: not isinstance(v, bool))

    def number(self, key: str, value: Any) -> float:
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return self._typed(key, value, float, "a number", math.isfinite)

    def _typed(self, key: str, value: Any, kind: type[T], what: str, ok: Callable[[T], bool]) -> T:
        if not isinstance(value, kind) or not ok(value):
            self.fail(key, value, what)
        return value


@dataclass(frozen=True)
class ApiKey:
    """The API key and where it came from (never the key itself in any message)."""

    value: str
    source: str

    def __repr__(self) -> str:
        return f"ApiKey(source={self.source!r})"

    __str__ = __repr__


def load_api_key(meetch: MeetchSettings, env: Mapping[str, str] = os.environ) -> ApiKey:
    """The API key: ``$MEETCH_API_KEY``, then the systemd credential, then ``api_key_file``."""
    if env.get(API_KEY_ENV, "").strip():
        return ApiKey(env[API_KEY_ENV].strip(), f"environment {API_KEY_ENV}")
    candidates = []
    if env.get("CREDENTIALS_DIRECTORY"):
        candidates.append(Path(env["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME)
    candidates.append(meetch.api_key_file)
    for path in candidates:
        try:
            value = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.__class__.__name__
            raise ConfigError(f"{path}: cannot read the API key: {reason}") from None
        if not value:
            raise ConfigError(f"{path}: the API key file is empty")
        return ApiKey(value, str(path))
    raise ConfigError(
        f"no API key: set {API_KEY_ENV}, a systemd credential {CREDENTIAL_NAME}, "
        f"or meetch.api_key_file (looked in {', '.join(map(str, candidates))})"
    )
