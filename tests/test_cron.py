"""Tests for underway.cron: parsing, error messages and the DST rule. Pure; no database.

Every test passes its own "now"; nothing reads the wall clock.
"""

from __future__ import annotations

import random
import re
import time
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter

from underway import cron
from underway.cron import ZonedSchedule

UTC = timezone.utc
NEW_YORK = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")

# Change days used throughout: (zone, local date, kind).
NY_SPRING = date(2027, 3, 14)  # 02:00 EST -> 03:00 EDT
NY_FALL = date(2027, 11, 7)  # 02:00 EDT -> 01:00 EST
BERLIN_SPRING = date(2027, 3, 28)  # 02:00 CET -> 03:00 CEST
BERLIN_FALL = date(2027, 10, 31)  # 03:00 CEST -> 02:00 CET
LH_FALL = date(2019, 4, 7)  # 02:00 +11:00 -> 01:30 +10:30
LH_SPRING = date(2019, 10, 6)  # 02:00 +10:30 -> 02:30 +11:00


def utc(*args: int) -> datetime:
    """An aware UTC datetime."""
    return datetime(*args, tzinfo=UTC)


def fires_on(schedule: ZonedSchedule, day: date) -> list[datetime]:
    """Every fire time whose local date (in the schedule's zone) is ``day``."""
    start = datetime.combine(day, datetime.min.time(), tzinfo=schedule.zone)
    end = datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=schedule.zone)
    # (start - 1µs, end - 1µs] is the local day [00:00, 24:00); if midnight itself is skipped
    # these still resolve to the instants bounding the day.
    return schedule.fires_between(
        start - timedelta(microseconds=1), end - timedelta(microseconds=1)
    )


def as_utc(fires: list[datetime]) -> list[str]:
    """Fire times as compact UTC strings, for readable assertions."""
    return [f.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") for f in fires]


def gaps(fires: list[datetime]) -> set[timedelta]:
    """The set of real (UTC) intervals between consecutive fire times."""
    instants = [f.astimezone(UTC) for f in fires]
    return {b - a for a, b in zip(instants, instants[1:])}


# --------------------------------------------------------------------------------------------
# Parsing


@pytest.mark.parametrize(
    ("text", "expression", "zone_name"),
    [
        ("0 * * * *", "0 * * * *", "UTC"),
        ("30 2 * * *[America/New_York]", "30 2 * * *", "America/New_York"),
        ("*/15 8-18 * * MON-FRI[Europe/Berlin]", "*/15 8-18 * * MON-FRI", "Europe/Berlin"),
        (
            "  */15   8-18 * *  MON-FRI [ Europe/Berlin ]  ",
            "*/15 8-18 * * MON-FRI",
            "Europe/Berlin",
        ),
        ("*/5 * * * * *", "*/5 * * * * *", "UTC"),
        ("@daily[Asia/Tokyo]", "@daily", "Asia/Tokyo"),
        ("@Hourly", "@hourly", "UTC"),
        ("0 0 1 JAN,JUL *[Etc/GMT+5]", "0 0 1 JAN,JUL *", "Etc/GMT+5"),
        ("0 9 * * 1-5[UTC]", "0 9 * * 1-5", "UTC"),
    ],
)
def test_parse_forms_and_round_trip(text: str, expression: str, zone_name: str) -> None:
    schedule = ZonedSchedule.parse(text)
    assert schedule.expression == expression
    assert schedule.zone_name == zone_name
    assert schedule.zone == ZoneInfo(zone_name)
    assert isinstance(schedule.zone, ZoneInfo)
    assert str(schedule) == f"{expression}[{zone_name}]"
    again = ZonedSchedule.parse(str(schedule))
    assert again == schedule
    assert hash(again) == hash(schedule)
    assert str(again) == str(schedule)


def test_constructor_matches_parse() -> None:
    built = ZonedSchedule("30 2 * * *", "America/New_York")
    assert built == ZonedSchedule.parse("30 2 * * *[America/New_York]")
    assert ZonedSchedule("30 2 * * *", NEW_YORK) == built
    assert ZonedSchedule("30 2 * * *") == ZonedSchedule.parse("30 2 * * *[UTC]")
    assert built != ZonedSchedule.parse("30 2 * * *[Europe/Berlin]")
    assert repr(built) == "ZonedSchedule.parse('30 2 * * *[America/New_York]')"


def test_names_ranges_and_steps_weekdays_in_berlin() -> None:
    schedule = ZonedSchedule.parse("*/15 8-18 * * MON-FRI[Europe/Berlin]")
    friday_evening = datetime(2027, 1, 8, 18, 40, tzinfo=BERLIN)  # a Friday
    assert schedule.next_after(friday_evening) == datetime(2027, 1, 8, 18, 45, tzinfo=BERLIN)
    last_friday = datetime(2027, 1, 8, 18, 45, tzinfo=BERLIN)
    assert schedule.next_after(last_friday) == datetime(2027, 1, 11, 8, 0, tzinfo=BERLIN)
    fires = fires_on(schedule, date(2027, 1, 11))
    assert len(fires) == 11 * 4
    assert fires[0].hour == 8 and fires[-1] == datetime(2027, 1, 11, 18, 45, tzinfo=BERLIN)
    assert fires_on(schedule, date(2027, 1, 9)) == []  # Saturday


def test_month_names_lists_and_stepped_ranges() -> None:
    months = ZonedSchedule.parse("0 0 1 JAN,jul *")
    assert months.next_after(utc(2027, 2, 1)) == utc(2027, 7, 1)
    assert months.next_after(utc(2027, 7, 1)) == utc(2028, 1, 1)
    stepped = ZonedSchedule.parse("10-50/20 * * * *")
    assert stepped.fires_between(utc(2027, 1, 1), utc(2027, 1, 1, 1)) == [
        utc(2027, 1, 1, 0, 10),
        utc(2027, 1, 1, 0, 30),
        utc(2027, 1, 1, 0, 50),
    ]
    dow_names = ZonedSchedule.parse("0 12 * * SAT,sun")
    saturday, sunday = utc(2027, 1, 2, 12), utc(2027, 1, 3, 12)
    assert dow_names.fires_between(utc(2027, 1, 1), utc(2027, 1, 7)) == [saturday, sunday]


def test_equal_range_means_one_value() -> None:
    # croniter alone reads "2-2" (and "SUN-SUN") as the whole field.
    schedule = ZonedSchedule.parse("0 2-2 * * SUN-SUN")
    assert schedule.fires_between(utc(2027, 1, 1), utc(2027, 1, 15)) == [
        utc(2027, 1, 3, 2),
        utc(2027, 1, 10, 2),
    ]
    assert schedule.is_fixed_time


def test_six_fields_put_seconds_first() -> None:
    every_five_seconds = ZonedSchedule.parse("*/5 * * * * *")
    assert every_five_seconds.fires_between(utc(2027, 1, 1), utc(2027, 1, 1, 0, 0, 20)) == [
        utc(2027, 1, 1, 0, 0, 5),
        utc(2027, 1, 1, 0, 0, 10),
        utc(2027, 1, 1, 0, 0, 15),
        utc(2027, 1, 1, 0, 0, 20),
    ]
    every_five_minutes = ZonedSchedule.parse("0 */5 * * * *")
    assert every_five_minutes.fires_between(utc(2027, 1, 1), utc(2027, 1, 1, 0, 12)) == [
        utc(2027, 1, 1, 0, 5),
        utc(2027, 1, 1, 0, 10),
    ]
    half_past_noon = ZonedSchedule.parse("30 0 12 * * *[Europe/Berlin]")
    assert half_past_noon.next_after(utc(2027, 1, 1)) == datetime(
        2027, 1, 1, 12, 0, 30, tzinfo=BERLIN
    )
    assert half_past_noon.is_fixed_time
    # Strictly after, also at sub-minute resolution.
    assert every_five_seconds.next_after(utc(2027, 1, 1, 0, 0, 5)) == utc(2027, 1, 1, 0, 0, 10)
    assert every_five_seconds.next_after(datetime(2027, 1, 1, 0, 0, 4, 999999, tzinfo=UTC)) == utc(
        2027, 1, 1, 0, 0, 5
    )


@pytest.mark.parametrize(
    ("alias", "equivalent"),
    [
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@monthly", "0 0 1 * *"),
        ("@weekly", "0 0 * * 0"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@hourly", "0 * * * *"),
    ],
)
def test_aliases(alias: str, equivalent: str) -> None:
    schedule = ZonedSchedule.parse(f"{alias}[America/New_York]")
    reference = ZonedSchedule.parse(f"{equivalent}[America/New_York]")
    assert schedule.expression == alias
    start = utc(2026, 12, 15)
    end = start + (timedelta(days=3) if alias == "@hourly" else timedelta(days=400))
    expected = reference.fires_between(start, end)
    assert expected
    assert schedule.fires_between(start, end) == expected
    assert ZonedSchedule.parse(alias.upper()).expression == alias


def test_alias_values() -> None:
    now = utc(2027, 5, 12, 10, 20)  # a Wednesday
    assert ZonedSchedule.parse("@hourly").next_after(now) == utc(2027, 5, 12, 11)
    assert ZonedSchedule.parse("@daily").next_after(now) == utc(2027, 5, 13)
    assert ZonedSchedule.parse("@weekly").next_after(now) == utc(2027, 5, 16)  # Sunday
    assert ZonedSchedule.parse("@monthly").next_after(now) == utc(2027, 6, 1)
    assert ZonedSchedule.parse("@yearly").next_after(now) == utc(2028, 1, 1)


@pytest.mark.parametrize(
    ("text", "fixed"),
    [
        ("30 2 * * *", True),
        ("@daily", True),
        ("@weekly", True),
        ("0 9 * * MON-FRI", True),
        ("15 30 2 * * *", True),
        ("@hourly", False),
        ("0 * * * *", False),
        ("*/15 * * * *", False),
        ("*/15 1 * * *", False),
        ("0,30 2 * * *", False),
        ("30 2,14 * * *", False),
        ("0 1-3 * * *", False),
        ("*/10 30 2 * * *", False),
    ],
)
def test_fixed_time_classification(text: str, fixed: bool) -> None:
    assert ZonedSchedule.parse(text).is_fixed_time is fixed


# --------------------------------------------------------------------------------------------
# Errors


def test_unknown_zone_message() -> None:
    with pytest.raises(ValueError) as info:
        ZonedSchedule.parse("@daily[Mars/Olympus]")
    assert str(info.value) == "unknown time zone 'Mars/Olympus' in '@daily[Mars/Olympus]'"
    assert not isinstance(info.value, KeyError)


def test_bad_field_message_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"^bad cron expression '61 \* \* \* \*': .*minute.*'61'"):
        ZonedSchedule.parse("61 * * * *")
    with pytest.raises(ValueError, match=r"invalid hour field '24'"):
        ZonedSchedule.parse("0 24 * * *[Europe/Berlin]")
    with pytest.raises(ValueError, match=r"invalid second field '60'"):
        ZonedSchedule.parse("60 * * * * *")
    with pytest.raises(ValueError, match=r"invalid day-of-week field 'FUNDAY'"):
        ZonedSchedule.parse("0 0 * * FUNDAY")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"empty cron expression"),
        ("   ", r"empty cron expression"),
        ("[UTC]", r"empty cron expression"),
        ("* * * *", r"expected 5 fields .* got 4"),
        ("* * * * * * *", r"expected 5 fields .* got 7"),
        ("0 0 1 1 * 2030", r"day-of-week field '2030'"),
        ("@reboot", r"unknown alias"),
        ("@daily 5", r"unknown alias"),
        ("0 0 32 * *", r"day-of-month field '32'"),
        ("0 0 0 * *", r"day-of-month field '0'"),
        ("0 0 * 13 *", r"month field '13'"),
        ("0 0 * JANUARY *", r"month field 'JANUARY'"),
        ("0 0 * * 8", r"day-of-week field '8'"),
        ("*/0 * * * *", r"minute field '\*/0'"),
        ("1,,2 * * * *", r"minute field '1,,2'"),
        ("-1 * * * *", r"minute field '-1'"),
        ("x * * * *", r"minute field 'x'"),
        ("H * * * *", r"hashed/random value 'H' in the minute field"),
        ("0 R * * *", r"hashed/random value 'R' in the hour field"),
        ("0 0 30 2 *", r"never fires"),
        ("0 0 * * *\u00a0", r"bad cron expression"),
        ("0 0 * * *[UTC", r"malformed schedule"),
        ("0 0 * * *]", r"malformed schedule"),
        ("0 0 * * *[UTC][UTC]", r"malformed schedule"),
        ("0 0 * * *[UTC] 5", r"malformed schedule"),
        ("0 0 * * *[]", r"empty time zone"),
        ("0 0 * * *[../etc/passwd]", r"unknown time zone '\.\./etc/passwd'"),
        ("0 0 * * *[/etc/passwd]", r"unknown time zone '/etc/passwd'"),
        ("0 0 * * *[America]", r"unknown time zone 'America'"),
        ("0 0 * * *[zone.tab]", r"unknown time zone 'zone.tab'"),
        ("0 0 * * *[america/new_york]", r"unknown time zone 'america/new_york'"),
    ],
)
def test_malformed_schedules(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ZonedSchedule.parse(text)


def test_wrong_types() -> None:
    with pytest.raises(TypeError):
        ZonedSchedule.parse(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ZonedSchedule.parse("@daily").next_after(date(2027, 1, 1))  # type: ignore[arg-type]


def test_naive_datetimes_are_refused() -> None:
    schedule = ZonedSchedule.parse("@daily[America/New_York]")
    naive = datetime(2027, 1, 1, 12, 0)
    with pytest.raises(ValueError, match=r"next_after\(\) needs a timezone-aware datetime"):
        schedule.next_after(naive)
    with pytest.raises(ValueError, match=r"timezone-aware"):
        schedule.previous_at_or_before(naive)
    with pytest.raises(ValueError, match=r"timezone-aware"):
        schedule.fires_between(naive, utc(2027, 1, 2))
    with pytest.raises(ValueError, match=r"timezone-aware"):
        schedule.fires_between(utc(2027, 1, 1), naive)


# --------------------------------------------------------------------------------------------
# DST: fixed times


def test_new_york_0230_spring_forward_fires_once_after_the_gap() -> None:
    schedule = ZonedSchedule.parse("30 2 * * *[America/New_York]")
    fires = fires_on(schedule, NY_SPRING)
    assert fires == [datetime(2027, 3, 14, 3, 0, tzinfo=NEW_YORK)]
    assert as_utc(fires) == ["2027-03-14 07:00:00Z"]
    assert fires[0].utcoffset() == timedelta(hours=-4)
    # The days around are untouched.
    assert fires_on(schedule, NY_SPRING - timedelta(days=1))[0].hour == 2
    assert fires_on(schedule, NY_SPRING + timedelta(days=1))[0].hour == 2


def test_new_york_0230_fall_back_fires_once() -> None:
    schedule = ZonedSchedule.parse("30 2 * * *[America/New_York]")
    assert as_utc(fires_on(schedule, NY_FALL)) == ["2027-11-07 07:30:00Z"]


def test_new_york_0130_fall_back_fires_once_on_the_first_pass() -> None:
    schedule = ZonedSchedule.parse("30 1 * * *[America/New_York]")
    fires = fires_on(schedule, NY_FALL)
    assert as_utc(fires) == ["2027-11-07 05:30:00Z"]
    assert fires[0].utcoffset() == timedelta(hours=-4)  # EDT, the first 01:30
    # Asked from between the two 01:30s, the next one is tomorrow's.
    between = utc(2027, 11, 7, 6, 0)  # 01:00 EST
    assert schedule.next_after(between) == datetime(2027, 11, 8, 1, 30, tzinfo=NEW_YORK)
    assert schedule.previous_at_or_before(utc(2027, 11, 7, 6, 40)) == fires[0]


def test_berlin_fixed_times_on_both_change_days() -> None:
    at_0230 = ZonedSchedule.parse("30 2 * * *[Europe/Berlin]")
    spring = fires_on(at_0230, BERLIN_SPRING)
    assert as_utc(spring) == ["2027-03-28 01:00:00Z"]
    assert spring == [datetime(2027, 3, 28, 3, 0, tzinfo=BERLIN)]
    fall = fires_on(at_0230, BERLIN_FALL)
    assert as_utc(fall) == ["2027-10-31 00:30:00Z"]  # 02:30 CEST, not 02:30 CET (01:30Z)
    assert fall[0].utcoffset() == timedelta(hours=2)
    at_0200 = ZonedSchedule.parse("0 2 * * *[Europe/Berlin]")
    assert as_utc(fires_on(at_0200, BERLIN_SPRING)) == ["2027-03-28 01:00:00Z"]
    assert as_utc(fires_on(at_0200, BERLIN_FALL)) == ["2027-10-31 00:00:00Z"]


def test_six_field_schedules_follow_the_same_rule() -> None:
    fixed = ZonedSchedule.parse("15 30 2 * * *[America/New_York]")
    assert as_utc(fires_on(fixed, NY_SPRING)) == ["2027-03-14 07:00:00Z"]  # 03:00:00 EDT
    assert as_utc(fires_on(fixed, NY_FALL)) == ["2027-11-07 07:30:15Z"]
    repeated = ZonedSchedule.parse("15 30 1 * * *[America/New_York]")
    assert as_utc(fires_on(repeated, NY_FALL)) == ["2027-11-07 05:30:15Z"]
    stepped = ZonedSchedule.parse("*/30 30 1 * * *[America/New_York]")
    assert as_utc(fires_on(stepped, NY_FALL)) == [
        "2027-11-07 05:30:00Z",
        "2027-11-07 05:30:30Z",
        "2027-11-07 06:30:00Z",
        "2027-11-07 06:30:30Z",
    ]


def test_lord_howe_thirty_minute_shift() -> None:
    # Fall back: 02:00 +11:00 -> 01:30 +10:30, so 01:30-01:59 happens twice, 30 min apart.
    repeated = ZonedSchedule.parse("45 1 * * *[Australia/Lord_Howe]")
    fires = fires_on(repeated, LH_FALL)
    assert as_utc(fires) == ["2019-04-06 14:45:00Z"]
    assert fires[0].utcoffset() == timedelta(hours=11)
    # Spring forward: 02:00 +10:30 -> 02:30 +11:00; 02:15 fires at 02:30.
    skipped = ZonedSchedule.parse("15 2 * * *[Australia/Lord_Howe]")
    fires = fires_on(skipped, LH_SPRING)
    assert fires == [datetime(2019, 10, 6, 2, 30, tzinfo=LORD_HOWE)]
    assert as_utc(fires) == ["2019-10-05 15:30:00Z"]
    # A time just outside the repeated half hour is not affected.
    assert as_utc(fires_on(ZonedSchedule.parse("15 1 * * *[Australia/Lord_Howe]"), LH_FALL)) == [
        "2019-04-06 14:15:00Z"
    ]


def test_daily_midnight_in_a_zone_that_skips_midnight() -> None:
    # Chile springs forward at 24:00, so one local date a year has no 00:00.
    schedule = ZonedSchedule.parse("@daily[America/Santiago]")
    fires = schedule.fires_between(
        datetime(2027, 1, 1, tzinfo=schedule.zone) - timedelta(seconds=1),
        datetime(2027, 12, 31, 12, tzinfo=schedule.zone),
    )
    assert len(fires) == 365
    assert len({f.date() for f in fires}) == 365
    late = [f for f in fires if f.hour != 0]
    assert len(late) == 1
    assert (late[0].hour, late[0].minute) == (1, 0)
    before = late[0].astimezone(UTC) - timedelta(seconds=1)
    assert before.astimezone(schedule.zone).utcoffset() != late[0].utcoffset()


# --------------------------------------------------------------------------------------------
# DST: interval schedules


@pytest.mark.parametrize(
    ("zone", "day", "hourly", "quarterly"),
    [
        ("America/New_York", NY_SPRING, 23, 92),
        ("America/New_York", NY_FALL, 25, 100),
        ("Europe/Berlin", BERLIN_SPRING, 23, 92),
        ("Europe/Berlin", BERLIN_FALL, 25, 100),
        ("America/New_York", date(2027, 6, 1), 24, 96),
    ],
)
def test_interval_schedules_keep_real_spacing(
    zone: str, day: date, hourly: int, quarterly: int
) -> None:
    every_hour = fires_on(ZonedSchedule.parse(f"0 * * * *[{zone}]"), day)
    assert len(every_hour) == hourly
    assert gaps(every_hour) == {timedelta(hours=1)}
    every_quarter = fires_on(ZonedSchedule.parse(f"*/15 * * * *[{zone}]"), day)
    assert len(every_quarter) == quarterly
    assert gaps(every_quarter) == {timedelta(minutes=15)}


def test_stepped_minutes_in_a_fixed_hour_run_through_both_passes() -> None:
    schedule = ZonedSchedule.parse("*/15 1 * * *[America/New_York]")
    fall = fires_on(schedule, NY_FALL)
    assert as_utc(fall) == [
        "2027-11-07 05:00:00Z",
        "2027-11-07 05:15:00Z",
        "2027-11-07 05:30:00Z",
        "2027-11-07 05:45:00Z",
        "2027-11-07 06:00:00Z",
        "2027-11-07 06:15:00Z",
        "2027-11-07 06:30:00Z",
        "2027-11-07 06:45:00Z",
    ]
    assert [f.utcoffset() for f in fall] == [timedelta(hours=-4)] * 4 + [timedelta(hours=-5)] * 4
    assert len(fires_on(schedule, NY_SPRING)) == 4
    # No 02:xx exists on the spring day, so a stepped 02:xx schedule has no ticks then.
    assert fires_on(ZonedSchedule.parse("*/15 2 * * *[America/New_York]"), NY_SPRING) == []


def test_lord_howe_interval_schedules() -> None:
    quarterly = ZonedSchedule.parse("*/15 * * * *[Australia/Lord_Howe]")
    fall = fires_on(quarterly, LH_FALL)
    assert len(fall) == 98
    assert gaps(fall) == {timedelta(minutes=15)}
    spring = fires_on(quarterly, LH_SPRING)
    assert len(spring) == 94
    assert gaps(spring) == {timedelta(minutes=15)}


def test_interval_next_after_from_the_first_pass_finds_the_second_pass() -> None:
    quarterly = ZonedSchedule.parse("*/15 * * * *[America/New_York]")
    first_pass_0150 = datetime(2027, 11, 7, 1, 50, tzinfo=NEW_YORK)  # fold=0: EDT
    assert first_pass_0150.utcoffset() == timedelta(hours=-4)
    after = quarterly.next_after(first_pass_0150)
    # A fold=1 result never compares == to another zone's datetime (PEP 495): use UTC.
    assert after.astimezone(UTC) == utc(2027, 11, 7, 6, 0)  # 01:00 EST
    assert (after.hour, after.minute, after.fold) == (1, 0, 1)
    assert after.utcoffset() == timedelta(hours=-5)
    hourly = ZonedSchedule.parse("0 * * * *[America/New_York]")
    after = hourly.next_after(datetime(2027, 11, 7, 1, 30, tzinfo=NEW_YORK))
    assert after.astimezone(UTC) == utc(2027, 11, 7, 6)
    second_pass_0120 = datetime(2027, 11, 7, 1, 20, fold=1, tzinfo=NEW_YORK)
    before = quarterly.previous_at_or_before(second_pass_0120)
    assert before is not None and before.astimezone(UTC) == utc(2027, 11, 7, 6, 15)
    before = hourly.previous_at_or_before(second_pass_0120)
    assert before is not None and before.astimezone(UTC) == utc(2027, 11, 7, 6)
    # The first-pass readings are still found from before the change.
    first_pass = quarterly.previous_at_or_before(datetime(2027, 11, 7, 1, 50, tzinfo=NEW_YORK))
    assert first_pass is not None and first_pass.astimezone(UTC) == utc(2027, 11, 7, 5, 45)


# --------------------------------------------------------------------------------------------
# next_after / previous_at_or_before / fires_between in general


def test_results_are_in_the_schedule_zone_whatever_the_input_zone() -> None:
    schedule = ZonedSchedule.parse("0 9 * * *[Asia/Tokyo]")
    fire = schedule.next_after(datetime(2027, 1, 1, tzinfo=timezone(timedelta(hours=-8))))
    assert fire.tzinfo is schedule.zone
    assert fire == datetime(2027, 1, 2, 9, tzinfo=ZoneInfo("Asia/Tokyo"))
    previous = schedule.previous_at_or_before(utc(2027, 1, 1))
    assert previous is not None and previous.tzinfo is schedule.zone


def test_previous_at_or_before() -> None:
    schedule = ZonedSchedule.parse("@daily[America/New_York]")
    noon = datetime(2027, 11, 7, 12, tzinfo=NEW_YORK)
    midnight = datetime(2027, 11, 7, 0, tzinfo=NEW_YORK)
    assert schedule.previous_at_or_before(noon) == midnight
    assert schedule.previous_at_or_before(midnight) == midnight  # "at or before"
    one_before = midnight - timedelta(microseconds=1)
    assert schedule.previous_at_or_before(one_before) == datetime(2027, 11, 6, tzinfo=NEW_YORK)
    assert ZonedSchedule.parse("30 0 * * *").previous_at_or_before(utc(1, 1, 1)) is None
    spring = ZonedSchedule.parse("30 2 * * *[America/New_York]")
    assert spring.previous_at_or_before(utc(2027, 3, 14, 7, 0, 1)) == utc(2027, 3, 14, 7)
    assert spring.previous_at_or_before(utc(2027, 3, 14, 6, 59)) == datetime(
        2027, 3, 13, 2, 30, tzinfo=NEW_YORK
    )


def test_fires_between_is_half_open() -> None:
    schedule = ZonedSchedule.parse("0 * * * *")
    assert schedule.fires_between(utc(2027, 1, 1, 1), utc(2027, 1, 1, 3)) == [
        utc(2027, 1, 1, 2),
        utc(2027, 1, 1, 3),
    ]
    assert schedule.fires_between(utc(2027, 1, 1, 3), utc(2027, 1, 1, 1)) == []


def test_a_year_of_daily_in_los_angeles() -> None:
    schedule = ZonedSchedule.parse("@daily[America/Los_Angeles]")
    now = datetime(2026, 12, 31, 23, 59, 59, tzinfo=schedule.zone)
    fires = []
    while True:
        fire = schedule.next_after(now)
        assert fire > now
        if fire.year > 2027:
            break
        fires.append(fire)
        now = fire
    assert len(fires) == 365
    assert len({f.date() for f in fires}) == 365
    assert all((f.hour, f.minute, f.second) == (0, 0, 0) for f in fires)
    assert {f.utcoffset() for f in fires} == {timedelta(hours=-8), timedelta(hours=-7)}


def test_no_fire_time_representable() -> None:
    with pytest.raises(ValueError, match="no fire time after"):
        ZonedSchedule.parse("@yearly").next_after(utc(9999, 6, 1))


# --------------------------------------------------------------------------------------------
# Cross-check against a brute-force reading of the DST rule, minute by minute


def local_minutes(
    zone: ZoneInfo, start: datetime, end: datetime
) -> list[tuple[datetime, datetime]]:
    """(UTC instant, local time) for every whole UTC minute in [start, end)."""
    count = int((end - start) / timedelta(minutes=1))
    instants = [start + timedelta(minutes=n) for n in range(count)]
    return [(instant, instant.astimezone(zone)) for instant in instants]


def reference_fires(
    schedule: ZonedSchedule, minutes_: list[tuple[datetime, datetime]]
) -> list[datetime]:
    """The DST rule applied literally to each minute; for 5-field expressions whose day
    fields are all ``*``."""
    expanded, _ = croniter.expand(schedule.expression)
    minute_values, hour_values = expanded[0], expanded[1]

    def matches(wall: datetime) -> bool:
        return (minute_values == ["*"] or wall.minute in minute_values) and (
            hour_values == ["*"] or wall.hour in hour_values
        )

    fires = []
    for (_, earlier), (instant, local) in zip(minutes_, minutes_[1:]):
        wall = local.replace(tzinfo=None)
        if not schedule.is_fixed_time:
            # Interval schedules: every instant whose clock reading matches.
            if matches(wall):
                fires.append(instant)
            continue
        # Fixed times: skip the second pass of a repeated reading...
        second_pass = local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()
        # ...and fire readings skipped just before this instant (the clock jumped) here.
        jump = wall - earlier.replace(tzinfo=None) - timedelta(minutes=1)
        skipped = [wall - timedelta(minutes=n) for n in range(1, jump // timedelta(minutes=1) + 1)]
        if (matches(wall) and not second_pass) or any(matches(w) for w in skipped):
            fires.append(instant)
    return fires


CROSS_CHECK_EXPRESSIONS = [
    "30 2 * * *",
    "30 1 * * *",
    "0 2 * * *",
    "45 1 * * *",
    "15 2 * * *",
    "0 3 * * *",
    "59 1 * * *",
    "0 * * * *",
    "*/15 * * * *",
    "*/15 1 * * *",
    "0,30 1-3 * * *",
    "*/20 2 * * *",
]


@pytest.mark.parametrize(
    ("zone", "day"),
    [
        ("America/New_York", NY_SPRING),
        ("America/New_York", NY_FALL),
        ("Europe/Berlin", BERLIN_SPRING),
        ("Europe/Berlin", BERLIN_FALL),
        ("Australia/Lord_Howe", LH_FALL),
        ("Australia/Lord_Howe", LH_SPRING),
    ],
)
def test_matches_brute_force_around_changes(zone: str, day: date) -> None:
    tz = ZoneInfo(zone)
    midnight = datetime.combine(day, datetime.min.time(), tzinfo=tz).astimezone(UTC)
    # Reference fires over three days; probes over the change day, which then always has a
    # reference fire on either side.
    minutes_ = local_minutes(tz, midnight - timedelta(days=1), midnight + timedelta(days=2))
    window_start, window_end = minutes_[1][0], minutes_[-1][0]
    for expression in CROSS_CHECK_EXPRESSIONS:
        schedule = ZonedSchedule.parse(f"{expression}[{zone}]")
        expected = reference_fires(schedule, minutes_)
        got = schedule.fires_between(window_start - timedelta(seconds=1), window_end)
        assert as_utc(got) == as_utc(expected), expression
        # From many starting instants (odd seconds too), on both passes of a repeated hour:
        # strictly after / at or before, and the same answers as the brute force.
        probe = midnight - timedelta(seconds=7)
        while probe < midnight + timedelta(days=1):
            after = schedule.next_after(probe)
            assert after > probe
            assert as_utc([after]) == as_utc([min(f for f in expected if f > probe)]), probe
            before = schedule.previous_at_or_before(probe)
            assert before is not None and before <= probe
            assert as_utc([before]) == as_utc([max(f for f in expected if f <= probe)]), probe
            probe += timedelta(minutes=17, seconds=1)
        for fire in expected:
            if midnight <= fire < midnight + timedelta(days=1):
                assert as_utc([schedule.previous_at_or_before(fire)]) == as_utc([fire])
                assert as_utc([schedule.next_after(fire - timedelta(microseconds=1))]) == as_utc(
                    [fire]
                )


def test_error_message_example_from_the_docs() -> None:
    with pytest.raises(ValueError) as info:
        ZonedSchedule.parse("61 * * * *")
    assert re.match(r"^bad cron expression '61 \* \* \* \*': ", str(info.value))


# --------------------------------------------------------------------------------------------
# Hostile texts (issue #14): every input is refused or accepted within milliseconds

# Generous: a few milliseconds of work each; the backtracking parser took seconds to minutes.
FAST = 0.25


def timed_parse(text: str) -> tuple[float, ZonedSchedule | ValueError]:
    """Parse ``text``; return the seconds taken and the schedule or the ValueError raised."""
    start = time.perf_counter()
    try:
        outcome: ZonedSchedule | ValueError = ZonedSchedule.parse(text)
    except ValueError as exc:
        outcome = exc
    return time.perf_counter() - start, outcome


def test_length_bound() -> None:
    limit = cron.MAX_SCHEDULE_LENGTH
    assert limit == 1000
    at_limit = "0 0 * * *" + " " * (limit - len("0 0 * * *[UTC]")) + "[UTC]"
    assert len(at_limit) == limit
    assert str(ZonedSchedule.parse(at_limit)) == "0 0 * * *[UTC]"
    over = at_limit + " "
    with pytest.raises(ValueError, match=r"^schedule expression is too long \(1001 characters;"):
        ZonedSchedule.parse(over)
    with pytest.raises(ValueError, match=r"the limit is 1000\): '0 0 \* \* \*  "):
        ZonedSchedule.parse(over)
    # The constructor's parts are bounded too.
    with pytest.raises(ValueError, match=r"^cron expression is too long \(1001 characters;"):
        ZonedSchedule("0 0 * * *" + " " * (limit - 8))
    with pytest.raises(ValueError, match=r"^time zone is too long \(2000 characters; the limit"):
        ZonedSchedule("0 0 * * *", "a/" * 1000)


@pytest.mark.timeout(5)
@pytest.mark.parametrize(
    ("text", "message"),
    [
        # The example, and the same shape within the length bound.
        ("*" + " " * 4000 + "[", r"too long"),
        ("*" + " " * 900 + "[", r"malformed schedule"),
        # Long runs of whitespace between fields.
        ("0" + " " * 3000 + "0" + " " * 3000 + "* * *", r"too long"),
        ("0" + " " * 450 + "0" + "\t" * 450 + "* * * * *", r"expected 5 fields .* got 7"),
        ("0" + " " * 495 + "0" + "\n" * 495 + "* * ", r"expected 5 fields .* got 4"),
        # Many brackets.
        ("[" * 100_000, r"too long"),
        ("]" * 100_000, r"too long"),
        ("[]" * 50_000, r"too long"),
        ("[" * 999, r"malformed schedule"),
        ("[" + " " * 997 + "]]", r"malformed schedule"),
        ("0 0 * * *" + "[ ]" * 330, r"malformed schedule"),
        ("0 0 * * *" + " " * 980 + "][", r"malformed schedule"),
        # 100k characters.
        ("x" * 100_000, r"too long"),
        ("1 " * 50_000, r"too long"),
        ("* * * * *[" + "a/" * 50_000 + "]", r"too long"),
        ("1-" * 495 + " * * * *", r"minute field"),
        ("*/" * 495 + " * * * *", r"minute field"),
        (",".join(["1"] * 496) + ",", r"expected 5 fields"),
        # Whitespace-heavy zone parts.
        ("0 0 * * *[" + " " * 5000 + "UTC" + " " * 5000 + "x", r"too long"),
        ("0 0 * * *[" + " " * 490 + "UTC" + " " * 490 + "x", r"malformed schedule"),
        ("0 0 * * *[" + "\t " * 494 + "[", r"malformed schedule"),
        ("0 0 * * *[" + " " * 490 + "Mars/Olympus" + " " * 480 + "]", r"'Mars/Olympus'"),
        ("0 0 * * *[" + "a/" * 494 + "!]", r"unknown time zone 'a/a/a/"),
    ],
    ids=lambda value: f"{len(value)}" if len(value) > 60 or "\n" in value else None,
)
def test_hostile_texts_are_refused_quickly(text: str, message: str) -> None:
    elapsed, outcome = timed_parse(text)
    assert isinstance(outcome, ValueError), outcome
    assert re.search(message, str(outcome)), str(outcome)
    assert elapsed < FAST
    # The message names the bad part without repeating a huge input.
    assert len(str(outcome)) < 2 * cron.MAX_SCHEDULE_LENGTH + 300


@pytest.mark.timeout(5)
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0" + " " * 450 + "0" + " \t\n" * 150 + "* * *", "0 0 * * *[UTC]"),
        (" " * 400 + "@daily" + " " * 400, "@daily[UTC]"),
        ("0 0 * * *[" + " " * 490 + "Europe/Berlin" + " " * 480 + "]", "0 0 * * *[Europe/Berlin]"),
        ("0 0 * * *" + " " * 985 + "[UTC]", "0 0 * * *[UTC]"),
        (",".join(str(n % 60) for n in range(330)) + " * * * *", None),
    ],
    ids=lambda value: f"{len(value)}" if value and len(value) > 60 else None,
)
def test_long_valid_texts_are_accepted_quickly(text: str, expected: str | None) -> None:
    elapsed, outcome = timed_parse(text)
    assert isinstance(outcome, ZonedSchedule), outcome
    if expected is not None:
        assert str(outcome) == expected
    assert elapsed < FAST


@pytest.mark.timeout(20)
def test_random_texts_up_to_the_bound_are_quick() -> None:
    rng = random.Random(14)
    # Half without brackets, so that croniter gets to see the long expressions too.
    no_brackets = [*" \t\n*/-,0123456789HhRrLW#?@()MONJAxyz", "\u00a0"]
    alphabets = [no_brackets, [*no_brackets, "[", "]", "Europe/Berlin"]]
    slowest = 0.0
    for n in range(300):
        text = "".join(rng.choices(alphabets[n % 2], k=rng.randint(1, 1000)))
        text = text[: cron.MAX_SCHEDULE_LENGTH]
        elapsed, _outcome = timed_parse(text)
        slowest = max(slowest, elapsed)
    assert slowest < FAST


# The pre-#14 parser, used on short texts only, where its backtracking is harmless.
OLD_TEXT_RE = re.compile(
    r"^\s*(?P<expr>[^\[\]]*?)\s*(?:\[\s*(?P<zone>[^\[\]]*?)\s*\])?\s*$", re.ASCII
)


def test_splitting_matches_the_old_regex() -> None:
    pieces = ["0 0 * * *", "UTC", " ", "\t\n", "[", "]", "\u00a0"]
    texts = [""]
    for _ in range(4):
        texts += [text + piece for text in texts for piece in pieces]
    for text in dict.fromkeys(texts):
        match = OLD_TEXT_RE.match(text)
        _elapsed, outcome = timed_parse(text)
        if match is None:
            assert isinstance(outcome, ValueError), text
            assert str(outcome).startswith("malformed schedule"), text
            continue
        try:
            zone = match.group("zone")
            expected = str(ZonedSchedule(match.group("expr"), "UTC" if zone is None else zone))
        except ValueError as exc:
            assert isinstance(outcome, ValueError), text
            # The same complaint; only the quoted context may differ.
            assert str(outcome).split("'")[0] == str(exc).split("'")[0], text
            continue
        assert isinstance(outcome, ZonedSchedule), (text, outcome)
        assert str(outcome) == expected, text
