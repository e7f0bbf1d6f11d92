"""Logging set-up for the supervisor's processes: the text lines underway always wrote, or
one JSON object per line (``--log-format json``, ``UNDERWAY_LOG_FORMAT=json``) for log
collectors: no multi-line tracebacks to stitch back together, and every field the code
passed as ``extra`` (event, job, task id, step, attempt, duration, error) in its own key.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from datetime import datetime, timezone
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"

#: The attributes every LogRecord has: anything else on a record came from ``extra``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}

#: Fields a JSON line always starts with; an ``extra`` of the same name cannot replace them.
_CORE = ("time", "level", "logger", "process", "message")

#: How the worker's ``extra`` fields are renamed: ``step`` is the step's name for a reader,
#: its index goes to ``step_index``; the failed try's traceback is ``traceback``.
_RENAMED = {"step_name": "step", "step": "step_index", "error_traceback": "traceback"}
_RENAMED_ELSEWHERE = {"error_traceback": "traceback"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: time (ISO 8601, UTC), level, logger,
    process, message, then the record's ``extra`` fields; ``traceback`` for a logged
    exception. Fields whose value is None are left out. It never raises: a value JSON
    cannot hold is written as its ``str()``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "message": _message(record),
        }
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        # Only the worker's task records carry a step's name beside its index.
        renamed = _RENAMED if "step_name" in extras else _RENAMED_ELSEWHERE
        for name, value in extras.items():
            name = renamed.get(name, name)
            if value is None or name.startswith("_"):
                continue
            entry[f"extra_{name}" if name in _CORE else name] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["traceback"] = self.formatException(record.exc_info)
            if "error" not in entry:
                kind, exc = record.exc_info[0], record.exc_info[1]
                entry["error"] = f"{kind.__name__}: {exc}" if exc is not None else kind.__name__
        elif record.exc_text:
            entry["traceback"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return _dumps(entry)


def _message(record: logging.LogRecord) -> str:
    """The record's message; a format string that does not fit its arguments is shown as
    both, instead of raising."""
    try:
        return record.getMessage().rstrip("\n")
    except Exception:
        return f"{_text(record.msg)} {_text(record.args)}"


def _text(value: Any) -> str:
    """``str(value)``, or a stand-in when even that raises."""
    try:
        return str(value)
    except Exception:
        try:
            return f"<unprintable {type(value).__name__}>"
        except Exception:
            return "<unprintable>"


def _jsonable(value: Any) -> Any:
    """A value JSON can hold without NaN or Infinity (which are not JSON), else its text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _dumps(entry: dict[str, Any]) -> str:
    """The entry as one line of JSON, whatever its values hold."""
    try:
        return json.dumps(entry, default=_text, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        pass
    safe = {}
    for name, value in entry.items():
        value = _jsonable(value)
        try:
            json.dumps(value, default=_text, allow_nan=False)
        except (ValueError, TypeError, RecursionError):
            value = _text(value)
        safe[name] = value
    return json.dumps(safe, default=_text)


_HANDLER_MARK = "_underway_handler"
_capturing = False


def configure(log_format: str = "text", level: str = "INFO") -> None:
    """Send logs (the root logger's, so underway's and your jobs') to standard error in
    ``log_format``: ``text`` (the default) or ``json``. Called again, it replaces its own
    handler rather than adding a second one."""
    if log_format not in ("text", "json"):
        raise ValueError(f"log_format must be 'text' or 'json', not {log_format!r}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
            handler.close()
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root.setLevel(level)
    root.addHandler(handler)
    # In JSON, warnings (deprecations, say) are records too: no stray plain-text lines.
    global _capturing
    if (log_format == "json") != _capturing:
        _capturing = log_format == "json"
        logging.captureWarnings(_capturing)
