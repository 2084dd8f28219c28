"""Which bytes of which file a restore writes, decided before any data moves.

A chain (full, then incs, then a diff) is applied as if file by file, but
only the last file covering a byte writes it: data a later file overwrites
is never read nor written, so every write is disjoint from every other and
their order does not matter. A zero frame writes zeros only where an
earlier file of the chain holds data; on the fresh image the rest already
reads as zeros.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ..format.frames import Kind
from ..format.reader import IndexedFrame


class Ranges:
    """A set of disjoint half-open byte ranges, kept sorted and merged."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        # Every range touching [start, end) merges with it.
        lo = bisect.bisect_left(self._ends, start)
        hi = bisect.bisect_right(self._starts, end)
        if lo < hi:
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]

    def overlap(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) inside the set."""
        lo = bisect.bisect_right(self._ends, start)
        parts = []
        for i in range(lo, len(self._starts)):
            if self._starts[i] >= end:
                break
            parts.append((max(start, self._starts[i]), min(end, self._ends[i])))
        return parts

    def outside(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) not in the set."""
        parts = []
        pos = start
        for a, b in self.overlap(start, end):
            if a > pos:
                parts.append((pos, a))
            pos = b
        if pos < end:
            parts.append((pos, end))
        return parts

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._starts, self._ends, strict=True))

    def __len__(self) -> int:
        return len(self._starts)


FrameWrites = tuple[IndexedFrame, list[tuple[int, int]]]


@dataclass
class RestorePlan:
    """Per file of the chain, its data frames and the ranges of each to write;
    and the ranges to zero. No two writes overlap."""

    files: list[list[FrameWrites]] = field(default_factory=list)
    zeros: list[tuple[int, int]] = field(default_factory=list)

    @property
    def data_bytes(self) -> int:
        return sum(b - a for frames in self.files for _f, parts in frames for a, b in parts)


def plan_chain(files: Sequence[list[IndexedFrame]]) -> RestorePlan:
    """The writes a restore of ``files`` (in chain order) onto a fresh image needs."""
    decided = Ranges()  # bytes whose final content a later file gives
    decided_zero = Ranges()  # ... where that content is a zero frame
    zeros = Ranges()
    plan = RestorePlan()
    for frames in reversed(files):
        writes: list[FrameWrites] = []
        for frame in frames:
            if frame.kind is Kind.DATA:
                end = frame.start + frame.length
                parts = decided.outside(frame.start, end)
                if parts:
                    writes.append((frame, parts))
                # Data that a later zero frame wipes: that zero frame is written.
                for a, b in decided_zero.overlap(frame.start, end):
                    zeros.add(a, b)
        for frame in frames:
            end = frame.start + frame.length
            if frame.kind is Kind.ZERO:
                for a, b in decided.outside(frame.start, end):
                    decided_zero.add(a, b)
            decided.add(frame.start, end)
        plan.files.append(writes)
    plan.files.reverse()
    plan.zeros = list(zeros)
    return plan
