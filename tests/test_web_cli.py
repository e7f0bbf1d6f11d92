"""``python -m underway.web`` as a real process: where it agrees to listen, the password
it then asks for, and the DSN it keeps out of ``ps``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from psycopg2.extensions import make_dsn

from .helpers import REPO_ROOT, run_python, subprocess_env, wait_until
from .web_helpers import http

pytest.importorskip("flask")

#: No password unless a test sets one (an empty value counts as none).
NO_PASSWORD = {"UNDERWAY_WEB_PASSWORD": "", "DATABASE_URL": ""}


@contextmanager
def web(args: list[str], env: dict[str, str] | None = None) -> Iterator[tuple[int, str]]:
    """``python -m underway.web ARGS --port 0`` until it says where it serves; yields its
    pid and its URL (on 127.0.0.1), and stops its process group afterwards."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "underway.web", *args, "--port", "0"],
            cwd=REPO_ROOT,
            env=subprocess_env({**NO_PASSWORD, **(env or {})}),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def output() -> str:
            log.seek(0)
            return log.read().decode("utf-8", "replace")

        def serving() -> re.Match[str] | None:
            assert proc.poll() is None, f"it exited: {output()}"
            return re.search(r"serving http://\S+?:(\d+)/", output())

        try:
            port = wait_until(serving, timeout=20, interval=0.02, message="it to serve")[1]
            yield proc.pid, f"http://127.0.0.1:{port}"
        finally:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                assert proc.wait(timeout=10) == 0, output()
            finally:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_a_public_address_without_password_is_refused_in_one_line(dsn: str) -> None:
    """Binding to 0.0.0.0 (or any non-loopback address) without UNDERWAY_WEB_PASSWORD
    exits 2 before listening, with one line saying why and what to do."""
    for host in ("0.0.0.0", "::", "10.1.2.3"):
        result = run_python(["-m", "underway.web", "--host", host, "--dsn", dsn], env=NO_PASSWORD)
        assert result.returncode == 2, result
        assert result.stdout == ""
        assert result.stderr.count("\n") == 1, result.stderr
        assert f"refusing to listen on {host}" in result.stderr
        assert "UNDERWAY_WEB_PASSWORD" in result.stderr


def test_a_public_address_with_a_password_asks_for_it(dsn: str) -> None:
    """With UNDERWAY_WEB_PASSWORD set it listens on 0.0.0.0, and every page but /healthz
    needs HTTP basic auth: 401 without or with a wrong password, 200 with it."""
    password = "open sesame"
    args = ["--host", "0.0.0.0", "--dsn", dsn]
    with web(args, env={"UNDERWAY_WEB_PASSWORD": password}) as (_, url):
        assert http(url + "/").status == 401
        assert http(url + "/", password="closed sesame").status == 401
        reply = http(url + "/", password=password)
        assert reply.status == 200 and "Overview" in reply.text
        assert http(url + "/healthz").status == 200


def test_the_dsn_given_on_the_command_line_stays_out_of_ps(dsn: str) -> None:
    """``--dsn`` with a password: the process starts itself again without it (same pid),
    so its command line, which any user can read, has no password; it still serves from
    that database."""
    secret = "pw-in-the-dsn-31337"
    with_password = make_dsn(dsn, password=secret)  # the test server trusts local users
    with web(["--dsn", with_password, "--read-only"]) as (pid, url):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        assert secret not in " ".join(cmdline)
        assert "underway.web" in cmdline and "--read-only" in cmdline
        assert "--dsn" not in cmdline
        reply = http(url + "/")
        assert reply.status == 200 and "read-only" in reply.text
        assert secret not in reply.text


def test_an_unreachable_database_is_reported_in_one_line(dsn: str) -> None:
    """A DSN that cannot connect makes it exit 1 with one line, the password hidden."""
    bad = make_dsn(re.sub(r"/test_\w+", "/no_such_database", dsn), password="hunter2")
    result = run_python(["-m", "underway.web", "--dsn", bad], env=NO_PASSWORD)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "underway web: " in result.stderr
    assert "no_such_database" in result.stderr and "hunter2" not in result.stderr
