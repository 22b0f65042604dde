"""The command line as CONTRACT §5 names it: help, exit codes, status without a daemon."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from agent import __version__
from agent.cli import main
from tests.conftest import REPO, ConfigWriter, cli

COMMANDS = ["run", "status", "flush", "scanners", "doctor", "demo"]
QUEUE_VERBS = ["list", "export", "import", "retry", "purge"]


def all_commands() -> list[list[str]]:
    """Every command path of the CLI."""
    queue = main.commands["queue"]
    assert isinstance(queue, click.Group)
    return [[c] for c in main.commands if c != "queue"] + [["queue", v] for v in queue.commands]


def test_every_contract_verb_exists() -> None:
    """Every verb of CONTRACT §5 is a command."""
    assert [c for c in COMMANDS if c not in main.commands] == []
    queue = main.commands["queue"]
    assert isinstance(queue, click.Group)
    assert sorted(queue.commands) == sorted(QUEUE_VERBS)


@pytest.mark.parametrize("path", all_commands(), ids=" ".join)
def test_every_command_has_help_and_accepts_config(path: list[str]) -> None:
    """Each command answers --help with an example of itself and takes --config."""
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0
    assert "--config" in result.output
    assert "Example" in result.output
    assert f"meetch-gate {' '.join(path)}" in result.output


def test_version() -> None:
    """--version prints the version."""
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_status_json_without_database(config_writer: ConfigWriter) -> None:
    """status --json has the contract's shape before the daemon ever ran, and creates nothing."""
    path = config_writer.write(scanners=[{"name": "north-1", "port": "/dev/ttyACM0"}])
    result = cli("status", "--json", "--config", str(path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["device_id"] == "test-box"
    assert report["queue"] == {
        "pending": 0,
        "delivered": 0,
        "unknown": 0,
        "rejected": 0,
        "oldest_pending_age_s": None,
    }
    assert report["scans"] == {"valid": 0, "duplicate": 0, "invalid": 0, "refunded": 0}
    assert report["api_state"] == "unknown"
    assert report["last_delivery_at"] is None
    assert report["scanners"][0]["name"] == "north-1"
    assert report["scanners"][0]["connected"] is False
    assert report["daemon"]["running"] is False
    assert not (config_writer.root / "state").exists()


def test_status_human_output(config_writer: ConfigWriter) -> None:
    """Plain status prints the device, the queue and each scanner for a person."""
    path = config_writer.write(scanners=[{"name": "north-1", "port": "/dev/ttyACM0"}])
    result = cli("status", "--config", str(path))
    assert result.returncode == 0, result.stderr
    for text in ("test-box", "NOT running", "0 pending", "north-1"):
        assert text in result.stdout


def test_config_from_environment_and_78(tmp_path: Path) -> None:
    """$MEETCH_GATE_CONFIG is used when --config is not given; a bad file exits 78."""
    bad = tmp_path / "agent.toml"
    bad.write_text("[agent]\ndedupe_window_s = 'soon'\n")
    result = cli("status", env={"MEETCH_GATE_CONFIG": str(bad)})
    assert result.returncode == 78
    assert str(bad) in result.stderr
    assert "agent.dedupe_window_s" in result.stderr


def test_readme_mentions_every_command() -> None:
    """The README documents every command."""
    readme = (REPO / "README.md").read_text()
    for path in all_commands():
        assert f"meetch-gate {' '.join(path)}" in readme, path
