"""Configuration: CONTRACT §2 into frozen dataclasses; every bad value is one clear line."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from agent.config import (
    ApiKey,
    Config,
    MeetchSettings,
    config_path,
    load_api_key,
    load_config,
    parse_config,
)
from agent.errors import ConfigError

FULL = """\
[agent]
device_id = "lyon-amphi-box-1"
state_dir = "/var/lib/meetch-gate"
dedupe_window_s = 5.0
metrics_listen = "127.0.0.1:9464"

[meetch]
base_url = "https://api.meetch.io"
api_key_file = "/etc/meetch-gate/api-key"
organization_id = ""
scan_path = "/v1/items/scan"
cancellations_path = "/v1/cancellations"
timeout_s = 10.0
max_in_flight = 16
cancellations_poll_s = 300
ca_file = ""

[[scanners]]
name = "north-1"
kind = "serial"
port = "/dev/serial/by-id/usb-Honeywell_Imaging___Mobility_1900-if00"
baudrate = 9600
terminator = "\\r"
good_read = "\\u001b7,"
bad_read = ""
"""


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    """Write ``text`` as agent.toml and load it."""
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return load_config(path, env or {})


def test_contract_example_loads(tmp_path: Path) -> None:
    """The example config of CONTRACT §2 is valid and read as written."""
    config = load(tmp_path, FULL)
    assert config.agent.device_id == "lyon-amphi-box-1"
    assert config.db_path == Path("/var/lib/meetch-gate/queue.sqlite3")
    assert config.meetch.max_in_flight == 16
    assert config.meetch.cancellations_poll_s == 300.0
    (scanner,) = config.scanners
    assert scanner.terminator_bytes == b"\r"
    assert scanner.good_read == b"\x1b7,"
    assert scanner.bad_read == b""
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.agent.device_id = "other"  # type: ignore[misc]


def test_empty_config_uses_defaults_and_needs_no_scanners(tmp_path: Path) -> None:
    """An office machine's config may be empty: defaults, host name, no scanners."""
    config = load(tmp_path, "")
    assert config.scanners == ()
    assert config.agent.device_id
    assert config.agent.state_dir == Path("/var/lib/meetch-gate")
    assert config.meetch == MeetchSettings()


def test_state_directory_from_systemd(tmp_path: Path) -> None:
    """$STATE_DIRECTORY (systemd) is the default state directory."""
    config = load(tmp_path, "", env={"STATE_DIRECTORY": "/var/lib/private/meetch-gate"})
    assert config.agent.state_dir == Path("/var/lib/private/meetch-gate")


def test_config_path_order(tmp_path: Path) -> None:
    """--config wins over $MEETCH_GATE_CONFIG, which wins over the default file."""
    env = {"MEETCH_GATE_CONFIG": "/env/agent.toml"}
    assert config_path("/opt/a.toml", env) == Path("/opt/a.toml")
    assert config_path(None, env) == Path("/env/agent.toml")
    assert config_path(None, {}) == Path("/etc/meetch-gate/agent.toml")


@pytest.mark.parametrize(
    ("text", "key", "allowed"),
    [
        ("[agent]\nfoo = 1\n", "agent.foo", "device_id"),
        ("[nope]\n", "nope", "agent, meetch, scanners"),
        ('[agent]\ndedupe_window_s = "5"\n', "agent.dedupe_window_s", "a number"),
        ("[agent]\ndedupe_window_s = -1\n", "agent.dedupe_window_s", ">= 0"),
        ('[agent]\nmetrics_listen = "9464"\n', "agent.metrics_listen", "host:port"),
        ('[meetch]\nbase_url = "ftp://x"\n', "meetch.base_url", "http:// or https://"),
        ('[meetch]\nbase_url = "api.meetch.io"\n', "meetch.base_url", "http:// or https://"),
        ('[meetch]\nscan_path = "v1/scan"\n', "meetch.scan_path", 'starting with "/"'),
        ("[meetch]\ntimeout_s = 0\n", "meetch.timeout_s", "more than 0"),
        ("[meetch]\nmax_in_flight = 0\n", "meetch.max_in_flight", "1 to 256"),
        ("[meetch]\nmax_in_flight = 2.5\n", "meetch.max_in_flight", "a whole number"),
        ("[meetch]\ncancellations_poll_s = 0.5\n", "meetch.cancellations_poll_s", "0 (off)"),
        ('[meetch]\nca_file = "/nonexistent/ca.pem"\n', "meetch.ca_file", "CA bundle"),
        ('[[scanners]]\nport = "/dev/ttyACM0"\n', "scanners[0].name", "is missing"),
        ('[[scanners]]\nname = "a"\n', "scanners[0].port", "usb:VID:PID"),
        ('[[scanners]]\nname = "a"\nport = "COM3"\n', "scanners[0].port", "device path"),
        ('[[scanners]]\nname = "a"\nport = "usb:12:34"\n', "scanners[0].port", "usb:VID:PID"),
        (
            '[[scanners]]\nname = "a"\nport = "/dev/x"\nbaudrate = 9601\n',
            "scanners[0].baudrate",
            "9600",
        ),
        (
            '[[scanners]]\nname = "a"\nport = "/dev/x"\nterminator = ";"\n',
            "scanners[0].terminator",
            '"\\r"',
        ),
        (
            '[[scanners]]\nname = "a"\nport = "/dev/x"\nkind = "hid"\n',
            "scanners[0].kind",
            '"serial" or "wedge"',
        ),
        (
            '[[scanners]]\nname = "a"\nport = "/dev/x"\n'
            '[[scanners]]\nname = "a"\nport = "/dev/y"\n',
            "scanners[1].name",
            "not used by another",
        ),
        (
            '[[scanners]]\nname = "a"\nport = "/dev/x"\ngood_read = "\\u263a"\n',
            "scanners[0].good_read",
            "\\u00ff",
        ),
        ('[[scanners]]\nname = "a"\nport = "/dev/x"\nspeed = 1\n', "scanners[0].speed", "baudrate"),
        ("scanners = 3\n", "scanners", "[[scanners]]"),
    ],
)
def test_bad_values_name_file_key_and_what_is_allowed(
    tmp_path: Path, text: str, key: str, allowed: str
) -> None:
    """Each bad value gives one line with the file, the key and what is allowed."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "agent.toml") in message
    assert key in message
    assert allowed in message


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    """A broken or absent file is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(tmp_path, "[agent\n")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.toml", {})


def test_pyserial_urls_and_usb_ids_are_ports(tmp_path: Path) -> None:
    """Device paths, pyserial URLs and usb:VID:PID[:SERIAL] are all accepted ports."""
    ports = [
        "/dev/ttyACM0",
        "socket://127.0.0.1:7000",
        "rfc2217://10.0.0.5:2217",
        "usb:0c2e:0b61",
        "usb:0C2E:0B61:17338B0123",
    ]
    text = "".join(f'[[scanners]]\nname = "s{i}"\nport = "{p}"\n' for i, p in enumerate(ports))
    assert [s.port for s in load(tmp_path, text).scanners] == ports


def meetch_with_key_file(tmp_path: Path, content: str | None) -> MeetchSettings:
    """MeetchSettings whose api_key_file holds ``content`` (absent when None)."""
    key_file = tmp_path / "api-key"
    if content is not None:
        key_file.write_text(content)
    return MeetchSettings(api_key_file=key_file)


def test_api_key_order(tmp_path: Path) -> None:
    """Environment first, then the systemd credential, then api_key_file."""
    meetch = meetch_with_key_file(tmp_path, "from-file-key\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "meetch-api-key").write_text("from-credential\n")
    env: dict[str, Any] = {"MEETCH_API_KEY": "from-env-key", "CREDENTIALS_DIRECTORY": str(creds)}
    assert load_api_key(meetch, env).value == "from-env-key"
    del env["MEETCH_API_KEY"]
    assert load_api_key(meetch, env).value == "from-credential"
    assert load_api_key(meetch, {}).value == "from-file-key"


def test_missing_or_empty_key_is_a_config_error(tmp_path: Path) -> None:
    """No key anywhere, or an empty key file, is a clear ConfigError."""
    with pytest.raises(ConfigError, match="no API key"):
        load_api_key(meetch_with_key_file(tmp_path, None), {})
    with pytest.raises(ConfigError, match="empty"):
        load_api_key(meetch_with_key_file(tmp_path, "  \n"), {})


def test_key_never_in_repr(tmp_path: Path) -> None:
    """The key's repr and str show where it came from, never the key."""
    key = load_api_key(meetch_with_key_file(tmp_path, "s3cr3t-value\n"), {})
    assert isinstance(key, ApiKey)
    assert "s3cr3t-value" not in repr(key)
    assert "s3cr3t-value" not in str(key)
    assert "s3cr3t-value" not in repr([key])


def test_parse_config_rejects_non_table_sections(tmp_path: Path) -> None:
    """``agent = 3`` is refused with the key named."""
    with pytest.raises(ConfigError, match="agent = 3: expected a table"):
        parse_config({"agent": 3}, tmp_path / "x.toml", {})
