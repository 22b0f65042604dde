"""Frame splitting and parsing (agent/barcode.py): shared vectors and properties."""

from __future__ import annotations

import itertools
import json
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.barcode import (
    MAX_FRAME_BYTES,
    MAX_TICKET_CHARS,
    OVERLONG,
    TERMINATORS,
    FrameSplitter,
    parse_frame,
)
from tests.conftest import REPO

VECTORS_PATH = REPO / "tests" / "data" / "scanner-frames.jsonl"
SHARED_VECTORS_PATH = REPO.parent / "shared" / "data" / "scanner-frames.jsonl"
REASONS = {"empty", "not_utf8", "control_character", "too_long"}
PROPERTY_SETTINGS = settings(max_examples=200, deadline=None)


def load_vectors(path: Path) -> list[dict[str, Any]]:
    """The frame vectors, one JSON object a line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


VECTORS = load_vectors(VECTORS_PATH)


def split_all(
    terminator: bytes, chunks: list[bytes], max_bytes: int = MAX_FRAME_BYTES
) -> list[bytes]:
    """Feed ``chunks`` one by one to a fresh splitter and collect every frame."""
    splitter = FrameSplitter(terminator, max_bytes)
    frames: list[bytes] = []
    for chunk in chunks:
        frames += splitter.feed(chunk)
    return frames


def test_vectors_copy_matches_shared_data() -> None:
    """tests/data holds non-empty valid JSONL, identical to the shared copy when present."""
    assert VECTORS
    for vector in VECTORS:
        assert set(vector) >= {"raw_hex", "terminator", "ticket", "note"}
        assert vector["terminator"] in TERMINATORS
        bytes.fromhex(vector["raw_hex"])
    notes = [v["note"] for v in VECTORS]
    assert len(set(notes)) == len(notes)
    if SHARED_VECTORS_PATH.exists():
        assert VECTORS_PATH.read_bytes() == SHARED_VECTORS_PATH.read_bytes()


@pytest.mark.parametrize("vector", VECTORS, ids=[v["note"] for v in VECTORS])
def test_vector(vector: dict[str, Any]) -> None:
    """A wire frame, whole or byte by byte, gives the expected ticket or is invalid."""
    terminator = TERMINATORS[vector["terminator"]]
    raw = bytes.fromhex(vector["raw_hex"])
    frames = split_all(terminator, [raw])
    assert len(frames) == 1
    assert split_all(terminator, [raw[i : i + 1] for i in range(len(raw))]) == frames
    parsed = parse_frame(frames[0])
    assert parsed.ticket == vector["ticket"]
    assert parsed.valid is (vector["ticket"] is not None)
    if vector["ticket"] is None:
        assert parsed.reason in REASONS
    else:
        assert parsed.reason is None


def test_overlong_marker_is_too_long() -> None:
    """The splitter's overlong marker parses as an invalid, too long frame."""
    parsed = parse_frame(OVERLONG)
    assert parsed.ticket is None
    assert parsed.reason == "too_long"


# -- parse_frame properties ----------------------------------------------------------------

aim_prefixes = st.builds(
    lambda code, modifier: f"]{code}{modifier}",
    st.sampled_from("ACEIQdez"),
    st.sampled_from("0123456789ABZ"),
)
padding = st.text(alphabet=" \t", max_size=4)
tickets = st.text(
    alphabet=st.characters(exclude_categories=("Cc", "Cs")),
    min_size=1,
    max_size=MAX_TICKET_CHARS,
).filter(lambda t: t == t.strip() and not t.startswith("]"))
frame_like = st.one_of(
    st.binary(max_size=600),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.builds(
        lambda aim, pad, body: (aim + pad + body).encode("utf-8", "surrogatepass"),
        aim_prefixes,
        padding,
        st.text(max_size=140),
    ),
)


@PROPERTY_SETTINGS
@given(frame_like)
@example(b"]C0")
@example(b"]C0 \t")
@example(b"\xed\xa0\x80")  # an encoded surrogate: not UTF-8
@example(b" \xc2\x85 ")  # NEL, a C1 control character
def test_parse_frame_never_raises_and_tickets_are_clean(raw: bytes) -> None:
    """parse_frame accepts any bytes; a ticket it returns is 1..128 clean characters."""
    parsed = parse_frame(raw)
    if parsed.ticket is None:
        assert parsed.reason in REASONS
        return
    ticket = parsed.ticket
    assert parsed.reason is None
    assert 1 <= len(ticket) <= MAX_TICKET_CHARS
    assert not any(unicodedata.category(ch) in ("Cc", "Cs") for ch in ticket)
    assert ticket[0] not in " \r\n"
    assert ticket[-1] not in " \r\n"


@PROPERTY_SETTINGS
@given(
    ticket=tickets,
    aim=st.one_of(st.none(), aim_prefixes),
    lead=padding,
    middle=padding,
    trail=st.text(alphabet=" \t\r\n", max_size=4),
)
@example(ticket="A" * MAX_TICKET_CHARS, aim="]Q1", lead="", middle="", trail="")
@example(ticket="événement-9", aim=None, lead=" ", middle="", trail="\r\n")
def test_valid_ticket_round_trips(
    ticket: str, aim: str | None, lead: str, middle: str, trail: str
) -> None:
    """A valid ticket comes back unchanged whatever AIM prefix and padding surround it."""
    text = lead + (aim + middle if aim else "") + ticket + trail
    assert parse_frame(text.encode("utf-8")).ticket == ticket


# -- FrameSplitter properties --------------------------------------------------------------

stream_pieces = st.lists(
    st.one_of(
        st.binary(max_size=12),
        st.sampled_from([b"\r", b"\n", b"\r\n", b"\n\r"]),
        st.integers(min_value=0, max_value=40).map(lambda n: b"x" * n),
    ),
    max_size=25,
)


@PROPERTY_SETTINGS
@given(
    terminator=st.sampled_from(sorted(TERMINATORS.values())),
    max_bytes=st.sampled_from([4, 8, 16, MAX_FRAME_BYTES]),
    pieces=stream_pieces,
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
@example(terminator=b"\r\n", max_bytes=4, pieces=[b"xxxx", b"\r\n"], cuts=[5])
@example(terminator=b"\r\n", max_bytes=4, pieces=[b"xx", b"\r\n", b"x" * 9, b"\r\n"], cuts=[])
def test_splitter_ignores_read_boundaries(
    terminator: bytes, max_bytes: int, pieces: list[bytes], cuts: list[int]
) -> None:
    """The same stream gives the same frames however it is cut into reads."""
    stream = b"".join(pieces)
    whole = split_all(terminator, [stream], max_bytes)
    bounds = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    assert split_all(terminator, chunks, max_bytes) == whole
    bytewise = [stream[i : i + 1] for i in range(len(stream))]
    assert split_all(terminator, bytewise, max_bytes) == whole


@pytest.mark.parametrize("terminator", sorted(TERMINATORS.values()))
@pytest.mark.parametrize("size", range(MAX_FRAME_BYTES - 3, MAX_FRAME_BYTES + 2))
def test_splitter_limit_does_not_depend_on_where_the_terminator_is_cut(
    terminator: bytes, size: int
) -> None:
    """A frame near the limit is kept or dropped alike, even with CRLF cut between reads."""
    stream = b"A" * size + terminator + b"000001" + terminator
    whole = split_all(terminator, [stream])
    for cut in range(size - 1, size + len(terminator) + 1):
        assert split_all(terminator, [stream[:cut], stream[cut:]]) == whole
    assert whole[-1] == b"000001"
    assert (whole[0] == OVERLONG) is (size + len(terminator) > MAX_FRAME_BYTES)


@PROPERTY_SETTINGS
@given(
    terminator=st.sampled_from(sorted(TERMINATORS.values())),
    seed=st.binary(min_size=1, max_size=16).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"")
    ),
    length=st.integers(min_value=MAX_FRAME_BYTES + 1, max_value=4 * MAX_FRAME_BYTES),
    chunk_sizes=st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=8),
)
def test_runaway_frame_is_bounded_and_reported_once(
    terminator: bytes, seed: bytes, length: int, chunk_sizes: list[int]
) -> None:
    """A frame with no terminator never grows the buffer past the limit and yields one OVERLONG."""
    runaway = ((seed or b"x") * length)[:length]
    splitter = FrameSplitter(terminator)
    frames: list[bytes] = []
    start, i = 0, 0
    while start < len(runaway):
        size = chunk_sizes[i % len(chunk_sizes)]
        frames += splitter.feed(runaway[start : start + size])
        assert splitter.pending <= MAX_FRAME_BYTES
        start, i = start + size, i + 1
    assert frames == [OVERLONG]
    frames += splitter.feed(terminator + b"000001" + terminator)
    frames += splitter.feed(b"]C0000002" + terminator)
    assert frames == [OVERLONG, b"000001", b"]C0000002"]
    assert splitter.pending == 0
    assert [parse_frame(f).ticket for f in frames] == [None, "000001", "000002"]


def test_splitter_rejects_an_empty_terminator() -> None:
    """A splitter needs a terminator to cut at."""
    with pytest.raises(ValueError, match="terminator"):
        FrameSplitter(b"")
