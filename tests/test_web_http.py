"""The dashboard over plain HTTP, no browser: what a forged or scripted request gets
(CSRF, read-only, basic auth, redirects), the status codes of missing things, /healthz and
/metrics, the escaping in the HTML itself, and the app mounted under a prefix."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from http.cookies import SimpleCookie
from typing import Any

import pytest
import web_jobs

from .web_helpers import Reply, http, serve, sql

pytest.importorskip("flask")

from underway.web import create_app


@contextmanager
def dashboard(dsn: str, **options: Any) -> Iterator[str]:
    """``create_app(dsn, **options)`` served in a thread; yields its URL."""
    app = create_app(dsn=dsn, **options)
    with serve(app) as url:
        yield url
    app.extensions["underway"].pool.close()


@pytest.fixture
def site(dsn: str) -> Iterator[str]:
    """The dashboard of this test's database."""
    with dashboard(dsn, secret_key="shared-secret") as url:
        yield url


class Session:
    """A browser's part in the CSRF protocol: its cookie, and the token pages show."""

    def __init__(self, base: str, page: str = "/") -> None:
        reply = http(base + page)
        assert reply.status == 200, reply.text
        cookie = SimpleCookie(reply.headers["Set-Cookie"])["underway_session"]
        self.cookie = f"underway_session={cookie.value}"
        self.cookie_path = cookie["path"]
        found = re.search(r'name="csrf_token" value="([^"]+)"', reply.text)
        assert found, "the page has no form"
        self.token = found[1]
        self.base = base

    def post(self, action: str, form: dict[str, Any], token: str | None = None) -> Reply:
        """POST ``form`` to an action with this session's cookie and ``token``."""
        data = {**form, "csrf_token": self.token if token is None else token}
        return http(f"{self.base}/actions/{action}", data, headers={"Cookie": self.cookie})

    def get(self, path: str) -> Reply:
        """GET a page with this session's cookie."""
        return http(self.base + path, headers={"Cookie": self.cookie})


def paused(dsn: str) -> list[str]:
    """The paused queues, as stored."""
    return [q for (q,) in sql(dsn, "SELECT queue FROM underway.paused_queue ORDER BY 1")]


def test_posts_without_a_valid_csrf_token_are_refused(dsn: str, site: str) -> None:
    """A POST with no token, no cookie, a wrong token, or another session's token gets
    403 and changes nothing; GET on an action is not allowed (405)."""
    task_id = web_jobs.emails.enqueue({"user_id": 3, "name": "Linus"}).id
    web_jobs.exports.enqueue({"day": 2})
    ours, theirs = Session(site), Session(site)
    assert ours.token != theirs.token
    assert http(f"{site}/actions/pause", {"queue": "exports"}).status == 403
    assert http(f"{site}/actions/cancel", {"id": task_id, "csrf_token": ours.token}).status == 403
    assert ours.post("pause", {"queue": "exports"}, token="forged").status == 403
    assert ours.post("cancel", {"id": task_id}, token=theirs.token).status == 403
    assert ours.post("cancel", {"id": task_id}, token="").status == 403
    assert http(f"{site}/actions/pause?queue=exports").status == 405
    assert paused(dsn) == []
    assert sql(dsn, "SELECT state::text FROM underway.task WHERE id = %s", (task_id,)) == [
        ("pending",)
    ]


def test_a_valid_post_acts_and_redirects_back_with_a_message(dsn: str, site: str) -> None:
    """With its session's token a POST acts, answers 303 to the page it came from (never
    another site), and that page then shows what happened, once."""
    web_jobs.exports.enqueue({"day": 2})
    session = Session(site)
    reply = session.post("pause", {"queue": "exports", "next": "/tasks?queue=exports"})
    assert reply.status == 303
    assert reply.headers["Location"] in ("/tasks?queue=exports", f"{site}/tasks?queue=exports")
    assert paused(dsn) == ["exports"]
    session.cookie = _updated(session.cookie, reply)
    assert "Queue &#39;exports&#39; paused" in session.get("/tasks?queue=exports").text

    for hostile in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        reply = session.post("resume", {"queue": "exports", "next": hostile})
        assert reply.status == 303
        assert "evil" not in reply.headers["Location"], hostile


def test_abort_redrive_and_refusals_say_what_happened(dsn: str, site: str) -> None:
    """Abort on a running task asks its supervisor to end the step; re-drive puts one
    dead letter, then all the rest, back to pending; retrying a task that is not failed,
    or cancelling a finished one, changes nothing and says why."""
    from underway.testing import drain

    web_jobs.billing.enqueue_many([{"invoice": i, "amount": 1000 + i} for i in range(3)])
    drain([web_jobs.billing], dsn=dsn)
    dead = [i for (i,) in sql(dsn, "SELECT id FROM underway.task ORDER BY id")]
    running = web_jobs.emails.enqueue({"user_id": 9, "name": "Joan"}).id
    sql(dsn, "UPDATE underway.task SET state = 'running', attempts = 1 WHERE id = %s", (running,))
    session = Session(site)

    def said(reply: Reply) -> str:
        assert reply.status == 303, reply.text
        session.cookie = _updated(session.cookie, reply)
        page = session.get("/failures")
        session.cookie = _updated(session.cookie, page)  # the flash, shown, is gone
        return re.search(
            r'<div class="flash flash-(\w+)" role="status">([^<]*)</div>', page.text
        ).groups()

    reply = session.post("cancel", {"id": running, "abort": "1"})
    assert said(reply) == (
        "ok",
        f"Task {running}: requested — its supervisor ends the running step now (abort).",
    )
    assert sql(
        dsn, "SELECT abort_requested_at IS NOT NULL FROM underway.task WHERE id = %s", (running,)
    ) == [(True,)]

    reply = session.post("redrive", {"queue": "billing-dead", "id": dead[0]})
    assert said(reply) == (
        "ok",
        f"Re-drove 1 task(s) from dead-letter queue &#39;billing-dead&#39;: {dead[0]}.",
    )
    reply = session.post("redrive", {"queue": "billing-dead"})
    assert said(reply)[1].startswith("Re-drove 2 task(s)")
    states = sql(dsn, "SELECT state::text FROM underway.task WHERE id = ANY(%s)", (dead,))
    assert states == [("pending",)] * 3

    reply = session.post("retry", {"id": dead[0]})
    assert said(reply) == (
        "error",
        f"Task {dead[0]}: nothing retried: task {dead[0]} is pending, not failed",
    )
    sql(dsn, "UPDATE underway.task SET state = 'succeeded' WHERE id = %s", (dead[1],))
    reply = session.post("cancel", {"id": dead[1]})
    assert said(reply) == (
        "error",
        f"Task {dead[1]}: finished — it had already finished; nothing changed.",
    )
    assert session.post("retry", {"id": "not a number"}).status == 400


def _updated(cookie: str, reply: Reply) -> str:
    """The session cookie after a reply that may have set a new one."""
    new = reply.headers.get("Set-Cookie")
    if not new:
        return cookie
    return f"underway_session={SimpleCookie(new)['underway_session'].value}"


def test_read_only_refuses_posts_even_with_a_valid_token(dsn: str) -> None:
    """A read-only dashboard answers 403 to a POST that a writable one with the same key
    would accept, and shows no forms."""
    web_jobs.exports.enqueue({"day": 2})
    with (
        dashboard(dsn, secret_key="k") as writable,
        dashboard(dsn, secret_key="k", read_only=True) as read_only,
    ):
        session = Session(writable)
        session.base = read_only
        reply = session.post("pause", {"queue": "exports"})
        assert reply.status == 403 and "read-only" in reply.text
        assert 'method="post"' not in http(read_only + "/").text
    assert paused(dsn) == []


def test_missing_tasks_and_bad_ids_say_so(dsn: str, site: str) -> None:
    """A task that does not exist is a 404 page naming it; a search that is no id is a
    400 saying so; a search for an id redirects to its page."""
    reply = http(f"{site}/tasks/424242")
    assert reply.status == 404 and "No task 424242" in reply.text
    assert http(f"{site}/tasks/99999999999999999999").status == 404
    reply = http(f"{site}/search?id=drop+table")
    assert reply.status == 400 and "is not a task id" in reply.text
    reply = http(f"{site}/search?id=%2342")
    assert reply.status == 302 and reply.headers["Location"].endswith("/tasks/42")
    assert http(f"{site}/tasks?state=exploded").status == 400
    assert http(f"{site}/nowhere").status == 404


def test_healthz_says_whether_the_database_answers(dsn: str, site: str) -> None:
    """/healthz is 200 "ok" on a database with the schema, 503 when the database cannot
    be reached, and its message never shows the DSN's password."""
    reply = http(f"{site}/healthz")
    assert (reply.status, reply.text) == (200, "ok\n")
    bad = re.sub(r"/test_\w+", "/no_such_database", dsn)
    bad += ("&" if "?" in bad else "?") + "password=hunter2"
    with dashboard(bad) as broken:
        reply = http(f"{broken}/healthz")
        assert reply.status == 503 and "unavailable" in reply.text
        assert "hunter2" not in reply.text
        page = http(f"{broken}/")
        assert page.status == 503 and "Database unavailable" in page.text
        assert "hunter2" not in page.text


def test_metrics_serve_the_prometheus_exposition(dsn: str, site: str) -> None:
    """/metrics serves underway.metrics.exposition's body with its content type."""
    from underway import metrics

    web_jobs.emails.enqueue({"user_id": 4, "name": "Ken"})
    reply = http(f"{site}/metrics")
    assert reply.status == 200
    _, content_type = metrics.exposition(dsn)
    assert reply.headers["Content-Type"] == content_type
    assert 'underway_queue_depth{queue="emails",state="pending"} 1' in reply.text


def test_user_data_is_escaped_in_the_html(dsn: str, site: str) -> None:
    """A job input and an error holding markup reach the HTML escaped: the page source
    has no tag from them, only their text; every response forbids inline script (CSP)."""
    from underway.testing import drain

    script = "<script>alert('xss')</script>"
    task = web_jobs.hostile.enqueue({"name": script, "error": f"</pre>{script}"})
    drain([web_jobs.hostile], dsn=dsn)
    for path in (f"/tasks/{task.id}", "/failures", "/tasks", "/"):
        reply = http(site + path)
        assert "<script>alert" not in reply.text, path
        assert "&lt;script&gt;alert(&#39;xss&#39;)&lt;/script&gt;" in reply.text, path
        assert "script-src 'self'" in reply.headers["Content-Security-Policy"]
        assert reply.headers["X-Frame-Options"] == "DENY"


def test_password_protects_every_page_but_healthz(dsn: str) -> None:
    """With a password every page asks for HTTP basic auth (401 with a challenge), any
    user name with the right password gets in, a wrong one does not; /healthz stays open."""
    with dashboard(dsn, password="correct horse") as url:
        reply = http(url + "/")
        assert reply.status == 401 and reply.headers["WWW-Authenticate"].startswith("Basic")
        assert http(url + "/", password="wrong").status == 401
        assert http(url + "/", password="correct horse").status == 200
        assert http(url + "/metrics").status == 401
        assert http(url + "/healthz").status == 200


def test_mounted_under_a_prefix_everything_stays_under_it(dsn: str) -> None:
    """Mounted with DispatcherMiddleware at /ops/underway, links, assets, the session
    cookie's path and the redirect after an action all stay under the prefix, and the
    host app keeps its own routes."""
    from flask import Flask
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    host = Flask(__name__)
    host.add_url_rule("/", "home", lambda: "host home")
    board = create_app(dsn=dsn)
    host.wsgi_app = DispatcherMiddleware(host.wsgi_app, {"/ops/underway": board})  # type: ignore[method-assign]
    web_jobs.exports.enqueue({"day": 5})
    with serve(host) as url:
        assert http(url + "/").text == "host home"
        page = http(url + "/ops/underway/")
        assert page.status == 200
        assert 'href="/ops/underway/static/underway.css' in page.text
        assert 'action="/ops/underway/actions/pause"' in page.text
        assert http(url + "/ops/underway/static/underway.css").status == 200
        session = Session(url + "/ops/underway")
        assert session.cookie_path == "/ops/underway"
        reply = session.post("pause", {"queue": "exports", "next": "/"})
        assert reply.status == 303
        assert reply.headers["Location"] in ("/ops/underway/", f"{url}/ops/underway/")
    board.extensions["underway"].pool.close()
    assert paused(dsn) == ["exports"]
