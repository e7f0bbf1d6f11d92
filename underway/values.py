"""What users hand underway, checked and bounded: JSON payloads, durations, times, names,
rates, and the error texts steps raise.

Every bound here keeps one value from breaking what comes after it: a delay that would
overflow a timestamp, a timeout PostgreSQL cannot set, a payload PostgreSQL would echo
into its log, an error text it cannot store. A value out of bounds is refused when it is
given, with an error that names the option, so nothing half-done is ever written.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any, Union

Delay = Union[timedelta, float, int, None]
"""A delay: a :class:`~datetime.timedelta` or a number of seconds; ``None`` means none."""

MAX_PAYLOAD_BYTES = 16 * 1024 * 1024
"""The largest input or output a task may carry, as JSON text: 16 MiB."""

MAX_DELAY = 100 * 365.25 * 86_400.0
"""The longest delay, retry interval or retention: 100 years, in seconds."""

MAX_TIMEOUT = 7 * 86_400.0
"""The longest step timeout: 7 days, in seconds (PostgreSQL's statement_timeout, which the
step's transaction gets, tops out at 24 days)."""

MAX_ERROR_CHARS = 8_000
"""How much of an error message is stored and logged."""

MAX_TRACEBACK_CHARS = 64_000
"""How much of a traceback is stored and logged."""

INT_MIN, INT_MAX = -(2**31), 2**31 - 1
"""The range of PostgreSQL's ``integer``, which priorities are stored as."""

_RATE = re.compile(r"^\s*(\d{1,9})\s*/\s*(s|m|h)\s*$")
_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}


_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))
"""One encoder for every payload: ``json.dumps`` with options builds a new one per call."""


def to_json(value: Any, context: str) -> str:
    """Serialise ``value`` for a task, or raise TypeError/ValueError that says what is wrong
    and where (``context``)."""
    try:
        text = _ENCODER.encode(value)
    except TypeError as exc:
        raise TypeError(f"{context} is not JSON-serialisable: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{context} is not valid JSON: {exc}") from None
    if len(text) > MAX_PAYLOAD_BYTES:  # json.dumps writes ASCII: a character is a byte
        raise ValueError(
            f"{context} is {len(text):,} bytes of JSON; the limit is "
            f"{MAX_PAYLOAD_BYTES:,} (16 MiB): store large data elsewhere and pass its key"
        )
    if _suspect(text):
        bad = _unstorable_string(value)
        if bad is not None:
            raise ValueError(f"{context} holds a string PostgreSQL cannot store: {bad!r}")
    return text


def to_json_array(values: list[Any], context: Callable[[int], str]) -> str:
    """Serialise ``values`` as one JSON array whose items are each checked as by
    :func:`to_json`; an error names the item by ``context(index)``.

    The array is encoded in one call, which for a batch of small inputs costs a fraction
    of encoding them one by one; only when that cannot show every item fine (an error, a
    suspicious escape, or a text over the per-item limit) are the items encoded one by one
    to find the one at fault."""
    try:
        text = _ENCODER.encode(values)
    except (TypeError, ValueError, RecursionError):
        text = ""
    if not text or len(text) > MAX_PAYLOAD_BYTES or _suspect(text):
        text = "[" + ",".join(to_json(v, context(i)) for i, v in enumerate(values)) + "]"
    return text


def _suspect(text: str) -> bool:
    """Whether JSON text may hold a string jsonb cannot store: a NUL or a lone surrogate
    both show up escaped, so only texts with such an escape need a closer look."""
    return "\\u0000" in text or "\\ud" in text


def _unstorable_string(value: Any) -> str | None:
    """The first string in ``value`` (keys included) with a NUL or a lone surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value
        return value if "\x00" in value else None
    items: Iterable[Any] = ()
    if isinstance(value, dict):
        items = (item for pair in value.items() for item in pair)
    elif isinstance(value, (list, tuple)):
        items = value
    for item in items:
        bad = _unstorable_string(item)
        if bad is not None:
            return bad
    return None


def name_or_none(value: Any, what: str) -> str | None:
    """A queue (or group, key) name as given, or None; anything but a non-empty string is
    refused."""
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise TypeError(f"{what} must be a non-empty string, not {value!r}")
    return value


def duration(value: Delay, what: str, *, positive: bool = False, most: float = MAX_DELAY) -> float:
    """A duration option in seconds; an error names the option (``what``) when it is not a
    finite duration, is over ``most``, or, with ``positive``, is not more than zero."""
    try:
        result = seconds(value, most=math.inf)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{what}: {exc}") from None
    if positive and result <= 0:
        raise ValueError(f"{what} must be more than zero, not {value!r}")
    if result > most:
        raise ValueError(f"{what} must be at most {_spell(most)}, not {value!r}")
    return result


def seconds(delay: Delay, *, most: float = MAX_DELAY) -> float:
    """A delay as seconds; a negative delay is refused rather than silently run at once,
    and one over ``most`` (100 years) rather than overflowing a timestamp later."""
    if delay is None:
        return 0.0
    if isinstance(delay, timedelta):
        value = delay.total_seconds()
    elif isinstance(delay, (int, float)) and not isinstance(delay, bool):
        value = float(delay)
    else:
        raise TypeError(f"a delay is a timedelta or a number of seconds, not {delay!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"a delay must be finite and not negative: {delay!r}")
    if value > most:
        raise ValueError(f"a delay must be at most {_spell(most)}: {delay!r}")
    return value


def aware(when: Any, what: str) -> datetime:
    """An absolute time as given; a naive datetime is refused, as its zone is a guess."""
    if not isinstance(when, datetime):
        raise TypeError(f"{what} must be a datetime, not {when!r}")
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(
            f"{what} must be an aware datetime (with a time zone), not the naive {when!r}: "
            "write datetime(..., tzinfo=timezone.utc) or use a ZoneInfo"
        )
    return when


def rate(text: Any, what: str) -> tuple[int, float]:
    """A rate such as ``"100/m"``: (count, period in seconds). ``s``, ``m`` and ``h`` are a
    second, a minute and an hour."""
    match = _RATE.match(text) if isinstance(text, str) and len(text) < 40 else None
    if match is None or int(match[1]) < 1:
        raise ValueError(
            f"{what} must be a count per second, minute or hour such as '100/m' "
            f"('N/s', 'N/m' or 'N/h', N at least 1), not {text!r}"
        )
    return int(match[1]), _PERIODS[match[2]]


def clean_text(text: str, limit: int) -> str:
    """An error text as PostgreSQL can store it and a log can carry it: NUL and unpaired
    surrogates replaced, and cut to ``limit`` characters, saying so."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > limit:
        cut = len(text) - limit
        text = f"{text[:limit]}... [{cut:,} more characters cut]"
    return text


def _spell(most: float) -> str:
    """A bound in words: '7 days', '100 years'."""
    days = most / 86_400
    return f"{days / 365.25:g} years" if days >= 365 else f"{days:g} days"
