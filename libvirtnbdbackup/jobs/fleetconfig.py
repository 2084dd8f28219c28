"""What a fleet run is asked to do: hypervisors, selection, limits, periods
and per-VM settings, from a TOML file and the command line (which wins).

The file (``virtnbdfleet backup -c FILE``) says what the options say, and
more::

    output = "/backup"        # ROOT
    jobs = 4                  # VMs backed up at once, all hypervisors
    host_jobs = 2             # ... and per hypervisor
    period = "monthly"        # a new full each daily, weekly, monthly or yearly period
    level = "auto"            # auto, diff, full or copy
    compress = 2              # lz4 level, or false
    select = ["web*", "re:^db[0-9]+$", "tag:nightly"]
    exclude = ["*-scratch"]

    [retention]               # virtnbdprune's keep rules, applied after each VM's backup
    keep_daily = 7
    keep_monthly = 6

    [[hypervisor]]
    uri = "qemu+ssh://root@hv1/system"
    name = "hv1"              # folder name (default: the URI's host, localhost if local)
    host_jobs = 1
    nbd_port = 10809          # NBD over TCP from this port (default: over SSH, no port)
    nbd_ports = 64            # ... and how many from there
    tls = true
    select = ["db*"]          # adds to the selection above, for this hypervisor only

    [hypervisor.vm.db1]       # settings of VM db1 on hv1
    level = "diff"

    [vm.webvm]                # settings of VM webvm on any hypervisor
    compress = 9
    freeze = ["/", "/var"]
    exclude_disks = ["vdb"]
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..adapters.nbdclient import DEFAULT_PORT
from ..errors import UsageError
from .fleetselect import Selection, parse_selectors
from .keeprules import parse_duration as parse_keep_within
from .remote import DEFAULT_TLS_DIR, LibvirtUri, RemoteOptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10: the tomli backport (a dependency there)
    import tomli as tomllib

LEVELS = ("auto", "diff", "full", "copy")
PERIODS = ("daily", "weekly", "monthly", "yearly")
DEFAULT_PERIOD = "monthly"
DEFAULT_JOBS = 2
DEFAULT_NBD_PORTS = 64
LOCAL_HOST_NAME = "localhost"
# A host or VM name becomes one folder name: one plain path component, not
# hidden (a dot first: also "." and ".."), no control characters.
UNSAFE_NAME = re.compile(r"^\.|/|[\x00-\x1f\x7f]")
MAX_NAME = 255

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> float:
    """``26h``, ``90m``, ``2d12h``, ``1w``, ``3600s`` or plain seconds, in seconds."""
    value = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        return float(value)
    parts = DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise UsageError(f"{text!r} is not a duration: give e.g. 26h, 90m, 2d12h or 1w")
    return sum(float(n) * DURATION_UNITS[u] for n, u in parts)


def period_name(period: str, when: datetime) -> str:
    """The folder name of the period ``when`` falls in."""
    if period == "daily":
        return when.strftime("%Y-%m-%d")
    if period == "weekly":
        year, week, _day = when.isocalendar()
        return f"{year}-W{week:02d}"
    if period == "monthly":
        return when.strftime("%Y-%m")
    if period == "yearly":
        return when.strftime("%Y")
    raise UsageError(f"period {period!r}: choose one of {', '.join(PERIODS)}")


def check_name(what: str, name: str) -> str:
    if not name or UNSAFE_NAME.search(name) or len(name.encode()) > MAX_NAME:
        raise UsageError(
            f"{what} {name!r} cannot be a folder name (no '/', no control characters, "
            "not starting with a dot)"
        )
    return name


@dataclass(frozen=True)
class VmSettings:
    """How one VM is backed up."""

    level: str = "auto"
    period: str = DEFAULT_PERIOD
    compress: int | None = None
    freeze: tuple[str, ...] = ()  # guest mountpoints to freeze (-F)
    include_disks: tuple[str, ...] = ()
    exclude_disks: tuple[str, ...] = ()
    raw: bool = False
    args: tuple[str, ...] = ()  # more virtnbdbackup options, as given

    def updated(self, values: Mapping[str, Any]) -> VmSettings:
        return dataclasses.replace(self, **dict(values))


RETENTION_COUNTS = ("keep_last", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")


@dataclass(frozen=True)
class Retention:
    """virtnbdprune's keep rules, run on ROOT/HOST/VM after each good backup."""

    counts: tuple[tuple[str, int], ...] = ()  # (keep_daily, 7), ...
    within: str | None = None  # keep_within, in virtnbdprune's units (m: months)
    verify: bool = False

    def prune_args(self) -> list[str]:
        args = []
        for key, value in self.counts:
            args += ["--" + key.replace("_", "-"), str(value)]
        if self.within:
            args += ["--keep-within", self.within]
        if self.verify:
            args.append("--verify")
        return args


@dataclass(frozen=True)
class HypervisorConfig:
    uri: str
    name: str
    user: str | None = None
    password: str | None = None
    remote: RemoteOptions = field(default_factory=RemoteOptions)
    nbd_ports: int = DEFAULT_NBD_PORTS
    host_jobs: int | None = None
    selection: Selection = field(default_factory=Selection)
    vms: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def is_remote(self) -> bool:
        return LibvirtUri.parse(self.uri).is_remote


@dataclass
class FleetConfig:
    output: Path | None = None
    hypervisors: list[HypervisorConfig] = field(default_factory=list)
    selection: Selection = field(default_factory=Selection)
    jobs: int = DEFAULT_JOBS
    host_jobs: int | None = None
    defaults: VmSettings = field(default_factory=VmSettings)
    vms: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    retention: Retention | None = None
    scratchdir: str | None = None
    strict: bool = False

    def settings_for(self, host: HypervisorConfig, vm: str) -> VmSettings:
        """Defaults, then ``[vm.NAME]``, then ``[hypervisor.vm.NAME]``."""
        settings = self.defaults.updated(self.vms.get(vm, {}))
        return settings.updated(host.vms.get(vm, {}))

    def host_limit(self, host: HypervisorConfig) -> int:
        return host.host_jobs or self.host_jobs or self.jobs

    def selection_for(self, host: HypervisorConfig) -> Selection:
        return self.selection + host.selection


def default_host_name(uri: str) -> str:
    host = LibvirtUri.parse(uri).host
    return host or LOCAL_HOST_NAME


# ---- the TOML file -------------------------------------------------------


class _Table:
    """One TOML table, read key by key with type checks; unknown keys are errors."""

    def __init__(self, where: str, data: Mapping[str, Any]) -> None:
        self.where = where
        self.data = dict(data)
        self.used: set[str] = set()

    def _get(self, key: str, types: tuple[type, ...], kind: str) -> Any:
        self.used.add(key)
        if key not in self.data:
            return None
        value = self.data[key]
        if isinstance(value, bool) and bool not in types:
            raise UsageError(f"{self.where}: {key} must be {kind}, not {value!r}")
        if not isinstance(value, types):
            raise UsageError(f"{self.where}: {key} must be {kind}, not {value!r}")
        return value

    def text(self, key: str) -> str | None:
        value = self._get(key, (str,), "a string")
        return None if value is None else str(value)

    def number(self, key: str, low: int = 1, high: int = 65535) -> int | None:
        value = self._get(key, (int,), "a whole number")
        if value is not None and not low <= value <= high:
            raise UsageError(f"{self.where}: {key} must be from {low} to {high}, not {value}")
        return None if value is None else int(value)

    def flag(self, key: str) -> bool | None:
        value = self._get(key, (bool,), "true or false")
        return None if value is None else bool(value)

    def texts(self, key: str) -> list[str] | None:
        value = self._get(key, (list,), "a list of strings")
        if value is None:
            return None
        if not all(isinstance(v, str) for v in value):
            raise UsageError(f"{self.where}: {key} must be a list of strings")
        return [str(v) for v in value]

    def tables(self, key: str) -> dict[str, Mapping[str, Any]]:
        value = self._get(key, (dict,), "a table")
        if value is None:
            return {}
        for name, sub in value.items():
            if not isinstance(sub, dict):
                raise UsageError(f"{self.where}: {key}.{name} must be a table")
        return dict(value)

    def table_list(self, key: str) -> list[Mapping[str, Any]]:
        value = self._get(key, (list,), "an array of tables ([[...]])")
        if value is None:
            return []
        if not all(isinstance(v, dict) for v in value):
            raise UsageError(f"{self.where}: {key} must be an array of tables ([[{key}]])")
        return list(value)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise UsageError(f"{self.where}: unknown setting(s) {', '.join(unknown)}")


def _vm_settings(table: _Table) -> dict[str, Any]:
    """The keys of a ``[vm.NAME]`` table (or of the top level) as VmSettings fields."""
    values: dict[str, Any] = {}
    level = table.text("level")
    if level is not None:
        if level not in LEVELS:
            raise UsageError(f"{table.where}: level {level!r}: choose one of {', '.join(LEVELS)}")
        values["level"] = level
    period = table.text("period")
    if period is not None:
        if period not in PERIODS:
            raise UsageError(
                f"{table.where}: period {period!r}: choose one of {', '.join(PERIODS)}"
            )
        values["period"] = period
    if "compress" in table.data:
        raw = table.data["compress"]
        if raw is False:
            table.used.add("compress")
            values["compress"] = None
        elif raw is True:
            table.used.add("compress")
            values["compress"] = 2
        else:
            values["compress"] = table.number("compress", 0, 16)
    for key, name in (
        ("freeze", "freeze"),
        ("include_disks", "include_disks"),
        ("exclude_disks", "exclude_disks"),
        ("args", "args"),
    ):
        items = table.texts(key)
        if items is not None:
            values[name] = tuple(items)
    raw_disks = table.flag("raw")
    if raw_disks is not None:
        values["raw"] = raw_disks
    return values


def _vm_tables(where: str, tables: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, data in tables.items():
        table = _Table(f"{where}.{name}", data)
        out[name] = _vm_settings(table)
        table.finish()
    return out


def _selection(table: _Table) -> Selection:
    return Selection(
        parse_selectors(table.texts("select") or []),
        parse_selectors(table.texts("exclude") or []),
        bool(table.flag("all")),
    )


def _hypervisor(where: str, data: Mapping[str, Any]) -> HypervisorConfig:
    table = _Table(where, data)
    uri = table.text("uri")
    if not uri:
        raise UsageError(f'{where}: uri is missing (e.g. uri = "qemu+ssh://root@hv1/system")')
    name = check_name(f"{where}: name", table.text("name") or default_host_name(uri))
    nbd_port, nbd_ip, tls = table.number("nbd_port"), table.text("nbd_ip"), table.flag("tls")
    remote = RemoteOptions(
        ssh_user=table.text("ssh_user"),
        ssh_port=table.number("ssh_port"),
        ssh_key=table.text("ssh_private_key"),
        nbd_port=nbd_port or DEFAULT_PORT,
        nbd_ip=nbd_ip,
        tls=bool(tls),
        tls_cert=table.text("tls_cert") or DEFAULT_TLS_DIR,
        over_ssh=not tcp_transport(nbd_port, nbd_ip, bool(tls)),
    )
    host = HypervisorConfig(
        uri=uri,
        name=name,
        user=table.text("user"),
        password=_password(table),
        remote=remote,
        nbd_ports=table.number("nbd_ports", 1, 65535) or DEFAULT_NBD_PORTS,
        host_jobs=table.number("host_jobs", 1, 1024),
        selection=_selection(table),
        vms=_vm_tables(f"{where}.vm", table.tables("vm")),
    )
    table.finish()
    return host


def _password(table: _Table) -> str | None:
    """``password``, else the first line of ``password_file``."""
    password = table.text("password")
    path = table.text("password_file")
    if password is None and path:
        try:
            with open(path, encoding="utf-8") as fh:
                return fh.readline().rstrip("\r\n")
        except OSError as err:
            raise UsageError(f"{table.where}: password_file {path}: {err.strerror}") from None
    return password


def _retention(top: _Table) -> Retention | None:
    data = top._get("retention", (dict,), "a table")
    if data is None:
        return None
    table = _Table(f"{top.where}: retention", data)
    counts = []
    for key in RETENTION_COUNTS:
        value = table.number(key, 0, 1_000_000)
        if value:
            counts.append((key, value))
    within = table.text("keep_within")
    if within is not None:
        parse_keep_within(within)  # refused here rather than after the first backup
    retention = Retention(tuple(counts), within, bool(table.flag("verify")))
    table.finish()
    if not counts and not within:
        raise UsageError(
            f"{table.where}: no keep rule; give keep_last, keep_daily, keep_weekly, "
            "keep_monthly, keep_yearly or keep_within (or leave out [retention])"
        )
    return retention


def load_config(path: Path) -> FleetConfig:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise UsageError(f"cannot read the fleet configuration {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"{path} is not valid TOML: {err}") from None
    table = _Table(str(path), data)
    output = table.text("output")
    config = FleetConfig(
        output=Path(output) if output else None,
        jobs=table.number("jobs", 1, 1024) or DEFAULT_JOBS,
        host_jobs=table.number("host_jobs", 1, 1024),
        selection=_selection(table),
        scratchdir=table.text("scratchdir"),
        strict=bool(table.flag("strict")),
    )
    config.defaults = VmSettings().updated(_vm_settings(table))
    config.vms = dict(_vm_tables(f"{path}: vm", table.tables("vm")))
    config.retention = _retention(table)
    config.hypervisors = [
        _hypervisor(f"{path}: hypervisor #{i + 1}", data)
        for i, data in enumerate(table.table_list("hypervisor"))
    ]
    table.finish()
    check_unique_hosts(config.hypervisors)
    return config


def check_unique_hosts(hosts: list[HypervisorConfig]) -> None:
    seen: dict[str, str] = {}
    for host in hosts:
        if host.name in seen:
            raise UsageError(
                f"hypervisors {seen[host.name]} and {host.uri} would share the folder "
                f"{host.name}: give one of them another name (name = ... in the configuration)"
            )
        seen[host.name] = host.uri


def tcp_transport(nbd_port: int | None, nbd_ip: str | None, tls: bool) -> bool:
    """Whether a remote job runs NBD over TCP (2.47's way) rather than over SSH.

    As with virtnbdbackup: a port, an address or TLS selects TCP; else each job's
    NBD socket is forwarded over its SSH connection and needs no port at all.
    """
    return nbd_port is not None or nbd_ip is not None or tls
