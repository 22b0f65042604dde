"""``queue list/export/import/retry/purge`` and ``flush``, driven as a technician would.

Real SQLite files, the real simulated Meetch on loopback, the CLI as real subprocesses.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.config import Config
from agent.store import Store
from hardware_mocks.meetch_sim import SimulatedMeetch
from tests.conftest import API_KEY, AgentProcess, ConfigWriter, cli, wait_until

AT = "2026-02-20T19:42:07.120+01:00"


def box(config_writer: ConfigWriter, name: str = "box") -> tuple[Path, Config]:
    """A config whose state directory is tmp_path/<name>."""
    path = config_writer.write(
        agent={"state_dir": str(config_writer.root / name), "device_id": name}
    )
    moved = config_writer.root / f"{name}.toml"
    path.rename(moved)
    from agent.config import load_config

    return moved, load_config(moved, {})


def fill(config: Config, *tickets: str) -> Store:
    """Record a valid scan of each ticket in the box's queue; returns the open store."""
    store = Store(config.db_path, device_id=config.agent.device_id)
    for ticket in tickets:
        store.record_scan("north-1", ticket, "valid", AT)
    return store


def settle(store: Store, ticket: str, state: str, status: int) -> None:
    """Give one pending ticket a final state, as a sender would."""
    (item,) = [n for n in store.claim("test", 100, 60) if n.ticket == ticket]
    for other in store.claim("test", 100, 60):
        store.release(other.scan_id, "test")
    store.finish(
        item.scan_id,
        "test",
        state,
        http_status=status,
        delivered_at=AT if state == "delivered" else None,
    )
    for n in store.notifications(state="pending"):
        store.release(n.scan_id, "test")


def test_list_newest_first_with_filters(config_writer: ConfigWriter) -> None:
    """queue list --json: newest first, the contract's fields, --state and --limit."""
    path, config = box(config_writer)
    store = fill(config, "T1", "T2", "T3")
    settle(store, "T1", "rejected", 422)
    store.close()
    rows = json.loads(cli("queue", "list", "--json", "--config", str(path)).stdout)
    assert [r["ticket"] for r in rows] == ["T3", "T2", "T1"]
    assert {"scan_id", "ticket", "state", "scanner", "scanned_at", "attempts", "last_error"} <= set(
        rows[0]
    )
    rejected = json.loads(
        cli("queue", "list", "--state", "rejected", "--json", "--config", str(path)).stdout
    )
    assert [r["ticket"] for r in rejected] == ["T1"]
    assert rejected[0]["attempts"] == 1
    limited = json.loads(
        cli("queue", "list", "--limit", "1", "--json", "--config", str(path)).stdout
    )
    assert [r["ticket"] for r in limited] == ["T3"]
    human = cli("queue", "list", "--config", str(path)).stdout
    assert "T2" in human
    assert "rejected" in human


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_export_import_round_trip_without_duplicates(config_writer: ConfigWriter, fmt: str) -> None:
    """An export imported elsewhere gives the same notifications; a second import adds none."""
    box_path, box_config = box(config_writer, "box")
    office_path, office_config = box(config_writer, "office")
    store = fill(box_config, "T1", "T2", "T3")
    settle(store, "T2", "delivered", 201)
    store.close()
    stick = config_writer.root / f"stick.{fmt}"
    result = cli("queue", "export", "--format", fmt, "-o", str(stick), "--config", str(box_path))
    assert result.returncode == 0, result.stderr
    assert "exported 3 notifications (2 pending)" in result.stderr
    assert stat.S_IMODE(stick.stat().st_mode) == 0o600
    assert not [p for p in stick.parent.iterdir() if p.name.endswith(".part")]

    first = cli("queue", "import", str(stick), "--config", str(office_path))
    assert first.returncode == 0, first.stderr
    assert "imported 3 new notifications" in first.stdout
    again = cli("queue", "import", str(stick), "--config", str(office_path))
    assert "imported 0 new notifications" in again.stdout
    assert "3 already known" in again.stdout

    box_store = Store(box_config.db_path, device_id="box")
    office = Store(office_config.db_path, device_id="office")
    try:
        assert list(office.export_rows()) == list(box_store.export_rows())
        assert office.queue_counts() == {"pending": 2, "delivered": 1, "unknown": 0, "rejected": 0}
    finally:
        box_store.close()
        office.close()


def test_export_to_stdout_in_csv(config_writer: ConfigWriter) -> None:
    """export without -o writes to standard output; CSV has a header and one row each."""
    path, config = box(config_writer)
    fill(config, "T1", "T2").close()
    result = cli("queue", "export", "--format", "csv", "--config", str(path))
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["ticket"] for r in rows] == ["T1", "T2"]
    assert rows[0]["state"] == "pending"


def test_import_skips_a_ticket_known_under_another_scan_id(config_writer: ConfigWriter) -> None:
    """A ticket this machine already has under its own scan id is not added a second time."""
    box_path, box_config = box(config_writer, "box")
    office_path, office_config = box(config_writer, "office")
    fill(box_config, "T1", "T2").close()
    fill(office_config, "T1").close()
    stick = config_writer.root / "stick.jsonl"
    cli("queue", "export", "-o", str(stick), "--config", str(box_path))
    result = cli("queue", "import", str(stick), "--config", str(office_path))
    assert "imported 1 new notifications" in result.stdout
    office = Store(office_config.db_path, device_id="office")
    try:
        assert sorted(n.ticket for n in office.notifications()) == ["T1", "T2"]
    finally:
        office.close()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        ('{"scan_id": "a"}\n', "line 1: missing"),
        ("not json at all\n", "not a queue export"),
        ("{good}\n", "line 1: not valid JSON"),
        ("scan_id,ticket\nx,y\n", "CSV header lacks"),
    ],
)
def test_bad_import_files_are_rejected_cleanly(
    config_writer: ConfigWriter, content: str, message: str
) -> None:
    """A malformed file exits 65 with the line and the problem, and imports nothing."""
    path, config = box(config_writer)
    bad = config_writer.root / "bad.jsonl"
    bad.write_text(content)
    result = cli("queue", "import", str(bad), "--config", str(path))
    assert result.returncode == 65
    assert message in result.stderr
    assert not config.db_path.exists()


def test_one_bad_line_means_nothing_is_imported(config_writer: ConfigWriter) -> None:
    """A bad line 3 among good ones is reported by number and nothing at all is imported."""
    box_path, box_config = box(config_writer, "box")
    office_path, office_config = box(config_writer, "office")
    fill(box_config, "T1", "T2", "T3").close()
    fill(office_config).close()
    stick = config_writer.root / "stick.jsonl"
    cli("queue", "export", "-o", str(stick), "--config", str(box_path))
    lines = stick.read_text().splitlines()
    broken = json.loads(lines[2])
    broken["state"] = "sent"
    stick.write_text("\n".join([*lines[:2], json.dumps(broken)]) + "\n")
    result = cli("queue", "import", str(stick), "--config", str(office_path))
    assert result.returncode == 65
    assert "line 3" in result.stderr
    assert "'sent'" in result.stderr
    office = Store(office_config.db_path, device_id="office")
    try:
        assert office.notifications() == []
    finally:
        office.close()


def test_retry_by_state_and_by_ticket(config_writer: ConfigWriter) -> None:
    """retry puts rejected/unknown back to pending, by state or by ticket, nothing else."""
    path, config = box(config_writer)
    store = fill(config, "R1", "R2", "U1", "D1")
    settle(store, "R1", "rejected", 422)
    settle(store, "R2", "rejected", 422)
    settle(store, "U1", "unknown", 404)
    settle(store, "D1", "delivered", 201)
    result = cli("queue", "retry", "U1", "D1", "--config", str(path))
    assert "1 notifications put back to pending" in result.stdout
    result = cli("queue", "retry", "--state", "rejected", "--config", str(path))
    assert "2 notifications put back to pending" in result.stdout
    assert store.queue_counts() == {"pending": 3, "delivered": 1, "unknown": 0, "rejected": 0}
    store.close()
    usage = cli("queue", "retry", "--config", str(path))
    assert usage.returncode == 2
    assert "--state" in usage.stderr


def test_purge_touches_only_old_delivered_rows(config_writer: ConfigWriter) -> None:
    """purge removes delivered rows older than the age and never any other state."""
    path, config = box(config_writer)
    store = fill(config, "OLD", "NEW", "P", "R", "U")
    for ticket, state, status in (
        ("OLD", "delivered", 201),
        ("NEW", "delivered", 201),
        ("R", "rejected", 422),
        ("U", "unknown", 404),
    ):
        settle(store, ticket, state, status)
    month_ago = time.time() - 31 * 86400
    for ticket in ("OLD", "R", "U", "P"):
        store.db.execute(
            "UPDATE notifications SET updated_at = ? WHERE ticket = ?", (month_ago, ticket)
        )
    result = cli("queue", "purge", "--delivered-before", "30d", "--config", str(path))
    assert result.returncode == 0
    assert "removed 1 delivered" in result.stdout
    assert sorted(n.ticket for n in store.notifications()) == ["NEW", "P", "R", "U"]
    store.close()
    bad = cli("queue", "purge", "--delivered-before", "soon", "--config", str(path))
    assert bad.returncode == 2
    assert "not a duration" in bad.stderr


def test_flush_with_nothing_pending_exits_zero(config_writer: ConfigWriter) -> None:
    """flush on an empty or absent queue says so and exits 0."""
    path, _ = box(config_writer)
    result = cli("flush", "--config", str(path))
    assert result.returncode == 0
    assert "0 still pending" in result.stdout


def test_flush_delivers_everything(config_writer: ConfigWriter, meetch: SimulatedMeetch) -> None:
    """flush sends every pending notification, oldest first, and exits 0 with a summary."""
    meetch.unknown_tickets.add("T5")
    path, config = box(config_writer)
    fill(config, *(f"T{i}" for i in range(1, 11))).close()
    result = cli("flush", "--config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "9 delivered, 1 unknown, 0 rejected; 0 still pending" in result.stdout
    assert len(meetch.flagged) == 9


def test_flush_offline_exits_75_and_says_why(
    config_writer: ConfigWriter, meetch: SimulatedMeetch
) -> None:
    """With Meetch unreachable flush keeps everything queued, exits 75 and says why."""
    meetch.go_offline()
    path, config = box(config_writer)
    fill(config, "T1", "T2", "T3", "T4").close()
    result = cli("flush", "--timeout", "3", "--config", str(path))
    assert result.returncode == 75
    assert "4 still pending" in result.stdout
    assert "unreachable" in result.stdout


def test_flush_key_refused_exits_75(config_writer: ConfigWriter, meetch: SimulatedMeetch) -> None:
    """A refused key stops the flush at once: 75, the reason, nothing lost, key not shown."""
    meetch.set_api_keys(["another-key"])
    path, config = box(config_writer)
    fill(config, "T1", "T2").close()
    result = cli("flush", "--timeout", "30", "--config", str(path))
    assert result.returncode == 75
    assert "refused the API key" in result.stdout
    assert API_KEY not in result.stdout + result.stderr


def test_flush_rate_limited_exits_75(config_writer: ConfigWriter, meetch: SimulatedMeetch) -> None:
    """A 429 with a long Retry-After is honoured: flush gives up at its timeout saying why."""
    meetch.rate_limit(50, 60)
    path, config = box(config_writer)
    fill(config, "T1").close()
    result = cli("flush", "--timeout", "2", "--config", str(path))
    assert result.returncode == 75
    assert "rate limited" in result.stdout
    assert len(meetch.scan_requests) == 1


def test_usb_stick_night_end_to_end(config_writer: ConfigWriter, meetch: SimulatedMeetch) -> None:
    """Box never online: export, import in the office, flush; the box's later sends are harmless."""
    box_path, box_config = box(config_writer, "box")
    office_path, _ = box(config_writer, "office")
    fill(box_config, "N1", "N2", "N3").close()
    stick = config_writer.root / "stick.jsonl"
    assert cli("queue", "export", "-o", str(stick), "--config", str(box_path)).returncode == 0
    assert cli("queue", "import", str(stick), "--config", str(office_path)).returncode == 0
    assert cli("flush", "--config", str(office_path)).returncode == 0
    assert sorted(meetch.flagged) == ["N1", "N2", "N3"]
    # The box comes online later and sends the same scan ids: Meetch sees nothing new.
    assert cli("flush", "--config", str(box_path)).returncode == 0
    for ticket in ("N1", "N2", "N3"):
        assert len(meetch.scan_ids_for(ticket)) == 1
    assert len(meetch.scan_requests) == 6


def test_key_never_appears_in_any_output(
    config_writer: ConfigWriter, meetch: SimulatedMeetch
) -> None:
    """No command prints the API key, whatever it reports."""
    path, config = box(config_writer)
    store = fill(config, "T1")
    store.close()
    meetch.fail_next(5, status=500, body=f"echo Authorization: Bearer {API_KEY}".encode())
    outputs = []
    for args in (
        ["flush", "--timeout", "2"],
        ["status"],
        ["status", "--json"],
        ["queue", "list", "--json"],
        ["queue", "export"],
        ["doctor"],
    ):
        result = cli(*args, "--config", str(path))
        outputs.append(result.stdout + result.stderr)
    assert all(API_KEY not in out for out in outputs)
    assert any("T1" in out for out in outputs)


def test_export_file_is_private_even_with_a_loose_umask(config_writer: ConfigWriter) -> None:
    """The export file is 0600 whatever umask the technician's shell has."""
    path, config = box(config_writer)
    fill(config, "T1").close()
    out = config_writer.root / "loose.jsonl"
    old = os.umask(0)
    try:
        cli("queue", "export", "-o", str(out), "--config", str(path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_flush_beside_a_running_daemon_never_double_sends(
    config_writer: ConfigWriter,
    meetch: SimulatedMeetch,
    start_agent: Callable[..., AgentProcess],
) -> None:
    """Daemon and flush draining the same backlog: every notification is sent exactly once."""
    path, config = box(config_writer)
    tickets = [f"C{i:03d}" for i in range(60)]
    fill(config, *tickets).close()
    meetch.latency_s = 0.05  # long enough for both senders to be at work together
    meetch.go_offline()
    agent = start_agent(path)
    wait_until(
        lambda: json.loads(cli("status", "--json", "--config", str(path)).stdout)["daemon"][
            "running"
        ],
        15,
    )
    meetch.go_online()
    result = cli("flush", "--config", str(path), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(meetch.flagged) == tickets
    posts = Counter(r.json["scan_id"] for r in meetch.scan_requests if r.status)
    assert set(posts.values()) == {1}
    assert agent.stop() == 0
