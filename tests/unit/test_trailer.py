"""Exact layout of compressed files and of the meta JSON (stream-format.md).

The file is walked here with a small parser written from the spec, not with StreamReader, so
that the writer's bytes are checked independently of our own reader.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any

import lz4.frame
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libvirtnbdbackup.format.frames import MAX_REQUEST_SIZE
from libvirtnbdbackup.format.meta import StreamMeta
from libvirtnbdbackup.format.writer import StreamWriter, compress_pieces, piece_lengths

from .samples import DATE

Compression = bool | int
MAX_PIECE = 256
SPEC_META_KEYS = {
    "virtualSize",
    "dataSize",
    "date",
    "diskName",
    "diskFormat",
    "checkpointName",
    "parentCheckpoint",
    "incremental",
    "compressed",
    "compressionMethod",
    "streamVersion",
}
STOP = b"stop 0000000000000000 0000000000000000\r\n"
LZ4_MAGIC = b"\x04\x22\x4d\x18"


def pattern(n: int, seed: int = 0) -> bytes:
    """Somewhat compressible, but not trivially, and different per offset."""
    return bytes(((i * 7 + seed) % 251) ^ (i >> 5 & 0xFF) for i in range(n))


def write(
    extents: list[tuple[str, int, int]],
    level: Compression = 2,
    *,
    max_piece: int = MAX_PIECE,
    packed: bool = False,
    date: str = DATE,
) -> tuple[bytes, dict[int, bytes]]:
    """Write ``extents`` ((kind, start, length)); return the file and each data extent's bytes."""
    payloads = {start: pattern(length, start) for kind, start, length in extents if kind == "data"}
    meta = StreamMeta(
        virtual_size=1 << 30,
        data_size=sum(len(p) for p in payloads.values()),
        disk_name="sda",
        disk_format="raw",
        checkpoint_name="virtnbdbackup.3",
        parent_checkpoint="virtnbdbackup.2",
        # An incremental stream holds data frames only (its zeros go to a side file).
        incremental=not any(kind == "zero" for kind, _s, _n in extents),
        compressed=level,
        date=date,
    )
    out = io.BytesIO()
    writer = StreamWriter(out, meta, max_piece=max_piece)
    for kind, start, length in extents:
        if kind == "data" and packed:
            cuts = itertools.accumulate(piece_lengths(length, max_piece), initial=0)
            bounds = list(cuts)
            pieces = [
                compress_pieces(payloads[start][a:b], int(level))
                for a, b in itertools.pairwise(bounds)
            ]
            writer.packed(start, length, pieces)
        elif kind == "data":
            writer.data(start, length, [payloads[start]])
        else:
            writer.zero(start, length)
    writer.finish()
    return out.getvalue(), payloads


@dataclass
class Walked:
    meta: dict[str, Any]
    frames: list[tuple[bytes, int, int, bytes]]  # kind, start, length, raw payload
    trailer: Any
    trailer_raw: bytes


def header(raw: bytes, pos: int) -> tuple[bytes, int, int]:
    text = raw[pos : pos + 40]
    assert len(text) == 40 and text.endswith(b"\r\n"), (pos, text)
    kind, start, length = text[:38].split(b" ")
    return kind, int(start, 16), int(length, 16)


def trailer_of(raw: bytes) -> tuple[Any, bytes]:
    """Find the trailer the way the spec says a reader does."""
    tail = raw[-42:-2]
    assert len(tail) == 40
    kind, start, length_hex = tail.split(b" ")
    assert kind == b"\r\ncomp"
    assert start == b"0" * 16
    length = int(length_hex, 16)
    text = raw[-42 - length : -42]
    assert len(text) == length
    return json.loads(text), text


def walk(raw: bytes) -> Walked:
    """Parse a compressed file front to back, using the trailer for payload sizes."""
    kind, _, meta_len = header(raw, 0)
    assert kind == b"meta"
    meta = json.loads(raw[40 : 40 + meta_len])
    assert raw[40 + meta_len : 42 + meta_len] == b"\r\n"
    trailer, trailer_raw = trailer_of(raw)
    entries = iter(trailer)
    pos = 42 + meta_len
    found = []
    while True:
        kind, start, length = header(raw, pos)
        pos += 40
        if kind == b"stop":
            assert (start, length) == (0, 0)
            break
        assert kind in (b"data", b"zero"), kind
        payload = b""
        if kind == b"data":
            entry = next(entries)
            size = entry if isinstance(entry, int) else int(next(iter(entry)))
            payload = raw[pos : pos + size]
            pos += size
            assert raw[pos : pos + 2] == b"\r\n"
            pos += 2
        found.append((kind, start, length, payload))
    assert next(entries, None) is None, "more trailer entries than data frames"
    # stop, then trailer JSON, CR LF and the comp header, and nothing else.
    assert raw[pos:] == trailer_raw + b"\r\n" + b"comp %016x %016x\r\n" % (0, len(trailer_raw))
    return Walked(meta, found, trailer, trailer_raw)


def split_pieces(entry: Any, payload: bytes) -> list[bytes]:
    sizes = [entry] if isinstance(entry, int) else next(iter(entry.values()))
    assert sum(sizes) == len(payload)
    pieces, pos = [], 0
    for size in sizes:
        pieces.append(payload[pos : pos + size])
        pos += size
    return pieces


def check_lz4_frame(piece: bytes, content: bytes) -> None:
    """One standard LZ4 frame, content size stored, block and content checksums on."""
    assert piece[:4] == LZ4_MAGIC
    flg = piece[4]
    assert flg >> 6 == 0b01, "frame version"
    assert flg & 0x10, "block checksum flag"
    assert flg & 0x08, "content size flag"
    assert flg & 0x04, "content checksum flag"
    assert not flg & 0x01, "no dictionary id"
    (content_size,) = struct.unpack_from("<Q", piece, 6)
    assert content_size == len(content)
    assert lz4.frame.decompress(piece) == content


# --- the comp header and how to find the trailer ----------------------------------------------


def test_last_40_bytes_are_the_comp_header() -> None:
    raw, _ = write([("data", 0, 100), ("zero", 100, 50), ("data", 150, 700)])
    _, trailer_raw = trailer_of(raw)
    assert raw[-40:] == b"comp 0000000000000000 %016x\r\n" % len(trailer_raw)
    assert raw[-40:-2].split(b" ")[0] == b"comp"
    assert int(raw[-40:-2].split(b" ")[2], 16) == len(trailer_raw)


def test_trailer_is_found_42_bytes_before_the_end() -> None:
    raw, _ = write([("data", 0, 100), ("data", 100, 300)])
    tail = raw[-42:-2]
    parts = tail.split(b" ")
    assert parts[0] == b"\r\ncomp"
    length = int(parts[2], 16)
    trailer = json.loads(raw[-42 - length : -42])
    assert isinstance(trailer, list)
    assert len(trailer) == 2
    # The trailer follows the stop frame directly.
    assert raw[-42 - length - 40 : -42 - length] == STOP


@pytest.mark.parametrize("level", [0, 1, 2, 3, 4])
def test_no_data_gives_an_empty_trailer(level: int) -> None:
    for extents in ([], [("zero", 0, 4096), ("zero", 4096, 1 << 20)]):
        raw, _ = write(extents, level)
        walked = walk(raw)
        assert walked.trailer == []
        assert walked.trailer_raw == b"[]"
        assert raw.endswith(b"[]\r\ncomp 0000000000000000 0000000000000002\r\n")


# --- one entry per data frame -----------------------------------------------------------------


def test_one_entry_per_data_frame_and_none_for_zero_frames() -> None:
    extents = [
        ("zero", 0, 512),
        ("data", 512, 10),
        ("zero", 522, 1000),
        ("data", 1522, MAX_PIECE),
        ("data", 1522 + MAX_PIECE, 3 * MAX_PIECE + 1),
        ("zero", 5000, 1),
        ("data", 6000, MAX_PIECE - 1),
    ]
    raw, payloads = write(extents)
    walked = walk(raw)
    assert [(k.decode(), s, n) for k, s, n, _ in walked.frames] == extents
    assert len(walked.trailer) == 4
    assert isinstance(walked.trailer[0], int)
    assert isinstance(walked.trailer[1], dict)
    assert isinstance(walked.trailer[2], dict)
    assert isinstance(walked.trailer[3], int)
    for (kind, start, _, payload), entry in zip(
        [f for f in walked.frames if f[0] == b"data"], walked.trailer, strict=True
    ):
        assert kind == b"data"
        unpacked = b"".join(lz4.frame.decompress(p) for p in split_pieces(entry, payload))
        assert unpacked == payloads[start]
    for kind, _, _, payload in walked.frames:
        if kind == b"zero":
            assert payload == b""


@pytest.mark.parametrize("length", [1, 2, MAX_PIECE // 2, MAX_PIECE - 1])
@pytest.mark.parametrize("level", [0, 2, 4])
def test_short_extent_has_an_int_entry(length: int, level: int) -> None:
    raw, payloads = write([("data", 4096, length)], level)
    walked = walk(raw)
    (entry,) = walked.trailer
    assert type(entry) is int
    ((_, _, _, payload),) = walked.frames
    assert entry == len(payload)
    check_lz4_frame(payload, payloads[4096])


@pytest.mark.parametrize(
    "length",
    [
        MAX_PIECE,
        MAX_PIECE + 1,
        2 * MAX_PIECE - 1,
        2 * MAX_PIECE,
        3 * MAX_PIECE + 17,
        10 * MAX_PIECE,
    ],
)
@pytest.mark.parametrize("level", [0, 2, 4])
def test_long_extent_has_an_object_entry(length: int, level: int) -> None:
    raw, payloads = write([("data", 0, length)], level)
    walked = walk(raw)
    (entry,) = walked.trailer
    assert type(entry) is dict
    assert len(entry) == 1
    ((total, sizes),) = entry.items()
    assert isinstance(total, str) and total.isdigit()
    assert all(type(s) is int and s > 0 for s in sizes)
    assert int(total) == sum(sizes)
    assert len(sizes) == math.ceil(length / MAX_PIECE)
    ((_, _, _, payload),) = walked.frames
    assert len(payload) == int(total)
    data = payloads[0]
    for i, piece in enumerate(split_pieces(entry, payload)):
        # Each piece is its own LZ4 frame of MAX_PIECE bytes, the last one possibly shorter.
        content = data[i * MAX_PIECE : (i + 1) * MAX_PIECE]
        assert len(content) == MAX_PIECE or i == len(sizes) - 1
        check_lz4_frame(piece, content)


def test_exactly_max_piece_is_one_piece_in_an_object() -> None:
    raw, payloads = write([("data", 0, MAX_PIECE)])
    walked = walk(raw)
    ((_, _, _, payload),) = walked.frames
    assert walked.trailer == [{str(len(payload)): [len(payload)]}]
    check_lz4_frame(payload, payloads[0])


@pytest.mark.parametrize(
    ("length", "pieces"),
    [(MAX_REQUEST_SIZE - 1, None), (MAX_REQUEST_SIZE, 1), (MAX_REQUEST_SIZE + 1, 2)],
)
def test_default_max_piece_is_the_32_mib_request_size(length: int, pieces: int | None) -> None:
    meta = StreamMeta(1 << 30, length, "vda", "qcow2", "virtnbdbackup.0", "", False, 0, "d")
    out = io.BytesIO()
    writer = StreamWriter(out, meta)
    chunk = bytes(1 << 20)
    writer.data(0, length, [chunk] * (length >> 20) + [chunk[: length % (1 << 20)]])
    writer.finish()
    (entry,) = walk(out.getvalue()).trailer
    if pieces is None:
        assert type(entry) is int
    else:
        ((_, sizes),) = entry.items()
        assert len(sizes) == pieces


def test_pieces_do_not_depend_on_how_the_source_is_chunked() -> None:
    data = pattern(5 * MAX_PIECE + 3)
    results = []
    for chunks in (
        [data],
        [data[i : i + 1] for i in range(len(data))],
        [data[:100], data[100:700], data[700:]],
    ):
        meta = StreamMeta(1 << 20, len(data), "vda", "qcow2", "c", "", False, 1, "d")
        out = io.BytesIO()
        writer = StreamWriter(out, meta, max_piece=MAX_PIECE)
        writer.data(0, len(data), chunks)
        writer.finish()
        results.append(out.getvalue())
    assert results[0] == results[1] == results[2]
    walked = walk(results[0])
    assert len(next(iter(walked.trailer[0].values()))) == 6


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 2000), max_size=6),
    zero_between=st.lists(st.booleans(), min_size=6, max_size=6),
    max_piece=st.integers(64, 1024),
    level=st.integers(0, 4),
    packed=st.booleans(),
)
def test_trailer_layout_property(
    lengths: list[int], zero_between: list[bool], max_piece: int, level: int, packed: bool
) -> None:
    extents: list[tuple[str, int, int]] = []
    pos = 0
    for length, zero in zip(lengths, zero_between, strict=False):
        extents.append(("data", pos, length))
        pos += length
        if zero:
            extents.append(("zero", pos, 777))
            pos += 777
    raw, payloads = write(extents, level, max_piece=max_piece, packed=packed)
    walked = walk(raw)
    data_frames = [f for f in walked.frames if f[0] == b"data"]
    assert len(walked.trailer) == len(data_frames) == len(lengths)
    for (_, start, length, payload), entry in zip(data_frames, walked.trailer, strict=True):
        if length < max_piece:
            assert type(entry) is int
            assert entry == len(payload)
        else:
            ((total, sizes),) = entry.items()
            assert int(total) == sum(sizes) == len(payload)
            assert len(sizes) == math.ceil(length / max_piece)
        pieces = split_pieces(entry, payload)
        for i, piece in enumerate(pieces):
            check_lz4_frame(piece, payloads[start][i * max_piece : (i + 1) * max_piece])


# --- the meta JSON ----------------------------------------------------------------------------


@pytest.mark.parametrize("level", [False, 0, 1, 2, 4])
def test_meta_json_has_every_key_of_the_spec(level: Compression) -> None:
    raw, _ = write([("data", 0, 300), ("data", 400, 100)], level)
    assert raw.startswith(b"meta 0000000000000000 ")
    length = int(raw[22:38], 16)
    text = raw[40 : 40 + length]
    assert raw[40 + length : 42 + length] == b"\r\n"
    doc = json.loads(text.decode("utf-8"))
    assert set(doc) >= SPEC_META_KEYS
    assert doc["virtualSize"] == 1 << 30
    assert doc["dataSize"] == 400
    assert doc["diskName"] == "sda"
    assert doc["diskFormat"] == "raw"
    assert doc["checkpointName"] == "virtnbdbackup.3"
    assert doc["parentCheckpoint"] == "virtnbdbackup.2"
    assert doc["incremental"] is True
    assert doc["compressionMethod"] == "lz4"
    assert doc["streamVersion"] == 2
    if level is False:
        assert doc["compressed"] is False
        assert b'"compressed": false' in text
        assert b"comp 0000" not in raw
        assert raw.endswith(STOP)
    else:
        assert type(doc["compressed"]) is int
        assert doc["compressed"] == level
        assert b'"compressed": %d' % level in text
        assert raw[-40:].startswith(b"comp ")


def test_meta_json_date_defaults_to_local_iso_time_with_microseconds() -> None:
    raw, _ = write([], False, date="")
    length = int(raw[22:38], 16)
    doc = json.loads(raw[40 : 40 + length])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}", doc["date"]), doc["date"]


def test_meta_json_is_indented_by_four_spaces() -> None:
    raw, _ = write([], 2)
    length = int(raw[22:38], 16)
    assert raw[40 : 40 + length].startswith(b'{\n    "virtualSize": ')
