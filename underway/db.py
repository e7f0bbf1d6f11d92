"""Connections: where the database is, opening connections, and keeping them per process.

A connection belongs to the process that opened it. After ``fork`` the child never uses,
closes or garbage-collects one it inherited (closing would end the parent's session on
the shared socket); it opens its own on first use.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from . import store
from .errors import ConfigurationError, SchemaMissing

SCHEMA_VERSION = 4
"""The newest migration this version of underway needs."""

_configured_dsn: str | None = None


def configure(dsn: str | None = None) -> None:
    """Set the database every underway call in this process uses by default.

    Without it, underway reads the ``DATABASE_URL`` environment variable. ``None`` resets
    to that default. Call it once at start-up, e.g. in your Flask app factory::

        underway.configure(dsn="postgresql://app@db/app")
    """
    global _configured_dsn
    _configured_dsn = dsn
    _default.discard()


def resolve_dsn(dsn: str | None = None) -> str:
    """The DSN to use: the one given, else ``configure()``'s, else ``$DATABASE_URL``."""
    found = dsn or _configured_dsn or os.environ.get("DATABASE_URL")
    if not found:
        raise ConfigurationError(
            "no database configured: call underway.configure(dsn=...), pass --dsn, "
            "or set the DATABASE_URL environment variable"
        )
    return found


_PASSWORD_IN_QUERY = re.compile(r"([?&]password=)[^&]*", re.I)
_PASSWORD_IN_KEYWORDS = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|(?:\\.|\S)+)", re.I)


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced by ``***``, fit for logs and error messages.

    In a URI the password is everything from the first ``:`` of the user part to the
    *last* ``@`` of the authority, so that one with an unencoded ``/``, ``?``, ``=`` or
    ``@`` (which libpq would misread, and echo in its errors) is hidden whole."""
    if "://" not in dsn:
        return _PASSWORD_IN_KEYWORDS.sub(r"\1***", dsn)
    scheme, _, rest = dsn.partition("://")
    first_at, first_slash = rest.find("@"), rest.find("/")
    if first_at >= 0 and (first_slash < 0 or first_at < first_slash):
        # libpq's reading: user info up to an "@" before any "/". The password runs to the
        # last "@" before the path, so "?", "=" or "@" in it are hidden too.
        path = rest.find("/", first_at)
        split = rest.rfind("@", 0, path if path >= 0 else len(rest))
    else:
        last_at = rest.rfind("@")
        if last_at > 0 and "=" not in rest[:last_at]:
            split = last_at  # an unencoded "/" in the password, before the host
        else:
            split = rest.partition("?")[0].rfind("@")  # an "@" in a query parameter
    userinfo = rest[:split] if split > 0 else ""
    if ":" in userinfo:
        rest = f"{userinfo.split(':', 1)[0]}:***{rest[split:]}"
    return _PASSWORD_IN_QUERY.sub(r"\1***", f"{scheme}://{rest}")


HIDDEN_DSN_ENV = "UNDERWAY_HIDDEN_DSN"
"""Where a long-running command moves a ``--dsn`` given on its command line."""


def hide_dsn_argument(module: str, argv: list[str]) -> None:
    """If ``argv`` (a ``python -m module`` command line) carries ``--dsn``, start this
    process again without it, the DSN passed in an environment variable instead: a
    command line is readable by every user of the host (``ps``), the environment is not.
    The pid stays the same. Returns only when there was no ``--dsn``."""
    rest, dsn = [], None
    args = iter(argv)
    for arg in args:
        name, equals, value = arg.partition("=")
        if name in ("--ds", "--dsn"):  # argparse takes the abbreviation --ds too
            dsn = value if equals else next(args, None)
        else:
            rest.append(arg)
    if dsn is None:
        return
    env = dict(os.environ, **{HIDDEN_DSN_ENV: dsn})
    os.execve(sys.executable, [sys.executable, "-m", module, *rest], env)


def hidden_dsn() -> str | None:
    """The DSN :func:`hide_dsn_argument` moved out of the command line, taken out of the
    environment (so that the processes this one starts do not inherit it)."""
    return os.environ.pop(HIDDEN_DSN_ENV, None)


# Connection settings that keep a worker from hanging on a dead network path: give up
# connecting after 10 s, and notice a silent peer within about 30 s. A DSN's own values win.
CONNECTION_DEFAULTS = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
}


def _connection_settings(dsn: str, application_name: str) -> dict[str, str]:
    """Our connection defaults that the DSN does not set itself."""
    try:
        given = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        # libpq's message quotes the part it could not read, which may be the password.
        raise ConfigurationError(
            "invalid database DSN: it is neither a postgresql:// URI nor key=value pairs "
            "(not shown, as it may hold a password); check the quoting of special characters"
        ) from None
    settings = {k: v for k, v in CONNECTION_DEFAULTS.items() if k not in given}
    settings.setdefault("application_name", given.get("application_name", application_name))
    return settings


class PreparingConnection(psycopg2.extensions.connection):
    """A connection on which :mod:`underway.store` prepares the worker's per-task queries
    once per session (see :data:`underway.store.base.PREPARED`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The queries prepared on this session so far.
        self.prepared: set[str] = set()


def connect(
    dsn: str, *, application_name: str = "underway", prepare: bool = False
) -> psycopg2.extensions.connection:
    """Open an autocommit connection; transactions are begun explicitly where needed.
    With ``prepare``, a :class:`PreparingConnection`.

    Raises :class:`psycopg2.OperationalError` with the password left out of its message.
    """
    settings = _connection_settings(dsn, application_name)
    if prepare:
        settings["connection_factory"] = PreparingConnection
    try:
        conn = psycopg2.connect(dsn, **settings)
    except psycopg2.OperationalError as exc:
        reason = str(exc).strip().replace("\n", " ")
        raise psycopg2.OperationalError(
            f"cannot connect to the database at {redact_dsn(dsn)}: {reason}"
        ) from None
    conn.autocommit = True
    return conn


class BoundedConnection(psycopg2.extensions.connection):
    """An autocommit connection on which no wait is longer than :attr:`timeout` seconds (or
    past :attr:`deadline`): connecting, and every statement that :mod:`underway.store`
    sends. It runs in psycopg2's asynchronous mode and waits with ``select``, so even a
    server that froze mid-statement, whose socket stays open and acknowledged, cannot
    hold the process: past the limit the connection is closed and ``OperationalError``
    raised, as for any lost connection. The supervisor and the scheduler use it; workers
    cannot, as steps run their own statements on the worker's connection."""

    #: The longest wait for one statement, in seconds.
    timeout: float = 10.0
    #: A ``time.monotonic()`` instant no wait may pass (a stop's end), or None.
    deadline: float | None = None

    def settle(self) -> None:
        """Wait until the connection is idle again: connected, or the statement done."""
        limit = time.monotonic() + self.timeout
        if self.deadline is not None:
            limit = min(limit, self.deadline)
        while True:
            state = self.poll()
            if state == psycopg2.extensions.POLL_OK:
                return
            left = limit - time.monotonic()
            wanted = ([self], []) if state == psycopg2.extensions.POLL_READ else ([], [self])
            if not any(select.select(*wanted, [], max(left, 0))):
                self.close()
                raise psycopg2.OperationalError(
                    f"the database did not answer within {max(self.timeout, 0):g}s; "
                    "connection closed"
                )


def connect_bounded(dsn: str, *, application_name: str, timeout: float) -> BoundedConnection:
    """Open a :class:`BoundedConnection` whose statements also carry a server-side
    ``statement_timeout`` of ``timeout``."""
    settings = _connection_settings(dsn, application_name)
    try:
        conn = psycopg2.connect(dsn, async_=True, connection_factory=BoundedConnection, **settings)
        conn.timeout = timeout
        conn.settle()
        with conn.cursor() as cur:
            refuse_transaction_pooling(dsn, store.session(cur)[0])
            # The server gives up a second after we do, for statements we abandoned.
            cur.execute("SET statement_timeout = %s", (int(timeout * 1000) + 1000,))
            conn.settle()
    except psycopg2.OperationalError as exc:
        reason = str(exc).strip().replace("\n", " ")
        raise psycopg2.OperationalError(
            f"cannot connect to the database at {redact_dsn(dsn)}: {reason}"
        ) from None
    return conn


TRANSACTION_POOLED = (
    "the database is reached through a transaction-pooling proxy (PgBouncer with "
    "pool_mode=transaction?): supervisors, workers and schedulers LISTEN, keep session "
    "settings and are cleaned up by session, so give them a direct or session-pooled DSN; "
    "enqueue through the pool"
)


#: How long the transaction-pooling probe waits for its answer. A transaction pool answers
#: at once (the session just released is free); a full session pool may never, and then
#: there is nothing to refuse.
PROBE_TIMEOUT = 2.0


def refuse_transaction_pooling(dsn: str, backend_pid: int) -> None:
    """Raise :class:`ConfigurationError` when a second session opened to ``dsn`` lands on
    the server process of the one whose pid is ``backend_pid``: only a transaction-pooling
    proxy hands one server session to two clients (a direct or session-pooled connection
    never does), and it hands back the one just released first, so even a quiet pool
    shows it. A probe that gets no answer in time proves nothing, and passes."""
    settings = _connection_settings(dsn, "underway probe")
    probe = None
    try:
        probe = psycopg2.connect(dsn, async_=True, connection_factory=BoundedConnection, **settings)
        probe.timeout = PROBE_TIMEOUT
        probe.settle()
        with probe.cursor() as cur:
            pid = store.session(cur)[0]
    except psycopg2.OperationalError:
        return
    finally:
        close_quietly(probe)
    if pid == backend_pid:
        raise ConfigurationError(TRANSACTION_POOLED)


def close_quietly(conn: psycopg2.extensions.connection | None) -> None:
    """Close a connection that may already be broken; errors from a dead one do not matter."""
    if conn is not None:
        with contextlib.suppress(psycopg2.Error):
            conn.close()


def is_alive(conn: psycopg2.extensions.connection) -> bool:
    """Whether an idle connection is still usable, without a round trip: a connection the
    server closed (a restart, a terminated backend) reads as end-of-file."""
    try:
        # The server's goodbye ("terminating connection") and the end-of-file behind it
        # may arrive separately: keep reading while there is something to read.
        for _ in range(8):
            if conn.closed or not select.select([conn], [], [], 0)[0]:
                break
            conn.poll()
    except (psycopg2.Error, OSError, ValueError):
        return False
    return not conn.closed


def check_schema(conn: psycopg2.extensions.connection) -> None:
    """Raise :class:`SchemaMissing` unless the database holds the schema this version needs."""
    try:
        with conn.cursor() as cur:
            version = store.schema_version(cur)
    except (psycopg2.errors.UndefinedTable, psycopg2.errors.InvalidSchemaName):
        if not conn.autocommit:
            conn.rollback()
        raise SchemaMissing(
            "the database has no underway schema: run underway.run_migrations(dsn) "
            "or `python -m underway.migrations --dsn DSN` first"
        ) from None
    if version is None or version < SCHEMA_VERSION:
        raise SchemaMissing(
            f"the underway schema is at version {version}, this version needs "
            f"{SCHEMA_VERSION}: run underway.run_migrations(dsn)"
        )


def is_outage(exc: BaseException) -> bool:
    """Whether a database error means the database is away or unwilling right now (a
    restart, a failover, a server turned read-only, a dropped connection, no free
    connection slot), which waiting and reconnecting mends; as opposed to an error of the
    statement itself (a bug, bad data, a deadlock, a statement timeout), which no
    reconnect mends."""
    if isinstance(exc, psycopg2.InterfaceError):
        return True
    if not isinstance(exc, psycopg2.Error):
        return False
    code = exc.pgcode
    if code is None:
        # A dead socket: "server closed the connection unexpectedly", or after a server
        # crash a bare DatabaseError without an SQLSTATE.
        return isinstance(exc, psycopg2.OperationalError) or type(exc) is psycopg2.DatabaseError
    # 08: connection exceptions; 53: too many connections, out of memory or disk;
    # 57P: shutdown, terminated backend, server starting up; 58: system errors;
    # 25006: the server is read-only (a replica, or a failover in progress).
    return code[:2] in ("08", "53", "58") or code.startswith("57P") or code == "25006"


def is_our_outage(exc: BaseException, conn: Any) -> bool:
    """Whether an error a step's code raised is an outage of the worker's own database
    (``conn``), rather than the step's own failure: an outage-like error from another
    connection the step opened is the step's; so is "read-only transaction" from a
    transaction the step made read-only, told apart by the server's reported settings
    (PostgreSQL 14 and later report ``default_transaction_read_only`` and
    ``in_hot_standby``; an older server's word is taken as an outage)."""
    if not is_outage(exc):
        return False
    cursor = getattr(exc, "cursor", None)
    if cursor is None or cursor.connection is not conn:
        return isinstance(exc, psycopg2.InterfaceError) and bool(conn.closed)
    if getattr(exc, "pgcode", None) == "25006":
        said = [
            conn.info.parameter_status(name)
            for name in ("default_transaction_read_only", "in_hot_standby")
        ]
        return None in said or "on" in said
    return True


class ProcessConnection:
    """One lazily opened autocommit connection per process, for enqueues made without
    ``conn=``. A lock serialises threads; a forked child opens a fresh one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: psycopg2.extensions.connection | None = None
        self._dsn: str | None = None

    @contextmanager
    def cursor(self, dsn: str | None = None) -> Iterator[Any]:
        """A cursor on this process's connection to ``dsn`` (default: the configured one)."""
        target = resolve_dsn(dsn)
        with self._lock:
            conn = self._connection(target)
            try:
                with conn.cursor() as cur:
                    yield cur
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                # The session broke: drop it so the next call opens a new one. Whether the
                # failed statement committed is unknown, so it is not retried here.
                self.discard()
                raise

    def _connection(self, dsn: str) -> psycopg2.extensions.connection:
        if self._conn is not None and (self._dsn != dsn or not is_alive(self._conn)):
            self.discard()
        if self._conn is None:
            self._conn = connect(dsn, application_name="underway enqueue")
            self._dsn = dsn
        return self._conn

    def discard(self) -> None:
        """Close this process's connection, if it has one of its own."""
        close_quietly(self._conn)
        self._conn = None

    def forget_inherited(self) -> None:
        """Run in a forked child: give up the parent's connection and lock without closing."""
        # Keep the parent's connection object alive but unused: letting it be collected
        # would close it, and closing it would end the parent's session.
        if self._conn is not None:
            _inherited.append(self._conn)
        self._conn = None
        self._lock = threading.Lock()


_inherited: list[psycopg2.extensions.connection] = []
_default = ProcessConnection()
os.register_at_fork(after_in_child=_default.forget_inherited)


def default_cursor(dsn: str | None = None) -> Any:
    """A cursor on the process-wide autocommit connection (see :class:`ProcessConnection`)."""
    return _default.cursor(dsn)


class _CallerCursor:
    """A cursor in the caller's transaction, closed after use only if we opened it."""

    def __init__(self, conn: Any):
        self._given = dbapi_connection(conn)
        self._opened: Any = None

    def __enter__(self) -> Any:
        if hasattr(self._given, "execute"):
            return self._given
        self._opened = self._given.cursor()
        return self._opened

    def __exit__(self, *exc_info: Any) -> None:
        if self._opened is not None:
            self._opened.close()


def dbapi_connection(conn: Any) -> Any:
    """The psycopg2 connection or cursor behind ``conn``: a psycopg2 connection or cursor
    as it is, or a SQLAlchemy ``Connection`` or ``Session`` (plain or scoped, as
    Flask-SQLAlchemy's ``db.session``) unwrapped to the DBAPI connection of its current
    transaction, beginning one if needed. SQLAlchemy itself is never imported."""
    given = f"{type(conn).__module__}.{type(conn).__qualname__}"
    if type(conn).__module__.startswith("sqlalchemy."):
        if callable(getattr(conn, "connection", None)):  # a Session: its transaction's Connection
            conn = conn.connection()
        if not callable(getattr(conn, "in_transaction", None)):  # an Engine, a sessionmaker...
            raise TypeError(
                f"conn must be a SQLAlchemy Connection or Session, not {given}: the task "
                "joins the transaction of the one you pass"
            )
        if not conn.in_transaction():
            conn.begin()  # as the Connection's own execute() would: the caller commits it
        pooled = conn.connection  # the pool's wrapper of the DBAPI connection
        conn = getattr(pooled, "dbapi_connection", None) or pooled.connection
        given = f"a SQLAlchemy connection whose driver gives {type(conn).__module__}"
    if isinstance(conn, (psycopg2.extensions.connection, psycopg2.extensions.cursor)):
        return conn
    raise TypeError(
        "conn must be a psycopg2 connection or cursor, or a SQLAlchemy Connection or Session "
        f"using the psycopg2 driver (postgresql+psycopg2://), not {given}"
    )


def caller_cursor(conn: Any, dsn: str | None = None) -> Any:
    """A cursor in the caller's transaction (``conn``), or, without one, on this process's
    own autocommit connection (to ``dsn``, default: the configured database)."""
    return default_cursor(dsn) if conn is None else _CallerCursor(conn)
