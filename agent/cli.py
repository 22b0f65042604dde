"""The ``meetch-gate`` command line (CONTRACT §5).

The only place that turns errors into messages and exit codes: 78 for a bad config
(EX_CONFIG), 75 when work is left for later (EX_TEMPFAIL), 74 for a database that cannot be
used (EX_IOERR), 69 for a verb not available yet (EX_UNAVAILABLE), 1 otherwise.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from agent import __version__
from agent.config import Config, config_path, load_config
from agent.errors import AgentError, ConfigError, NotAvailableYet, StoreError

EX_OK = 0
EX_FAIL = 1
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
    from agent.status import snapshot
    from agent.store import Store

    config = _config(ctx, config_file)
    store = Store.open_existing(config.db_path, device_id=config.agent.device_id)
    try:
        report = snapshot(config, store)
    finally:
        if store is not None:
            store.close()
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        from agent.render import print_status

        print_status(report)


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


def _not_yet(verb: str) -> Callable[..., None]:
    def command(**_: Any) -> None:
        raise NotAvailableYet(f"'meetch-gate {verb}' is not available yet in this version")

    return command


for _verb, _help in (
    ("flush", "Deliver everything pending now (not available yet)."),
    ("scanners", "List serial ports and input devices (not available yet)."),
    ("doctor", "Check config, key, database, API and scanners (not available yet)."),
):
    main.command(
        _verb,
        help=_help,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )(config_option(handle_errors(_not_yet(_verb))))


@main.group()
def queue() -> None:
    """Inspect and move the offline queue (not available yet)."""


for _verb in ("list", "export", "import", "retry", "purge"):
    queue.command(
        _verb,
        help=f"queue {_verb} (not available yet).",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )(config_option(handle_errors(_not_yet(f"queue {_verb}"))))
