"""How values read in a page: relative times, durations, JSON, one-line errors.

Every function returns plain text; the templates escape it (autoescape), so a job's
input or error is always shown as text, never markup.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from flask import Flask

from ..records import Undecodable

#: The most of one JSON value or traceback a page shows: a 16 MiB input would make a page
#: no browser wants.
SHOWN_CHARS = 100_000


def now() -> datetime:
    """The current instant, aware, in UTC."""
    return datetime.now(timezone.utc)


def ago(when: datetime | None, reference: datetime | None = None) -> str:
    """``when`` relative to now: "12 s ago", "3 min ago", "in 2 h"; "—" for none."""
    if when is None:
        return "—"
    delta = ((reference or now()) - when).total_seconds()
    if abs(delta) < 1:
        return "just now"
    text = _span(abs(delta), parts=1)
    return f"{text} ago" if delta > 0 else f"in {text}"


def exact(when: datetime | None) -> str:
    """The exact instant, in UTC, to the second: shown when hovering a relative time."""
    if when is None:
        return ""
    return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso(when: datetime | None) -> str:
    """The instant in ISO 8601, for ``<time datetime=...>``."""
    return "" if when is None else when.astimezone(timezone.utc).isoformat()


def duration(seconds: float | None) -> str:
    """A span of seconds as people say it: "12 ms", "4.2 s", "3 min 20 s", "2 h 5 min";
    "—" for none."""
    if seconds is None:
        return "—"
    if seconds < 0.001:
        return "<1 ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{max(seconds, 0):.1f} s"
    return _span(seconds, parts=2)


def between(start: datetime | None, end: datetime | None) -> str:
    """How long from ``start`` to ``end`` took."""
    if start is None or end is None:
        return "—"
    return duration((end - start).total_seconds())


_UNITS = (("d", 86_400), ("h", 3600), ("min", 60), ("s", 1))


def _span(seconds: float, parts: int) -> str:
    """``seconds`` in its largest unit (and the next, when ``parts`` is 2)."""
    left = int(seconds)
    shown = []
    for name, size in _UNITS:
        if left >= size or (name == "s" and not shown):
            count, left = divmod(left, size)
            shown.append(f"{count} {name}")
            if len(shown) == parts:
                break
        elif shown:
            break
    return " ".join(shown)


def pretty(value: Any) -> str:
    """A stored JSON value, indented for reading; an undecodable one as its stored text."""
    if isinstance(value, Undecodable):
        return f"{value}… (undecodable JSON, shown as stored)"
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    return clip(text)


def compact(value: Any, limit: int = 80) -> str:
    """A stored JSON value on one line, cut at ``limit`` characters: for a table cell."""
    if isinstance(value, Undecodable):
        text = str(value)
    else:
        text = json.dumps(value, ensure_ascii=False, default=str, separators=(", ", ": "))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clip(text: str | None) -> str:
    """``text`` up to :data:`SHOWN_CHARS`, saying how much was left out."""
    if not text:
        return ""
    if len(text) <= SHOWN_CHARS:
        return text
    return f"{text[:SHOWN_CHARS]}\n… ({len(text) - SHOWN_CHARS:,} more characters not shown)"


def first_line(text: str | None, limit: int = 160) -> str:
    """An error's first line, cut at ``limit`` characters: what fits in a table row."""
    if not text:
        return ""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def count(value: int) -> str:
    """An integer with thousands separators."""
    return f"{value:,}"


def install(app: Flask) -> None:
    """Make these the templates' filters."""
    app.jinja_env.filters.update(
        ago=ago,
        exact=exact,
        iso=iso,
        duration=duration,
        pretty=pretty,
        compact=compact,
        clip=clip,
        first_line=first_line,
        count=count,
    )
    app.jinja_env.globals["between"] = between
