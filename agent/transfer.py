"""``queue export`` and ``queue import``: carrying notifications on a USB stick.

An export is every notification, one per JSON line (``jsonl``) or CSV row with a header,
fields :data:`agent.store.EXPORT_FIELDS`. It is written atomically and private (0600). An
import is validated whole before anything is written, so a malformed file changes nothing,
and merged by scan id: importing the same file twice adds nothing the second time.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.barcode import parse_frame
from agent.errors import DataError
from agent.store import EXPORT_FIELDS, STATES

FORMATS = ("jsonl", "csv")
_SCAN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_NULLABLE = ("last_error", "http_status", "delivered_at", "clock_synced")


def render(rows: Iterable[dict[str, Any]], fmt: str) -> str:
    """The export text of ``rows`` in ``fmt`` (``jsonl`` or ``csv``)."""
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=EXPORT_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in EXPORT_FIELDS})
    return buffer.getvalue()


def write_export(text: str, out: Path | None) -> None:
    """Write to ``out`` atomically with mode 0600 (a half-written stick file never
    exists), or to standard output when ``out`` is None."""
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    directory = out.parent if str(out.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # A USB stick pulled right after the command must still hold the file.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_import(path: Path) -> list[dict[str, Any]]:
    """Read and validate an export file; raises DataError naming the line of any problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file (is it a queue export?)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    stripped = text.lstrip("\ufeff \t\r\n")
    if not stripped:
        raise DataError(f"{path}: the file is empty")
    raw = _jsonl(path, text) if stripped.startswith("{") else _csv(path, text)
    rows: list[dict[str, Any]] = []
    seen_ids: dict[str, int] = {}
    seen_tickets: dict[str, tuple[str, int]] = {}
    for line, item in raw:
        row = _validate(path, line, item)
        if row["scan_id"] in seen_ids:
            continue  # the same notification twice in one file: once is enough
        earlier = seen_tickets.get(row["ticket"])
        if earlier is not None:
            raise DataError(
                f"{path} line {line}: ticket {row['ticket']!r} is already on line {earlier[1]} "
                "under another scan id"
            )
        seen_ids[row["scan_id"]] = line
        seen_tickets[row["ticket"]] = (row["scan_id"], line)
        rows.append(row)
    return rows


def _jsonl(path: Path, text: str) -> list[tuple[int, Any]]:
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
    return items


def _csv(path: Path, text: str) -> list[tuple[int, Any]]:
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    header = reader.fieldnames or []
    missing = [f for f in EXPORT_FIELDS if f not in header]
    if missing:
        raise DataError(
            f"{path} line 1: not a queue export (CSV header lacks {', '.join(missing)})"
        )
    items = []
    try:
        for row in reader:
            if None in row:
                raise DataError(f"{path} line {reader.line_num}: more fields than the header")
            items.append((reader.line_num, {k: (v if v != "" else None) for k, v in row.items()}))
    except csv.Error as exc:
        raise DataError(f"{path} line {reader.line_num}: {exc}") from None
    return items


def _validate(path: Path, line: int, item: Any) -> dict[str, Any]:
    return validate_row(item, f"{path} line {line}")


def validate_row(item: Any, where: str = "row") -> dict[str, Any]:
    """One notification in export form, checked and normalised; DataError says why not."""
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object with {', '.join(EXPORT_FIELDS)}")
    missing = [f for f in EXPORT_FIELDS if f not in item and f not in _NULLABLE]
    if missing:
        raise DataError(f"{where}: missing {', '.join(missing)}")
    row = {f: item.get(f) for f in EXPORT_FIELDS}
    scan_id = row["scan_id"]
    if not isinstance(scan_id, str) or not _SCAN_ID.fullmatch(scan_id):
        raise DataError(f"{where}: scan_id {scan_id!r} is not a scan id")
    ticket = row["ticket"]
    if not isinstance(ticket, str) or parse_frame(ticket.encode()).ticket != ticket:
        raise DataError(f"{where}: ticket {ticket!r} is not a valid ticket number")
    if row["state"] not in STATES:
        raise DataError(f"{where}: state {row['state']!r} is not one of {', '.join(STATES)}")
    for field in ("scanner", "device_id"):
        if not isinstance(row[field], str) or not row[field]:
            raise DataError(f"{where}: {field} must be a non-empty string")
    row["scanned_at"] = _timestamp(where, "scanned_at", row["scanned_at"], required=True)
    row["delivered_at"] = _timestamp(where, "delivered_at", row["delivered_at"], required=False)
    row["attempts"] = _integer(where, "attempts", row["attempts"], required=True)
    row["http_status"] = _integer(where, "http_status", row["http_status"], required=False)
    if row["last_error"] is not None and not isinstance(row["last_error"], str):
        raise DataError(f"{where}: last_error must be text")
    row["clock_synced"] = _flag(where, row["clock_synced"])
    return row


def _flag(where: str, value: Any) -> int | None:
    """clock_synced: 1, 0 or unknown (None); CSV gives "1"/"0", JSON 1/0 or true/false."""
    if value is None:
        return None
    if value in (1, "1", True, "true", "True"):
        return 1
    if value in (0, "0", False, "false", "False"):
        return 0
    raise DataError(f"{where}: clock_synced {value!r} is not 1, 0 or empty")


def _timestamp(where: str, field: str, value: Any, *, required: bool) -> str | None:
    if value is None and not required:
        return None
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise DataError(f"{where}: {field} {value!r} is not an RFC 3339 time with offset")
    return str(value)


def _integer(where: str, field: str, value: Any, *, required: bool) -> int | None:
    if value is None and not required:
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise DataError(f"{where}: {field} {value!r} is not a whole number >= 0")
    return value
