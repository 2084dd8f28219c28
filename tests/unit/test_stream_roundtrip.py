"""Round trip StreamWriter -> StreamReader over random extent layouts (stream-format.md)."""

from __future__ import annotations

import io
import itertools
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import lz4.frame
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libvirtnbdbackup.errors import StreamError
from libvirtnbdbackup.format import checksum, frames
from libvirtnbdbackup.format.frames import HEADER_SIZE, Kind
from libvirtnbdbackup.format.index import file_fingerprint
from libvirtnbdbackup.format.meta import StreamMeta
from libvirtnbdbackup.format.reader import StreamReader, adler32_concat, file_adler32
from libvirtnbdbackup.format.writer import (
    PieceCompressor,
    StreamWriter,
    compress_pieces,
    piece_lengths,
)

from .samples import sample_meta

Compression = bool | int
# kind, start, length, payload (empty for zero frames)
ReadFrame = tuple[Kind, int, int, bytes]


@dataclass(frozen=True)
class Extent:
    kind: Kind
    start: int
    length: int
    data: bytes = b""
    # Where the writer's input is cut into chunks (offsets inside the extent).
    cuts: tuple[int, ...] = ()
    chunk_type: str = "bytes"

    def chunks(self) -> list[bytes | bytearray | memoryview]:
        bounds = [0, *self.cuts, self.length]
        parts = [self.data[a:b] for a, b in itertools.pairwise(bounds)]
        if self.chunk_type == "bytearray":
            return [bytearray(p) for p in parts]
        if self.chunk_type == "memoryview":
            return [memoryview(p) for p in parts]
        return list(parts)


def make_meta(virtual_size: int, data_size: int, compressed: Compression) -> StreamMeta:
    return sample_meta(virtual_size=virtual_size, data_size=data_size, compressed=compressed)


def write_stream(
    extents: list[Extent],
    virtual_size: int,
    compressed: Compression,
    *,
    max_piece: int,
    packed: bool = False,
) -> tuple[bytes, int, int]:
    """The bytes written, the checksum finish() returned, and bytes_written.

    ``packed``: compressed data frames arrive compressed, piece by piece, as
    the backup's compression lanes hand them over.
    """
    data_size = sum(e.length for e in extents if e.kind is Kind.DATA)
    out = io.BytesIO()
    writer = StreamWriter(out, make_meta(virtual_size, data_size, compressed), max_piece=max_piece)
    for e in extents:
        if e.kind is Kind.DATA and packed and compressed is not False:
            payload, pieces, pos = b"".join(e.chunks()), [], 0
            for length in piece_lengths(e.length, max_piece):
                pieces.append(compress_pieces(payload[pos : pos + length], int(compressed)))
                pos += length
            writer.packed(e.start, e.length, pieces)
        elif e.kind is Kind.DATA:
            writer.data(e.start, e.length, e.chunks())
        else:
            writer.zero(e.start, e.length)
    checksum = writer.finish()
    return out.getvalue(), checksum, writer.bytes_written


def read_stream(raw: bytes, chunk_size: int) -> tuple[StreamReader, list[ReadFrame]]:
    reader = StreamReader(io.BytesIO(raw), "test.data")
    got: list[ReadFrame] = []
    for frame in reader.frames():
        assert raw[frame.position : frame.position + HEADER_SIZE] == frames.encode(
            frame.kind, frame.start, frame.length
        )
        payload = b""
        if frame.kind is Kind.DATA:
            for chunk in reader.payload(frame, chunk_size):
                assert 0 < len(chunk) <= chunk_size
                payload += bytes(chunk)
        got.append((frame.kind, frame.start, frame.length, payload))
    return reader, got


# --- strategies -------------------------------------------------------------------------------

noisy = st.binary(min_size=1, max_size=3000)
repetitive = st.tuples(st.binary(min_size=1, max_size=8), st.integers(1, 3000)).map(
    lambda t: (t[0] * t[1])[: t[1]]
)


@st.composite
def layouts(draw: st.DrawFn) -> tuple[int, list[Extent]]:
    """A virtual size and sorted, non-overlapping extents (adjacent ones included)."""
    extents: list[Extent] = []
    pos = draw(st.integers(0, 100))
    for _ in range(draw(st.integers(0, 8))):
        pos += draw(st.one_of(st.just(0), st.integers(1, 5000)))
        if draw(st.booleans()):
            data = draw(st.one_of(noisy, repetitive))
            cuts = draw(
                st.lists(st.integers(0, len(data)), max_size=4).map(lambda c: tuple(sorted(c)))
            )
            chunk_type = draw(st.sampled_from(["bytes", "bytearray", "memoryview"]))
            extents.append(Extent(Kind.DATA, pos, len(data), data, cuts, chunk_type))
            pos += len(data)
        else:
            length = draw(st.integers(1, 1 << 40))
            extents.append(Extent(Kind.ZERO, pos, length))
            pos += length
    virtual_size = pos + draw(st.integers(0, 4096))
    return virtual_size, extents


def expected_frames(extents: list[Extent]) -> list[ReadFrame]:
    return [(e.kind, e.start, e.length, e.data) for e in extents]


def uncompressed_body(extents: list[Extent]) -> bytes:
    """What follows the meta frame in an uncompressed file, built from the spec alone."""
    body = b""
    for e in extents:
        if e.kind is Kind.DATA:
            body += b"data %016x %016x\r\n" % (e.start, e.length) + e.data + b"\r\n"
        else:
            body += b"zero %016x %016x\r\n" % (e.start, e.length)
    return body + b"stop 0000000000000000 0000000000000000\r\n"


# --- properties -------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=layouts(),
    compressed=st.one_of(st.just(False), st.integers(0, 4)),
    max_piece=st.one_of(st.integers(64, 512), st.integers(64, 4096)),
    chunk_size=st.integers(1, 5000),
)
def test_round_trip(
    layout: tuple[int, list[Extent]],
    compressed: Compression,
    max_piece: int,
    chunk_size: int,
) -> None:
    virtual_size, extents = layout
    raw, checksum, written = write_stream(extents, virtual_size, compressed, max_piece=max_piece)

    assert checksum == zlib.adler32(raw)
    assert written == len(raw)

    reader, got = read_stream(raw, chunk_size)
    data_size = sum(e.length for e in extents if e.kind is Kind.DATA)
    assert got == expected_frames(extents)
    assert reader.meta == make_meta(virtual_size, data_size, compressed)
    assert reader.meta.data_size == data_size

    # The meta frame as stored in the file.
    meta_len = frames.decode(raw[:HEADER_SIZE], "test").length
    doc = json.loads(raw[HEADER_SIZE : HEADER_SIZE + meta_len])
    assert doc["dataSize"] == data_size
    assert doc["virtualSize"] == virtual_size
    body = raw[HEADER_SIZE + meta_len + 2 :]
    if compressed is False:
        assert body == uncompressed_body(extents)
    else:
        assert raw[-HEADER_SIZE:].startswith(b"comp ")

    # Pieces compressed elsewhere (the backup's lanes) give the same bytes.
    raw_packed, checksum_packed, _ = write_stream(
        extents, virtual_size, compressed, max_piece=max_piece, packed=True
    )
    assert raw_packed == raw
    assert checksum_packed == checksum


@settings(max_examples=30, deadline=None)
@given(layout=layouts(), compressed=st.one_of(st.just(False), st.integers(0, 4)))
def test_frames_are_skipped_when_payloads_are_not_read(
    layout: tuple[int, list[Extent]], compressed: Compression
) -> None:
    virtual_size, extents = layout
    raw, _, _ = write_stream(extents, virtual_size, compressed, max_piece=256)
    reader = StreamReader(io.BytesIO(raw), "test.data")
    got = [(f.kind, f.start, f.length) for f in reader.frames()]
    assert got == [(e.kind, e.start, e.length) for e in extents]


# --- examples ---------------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, 0, 2])
def test_writer_does_not_merge_adjacent_extents(compressed: Compression) -> None:
    extents = [
        Extent(Kind.DATA, 0, 100, b"a" * 100),
        Extent(Kind.DATA, 100, 50, b"b" * 50),
        Extent(Kind.ZERO, 150, 200),
        Extent(Kind.ZERO, 350, 10),
        Extent(Kind.DATA, 360, 5, b"ccccc"),
    ]
    raw, _, _ = write_stream(extents, 1000, compressed, max_piece=64)
    assert raw.count(b"\r\ndata ") == 3
    assert raw.count(b"zero 0000") == 2
    _, got = read_stream(raw, 4096)
    assert got == expected_frames(extents)
    if compressed is False:
        assert raw.endswith(uncompressed_body(extents))


def test_writer_writes_data_that_is_all_zero_as_data() -> None:
    extents = [Extent(Kind.DATA, 0, 512, bytes(512)), Extent(Kind.ZERO, 512, 512)]
    raw, _, _ = write_stream(extents, 1024, False, max_piece=4096)
    _, got = read_stream(raw, 4096)
    assert got == expected_frames(extents)


@pytest.mark.parametrize("compressed", [False, 3])
def test_empty_stream(compressed: Compression) -> None:
    raw, checksum, _ = write_stream([], 0, compressed, max_piece=64)
    assert checksum == zlib.adler32(raw)
    reader, got = read_stream(raw, 10)
    assert got == []
    assert reader.meta.data_size == 0


@pytest.mark.parametrize("compressed", [False, 1])
def test_file_adler32_matches_the_writer(tmp_path: Path, compressed: Compression) -> None:
    extents = [Extent(Kind.DATA, 0, 3000, bytes(range(256)) * 11 + b"x" * 184)]
    path = tmp_path / "vda.full.data"
    with path.open("wb") as fh:
        writer = StreamWriter(fh, make_meta(4096, 3000, compressed), max_piece=1024)
        writer.data(0, 3000, [extents[0].data])
        checksum = writer.finish()
    raw = path.read_bytes()
    assert checksum == zlib.adler32(raw)
    assert file_adler32(str(path)) == checksum
    assert file_adler32(str(path), chunk_size=7) == checksum


def test_checksum_starts_at_one() -> None:
    # zlib's Adler-32 with starting value 1: an empty input gives 1, "a" gives 0x00620062.
    assert zlib.adler32(b"") == 1
    raw, checksum, _ = write_stream([], 0, False, max_piece=64)
    a, b = 1, 0
    for byte in raw:
        a = (a + byte) % 65521
        b = (b + a) % 65521
    assert checksum == (b << 16) | a


def test_writer_refuses_a_wrong_data_size() -> None:
    out = io.BytesIO()
    writer = StreamWriter(out, make_meta(1000, 99, False), max_piece=64)
    writer.data(0, 100, [b"x" * 100])
    with pytest.raises(StreamError):
        writer.finish()


def test_writer_refuses_a_short_source() -> None:
    out = io.BytesIO()
    writer = StreamWriter(out, make_meta(1000, 100, False), max_piece=64)
    with pytest.raises(StreamError):
        writer.data(0, 100, [b"x" * 99])


@pytest.mark.parametrize(("offset", "length"), [(50, 10), (99, 1), (200, 0)])
def test_writer_refuses_overlapping_or_empty_extents(offset: int, length: int) -> None:
    writer = StreamWriter(io.BytesIO(), make_meta(1000, 100, False), max_piece=64)
    writer.data(0, 100, [b"x" * 100])
    with pytest.raises(ValueError):
        writer.zero(offset, length)


def test_reader_does_not_care_about_meta_indentation() -> None:
    doc = make_meta(100, 4, False).to_json()
    compact = json.dumps(doc, separators=(",", ":")).encode()
    raw = (
        frames.encode(Kind.META, 0, len(compact))
        + compact
        + b"\r\n"
        + frames.encode(Kind.DATA, 8, 4)
        + b"abcd\r\n"
        + frames.encode(Kind.STOP, 0, 0)
    )
    reader, got = read_stream(raw, 4096)
    assert reader.meta == make_meta(100, 4, False)
    assert got == [(Kind.DATA, 8, 4, b"abcd")]


@given(data=st.binary(max_size=200_000), cuts=st.lists(st.integers(1, 70_000), max_size=8))
@settings(max_examples=50, deadline=None)
def test_a_piece_fed_in_parts_is_the_one_shot_lz4_frame(data: bytes, cuts: list[int]) -> None:
    packer = PieceCompressor(len(data), 2)
    pos = 0
    for cut in cuts:
        packer.feed(data[pos : pos + cut])
        pos += cut
    packer.feed(data[pos:])
    one_shot = lz4.frame.compress(
        data, compression_level=2, block_checksum=True, content_checksum=True
    )
    assert b"".join(packer.finish()) == one_shot


def test_packed_frames_need_the_pieces_the_format_cuts() -> None:
    writer = StreamWriter(io.BytesIO(), make_meta(4096, 2000, 2), max_piece=1000)
    with pytest.raises(ValueError, match="wrong number of pieces"):
        writer.packed(0, 2000, [compress_pieces(bytes(2000), 2)])
    plain = StreamWriter(io.BytesIO(), make_meta(4096, 2000, False), max_piece=1000)
    with pytest.raises(ValueError, match="uncompressed stream"):
        plain.packed(0, 2000, [[b""], [b""]])


@settings(max_examples=200, deadline=None)
@given(a=st.binary(max_size=3000), b=st.binary(max_size=3000), big=st.booleans())
def test_adler32_concat_equals_the_sum_of_the_whole(a: bytes, b: bytes, big: bool) -> None:
    if big:  # lengths past the modulus, and sums that wrap
        a, b = a * 50 + b"\xff" * 70000, b"\xfe" * 66000 + b
    assert adler32_concat(zlib.adler32(a), zlib.adler32(b), len(b)) == zlib.adler32(a + b)


def test_file_adler32_over_many_segments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("libvirtnbdbackup.format.reader.SEGMENT", 1000)
    data = bytes(range(256)) * 37 + b"\xff" * 5001
    path = tmp_path / "f"
    path.write_bytes(data)
    for threads in (1, 3):
        assert file_adler32(str(path), chunk_size=333, threads=threads) == zlib.adler32(data)
    path.write_bytes(b"")
    assert file_adler32(str(path)) == 1


ADLER_HALF = st.integers(min_value=0, max_value=65520)  # each sum is kept modulo 65521


@given(st.binary(max_size=100_000), ADLER_HALF, ADLER_HALF)
def test_checksum_is_zlibs_adler32(data: bytes, low: int, high: int) -> None:
    start = high << 16 | low  # any running value a file's checksum can pass through
    assert checksum.adler32(data, start) == zlib.adler32(data, start)


def test_checksum_uses_zlib_ng_where_installed() -> None:
    from zlib_ng import zlib_ng  # a dependency of the package: the commands get the fast one

    assert checksum.adler32 is zlib_ng.adler32


@pytest.mark.parametrize("level", [False, 2])
def test_the_index_fingerprint_is_that_of_the_written_file(
    tmp_path: Path, level: Compression
) -> None:
    # Writes of every size around the fingerprint span, from reused buffers
    # (uncompressed) or as many small compressed parts.
    lengths = [10, 70_000, 3, 65_536, 200_000, 1, 140_000]
    meta = make_meta(1 << 24, sum(lengths), level)
    path = tmp_path / "vda.full.data"
    with open(path, "wb") as fh:
        writer = StreamWriter(fh, meta, max_piece=100_000)
        reused = bytearray(200_000)
        offset = 0
        for n, length in enumerate(lengths):
            reused[:length] = bytes([n + 1]) * length
            writer.data(offset, length, [memoryview(reused)[:length]])
            offset += length + 4096
        writer.finish()
    with open(path, "rb") as fh:
        expected = file_fingerprint(fh, path.stat().st_size)
    assert writer.index(path.name).fingerprint == expected
