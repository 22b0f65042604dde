"""The systemd unit and examples shipped in systemd/ say what the README promises."""

from __future__ import annotations

import configparser
import tomllib

from agent.config import parse_config
from tests.conftest import REPO


def unit() -> configparser.ConfigParser:
    """systemd/meetch-gate.service parsed (repeated keys kept as the last value)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(REPO / "systemd" / "meetch-gate.service")
    return parser


def test_unit_runs_the_agent_hardened() -> None:
    """The unit runs `meetch-gate run` as its own user, notify + watchdog, sandboxed."""
    service = unit()["Service"]
    assert "meetch-gate run" in service["ExecStart"]
    assert service["Type"] == "notify"
    assert service["Restart"] == "always"
    assert service["StateDirectory"] == "meetch-gate"
    assert service["StateDirectoryMode"] == "0700"
    assert service["User"] == "meetch-gate"
    assert service["LoadCredential"].startswith("meetch-api-key:")
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "DevicePolicy": "closed",
        "CapabilityBoundingSet": "",
    }.items():
        assert service[key] == value, key
    assert "kill -HUP" in service["ExecReload"]


def test_example_config_is_valid() -> None:
    """systemd/agent.toml.example passes the agent's own validation."""
    path = REPO / "systemd" / "agent.toml.example"
    config = parse_config(tomllib.loads(path.read_text()), path, {})
    assert [s.name for s in config.scanners] == ["north-1", "south-1"]
