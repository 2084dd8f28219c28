"""Manual pages of the commands, built from their argument parsers.

Every console script in ``pyproject.toml`` gets ``man/<command>.1``; its
module must have a ``build_parser()`` that returns the command's parser.
argparse-manpage formats the options; this module adds the sections a
parser does not hold (exit status, files, examples, see also).

Regenerate after changing an option::

    scripts/gen-man.sh                     # or: python -m libvirtnbdbackup.cli.manpages
    python -m libvirtnbdbackup.cli.manpages --check     # exit 1 when man/ is stale

The date in a page's header changes only when the rest of the page does,
so regenerating an unchanged page leaves the file as it is.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import importlib
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import tomllib
from argparse_manpage.manpage import Manpage

from .common import EXIT_ERROR, EXIT_OK, EXIT_WARNINGS

REPO = Path(__file__).resolve().parents[2]
MAN_DIR = REPO / "man"
SECTION = "1"
# Help texts are laid out at a fixed width so that the page source does not
# depend on the terminal the generator runs in (roff refills them anyway).
SOURCE_WIDTH = 80
REGENERATE = "scripts/gen-man.sh"

# .TH title section date source manual
HEADER = re.compile(r'^\.TH (\S+) "([^"]*)" "([^"]*)" (.*)$')


@dataclass(frozen=True)
class Command:
    name: str
    module: str  # the module whose build_parser() builds the command's parser

    @property
    def page_name(self) -> str:
        return f"{self.name}.{SECTION}"


@dataclass(frozen=True)
class Project:
    version: str
    commands: tuple[Command, ...]


def read_project(pyproject: Path = REPO / "pyproject.toml") -> Project:
    """The version and the console scripts (the registry of commands)."""
    if not pyproject.is_file():
        raise SystemExit(f"{pyproject} is missing: man pages are built in a source checkout")
    project = tomllib.loads(pyproject.read_text())["project"]
    commands = tuple(
        Command(name, parser_module(name, target.split(":", 1)[0]))
        for name, target in sorted(project.get("scripts", {}).items())
    )
    return Project(project["version"], commands)


def parser_module(name: str, module: str) -> str:
    """A script that starts through the launcher (``cli/launch.py``) has its
    parser in the module the launcher names."""
    commands = getattr(importlib.import_module(module), "COMMANDS", None)
    if isinstance(commands, dict) and name in commands:
        return str(commands[name])
    return module


def build_parser(command: Command) -> argparse.ArgumentParser:
    builder = getattr(importlib.import_module(command.module), "build_parser", None)
    if builder is None:
        raise SystemExit(
            f"{command.module} has no build_parser(): the man page of {command.name} "
            "is built from the parser that function returns"
        )
    parser: argparse.ArgumentParser = builder()
    for each in dict.fromkeys([parser, *subparsers(parser)]):
        formatter = cast(type[argparse.HelpFormatter], each.formatter_class)
        each.formatter_class = functools.partial(formatter, width=SOURCE_WIDTH)
    return parser


def subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers of the command's subcommands (virtnbdfleet backup, ...), nested too."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found += [sub, *subparsers(sub)]
    return found


def escape(text: str) -> str:
    """Plain text as roff source: backslashes, hyphens and control characters."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return re.sub(r"^([.'])", r"\\&\1", text, flags=re.MULTILINE)


def paragraphs(*texts: str) -> str:
    return "\n.PP\n".join(escape(t) for t in texts)


def tagged(items: Sequence[tuple[str, str]], tag_font: str = "B") -> str:
    """A list of (tag, text) as .TP entries."""
    return "\n".join(f".TP\n.{tag_font} {escape(tag)}\n{escape(text)}" for tag, text in items)


# What the parsers cannot say: longer descriptions and the files a command
# reads or writes. A command missing here gets the sections every page has.
DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "virtnbdbackup": (
        "virtnbdbackup backs up the disks of a libvirt/KVM domain. For a running "
        "domain it starts a pull-mode backup job in libvirt, which serves each disk "
        "over NBD, reads the allocation map and saves only allocated data into thin "
        "stream files, optionally lz4-compressed, each with a checksum file. A shut-off "
        "domain is read through qemu-nbd.",
        "A full backup creates the checkpoint virtnbdbackup.0 and each inc backup the "
        "next one, so that later backups save only the blocks changed since; a diff "
        "backup saves the changes since the last checkpoint without creating one. copy "
        "and full backups need an empty output folder; inc and diff backups add to the "
        "backup set in it. Level auto takes a full backup into an empty folder and an "
        "inc backup otherwise.",
        "Data files are written as NAME.partial and renamed once complete. If a backup "
        "fails or is interrupted, the backup job is stopped, the checkpoint it created "
        "is removed and the unfinished files are deleted; the domain keeps running.",
        "Checkpoints libvirt has lost are redefined from the saved checkpoint XML. When "
        "QEMU refuses the dirty bitmap of the last checkpoint, an incremental backup "
        "would not restore correctly: a full backup then starts a new chain and the old "
        "one is moved, restorable, into a chain.TIMESTAMP folder. Both are logged as "
        "warnings.",
    ),
    "virtnbdrestore": (
        "virtnbdrestore rebuilds disk images from a backup set written by "
        "virtnbdbackup. For each disk it creates a qcow2 image with the options of the "
        "source image, serves it with qemu-nbd and replays the full or copy backup, then "
        "each incremental backup of the chain and the newest differential backup on top. "
        "The chain is taken from the metadata of the data files, not from file times.",
        "An image is written as NAME.partial and renamed once complete; an existing "
        "image is never overwritten. With -o dump the metadata of the backup set is "
        "printed as JSON, with -o verify every data file is checked against its "
        "checksum file.",
    ),
    "virtnbdmap": (
        "virtnbdmap serves the disk that a chain of backup data files restores to as "
        "one NBD export, without restoring it first. An nbdkit server with the "
        "package's python plugin answers each read from the newest file holding the "
        "range; unsaved ranges and zero frames read as zeroes; lz4-compressed files are "
        "decompressed piece by piece. Writes go to nbdkit's copy-on-write filter and "
        "never reach the backup files; -r refuses them.",
        "The export becomes /dev/nbdN where the kernel has the nbd module, otherwise a "
        "loop device on the file nbdfuse makes of it, with its partitions; with --listen "
        "it is only served; with --boot a transient domain is started from the saved "
        "domain XML with qcow2 overlays on the exports as disks. virtnbdmap runs until "
        "Ctrl-C, SIGTERM or virtnbdmap --stop, then removes everything it set up, also "
        "after an error; the overlays of --boot are kept.",
        "Opening a chain reads the extent index side file of each data file, written "
        "by the backup, and rebuilds it from the frame headers when it is missing or "
        "stale.",
    ),
    "virtnbdprune": (
        "virtnbdprune thins out the backup sets of virtnbdbackup by keep rules, as restic "
        "and Proxmox do: a backup (a point: one full, inc or diff run) is kept when any "
        "rule keeps it, or when it is protected. Each rule counts on its own; times are "
        "those recorded in the backups' metadata. It works on one backup folder or on a "
        "folder of them (one per month, say), counting the points of all together.",
        "A point that is not kept but that a kept one depends on is merged forward: the "
        "full backup and the incrementals up to the oldest kept link of the chain become "
        "one new full backup at that link's checkpoint, an ordinary full data file that "
        "virtnbdrestore, virtnbdmap and virtnbdbackup 2.x read; incrementals between two "
        "kept links become one incremental at the later one. The next virtnbdbackup -l "
        "inc or -l auto continues the chain. Differential backups that no rule keeps, and "
        "folders of which no point is kept, are removed. The newest link of a chain is "
        "always kept while anything of its folder is: the next incremental backup builds "
        "on it. Libvirt checkpoints of merged backups are deleted, oldest first, so that "
        "QEMU stops tracking their bitmaps; the bitmap of the newest checkpoint is not "
        "touched.",
        "A merge reads each file of the chain once and checks it against its checksum "
        "file; compressed extents that survive whole are copied as stored. The new file "
        "is written into INPUT/.virtnbdprune/, synced and compared with the chain it "
        "replaces (its extent map and a sample of its bytes; every byte with --verify) "
        "before anything else changes; then a journal commits the merge and the replaced "
        "files are removed. A run that is killed is finished, or its unfinished merge "
        "removed, by the next run. Nothing runs while a backup writes into the folder.",
    ),
    "virtnbdfleet": (
        "virtnbdfleet backs up the selected domains of one or more hypervisors, each "
        "with its own virtnbdbackup process, into ROOT/HOST/VM/PERIOD: a full backup "
        "into each new period folder (monthly unless --period or the configuration says "
        "otherwise), incremental backups into it after that. Hypervisors are given by "
        "libvirt URI (-U, or [[hypervisor]] tables of the TOML configuration of -c), "
        "domains by name, glob, regular expression, metadata tag or --all, less "
        "--exclude.",
        "At most --jobs backups run at once, and at most --host-jobs per hypervisor. Each "
        "job of a remote hypervisor gets its own NBD ports from the range of -P and "
        "--nbd-ports. A VM folder is locked while its backup runs, so that a VM is never "
        "backed up twice at once; a lock left by a killed run is taken over. With a "
        "[retention] table in the configuration, virtnbdprune applies its keep rules to "
        "ROOT/HOST/VM after each good backup, while the VM folder is still locked.",
        "Every run and every VM's result, size, duration, throughput, exit code and "
        "message go to the ledger ROOT/virtnbdfleet.sqlite. virtnbdfleet status prints "
        "from it, per VM, the last good backup and the last failure. On SIGINT or SIGTERM "
        "every running backup is stopped and cleans up as a single virtnbdbackup does; "
        "the ledger records the jobs that were cut short and those never started.",
        "Tags are read from the domain's metadata element in the namespace "
        "urn:virtnbdbackup:fleet, e.g. <fleet><tag>nightly</tag></fleet>, set with virsh "
        "metadata DOMAIN --uri urn:virtnbdbackup:fleet --key fleet --set XML.",
    ),
}

FILES: dict[str, tuple[tuple[str, str], ...]] = {
    "virtnbdbackup": (
        ("OUTPUT/DISK.full.data, OUTPUT/DISK.copy.data", "Full and copy backups of a disk."),
        ("OUTPUT/DISK.inc.virtnbdbackup.N.data", "Incremental backup up to checkpoint N."),
        ("OUTPUT/DISK.diff.EPOCH.data", "Differential backup taken at EPOCH."),
        ("OUTPUT/*.data.chksum", "Adler-32 checksum of each stream data file."),
        ("OUTPUT/*.data.idx", "Extent index of each stream data file, for virtnbdmap."),
        ("OUTPUT/*.partial", "A data file being written; left behind only by a crash."),
        ("OUTPUT/DOMAIN.cpt", "The checkpoint chain of the backup set, as a JSON list."),
        ("OUTPUT/checkpoints/NAME.xml", "Checkpoint XML, to redefine lost checkpoints (-C)."),
        ("OUTPUT/vmconfig.IDENT.xml", "The domain XML at the time of each backup."),
        ("OUTPUT/DISK.IDENT.qcow.json", "qemu-img info of the source image, for restore."),
        ("OUTPUT/backup.LEVEL.TIMESTAMP.log", "The log of each run."),
        ("OUTPUT/chain.TIMESTAMP/", "A chain set aside when a new one had to be started."),
        ("SCRATCHDIR/virtnbdbackup.PID", "The NBD socket of the backup job (-f)."),
    ),
    "virtnbdrestore": (
        ("OUTPUT/IMAGE", "A restored image, named after the source image in the domain XML."),
        ("OUTPUT/IMAGE.partial", "An image being restored; renamed to IMAGE when complete."),
        ("OUTPUT/vmconfig.IDENT.xml", "The domain XML of the backup, adjusted with -c."),
        ("OUTPUT/BOOTFILE", "Restored loader, nvram, kernel and initrd files."),
        ("INPUT/*.data.partial", "Unfinished data files of a failed backup; ignored."),
    ),
    "virtnbdprune": (
        ("INPUT/POINT.protect", "Marks backup POINT as protected: always kept (--protect)."),
        ("INPUT/virtnbdprune.json", "Checkpoints of the chain merged into its full backup."),
        ("INPUT/.virtnbdprune/", "Work folder of a merge; its journal.json commits it."),
        ("INPUT/.virtnbdbackup.lock", "Held while a prune or a backup works on the folder."),
    ),
    "virtnbdfleet": (
        ("ROOT/HOST/VM/PERIOD/", "A backup folder of virtnbdbackup, one per period."),
        ("ROOT/HOST/VM/TIMESTAMP/", "A backup folder of level full or copy, one per run."),
        ("ROOT/HOST/VM/.virtnbdbackup.lock", "The lock of the VM while its backup runs."),
        ("ROOT/virtnbdfleet.sqlite", "The ledger: every run and every VM's result."),
        ("ROOT/virtnbdfleet.logs/RUN/", "The run's log and each VM's virtnbdbackup output."),
        ("/run/virtnbdfleet/ports/", "Locks of the NBD ports handed out to running jobs."),
    ),
    "virtnbdmap": (
        ("INPUT/*.data.idx", "Extent index of each data file; rebuilt when missing or stale."),
        ("INPUT/vmconfig.IDENT.xml", "The domain XML --boot starts."),
        ("/var/tmp/virtnbdmap.*/", "Sockets, FUSE mount point and copy-on-write layer."),
        ("/var/tmp/virtnbdmap.NAME.*/DISK.overlay.qcow2", "Overlays of --boot (or -o)."),
        ("/run/virtnbdmap/PID.json", "What a running instance mapped, for --stop."),
    ),
}


def all_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The parser's options and those of its subcommands."""
    return [a for p in [parser, *subparsers(parser)] for a in p._actions]


def exit_status(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """The exit codes of cli.common.run_job, with the command's own --strict spelling."""
    strict = next(
        ("/".join(a.option_strings) for a in all_actions(parser) if a.dest == "strict"), None
    )
    usage = "an invalid command line, after the usage is printed."
    if strict:
        two = f"Finished, but warnings were logged and {strict} was given; also {usage}"
    else:
        two = usage[:1].upper() + usage[1:]
    return [
        (str(EXIT_OK), "Success."),
        (str(EXIT_ERROR), "An error; the last log line says what failed and what to do."),
        (str(EXIT_WARNINGS), two),
    ]


SEE_ALSO_TOOLS = ("virsh(1)", "qemu-img(1)", "qemu-nbd(8)")


def examples(epilog: str | None) -> str | None:
    """The parser's epilog (``# what it does`` above each command line) as roff."""
    if not epilog:
        return None
    out: list[str] = []
    commands: list[str] = []

    def flush() -> None:
        if commands:
            out.extend([".PP", ".RS 4", ".EX", *map(escape, commands), ".EE", ".RE"])
            commands.clear()

    lines = epilog.strip().splitlines()
    if lines[0].rstrip().endswith(":") and not lines[0].lstrip().startswith("#"):
        lines = lines[1:]  # a heading such as "examples:"; .SH EXAMPLES replaces it
    for line in lines:
        line = line.strip()
        if line.startswith("#"):
            flush()
            text = line.lstrip("#").strip()
            out.extend([".PP", escape(text[:1].upper() + text[1:])])
        elif line:
            commands.append(line)
    flush()
    return "\n".join(out[1:])  # .SH already starts a paragraph


def synopsis(parser: argparse.ArgumentParser) -> str:
    usage = parser.format_usage().split(":", 1)[1].split()
    words = " ".join(f"\\%{escape(word)}" for word in usage[1:])  # \% : never hyphenate
    return f".B {escape(usage[0])}\n{words}"


def render(command: Command, project: Project, date: str) -> str:
    parser = build_parser(command)
    description = parser.description or ""
    epilog, parser.epilog = parser.epilog, None  # shown as EXAMPLES, not as COMMENTS
    page = Manpage(parser)
    page.date = date
    page.source = f"virtnbdbackup {project.version}"
    page.manual = "User Commands"
    page.section = SECTION
    page.description = description.rstrip(".")[:1].lower() + description.rstrip(".")[1:]
    page.add_section("synopsis", "=", synopsis(parser))
    if command.name in DESCRIPTIONS:
        parser.description = None  # the NAME line has it; the section gets the long text
        page.add_section("description", "=", paragraphs(*DESCRIPTIONS[command.name]))
    page.add_section("exit status", "=", tagged(exit_status(parser)))
    if command.name in FILES:
        page.add_section("files", "=", tagged(FILES[command.name], tag_font="I"))
    example_text = examples(epilog)
    if example_text:
        page.add_section("examples", "=", example_text)
    others = [f"{c.name}({SECTION})" for c in project.commands if c != command]
    see_also = ",\n".join(
        f".BR {escape(ref.replace('(', ' ('))}" for ref in [*others, *SEE_ALSO_TOOLS]
    )
    page.add_section("see also", "=", see_also)
    return str(page)


def undated(page: str) -> str:
    """The page without the date in its header, to compare contents."""
    first, _, rest = page.partition("\n")
    match = HEADER.match(first)
    if match:
        first = f'.TH {match[1]} "{match[2]}" "" {match[4]}'
    return f"{first}\n{rest}"


def today() -> str:
    stamp = float(os.environ.get("SOURCE_DATE_EPOCH", time.time()))
    return time.strftime("%Y-%m-%d", time.gmtime(stamp))


def page_text(command: Command, project: Project, existing: Path) -> str:
    """The page; ``existing`` is kept as it is, date included, when nothing else changed."""
    page = render(command, project, today())
    if existing.is_file():
        old = existing.read_text()
        if undated(old) == undated(page):
            return old
    return page


def generate(out_dir: Path, project: Project | None = None) -> list[Path]:
    """Write every command's page into ``out_dir``; the paths written."""
    project = project or read_project()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for command in project.commands:
        path = out_dir / command.page_name
        text = page_text(command, project, MAN_DIR / command.page_name)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
        written.append(path)
    return written


def stale_pages(man_dir: Path = MAN_DIR, project: Project | None = None) -> list[str]:
    """What differs between ``man_dir`` and fresh pages, as unified diffs (dates ignored)."""
    project = project or read_project()
    problems = []
    expected = {c.page_name for c in project.commands}
    for extra in sorted({p.name for p in man_dir.glob(f"*.{SECTION}")} - expected):
        problems.append(f"{man_dir / extra}: no console script of that name in pyproject.toml")
    for command in project.commands:
        path = man_dir / command.page_name
        fresh = undated(render(command, project, ""))
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        current = undated(path.read_text())
        if current != fresh:
            diff = difflib.unified_diff(
                current.splitlines(), fresh.splitlines(), str(path), "generated", lineterm=""
            )
            problems.append("\n".join(diff))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m libvirtnbdbackup.cli.manpages",
        description="Build the manual pages of the commands from their argument parsers.",
    )
    parser.add_argument(
        "-o", "--output", type=Path, default=MAN_DIR, help="Folder to write into. (default: man/)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="Write nothing; exit 1 when the pages in the folder are stale.",
    )
    args = parser.parse_args(argv)
    if args.check:
        problems = stale_pages(args.output)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print(f"man pages are stale: regenerate them with {REGENERATE}", file=sys.stderr)
            return EXIT_ERROR
        return EXIT_OK
    for path in generate(args.output):
        print(path)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
