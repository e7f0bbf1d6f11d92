"""Prometheus metrics (``underway.metrics``), scraped over HTTP from a real supervisor
(``--metrics-port``) whose two worker processes run the jobs of ``jobs_observe``, against a
real PostgreSQL. Counts are compared exactly: every try is accounted for once, whichever
worker process ran it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
import timeit
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import jobs_observe
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from underway import admin, metrics

from .helpers import Supervisor, dbname_of, query, run_python, wait_until
from .pgtest import PgTestServer

pytestmark = pytest.mark.timeout(60)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

COUNTERS = (
    "underway_tasks_started_total",
    "underway_tasks_succeeded_total",
    "underway_tasks_failed_total",
    "underway_tasks_retried_total",
    "underway_steps_total",
    "underway_worker_restarts_total",
)


@pytest.fixture
def observed(dsn: str) -> str:
    """The test database, with the tables the observe jobs write to."""
    jobs_observe.prepare(dsn)
    return dsn


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(port: int, timeout: float = 10.0) -> tuple[int, str, str]:
    """GET /metrics: status, content type and body."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as reply:
        return reply.status, reply.headers["Content-Type"], reply.read().decode()


def parse(text: str) -> Samples:
    """Every sample of an exposition, by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(port: int) -> Samples:
    """The samples the endpoint serves now."""
    return parse(fetch(port)[2])


def only(samples: Samples, *names: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], int]:
    """The samples of these names, with their values as integers (they are counts)."""
    return {key: int(value) for key, value in samples.items() if key[0] in names}


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


@contextmanager
def served(dsn: str, *args: str, workers: int = 2) -> Iterator[tuple[Supervisor, int]]:
    """A supervisor of the observe jobs serving metrics on a free port, once it answers;
    stopped gracefully (SIGTERM) at the end, so that it cleans up after itself."""
    port = free_port()
    sup = Supervisor(
        ["jobs_observe"], dsn, ["--workers", str(workers), "--metrics-port", str(port), *args]
    )
    with sup:
        try:
            wait_until(lambda: _answers(port), timeout=15, message=f"metrics on {port}: {sup!r}")
            wait_until(lambda: len(sup.worker_pids()) == workers + 1, message="workers started")
            yield sup, port
        finally:  # even after a failure: a SIGKILLed supervisor leaves its directory behind
            sup.signal(signal.SIGTERM)
            status = sup.wait(30)
        assert status == 0, sup


def _answers(port: int) -> bool:
    try:
        return fetch(port, timeout=1)[0] == 200
    except (OSError, urllib.error.URLError):
        return False


def worker_pids_that_ran(dsn: str) -> set[int]:
    """The processes that ran tries (each writes its pid)."""
    return {pid for (pid,) in query(dsn, "SELECT DISTINCT pid FROM observe_effect")}


def test_counters_add_up_over_both_workers_exactly(observed: str) -> None:
    """Tries of a job that succeeds (two steps), one that fails once then succeeds and one
    that fails for good, run by two worker processes (both provably: two tasks wait for
    each other), show in one scrape as the exact per-job totals: started, succeeded,
    retried, failed, every step outcome, the step-duration and pickup-latency histograms'
    counts; the queue of failed tasks shows them. At a graceful stop the supervisor removes
    its private multiprocess directory and frees the port."""
    dsn = observed
    jobs_observe.ok.enqueue_many([{"meet": 2, "dsn": dsn}] * 2 + [{}] * 4)
    jobs_observe.flaky.enqueue_many([None] * 3)
    jobs_observe.doomed.enqueue_many([None] * 2)
    expected = {
        key("underway_tasks_started_total", job="observe-ok"): 12,
        key("underway_tasks_started_total", job="observe-flaky"): 6,
        key("underway_tasks_started_total", job="observe-doomed"): 4,
        key("underway_tasks_succeeded_total", job="observe-ok"): 6,
        key("underway_tasks_succeeded_total", job="observe-flaky"): 3,
        key("underway_tasks_retried_total", job="observe-flaky"): 3,
        key("underway_tasks_retried_total", job="observe-doomed"): 2,
        key("underway_tasks_failed_total", job="observe-doomed"): 2,
        key("underway_steps_total", job="observe-ok", step="fetch", outcome="advanced"): 6,
        key("underway_steps_total", job="observe-ok", step="store", outcome="succeeded"): 6,
        key("underway_steps_total", job="observe-flaky", step="attempt", outcome="retrying"): 3,
        key("underway_steps_total", job="observe-flaky", step="attempt", outcome="succeeded"): 3,
        key("underway_steps_total", job="observe-doomed", step="crash", outcome="retrying"): 2,
        key("underway_steps_total", job="observe-doomed", step="crash", outcome="failed"): 2,
        key("underway_worker_restarts_total"): 0,
    }
    with served(dsn) as (sup, port):
        counted = wait_until(
            lambda: (found := only(scrape(port), *COUNTERS)) == expected and found,
            timeout=20,
            message=f"the expected counts: {sup!r}",
        )
        assert counted == expected
        workers = set(sup.worker_pids())
        ran = worker_pids_that_ran(dsn)
        assert len(ran) == 2 and ran <= workers, (ran, workers)

        samples = scrape(port)
        durations = {
            (labels["job"], labels["step"]): int(value)
            for (name, pairs), value in samples.items()
            if name == "underway_step_duration_seconds_count" and (labels := dict(pairs))
        }
        assert durations == {
            ("observe-ok", "fetch"): 6,
            ("observe-ok", "store"): 6,
            ("observe-flaky", "attempt"): 6,
            ("observe-doomed", "crash"): 4,
        }
        for (job, step), count in durations.items():
            inf = key("underway_step_duration_seconds_bucket", job=job, step=step, le="+Inf")
            assert samples[inf] == count
        pickups = {
            dict(pairs)["job"]: int(value)
            for (name, pairs), value in samples.items()
            if name == "underway_pickup_latency_seconds_count"
        }
        assert pickups == {"observe-ok": 12, "observe-flaky": 6, "observe-doomed": 4}
        # The two tasks that met ran at least as long as they waited for each other.
        assert (
            samples[key("underway_step_duration_seconds_sum", job="observe-ok", step="fetch")] > 0
        )
        assert samples[key("underway_queue_depth", queue="doomed", state="failed")] == 2
        assert samples[key("underway_database_up")] == 1
        directory = re.search(r"multiprocess directory (\S+)\)", sup.output())
        assert directory, sup
    assert not os.path.exists(directory.group(1))
    assert not _answers(port)


def test_paused_queue_shows_its_depth_and_lag(observed: str) -> None:
    """Tasks waiting in a paused queue show as its pending depth, its lag grows from the
    moment they were due, and the queue shows as paused; the content type is Prometheus'
    text format."""
    admin.pause("observe-paused")
    jobs_observe.held.enqueue_many([None] * 3)
    with served(observed) as (_, port):
        status, content_type, _ = fetch(port)
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")

        def lag() -> float:
            return scrape(port)[key("underway_queue_lag_seconds", queue="observe-paused")]

        first = wait_until(lag, message="a lag above 0")
        assert 0 < first < 60
        wait_until(lambda: lag() > first, message="the lag growing")
        samples = scrape(port)
        depth = {
            dict(pairs)["state"]: int(value)
            for (name, pairs), value in samples.items()
            if name == "underway_queue_depth" and dict(pairs)["queue"] == "observe-paused"
        }
        assert depth == {"pending": 3, "running": 0, "failed": 0}
        assert samples[key("underway_queue_paused", queue="observe-paused")] == 1


def test_a_killed_worker_counts_as_a_restart_and_keeps_its_counts(observed: str) -> None:
    """SIGKILL a worker that ran a task: the scrape counts one worker restart, the dead
    worker's counts stay in the totals, a new worker takes its place; no worker process
    holds the supervisor's listening socket."""
    dsn = observed
    with served(dsn) as (sup, port):
        for pid in sup.worker_pids():
            listening = [
                c for c in psutil.Process(pid).net_connections("inet") if c.laddr.port == port
            ]
            assert not listening, f"child {pid} holds the metrics socket"
        jobs_observe.ok.enqueue({})
        started = key("underway_tasks_started_total", job="observe-ok")
        wait_until(lambda: scrape(port).get(started) == 2, message="the task's two tries")
        (victim,) = worker_pids_that_ran(dsn)
        before = set(sup.worker_pids())
        psutil.Process(victim).kill()
        restarts = key("underway_worker_restarts_total")
        wait_until(lambda: scrape(port)[restarts] == 1, message="one restart counted")
        wait_until(
            lambda: len(set(sup.worker_pids()) - before) == 1 and victim not in sup.worker_pids(),
            message="a new worker",
        )
        samples = scrape(port)
        assert samples[started] == 2
        assert samples[key("underway_tasks_succeeded_total", job="observe-ok")] == 1


def test_scrape_answers_while_the_database_is_unreachable_or_stuck(
    observed: str, pg_server: PgTestServer
) -> None:
    """With the database refusing connections, and then with a statement stuck behind a
    lock, a scrape still answers 200 within a few seconds: the workers' counters, and
    underway_database_up 0 instead of the queue gauges; then 1 again once it is back."""
    dsn = observed
    name = dbname_of(dsn)
    up = key("underway_database_up")
    with served(dsn) as (_, port):
        jobs_observe.ok.enqueue({})
        started = key("underway_tasks_started_total", job="observe-ok")
        wait_until(lambda: scrape(port).get(started) == 2, message="the task's two tries")
        with pg_server.admin_connection() as admin_conn:
            admin_conn.cursor().execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            try:
                samples = scrape(port)
            finally:
                admin_conn.cursor().execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        assert samples[up] == 0 and samples[started] == 2
        assert not [n for n, _ in samples if n.startswith("underway_queue_")]
        assert scrape(port)[up] == 1

        with pg_server.admin_connection(name) as locker:
            cur = locker.cursor()
            cur.execute("BEGIN; LOCK TABLE underway.task IN ACCESS EXCLUSIVE MODE")
            began = time.monotonic()
            try:
                samples = scrape(port)
            finally:
                cur.execute("ROLLBACK")
            took = time.monotonic() - began
        assert samples[up] == 0 and samples[started] == 2
        assert metrics.SCRAPE_DB_TIMEOUT <= took < metrics.SCRAPE_DB_TIMEOUT + 3
        assert scrape(port)[up] == 1


def test_exposition_in_a_process_without_workers_has_the_database_gauges_only(
    observed: str,
) -> None:
    """exposition(dsn), as the dashboard calls it in a process of its own, holds each
    queue's gauges and no worker counters; with a database it cannot reach, it answers at
    once with underway_database_up 0 instead of raising."""
    assert not metrics._enabled and metrics.MULTIPROC_ENV not in os.environ
    jobs_observe.ok.enqueue({})
    body, content_type = metrics.exposition(observed)
    samples = parse(body.decode())
    assert content_type.startswith("text/plain; version=0.0.4")
    assert samples[key("underway_queue_depth", queue="observe", state="pending")] == 1
    assert samples[key("underway_database_up")] == 1
    assert not [name for name, _ in samples if name.startswith("underway_tasks_")]

    began = time.monotonic()
    body, _ = metrics.exposition("postgresql://nobody@127.0.0.1:1/nothing")
    assert parse(body.decode()) == {key("underway_database_up"): 0}
    assert time.monotonic() - began < 5


def test_a_taken_port_stops_the_supervisor_saying_so(observed: str) -> None:
    """A --metrics-port something else listens on ends the supervisor with status 1 and a
    one-line message naming the port, not a traceback."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with Supervisor(
            ["jobs_observe"], observed, ["--workers", "1", "--metrics-port", str(port)]
        ) as sup:
            assert sup.wait(30) == 1, sup
            assert f"cannot serve metrics on port {port}" in sup.output(), sup
            assert "Traceback" not in sup.output(), sup


WITHOUT_PROMETHEUS = """
import sys
sys.modules["prometheus_client"] = None  # as if the [metrics] extra were not installed
import underway, underway.supervisor, underway.worker
from underway import metrics
from underway.errors import ConfigurationError
import jobs_observe
underway.configure(dsn=sys.argv[1])
jobs_observe.ok.enqueue({})
worker = underway.worker.Worker(sys.argv[1], {jobs_observe.ok.name: jobs_observe.ok})
assert worker.run_once() and worker.run_once() and not worker.run_once()
for call in (lambda: metrics.serve(0, sys.argv[1]), lambda: metrics.exposition(sys.argv[1])):
    try:
        call()
    except ConfigurationError as exc:
        print("refused:", exc)
from underway.run import main
sys.exit(main(["jobs_observe", "--dsn", sys.argv[1], "--workers", "1", "--metrics-port", "9"]))
"""


def test_without_prometheus_client_underway_runs_and_metrics_say_what_to_install(
    observed: str,
) -> None:
    """With prometheus-client missing, underway imports and a worker runs tasks; serve()
    and exposition() raise ConfigurationError naming the underway[metrics] extra, and a
    supervisor given --metrics-port exits 1 saying the same."""
    done = run_python(["-c", WITHOUT_PROMETHEUS, observed], timeout=30)
    assert done.returncode == 1, done
    assert done.stdout.count("refused: Prometheus metrics need prometheus-client") == 2, done
    assert "underway[metrics]" in done.stderr, done
    assert query(observed, "SELECT state::text FROM underway.task") == [("succeeded",)]


def test_hooks_cost_next_to_nothing_while_disabled() -> None:
    """task_started and task_finished, called on every task, cost under a microsecond
    more than an empty call while metrics are off (they are, in this process)."""
    assert not metrics._enabled
    calls = 100_000

    def per_call(statement: str) -> float:
        timer = timeit.Timer(statement, globals={"metrics": metrics, "nothing": lambda *a: None})
        return min(timer.repeat(5, calls)) / calls

    empty = per_call("nothing('job', 0.1)")
    assert per_call("metrics.task_started('job', 0.1)") - empty < 1e-6
    assert per_call("metrics.task_finished('job', 'step', 'succeeded', 0.1)") - empty < 1e-6


FORKED = """
import json, os, tempfile
from prometheus_client import Gauge, generate_latest
from underway import metrics

directory = tempfile.mkdtemp()
metrics.enable(directory)
pid = os.fork()
if pid == 0:  # a worker: counts, and sets a live gauge of its own (as a job module might)
    metrics.task_started("forked", 0.5)
    Gauge("my_busy", "Busy workers.", multiprocess_mode="livesum").set(1)
    os._exit(0)
os.waitpid(pid, 0)
before = sorted(os.listdir(directory))
metrics.worker_exited(pid)
after = sorted(os.listdir(directory))
text = generate_latest(metrics._ProcessesCollector(directory)).decode()
print(json.dumps({"pid": pid, "before": before, "after": after, "text": text}))
"""


def test_a_forked_process_counts_in_its_own_file_kept_after_it_exits() -> None:
    """A process forked after enable() counts into files named by its own pid (the pid is
    refreshed at each fork, not asked of the kernel on every update); once it is gone,
    worker_exited(pid) removes its live gauges' file and keeps its counters, still summed."""
    done = run_python(["-c", FORKED], timeout=30)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    pid = found["pid"]
    assert {f"counter_{pid}.db", f"histogram_{pid}.db", f"gauge_livesum_{pid}.db"} <= set(
        found["before"]
    )
    assert set(found["before"]) - set(found["after"]) == {f"gauge_livesum_{pid}.db"}
    samples = parse(found["text"])
    assert samples[key("underway_tasks_started_total", job="forked")] == 1
    assert samples[key("underway_pickup_latency_seconds_count", job="forked")] == 1
