"""Keep rules against answers worked out by hand."""

from __future__ import annotations

from datetime import datetime

import pytest

from libvirtnbdbackup.errors import UsageError
from libvirtnbdbackup.jobs.keeprules import Dated, Duration, KeepRules, parse_duration, select

# Two points a day from Sat 2026-10-24 to Mon 2026-11-02 (ISO weeks 43, 44, 45),
# at 01:00 and 13:00: 20 points, newest last.
POINTS = [
    Dated(f"{day:%m%d}-{hour:02d}", day.replace(hour=hour))
    for day in [datetime(2026, 10, d) for d in range(24, 32)]
    + [datetime(2026, 11, 1), datetime(2026, 11, 2)]
    for hour in (1, 13)
]


def kept(rules: KeepRules, points: list[Dated] = POINTS) -> dict[str, list[str]]:
    return {str(k): v for k, v in select(points, rules).items() if v}


def test_last() -> None:
    assert kept(KeepRules(last=3)) == {
        "1102-13": ["last 3"],
        "1102-01": ["last 3"],
        "1101-13": ["last 3"],
    }


def test_daily_keeps_the_newest_of_each_day() -> None:
    assert kept(KeepRules(daily=3)) == {
        "1102-13": ["daily 3"],
        "1101-13": ["daily 3"],
        "1031-13": ["daily 3"],
    }


def test_weekly_and_monthly_count_on_their_own() -> None:
    # Week 45 is Mon 11-02 only; week 44 is 10-26..11-01; week 43 ends Sun 10-25.
    assert kept(KeepRules(weekly=3, monthly=2)) == {
        "1102-13": ["weekly 3", "monthly 2"],
        "1101-13": ["weekly 3"],
        "1031-13": ["monthly 2"],
        "1025-13": ["weekly 3"],
    }


def test_rules_combine_and_more_than_there_are_keeps_all_buckets() -> None:
    result = kept(KeepRules(last=1, daily=2, yearly=5))
    assert result == {"1102-13": ["last 1", "daily 2", "yearly 5"], "1101-13": ["daily 2"]}


def test_within_is_measured_from_the_newest_point() -> None:
    # 1102-13 minus 1d12h is 1101-01: that point and the three after it.
    assert sorted(kept(KeepRules(within=parse_duration("1d12h")))) == [
        "1101-01",
        "1101-13",
        "1102-01",
        "1102-13",
    ]


def test_protected_points_are_kept_whatever_the_rules() -> None:
    points = [Dated(p.key, p.time, protected=p.key == "1024-01") for p in POINTS]
    assert kept(KeepRules(last=1), points) == {
        "1102-13": ["last 1"],
        "1024-01": ["protected"],
    }


def test_no_rule_is_refused() -> None:
    with pytest.raises(UsageError, match="no keep rule"):
        select(POINTS, KeepRules())


def test_equal_times_keep_the_given_order() -> None:
    same = datetime(2026, 1, 1, 12)
    points = [Dated("a", same), Dated("b", same)]
    assert kept(KeepRules(last=1), points) == {"b": ["last 1"]}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("14d", Duration(days=14)),
        ("2w", Duration(days=14)),
        ("1y6m", Duration(years=1, months=6)),
        ("36h", Duration(hours=36)),
        ("1y2m3d4h", Duration(1, 2, 3, 4)),
    ],
)
def test_durations(text: str, expected: Duration) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "14", "3x", "d14", "1 d"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(UsageError, match="not understood"):
        parse_duration(text)


def test_months_go_by_the_calendar() -> None:
    assert Duration(months=1).before(datetime(2026, 3, 31)) == datetime(2026, 2, 28)
    assert Duration(years=1).before(datetime(2028, 2, 29)) == datetime(2027, 2, 28)
    assert Duration(months=13).before(datetime(2026, 1, 15)) == datetime(2024, 12, 15)
