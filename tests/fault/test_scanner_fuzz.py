"""Bad scanner input: fuzzed byte streams through the frame splitter, the parser and intake.

A scanner on the wrong baud rate, a noisy cable or a misconfigured terminator sends
binary noise, bursts of 0x80-0xFF, runaway lines with no terminator and terminators in
the middle of what should have been one ticket. Whatever comes: no exception, nothing
invalid becomes a notification, and every valid frame cleanly delimited around the noise
(a terminator right before it) is recorded.

The expectation is an independent reference: the whole stream cut at every terminator at
once (so read boundaries cannot matter), runaway frames dropped, and CONTRACT §3's rules for
a valid ticket written out again here. The stream is fed in hypothesis-chosen pieces to a
real :class:`~agent.barcode.FrameSplitter`, a real :class:`~agent.intake.Intake` and a real
SQLite :class:`~agent.store.Store`, and the store must hold exactly what the reference says.
Then the same kind of storm goes through a real pseudo-terminal to a real daemon.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import sqlite3
import tempfile
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.barcode import MAX_FRAME_BYTES, MAX_TICKET_CHARS, OVERLONG, FrameSplitter
from agent.config import ScannerSettings
from agent.intake import Dedupe, Intake
from agent.store import Store
from hardware_mocks.meetch_sim import SimulatedMeetch
from hardware_mocks.virtual_scanner import VirtualScanner
from tests.conftest import AgentProcess, ConfigWriter, wait_until
from tests.fault.conftest import LONG, Record, query, queue_db

EXAMPLES = 10_000 if LONG else 300
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI is deterministic
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)
GOOD, BAD = b"\x06", b"\x15"
PADDING = " \t\r\n"
AIM = re.compile(r"\][A-Za-z][0-9A-Za-z]")
SHM = Path("/dev/shm")
"""Per-example databases go to memory when possible: thousands of fsyncs cost nothing."""


# -- the reference -----------------------------------------------------------------------------


def reference_frames(stream: bytes, term: bytes, max_bytes: int = MAX_FRAME_BYTES) -> list[bytes]:
    """The frames in ``stream``, cut at every terminator at once; OVERLONG for a runaway.

    A frame that, with its terminator, is longer than ``max_bytes`` is one OVERLONG, and so
    is an unterminated tail longer than that (reported before its terminator comes).
    """
    *complete, tail = stream.split(term)
    frames = [OVERLONG if len(f) + len(term) > max_bytes else f for f in complete]
    if len(tail) > max_bytes:
        frames.append(OVERLONG)
    return frames


def reference_ticket(frame: bytes) -> str | None:
    """CONTRACT §3, written out again: the ticket in ``frame``, or None when invalid."""
    if frame == OVERLONG:
        return None
    try:
        text = frame.decode("utf-8")
    except UnicodeDecodeError:
        return None
    text = text.strip(PADDING)
    if AIM.match(text):
        text = text[3:].strip(PADDING)
    if not text or len(text) > MAX_TICKET_CHARS:
        return None
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in text):
        return None
    return text


def clean_ticket(ticket: str) -> bool:
    """What a notification's ticket must look like, whatever frame it came from."""
    return (
        1 <= len(ticket) <= MAX_TICKET_CHARS
        and ticket == ticket.strip(PADDING)
        and not any(unicodedata.category(ch) in ("Cc", "Cs") for ch in ticket)
    )


# -- streams -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """A piece of the stream: its bytes, and the ticket it holds when it is a valid frame."""

    data: bytes
    ticket: str | None = None


def _no_line_ends(data: bytes) -> bytes:
    return data.replace(b"\r", b"").replace(b"\n", b"")


tickets = st.one_of(
    st.from_regex(r"[0-9A-Z][0-9A-Z-]{0,30}", fullmatch=True),
    st.text(
        alphabet=st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")),
        min_size=1,
        max_size=MAX_TICKET_CHARS,
    ).filter(lambda t: t == t.strip(PADDING) and not AIM.match(t)),
)
aims = st.sampled_from(["", "]C0", "]Q1", "]E0", "]d2"])
pads = st.text(alphabet=" \t", max_size=3)


def segments(term: bytes) -> st.SearchStrategy[Segment]:
    """One piece of a hostile stream ended (or not) by ``term``."""
    valid = st.builds(
        lambda lead, aim, ticket, trail: Segment(
            (lead + aim + ticket + trail).encode() + term, ticket
        ),
        pads,
        aims,
        tickets,
        pads,
    )
    noise = st.builds(
        lambda b, end: Segment(b + (term if end else b"")),
        st.binary(min_size=1, max_size=300),
        st.booleans(),
    )
    wrong_baud = st.builds(
        lambda b, end: Segment(bytes(b) + (term if end else b"")),
        st.lists(st.integers(0x80, 0xFF), min_size=1, max_size=200),
        st.booleans(),
    )
    runaway = st.builds(
        lambda n, pattern, end: Segment(
            (pattern * (n // len(pattern) + 1))[:n] + (term if end else b"")
        ),
        st.integers(MAX_FRAME_BYTES - 8, 3 * MAX_FRAME_BYTES),
        st.binary(min_size=1, max_size=16).map(_no_line_ends).filter(bool),
        st.booleans(),
    )
    split_ticket = st.builds(
        lambda a, b: Segment(a.encode() + term + b.encode() + term),
        tickets,
        tickets,
    )
    control = st.builds(
        lambda ticket, ch, at: Segment(
            (ticket[: at % (len(ticket) + 1)] + ch + ticket[at % (len(ticket) + 1) :]).encode()
            + term
        ),
        tickets,
        st.sampled_from(["\x00", "\x1b", "\x1d", "\x7f", "\x85", "\x04"]),
        st.integers(0, 200),
    )
    too_long = st.builds(lambda n: Segment(b"A" * n + term), st.integers(MAX_TICKET_CHARS + 1, 400))
    empty = st.builds(lambda pad: Segment(pad.encode() + term), pads)
    not_utf8 = st.builds(
        lambda ticket, bad: Segment(ticket.encode() + bad + term),
        tickets,
        st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]),
    )
    return st.one_of(
        valid,
        valid,
        valid,
        noise,
        wrong_baud,
        runaway,
        split_ticket,
        control,
        too_long,
        empty,
        not_utf8,
    )


Case = tuple[bytes, list[Segment], list[int], bool]


@st.composite
def hostile_streams(draw: st.DrawFn) -> Case:
    """A terminator, segments in it, the read sizes to feed them in, and whether a read
    also ends after every CR (where a CRLF is most easily split)."""
    term = draw(st.sampled_from([b"\r", b"\n", b"\r\n"]))
    parts = draw(st.lists(segments(term), min_size=4, max_size=30))
    reads = draw(st.lists(st.integers(1, 700), min_size=1, max_size=30))
    return term, parts, reads, draw(st.booleans())


def pieces(stream: bytes, reads: list[int], *, cut_after_cr: bool = False) -> Iterator[bytes]:
    """``stream`` cut into pieces of the given sizes, cycled (and after each CR if asked)."""
    at, i = 0, 0
    while at < len(stream):
        end = at + reads[i % len(reads)]
        if cut_after_cr and (cr := stream.find(b"\r", at, end)) >= 0:
            end = cr + 1
        yield stream[at:end]
        at, i = end, i + 1


# -- the pipeline ------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Only errors while thousands of invalid frames are logged as warnings."""
    old = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    try:
        yield
    finally:
        structlog.configure(**old)


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A directory for per-example databases, in memory when the machine has /dev/shm."""
    if SHM.is_dir():
        with tempfile.TemporaryDirectory(prefix="meetch-fuzz-", dir=SHM) as where:
            yield Path(where)
    else:
        yield tmp_path


def scans(store: Store) -> list[tuple[str, str | None]]:
    """Every scan's (outcome, ticket), in arrival order, read on a connection of our own."""
    with contextlib.closing(sqlite3.connect(store.path)) as conn:
        return conn.execute("SELECT outcome, ticket FROM scans ORDER BY id").fetchall()


def check_stream(
    where: Path, term: bytes, parts: list[Segment], reads: list[int], cut_after_cr: bool
) -> int:
    """Feed one stream through splitter, intake and store; check it all; return the frames."""
    stream = b"".join(p.data for p in parts)
    scanner = ScannerSettings(
        name="fuzz-1",
        port="/dev/null",
        terminator=term.decode(),
        good_read=GOOD,
        bad_read=BAD,
    )
    path = where / "queue.sqlite3"
    store = Store(path, device_id="fuzz")
    try:
        intake = Intake(store, Dedupe(0.0))  # no dedupe window: every valid read counts
        splitter = FrameSplitter(term)
        frames: list[bytes] = []
        feedback: list[bytes] = []
        for piece in pieces(stream, reads, cut_after_cr=cut_after_cr):
            for frame in splitter.feed(piece):
                frames.append(frame)
                feedback.append(intake.handle(scanner, frame))

        expected = reference_frames(stream, term)
        assert frames == expected
        wanted = [reference_ticket(f) for f in expected]
        assert scans(store) == [("valid" if t else "invalid", t) for t in wanted]
        assert feedback == [GOOD if t else BAD for t in wanted]

        notes = {n.ticket: n for n in store.notifications()}
        assert set(notes) == {t for t in wanted if t}
        for ticket in notes:
            assert clean_ticket(ticket), ticket
            assert ticket.encode() in stream
        assert len(store.notifications()) == len(notes)

        # The promise in plain words: a valid frame with a terminator right before it
        # (or first in the stream) is recorded, whatever noise came before.
        recorded = {t for _, t in scans(store)}
        for before, part in zip([None, *parts], parts, strict=False):
            clean = before is None or before.data.endswith(term)
            if part.ticket is not None and clean:
                assert part.ticket in recorded, part
        return len(frames)
    finally:
        store.close()
        for suffix in ("", "-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)


def test_fuzzed_streams_through_splitter_intake_and_store(scratch: Path, figures: Record) -> None:
    """Hypothesis streams of noise, wrong-baud bytes, runaways, split tickets and valid
    frames, read in arbitrary pieces: the store holds exactly the reference's scans."""
    examples: list[int] = []

    @FUZZ_SETTINGS
    @given(hostile_streams())
    @example((b"\r", [Segment(b"\xff" * 3000), Segment(b"T-1\r", "T-1")], [1], False))
    @example((b"\r\n", [Segment(b"x" * 1023 + b"\r"), Segment(b"\nT-2\r\n")], [1024, 1], False))
    @example((b"\r\n", [Segment(b"x" * 1100 + b"\r\n"), Segment(b"T-3\r\n", "T-3")], [2000], True))
    @example((b"\n", [Segment(b"AB\nCD\n"), Segment(b"]C0 T-4 \t\n", "T-4")], [2], False))
    @example((b"\r", [Segment(OVERLONG + b"\r"), Segment(b"T-5\r", "T-5")], [5], False))
    def run(case: Case) -> None:
        term, parts, reads, cut_after_cr = case
        examples.append(check_stream(scratch, term, parts, reads, cut_after_cr))

    with quiet_logs():
        run()

    assert len(examples) >= EXAMPLES
    figures("fuzz_cases", len(examples))


def test_reference_matches_known_cases() -> None:
    """The reference itself, on cases worked out by hand."""
    assert reference_frames(b"A\rB\r", b"\r") == [b"A", b"B"]
    assert reference_frames(b"A\rB", b"\r") == [b"A"]
    assert reference_frames(b"x" * 2000, b"\r") == [OVERLONG]
    assert reference_frames(b"x" * 2000 + b"\rT\r", b"\r") == [OVERLONG, b"T"]
    assert reference_frames(b"x" * 1022 + b"\r\n", b"\r\n") == [b"x" * 1022]
    assert reference_frames(b"x" * 1023 + b"\r\n", b"\r\n") == [OVERLONG]
    assert reference_ticket(b" ]C0 0042 \t") == "0042"
    assert reference_ticket(b"\xc3\xa9") == "é"
    assert reference_ticket(b"A\x1dB") is None
    assert reference_ticket(b"\xff") is None
    assert reference_ticket(b"A" * 129) is None
    assert reference_ticket(OVERLONG) is None


# -- end to end: a real pty, a real daemon ----------------------------------------------------

E2E_TICKETS = 400 if LONG else 40


def scanner_open(db: Path) -> bool:
    """True once the daemon reported the scanner open."""
    try:
        return bool(query(db, "SELECT 1 FROM scanner_status WHERE connected = 1"))
    except sqlite3.OperationalError:  # no database or no schema yet
        return False


def garbage(rng: random.Random, term: bytes) -> bytes:
    """One seeded burst of what a bad line or a wrong baud rate sends, ended by ``term``."""
    kind = rng.randrange(7)
    if kind == 0:  # binary noise, terminators and all
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) + term
    if kind == 1:  # wrong baud rate: the high half of the byte range
        return bytes(rng.randrange(0x80, 0x100) for _ in range(rng.randrange(1, 300))) + term
    if kind == 2:  # a runaway line
        return (
            bytes(rng.choice(b"0123456789ABCDEF\xff") for _ in range(rng.randrange(1100, 4000)))
            + term
        )
    if kind == 3:  # a ticket with a control character
        return b"GATE\x1bSTUCK" + term
    if kind == 4:  # too long for Meetch
        return b"Z" * rng.randrange(129, 600) + term
    if kind == 5:  # nothing but padding
        return b" \t" * rng.randrange(3) + term
    return b"\xed\xa0\x80SURROGATE" + term  # not UTF-8


def test_daemon_survives_a_garbage_storm_on_a_real_pty(
    config_writer: ConfigWriter,
    meetch: SimulatedMeetch,
    scanner_factory: Callable[[str], VirtualScanner],
    start_agent: Callable[..., AgentProcess],
    figures: Record,
) -> None:
    """A seeded storm of garbage with valid tickets in between, through a pty to a real
    daemon: it stays up, the tickets are delivered, nothing else is POSTed."""
    rng = random.Random(20260220)
    term = b"\r"
    north = scanner_factory("north")
    config = config_writer.write(
        scanners=[
            {
                "name": "north-1",
                "port": str(north.link),
                "terminator": "\r",
                "good_read": "\u0006",
                "bad_read": "\u0015",
            }
        ]
    )
    db = queue_db(config_writer)
    agent = start_agent(config)
    wait_until(lambda: scanner_open(db), 20)

    planned = [f"FZ-{i:05d}" for i in range(E2E_TICKETS)]
    parts = bytearray()
    for ticket in planned:
        parts += rng.choice([b"", b"]C0", b"]Q1"]) + ticket.encode() + term
        for _ in range(rng.randrange(0, 4)):
            parts += garbage(rng, term)
    stream = bytes(parts)
    frames = reference_frames(stream, term)
    valid = [t for t in map(reference_ticket, frames) if t is not None]
    assert set(planned) <= set(valid)

    for piece in pieces(stream, [rng.randrange(1, 4096) for _ in range(64)]):
        north.write(piece)  # uneven pieces, as a USB-serial bridge delivers them

    wait_until(lambda: query(db, "SELECT COUNT(*) FROM scans")[0][0] >= len(frames), 60)
    assert meetch.wait_for(lambda: set(valid) <= set(meetch.flagged), 60)
    wait_until(lambda: meetch.in_flight == 0, 10)

    assert agent.proc.poll() is None, agent.output()[-2000:]
    sent = [r.json["number"] for r in meetch.scan_requests if r.json]
    assert set(sent) == set(valid)
    for ticket in set(valid):
        assert len(meetch.scan_ids_for(ticket)) == 1
    counts = dict(query(db, "SELECT outcome, COUNT(*) FROM scans GROUP BY outcome"))
    assert counts.get("invalid", 0) == len(frames) - len(valid)
    assert counts.get("valid", 0) + counts.get("duplicate", 0) == len(valid)
    assert north.wait_feedback(BAD, 10, count=len(frames) - len(valid))
    assert agent.stop() == 0
    figures("fuzz_cases", len(frames))
