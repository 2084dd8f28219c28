"""Pure chain logic: changed regions, backup steps, restore order."""

from __future__ import annotations

from pathlib import Path

import pytest

from libvirtnbdbackup.adapters.nbdclient import Extent
from libvirtnbdbackup.errors import StreamError, UsageError
from libvirtnbdbackup.jobs.backupset import DataFile, chains, ordered_sequence
from libvirtnbdbackup.jobs.chainplan import plan_step, read_chain
from libvirtnbdbackup.jobs.diskbackup import Region, allocation_regions, changed_regions

from .samples import sample_meta


def test_allocation_regions_merge_by_kind() -> None:
    extents = [Extent(0, 10, 0), Extent(10, 10, 2), Extent(20, 5, 1), Extent(25, 5, 3)]
    assert allocation_regions(extents) == [Region(0, 20, True), Region(20, 10, False)]


def test_changed_regions_cut_dirty_ranges_along_allocation() -> None:
    allocation = [Extent(0, 100, 0), Extent(100, 100, 3), Extent(200, 100, 0)]
    dirty = [Extent(0, 50, 0), Extent(50, 200, 1), Extent(250, 50, 0)]
    assert changed_regions(dirty, allocation, sparse=True) == [
        Region(50, 50, True),
        Region(100, 100, False),
        Region(200, 50, True),
    ]
    assert changed_regions(dirty, allocation, sparse=False) == [Region(50, 200, True)]
    assert changed_regions([Extent(0, 300, 0)], allocation, sparse=True) == []


def test_plan_steps() -> None:
    chain = ["virtnbdbackup.0", "virtnbdbackup.1"]
    full = plan_step("full", chain, offline=False, epoch=7)
    assert (full.checkpoint, full.create, full.since, full.file_tag) == (
        "virtnbdbackup.0",
        "virtnbdbackup.0",
        None,
        "full",
    )
    inc = plan_step("inc", chain, offline=False, epoch=7)
    assert (inc.checkpoint, inc.parent, inc.create, inc.since, inc.file_tag) == (
        "virtnbdbackup.2",
        "virtnbdbackup.1",
        "virtnbdbackup.2",
        "virtnbdbackup.1",
        "inc.virtnbdbackup.2",
    )
    diff = plan_step("diff", chain, offline=False, epoch=7)
    assert (diff.checkpoint, diff.create, diff.ident, diff.file_tag) == (
        "virtnbdbackup.2",
        None,
        "7",
        "diff.7",
    )
    offline = plan_step("inc", chain, offline=True, epoch=7)
    assert (offline.checkpoint, offline.parent, offline.create, offline.file_tag) == (
        "virtnbdbackup.1",
        "virtnbdbackup.1",
        None,
        "inc.virtnbdbackup.1.7",
    )
    with pytest.raises(UsageError, match="take a full backup first"):
        plan_step("inc", [], offline=False, epoch=7)


def data_file(name: str, checkpoint: str, parent: str, date: str = "") -> DataFile:
    meta = sample_meta(
        virtual_size=1,
        checkpoint_name=checkpoint,
        parent_checkpoint=parent,
        incremental=bool(parent),
        date=date,
    )
    return DataFile(Path(name), "vda", meta)


FULL = data_file("vda.full.data", "virtnbdbackup.0", "")
INC1 = data_file("vda.inc.virtnbdbackup.1.data", "virtnbdbackup.1", "virtnbdbackup.0")
INC2 = data_file("vda.inc.virtnbdbackup.2.data", "virtnbdbackup.2", "virtnbdbackup.1")
DIFF_A = data_file("vda.diff.100.data", "virtnbdbackup.2", "virtnbdbackup.1", "2026-01-01")
DIFF_B = data_file("vda.diff.200.data", "virtnbdbackup.2", "virtnbdbackup.1", "2026-01-02")


def test_chain_order_comes_from_meta_not_listing_order() -> None:
    chain = chains([INC2, DIFF_B, FULL, DIFF_A, INC1])["vda"]
    assert chain.links == [FULL, INC1, INC2]
    assert chain.sequence() == [FULL, INC1, INC2]  # diffs are on .1, not on the last link
    assert chain.sequence("virtnbdbackup.1") == [FULL, INC1]
    assert chain.sequence("virtnbdbackup.0") == [FULL]
    with pytest.raises(StreamError, match=r"no backup with checkpoint virtnbdbackup\.9"):
        chain.sequence("virtnbdbackup.9")


def test_newest_diff_applies_on_its_parent() -> None:
    chain = chains([FULL, INC1, DIFF_A, DIFF_B])["vda"]
    assert chain.sequence() == [FULL, INC1, DIFF_B]
    assert chain.sequence("virtnbdbackup.2") == [FULL, INC1, DIFF_B]


def test_offline_inc_follows_its_parent() -> None:
    offline = data_file("vda.inc.virtnbdbackup.1.x.data", "virtnbdbackup.1", "virtnbdbackup.1")
    chain = chains([INC2, offline, INC1, FULL])["vda"]
    assert chain.links == [FULL, INC1, offline, INC2]


def test_broken_chains_name_the_missing_link() -> None:
    with pytest.raises(StreamError, match="no file names it as parent; a link is missing"):
        chains([FULL, INC2])
    with pytest.raises(StreamError, match="exactly one full or copy file"):
        chains([INC1])
    with pytest.raises(StreamError, match=r"builds on checkpoint virtnbdbackup\.1"):
        ordered_sequence([FULL, INC2])
    with pytest.raises(StreamError, match="must start with a full or copy file"):
        ordered_sequence([INC1])


@pytest.mark.parametrize("name", ["../../../etc/x", "/etc/x", ".hidden", ""])
def test_checkpoint_names_of_a_cpt_file_stay_in_the_checkpoint_folder(
    tmp_path: Path, name: str
) -> None:
    cpt = tmp_path / "vm.cpt"
    cpt.write_text(f'["virtnbdbackup.0", "{name}"]')
    with pytest.raises(StreamError, match="not a plain file name"):
        read_chain(cpt)
