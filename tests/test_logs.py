"""Log formats (``underway.logs``): the supervisor's ``--log-format json`` (or
``UNDERWAY_LOG_FORMAT=json``) writes one JSON object per line from every process, with the
task fields in keys of their own; the default text lines stay as they were. The supervisors
run for real, in burst mode, against a real PostgreSQL; the formatter's odd cases run
in-process.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import warnings
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import jobs_observe
import pytest

from underway import logs

from .helpers import Supervisor
from .test_metrics import free_port

pytestmark = pytest.mark.timeout(60)

TEXT_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    r"underway\.[a-z.]+\[\d+\]: \S"
)


@pytest.fixture
def observed(dsn: str) -> str:
    """The test database, with the tables the observe jobs write to."""
    jobs_observe.prepare(dsn)
    return dsn


def burst(dsn: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run a supervisor of the observe jobs in burst mode to its end; its whole output."""
    with Supervisor(["jobs_observe"], dsn, ["--workers", "2", "--burst", *args], env=env) as sup:
        assert sup.wait(30) == 0, sup
        return sup.output()


def json_lines(output: str) -> list[dict[str, Any]]:
    """Every line of ``output``, each parsed as one JSON object (or the test fails)."""
    lines = output.splitlines()
    assert lines, "no output"
    parsed = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}\n--- output ---\n{output}")
        assert isinstance(entry, dict), line
        parsed.append(entry)
    return parsed


def test_json_lines_carry_each_task_field_and_a_failure_its_error_and_traceback(
    observed: str,
) -> None:
    """With --log-format json every line the supervisor and its workers write is one JSON
    object with time (UTC, ISO 8601), level, logger, process and message; task lines add
    event, task_id, job, step (the step's name), step_index, attempt and duration_ms, and a
    failed try its error and traceback; other records (the supervisor's) their own extra
    fields."""
    dsn = observed
    ok_id = jobs_observe.ok.enqueue({}).id
    doomed_id = jobs_observe.doomed.enqueue(None).id
    port = free_port()
    entries = json_lines(burst(dsn, "--log-format", "json", "--metrics-port", str(port)))

    now = datetime.now(timezone.utc)
    for entry in entries:
        assert {"time", "level", "logger", "process", "message"} <= set(entry), entry
        assert entry["time"].endswith("Z")
        stamp = datetime.fromisoformat(entry["time"].replace("Z", "+00:00"))
        assert now - timedelta(minutes=1) < stamp <= now + timedelta(seconds=1)
        assert isinstance(entry["process"], int) and entry["logger"].startswith("underway.")

    tasks = [e for e in entries if str(e.get("event", "")).startswith("task_")]
    ok_lines = [e for e in tasks if e["task_id"] == ok_id]
    # Each step's two lines come from the worker that ran it, in order; the next step may
    # start in another worker before the first has written that its step advanced.
    for index, step, outcome in ((0, "fetch", "task_advanced"), (1, "store", "task_succeeded")):
        assert [(e["event"], e["step"]) for e in ok_lines if e["step_index"] == index] == [
            ("task_started", step),
            (outcome, step),
        ]
    assert len(ok_lines) == 4
    for entry in ok_lines:
        assert entry["job"] == "observe-ok" and entry["attempt"] == 1
        assert "error" not in entry and "traceback" not in entry
        assert ("duration_ms" in entry) == (entry["event"] != "task_started")

    failures = [e for e in tasks if e["task_id"] == doomed_id and e["event"] != "task_started"]
    failures.sort(key=lambda e: e["attempt"])  # the retry may run in the other worker
    assert [(e["event"], e["attempt"], e["level"]) for e in failures] == [
        ("task_retrying", 1, "WARNING"),
        ("task_failed", 2, "WARNING"),
    ]
    for entry in failures:
        assert entry["job"] == "observe-doomed"
        assert (entry["step"], entry["step_index"]) == ("crash", 0)
        assert entry["error"] == "RuntimeError: doomed for good"
        assert entry["traceback"].startswith("Traceback (most recent call last):")
        assert "in explode" in entry["traceback"] and entry["traceback"].rstrip().endswith(
            "RuntimeError: doomed for good"
        )
        assert entry["duration_ms"] > 0

    serving = [e for e in entries if e.get("event") == "metrics_serving"]
    assert len(serving) == 1 and serving[0]["port"] == port and serving[0]["directory"]
    supervisor = serving[0]["process"]
    assert {e["process"] for e in tasks} - {supervisor}, "task lines come from the workers"


def test_the_environment_variable_chooses_json_too(observed: str) -> None:
    """UNDERWAY_LOG_FORMAT=json, without the flag, makes every line JSON."""
    jobs_observe.ok.enqueue({})
    entries = json_lines(burst(observed, env={"UNDERWAY_LOG_FORMAT": "json"}))
    assert "task_succeeded" in [e["event"] for e in entries if "task_id" in e]


def test_text_lines_stay_as_they_were(observed: str) -> None:
    """By default every line is the text format underway always wrote: time, level,
    logger[pid], message; a failure's line carries its error on the same line."""
    jobs_observe.ok.enqueue({})
    doomed_id = jobs_observe.doomed.enqueue(None).id
    output = burst(observed)
    lines = output.splitlines()
    assert lines and all(TEXT_LINE.match(line) for line in lines), output
    failed = [line for line in lines if "task failed:" in line]
    assert len(failed) == 1, output
    assert re.search(
        rf" WARNING underway\.worker\[\d+\]: task failed: job=observe-doomed task_id={doomed_id} "
        r"step=0\(crash\) attempt=2/2 duration=[\d.]+ms error=RuntimeError: doomed for good$",
        failed[0],
    ), failed[0]


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, its handlers, level and warning capture restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield root
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
        logs._capturing = False
        logging.captureWarnings(False)


def ours(root: logging.Logger) -> list[logging.Handler]:
    return [h for h in root.handlers if getattr(h, "_underway_handler", False)]


def test_configure_twice_keeps_one_handler_and_the_last_format(
    root_logger: logging.Logger,
) -> None:
    """configure() called again replaces its handler instead of adding one (no doubled
    lines), switching format and level as asked."""
    logs.configure("text", "INFO")
    logs.configure("text", "INFO")
    assert len(ours(root_logger)) == 1
    logs.configure("json", "WARNING")
    (handler,) = ours(root_logger)
    assert isinstance(handler.formatter, logs.JsonFormatter)
    assert root_logger.level == logging.WARNING
    with pytest.raises(ValueError):
        logs.configure("xml")


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text for you")

    __repr__ = __str__


def format_json(message: str, *args: Any, exc_info: Any = None, **extra: Any) -> dict[str, Any]:
    """What the JSON formatter makes of one record; its line must be one JSON object."""
    record = logging.LogRecord("underway.test", logging.INFO, __file__, 1, message, args, exc_info)
    record.__dict__.update(extra)
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    return json.loads(line)


def test_the_json_formatter_never_raises_on_odd_values() -> None:
    """Values JSON cannot hold (objects, bytes, NaN, a cycle, something whose str() raises)
    and a message whose arguments do not fit it still make one valid JSON line; fields
    named like the core ones do not replace them; None fields are left out."""
    cycle: dict[str, Any] = {}
    cycle["self"] = cycle
    entry = format_json(
        "odd %s",
        Unprintable(),
        obj=object(),
        raw=b"\x00",
        nan=float("nan"),
        cycle=cycle,
        bad=Unprintable(),
        level="forged",
        nothing=None,
        when=datetime(2024, 1, 2, tzinfo=timezone.utc),
    )
    assert entry["level"] == "INFO" and entry["extra_level"] == "forged"
    assert entry["message"].startswith("odd %s")
    assert entry["nan"] == "nan" and entry["raw"] == "b'\\x00'"
    assert entry["bad"] == "<unprintable Unprintable>"
    assert entry["when"].startswith("2024-01-02")
    assert "nothing" not in entry and entry["obj"].startswith("<object object")
    assert format_json("%d items", "x")["message"] == "%d items ('x',)"


def test_a_logged_exception_gets_its_traceback_and_warnings_become_json(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    """log.exception(...) gives the traceback in "traceback" and the error in "error";
    with JSON on, a Python warning is a JSON line too, not stray text."""
    try:
        raise KeyError("missing")
    except KeyError:
        entry = format_json("it broke", exc_info=sys.exc_info())
    assert entry["error"] == "KeyError: 'missing'"
    assert (
        entry["traceback"].startswith("Traceback") and "KeyError: 'missing'" in entry["traceback"]
    )

    logs.configure("json", "INFO")
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("old thing", DeprecationWarning, stacklevel=1)
    (line,) = capsys.readouterr().err.splitlines()
    warned = json.loads(line)
    assert warned["logger"] == "py.warnings" and "old thing" in warned["message"]
