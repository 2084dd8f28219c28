"""Keep rules: which backup points a retention policy keeps, and why.

The rules are those of restic and Proxmox: ``last N`` keeps the N newest
points; ``daily/weekly/monthly/yearly N`` keep the newest point of each of
the N newest days (ISO weeks, months, years) that hold a point; ``within
DURATION`` keeps every point taken within that time before the newest one.
Each rule counts on its own (a point kept by one rule still counts for the
others), as restic does. A protected point is always kept.

Times are the local times of the backups' meta JSON (``date``).
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from ..errors import UsageError

_DURATION = re.compile(r"(\d+)([yMmwdh])")
_UNITS = "y (years), m (months), w (weeks), d (days), h (hours)"


@dataclass(frozen=True)
class Duration:
    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    def before(self, moment: datetime) -> datetime:
        """``moment`` minus this duration, months and years by the calendar."""
        month_index = moment.year * 12 + moment.month - 1 - self.years * 12 - self.months
        year, month = divmod(month_index, 12)
        day = min(moment.day, calendar.monthrange(year, month + 1)[1])
        shifted = moment.replace(year=year, month=month + 1, day=day)
        return shifted - timedelta(days=self.days, hours=self.hours)

    def __str__(self) -> str:
        parts = zip((self.years, self.months, self.days, self.hours), "ymdh", strict=True)
        return "".join(f"{n}{u}" for n, u in parts if n) or "0h"


def parse_duration(text: str) -> Duration:
    """``1y6m``, ``14d``, ``2w``, ``36h``: numbers with units y, m, w, d, h."""
    spec = text.strip()
    if not spec or _DURATION.sub("", spec):
        raise UsageError(f"duration {text!r} is not understood: use numbers with units {_UNITS}")
    years = months = days = hours = 0
    for number, unit in _DURATION.findall(spec):
        n = int(number)
        if unit == "y":
            years += n
        elif unit in "mM":
            months += n
        elif unit == "w":
            days += 7 * n
        elif unit == "d":
            days += n
        else:
            hours += n
    return Duration(years, months, days, hours)


@dataclass(frozen=True)
class KeepRules:
    last: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Duration | None = None

    def __post_init__(self) -> None:
        for name in ("last", "daily", "weekly", "monthly", "yearly"):
            if getattr(self, name) < 0:
                raise UsageError(f"--keep-{name} must not be negative")

    @property
    def empty(self) -> bool:
        counts = (self.last, self.daily, self.weekly, self.monthly, self.yearly)
        return not any(counts) and self.within is None

    def describe(self) -> str:
        parts = [
            f"{name} {getattr(self, name)}"
            for name in ("last", "daily", "weekly", "monthly", "yearly")
            if getattr(self, name)
        ]
        if self.within is not None:
            parts.append(f"within {self.within}")
        return ", ".join(parts) or "none"


@dataclass(frozen=True)
class Dated:
    """What the rules see of a point: an id, its time, whether it is protected."""

    key: Hashable
    time: datetime
    protected: bool = False


def _buckets() -> list[tuple[str, Callable[[datetime], Hashable]]]:
    return [
        ("daily", lambda t: t.date()),
        ("weekly", lambda t: t.isocalendar()[:2]),
        ("monthly", lambda t: (t.year, t.month)),
        ("yearly", lambda t: t.year),
    ]


def select(points: Sequence[Dated], rules: KeepRules) -> dict[Hashable, list[str]]:
    """For every point, the rules that keep it (empty list: not kept).

    Points are taken newest first; two points of the same time keep the
    order given (the later one in ``points`` counts as newer).
    """
    if rules.empty:
        raise UsageError(
            "no keep rule given: name at least one of --keep-last, --keep-daily, "
            "--keep-weekly, --keep-monthly, --keep-yearly, --keep-within"
        )
    order = sorted(range(len(points)), key=lambda i: (points[i].time, i), reverse=True)
    newest = [points[i] for i in order]
    reasons: dict[Hashable, list[str]] = {p.key: [] for p in points}
    for point in newest:
        if point.protected:
            reasons[point.key].append("protected")
    for point in newest[: rules.last]:
        reasons[point.key].append(f"last {rules.last}")
    for name, bucket_of in _buckets():
        count = getattr(rules, name)
        seen: list[Hashable] = []
        for point in newest:
            if len(seen) == count:
                break
            bucket = bucket_of(point.time)
            if seen and seen[-1] == bucket:
                continue
            seen.append(bucket)
            reasons[point.key].append(f"{name} {count}")
    if rules.within is not None and newest:
        since = rules.within.before(newest[0].time)
        for point in newest:
            if point.time >= since:
                reasons[point.key].append(f"within {rules.within}")
    return reasons
