"""StreamReader on damaged files: every damage is a StreamError naming the file (and offset)."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from libvirtnbdbackup.errors import StreamError
from libvirtnbdbackup.format import frames
from libvirtnbdbackup.format.frames import Kind
from libvirtnbdbackup.format.meta import StreamMeta
from libvirtnbdbackup.format.reader import StreamReader, is_stream_file, read_meta
from libvirtnbdbackup.format.writer import StreamWriter

from .samples import compress_piece, sample_meta

NAME = "/backups/vm1/vda.full.data"
MAX_PIECE = 256
DATA1 = bytes(range(256)) + b"\x00" * 44  # 300 bytes: one piece
DATA2 = b"0123456789abcdef" * 44  # 704 bytes: three pieces of at most 256
DATA_SIZE = len(DATA1) + len(DATA2)
STOP = frames.encode(Kind.STOP, 0, 0)


def make_meta(compressed: bool | int, data_size: int = DATA_SIZE) -> StreamMeta:
    return sample_meta(compressed=compressed, data_size=data_size)


def write_valid(compressed: bool | int, out: BinaryIO | None = None) -> bytes:
    """meta, data 0+300, zero 300+700, data 1000+704, stop (and trailer)."""
    buf = io.BytesIO() if out is None else out
    writer = StreamWriter(buf, make_meta(compressed), max_piece=MAX_PIECE)
    writer.data(0, len(DATA1), [DATA1])
    writer.zero(300, 700)
    writer.data(1000, len(DATA2), [DATA2])
    writer.finish()
    return buf.getvalue() if isinstance(buf, io.BytesIO) else b""


@dataclass(frozen=True)
class Layout:
    """Offsets of the parts of the uncompressed stream written by write_valid(False)."""

    raw: bytes
    meta_len: int

    @property
    def data1(self) -> int:
        return 42 + self.meta_len

    @property
    def zero(self) -> int:
        return self.data1 + 40 + len(DATA1) + 2

    @property
    def data2(self) -> int:
        return self.zero + 40

    @property
    def stop(self) -> int:
        return self.data2 + 40 + len(DATA2) + 2


def uncompressed_layout() -> Layout:
    raw = write_valid(False)
    layout = Layout(raw, int(raw[22:38], 16))
    assert raw[layout.data1 : layout.data1 + 5] == b"data "
    assert raw[layout.zero : layout.zero + 5] == b"zero "
    assert raw[layout.data2 : layout.data2 + 5] == b"data "
    assert raw[layout.stop :] == STOP
    return layout


def consume(raw: bytes, read_payloads: bool = True) -> list[tuple[Kind, int, int, bytes]]:
    reader = StreamReader(io.BytesIO(raw), NAME)
    got = []
    for frame in reader.frames():
        payload = b""
        if read_payloads and frame.kind is Kind.DATA:
            payload = b"".join(bytes(c) for c in reader.payload(frame, 100))
        got.append((frame.kind, frame.start, frame.length, payload))
    return got


EXPECTED = [
    (Kind.DATA, 0, len(DATA1), DATA1),
    (Kind.ZERO, 300, 700, b""),
    (Kind.DATA, 1000, len(DATA2), DATA2),
]


def craft(doc: dict[str, Any], body: bytes, trailer: list[Any] | None = None) -> bytes:
    """A stream assembled by hand from the spec: meta, ``body``, stop (and ``trailer``)."""
    text = json.dumps(doc).encode()
    raw = frames.encode(Kind.META, 0, len(text)) + text + b"\r\n" + body + STOP
    if trailer is not None:
        t = json.dumps(trailer).encode()
        raw += t + b"\r\n" + frames.encode(Kind.COMP, 0, len(t))
    return raw


def data_frame(start: int, data: bytes, level: int | None = None) -> tuple[bytes, int]:
    payload = data if level is None else compress_piece(data, level)
    return frames.encode(Kind.DATA, start, len(data)) + payload + b"\r\n", len(payload)


# --- the valid streams read back (controls for everything below) -------------------------------


@pytest.mark.parametrize("compressed", [False, 0, 2])
@pytest.mark.parametrize("read_payloads", [True, False])
def test_valid_stream_reads_back(compressed: bool | int, read_payloads: bool) -> None:
    got = consume(write_valid(compressed), read_payloads)
    if read_payloads:
        assert got == EXPECTED
    else:
        assert [g[:3] for g in got] == [e[:3] for e in EXPECTED]


# --- truncation -------------------------------------------------------------------------------


@pytest.mark.parametrize("read_payloads", [True, False])
def test_uncompressed_truncated_anywhere(read_payloads: bool) -> None:
    raw = uncompressed_layout().raw
    for cut in range(len(raw)):
        with pytest.raises(StreamError) as err:
            consume(raw[:cut], read_payloads)
        message = str(err.value)
        assert NAME in message, (cut, message)
        assert "offset" in message, (cut, message)


# Where the file is cut, and the range in which the reported offset must lie: the header or
# CR LF being read, or (for a payload, read in chunks) the start of the chunk being read.
CUTS: dict[str, Any] = {
    "first header": lambda lay: (10, 0, 0),
    "meta JSON": lambda lay: (45, 40, 40),
    "meta CR LF": lambda lay: (41 + lay.meta_len, 40 + lay.meta_len, 40 + lay.meta_len),
    "data header": lambda lay: (lay.data1 + 17, lay.data1, lay.data1),
    "data payload": lambda lay: (lay.data1 + 40 + 123, lay.data1 + 40, lay.data1 + 40 + 123),
    "payload CR LF": lambda lay: (lay.zero - 1, lay.zero - 2, lay.zero - 2),
    "zero header": lambda lay: (lay.zero + 39, lay.zero, lay.zero),
    "second payload": lambda lay: (lay.data2 + 41, lay.data2 + 40, lay.data2 + 40),
    "missing stop": lambda lay: (lay.stop, lay.stop, lay.stop),
    "stop header": lambda lay: (lay.stop + 20, lay.stop, lay.stop),
}


@pytest.mark.parametrize("part", list(CUTS))
def test_uncompressed_truncation_names_the_offset(part: str) -> None:
    layout = uncompressed_layout()
    cut, low, high = CUTS[part](layout)
    with pytest.raises(StreamError) as err:
        consume(layout.raw[:cut])
    message = str(err.value)
    match = re.match(re.escape(NAME) + r" at offset (\d+): ", message)
    assert match, (part, message)
    assert low <= int(match.group(1)) <= high, (part, message)


@pytest.mark.parametrize("level", [0, 2])
def test_compressed_truncated_anywhere(level: int) -> None:
    raw = write_valid(level)
    for cut in range(len(raw)):
        with pytest.raises(StreamError) as err:
            consume(raw[:cut])
        assert NAME in str(err.value), (cut, str(err.value))


def test_compressed_without_trailer() -> None:
    raw = write_valid(2)
    at_stop = raw.index(STOP) + len(STOP)
    with pytest.raises(StreamError) as err:
        consume(raw[:at_stop])
    assert NAME in str(err.value)


@pytest.mark.parametrize("replacement", [b"XY", b"\n\n", b"\r "])
def test_compressed_trailer_without_its_cr_lf(replacement: bytes) -> None:
    raw = write_valid(2)
    assert raw[-42:-40] == b"\r\n"
    with pytest.raises(StreamError) as err:
        consume(raw[:-42] + replacement + raw[-40:])
    assert NAME in str(err.value)


def test_compressed_missing_stop() -> None:
    raw = write_valid(2)
    stop = raw.index(STOP)
    with pytest.raises(StreamError) as err:
        consume(raw[:stop] + raw[stop + len(STOP) :])
    assert f"{NAME} at offset {stop}" in str(err.value)


# --- damaged payloads -------------------------------------------------------------------------


def compressed_payload_ranges(raw: bytes) -> list[range]:
    """Where the two compressed payloads of write_valid(level) lie, found from the trailer."""
    length = int(raw[-42:-2].split(b" ")[2], 16)
    entry1, entry2 = json.loads(raw[-42 - length : -42])
    size1 = entry1 if isinstance(entry1, int) else int(next(iter(entry1)))
    size2 = entry2 if isinstance(entry2, int) else int(next(iter(entry2)))
    start1 = raw.index(frames.encode(Kind.DATA, 0, len(DATA1))) + 40
    start2 = raw.index(frames.encode(Kind.DATA, 1000, len(DATA2))) + 40
    assert raw[start1 + size1 : start1 + size1 + 42] == b"\r\n" + frames.encode(Kind.ZERO, 300, 700)
    assert raw[start2 + size2 : start2 + size2 + 42] == b"\r\n" + STOP
    return [range(start1, start1 + size1), range(start2, start2 + size2)]


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_flipped_byte_in_compressed_payload(mask: int) -> None:
    raw = write_valid(2)
    ranges = compressed_payload_ranges(raw)
    assert isinstance(json.loads(raw[-42 - int(raw[-18:-2], 16) : -42])[1], dict)  # 3 pieces
    for pos in (p for r in ranges for p in r):
        damaged = bytearray(raw)
        damaged[pos] ^= mask
        with pytest.raises(StreamError) as err:
            consume(bytes(damaged))
        assert NAME in str(err.value), pos
        assert "offset" in str(err.value), pos


def test_flipped_byte_in_uncompressed_payload_is_not_an_error() -> None:
    # Control: without compression there is nothing to check a payload against.
    layout = uncompressed_layout()
    damaged = bytearray(layout.raw)
    damaged[layout.data1 + 40 + 5] ^= 0xFF
    got = consume(bytes(damaged))
    assert got[0][3] != DATA1 and got[1:] == EXPECTED[1:]


def test_compressed_payload_with_a_wrong_length() -> None:
    doc = make_meta(2, 11).to_json()
    packed = compress_piece(b"x" * 10, 2)
    body = frames.encode(Kind.DATA, 0, 11) + packed + b"\r\n"
    with pytest.raises(StreamError) as err:
        consume(craft(doc, body, [len(packed)]))
    assert NAME in str(err.value)


def test_garbage_instead_of_cr_lf_after_a_payload() -> None:
    layout = uncompressed_layout()
    damaged = bytearray(layout.raw)
    damaged[layout.zero - 2 : layout.zero] = b"XY"
    with pytest.raises(StreamError) as err:
        consume(bytes(damaged))
    assert f"{NAME} at offset {layout.zero - 2}" in str(err.value)


# --- dataSize ---------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [None, 0, 3])
@pytest.mark.parametrize("announced", [DATA_SIZE - 1, DATA_SIZE + 1, 0])
@pytest.mark.parametrize("read_payloads", [True, False])
def test_data_size_mismatch_raises_once_frames_are_exhausted(
    level: int | None, announced: int, read_payloads: bool
) -> None:
    first, size1 = data_frame(0, DATA1, level)
    second, size2 = data_frame(1000, DATA2, level)
    body = first + frames.encode(Kind.ZERO, 300, 700) + second
    trailer = None if level is None else [size1, size2]
    compressed = False if level is None else level

    # Control: the hand-made stream is valid with the right dataSize.
    assert consume(craft(make_meta(compressed).to_json(), body, trailer)) == EXPECTED

    raw = craft(make_meta(compressed, announced).to_json(), body, trailer)
    reader = StreamReader(io.BytesIO(raw), NAME)
    assert reader.meta.data_size == announced
    seen = []
    with pytest.raises(StreamError) as err:
        for frame in reader.frames():
            seen.append((frame.kind, frame.start, frame.length))
            if read_payloads and frame.kind is Kind.DATA:
                for _ in reader.payload(frame):
                    pass
    assert seen == [e[:3] for e in EXPECTED]  # every frame came out before the error
    assert NAME in str(err.value)
    assert "dataSize" in str(err.value)


# --- other damage -----------------------------------------------------------------------------


def test_file_must_start_with_a_meta_frame() -> None:
    raw = frames.encode(Kind.DATA, 0, 4) + b"abcd\r\n" + STOP
    with pytest.raises(StreamError) as err:
        StreamReader(io.BytesIO(raw), NAME)
    assert f"{NAME} at offset 0" in str(err.value)


@pytest.mark.parametrize(
    "text",
    [b"{not json", b"[1, 2]", b'{"dataSize": 1}', b'{"virtualSize": 1, "dataSize": 0}'],
)
def test_damaged_meta_json(text: bytes) -> None:
    raw = frames.encode(Kind.META, 0, len(text)) + text + b"\r\n" + STOP
    with pytest.raises(StreamError) as err:
        StreamReader(io.BytesIO(raw), NAME)
    assert NAME in str(err.value)


def test_extent_beyond_the_disk_size() -> None:
    doc = make_meta(False, 0).to_json()
    doc["virtualSize"] = 1000
    body = frames.encode(Kind.ZERO, 0, 900) + frames.encode(Kind.ZERO, 900, 101)
    raw = craft(doc, body)
    position = raw.index(b"zero 0000000000000384")
    with pytest.raises(StreamError) as err:
        consume(raw)
    assert f"{NAME} at offset {position}" in str(err.value)


def test_unexpected_frame_kind_in_the_extents() -> None:
    doc = make_meta(False, 0).to_json()
    raw = craft(doc, frames.encode(Kind.META, 0, 0))
    with pytest.raises(StreamError) as err:
        consume(raw)
    assert NAME in str(err.value) and "offset" in str(err.value)


def test_more_data_frames_than_trailer_entries() -> None:
    first, size1 = data_frame(0, DATA1, 1)
    second, _ = data_frame(1000, DATA2, 1)
    raw = craft(make_meta(1).to_json(), first + second, [size1])
    with pytest.raises(StreamError) as err:
        consume(raw)
    assert NAME in str(err.value)


@pytest.mark.parametrize("trailer", [b"{}", b"[1, ", b'["12"]', b"[true]", b"[1.5]"])
def test_damaged_trailer(trailer: bytes) -> None:
    first, _ = data_frame(0, DATA1, 1)
    text = json.dumps(make_meta(1, len(DATA1)).to_json()).encode()
    raw = frames.encode(Kind.META, 0, len(text)) + text + b"\r\n" + first + STOP
    raw += trailer + b"\r\n" + frames.encode(Kind.COMP, 0, len(trailer))
    with pytest.raises(StreamError) as err:
        consume(raw)
    assert NAME in str(err.value)


# --- read_meta and is_stream_file -------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, 0, 4])
def test_read_meta_returns_the_meta(tmp_path: Path, compressed: bool | int) -> None:
    path = tmp_path / "vda.full.data"
    with path.open("wb") as fh:
        write_valid(compressed, fh)
    assert read_meta(str(path)) == make_meta(compressed)
    assert is_stream_file(str(path)) is True


@pytest.mark.parametrize(
    "content",
    [
        bytes(4096),
        b"",
        b"meta 0000",
        b"QFI\xfb" + bytes(4092),
        bytes(range(256)) * 16,
        b"\r\n" * 2048,
    ],
)
def test_raw_images_are_not_stream_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "vda.copy.data"
    path.write_bytes(content)
    assert is_stream_file(str(path)) is False


def test_read_meta_of_a_raw_image(tmp_path: Path) -> None:
    path = tmp_path / "vda.copy.data"
    path.write_bytes(bytes(4096))
    with pytest.raises(StreamError) as err:
        read_meta(str(path))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("name", ["vda.full.data", "vda.inc.virtnbdbackup.1.data", "x.data"])
def test_a_file_named_as_a_stream_is_a_stream_whatever_it_holds(tmp_path: Path, name: str) -> None:
    """Issue 12, item 1: a damaged first frame made the file a "raw image"."""
    path = tmp_path / name
    path.write_bytes(frames.encode(Kind.DATA, 0, 4) + b"abcd\r\n" + STOP)
    assert is_stream_file(str(path)) is True
    with pytest.raises(StreamError, match=f"{name} at offset 0: file does not start with a meta"):
        read_meta(str(path))


def test_a_copy_with_a_checksum_file_is_a_stream(tmp_path: Path) -> None:
    """Raw images get no .chksum: a copy that has one is a (damaged) stream."""
    path = tmp_path / "vda.copy.data"
    path.write_bytes(b"meta 0000")  # truncated in its first header
    assert is_stream_file(str(path)) is False
    (tmp_path / "vda.copy.data.chksum").write_text("1")
    assert is_stream_file(str(path)) is True
    with pytest.raises(StreamError, match=r"vda.copy.data at offset 0: stream ends after 9 of 40"):
        read_meta(str(path))


# --- damaged headers and trailers that once slipped past the reader ----------------------


def test_comp_length_beyond_the_start_of_the_file(tmp_path: Path) -> None:
    raw = write_valid(2)
    raw = raw[:-40] + frames.encode(Kind.COMP, 0, len(raw) * 2)
    path = tmp_path / "vda.full.data"
    path.write_bytes(raw)
    with path.open("rb") as fh, pytest.raises(StreamError):
        StreamReader(fh, NAME)


@pytest.mark.parametrize("entry", [{}, {"5": 5}])
def test_malformed_object_trailer_entry(entry: dict[str, Any]) -> None:
    first, _ = data_frame(0, DATA1, 1)
    raw = craft(make_meta(1, len(DATA1)).to_json(), first, [entry])
    with pytest.raises(StreamError):
        consume(raw)


@pytest.mark.parametrize("use_read_meta", [False, True])
def test_huge_meta_length(tmp_path: Path, use_read_meta: bool) -> None:
    raw = bytearray(write_valid(False))
    raw[22:38] = b"7fffffffffffffff"
    path = tmp_path / "vda.full.data"
    path.write_bytes(bytes(raw))
    with pytest.raises(StreamError):
        if use_read_meta:
            read_meta(str(path))
        else:
            with path.open("rb") as fh:
                StreamReader(fh, NAME)
