"""Helpers for the dashboard tests: serve an app in a thread, drive headless Chromium, and
fill a database with a shop's realistic mix of tasks (queues, failures with tracebacks,
a paused queue, an hour of throughput, a supervisor with busy workers, schedules)."""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg2
import web_jobs
from werkzeug.serving import make_server

import underway
from underway import admin, store
from underway.testing import drain

from .helpers import OWNER_ENV, TESTS_DIR, wait_until

ARTIFACTS = TESTS_DIR / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
#: Flags without which Chromium cannot start as root in a container, or tries the network.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,800",
)


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Serve a WSGI app on a free port of 127.0.0.1 in a thread; yields its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium with a fresh profile, its console log readable.

    Its chromedriver is started detached (re-parented to init, without the test-owner
    tag), so the renderer processes Chromium starts while a test runs do not count as
    that test's leaked processes: the browser is the module's, and is stopped here, by
    the pid of its driver."""
    from selenium import webdriver
    from selenium.webdriver.chromium.remote_connection import ChromiumRemoteConnection

    profile = tempfile.mkdtemp(prefix="underway-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    port, pid = _start_detached_driver()
    try:
        url = f"http://127.0.0.1:{port}"
        driver = _browser_class()(
            ChromiumRemoteConnection(url, vendor_prefix="goog", browser_name="chrome"),
            options=options,
        )
        try:
            driver.set_page_load_timeout(20)
            set_viewport(driver, 1280, 800)
            yield driver
        finally:
            driver.quit()
    finally:
        _stop_driver(pid)
        shutil.rmtree(profile, ignore_errors=True)


def _browser_class() -> Any:
    """A remote WebDriver that also reads the console log, as webdriver.Chrome does."""
    from selenium import webdriver

    class Browser(webdriver.Remote):
        def get_log(self, log_type: str) -> list[dict[str, Any]]:
            """The entries of a log (``"browser"``: the console) since the last read."""
            return self.execute("getLog", {"type": log_type})["value"]  # type: ignore[no-any-return]

    return Browser


def _start_detached_driver() -> tuple[int, int]:
    """Start chromedriver outside this process's tree; its port and pid once it listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != OWNER_ENV}
    started = subprocess.run(
        [
            "sh",
            "-c",
            'setsid "$0" --port="$1" >/dev/null 2>&1 </dev/null & echo $!',
            str(CHROMEDRIVER),
            str(port),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    pid = int(started.stdout.strip())

    def listening() -> bool:
        assert psutil.pid_exists(pid), "chromedriver exited at start"
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, timeout=20, interval=0.02, message="chromedriver to listen")
    return port, pid


def _stop_driver(pid: int) -> None:
    """Stop the detached chromedriver (and with it any browser it still runs)."""
    with suppress(psutil.Error):
        proc = psutil.Process(pid)
        family = [proc, *proc.children(recursive=True)]
        for p in family:
            with suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(family, timeout=5)
        for p in alive:
            with suppress(psutil.Error):
                p.kill()


def set_viewport(driver: Any, width: int, height: int) -> None:
    """Size the window so that the page itself gets ``width`` x ``height`` pixels."""
    frame = driver.execute_script(
        "return [window.outerWidth - window.innerWidth, window.outerHeight - window.innerHeight]"
    )
    driver.set_window_size(width + frame[0], height + frame[1])


@dataclass
class Reply:
    """An HTTP reply: status, headers and body text."""

    status: int
    headers: Mapping[str, str]
    text: str


def http(
    url: str,
    data: Mapping[str, Any] | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    password: str | None = None,
) -> Reply:
    """GET (or POST ``data`` as a form) without following redirects."""
    body = None if data is None else urllib.parse.urlencode(data).encode()
    request = urllib.request.Request(url, body, dict(headers or {}))
    if password is not None:
        token = base64.b64encode(f"ops:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=20) as response:
            return Reply(response.status, response.headers, response.read().decode())
    except urllib.error.HTTPError as err:
        return Reply(err.code, err.headers, err.read().decode())


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def sql(dsn: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement; its rows (none for statements without)."""
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(statement, params)
        rows = cur.fetchall() if cur.description else []
    conn.close()
    return rows


def register(dsn: str) -> None:
    """Store the test jobs as a supervisor would, so pages know their steps' names."""
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        store.register_jobs(cur, (job.defaults() for job in web_jobs.ALL))
    conn.close()


def failed_flaky_task(dsn: str) -> int:
    """A web-flaky task that failed for good at its second step; returns its id."""
    web_jobs.FLAKY["fail"] = True
    task = web_jobs.flaky.enqueue({"order": 7})
    drain([web_jobs.flaky], dsn=dsn)
    return task.id


def seed_shop(dsn: str) -> dict[str, Any]:
    """A realistic database: five queues (one paused), failures with tracebacks, a dead
    letter, waiting tasks with lag, a running task held by a live supervisor, schedules,
    a rate limit and an hour of varied throughput. Returns some ids the tests use."""
    register(dsn)
    web_jobs.emails.enqueue_many(
        [{"user_id": 1000 + i, "name": f"user{i}"} for i in range(40)], conn=None
    )
    web_jobs.billing.enqueue_many(
        [{"invoice": 5000 + i, "amount": 120 + 97 * i} for i in range(14)]
    )
    web_jobs.reports.enqueue_many([{"period": p} for p in ("daily", "weekly", "quarterly")])
    web_jobs.webhooks.enqueue_many([{"contact": 300 + i} for i in range(30)])
    drain(web_jobs.ALL, dsn=dsn)
    # Work waiting now: some of it overdue (lag), and a paused queue.
    web_jobs.emails.enqueue_many([{"user_id": 2000 + i, "name": f"new{i}"} for i in range(23)])
    web_jobs.webhooks.enqueue_many([{"contact": 900 + i} for i in range(180)])
    web_jobs.reports.enqueue({"period": "monthly"}, delay=600)
    web_jobs.exports.enqueue_many([{"day": d} for d in range(8)])
    admin.pause("exports")
    running = web_jobs.reports.enqueue({"period": "yearly"}).id
    sql(
        dsn,
        """UPDATE underway.task SET run_at = now() - interval '95 seconds',
                  created_at = now() - interval '95 seconds'
           WHERE job = 'sync-crm-contact' AND state = 'pending'""",
    )
    sql(
        dsn,
        """UPDATE underway.task SET state = 'running', attempts = 1, claim_token = 1,
                  started_at = now() - interval '42 seconds',
                  lease_expires_at = now() + interval '30 seconds'
           WHERE id = %s""",
        (running,),
    )
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        conn.autocommit = True
        store.heartbeat(
            cur,
            str(uuid.UUID(int=7)),
            "worker-1.prod.example.com",
            31337,
            [job.name for job in web_jobs.ALL],
            [
                {"slot": 0, "pid": 31338, "task_id": running},
                {"slot": 1, "pid": 31339, "task_id": None},
                {"slot": 2, "pid": 31340, "task_id": None},
                {"slot": 3, "pid": 31341, "task_id": None},
            ],
            alive_for=3600.0,
        )
    conn.close()
    web_jobs.reports.schedule("0 6 * * *", {"period": "daily"}, name="daily")
    web_jobs.exports.schedule("*/15 8-18 * * MON-FRI[Europe/Berlin]", {"day": 0}, name="office")
    admin.set_rate_limit("webhooks", 600, "m")
    hour_of_throughput(dsn)
    failed = admin.list_tasks(state="failed", job="charge-invoice", limit=1)[0].id
    return {"running": running, "failed": failed}


def hour_of_throughput(dsn: str) -> None:
    """Per-minute statistics for the last hour: a daily rhythm, a burst, a failure spike."""
    rows = []
    for ago in range(60):
        base = 140 + 90 * math.sin(ago / 9) + (180 if 18 <= ago <= 24 else 0)
        failed = 14 if 33 <= ago <= 36 else (ago * 7) % 4
        for queue, share in (("emails", 0.5), ("webhooks", 0.35), ("billing", 0.15)):
            rows.append((ago, queue, int(base * share), failed if share < 0.4 else 0, ago % 6))
    sql(
        dsn,
        """INSERT INTO underway.minute_stat (minute, queue, job, succeeded, failed, retried)
           SELECT date_trunc('minute', now()) - make_interval(mins => r.ago), r.queue, r.queue,
                  r.succeeded, r.failed, r.retried
           FROM jsonb_to_recordset(%s::jsonb) AS r (
               ago int, queue text, succeeded int, failed int, retried int)
           ON CONFLICT DO NOTHING""",
        (
            json.dumps(
                [dict(zip(("ago", "queue", "succeeded", "failed", "retried"), r)) for r in rows]
            ),
        ),
    )


def save_screenshot(driver: Any, name: str, full_page: bool = False) -> Path:
    """Save what the browser shows to tests/artifacts/NAME.png (the whole page when
    ``full_page``); returns the path."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    if full_page:
        shot = driver.execute_cdp_cmd(
            "Page.captureScreenshot", {"captureBeyondViewport": True, "format": "png"}
        )
        path.write_bytes(base64.b64decode(shot["data"]))
    else:
        driver.save_screenshot(str(path))
    return path


def browser_errors(driver: Any, allow: tuple[str, ...] = ()) -> list[str]:
    """The console's severe entries since the last call (the log is drained by reading),
    except those containing one of ``allow``."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and not any(a in entry["message"] for a in allow)
    ]


def configure(dsn: str) -> None:
    """Point the library at ``dsn`` (the ``dsn`` fixture does; subprocess helpers may not)."""
    underway.configure(dsn=dsn)
