"""A throwaway PostgreSQL server for the test suite.

``PgTestServer.start()`` either wraps an existing server named by ``DATABASE_URL`` (no lifecycle
control) or starts a private one with the ``pgserver`` package in a temporary directory. The
private server listens only on a unix socket in its own directory; stopping and starting it again
reuses the same data and socket directories, so every DSN handed out stays valid across restarts.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import psutil
import psycopg2
import psycopg2.errors
from psycopg2 import sql
from psycopg2.extensions import connection as PgConnection
from psycopg2.extensions import make_dsn

T = TypeVar("T")

#: Settings for our own server: speed over durability (an OS crash is not a test scenario; a
#: Postgres crash still loses nothing because the OS keeps the written pages), and room for the
#: many connections that workers, supervisors and the tests themselves open.
SERVER_SETTINGS = {
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "300",
}

#: Upper bound for any single wait (server start/stop, a busy template, ...).
DEFAULT_TIMEOUT = 60.0


def _poll(predicate: Callable[[], T], timeout: float, message: str, interval: float = 0.02) -> T:
    """Call ``predicate`` until it returns something truthy; raise ``TimeoutError`` at deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{message} (waited {timeout:.1f}s)")
        time.sleep(interval)


class PgTestServer:
    """A PostgreSQL server the tests may create/drop databases on (and, if ours, restart)."""

    def __init__(
        self,
        base_dsn: str,
        *,
        pgdata: Path | None = None,
        socket_dir: Path | None = None,
        system_user: str | None = None,
        root_dir: Path | None = None,
    ) -> None:
        """Wrap a server; use :meth:`start` instead of calling this directly."""
        self._base_dsn = base_dsn
        self.pgdata = pgdata
        self.socket_dir = socket_dir
        self.system_user = system_user
        self.root_dir = root_dir
        self.log_path = pgdata / "log" if pgdata is not None else None
        self.admin_dbname: str = _dsn_dbname(base_dsn) or "postgres"
        self._closed = False
        self._version_num: int | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def start(cls, database_url: str | None = None) -> PgTestServer:
        """Use ``database_url`` (default ``$DATABASE_URL``) if set, else start a private server
        in a fresh temp directory."""
        url = database_url or os.environ.get("DATABASE_URL")
        if url:
            server = cls(url)
            server._wait_connectable(DEFAULT_TIMEOUT)
            return server
        return cls._start_private()

    @classmethod
    def _start_private(cls) -> PgTestServer:
        """initdb + first start via pgserver, then apply SERVER_SETTINGS with one restart."""
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (as in CI); harmless here.
            warnings.simplefilter("ignore")
            import pgserver

        root_dir = Path(tempfile.mkdtemp(prefix="underway-pg-"))
        # pgserver makes the prefix of pgdata traversable and chowns pgdata to its system user
        # when running as root; pgdata must not exist yet so that it gets initdb'd.
        pgdata = root_dir / "pgdata"
        try:
            pg = pgserver.get_server(pgdata, cleanup_mode=None)
            info = pg.get_postmaster_info()
            socket_dir = info.socket_dir
            if socket_dir is None:
                raise RuntimeError(f"pgserver did not report a socket dir: {info!r}")
            server = cls(
                _socket_uri(Path(socket_dir), "postgres"),
                pgdata=Path(pg.pgdata),
                socket_dir=Path(socket_dir),
                system_user=pg.system_user,
                root_dir=root_dir,
            )
        except BaseException:
            shutil.rmtree(root_dir, ignore_errors=True)
            raise
        atexit.register(server.close)
        try:
            with server.admin_connection() as conn, conn.cursor() as cur:
                for name, value in SERVER_SETTINGS.items():
                    cur.execute(
                        sql.SQL("ALTER SYSTEM SET {} = {}").format(
                            sql.Identifier(name), sql.Literal(value)
                        )
                    )
            server.restart()
        except BaseException:
            server.close()
            raise
        return server

    # ------------------------------------------------------------------ DSNs and connections

    @property
    def can_restart(self) -> bool:
        """True if we own the server process (so stop/start_again/restart are allowed)."""
        return self.pgdata is not None

    @property
    def admin_dsn(self) -> str:
        """DSN of the maintenance database used for CREATE/DROP DATABASE."""
        return self.dsn(self.admin_dbname)

    def dsn(self, dbname: str) -> str:
        """libpq DSN for database ``dbname`` on this server (same host/socket/user/options)."""
        if self.socket_dir is not None:
            return _socket_uri(self.socket_dir, dbname)
        return _replace_dbname(self._base_dsn, dbname)

    @contextmanager
    def admin_connection(self, dbname: str | None = None) -> Iterator[PgConnection]:
        """A short-lived autocommit connection (to the admin database by default)."""
        conn = psycopg2.connect(self.dsn(dbname or self.admin_dbname), connect_timeout=10)
        try:
            conn.autocommit = True
            yield conn
        finally:
            conn.close()

    def _fetch(self, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
        """Run one statement on the admin database; return its rows (or [])."""
        with self.admin_connection() as conn, conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description is not None else []

    def server_version_num(self) -> int:
        """``server_version_num`` as an int, e.g. 160002 (cached: it cannot change under us)."""
        if self._version_num is None:
            self._version_num = int(self._fetch("SHOW server_version_num")[0][0])
        return self._version_num

    # ------------------------------------------------------------------ databases

    def create_database(self, name: str, template: str | None = None) -> str:
        """CREATE DATABASE ``name`` (optionally from ``template``); returns its DSN.

        Cloning fails while anyone is connected to the template, so stray template backends
        are terminated and the clone retried until a deadline.
        """
        stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            stmt = sql.SQL("{} TEMPLATE {}").format(stmt, sql.Identifier(template))
        deadline = time.monotonic() + DEFAULT_TIMEOUT
        if template is not None:
            # PostgreSQL itself waits 5 s before failing on a busy template: don't let it.
            self.terminate_backends(template)
        while True:
            try:
                self._fetch(stmt)
                return self.dsn(name)
            except psycopg2.errors.ObjectInUse:
                if template is None or time.monotonic() >= deadline:
                    raise
                self.terminate_backends(template)
                time.sleep(0.02)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE IF EXISTS ``name``, terminating its connections first."""
        force = self.server_version_num() >= 130000
        stmt = sql.SQL("DROP DATABASE IF EXISTS {}{}").format(
            sql.Identifier(name), sql.SQL(" WITH (FORCE)" if force else "")
        )
        deadline = time.monotonic() + DEFAULT_TIMEOUT
        while True:
            self.terminate_backends(name)
            try:
                self._fetch(stmt)
                return
            except psycopg2.errors.ObjectInUse:
                # A client reconnected between terminate and drop (only possible without FORCE).
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)

    def database_exists(self, name: str) -> bool:
        """True if a database called ``name`` exists."""
        return bool(self._fetch("SELECT 1 FROM pg_database WHERE datname = %s", (name,)))

    def terminate_backends(self, dbname: str, application_name_like: str | None = None) -> int:
        """Kill the backends connected to ``dbname`` (optionally only matching application names).

        Returns how many were terminated. On PostgreSQL 14+ each kill waits (up to 5 s) until
        the backend is really gone, so a test can rely on the connections being dead afterwards.
        """
        kill = (
            "pg_terminate_backend(pid, 5000)"
            if self.server_version_num() >= 140000
            else "pg_terminate_backend(pid)"
        )
        query = (
            f"SELECT count(*) FILTER (WHERE {kill}) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()"
        )
        params: list[Any] = [dbname]
        if application_name_like is not None:
            query += " AND application_name LIKE %s"
            params.append(application_name_like)
        return int(self._fetch(query, params)[0][0])

    def backend_count(self, dbname: str, application_name_like: str | None = None) -> int:
        """Number of client backends currently connected to ``dbname``."""
        query = (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
        )
        params: list[Any] = [dbname]
        if application_name_like is not None:
            query += " AND application_name LIKE %s"
            params.append(application_name_like)
        return int(self._fetch(query, params)[0][0])

    # ------------------------------------------------------------------ lifecycle

    def postmaster_pid(self) -> int | None:
        """PID of the running postmaster of our own server, or None if it is not running."""
        if self.pgdata is None:
            return None
        try:
            first_line = (self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first_line.strip())
        except (OSError, ValueError):
            return None
        try:
            proc = psutil.Process(pid)
            # A stale pid file (postmaster SIGKILLed) may name a recycled pid: check the name.
            if proc.status() == psutil.STATUS_ZOMBIE or proc.name() != "postgres":
                return None
        except psutil.Error:
            return None
        return pid

    def is_running(self) -> bool:
        """True if the server accepts connections (our own: the postmaster is alive)."""
        if self.pgdata is not None:
            return self.postmaster_pid() is not None and self._can_connect()
        return self._can_connect()

    def _can_connect(self) -> bool:
        try:
            psycopg2.connect(self.admin_dsn, connect_timeout=5).close()
        except psycopg2.OperationalError:
            return False
        return True

    def _wait_connectable(self, timeout: float) -> None:
        _poll(self._can_connect, timeout, f"server not accepting connections: {self.log_tail()}")

    def _require_control(self) -> Path:
        if self.pgdata is None:
            raise RuntimeError("server comes from DATABASE_URL: it cannot be stopped/restarted")
        if self._closed:
            raise RuntimeError("server is closed")
        return self.pgdata

    def _pg_ctl(self, args: list[str], timeout: float) -> None:
        """Run pg_ctl (as the server's system user) on our data dir; raise with the log on error."""
        from pgserver._commands import POSTGRES_BIN_PATH

        pgdata = self._require_control()
        cmd = [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(pgdata), *args]
        # Temp files, not pipes: the postmaster may inherit pipe fds and keep them open forever.
        with tempfile.TemporaryFile("w+") as out:
            proc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=str(pgdata),
                user=self.system_user,
                timeout=timeout + 10,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                out.seek(0)
                raise RuntimeError(
                    f"pg_ctl {' '.join(args)} failed ({proc.returncode}): {out.read()}\n"
                    f"server log tail:\n{self.log_tail()}"
                )

    def stop(self, mode: str = "fast", timeout: float = DEFAULT_TIMEOUT) -> None:
        """Stop the server (``pg_ctl -m fast stop``; ``mode='immediate'`` simulates a crash).

        No-op if it is not running. Returns once the postmaster has exited.
        """
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown shutdown mode {mode!r}")
        self._require_control()
        pid = self.postmaster_pid()
        if pid is None:
            return
        try:
            self._pg_ctl(["-w", "-t", str(int(timeout)), "-m", mode, "stop"], timeout)
        except RuntimeError:
            if self.postmaster_pid() is not None:
                raise
        _poll(lambda: self.postmaster_pid() is None, timeout, "postmaster did not exit")

    def start_again(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Start the stopped server on the same data dir and socket dir (so DSNs stay valid).

        No-op if it is already running. Returns once it accepts connections.
        """
        self._require_control()
        if self.postmaster_pid() is None:
            assert self.socket_dir is not None and self.log_path is not None
            args = [
                "-w",
                "-t",
                str(int(timeout)),
                # The same options pgserver uses: no TCP listener, socket in our socket dir.
                "-o",
                '-h ""',
                "-o",
                f"-k {self.socket_dir}",
                "-l",
                str(self.log_path),
                "start",
            ]
            # A stale postmaster.pid (after a crash) is handled by postgres itself.
            self._pg_ctl(args, timeout)
        self._wait_connectable(timeout)

    def restart(self, mode: str = "fast", timeout: float = DEFAULT_TIMEOUT) -> None:
        """``stop(mode)`` followed by ``start_again()``."""
        self.stop(mode=mode, timeout=timeout)
        self.start_again(timeout=timeout)

    def ensure_running(self) -> None:
        """Start the server again if a test left it stopped (no-op for DATABASE_URL servers)."""
        if self.can_restart and not self._closed and self.postmaster_pid() is None:
            self.start_again()

    def log_tail(self, chars: int = 4000) -> str:
        """The end of our server's log file ('' for DATABASE_URL servers)."""
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - chars))
                return f.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"<cannot read {self.log_path}: {exc}>"

    def close(self) -> None:
        """Stop our server and delete its directory; for DATABASE_URL servers do nothing."""
        if self._closed:
            return
        if self.pgdata is not None:
            try:
                self.stop(mode="fast", timeout=30)
            except Exception:
                self._kill_postmaster()
            finally:
                self._closed = True
                if self.root_dir is not None:
                    shutil.rmtree(self.root_dir, ignore_errors=True)
                atexit.unregister(self.close)
        self._closed = True

    def _kill_postmaster(self) -> None:
        """Last resort when pg_ctl stop fails: SIGKILL the postmaster and its children."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        try:
            proc = psutil.Process(pid)
            procs = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            with suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(procs, timeout=10)

    def __repr__(self) -> str:
        where = str(self.pgdata) if self.pgdata is not None else "DATABASE_URL"
        return f"<PgTestServer {where} admin_dsn={self.admin_dsn!r}>"


def _socket_uri(socket_dir: Path, dbname: str) -> str:
    """URI for the ``postgres`` superuser over the unix socket in ``socket_dir``."""
    return f"postgresql://postgres@/{quote(dbname, safe='')}?host={quote(str(socket_dir))}"


def _dsn_dbname(dsn: str) -> str | None:
    """The database named by a libpq DSN/URI, if it names one."""
    from psycopg2.extensions import parse_dsn

    return parse_dsn(dsn).get("dbname")


def _replace_dbname(dsn: str, dbname: str) -> str:
    """``dsn`` pointing at database ``dbname``; URIs stay URIs (query params are kept)."""
    if dsn.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(dsn)
        return urlunsplit(parts._replace(path="/" + quote(dbname, safe="")))
    return make_dsn(dsn, dbname=dbname)
