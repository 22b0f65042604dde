"""The ``meetch-gate`` command line (CONTRACT §5).

The only place that turns errors into messages and exit codes: 78 for a bad config
(EX_CONFIG), 75 when work is left for later (EX_TEMPFAIL), 74 for a database that cannot be
used (EX_IOERR), 65 for a malformed input file (EX_DATAERR), 69 for a verb not available yet
(EX_UNAVAILABLE), 1 otherwise (and for a failed doctor check).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from agent import __version__
from agent.config import Config, config_path, load_config
from agent.errors import AgentError, ConfigError, DataError, NotAvailableYet, StoreError
from agent.store import STATES, Store
from agent.transfer import FORMATS

EX_OK = 0
EX_FAIL = 1
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_CONFIG = 78

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int) -> None:
    click.echo(f"meetch-gate: {message}", err=True)
    sys.exit(code)


def handle_errors(fn: F) -> F:
    """Map the agent's errors to one line on stderr and the contract's exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            _fail(str(exc), EX_CONFIG)
        except NotAvailableYet as exc:
            _fail(str(exc), EX_UNAVAILABLE)
        except DataError as exc:
            _fail(str(exc), EX_DATAERR)
        except StoreError as exc:
            _fail(str(exc), EX_IOERR)
        except AgentError as exc:
            _fail(str(exc), EX_FAIL)
        return None

    return wrapper  # type: ignore[return-value]


config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Config file [default: $MEETCH_GATE_CONFIG, else /etc/meetch-gate/agent.toml].",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


@contextlib.contextmanager
def _existing_store(config: Config) -> Iterator[Store | None]:
    """The queue if the daemon ever created it (CLI commands never create it), closed after."""
    store = Store.open_existing(config.db_path, device_id=config.agent.device_id)
    try:
        yield store
    finally:
        if store is not None:
            store.close()


def _emit(data: Any, as_json: bool, human: Callable[[Any], None]) -> None:
    """JSON for scripts, else the human rendering."""
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        human(data)


def _config(ctx: click.Context, option: Path | None) -> Config:
    chosen = option or (ctx.obj or {}).get("config")
    return load_config(config_path(chosen))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meetch-gate")
@config_option
@click.pass_context
def main(ctx: click.Context, config_file: Path | None) -> None:
    """Meetch gate agent: ticket scanners -> durable local queue -> Meetch.

    \b
    Examples:
      meetch-gate demo                 # the whole pipeline on simulated hardware
      meetch-gate run --config /etc/meetch-gate/agent.toml
      meetch-gate status --json
    """
    os.umask(0o077)  # the queue, exports and the state directory are the agent user's alone
    ctx.obj = {"config": config_file}


@main.command()
@config_option
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning"]))
@click.pass_context
@handle_errors
def run(ctx: click.Context, config_file: Path | None, log_level: str) -> None:
    """Run the agent in the foreground (systemd runs this).

    SIGTERM or SIGINT: finish in-flight requests and exit 0. SIGHUP: reload the config
    and the API key.

    \b
    Example:
      meetch-gate run --config /etc/meetch-gate/agent.toml
    """
    from agent import logs
    from agent.daemon import Daemon

    config = _config(ctx, config_file)
    logs.configure(level=log_level)
    sys.exit(Daemon(config).run())


@main.command()
@config_option
@json_option
@click.pass_context
@handle_errors
def status(ctx: click.Context, config_file: Path | None, as_json: bool) -> None:
    """Show queue counts, API state, scanners and the daemon's heartbeat.

    Works whether or not the daemon runs: everything is read from the queue database.

    \b
    Example:
      meetch-gate status --json
    """
    from agent.render import print_status
    from agent.status import snapshot

    config = _config(ctx, config_file)
    with _existing_store(config) as store:
        report = snapshot(config, store)
    _emit(report, as_json, print_status)


@main.command()
@click.option(
    "--duration",
    type=click.FloatRange(6, 600),
    default=20.0,
    show_default=True,
    help="Seconds the simulated night lasts.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Not used: the demo writes its own config in a temporary directory.",
)
@handle_errors
def demo(duration: float, config_file: Path | None) -> None:
    """Run the whole pipeline on simulated scanners and a simulated Meetch.

    Two virtual serial scanners (pseudo-terminals) scan tickets, with duplicates,
    garbage frames and uninsured tickets; Meetch goes down in the middle of the night
    and comes back; the real agent code queues everything and drains the backlog.
    Nothing leaves this machine.

    \b
    Example:
      meetch-gate demo --duration 30
    """
    from agent.demo import run_demo

    sys.exit(run_demo(duration))


@main.command()
@config_option
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=1),
    default=120.0,
    show_default=True,
    help="Give up after this many seconds (what is left stays queued).",
)
@click.pass_context
@handle_errors
def flush(ctx: click.Context, config_file: Path | None, timeout_s: float) -> None:
    """Deliver every pending notification now, oldest first.

    Safe while the daemon runs: the two never send the same notification. Exits 0 when
    nothing is left pending, 75 when some could not be sent (and says why).

    \b
    Examples:
      meetch-gate flush
      meetch-gate flush --timeout 600 --config /media/usb/office.toml
    """
    from agent.flush import flush as run_flush
    from agent.render import flush_progress, print_flush

    config = _config(ctx, config_file)
    with flush_progress() as progress:
        result = run_flush(config, timeout_s=timeout_s, progress=progress)
    print_flush(result)
    if result.pending:
        sys.exit(EX_TEMPFAIL)


@main.command()
@config_option
@json_option
@click.pass_context
@handle_errors
def scanners(ctx: click.Context, config_file: Path | None, as_json: bool) -> None:
    """List serial ports and input devices that may be scanners.

    Marks the configured ones and whether the running agent has them open, with hints
    when a port is held by another program or not readable by the agent's user.

    \b
    Example:
      meetch-gate scanners
    """
    from agent.discovery import discover, print_scanners
    from agent.status import daemon_lock_held

    config = _config(ctx, config_file)
    with _existing_store(config) as store:
        rows = discover(config, store, bool(daemon_lock_held(config.agent.state_dir)))
    _emit(rows, as_json, print_scanners)


@main.command()
@config_option
@json_option
@click.pass_context
@handle_errors
def doctor(ctx: click.Context, config_file: Path | None, as_json: bool) -> None:
    """Check config, API key, database, disk, Meetch, scanners and clock.

    One line per check, pass/warn/fail, with what to do for each problem. Exits 1 when
    any check fails.

    \b
    Example:
      meetch-gate doctor
    """
    from agent.doctor import checks_json, print_checks, run_checks

    config = _config(ctx, config_file)
    checks = run_checks(config)
    if as_json:
        click.echo(json.dumps(checks_json(checks), indent=2))
    else:
        print_checks(checks)
    if any(c.status == "fail" for c in checks):
        sys.exit(EX_FAIL)


@main.group()
def queue() -> None:
    """Inspect and move the offline queue (list, export, import, retry, purge).

    \b
    Examples:
      meetch-gate queue list --state pending
      meetch-gate queue export -o /media/usb/box-1.jsonl
      meetch-gate queue import /media/usb/box-1.jsonl
    """


@queue.command("list")
@config_option
@click.option("--state", type=click.Choice(STATES), default=None, help="Only this state.")
@click.option(
    "--limit", type=click.IntRange(min=1), default=50, show_default=True, help="At most N rows."
)
@json_option
@click.pass_context
@handle_errors
def queue_list(
    ctx: click.Context, config_file: Path | None, state: str | None, limit: int, as_json: bool
) -> None:
    """List notifications, newest first, with the last error of each.

    \b
    Examples:
      meetch-gate queue list
      meetch-gate queue list --state rejected --limit 10 --json
    """

    from agent.render import print_notifications

    config = _config(ctx, config_file)
    with _existing_store(config) as store:
        items = store.notifications(state, limit) if store is not None else []
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(n) for n in items], indent=2))
    else:
        print_notifications(items)


@queue.command("export")
@config_option
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="jsonl", show_default=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File to write (0600, atomically) [default: standard output].",
)
@click.pass_context
@handle_errors
def queue_export(
    ctx: click.Context, config_file: Path | None, fmt: str, output: Path | None
) -> None:
    """Write every notification, for carrying on a USB stick to a machine that is online.

    \b
    Examples:
      meetch-gate queue export -o /media/usb/lyon-box-1.jsonl
      meetch-gate queue export --format csv > queue.csv
    """
    from agent.transfer import render, write_export

    config = _config(ctx, config_file)
    with _existing_store(config) as store:
        rows = list(store.export_rows()) if store is not None else []
    write_export(render(rows, fmt), None if output is None or str(output) == "-" else output)
    if output is not None and str(output) != "-":
        pending = sum(1 for r in rows if r["state"] == "pending")
        click.echo(f"exported {len(rows)} notifications ({pending} pending) to {output}", err=True)


@queue.command("import")
@config_option
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
@handle_errors
def queue_import(ctx: click.Context, config_file: Path | None, file: Path) -> None:
    """Merge an export from another box (JSONL or CSV); the same scan ids are not duplicated.

    The whole file is checked first: a malformed line is reported with its number and
    nothing is imported. Importing the same file twice changes nothing. Then run
    `meetch-gate flush` to send what is pending.

    \b
    Example:
      meetch-gate queue import /media/usb/lyon-box-1.jsonl && meetch-gate flush
    """
    from agent.transfer import read_import

    config = _config(ctx, config_file)
    rows = read_import(file)
    store = Store(config.db_path, device_id=config.agent.device_id)
    try:
        added, known = store.import_rows(rows)
    finally:
        store.close()
    pending = sum(1 for r in rows if r["state"] == "pending")
    click.echo(
        f"imported {added} new notifications from {file} ({known} already known); "
        f"{pending} of the file's are pending: run `meetch-gate flush` to send them"
    )


@queue.command("retry")
@config_option
@click.option(
    "--state",
    type=click.Choice(["rejected", "unknown"]),
    default=None,
    help="Every notification in this state.",
)
@click.argument("tickets", nargs=-1)
@click.pass_context
@handle_errors
def queue_retry(
    ctx: click.Context, config_file: Path | None, state: str | None, tickets: tuple[str, ...]
) -> None:
    """Put rejected or unknown notifications back to pending, by state or by ticket.

    \b
    Examples:
      meetch-gate queue retry --state rejected
      meetch-gate queue retry 000123 000124
    """

    if state is None and not tickets:
        raise click.UsageError("give --state rejected|unknown or one or more TICKET numbers")
    config = _config(ctx, config_file)
    with _existing_store(config) as store:
        count = store.retry(state=state, tickets=tickets) if store is not None else 0
    click.echo(f"{count} notifications put back to pending")


@queue.command("purge")
@config_option
@click.option(
    "--delivered-before",
    "age",
    required=True,
    help="Age such as 30d, 12h, 90m, 2w, 1d12h: delivered longer ago than this goes.",
)
@click.pass_context
@handle_errors
def queue_purge(ctx: click.Context, config_file: Path | None, age: str) -> None:
    """Delete old delivered notifications; nothing pending, unknown or rejected is touched.

    \b
    Example:
      meetch-gate queue purge --delivered-before 30d
    """

    try:
        seconds = parse_duration(age)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--delivered-before") from None
    config = _config(ctx, config_file)
    with _existing_store(config) as store:
        count = store.purge_delivered(time.time() - seconds) if store is not None else 0
    click.echo(f"removed {count} delivered notifications older than {age}")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or combinations like ``1d12h``."""
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw])", text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        raise ValueError(f"{text!r} is not a duration such as 30d, 12h, 90m or 1d12h")
    return sum(float(n) * _UNITS[u] for n, u in parts)
