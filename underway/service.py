"""What workers and schedulers share: a loop around one connection that survives losing it.

A service opens its one connection lazily, LISTENs on its channel, and runs ``turn()``
over and over until asked to stop. A lost connection is never fatal: it is closed, the
service waits with growing backoff (interruptible by a signal) and reconnects. Any other
database error is a bug (a statement the schema does not accept), which no reconnect
mends: it ends the process, loudly. A service whose supervisor died stops after its
current turn.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
from typing import Any

import psycopg2
import psycopg2.extensions

from . import store
from .db import check_schema, close_quietly, connect, connect_bounded, is_alive, is_outage


def application_name(role: str, pid: int) -> str:
    """The ``application_name`` a service's session carries: how the supervisor finds the
    session of a child that died, and how operators tell sessions apart."""
    return f"underway {role} {pid}"


class Service:
    """Base of :class:`~underway.worker.Worker` and :class:`~underway.scheduler.Scheduler`.

    :param dsn: the database.
    :param wakeup_fd: a file descriptor that becomes readable when a signal arrives, so a
        wait ends at once.
    :param db_timeout: for a :attr:`bounded` service, the longest wait on the database.
    """

    #: Names the connection (``application_name``) and the process in logs.
    role = "service"
    #: The LISTEN channel that wakes this service.
    channel = store.TASK_CHANNEL
    log = logging.getLogger("underway")
    #: Whether no statement may hold the service longer than ``db_timeout`` (see
    #: :class:`~underway.db.BoundedConnection`): for services whose statements are all
    #: underway's own, not a step's.
    bounded = False
    #: Whether the service's per-task queries are prepared once per session (see
    #: :class:`~underway.db.PreparingConnection`).
    prepares = False

    def __init__(self, dsn: str, *, wakeup_fd: int | None = None, db_timeout: float = 10.0) -> None:
        self.dsn = dsn
        self.wakeup_fd = wakeup_fd
        self.db_timeout = db_timeout
        self.stopping = False
        self.conn: psycopg2.extensions.connection | None = None
        self._parent = os.getppid()

    def stop(self) -> None:
        """Ask the service to stop after its current turn; safe in a signal handler."""
        self.stopping = True

    def run(self) -> None:
        """Take turns until :meth:`stop` is called, reconnecting when the database goes."""
        failures = 0
        while not self.stopping:
            try:
                self.connect()
                self.turn()
                failures = 0
            except psycopg2.Error as exc:
                if not is_outage(exc):
                    raise  # a bug, not an outage: reconnecting would only repeat it
                self.disconnect()
                failures += 1
                pause = min(0.05 * 2**failures, 5.0)
                self.log.warning(
                    "database connection lost or failing (%s); reconnecting in %.2fs",
                    str(exc).strip(),
                    pause,
                )
                self.sleep(pause)
            if self._parent != os.getppid():
                self.log.warning("supervisor is gone; %s stopping", self.role)
                self.stop()
        self.on_stop()
        self.disconnect()

    def turn(self) -> None:
        """One round of work, including any waiting; subclasses define it."""
        raise NotImplementedError

    def connect(self) -> psycopg2.extensions.connection:
        """Open the service's one connection if it is not open (or the server closed it),
        and LISTEN on it."""
        if self.conn is not None and not is_alive(self.conn):
            self.disconnect()
        if self.conn is None:
            name = application_name(self.role, os.getpid())
            if self.bounded:
                self.conn = connect_bounded(
                    self.dsn, application_name=name, timeout=self.db_timeout
                )
            else:
                self.conn = connect(self.dsn, application_name=name, prepare=self.prepares)
            check_schema(self.conn)
            with self.conn.cursor() as cur:
                store.listen(cur, self.channel)
            self.on_connect()
        return self.conn

    def on_connect(self) -> None:
        """Called after each (re)connection; subclasses may catch up on what they missed."""

    def on_stop(self) -> None:
        """Called once the service stopped taking turns, before it disconnects."""

    def disconnect(self) -> None:
        """Close the connection, if open; errors closing a dead one do not matter."""
        close_quietly(self.conn)
        self.conn = None

    def wait_for_notification(self, timeout: float) -> None:
        """Sleep until a notification on the channel, a signal, or ``timeout`` seconds."""
        conn = self.connect()
        if not conn.notifies:
            self.wait_readable([conn], timeout)
            conn.poll()
        conn.notifies.clear()

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake at once for a signal."""
        self.wait_readable([], seconds)

    def wait_readable(self, conns: list[Any], timeout: float) -> None:
        """Wait until a connection or the wake-up descriptor is readable, or the timeout."""
        fds = list(conns)
        if self.wakeup_fd is not None:
            fds.append(self.wakeup_fd)
        readable, _, _ = select.select(fds, [], [], timeout)
        if self.wakeup_fd is not None and self.wakeup_fd in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(self.wakeup_fd, 512)
