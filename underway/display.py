"""How values read for people: relative times, durations, JSON, one-line errors, and text
made safe for a terminal. The dashboard and the command line both show values so.

Every function returns plain text; the dashboard's templates escape it (autoescape), so a
job's input or error is always shown as text, never markup.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from .records import Undecodable

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


#: Characters a terminal acts on rather than shows: C0 and C1 controls and DEL.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def terminal_safe(text: Any, keep_newlines: bool = False) -> str:
    """``text`` with every control character written as an escape (``\\x1b``, ``\\n``),
    so a job name, queue or error cannot move a terminal's cursor, recolour it or forge a
    line of output; newlines are kept as they are only when ``keep_newlines`` is set."""
    if text is None:
        return ""

    def escape(match: re.Match[str]) -> str:
        char = match[0]
        if keep_newlines and char == "\n":
            return char
        return char.encode("unicode_escape").decode("ascii")

    return _CONTROL.sub(escape, str(text))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a plain, aligned table, every cell terminal-safe."""
    cells = [list(headers)] + [[terminal_safe(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip())


def as_json(value: Any) -> str:
    """Records (dataclasses), lists and plain values as JSON, times in ISO 8601."""

    def plain(item: Any) -> Any:
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            return {f.name: plain(getattr(item, f.name)) for f in dataclasses.fields(item)}
        if isinstance(item, (list, tuple)):
            return [plain(i) for i in item]
        if isinstance(item, dict):
            return {str(k): plain(v) for k, v in item.items()}
        if isinstance(item, Enum):
            return item.value
        if isinstance(item, datetime):
            return item.isoformat()
        return item

    return json.dumps(plain(value), ensure_ascii=False, indent=2)
