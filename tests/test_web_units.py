"""The dashboard's pure parts: how times, durations and values read, the chart's
geometry, what counts as a task id, a loopback host, a basic-auth password."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone

import pytest

pytest.importorskip("flask")

from underway import display
from underway.records import Minute, Undecodable
from underway.web.__main__ import is_loopback, parse_args
from underway.web.charts import nice_step, throughput_chart
from underway.web.security import password_matches
from underway.web.views import parse_id

NOW = datetime(2030, 5, 1, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    "delta, shown",
    [
        (timedelta(0), "just now"),
        (timedelta(seconds=12), "12 s ago"),
        (timedelta(minutes=3, seconds=40), "3 min ago"),
        (timedelta(hours=2, minutes=5), "2 h ago"),
        (timedelta(days=3, hours=1), "3 d ago"),
        (-timedelta(minutes=10), "in 10 min"),
    ],
)
def test_relative_times_read_as_people_say_them(delta: timedelta, shown: str) -> None:
    """Times show relative to now, in their largest unit; the future says "in"."""
    assert display.ago(NOW - delta, NOW) == shown


def test_exact_times_and_durations() -> None:
    """The hover text is the exact UTC time; durations keep two units at most and use
    milliseconds under a second."""
    assert display.exact(NOW) == "2030-05-01 12:00:00 UTC"
    assert display.ago(None) == "—"
    assert [display.duration(s) for s in (0.0004, 0.012, 4.25, 200, 7500, None)] == [
        "<1 ms",
        "12 ms",
        "4.2 s",
        "3 min 20 s",
        "2 h 5 min",
        "—",
    ]


def test_values_are_shown_as_json_text_and_clipped() -> None:
    """Inputs show as indented JSON (markup untouched: escaping is the template's job),
    undecodable ones as their stored text, and huge ones cut with a note."""
    assert display.pretty({"a": "<b>"}) == '{\n  "a": "<b>"\n}'
    assert "undecodable" in display.pretty(Undecodable("1e99999"))
    assert display.compact({"k": "v" * 100}, 20) == '{"k": "vvvvvvvvvvvv…'
    clipped = display.clip("x" * (display.SHOWN_CHARS + 5))
    assert clipped.endswith("(5 more characters not shown)")
    assert display.first_line("Error: one\ntwo") == "Error: one"


def test_nice_steps_make_round_gridlines() -> None:
    """Gridlines fall on round numbers whatever the peak."""
    assert [nice_step(p) for p in (0, 3, 9, 40, 410, 9_999)] == [1, 1, 5, 10, 200, 5000]


def test_the_chart_stacks_each_minute_and_labels_the_axes() -> None:
    """Each minute is a stacked bar whose segments add up to its total at the chart's
    scale; the time axis is labelled every quarter hour, the value axis from 0 up past the
    peak; each column's title says its minute and counts."""
    start = datetime(2030, 5, 1, 11, 1, tzinfo=timezone.utc)
    minutes = [
        Minute(start + timedelta(minutes=i), succeeded=i, failed=i % 3, retried=1)
        for i in range(60)
    ]
    chart = throughput_chart(minutes)
    assert len(chart.columns) == 60
    assert [t.label for t in chart.x_ticks] == ["11:15", "11:30", "11:45", "12:00"]
    assert chart.y_ticks[0].label == "0" and int(chart.y_ticks[-1].label) >= chart.peak
    scale = (chart.bottom - chart.top) / int(chart.y_ticks[-1].label)
    last = chart.columns[-1]
    assert sum(s.height for s in last.segments) == pytest.approx(last.total * scale, abs=0.05)
    assert last.title == "12:00 UTC: 59 succeeded, 1 retried, 2 failed"
    assert chart.totals == {"succeeded": 1770, "retried": 60, "failed": 60}
    empty = throughput_chart([Minute(start, 0, 0, 0)])
    assert empty.empty and empty.columns[0].segments == ()


@pytest.mark.parametrize(
    "text, task_id",
    [
        ("42", 42),
        (" #42 ", 42),
        ("0", None),
        ("-1", None),
        ("4x", None),
        ("²", None),
        ("9223372036854775807", 2**63 - 1),
        ("9223372036854775808", None),
        (None, None),
    ],
)
def test_task_ids(text: str | None, task_id: int | None) -> None:
    """Ids are positive bigints, typed with or without a leading #."""
    assert parse_id(text) == task_id


def test_loopback_hosts_and_the_command_line() -> None:
    """Only loopback addresses count as private; the parser's defaults are 127.0.0.1:8088,
    writable."""
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "", "::", "10.0.0.5", "example.com"))
    args = parse_args([])
    assert (args.host, args.port, args.read_only, args.dsn) == ("127.0.0.1", 8088, False, None)
    with pytest.raises(SystemExit):
        parse_args(["--port", "70000"])


def test_basic_auth_takes_any_user_and_only_the_password() -> None:
    """The Authorization header matches with any user name and the exact password."""

    def header(text: str) -> str:
        return "Basic " + base64.b64encode(text.encode()).decode()

    assert password_matches(header("anyone:s3cret:with:colons"), "s3cret:with:colons")
    assert password_matches(header(":pässword"), "pässword")
    assert not password_matches(header("ops:wrong"), "s3cret")
    assert not password_matches(header("s3cret"), "s3cret")
    assert not password_matches("Basic !!!", "s3cret")
    assert not password_matches("Bearer s3cret", "s3cret")
    assert not password_matches(None, "s3cret")
