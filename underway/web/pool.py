"""The dashboard's database connections: a few idle ones kept for the next requests.

Each request borrows one autocommit connection and gives it back at its end, so a page's
reads cost no connection set-up, and a dashboard left open in a browser holds at most
``size`` idle sessions. A connection the server closed is noticed (without a round trip)
and replaced; one inherited across ``fork`` (gunicorn's preload) is left to its parent.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import psycopg2.extensions

from ..db import close_quietly, connect, is_alive

#: The longest any statement of a page may run, in milliseconds: a page stuck behind a lock
#: or a slow plan ends with an error instead of holding a thread and a connection forever.
STATEMENT_TIMEOUT_MS = 15_000


class Pool:
    """Up to ``size`` idle autocommit connections to ``dsn``, shared by threads."""

    def __init__(self, dsn: str, size: int = 4) -> None:
        self.dsn = dsn
        self.size = size
        self._idle: list[psycopg2.extensions.connection] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def get(self) -> psycopg2.extensions.connection:
        """A live connection: an idle one, else a new one."""
        with self._lock:
            self._forget_inherited()
            while self._idle:
                conn = self._idle.pop()
                if is_alive(conn):
                    return conn
                close_quietly(conn)
        conn = connect(self.dsn, application_name="underway web")
        with conn.cursor() as cur:
            cur.execute("SET statement_timeout = %s", (STATEMENT_TIMEOUT_MS,))
        return conn

    def put(self, conn: Any) -> None:
        """Take a connection back: kept when it is healthy, idle and there is room."""
        healthy = not conn.closed and conn.info.transaction_status == _IDLE
        with self._lock:
            self._forget_inherited()
            if healthy and len(self._idle) < self.size:
                self._idle.append(conn)
                return
        close_quietly(conn)

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            close_quietly(conn)

    def _forget_inherited(self) -> None:
        """In a forked child, drop (without closing) what the parent opened."""
        if self._pid != os.getpid():
            _inherited.extend(self._idle)
            self._idle = []
            self._pid = os.getpid()


_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE
# Connections a forked child inherited: kept referenced so that collecting them never
# closes the parent's sessions.
_inherited: list[Any] = []
