"""The backup job: from a running domain to a backup folder or zip stream."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from ..adapters import qemu
from ..adapters.domainxml import Disk, boot_files, parse_disks, qemu_owner, select_disks
from ..adapters.hosts import LOCAL, Host
from ..adapters.nbdclient import ALLOCATION_CONTEXT, NbdAddress, NbdClient, bitmap_context
from ..adapters.nbdinfo import map_extents
from ..adapters.virt import (
    CHECKPOINT_PREFIX,
    Domain,
    Hypervisor,
    backup_xml,
    checkpoint_xml,
    own_checkpoints,
)
from ..errors import (
    DomainError,
    Interrupted,
    QemuToolError,
    SshError,
    TargetError,
    UsageError,
    VirtnbdError,
)
from ..format.checked import set_check
from ..format.manifest import (
    SetWriter,
    chain_file_bytes,
    chain_file_name,
    chain_identity,
    manifest_name,
    unlisted_data_files,
)
from ..interrupts import Cancel
from ..targets.base import Target
from ..targets.directory import write_atomic
from ..targets.lock import LOCK_NAME, FolderLock, describe
from ..targets.private import make_private_dir
from .backupoptions import DEFAULT_SCRATCH_PARENT, BackupOptions
from .chainplan import BackupStep, checkpoint_name, plan_step, read_chain, read_merged
from .diskbackup import DiskBackup, DiskPlan, DiskResult
from .guestfiles import (
    agent_files,
    autostart_file,
    has_emulated_tpm,
    tpm_archive,
    tpm_file,
    tpm_state_folder,
)
from .guestfreeze import frozen_filesystems
from .recovery import committed, job_of, killed_checkpoint, killed_scratch_folder
from .remote import Remote

log = logging.getLogger(__name__)

# lz4 runs at several hundred MiB/s per thread: a few lanes (threads that
# read and compress, each over its own NBD connection) outrun the source.
MAX_COMPRESS_LANES = 4


def compress_lanes() -> int:
    return max(1, min(MAX_COMPRESS_LANES, os.cpu_count() or 2))


def local_image_infos(
    disks: list[Disk], unavailable: str, host: Host = LOCAL
) -> Iterator[tuple[Disk, dict[str, Any]]]:
    """``qemu-img info`` of each disk with an image file on ``host``; a
    failure is a warning."""
    for disk in disks:
        if not disk.is_local_image or disk.path is None:
            continue
        try:
            yield disk, qemu.image_info(disk.path, host)
        except QemuToolError as err:
            log.warning("disk %s: %s: %s", disk.target, unavailable, err)


@dataclass(frozen=True)
class Export:
    """Where one disk is served over NBD, and the bitmap of its changes."""

    address: NbdAddress
    bitmap: str | None


ExportOpener = Callable[[Disk], AbstractContextManager[Export]]


@dataclass(frozen=True)
class JobSpec:
    """The checkpoint and backup job a run asks libvirt for (step 4)."""

    job_xml: str
    checkpoint_xml: str | None
    server: NbdAddress
    bind: str | None
    scratch: str  # the first disk's scratch file: names this run's job
    bitmap_disks: list[Disk]
    all_disks: list[Disk]


class BackupJob:
    def __init__(
        self,
        opts: BackupOptions,
        target: Target,
        cancel: Cancel,
        *,
        lock: FolderLock | None = None,
    ) -> None:
        """``lock``: the backup folder's, held; its ``stale`` record is what a
        killed run left (see ``recovery``)."""
        self.opts = opts
        self.lock = lock
        self.stale = lock.stale if lock else None
        self.target = target
        self.cancel = cancel
        self._healed: set[str] = set()  # orphan bitmaps removed in this run
        self._given_up: list[str] = []  # checkpoints of the previous chain removed
        self.pid = os.getpid()
        self.remote = Remote(opts.uri, opts.remote)
        self.host: Host = LOCAL
        self._scratch: str | None = None  # this run's scratch folder, once made
        self._agent_answered = False  # the freeze step reached the guest agent
        self._measuring = False  # disks are measured (offline -p, -T), not saved
        self._files: SetWriter | None = None
        self._new_chain_id = False

    @property
    def files(self) -> SetWriter:
        """The files of the run under way: everything it writes goes through them."""
        assert self._files is not None, "no backup run begun"
        return self._files

    @property
    def checkpoint_dir(self) -> Path:
        if self.opts.checkpoint_dir:
            return Path(self.opts.checkpoint_dir)
        return self.opts.meta_dir / "checkpoints"

    def run(self) -> list[DiskResult]:
        hypervisor = Hypervisor(self.opts.uri, self.opts.user, self.opts.password)
        try:
            log.info("libvirt library version: %s", hypervisor.library_version)
            domain = hypervisor.domain(self.opts.domain)
            self.host = self.remote.host()
            if self.host.is_remote:
                log.info("domain %s runs on %s: files over SSH", domain.name, self.host.name)
                log.info("%s", self.remote.describe_transport())
            try:
                return self._run(domain, self.opts.level)
            except BaseException as err:
                if not self._given_up:
                    raise
                note = given_up_note(self._given_up)
                if isinstance(err, VirtnbdError):
                    raise type(err)(f"{err}; {note}") from None
                log.warning("%s", note)
                raise
        finally:
            if self._scratch is not None:
                self.host.remove_tree(self._scratch)
            self.host.close()
            hypervisor.close()

    def _run(self, domain: Domain, level: str) -> list[DiskResult]:
        """The steps of a backup run, in this order:

        1. the domain's state: shut off, it is backed up offline
           (``_run_offline``), or started paused for the run (-S);
        2. what a killed run left is put right, a job still running refused;
        3. plan: the step the level asks for on this chain, the chain checked
           (-p and -T end the run here);
        4. prepare: a full backup gives up the previous chain's checkpoints
           (once it is known to fit), the job's XML is made;
        5. start the job: the new checkpoint and the job in one libvirt call,
           the guest's file systems frozen around it; a refusal QEMU's state
           explains is healed and 4-5 are taken again;
        6. transfer every disk, then commit (metadata, manifest, checkpoint
           recorded); on any failure the job is stopped and its checkpoint
           and files taken back.
        """
        if domain.is_running():
            return self._run_online(domain, level)
        if self.opts.startonly and not self.opts.start_domain:
            raise UsageError(
                f"domain {domain.name} is shut off: -s starts a backup job, which needs "
                "the domain running (start it, or add -S)"
            )
        if not self.opts.start_domain:
            return self._run_offline(domain, level)
        with self._started_paused(domain):
            return self._run_online(domain, level)

    @contextmanager
    def _started_paused(self, domain: Domain) -> Iterator[None]:
        log.info("starting domain %s paused for the backup (-S)", domain.name)
        domain.start_paused()
        try:
            yield
        finally:
            domain.destroy()
            log.info("domain %s is shut off again", domain.name)

    def _run_online(self, domain: Domain, level: str) -> list[DiskResult]:
        self._heal_killed_run(domain)
        if domain.has_backup_job():
            raise DomainError(
                f"domain {domain.name} already has a backup job running (another backup, or "
                "one left over from a killed run); stop it with: virtnbdbackup -d "
                f"{domain.name} -k"
            )
        domain_xml = domain.xml()
        all_disks, disks = self._select_disks(domain.name, domain_xml)
        step = self._plan_online(domain, level)
        if step is None:
            return []
        while True:
            job = self._prepare(domain, step, domain_xml, all_disks, disks)
            retry = self._start_job(domain, step, job)
            if retry is None:
                break
            step = retry
        if self.opts.startonly:
            log.info(
                "backup job started, NBD server %s (exports named after the disks); it keeps "
                "running: stop it with: virtnbdbackup -d %s -k",
                job.server,
                domain.name,
            )
            return []
        return self._transfer(domain, step, job, domain_xml, disks)

    def _plan_online(self, domain: Domain, level: str) -> BackupStep | None:
        """Step 3: what this run saves; None when -p or -T end the run."""
        chain = read_chain(self.opts.cpt_file)
        if self.opts.printonly and level == "full":
            level = "copy"  # -p estimates: it must not start a new chain
        step = plan_step(level, chain, offline=False, epoch=int(time.time()))
        if self.opts.startonly:
            # Nothing is saved, so no checkpoint may claim a backup of this point.
            step = replace(step, create=None)
        if step.since is None or self.opts.startonly:
            return step
        problem = self._chain_problem(domain, chain)
        if problem:
            if self.opts.printonly:
                raise DomainError(f"{problem}; the next backup will be a full backup")
            return self._start_new_chain(problem)
        changed = sum(domain.checkpoint_sizes(step.since).values())
        log.info("about %d bytes changed since checkpoint %s", changed, step.since)
        if self.opts.printonly:
            print(changed)
            return None
        return None if self._below_threshold(step, changed) else step

    def _below_threshold(self, step: BackupStep, changed: int) -> bool:
        if changed >= self.opts.threshold:
            return False
        log.info(
            "skipping the %s backup: %d bytes changed, below the threshold of %d",
            step.level,
            changed,
            self.opts.threshold,
        )
        return True

    def _prepare(
        self,
        domain: Domain,
        step: BackupStep,
        domain_xml: str,
        all_disks: list[Disk],
        disks: list[Disk],
    ) -> JobSpec:
        """Step 4: the checkpoint and backup job to ask libvirt for."""
        bitmap_disks = [d for d in disks if d.format != "raw"]
        if step.level == "full" and not self.opts.startonly:
            if not bitmap_disks:
                raise UsageError(
                    "a full backup starts a chain of dirty bitmaps, which raw images cannot "
                    "hold; back up raw-only domains with -l copy"
                )
            self._check_bitmap_support(bitmap_disks)
            self._check_room(domain, disks)
            self._remove_checkpoints(domain)
        if step.since:
            log.info("saving the changes since checkpoint %s", step.since)
        new_checkpoint = None
        if step.create:
            new_checkpoint = checkpoint_xml(step.create, bitmap_disks, all_disks)
            log.info("creating checkpoint %s", step.create)

        if self.opts.scratch_dir:  # given: as 2.47 names them
            folder, suffix = self.opts.scratch_dir, f".{self.pid}"
            self.host.makedirs(folder)
        else:
            folder, suffix = self._scratch_folder(domain_xml), ""
        scratch = {d.target: f"{folder}/backup.{domain.name}.{d.target}{suffix}" for d in disks}
        bind = None
        if self.remote.over_tcp:
            server = self.remote.nbd_address()
            bind = self.remote.bind_address()
        else:
            socket = self.opts.socket_file or f"{folder}/virtnbdbackup{suffix or '.sock'}"
            server = NbdAddress(socket=socket)
        job_xml = backup_xml(disks, all_disks, server, scratch, step.since, bind)
        return JobSpec(
            job_xml=job_xml,
            checkpoint_xml=new_checkpoint,
            server=server,
            bind=bind,
            scratch=next(iter(scratch.values())),
            bitmap_disks=bitmap_disks,
            all_disks=all_disks,
        )

    def _start_job(self, domain: Domain, step: BackupStep, job: JobSpec) -> BackupStep | None:
        """Step 5: None once the job runs; the step to prepare and start again
        after a refusal that was healed."""
        log.info("starting backup job, NBD server %s", job.server)
        if self.lock is not None:
            # For the next run, should this one be killed (recovery.py).
            self.lock.update(checkpoint=step.create, scratch=job.scratch)
        try:
            # Not cut short by a signal: a job started must be known to be
            # stopped, a paused domain resumed, a frozen guest thawed.
            with self.cancel.scope():
                self.cancel.defer()
                with frozen_filesystems(domain, self.opts.freeze_mountpoints) as freeze:
                    self._begin_backup(domain, job.job_xml, job.checkpoint_xml)
            self._agent_answered = freeze.agent_answered
        except DomainError as err:
            orphan = _existing_bitmap(str(err))
            if orphan and orphan == step.create and orphan not in self._healed:
                # libvirt lost the checkpoint but QEMU kept its bitmap: the name
                # is ours and a new checkpoint of that name replaces it anyway.
                self._healed.add(orphan)
                cleaned = domain.remove_orphan_bitmap(orphan, job.bitmap_disks, job.all_disks)
                log.warning(
                    "bitmap %s was left in disk(s) %s without a libvirt checkpoint (libvirt "
                    "lost its checkpoint metadata): removed it",
                    orphan,
                    ", ".join(cleaned) or "(none found)",
                )
                return step
            if "Address already in use" in str(err):
                raise DomainError(
                    f"NBD port {job.server.port} on {job.bind} is in use (by another backup?): "
                    f"choose a free port with -P ({err})"
                ) from None
            # QEMU checks each bitmap as the job starts: one left inconsistent
            # by a crash is refused here, before any data has moved.
            if step.since is None or "bitmap" not in str(err):
                raise
            return self._start_new_chain(
                f"QEMU refused the bitmaps of checkpoint {step.since} ({err})"
            )
        return None

    def _begin_backup(self, domain: Domain, job_xml: str, checkpoint: str | None) -> None:
        """Create the checkpoint and start the backup job (one libvirt call)."""
        if self.opts.pause:
            log.info("pausing domain %s while the backup job starts", domain.name)
            domain.suspend()
        try:
            domain.begin_backup(job_xml, checkpoint)
        finally:
            if self.opts.pause:
                domain.resume()

    def _transfer(
        self, domain: Domain, step: BackupStep, job: JobSpec, domain_xml: str, disks: list[Disk]
    ) -> list[DiskResult]:
        """Step 6: every disk into the set, then the commit; on any failure
        the job, its checkpoint and its files are taken back."""
        try:
            self.cancel.check()  # a signal while the job started
            if not self.opts.printonly:
                self._files = self._begin_files(step)
            with self._reach(job.server) as reach:
                results = self._backup_disks(disks, step, partial(self._job_export, reach, step))
            if self.opts.printonly:
                print(sum(r.data_size for r in results), flush=True)
            else:
                self._save_metadata(domain, domain_xml, disks, step)
        except BaseException:
            with self.cancel.scope():
                self.cancel.defer()
                self._abort_files()
                self._stop_job(domain)
                if step.create:
                    self._drop_checkpoint(domain, step.create)
            raise
        self._stop_job(domain)
        return results

    def _scratch_folder(self, domain_xml: str) -> str:
        """This run's fresh folder for the job's socket and scratch files.

        QEMU creates both, so the folder belongs to QEMU's user (mode 0700:
        root and that user enter it, nobody else); its name cannot be
        guessed, so no other user can take it first. Removed by ``run``.
        """
        if self._scratch is None:
            owner = qemu_owner(domain_xml)
            self._scratch = self.host.make_scratch_dir(DEFAULT_SCRATCH_PARENT, owner)
            log.info(
                "scratch files and NBD socket in %s, a fresh folder only QEMU's user (%s) "
                "and root can enter (2.47 used fixed names in %s; --scratchdir restores that)",
                self._scratch,
                owner or "this user",
                DEFAULT_SCRATCH_PARENT,
            )
        return self._scratch

    def _heal_killed_run(self, domain: Domain) -> None:
        """Take down what a killed run into this folder left in libvirt: its
        backup job, and the checkpoint it created (recorded in the chain
        when its backup was committed, else removed)."""
        stale = self.stale
        if not stale or stale.get("domain") != domain.name:
            return
        who = describe(stale)
        if job_of(domain.backup_job_xml(), stale.get("scratch")):
            with self.cancel.scope():
                self.cancel.defer()
                self._stop_job(domain)
            log.warning("stopped the backup job left running by %s, which was killed", who)
        folder = killed_scratch_folder(stale.get("scratch"))
        if folder is not None and self.host.exists(folder):
            self.host.remove_tree(folder)  # its own, private: no other run uses it
            log.info("removed the scratch folder %s of the killed run", folder)
        checkpoint = killed_checkpoint(stale, domain.name)
        if checkpoint is None or checkpoint not in domain.checkpoint_names():
            return
        chain = read_chain(self.opts.cpt_file)
        if checkpoint in chain:
            return
        following = checkpoint == checkpoint_name(len(chain)) or checkpoint == checkpoint_name(0)
        if following and committed(self.opts.meta_dir, checkpoint):
            self._save_checkpoint(domain, checkpoint)
            log.warning(
                "backup %s of %s was committed, but the run was killed before it recorded "
                "the checkpoint in %s: recorded it",
                checkpoint,
                who,
                self.opts.cpt_file.name,
            )
            return
        with self.cancel.scope():
            self.cancel.defer()
            domain.delete_checkpoint(checkpoint)
        log.warning(
            "removed checkpoint %s, created by %s, which was killed before its backup was "
            "committed; the changes since are saved by this backup",
            checkpoint,
            who,
        )

    @contextmanager
    def _reach(self, server: NbdAddress) -> Iterator[NbdAddress]:
        """Where this host connects to the job's NBD server: a socket on the
        hypervisor is forwarded over SSH, anything else reached as it is."""
        if self.remote.over_ssh and server.socket:
            with self.host.forward(server.socket) as local:
                log.info("NBD socket %s of %s forwarded to %s", server, self.host.name, local)
                yield NbdAddress(socket=local)
        else:
            yield server

    def _check_bitmap_support(self, disks: list[Disk]) -> None:
        """qcow2 v2 (compat 0.10) images cannot store dirty bitmaps."""
        for disk, info in local_image_infos(disks, "image format not checked", self.host):
            if info.get("format-specific", {}).get("data", {}).get("compat") == "0.10":
                raise UsageError(
                    f"disk {disk.target} is a qcow2 v2 image ({disk.path}), which cannot store "
                    "the dirty bitmaps of full and incremental backups: back it up with -l copy, "
                    "or upgrade it while the domain is shut off with: "
                    f"qemu-img amend -f qcow2 -o compat=1.1 {disk.path}"
                )

    def _check_room(self, domain: Domain, disks: list[Disk]) -> None:
        """Refuse a full backup that cannot fit before it gives up the
        previous chain's checkpoints (it must remove them first).

        Only without compression, which makes the size unknown: then a full
        target is still one clear error, which names what was given up.
        """
        previous = own_checkpoints(domain.checkpoint_names())
        if not previous or self.opts.to_stdout or self.opts.compress is not None:
            return
        try:
            need = sum(domain.allocation(d.target) for d in disks)
            st = os.statvfs(self.opts.output)
        except (DomainError, OSError) as err:
            log.debug("free space not checked: %s", err)
            return
        free = st.f_bavail * st.f_frsize
        if free < need:
            raise TargetError(
                f"{self.opts.output} has {free // 2**20} MiB free, but the disks to back up "
                f"store {need // 2**20} MiB: this full backup would not fit, and it would "
                f"first remove the checkpoints of the previous chain ({', '.join(previous)}); "
                "nothing was changed: free space or choose another folder"
            )

    def _chain_problem(self, domain: Domain, chain: list[str]) -> str | None:
        """Why an incremental backup on this chain would be wrong, or None.

        Checkpoints libvirt has lost (the domain was undefined and defined
        again, moved, or libvirtd's state is gone) are redefined from the
        saved XML, validated against the bitmaps in the images.
        """
        known = set(domain.checkpoint_names())
        merged = set(read_merged(self.opts.meta_dir))
        for name in chain:
            if name in known or name in merged:
                continue
            saved = self.checkpoint_dir / f"{name}.xml"
            if not saved.is_file():
                return f"checkpoint {name} is unknown to libvirt and {saved} is missing"
            try:
                domain.redefine_checkpoint(saved.read_text())
            except DomainError as err:
                return f"checkpoint {name} cannot be redefined ({err})"
            log.warning("checkpoint %s was missing in libvirt: redefined from %s", name, saved)
        # Whether the bitmaps themselves are intact only QEMU can tell (the
        # image file lags behind while the VM runs): begin_backup checks them.
        return None

    def _start_new_chain(self, problem: str) -> BackupStep:
        """Set the old chain aside, intact and restorable, and plan a full backup."""
        if self.opts.to_stdout:
            log.warning("%s: taking a full backup, which starts a new chain", problem)
        else:
            folder = Path(self.opts.output)
            archive = folder / f"chain.{time.strftime('%Y%m%d%H%M%S')}"
            make_private_dir(archive)
            current_log = {
                Path(h.baseFilename).name
                for h in logging.getLogger().handlers
                if isinstance(h, logging.FileHandler)
            }
            for entry in sorted(folder.iterdir()):
                if entry == archive or entry.name in current_log or entry.name == LOCK_NAME:
                    continue
                if entry.is_dir() and entry.name.startswith("chain."):
                    continue  # chains set aside before
                os.rename(entry, archive / entry.name)
            log.warning(
                "%s: an incremental backup would not restore correctly, so a full backup "
                "starts a new chain; the previous chain is kept, restorable, in %s",
                problem,
                archive,
            )
        return plan_step("full", [], offline=False, epoch=int(time.time()))

    def _remove_checkpoints(self, domain: Domain) -> None:
        """A full backup starts a new chain: drop our old checkpoints, newest first."""
        for name in own_checkpoints(domain.checkpoint_names()):
            log.info("removing checkpoint %s of the previous chain", name)
            domain.delete_checkpoint(name)
            self._given_up.append(name)
        if self.checkpoint_dir.is_dir():
            for old in self.checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}.*.xml"):
                old.unlink()

    def _select_disks(self, name: str, domain_xml: str) -> tuple[list[Disk], list[Disk]]:
        """All disks of the domain, and those to back up (each skip is logged)."""
        all_disks = parse_disks(domain_xml)
        selection = select_disks(
            all_disks, include=self.opts.include, exclude=self.opts.exclude, raw=self.opts.raw
        )
        for skip in selection.skipped:
            log.info("skipping disk %s: %s", skip.disk.target, skip.reason)
        if not selection.selected:
            raise UsageError(f"domain {name} has no disk left to back up")
        log.info("backing up disks: %s", ", ".join(d.target for d in selection.selected))
        return all_disks, selection.selected

    def _run_offline(self, domain: Domain, level: str) -> list[DiskResult]:
        """A shut-off domain: each image is served by qemu-nbd, read-only.

        No checkpoint can be created without QEMU running the domain, so a
        full backup becomes a copy and an incremental one saves the changes
        recorded in the last checkpoint's persistent bitmap.
        """
        if level == "full":
            log.info("domain %s is shut off: a full backup becomes a copy", domain.name)
            level = "copy"
        domain_xml = domain.xml()
        _all, disks = self._select_disks(domain.name, domain_xml)
        step = plan_step(
            level, read_chain(self.opts.cpt_file), offline=True, epoch=int(time.time())
        )
        if step.since is not None:  # the chain check: each image's bitmap
            for disk in disks:
                self._check_offline_bitmap(disk, step.since)
            log.info("saving the changes since checkpoint %s", step.since)
        ports = {disk.target: index for index, disk in enumerate(disks)}
        export = partial(self._offline_export, step, ports)
        if self.opts.printonly:
            results = self._measure(disks, step, export)
            print(sum(r.data_size for r in results), flush=True)
            return results
        if step.since is not None and self.opts.threshold:
            # No QEMU to ask: the changes are counted in the bitmaps' extents.
            changed = sum(r.data_size for r in self._measure(disks, step, export))
            log.info("%d bytes changed since checkpoint %s", changed, step.since)
            if self._below_threshold(step, changed):
                return []
        self._files = self._begin_files(step)
        try:
            results = self._backup_disks(disks, step, partial(self._offline_export, step, ports))
            self._save_metadata(domain, domain_xml, disks, step)
        except BaseException:
            with self.cancel.scope():
                self.cancel.defer()
                self._abort_files()
            raise
        return results

    def _check_offline_bitmap(self, disk: Disk, checkpoint: str) -> None:
        if disk.path is None or disk.format != "qcow2":
            raise UsageError(f"disk {disk.target}: offline incremental backups need a qcow2 image")
        bitmaps = qemu.image_bitmaps(qemu.image_info(disk.path, self.host))
        flags = bitmaps.get(checkpoint)
        if flags is None or "in-use" in flags:
            state = "is missing" if flags is None else "was left inconsistent by a crash"
            raise DomainError(
                f"disk {disk.target}: the bitmap of checkpoint {checkpoint} {state}, so the "
                "changes cannot be told; start the domain (or use -S) and take an inc backup, "
                "which then starts a new chain"
            )

    @contextmanager
    def _job_export(self, server: NbdAddress, step: BackupStep, disk: Disk) -> Iterator[Export]:
        bitmap = f"backup-{disk.target}" if step.since else None
        yield Export(server, bitmap)

    @contextmanager
    def _offline_export(
        self, step: BackupStep, ports: dict[str, int], disk: Disk
    ) -> Iterator[Export]:
        """qemu-nbd for one disk; on a remote host each disk gets its own port."""
        assert disk.path is not None
        remote = self.remote.over_tcp
        with qemu.nbd_server(
            disk.path,
            disk.format,
            readonly=True,
            export=disk.target,
            bitmap=step.since,
            socket_dir=self.opts.scratch_dir,
            host=self.host,
            tcp=self.remote.nbd_address(ports[disk.target]) if remote else None,
            bind=self.remote.bind_address() if remote else None,
            connections=1 + (compress_lanes() if self.opts.compress is not None else 0),
        ) as address:
            log.info("disk %s: served by qemu-nbd at %s", disk.target, address)
            yield Export(address, step.since)

    def _backup_disks(
        self, disks: list[Disk], step: BackupStep, export: ExportOpener
    ) -> list[DiskResult]:
        workers = 1 if self.opts.to_stdout else max(1, self.opts.workers or len(disks))
        log.info("concurrent disk workers: %d", workers)
        with ThreadPoolExecutor(workers, thread_name_prefix="disk") as pool:
            futures: list[Future[DiskResult]] = [
                pool.submit(self._backup_disk, disk, index, step, export)
                for index, disk in enumerate(disks)
            ]
            self._wait(futures)
            return [f.result() for f in futures]

    def _wait(self, futures: list[Future[DiskResult]]) -> None:
        """Wait for the disk workers; on the first failure or Ctrl-C, stop the others."""
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            if any(f.exception() for f in done) or self.cancel.is_set():
                self.cancel.set()
                wait(pending)
                for f in futures:
                    if f.exception() and not isinstance(f.exception(), Interrupted):
                        raise f.exception()  # type: ignore[misc]
                raise Interrupted("backup interrupted")

    def _backup_disk(
        self,
        disk: Disk,
        index: int,
        step: BackupStep,
        export: ExportOpener,
    ) -> DiskResult:
        threading.current_thread().name = disk.target
        with export(disk) as source:
            return self._backup_export(disk, index, step, source)

    def _backup_export(
        self,
        disk: Disk,
        index: int,
        step: BackupStep,
        source: Export,
    ) -> DiskResult:
        raw_image = disk.format == "raw"
        plan = DiskPlan(
            target=disk.target,
            file_name=f"{disk.target}.{'copy' if raw_image else step.file_tag}.data",
            raw_output=raw_image or self.opts.output_type == "raw",
            disk_format=disk.format,
            checkpoint_name=step.checkpoint,
            parent_checkpoint=step.parent,
            incremental=step.incremental,
            compress=self.opts.compress,
            bitmap=source.bitmap,
            sparse=self.opts.sparse,
        )
        contexts = [ALLOCATION_CONTEXT]
        if plan.bitmap:
            contexts.append(bitmap_context(plan.bitmap))
        client = NbdClient.connect(source.address, disk.target, contexts, wait=10)
        try:
            backup = DiskBackup(
                client,
                plan,
                self._files if self._files is not None else self.target,  # -p writes nothing
                cancel=self.cancel,
                progress=self.opts.progress,
                position=index,
                connect=lambda: NbdClient.connect(source.address, disk.target, wait=10),
                lanes=compress_lanes(),
                extents=partial(map_extents, source.address, disk.target)
                if self.opts.qemu
                else None,
            )
            if self.opts.printonly or self._measuring:
                return self._print_extents(backup, plan)
            return backup.run()
        finally:
            client.close()

    def _measure(
        self, disks: list[Disk], step: BackupStep, export: ExportOpener
    ) -> list[DiskResult]:
        """The data each disk's backup would save, from its extents; nothing written."""
        self._measuring = True
        try:
            return self._backup_disks(disks, step, export)
        finally:
            self._measuring = False

    def _print_extents(self, backup: DiskBackup, plan: DiskPlan) -> DiskResult:
        """-p on a full or copy backup: the data extents it would save, nothing written."""
        regions = backup.regions()
        data = [r for r in regions if r.data]
        size = sum(r.length for r in data)
        log.info("disk %s: got %d extents to back up", plan.target, len(data))
        log.info("disk %s: %d bytes disk size", plan.target, backup.client.size)
        log.info("disk %s: %d bytes of data extents to back up", plan.target, size)
        return DiskResult(plan.target, plan.file_name, backup.client.size, size, 0, 0.0)

    def _save_metadata(
        self, domain: Domain, domain_xml: str, disks: list[Disk], step: BackupStep
    ) -> None:
        ident = step.ident
        self.files.write(f"vmconfig.{ident}.xml", domain_xml.encode())
        for disk, info in local_image_infos(disks, "image options not saved", self.host):
            self.files.write(
                f"{disk.target}.{ident}.qcow.json", json.dumps(info, indent=4).encode()
            )
        for path in boot_files(domain_xml):
            name = os.path.basename(path)
            if step.level != "copy":
                name = f"{name}.{ident}"
            try:
                self._save_boot_file(name, path)
                log.info("saved boot file %s as %s", path, name)
            except (OSError, SshError) as err:
                log.warning("boot file %s not saved: %s", path, err)
        self._save_domain_files(domain, domain_xml, ident)
        self.files.commit()
        log.info("committed backup %s (%s)", ident, manifest_name(ident))
        self._save_chain_id()
        if step.create:
            self._save_checkpoint(domain, step.create)

    def _save_domain_files(self, domain: Domain, domain_xml: str, ident: str) -> None:
        """autostart, guest OS information, BitLocker keys, swtpm state."""
        try:
            if domain.autostart():
                self.files.write(autostart_file(ident), b"True")
                log.info("domain %s starts with the host: %s saved", domain.name, ident)
        except DomainError as err:
            log.warning("%s", err)
        if self._agent_answered:
            for name, data in agent_files(domain.agent(), ident):
                self.files.write(name, data)
                log.info("saved %s from the guest agent", name)
        if not has_emulated_tpm(domain_xml):
            return
        if self.host.is_remote:
            log.warning("TPM state of %s not saved: it is on %s", domain.name, self.host.name)
            return
        uuid = domain.uuid()
        archive = tpm_archive(uuid)
        if archive is None:
            log.warning(
                "domain %s has an emulated TPM but no state folder %s: not saved",
                domain.name,
                tpm_state_folder(uuid),
            )
            return
        self.files.write(tpm_file(ident), archive)
        log.info("saved the TPM state %s as %s", tpm_state_folder(uuid), tpm_file(ident))

    def _save_boot_file(self, name: str, path: str) -> None:
        if not self.host.is_remote:
            self.files.copy(name, path)
            return
        with tempfile.TemporaryDirectory(prefix="virtnbdbackup.") as tmp:
            local = os.path.join(tmp, name)
            self.host.fetch(path, local)
            self.files.copy(name, local)

    def _save_checkpoint(self, domain: Domain, checkpoint: str) -> None:
        """Keep the checkpoint's XML (to redefine it) and append it to the chain."""
        make_private_dir(self.checkpoint_dir)
        xml = domain.checkpoint_xml(checkpoint, size=True).encode()
        write_atomic(self.checkpoint_dir / f"{checkpoint}.xml", xml)
        chain = [] if checkpoint == checkpoint_name(0) else read_chain(self.opts.cpt_file)
        cpt_name = self.opts.cpt_file.name
        cpt = json.dumps([*chain, checkpoint]).encode()
        write_atomic(self.opts.cpt_file, cpt)
        if self.opts.to_stdout:
            self.target.write(cpt_name, cpt)
            self.target.write(f"checkpoints/{checkpoint}.xml", xml)

    def _begin_files(self, step: BackupStep) -> SetWriter:
        """Start this run's files: a killed run's leftovers go, a journal begins."""
        chain, self._new_chain_id = chain_identity(step.level, self.opts.meta_dir, self.opts.domain)
        files = SetWriter(self.target, ident=step.ident, level=step.level, chain=chain)
        removed = files.begin()
        if removed:
            log.warning("removed the files of an interrupted backup: %s", ", ".join(removed))
        if step.incremental and not self.target.streamed:
            names, checksums = unlisted_data_files(self.target)
            if not self._new_chain_id:  # only incs 2.x added after our last run
                check = set_check(self.opts.output)
                names = [n for n in names if check.continues_as_2x(n)]
            files.adopt(names, checksums)
        return files

    def _abort_files(self) -> None:
        removed = self._files.abort() if self._files is not None else []
        if removed:
            log.info("removed the files of the failed backup: %s", ", ".join(removed))

    def _save_chain_id(self) -> None:
        """A new chain's identity, for the incremental backups that follow."""
        if not self._new_chain_id or self.files.level == "copy":
            return
        name = chain_file_name(self.opts.domain)
        data = chain_file_bytes(self.files.chain)
        if self.opts.to_stdout:
            write_atomic(self.opts.meta_dir / name, data)
        self.target.write(name, data)

    def _stop_job(self, domain: Domain) -> None:
        if not domain.has_backup_job():
            return
        try:
            domain.abort_job()
            log.info("backup job stopped")
        except DomainError as err:
            log.warning("%s", err)
        for _ in range(50):  # libvirt removes the scratch files as the job ends
            if not domain.has_backup_job():
                return
            time.sleep(0.1)

    def _drop_checkpoint(self, domain: Domain, checkpoint: str) -> None:
        """The backup failed: take back the checkpoint it created."""
        try:
            if checkpoint in domain.checkpoint_names():
                domain.delete_checkpoint(checkpoint)
                log.info("removed checkpoint %s of the failed backup", checkpoint)
        except DomainError as err:
            log.warning("%s", err)


def given_up_note(names: list[str]) -> str:
    """What a failed full backup had given up: the checkpoints it removed
    (libvirt cannot keep two checkpoints of one name, and every chain
    starts at virtnbdbackup.0)."""
    ordered = sorted(names, key=lambda n: int(n.rsplit(".", 1)[1]) if n[-1].isdigit() else -1)
    listed = ordered[0] if len(ordered) == 1 else f"{ordered[0]} to {ordered[-1]}"
    return (
        f"before it failed, this full backup had removed the checkpoints of the previous "
        f"chain ({listed}): that chain's backups still restore, but its folder can take no "
        "further incremental backup (its next inc starts a new chain); free the cause and "
        "take the full backup again"
    )


def _existing_bitmap(message: str) -> str | None:
    """The name in QEMU's "Bitmap already exists: NAME" refusal, if it is one of ours."""
    match = re.search(r"Bitmap already exists: (\S+)", message)
    if match and match.group(1).startswith(f"{CHECKPOINT_PREFIX}."):
        return match.group(1)
    return None


def kill_backup_job(opts: BackupOptions) -> None:
    """-k: stop a backup job left running on the domain."""
    hypervisor = Hypervisor(opts.uri, opts.user, opts.password)
    try:
        domain = hypervisor.domain(opts.domain)
        if not domain.has_backup_job():
            log.info("domain %s has no backup job running", domain.name)
            return
        domain.abort_job()
        log.info("stopped the backup job of domain %s", domain.name)
    finally:
        hypervisor.close()
