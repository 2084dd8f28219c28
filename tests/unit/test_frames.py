"""Frame headers: exactly 40 ASCII bytes ``KIND START LENGTH\\r\\n`` (stream-format.md, Frames)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libvirtnbdbackup.errors import StreamError
from libvirtnbdbackup.format import frames
from libvirtnbdbackup.format.frames import HEADER_SIZE, MAX_REQUEST_SIZE, Header, Kind

WHERE = "vda.full.data at offset 4242"
U64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
HEADER_RE = re.compile(rb"^(meta|data|zero|stop|comp) [0-9a-f]{16} [0-9a-f]{16}\r\n$")


def test_constants_follow_the_spec() -> None:
    assert HEADER_SIZE == 40
    assert MAX_REQUEST_SIZE == 32 * 1024 * 1024 == 33554432
    assert {k.value for k in Kind} == {b"meta", b"data", b"zero", b"stop", b"comp"}


@pytest.mark.parametrize(
    ("kind", "start", "length", "expected"),
    [
        (Kind.DATA, 0x100000, 0x200, b"data 0000000000100000 0000000000000200\r\n"),
        (Kind.META, 0, 0x1A3, b"meta 0000000000000000 00000000000001a3\r\n"),
        (Kind.ZERO, 0xDEADBEEF000, 0xABCDEF, b"zero 00000deadbeef000 0000000000abcdef\r\n"),
        (Kind.STOP, 0, 0, b"stop 0000000000000000 0000000000000000\r\n"),
        (Kind.COMP, 0, 2, b"comp 0000000000000000 0000000000000002\r\n"),
        (Kind.DATA, (1 << 64) - 1, (1 << 64) - 1, b"data ffffffffffffffff ffffffffffffffff\r\n"),
    ],
)
def test_encode_exact_bytes(kind: Kind, start: int, length: int, expected: bytes) -> None:
    assert frames.encode(kind, start, length) == expected


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize(
    ("start", "length"), [(0, 0), (1, 1), (0xABCDEF, 0xFEDCBA), ((1 << 64) - 1, (1 << 63) + 5)]
)
def test_every_kind_is_exactly_40_lower_case_bytes(kind: Kind, start: int, length: int) -> None:
    raw = frames.encode(kind, start, length)
    assert len(raw) == 40
    assert HEADER_RE.match(raw), raw
    assert raw[:4] == kind.value
    assert raw[4:5] == b" " and raw[21:22] == b" "
    assert raw[38:] == b"\r\n"
    assert int(raw[5:21], 16) == start
    assert int(raw[22:38], 16) == length


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(list(Kind)), start=U64, length=U64)
def test_encode_decode_round_trip(kind: Kind, start: int, length: int) -> None:
    raw = frames.encode(kind, start, length)
    assert len(raw) == HEADER_SIZE
    assert HEADER_RE.match(raw)
    assert frames.decode(raw, WHERE) == Header(kind, start, length)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(list(Kind)), start=U64, length=U64)
def test_decode_accepts_upper_case_hex(kind: Kind, start: int, length: int) -> None:
    raw = kind.value + b" %016X %016X\r\n" % (start, length)
    assert len(raw) == HEADER_SIZE
    assert frames.decode(raw, WHERE) == Header(kind, start, length)


def test_decode_upper_case_example() -> None:
    raw = b"data 00000000001000AB 0000000000000DEF\r\n"
    assert frames.decode(raw, WHERE) == Header(Kind.DATA, 0x1000AB, 0xDEF)


@pytest.mark.parametrize("start", [-1, 1 << 64])
def test_encode_rejects_fields_that_do_not_fit_16_hex_digits(start: int) -> None:
    with pytest.raises(ValueError):
        frames.encode(Kind.DATA, start, 1)
    with pytest.raises(ValueError):
        frames.encode(Kind.DATA, 0, start)


def assert_refused(raw: bytes) -> None:
    """decode() refuses the header with an error that says where it was read."""
    with pytest.raises(StreamError) as err:
        frames.decode(raw, WHERE)
    assert WHERE in str(err.value)


@pytest.mark.parametrize("cut", range(HEADER_SIZE))
def test_truncated_header_raises_naming_the_location(cut: int) -> None:
    raw = frames.encode(Kind.DATA, 0x100000, 0x200)[:cut]
    assert_refused(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"DATA 0000000000100000 0000000000000200\r\n",
        b"blob 0000000000100000 0000000000000200\r\n",
        b"dat  0000000000100000 0000000000000200\r\n",
        b"\x00\x00\x00\x00 0000000000100000 0000000000000200\r\n",
        b"datazero0000000100000 0000000000000200\r\n",
        b"    0000000000100000 00000000000000200\r\n",
    ],
)
def test_bad_kind_raises_naming_the_location(raw: bytes) -> None:
    assert len(raw) == HEADER_SIZE
    assert_refused(raw)


@pytest.mark.parametrize(
    "end", [b"\n\n", b"\r\r", b"\n\r", b"  ", b"\x00\x00", b"0\n", b"\r0", b"00"]
)
def test_missing_cr_lf_raises_naming_the_location(end: bytes) -> None:
    raw = b"data 0000000000100000 0000000000000200" + end
    assert len(raw) == HEADER_SIZE
    assert_refused(raw)


def test_lf_only_header_is_rejected() -> None:
    # A header written with a bare LF is 39 bytes; the next byte read belongs to the payload.
    raw = b"data 0000000000100000 0000000000000200\nX"
    assert_refused(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"data 00000000001000zz 0000000000000200\r\n",
        b"data 0000000000100000 00000000000002g0\r\n",
        b"data 000000000010000000000000000000200\r\n",
        b"data 0000000000100000 000000 000000200\r\n",
        b"data  000000000100000 0000000000000200\r\n",
        b"data 0000000000100000  000000000000200\r\n",
    ],
)
def test_bad_fields_raise_naming_the_location(raw: bytes) -> None:
    assert len(raw) == HEADER_SIZE
    assert_refused(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"data -000000000000001 0000000000000010\r\n",
        b"data +000000000000001 0000000000000010\r\n",
        b"data 0x00000000000010 0000000000000010\r\n",
        b"data 0000_0000_0000_1 0000000000000010\r\n",
    ],
)
def test_fields_must_be_plain_hex_digits(raw: bytes) -> None:
    assert len(raw) == HEADER_SIZE
    with pytest.raises(StreamError):
        frames.decode(raw, WHERE)
