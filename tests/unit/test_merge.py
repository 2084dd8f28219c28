"""Merging a chain into one full stream, checked against a restore model.

Chains are built with the writer (full, incrementals with data and zero
frames, plain and lz4, pieces smaller than extents); the merged file is
read back with the reader and through its index, and must equal the model.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libvirtnbdbackup.errors import StreamError
from libvirtnbdbackup.format.chainimage import ChainImage
from libvirtnbdbackup.format.checksum import adler32
from libvirtnbdbackup.format.frames import Kind
from libvirtnbdbackup.format.index import build_index
from libvirtnbdbackup.format.merge import merge_chain, verify_merged
from libvirtnbdbackup.format.reader import StreamReader
from libvirtnbdbackup.format.zeros import zeros_of_index, zeros_path

from .test_chainimage import BLOCK, SIZE, Frame, apply, layouts, write_file

PIECE = 3 * BLOCK  # the piece size write_file cuts compressed extents at


def write_chain(folder: Path, layers: list[list[Frame]], compressed: list[bool]) -> list[str]:
    paths = []
    for n, frames in enumerate(layers):
        path = folder / f"{n}.data"
        write_file(path, frames, incremental=n > 0, compressed=2 if compressed[n] else False)
        path.with_name(path.name + ".chksum").write_text(str(adler32(path.read_bytes())))
        paths.append(str(path))
    return paths


def merge_to(paths: list[str], out: Path) -> None:
    with open(out, "wb") as fh:
        result = merge_chain(paths, fh, out.name, max_piece=PIECE)
    assert result.adler32 == adler32(out.read_bytes())
    with open(out, "rb") as fh:
        assert build_index(fh, str(out)) == result.index
    verify_merged(paths, str(out), result.segments, full=True)


def stream_bytes(path: Path) -> tuple[bytes, list[Kind]]:
    """The disk a restore of this one full file writes, and its frame kinds."""
    disk = bytearray(SIZE)
    kinds = []
    with open(path, "rb") as fh:
        reader = StreamReader(fh, str(path))
        assert not reader.meta.incremental and reader.meta.parent_checkpoint == ""
        covered = 0
        for frame in reader.frames():
            assert frame.start == covered, "frames must tile the disk"
            covered += frame.length
            kinds.append(frame.kind)
            if frame.kind is Kind.DATA:
                disk[frame.start : frame.start + frame.length] = b"".join(reader.payload(frame))
        assert covered == SIZE
    return bytes(disk), kinds


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    base=layouts(full=True),
    incs=st.lists(layouts(full=False), min_size=1, max_size=4),
    compressed=st.lists(st.booleans(), min_size=5, max_size=5),
)
def test_merged_full_restores_like_the_chain(
    tmp_path_factory: pytest.TempPathFactory,
    base: list[Frame],
    incs: list[list[Frame]],
    compressed: list[bool],
) -> None:
    folder = tmp_path_factory.mktemp("merge")
    model = bytearray(SIZE)
    for frames in [base, *incs]:
        apply(model, frames)
    paths = write_chain(folder, [base, *incs], compressed)
    out = folder / "merged.data"
    merge_to(paths, out)
    disk, kinds = stream_bytes(out)
    assert disk == bytes(model)
    with open(out, "rb") as fh:
        meta = StreamReader(fh, str(out)).meta
    assert meta.checkpoint_name == "virtnbdbackup.1"
    assert meta.compressed == (2 if compressed[0] else False)
    image = ChainImage([str(out)])
    try:
        assert image.read(0, SIZE) == bytes(model)
    finally:
        image.close()
    assert kinds  # the file is not empty


def test_whole_compressed_extents_and_pieces_are_copied_as_stored(tmp_path: Path) -> None:
    base: list[Frame] = [(0, 20, 7), (20, 24, None), (44, 20, 9)]
    inc: list[Frame] = [(50, 4, 3)]  # cuts the second extent, leaves the first whole
    paths = write_chain(tmp_path, [base, inc], [True, True])
    out = tmp_path / "merged.data"
    with open(out, "wb") as fh:
        result = merge_chain(paths, fh, out.name, max_piece=PIECE)
    # Copied as stored: the first extent and the inc's, whole; of the second
    # (44..64, pieces of 3 blocks from 44), the pieces the inc leaves whole:
    # 44-47, 47-50, 56-59, 59-62, 62-64. 50-53 and 53-56 are compressed again.
    assert result.copied_whole == (20 + 4 + 14) * 4096
    src = Path(paths[0]).read_bytes()
    with open(paths[0], "rb") as fh:
        first = build_index(fh, paths[0]).extents[0]
    stored = src[first.offset : first.offset + sum(p for p, _u in first.pieces)]
    merged = out.read_bytes()
    assert stored in merged
    verify_merged(paths, str(out), result.segments, full=True)
    # Copied and compressed again alike, each piece has the sum of its stored bytes.
    summed = 0
    for extent in result.index.extents:
        position = extent.offset
        assert len(extent.sums) == len(extent.pieces)
        for (packed, _unpacked), value in zip(extent.pieces, extent.sums, strict=True):
            assert value == zlib.adler32(merged[position : position + packed])
            position += packed
            summed += 1
    assert summed >= 8


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "lz4"])
def test_a_damaged_source_stops_the_merge(tmp_path: Path, compressed: bool) -> None:
    base: list[Frame] = [(0, 30, 7), (30, 34, None)]
    inc: list[Frame] = [(10, 4, 3)]
    paths = write_chain(tmp_path, [base, inc], [compressed, compressed])
    raw = bytearray(Path(paths[0]).read_bytes())
    raw[len(raw) // 3] ^= 0x01  # inside the data the merge keeps
    Path(paths[0]).write_bytes(raw)
    out = tmp_path / "merged.data"
    with open(out, "wb") as fh, pytest.raises(StreamError, match="damaged"):
        merge_chain(paths, fh, out.name)


def test_a_missing_checksum_file_stops_the_merge(tmp_path: Path) -> None:
    paths = write_chain(tmp_path, [[(0, 64, 1)], [(3, 1, 2)]], [False, False])
    Path(paths[1] + ".chksum").unlink()
    with open(tmp_path / "m.data", "wb") as fh, pytest.raises(StreamError, match="checksum file"):
        merge_chain(paths, fh, "m.data")


def test_verify_finds_a_merged_file_that_differs(tmp_path: Path) -> None:
    paths = write_chain(tmp_path, [[(0, 64, 1)], [(3, 1, 2)]], [False, False])
    out = tmp_path / "merged.data"
    with open(out, "wb") as fh:
        result = merge_chain(paths, fh, out.name, max_piece=PIECE)
    raw = bytearray(out.read_bytes())
    raw[-100] ^= 0xFF  # in the last data bytes, which the sample always reads
    out.write_bytes(raw)
    with pytest.raises(StreamError, match="differ"):
        verify_merged(paths, str(out), result.segments, full=False)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    base=layouts(full=True),
    incs=st.lists(layouts(full=False), min_size=3, max_size=5),
    compressed=st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_merged_incs_restore_like_the_incs_they_replace(
    tmp_path_factory: pytest.TempPathFactory,
    base: list[Frame],
    incs: list[list[Frame]],
    compressed: list[bool],
) -> None:
    """incs 2..K merged into one inc on inc 1: the chain full, inc 1, merged
    restores as before, and the merged file saves exactly what they saved."""
    folder = tmp_path_factory.mktemp("incmerge")
    model = bytearray(SIZE)
    for frames in [base, *incs]:
        apply(model, frames)
    paths = write_chain(folder, [base, *incs], compressed)
    out = folder / "merged.data"
    with open(out, "wb") as fh:
        result = merge_chain(paths[2:], fh, out.name, parent="virtnbdbackup.1", max_piece=PIECE)
    zeros = zeros_of_index(result.index)  # an inc's zero ranges live in its side file
    Path(zeros_path(str(out))).write_bytes(zeros)
    verify_merged(paths[2:], str(out), result.segments, full=True)
    with open(out, "rb") as fh:
        reader = StreamReader(fh, str(out))
        assert reader.meta.incremental and reader.meta.parent_checkpoint == "virtnbdbackup.1"
        kinds = {f.kind for f in reader.frames()}
    assert kinds <= {Kind.DATA}, "an inc holds data frames only"
    with open(out, "rb") as fh:
        saved = {(e.start, e.length) for e in build_index(fh, str(out)).extents}
    expected = set()
    for start, count, _fill in [f for frames in incs[1:] for f in frames]:
        expected |= set(range(start, start + count))
    covered = {b for start, length in saved for b in range(start // 4096, (start + length) // 4096)}
    assert covered == expected
    image = ChainImage([paths[0], paths[1], str(out)])
    try:
        assert image.read(0, SIZE) == bytes(model)
    finally:
        image.close()
