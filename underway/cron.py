"""Cron schedules anchored to an IANA time zone: ``"30 2 * * *[America/New_York]"``.

A schedule is a cron expression with an optional ``[Zone/Name]`` suffix (UTC when absent):

* 5 fields: ``minute hour day-of-month month day-of-week``, with ``*``, ranges (``8-18``),
  lists (``1,15``), steps (``*/15``, ``10-50/20``) and names (``JAN``, ``MON-FRI``).
* 6 fields: a *leading* seconds field, as the Rust underway writes them, so ``*/5 * * * * *``
  fires every five seconds.
* Aliases: ``@yearly`` ``@annually`` ``@monthly`` ``@weekly`` ``@daily`` ``@midnight``
  ``@hourly``.

croniter does the calendar matching, on naive local wall-clock times only; this module maps
those wall-clock times to real instants itself, because croniter's own time-zone handling fires
a fixed time twice in the repeated hour.

DST rule (cron's traditional one):

* A schedule is *fixed-time* when its minute and hour fields (and its seconds field, if it
  has one) each match exactly one value, e.g. ``30 2 * * *`` or ``@daily``. Every other
  schedule is an *interval* schedule, e.g. ``0 * * * *``, ``*/15 * * * *``, ``*/15 1 * * *``
  or ``30 2,14 * * *``.
* Fixed-time, clock skipped (spring forward): a time that does not exist that day fires
  once, at the first instant after the gap (02:30 on New York's spring-forward day fires at
  03:00 EDT; 02:15 on Lord Howe's, where clocks jump 02:00 -> 02:30, fires at 02:30).
* Fixed-time, clock repeated (fall back): a time that occurs twice fires once, at its first
  occurrence (``fold=0``), whatever the size of the shift (an hour, or Lord Howe's 30 min).
* Interval schedules follow real elapsed time: they fire at every instant whose local clock
  reading matches, so a wall time inside a gap does not fire and one inside a repeated
  period fires on both passes. ``0 * * * *`` fires 23 or 25 times on the change days, one
  real hour apart; ``*/15 * * * *`` 92 or 100 times, 15 real minutes apart. Note that this
  covers hour lists too: in New York ``30 1,13 * * *`` runs at both 01:30s on the fall-back
  day, and ``30 2,14 * * *`` has no 02:30 run on the spring-forward day.

Day-of-month and day-of-week combine as in standard cron: when both are restricted, a day
matching either one matches. croniter's ``L``, ``W``, ``#`` and ``?`` are accepted; its hashed
and random fields (``H``, ``R``) are not, since they are not deterministic schedules.

Schedule texts are read from the database on every scheduler pass, so parsing is linear-time
(no backtracking regex) and texts longer than :data:`MAX_SCHEDULE_LENGTH` are refused outright.
"""

from __future__ import annotations

import copy
import re
from datetime import datetime, timedelta, timezone
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

__all__ = ["MAX_SCHEDULE_LENGTH", "ZonedSchedule"]

#: The longest schedule text (``"CRON[Zone/Name]"``), cron expression or zone name accepted.
#: Real schedules are a few dozen characters; the bound keeps croniter's work per text small.
MAX_SCHEDULE_LENGTH: Final = 1000

_ALIASES: dict[str, str] = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

_FIELDS_5 = ("minute", "hour", "day-of-month", "month", "day-of-week")
_FIELDS_6 = ("second", *_FIELDS_5)

# What \s matched in the regex this module once split texts with: ASCII whitespace only, so
# that e.g. a no-break space stays in the expression and is refused there as non-ASCII.
_SPACE = " \t\n\r\f\v"
# Every regex below is anchored and unambiguous (no two ways to match the same text), so it
# runs in linear time even when it fails; its inputs are also bounded by MAX_SCHEDULE_LENGTH.
# IANA names are slash-separated words; this rules out "..", absolute paths and file names.
_ZONE_RE = re.compile(r"^[A-Za-z0-9_+-]+(?:/[A-Za-z0-9_+-]+)*$")
# croniter's hashed/random values ("H", "H/15", "R(0-29)"), which we refuse.
_HASH_RE = re.compile(r"^[hr](?:\(\d+-\d+\))?(?:/\d+)?$", re.IGNORECASE)
# A range whose two ends may be equal, e.g. "2-2" or "MON-MON/3".
_RANGE_RE = re.compile(r"^(?P<low>[^-/]+)-(?P<high>[^-/]+)(?:/\d+)?$")

_UTC = timezone.utc
_SECOND = timedelta(seconds=1)
# next_after/previous_at_or_before visit one candidate wall time per iteration; even a
# per-second schedule next to a day-long historical time-zone shift needs under 10**5 of them.
_MAX_CANDIDATES = 1_000_000


class ZonedSchedule:
    """A cron expression evaluated in one IANA time zone, with a defined DST behaviour.

    Immutable and hashable; equal when the expression text and zone name are equal.
    """

    __slots__ = ("_cron", "_expression", "_fixed_time", "_zone")

    def __init__(self, expression: str, zone: str | ZoneInfo = "UTC") -> None:
        """Validate ``expression`` (no ``[zone]`` suffix) and ``zone``; raise ValueError if bad."""
        if not isinstance(expression, str):
            raise TypeError(f"cron expression must be a str, not {type(expression).__name__}")
        _check_length("cron expression", expression)
        if isinstance(zone, ZoneInfo):
            if not zone.key:
                raise ValueError("a ZoneInfo loaded from a file has no IANA name; pass its key")
            self._zone = zone
        else:
            self._zone = _load_zone(zone, expression)
        self._expression, self._cron, self._fixed_time = _compile(expression)

    @classmethod
    def parse(cls, text: str) -> ZonedSchedule:
        """Parse ``"<cron>"`` or ``"<cron>[Zone/Name]"``; raise ValueError naming the bad part."""
        if not isinstance(text, str):
            raise TypeError(f"schedule must be a str, not {type(text).__name__}")
        _check_length("schedule expression", text)
        expression, zone_name = _split_schedule(text)
        if zone_name is None:
            return cls(expression)
        return cls(expression, _load_zone(zone_name, text))

    @property
    def expression(self) -> str:
        """The cron part as written, with runs of whitespace collapsed to one space."""
        return self._expression

    @property
    def zone(self) -> ZoneInfo:
        """The time zone the expression's wall-clock times are read in."""
        return self._zone

    @property
    def zone_name(self) -> str:
        """The IANA name of :attr:`zone`, e.g. ``"America/New_York"``."""
        return str(self._zone.key)

    @property
    def is_fixed_time(self) -> bool:
        """True when second/minute/hour each match one value (see the module's DST rule)."""
        return self._fixed_time

    def __str__(self) -> str:
        return f"{self._expression}[{self.zone_name}]"

    def __repr__(self) -> str:
        return f"ZonedSchedule.parse({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ZonedSchedule):
            return NotImplemented
        return (self._expression, self.zone_name) == (other._expression, other.zone_name)

    def __hash__(self) -> int:
        return hash((self._expression, self.zone_name))

    def next_after(self, after: datetime) -> datetime:
        """The first fire time strictly after ``after`` (aware), in the schedule's zone.

        A result on the second pass of a repeated hour has ``fold=1``. Python's ``==`` between
        such a datetime and one in another zone is always False (PEP 495), so compare instants
        in UTC (``.astimezone(timezone.utc)``) or with ``<``/``>``, which are unaffected.
        """
        instant = _as_utc(after, "next_after")
        local = instant.astimezone(self._zone)
        # Candidate wall times are visited in increasing order. Their earliest instants never
        # decrease, but a repeated (fold) wall time has a second, later instant: when ``after``
        # lies on the first pass through a repeated hour, wall times up to one fold *earlier*
        # than ``after``'s own reading still have their second pass ahead, so start that far back.
        start = local.replace(tzinfo=None) - _fold_size(local, second_pass=False)
        cron = self._walls_from(start - _SECOND)
        best: datetime | None = None
        try:
            for _ in range(_MAX_CANDIDATES):
                wall = cron.get_next(datetime)
                instants, earliest, _latest = self._instants(wall)
                if best is not None and earliest >= best:
                    return best.astimezone(self._zone)
                for fire in instants:
                    if fire > instant and (best is None or fire < best):
                        best = fire
        except (ValueError, OverflowError) as exc:
            # croniter found nothing within its search window (CroniterBadDateError is a
            # ValueError), or the search ran off the end of datetime's range.
            if best is not None:
                return best.astimezone(self._zone)
            raise ValueError(f"{self} has no fire time after {after.isoformat()}") from exc
        raise RuntimeError(f"{self}: gave up looking for a fire time after {after.isoformat()}")

    def previous_at_or_before(self, at: datetime) -> datetime | None:
        """The most recent fire time <= ``at`` (aware), in the schedule's zone; None if none."""
        instant = _as_utc(at, "previous_at_or_before")
        local = instant.astimezone(self._zone)
        # Mirror image of next_after: candidates are visited newest first, and when ``at`` lies
        # on the second pass through a repeated hour, wall times up to one fold *later* than
        # ``at``'s reading already fired on the first pass.
        end = local.replace(tzinfo=None, microsecond=0)
        end += _fold_size(local, second_pass=True)
        # croniter's get_prev is strictly before its start; walls are whole seconds.
        cron = self._walls_from(end + _SECOND)
        best: datetime | None = None
        try:
            for _ in range(_MAX_CANDIDATES):
                wall = cron.get_prev(datetime)
                instants, _earliest, latest = self._instants(wall)
                if best is not None and latest <= best:
                    break
                for fire in instants:
                    if fire <= instant and (best is None or fire > best):
                        best = fire
            else:
                raise RuntimeError(f"{self}: gave up looking for a fire time before {at}")
        except (ValueError, OverflowError):
            # Nothing earlier within croniter's search window, or before year 1.
            pass
        return None if best is None else best.astimezone(self._zone)

    def fires_between(self, start: datetime, end: datetime) -> list[datetime]:
        """Every fire time in ``(start, end]`` in order, in the schedule's zone."""
        end_instant = _as_utc(end, "fires_between")
        fires: list[datetime] = []
        current = start
        while True:
            fire = self.next_after(current)
            if fire > end_instant:
                return fires
            fires.append(fire)
            current = fire

    def _walls_from(self, start: datetime) -> croniter:
        """A private croniter positioned at the naive wall time ``start``.

        Copying the parsed prototype skips re-parsing the expression on every call, and gives
        each call its own iterator state, so one schedule can be used from many threads.
        """
        cron = copy.copy(self._cron)
        cron.set_current(start, force=True)
        return cron

    def _instants(self, wall: datetime) -> tuple[list[datetime], datetime, datetime]:
        """Map a matching naive wall time to its fire instants (UTC), per the DST rule.

        Also returns the earliest and latest instant the wall time could denote. Both are
        non-decreasing in ``wall``, which is what lets the searches above stop early.
        """
        first = wall.replace(tzinfo=self._zone, fold=0)
        second = wall.replace(tzinfo=self._zone, fold=1)
        first_offset, second_offset = first.utcoffset(), second.utcoffset()
        assert first_offset is not None and second_offset is not None
        earliest = (wall - first_offset).replace(tzinfo=_UTC)
        if first_offset == second_offset:
            return [earliest], earliest, earliest
        # zoneinfo follows PEP 495: fold=0 applies the offset from before the transition and
        # fold=1 the one after, for repeated and skipped wall times alike.
        latest = (wall - second_offset).replace(tzinfo=_UTC)
        if earliest < latest:
            # Repeated wall time (fall back): it occurs at both instants. A fixed time fires
            # only on the first pass; an interval schedule fires on both, keeping its real
            # spacing. Using the zone's own offsets makes this right for any shift size, such
            # as Lord Howe's 30 minutes.
            return ([earliest] if self._fixed_time else [earliest, latest]), earliest, latest
        # Skipped wall time (spring forward): it never shows on the clock. A fixed time fires
        # at the first instant after the gap; an interval schedule just has no tick there.
        # (Read with the old offset the wall time lies after the change, with the new one before
        # it, so the change itself lies between the two readings.)
        change = self._transition(after=latest, until=earliest)
        return ([change] if self._fixed_time else []), change, change

    def _transition(self, after: datetime, until: datetime) -> datetime:
        """The first whole second in ``(after, until]`` whose UTC offset differs from ``after``'s.

        zoneinfo does not expose transition instants, so bisect; transitions fall on whole
        seconds and a gap spans at most about a day, so this takes under 20 steps.
        """
        offset_before = after.astimezone(self._zone).utcoffset()
        low, high = after, until
        span = int((high - low).total_seconds())
        while span > 1:
            half = span // 2
            middle = low + timedelta(seconds=half)
            if middle.astimezone(self._zone).utcoffset() == offset_before:
                low, span = middle, span - half
            else:
                high, span = middle, half
        return high


def _check_length(what: str, text: str) -> None:
    """Refuse ``text`` when it is longer than MAX_SCHEDULE_LENGTH, before any other work."""
    if len(text) > MAX_SCHEDULE_LENGTH:
        raise ValueError(
            f"{what} is too long ({len(text)} characters; the limit is {MAX_SCHEDULE_LENGTH}):"
            f" {text[:40]!r}..."
        )


def _split_schedule(text: str) -> tuple[str, str | None]:
    """Split ``"CRON"`` or ``"CRON[Zone]"`` into (cron, zone or None), stripping whitespace.

    Plain string scans, each linear in the text; a backtracking regex took minutes on
    inputs like ``"*" + " " * 4000 + "["``.
    """
    open_at, close_at = text.find("["), text.find("]")
    if open_at < 0 and close_at < 0:
        return text.strip(_SPACE), None
    if (
        open_at < 0
        or close_at < open_at
        or text.count("[") != 1
        or text.count("]") != 1
        or text[close_at + 1 :].strip(_SPACE)
    ):
        raise ValueError(f"malformed schedule {text!r}: expected 'CRON' or 'CRON[Zone/Name]'")
    return text[:open_at].strip(_SPACE), text[open_at + 1 : close_at].strip(_SPACE)


def _load_zone(name: str, context: str) -> ZoneInfo:
    """Load an IANA zone; raise ValueError quoting ``context`` when it is not one."""
    if not isinstance(name, str):
        raise TypeError(f"time zone must be a str or ZoneInfo, not {type(name).__name__}")
    _check_length("time zone", name)
    name = name.strip()
    if not name:
        raise ValueError(f"empty time zone in {context!r}")
    if not _ZONE_RE.match(name):
        raise ValueError(f"unknown time zone {name!r} in {context!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        # ZoneInfoNotFoundError is a KeyError; a ValueError here means a file that is no zone.
        raise ValueError(f"unknown time zone {name!r} in {context!r}") from exc


def _compile(expression: str) -> tuple[str, croniter, bool]:
    """Validate a cron expression; return (display text, croniter prototype, fixed-time)."""
    if not expression.isascii():
        # Also keeps str.split() below from splitting on exotic (e.g. no-break) spaces.
        raise ValueError(f"bad cron expression {expression!r}: only ASCII is allowed")
    text = " ".join(expression.split())
    if not text:
        raise ValueError("empty cron expression")
    if text.startswith("@"):
        alias = text.lower()
        if alias not in _ALIASES:
            known = " ".join(sorted(_ALIASES))
            raise ValueError(f"bad cron expression {text!r}: unknown alias (known: {known})")
        text, fields = alias, _ALIASES[alias].split()
    else:
        fields = text.split()
    if len(fields) not in (5, 6):
        raise ValueError(
            f"bad cron expression {text!r}: expected 5 fields (minute hour day-of-month month"
            f" day-of-week) or 6 with a leading seconds field, got {len(fields)}"
        )
    names = _FIELDS_5 if len(fields) == 5 else _FIELDS_6
    normalized = [_normalize_field(text, name, field) for name, field in zip(names, fields)]
    croniter_expr = " ".join(_croniter_order(normalized))
    try:
        expanded, _nth = croniter.expand(croniter_expr)
    except ValueError as exc:
        raise ValueError(_describe_error(text, names, fields, normalized, exc)) from exc
    # Naive start: croniter then matches plain wall-clock times and never applies a zone.
    prototype = croniter(croniter_expr, datetime(2000, 1, 1))
    try:
        copy.copy(prototype).get_next(datetime)
    except CroniterBadDateError as exc:
        raise ValueError(f"bad cron expression {text!r}: it never fires") from exc
    # expanded is in croniter order: minute, hour, dom, month, dow[, second].
    time_fields = [expanded[0], expanded[1], *expanded[5:]]
    fixed_time = all(len(values) == 1 and values[0] != "*" for values in time_fields)
    return text, prototype, fixed_time


def _normalize_field(text: str, name: str, field: str) -> str:
    """Refuse hashed/random values and rewrite equal ranges, which croniter misreads.

    croniter expands a range with equal ends (``2-2``, ``MON-MON``) to the *whole* field;
    cron means the single value, so pass croniter just that value.
    """
    items = field.split(",")
    for index, item in enumerate(items):
        if _HASH_RE.match(item):
            raise ValueError(
                f"bad cron expression {text!r}: hashed/random value {item!r} in the {name}"
                " field is not supported"
            )
        match = _RANGE_RE.match(item)
        if match is not None and _same_value(match.group("low"), match.group("high")):
            items[index] = match.group("low")
    return ",".join(items)


def _same_value(low: str, high: str) -> bool:
    """Whether two range ends name the same value (``2``/``02``, ``mon``/``MON``)."""
    if low.isdigit() and high.isdigit():
        return int(low) == int(high)
    return low.lower() == high.lower()


def _croniter_order(fields: list[str]) -> list[str]:
    """croniter's 6-field form puts seconds LAST; ours (the Rust underway's) puts them first."""
    return fields[1:] + fields[:1] if len(fields) == 6 else fields


def _describe_error(
    text: str, names: tuple[str, ...], fields: list[str], normalized: list[str], exc: Exception
) -> str:
    """Name the first field croniter rejects on its own, else repeat croniter's reason."""
    for index, name in enumerate(names):
        probe = ["*"] * len(fields)
        probe[index] = normalized[index]
        try:
            croniter.expand(" ".join(_croniter_order(probe)))
        except ValueError:
            return f"bad cron expression {text!r}: invalid {name} field {fields[index]!r}"
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"bad cron expression {text!r}: {lines[-1].strip() if lines else type(exc).__name__}"


def _as_utc(moment: datetime, caller: str) -> datetime:
    """Convert an aware datetime to UTC; refuse naive ones, whose instant is unknown."""
    if not isinstance(moment, datetime):
        raise TypeError(f"{caller}() needs a datetime, not {type(moment).__name__}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(
            f"{caller}() needs a timezone-aware datetime, got naive {moment.isoformat()!r}"
        )
    return moment.astimezone(_UTC)


def _fold_size(local: datetime, second_pass: bool) -> timedelta:
    """How long the repeated period containing ``local`` is, if ``local`` is on the given pass.

    Zero unless ``local``'s wall-clock reading occurs twice and ``local`` is the first
    (``second_pass=False``) or second (``second_pass=True``) occurrence of it.
    """
    if local.fold != int(second_pass):
        return timedelta(0)
    other = local.replace(fold=1 - local.fold).utcoffset()
    own = local.utcoffset()
    assert other is not None and own is not None
    size = own - other if not second_pass else other - own
    return max(size, timedelta(0))
