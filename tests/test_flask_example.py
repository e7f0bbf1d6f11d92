"""The Flask example (examples/flask_app) for real: gunicorn with two sync workers serving
sign-ups over HTTP, and an underway supervisor sending the welcome emails beside it.

Proves the example's claim: a committed sign-up gets exactly one welcome-email task and one
outbox row; a rolled-back one (taken email, or an error after the enqueue) leaves no user,
no task and no email.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import Any

import pytest

from .helpers import REPO_ROOT, Supervisor, query, run_python, scalar, subprocess_env, wait_until

pytest.importorskip("flask")
pytest.importorskip("gunicorn")
pytest.importorskip("sqlalchemy")

FLASK_APP = REPO_ROOT / "examples" / "flask_app"
JOB = "signup-welcome-email"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gunicorn(dsn: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """``gunicorn --workers 2 'app:create_app()'`` (sync workers) on a free port, run from
    the example's directory with ``DATABASE_URL=dsn`` (and ``env``); yields its base URL
    once it listens, and stops its whole process group afterwards."""
    port = free_port()
    args = ["-m", "gunicorn", "--workers", "2", "--worker-class", "sync"]
    args += ["--bind", f"127.0.0.1:{port}", "app:create_app()"]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=FLASK_APP,
            env=subprocess_env({"DATABASE_URL": dsn, **(env or {})}),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def output() -> str:
            log.seek(0)
            return log.read().decode("utf-8", "replace")

        def listening() -> bool:
            assert proc.poll() is None, f"gunicorn exited: {output()}"
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        try:
            wait_until(listening, timeout=20, interval=0.02, message="gunicorn to listen")
            yield f"http://127.0.0.1:{port}"
        except BaseException:
            sys.stderr.write(f"--- gunicorn output ---\n{output()}")
            raise
        finally:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # graceful: workers finish their request
            try:
                proc.wait(timeout=15)
            finally:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def post(url: str, form: dict[str, Any]) -> tuple[int, Any]:
    """POST ``form`` as JSON; the status and the JSON reply (None if the reply is not JSON)."""
    req = urllib.request.Request(
        url, json.dumps(form).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        is_json = err.headers.get_content_type() == "application/json"
        return err.code, json.load(err) if is_json else None


@pytest.mark.timeout(90)
def test_signups_commit_with_their_email_and_roll_back_without(dsn: str) -> None:
    """Concurrent sign-ups through gunicorn while the supervisor runs: each committed one
    (201) has one task and one outbox row, each rolled-back one (409 for a taken email, 500
    for an error after the enqueue) has no user, no task, no outbox row."""
    init = run_python(
        ["-m", "flask", "--app", "app", "init-db"], env={"DATABASE_URL": dsn}, cwd=FLASK_APP
    )
    assert init.returncode == 0, init.stdout + init.stderr

    forms: list[dict[str, Any]] = []
    for i in range(12):
        forms.append({"email": f"user{i}@example.com", "name": f"User {i}"})
        if i % 3 == 0:
            # Errors between the others: nothing of theirs may leak into a later request's
            # commit on the same gunicorn worker.
            forms.append({"email": f"oops{i}@example.com", "name": "Oops", "fail": True})
        if i % 4 == 1:
            # The same email twice at once: the first to commit wins, the other fails on the
            # unique index when its INSERT is flushed, before it enqueues.
            forms += [{"email": f"twin{i}@example.com", "name": "Twin"}] * 2
    failing = [form for form in forms if form.get("fail")]

    supervisor = Supervisor(
        ["jobs"], dsn, ["--workers", "2"], cwd=FLASK_APP, env={"DATABASE_URL": dsn}
    )
    with supervisor, gunicorn(dsn) as base_url:
        with ThreadPoolExecutor(max_workers=6) as pool:
            replies = list(pool.map(lambda form: post(f"{base_url}/signup", form), forms))

        by_email: dict[str, list[int]] = {}
        for form, (status, _) in zip(forms, replies):
            by_email.setdefault(form["email"], []).append(status)
        for email, statuses in by_email.items():
            expected = {"user": [201], "oops": [500], "twin": [201, 409]}[email[:4]]
            assert sorted(statuses) == expected, (email, replies)
        committed = {
            reply["id"]: form["email"]
            for form, (status, reply) in zip(forms, replies)
            if status == 201
        }
        assert len(committed) == 12 + 3

        wait_until(
            lambda: scalar(dsn, "SELECT count(*) FROM outbox") >= len(committed),
            timeout=20,
            message=f"an email for each of {len(committed)} sign-ups: {supervisor!r}",
        )
        wait_until(
            lambda: (
                scalar(dsn, "SELECT count(*) FROM underway.task WHERE state <> 'succeeded'") == 0
            ),
            timeout=10,
            message=f"every task to succeed: {supervisor!r}",
        )
        supervisor.signal(signal.SIGTERM)
        assert supervisor.wait(timeout=30) == 0, supervisor

    users = dict(query(dsn, "SELECT id, email FROM users"))
    assert users == committed
    tasks = query(dsn, "SELECT (input->>'user_id')::int, state::text FROM underway.task")
    assert sorted(tasks) == [(user_id, "succeeded") for user_id in sorted(committed)]
    outbox = query(dsn, "SELECT user_id, recipient FROM outbox")
    assert sorted(outbox) == sorted(committed.items())
    # The failing requests did enqueue before raising: their tasks used up identity values
    # and were then rolled back with the user (a 409 fails before its enqueue).
    sequence = scalar(dsn, "SELECT pg_get_serial_sequence('underway.task', 'id')")
    assert scalar(dsn, f"SELECT last_value FROM {sequence}") == len(committed) + len(failing)


@pytest.mark.timeout(90)
def test_the_dashboard_is_mounted_at_underway(dsn: str) -> None:
    """The example serves underway's dashboard at /underway through gunicorn: read-only
    without UNDERWAY_WEB_PASSWORD (no forms, POSTs refused); with it, every page asks for
    the password, and a form served by one gunicorn worker is accepted by either (the
    session key derives from the password). Pages, assets and redirects stay under
    /underway, and the app's own routes still answer."""
    from .web_helpers import http

    init = run_python(
        ["-m", "flask", "--app", "app", "init-db"], env={"DATABASE_URL": dsn}, cwd=FLASK_APP
    )
    assert init.returncode == 0, init.stdout + init.stderr
    web_env = {"UNDERWAY_WEB_PASSWORD": "", "UNDERWAY_WEB_SECRET_KEY": ""}
    welcome_task = scalar(
        dsn, "SELECT underway.enqueue('signup-welcome-email', '{\"user_id\": 1}')"
    )
    with gunicorn(dsn, env=web_env) as base_url:
        page = http(f"{base_url}/underway/")
        assert page.status == 200 and "read-only" in page.text
        assert 'href="/underway/static/underway.css' in page.text
        assert 'method="post"' not in page.text
        assert http(f"{base_url}/underway/static/underway.css").status == 200
        task_page = http(f"{base_url}/underway/tasks/{welcome_task}")
        assert task_page.status == 200 and "signup-welcome-email" in task_page.text
        assert http(f"{base_url}/underway/actions/cancel", {"id": welcome_task}).status == 403
        assert http(f"{base_url}/underway/healthz").text == "ok\n"
        assert post(f"{base_url}/signup", {"email": "a@example.com", "name": "A"})[0] == 201

    password = "example password"
    with gunicorn(dsn, env={**web_env, "UNDERWAY_WEB_PASSWORD": password}) as base_url:
        assert http(f"{base_url}/underway/").status == 401
        page = http(f"{base_url}/underway/tasks/{welcome_task}", password=password)
        assert page.status == 200 and 'action="/underway/actions/cancel"' in page.text
        token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
        cookie = page.headers["Set-Cookie"].split(";")[0]
        for attempt in range(4):  # whichever of the two workers answers
            reply = http(
                f"{base_url}/underway/actions/cancel",
                {"id": welcome_task, "csrf_token": token, "next": f"/tasks/{welcome_task}"},
                headers={"Cookie": cookie},
                password=password,
            )
            assert reply.status == 303, (attempt, reply.text)
            assert reply.headers["Location"].endswith(f"/underway/tasks/{welcome_task}")
    state = scalar(dsn, "SELECT state::text FROM underway.task WHERE id = %s", (welcome_task,))
    assert state == "cancelled"
