"""The throughput chart, drawn on the server: the geometry of a stacked bar chart of tries
finished per minute, which ``_chart.html`` renders as inline SVG.

No script and no library draw it, so it shows with JavaScript off and without internet;
each minute's column carries an SVG ``<title>``, the browser's own hover tooltip.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..records import Minute

#: The SVG's coordinate box; it scales to the width of its card.
WIDTH, HEIGHT = 1200, 210
LEFT, RIGHT, TOP, BOTTOM = 52, 34, 12, 26

#: Stacked bottom to top: (field of Minute, CSS class, legend label).
SERIES = (
    ("succeeded", "s-succeeded", "Succeeded"),
    ("retried", "s-retried", "Retried"),
    ("failed", "s-failed", "Failed"),
)


@dataclass(frozen=True)
class Segment:
    """One series' part of a minute's bar."""

    y: float
    height: float
    css: str


@dataclass(frozen=True)
class Column:
    """One minute: its bar's segments, the full-height hover area, and its tooltip."""

    x: float
    width: float
    slot_x: float
    slot_width: float
    segments: tuple[Segment, ...]
    title: str
    total: int


@dataclass(frozen=True)
class Tick:
    """An axis label at a position (y for the value axis, x for the time axis)."""

    at: float
    label: str


@dataclass(frozen=True)
class Chart:
    """Everything the template needs to draw the chart."""

    width: int
    height: int
    left: float
    right: float
    top: float
    bottom: float
    columns: tuple[Column, ...]
    y_ticks: tuple[Tick, ...]
    x_ticks: tuple[Tick, ...]
    totals: dict[str, int] = field(default_factory=dict)
    legend: tuple[tuple[str, str, int], ...] = ()
    peak: int = 0

    @property
    def empty(self) -> bool:
        """Whether nothing finished in the whole period."""
        return self.peak == 0


def nice_step(peak: float, ticks: int = 4) -> int:
    """A round step (1, 2 or 5 times a power of ten) giving about ``ticks`` gridlines."""
    if peak <= ticks:
        return 1
    raw = peak / ticks
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * power:
            return int(factor * power)
    return int(10 * power)  # pragma: no cover - the loop always returns


def throughput_chart(minutes: Sequence[Minute]) -> Chart:
    """The chart of ``minutes`` (oldest first, one per minute, as admin.throughput)."""
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM
    base = TOP + plot_h
    totals = {name: sum(getattr(m, name) for m in minutes) for name, _, _ in SERIES}
    peak = max((m.succeeded + m.failed + m.retried for m in minutes), default=0)
    step = nice_step(peak)
    top_value = max(step * math.ceil(peak / step), step) if peak else 4
    if not peak:
        step = 1
    scale = plot_h / top_value
    slot = plot_w / max(len(minutes), 1)
    bar = max(slot * 0.72, 1.0)

    columns = []
    for i, m in enumerate(minutes):
        x = LEFT + i * slot
        y = base
        segments = []
        for name, css, _ in SERIES:
            value = getattr(m, name)
            if value:
                h = value * scale
                y -= h
                segments.append(Segment(round(y, 2), round(h, 2), css))
        stamp = m.minute.strftime("%H:%M UTC")
        detail = ", ".join(f"{getattr(m, name):,} {label.lower()}" for name, _, label in SERIES)
        columns.append(
            Column(
                x=round(x + (slot - bar) / 2, 2),
                width=round(bar, 2),
                slot_x=round(x, 2),
                slot_width=round(slot, 2),
                segments=tuple(segments),
                title=f"{stamp}: {detail}",
                total=m.succeeded + m.failed + m.retried,
            )
        )

    y_ticks = tuple(
        Tick(round(base - value * scale, 2), f"{value:,}")
        for value in range(0, int(top_value) + 1, step)
    )
    x_ticks = tuple(
        Tick(round(LEFT + (i + 0.5) * slot, 2), m.minute.strftime("%H:%M"))
        for i, m in enumerate(minutes)
        if m.minute.minute % 15 == 0
    )
    return Chart(
        width=WIDTH,
        height=HEIGHT,
        left=LEFT,
        right=WIDTH - RIGHT,
        top=TOP,
        bottom=base,
        columns=tuple(columns),
        y_ticks=y_ticks,
        x_ticks=x_ticks,
        totals=totals,
        legend=tuple((css, label, totals[name]) for name, css, label in SERIES),
        peak=peak,
    )
